//! What a VM is made of, and the checks that reject a bad request before
//! anything is created.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use super::cpuid::CpuProfile;
pub use super::devices::virtio::block::BlockConfig;
pub use super::devices::virtio::fs::{FsConfig, ShareFlags};
pub use super::devices::virtio::vsock::VsockConfig;
use super::error::{Error, Result};
use super::layout::{self, CMDLINE_MAX_SIZE, HIMEM_START, IDENTITY_MAPPED, MIN_MEMORY, PAGE_SIZE};
use super::x86_64::mptable::MAX_VCPUS;

pub const DEFAULT_MEMORY: u64 = 128 << 20;
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Where the guest's serial console goes.
pub enum ConsoleOutput {
    /// Discarded.
    Null,
    /// The VMM's own standard output.
    Stdout,
    /// A file, created or truncated when the VM starts.
    File(PathBuf),
    /// Any writer, e.g. a pipe or a buffer in a test.
    Writer(Box<dyn Write + Send>),
}

impl ConsoleOutput {
    /// The same destination again; a writer cannot be had twice.
    pub fn try_clone(&self) -> Option<ConsoleOutput> {
        match self {
            ConsoleOutput::Null => Some(ConsoleOutput::Null),
            ConsoleOutput::Stdout => Some(ConsoleOutput::Stdout),
            ConsoleOutput::File(p) => Some(ConsoleOutput::File(p.clone())),
            ConsoleOutput::Writer(_) => None,
        }
    }
}

impl fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleOutput::Null => f.write_str("Null"),
            ConsoleOutput::Stdout => f.write_str("Stdout"),
            ConsoleOutput::File(p) => write!(f, "File({})", p.display()),
            ConsoleOutput::Writer(_) => f.write_str("Writer"),
        }
    }
}

/// What the boot vCPU starts executing.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// A Linux kernel (ELF vmlinux or bzImage) through its 64-bit boot protocol.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// Position-dependent 64-bit code, copied to `load_addr` and entered in the
    /// same CPU state a kernel gets, on every vCPU at once with `rdi` holding
    /// the vCPU index. For probing the VMM and KVM without a kernel.
    Code { code: Vec<u8>, load_addr: u64 },
}

#[derive(Debug)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory: MemorySize,
    /// `None` picks the profile that fits the host's KVM.
    pub cpu_profile: Option<CpuProfile>,
    pub boot: BootSource,
    pub console: ConsoleOutput,
    pub kvm_device: PathBuf,
    /// virtio-blk disks, in order: the guest names them vda, vdb, ...
    pub block_devices: Vec<BlockConfig>,
    /// virtio-fs shares, each mounted in the guest by its tag.
    pub shared_dirs: Vec<FsConfig>,
    pub vsock: Option<VsockConfig>,
    /// How a restore gives the guest its saved RAM; `None` picks by host.
    pub restore_memory: Option<RestoreMemory>,
}

/// How a restored VM gets its RAM from the snapshot's memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMemory {
    /// Mapped copy-on-write: VMs restored from one file share its pages
    /// until they write them. The default.
    Mapped,
    /// Copied into the VM's own anonymous memory: each VM pays for every
    /// page of the template, but none depends on the file after the
    /// restore.
    Copied,
}

/// Overrides the default [`RestoreMemory`]: `mapped` or `copied`.
pub const RESTORE_MEMORY_ENV: &str = "SKIFF_RESTORE_MEMORY";

impl RestoreMemory {
    /// `SKIFF_RESTORE_MEMORY` when set to a known value, else mapped.
    pub fn auto() -> RestoreMemory {
        match std::env::var(RESTORE_MEMORY_ENV).as_deref() {
            Ok("copied") => RestoreMemory::Copied,
            _ => RestoreMemory::Mapped,
        }
    }
}

impl VmConfig {
    pub fn new(boot: BootSource) -> Self {
        VmConfig {
            vcpus: 1,
            memory: MemorySize(DEFAULT_MEMORY),
            cpu_profile: None,
            boot,
            console: ConsoleOutput::Null,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            block_devices: Vec::new(),
            shared_dirs: Vec::new(),
            vsock: None,
            restore_memory: None,
        }
    }

