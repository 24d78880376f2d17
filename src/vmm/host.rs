//! Facts about the host that decide how a VM is set up.

use std::fs;

/// How the host's KVM runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmBackend {
    /// VT-x or AMD-V: guest code runs natively.
    Hardware,
    /// No virtualization extensions (KVM runs on top of a software scheme, so
    /// privileged guest code goes through KVM's instruction emulator).
    Software,
}

/// Hardware virtualization shows up as `vmx` (Intel) or `svm` (AMD) among the CPU flags.
pub fn backend_from_cpuinfo(cpuinfo: &str) -> KvmBackend {
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm");
    if hardware {
        KvmBackend::Hardware
    } else {
        KvmBackend::Software
    }
}

pub fn detect_backend() -> KvmBackend {
    backend_from_cpuinfo(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// Total host RAM in bytes, from `MemTotal` in /proc/meminfo.
pub fn total_memory() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_total(&meminfo)
}

fn meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_or_svm_means_hardware() {
        assert_eq!(
            backend_from_cpuinfo("flags\t: fpu vme svm lm\n"),
            KvmBackend::Hardware
        );
        assert_eq!(backend_from_cpuinfo("flags\t: fpu vmx\n"), KvmBackend::Hardware);
        assert_eq!(
            backend_from_cpuinfo("flags\t: fpu hypervisor lm\nmodel name: svm-like\n"),
            KvmBackend::Software
        );
    }

    #[test]
    fn meminfo_total_is_in_bytes() {
        assert_eq!(
            meminfo_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
        assert_eq!(meminfo_total("nothing"), None);
    }
}
