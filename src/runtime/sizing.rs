//! How big a container's microVM is: its vCPUs and memory, from the OCI
//! resource limits of config.json or skiff's own annotations.
//!
//! Under runc the limits cap a cgroup on a shared kernel; here they size the
//! VM. The guest's own kernel and agent live inside its memory limit, so the
//! container gets a little less than under runc, never more; a CPU quota
//! becomes whole vCPUs, rounded up.

use oci_spec::runtime::{LinuxCpu, Spec};

use super::error::RuntimeError;
use crate::vmm::config::DEFAULT_MEMORY;
use crate::vmm::x86_64::mptable::MAX_VCPUS;
use crate::vmm::MemorySize;

/// Annotation that sets the vCPU count, overriding `linux.resources.cpu`.
pub const VCPUS_ANNOTATION: &str = "io.skiff.vcpus";
/// Annotation that sets the guest memory (`256M`, `1G`, or bytes),
/// overriding `linux.resources.memory.limit`.
pub const MEMORY_ANNOTATION: &str = "io.skiff.memory";

pub const DEFAULT_VCPUS: u8 = 1;

/// The smallest guest a container can have. The guest kernel occupies
/// memory up to about 28 MiB (it is loaded at 16 MiB) and the agent's
/// initramfs, about 3.5 MiB, must fit above it; at 32 MiB a busybox
/// container runs with some 12 MiB to spare. Below, the VM cannot boot.
pub const MIN_CONTAINER_MEMORY: u64 = 32 << 20;

/// The CFS bandwidth period the kernel uses when none is set (100 ms).
const DEFAULT_CPU_PERIOD: u64 = 100_000;

const MIB: u64 = 1 << 20;

/// The size of a container's VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub memory: MemorySize,
    /// Host CPUs the VM's threads are pinned to (`linux.resources.cpu.cpus`),
    /// ascending; `None` leaves them free to run anywhere.
    pub cpus: Option<Vec<usize>>,
}

/// Sizes the VM for `spec` on a host with `host_cpus` CPUs.
pub fn size_for(spec: &Spec, host_cpus: usize) -> Result<VmSize, RuntimeError> {
    let max_vcpus = host_cpus.clamp(1, usize::from(MAX_VCPUS));
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let cpus = match cpu {
        Some(cpu) => cpuset(cpu, host_cpus)?,
        None => None,
    };
    let annotation = |name: &str| {
        spec.annotations()
            .as_ref()
            .and_then(|a| a.get(name))
            .map(String::as_str)
    };

    let vcpus = match annotation(VCPUS_ANNOTATION) {
        Some(value) => vcpus_annotation(value, max_vcpus)?,
        None => {
            let from_quota = cpu.map(quota_cpus).transpose()?.flatten();
            let from_cpuset = cpus.as_ref().map(Vec::len);
            let wanted = match (from_quota, from_cpuset) {
                (Some(q), Some(s)) => q.min(s),
                (Some(n), None) | (None, Some(n)) => n,
                (None, None) => usize::from(DEFAULT_VCPUS),
            };
            wanted.clamp(1, max_vcpus)
        }
    };

    let memory = match annotation(MEMORY_ANNOTATION) {
        Some(value) => memory_annotation(value)?,
        None => {
            let limit = resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit());
            memory_limit(limit)?
        }
    };

    Ok(VmSize {
        vcpus: u8::try_from(vcpus).expect("at most MAX_VCPUS"),
        memory,
        cpus,
    })
}

/// The CPUs `quota` per `period` amounts to, rounded up: 1.5 CPUs of time
/// needs two vCPUs to be usable at all. `None` when there is no quota.
fn quota_cpus(cpu: &LinuxCpu) -> Result<Option<usize>, RuntimeError> {
    // The kernel (and runc) read a quota of -1, or none, as unlimited.
    let quota = match cpu.quota() {
        Some(q) if q > 0 => q.unsigned_abs(),
        _ => return Ok(None),
    };
    let period = cpu.period().unwrap_or(DEFAULT_CPU_PERIOD);
    if period == 0 {
        return Err(RuntimeError::Bundle(
            "`linux.resources.cpu.period` is 0: it must be a positive number of microseconds".into(),
        ));
    }
    let cpus = quota.div_ceil(period);
    Ok(Some(usize::try_from(cpus).unwrap_or(usize::MAX)))
}

/// The host CPUs of `linux.resources.cpu.cpus`, checked to exist.
fn cpuset(cpu: &LinuxCpu, host_cpus: usize) -> Result<Option<Vec<usize>>, RuntimeError> {
    let Some(list) = cpu.cpus().as_deref().filter(|s| !s.trim().is_empty()) else {
        return Ok(None);
    };
    parse_cpu_list(list, host_cpus)
        .map(Some)
        .map_err(|why| RuntimeError::Bundle(format!("`linux.resources.cpu.cpus` {list:?}: {why}")))
}