    /// Checks what can be checked without KVM; `max_vcpus` and `host_memory`
    /// are the host's limits.
    pub fn validate(&self, max_vcpus: usize, host_memory: Option<u64>) -> Result<()> {
        let limit = max_vcpus.min(usize::from(MAX_VCPUS));
        if self.vcpus == 0 {
            return Err(Error::Config("vcpus must be at least 1".into()));
        }
        if usize::from(self.vcpus) > limit {
            return Err(Error::Config(format!(
                "{} vCPUs requested, but this host allows at most {limit}",
                self.vcpus
            )));
        }
        let mem = self.memory.0;
        if mem < MIN_MEMORY {
            return Err(Error::Config(format!(
                "memory {} is too small: at least {} is needed",
                self.memory,
                MemorySize(MIN_MEMORY)
            )));
        }
        if mem % PAGE_SIZE != 0 {
            return Err(Error::Config(format!(
                "memory {} is not a multiple of the 4 KiB page size",
                self.memory
            )));
        }
        if let Some(host) = host_memory {
            if mem > host {
                return Err(Error::Config(format!(
                    "memory {} exceeds the host's {}",
                    self.memory,
                    MemorySize(host)
                )));
            }
        }
        let devices = self.block_devices.len() + self.shared_dirs.len() + usize::from(self.vsock.is_some());
        if devices > layout::MAX_VIRTIO_DEVICES {
            return Err(Error::Config(format!(
                "{devices} virtio devices requested, but at most {} fit",
                layout::MAX_VIRTIO_DEVICES
            )));
        }
        for disk in &self.block_devices {
            check_file(&disk.path)
                .map_err(|reason| Error::Device(format!("block device {}: {reason}", disk.path.display())))?;
        }
        for (i, share) in self.shared_dirs.iter().enumerate() {
            share
                .validate()
                .map_err(|reason| Error::Device(format!("virtio-fs {}: {reason}", share.tag)))?;
            if self.shared_dirs[..i].iter().any(|s| s.tag == share.tag) {
                return Err(Error::Config(format!(
                    "virtio-fs tag {} is used twice",
                    share.tag
                )));
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < super::devices::virtio::vsock::MIN_GUEST_CID {
                return Err(Error::Config(format!(
                    "vsock guest CID {} is reserved (use 3 or more)",
                    v.guest_cid
                )));
            }
        }
        match &self.boot {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                check_file(kernel).map_err(|reason| Error::Kernel {
                    path: kernel.clone(),
                    reason,
                })?;
                if let Some(initrd) = initrd {
                    check_file(initrd).map_err(|reason| Error::Initrd {
                        path: initrd.clone(),
                        reason,
                    })?;
                }
                if cmdline.len() >= CMDLINE_MAX_SIZE {
                    return Err(Error::Cmdline(format!(
                        "{} bytes is too long: the limit is {}",
                        cmdline.len(),
                        CMDLINE_MAX_SIZE - 1
                    )));
                }
                if cmdline.contains('\0') {
                    return Err(Error::Cmdline("it contains a NUL byte".into()));
                }
            }
            BootSource::Code { code, load_addr } => {
                // Above the boot structures, inside the identity map, in RAM.
                let limit = IDENTITY_MAPPED.min(layout::low_ram_end(mem));
                let end = load_addr.checked_add(code.len() as u64);
                if code.is_empty() || *load_addr < HIMEM_START || end.is_none_or(|end| end > limit) {
                    return Err(Error::Config(format!(
                        "{} bytes of code at {load_addr:#x} must lie within [{HIMEM_START:#x}, {limit:#x})",
                        code.len(),
                    )));
                }
            }
        }
        Ok(())
    }
}

fn check_file(path: &std::path::Path) -> std::result::Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() == 0 {
        return Err("file is empty".into());
    }
    Ok(())
}

/// A size in bytes, written and parsed with binary suffixes: `128M`, `1G`, `512MiB`, `4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(pub u64);