/// Parses a cpuset list such as `0-3,7`, the syntax of the cgroup
/// `cpuset.cpus` file, into ascending distinct CPU numbers below `host_cpus`.
fn parse_cpu_list(list: &str, host_cpus: usize) -> Result<Vec<usize>, String> {
    let number = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("{:?} is not a CPU number", s.trim()))
    };
    let mut cpus = Vec::new();
    for item in list.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(item)?;
                (n, n)
            }
        };
        if first > last {
            return Err(format!("the range {first}-{last} is backwards"));
        }
        // Checked before expanding, so a huge range cannot allocate much.
        if last >= host_cpus {
            return Err(format!(
                "CPU {last} does not exist: this host has {host_cpus} CPUs (0-{})",
                host_cpus.saturating_sub(1)
            ));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn vcpus_annotation(value: &str, max_vcpus: usize) -> Result<usize, RuntimeError> {
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=max_vcpus).contains(&n) => Ok(n),
        _ => Err(RuntimeError::Bundle(format!(
            "annotation {VCPUS_ANNOTATION} is {value:?}: expected a number of vCPUs from 1 to {max_vcpus}"
        ))),
    }
}

fn memory_annotation(value: &str) -> Result<MemorySize, RuntimeError> {
    let bytes = value
        .parse::<MemorySize>()
        .map_err(|why| RuntimeError::Bundle(format!("annotation {MEMORY_ANNOTATION}: {why}")))?;
    guest_memory(bytes.0)
        .map_err(|why| RuntimeError::Bundle(format!("annotation {MEMORY_ANNOTATION} is {value:?}: {why}")))
}

fn memory_limit(limit: Option<i64>) -> Result<MemorySize, RuntimeError> {
    let field = "`linux.resources.memory.limit`";
    match limit {
        // -1 is "unlimited"; runc treats 0 as "not set".
        None | Some(-1) | Some(0) => Ok(MemorySize(DEFAULT_MEMORY)),
        Some(l) if l < 0 => Err(RuntimeError::Bundle(format!(
            "{field} is {l}: expected a number of bytes, or -1 for no limit"
        ))),
        Some(l) => guest_memory(l.unsigned_abs())
            .map_err(|why| RuntimeError::Bundle(format!("{field} is {l}: {why}"))),
    }
}

/// `bytes` rounded down to whole MiB, which keeps the guest within what was
/// asked and page-aligned, if a guest fits in it.
fn guest_memory(bytes: u64) -> Result<MemorySize, String> {
    let memory = MemorySize(bytes / MIB * MIB);
    if memory.0 < MIN_CONTAINER_MEMORY {
        return Err(format!(
            "a container's microVM needs at least {} ({MIN_CONTAINER_MEMORY} bytes)",
            MemorySize(MIN_CONTAINER_MEMORY)
        ));
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A spec from the JSON of its `linux.resources` and `annotations`.
    fn spec(resources: serde_json::Value, annotations: serde_json::Value) -> Spec {
        serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "linux": { "resources": resources },
            "annotations": annotations,
        }))
        .unwrap()
    }

    fn size(resources: serde_json::Value) -> Result<VmSize, RuntimeError> {
        size_for(&spec(resources, json!({})), 8)
    }

    fn error(resources: serde_json::Value, annotations: serde_json::Value) -> String {
        size_for(&spec(resources, annotations), 8)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn no_limits_give_the_defaults() {
        let s = size_for(&Spec::default(), 8).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 1,
                memory: MemorySize(128 << 20),
                cpus: None
            }
        );
        let s = size(json!({"cpu": {"quota": -1}, "memory": {"limit": -1}})).unwrap();
        assert_eq!((s.vcpus, s.memory), (1, MemorySize(DEFAULT_MEMORY)));
    }

    #[test]
    fn quota_rounds_up_to_whole_vcpus() {
        let vcpus = |cpu| size(json!({ "cpu": cpu })).unwrap().vcpus;
        assert_eq!(vcpus(json!({"quota": 150000, "period": 100000})), 2);
        assert_eq!(vcpus(json!({"quota": 200000})), 2);
        assert_eq!(vcpus(json!({"quota": 1000})), 1);
        assert_eq!(vcpus(json!({"quota": 50000, "period": 10000})), 5);
        assert_eq!(vcpus(json!({"quota": 0})), 1);
    }

    #[test]
    fn never_more_vcpus_than_the_host_has() {
        let s = size(json!({"cpu": {"quota": 6400000}})).unwrap();
        assert_eq!(s.vcpus, 8);
        let s = size_for(&spec(json!({"cpu": {"quota": 100_000_000}}), json!({})), 1024).unwrap();
        assert_eq!(s.vcpus, MAX_VCPUS);
    }

    #[test]
    fn a_zero_period_is_rejected() {
        let e = error(json!({"cpu": {"quota": 1000, "period": 0}}), json!({}));
        assert!(e.contains("linux.resources.cpu.period"), "{e}");
    }

    #[test]
    fn cpuset_sizes_and_pins() {
        let s = size(json!({"cpu": {"cpus": "0-3,7"}})).unwrap();
        assert_eq!(s.vcpus, 5);
        assert_eq!(s.cpus, Some(vec![0, 1, 2, 3, 7]));
        let s = size(json!({"cpu": {"cpus": " 2, 1-2 ,2"}})).unwrap();
        assert_eq!((s.vcpus, s.cpus), (2, Some(vec![1, 2])));
        let s = size(json!({"cpu": {"cpus": ""}})).unwrap();
        assert_eq!((s.vcpus, s.cpus), (1, None));
    }

    #[test]
    fn quota_and_cpuset_take_the_smaller() {
        let s = size(json!({"cpu": {"cpus": "0-5", "quota": 200000}})).unwrap();
        assert_eq!((s.vcpus, s.cpus.unwrap().len()), (2, 6));
        let s = size(json!({"cpu": {"cpus": "3", "quota": 400000}})).unwrap();
        assert_eq!((s.vcpus, s.cpus), (1, Some(vec![3])));
    }

    #[test]
    fn bad_cpusets_are_named() {
        for (list, why) in [
            ("8", "CPU 8 does not exist"),
            ("0-99999999999", "CPU 99999999999 does not exist"),
            ("3-1", "backwards"),
            ("a", "\"a\" is not a CPU number"),
            ("1,,2", "\"\" is not a CPU number"),
            ("0-", "is not a CPU number"),
        ] {
            let e = error(json!({"cpu": {"cpus": list}}), json!({}));
            assert!(
                e.contains("linux.resources.cpu.cpus") && e.contains(why),
                "{list}: {e}"
            );
        }
    }

    #[test]
    fn memory_limit_rounds_down_to_whole_mib() {
        let memory = |limit: i64| size(json!({"memory": {"limit": limit}})).unwrap().memory;
        assert_eq!(memory(256 << 20), MemorySize(256 << 20));
        assert_eq!(memory((256 << 20) + (1 << 20) - 1), MemorySize(256 << 20));
        assert_eq!(memory(3 << 30), MemorySize(3 << 30));
        assert_eq!(memory(0), MemorySize(DEFAULT_MEMORY));
    }

    #[test]
    fn too_small_or_negative_memory_limits_are_named() {
        let e = error(json!({"memory": {"limit": 16 << 20}}), json!({}));
        assert!(
            e.contains("linux.resources.memory.limit") && e.contains("at least 32 MiB"),
            "{e}"
        );
        let e = error(json!({"memory": {"limit": MIN_CONTAINER_MEMORY - 1}}), json!({}));
        assert!(e.contains("linux.resources.memory.limit"), "{e}");
        let s = size(json!({"memory": {"limit": MIN_CONTAINER_MEMORY}})).unwrap();
        assert_eq!(s.memory, MemorySize(MIN_CONTAINER_MEMORY));
        let e = error(json!({"memory": {"limit": -2}}), json!({}));
        assert!(e.contains("linux.resources.memory.limit` is -2"), "{e}");
    }

    #[test]
    fn annotations_override_the_resources() {
        let s = size_for(
            &spec(
                json!({"cpu": {"quota": 100000, "cpus": "0-1"}, "memory": {"limit": 1 << 30}}),
                json!({VCPUS_ANNOTATION: "4", MEMORY_ANNOTATION: "256M"}),
            ),
            8,
        )
        .unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 4,
                memory: MemorySize(256 << 20),
                cpus: Some(vec![0, 1])
            }
        );
        let s = size_for(&spec(json!({}), json!({MEMORY_ANNOTATION: "1073741825"})), 8).unwrap();
        assert_eq!(s.memory, MemorySize(1 << 30));
    }

    #[test]
    fn bad_annotations_are_named() {
        for value in ["0", "9", "two", "-1", ""] {
            let e = error(json!({}), json!({VCPUS_ANNOTATION: value}));
            assert!(
                e.contains(VCPUS_ANNOTATION) && e.contains("1 to 8"),
                "{value}: {e}"
            );
        }
        for value in ["lots", "12X", "31M", "-1"] {
            let e = error(json!({}), json!({MEMORY_ANNOTATION: value}));
            assert!(e.contains(MEMORY_ANNOTATION), "{value}: {e}");
        }
    }
}