impl FromStr for MemorySize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, suffix) = t.split_at(digits);
        let number: u64 = number.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number with an optional K, M or G suffix")
        })?;
        let shift = match suffix.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(format!("invalid size {s:?}: unknown unit {suffix:?}")),
        };
        number
            .checked_mul(1 << shift)
            .map(MemorySize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if self.0 >= 1 << shift && self.0 % (1 << shift) == 0 {
                return write!(f, "{} {unit}", self.0 >> shift);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_config() -> VmConfig {
        VmConfig::new(BootSource::Code {
            code: vec![0xf4],
            load_addr: HIMEM_START,
        })
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!("128M".parse(), Ok(MemorySize(128 << 20)));
        assert_eq!("1G".parse(), Ok(MemorySize(1 << 30)));
        assert_eq!("512MiB".parse(), Ok(MemorySize(512 << 20)));
        assert_eq!("64k".parse(), Ok(MemorySize(64 << 10)));
        assert_eq!("4096".parse(), Ok(MemorySize(4096)));
        assert!("".parse::<MemorySize>().is_err());
        assert!("12X".parse::<MemorySize>().is_err());
        assert!("M".parse::<MemorySize>().is_err());
        assert!("-1M".parse::<MemorySize>().is_err());
        assert!("99999999999999T".parse::<MemorySize>().is_err());
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(MemorySize(128 << 20).to_string(), "128 MiB");
        assert_eq!(MemorySize(1536 << 20).to_string(), "1536 MiB");
        assert_eq!(MemorySize(3 << 30).to_string(), "3 GiB");
        assert_eq!(MemorySize(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn zero_vcpus_is_rejected() {
        let mut c = code_config();
        c.vcpus = 0;
        let e = c.validate(32, None).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn too_many_vcpus_names_the_limit() {
        let mut c = code_config();
        c.vcpus = 9;
        let e = c.validate(8, None).unwrap_err().to_string();
        assert!(e.contains("9 vCPUs") && e.contains("at most 8"), "{e}");
        c.vcpus = 255;
        assert!(c.validate(1024, None).is_err());
    }

    #[test]
    fn memory_bounds() {
        let mut c = code_config();
        c.memory = MemorySize(1 << 20);
        assert!(c.validate(1, None).unwrap_err().to_string().contains("too small"));
        c.memory = MemorySize((64 << 20) + 1);
        assert!(c.validate(1, None).unwrap_err().to_string().contains("multiple"));
        c.memory = MemorySize(2 << 30);
        let e = c.validate(1, Some(1 << 30)).unwrap_err().to_string();
        assert!(e.contains("exceeds the host's 1 GiB"), "{e}");
        c.memory = MemorySize(64 << 20);
        c.validate(1, Some(1 << 30)).unwrap();
    }

    #[test]
    fn missing_kernel_is_named() {
        let c = VmConfig::new(BootSource::Linux {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
        });
        let e = c.validate(1, None).unwrap_err().to_string();
        assert!(e.starts_with("kernel /nonexistent/vmlinux:"), "{e}");
    }

    #[test]
    fn directory_as_initrd_is_rejected() {
        let exe = std::env::current_exe().unwrap();
        let c = VmConfig::new(BootSource::Linux {
            kernel: exe,
            initrd: Some("/".into()),
            cmdline: String::new(),
        });
        let e = c.validate(1, None).unwrap_err().to_string();
        assert!(e.contains("initrd /: not a regular file"), "{e}");
    }

    #[test]
    fn overlong_command_line_is_rejected() {
        let exe = std::env::current_exe().unwrap();
        let c = VmConfig::new(BootSource::Linux {
            kernel: exe,
            initrd: None,
            cmdline: "x".repeat(CMDLINE_MAX_SIZE),
        });
        assert!(c.validate(1, None).unwrap_err().to_string().contains("too long"));
    }

    #[test]
    fn code_must_fit_in_memory_and_clear_the_boot_structures() {
        let mut c = code_config();
        c.memory = MemorySize(2 << 20);
        for (load_addr, len) in [((2 << 20) - 8, 16), (0x8000, 1), (IDENTITY_MAPPED - 1, 2)] {
            c.boot = BootSource::Code {
                code: vec![0; len],
                load_addr,
            };
            assert!(c.validate(1, None).is_err(), "{load_addr:#x}+{len}");
        }
        c.boot = BootSource::Code {
            code: vec![0; 16],
            load_addr: HIMEM_START,
        };
        c.validate(1, None).unwrap();
    }
}
