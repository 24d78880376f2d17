//! An OCI process's identity and limits translated, in the agent, into
//! the values the process hands straight to the kernel.

use caps::{Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities, PosixRlimit, PosixRlimitType, Process};

use crate::log::info;

/// The capability sets to apply, resolved to the `caps` crate's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapPlan {
    /// Bounding-set members the kernel has that the spec does not list.
    pub drop_bounding: Vec<Capability>,
    pub effective: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub permitted: CapsHashSet,
    pub ambient: Vec<Capability>,
}

impl CapPlan {
    pub fn from_spec(spec: &LinuxCapabilities) -> CapPlan {
        let bounding = convert(spec.bounding().as_ref());
        let mut drop_bounding: Vec<Capability> = caps::runtime::thread_all_supported()
            .into_iter()
            .filter(|c| !bounding.contains(c))
            .collect();
        drop_bounding.sort_by_key(|c| c.index());
        let mut ambient: Vec<Capability> = convert(spec.ambient().as_ref()).into_iter().collect();
        ambient.sort_by_key(|c| c.index());
        CapPlan {
            drop_bounding,
            effective: convert(spec.effective().as_ref()),
            inheritable: convert(spec.inheritable().as_ref()),
            permitted: convert(spec.permitted().as_ref()),
            ambient,
        }
    }

    /// The plan as the kernel takes it.
    pub fn masks(&self) -> CapMasks {
        let mask = |set: &CapsHashSet| set.iter().fold(0u64, |m, c| m | (1u64 << c.index()));
        CapMasks {
            drop_bounding: self.drop_bounding.iter().map(|c| c.index()).collect(),
            effective: mask(&self.effective),
            permitted: mask(&self.permitted),
            inheritable: mask(&self.inheritable),
            ambient: self.ambient.iter().map(|c| c.index()).collect(),
        }
    }
}

/// Capability numbers and sets, ready for `prctl` and `capset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapMasks {
    pub drop_bounding: Vec<u8>,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: Vec<u8>,
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
pub struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`; version 3 takes two, low word first.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

impl CapMasks {
    /// `capset`'s arguments for the calling thread, all three sets at once
    /// (the kernel checks them together against the sets before the call).
    pub fn capset_args(&self) -> (CapHeader, [CapData; 2]) {
        let word = |i: u32| CapData {
            effective: (self.effective >> (32 * i)) as u32,
            permitted: (self.permitted >> (32 * i)) as u32,
            inheritable: (self.inheritable >> (32 * i)) as u32,
        };
        let header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        (header, [word(0), word(1)])
    }
}

/// OCI names (`CAP_SYS_ADMIN`) to the `caps` crate's; a capability newer
/// than it knows is left out with a warning, as runc does for ones newer
/// than the kernel.
fn convert(set: Option<&Capabilities>) -> CapsHashSet {
    let Some(set) = set else { return CapsHashSet::new() };
    set.iter()
        .filter_map(|c| {
            let name = format!("CAP_{c}");
            let parsed = name.parse::<Capability>().ok();
            if parsed.is_none() {
                info!("ignoring unknown capability {name}");
            }
            parsed
        })
        .collect()
}

pub type Resource = libc::__rlimit_resource_t;

pub fn rlimits(process: &Process) -> Vec<(Resource, libc::rlimit, PosixRlimitType)> {
    let none = Vec::new();
    process
        .rlimits()
        .as_ref()
        .unwrap_or(&none)
        .iter()
        .map(|r: &PosixRlimit| {
            let limit = libc::rlimit {
                rlim_cur: r.soft(),
                rlim_max: r.hard(),
            };
            (resource(r.typ()), limit, r.typ())
        })
        .collect()
}

fn resource(typ: PosixRlimitType) -> Resource {
    match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_map_and_the_rest_of_the_bounding_set_is_dropped() {
        // As the host sends it: a set that is not there is empty.
        let spec: LinuxCapabilities = serde_json::from_str(
            r#"{"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL", "CAP_CHOWN"],
                "ambient": ["CAP_KILL", "CAP_CHOWN"]}"#,
        )
        .unwrap();
        let plan = CapPlan::from_spec(&spec);
        let want: CapsHashSet = [Capability::CAP_CHOWN, Capability::CAP_KILL]
            .into_iter()
            .collect();
        assert_eq!(plan.effective, want);
        assert!(plan.permitted.is_empty());
        assert_eq!(plan.ambient, [Capability::CAP_CHOWN, Capability::CAP_KILL]);
        assert!(!plan.drop_bounding.contains(&Capability::CAP_CHOWN));
        assert!(plan.drop_bounding.contains(&Capability::CAP_SYS_ADMIN));

        let masks = plan.masks();
        let (kill, chown) = (Capability::CAP_KILL.index(), Capability::CAP_CHOWN.index());
        let kill_and_chown = (1u64 << kill) | (1u64 << chown);
        assert_eq!(masks.effective, kill_and_chown);
        assert_eq!((masks.permitted, masks.inheritable), (0, 0));
        assert_eq!(masks.ambient, [chown, kill]);
        assert!(masks.drop_bounding.contains(&Capability::CAP_SYS_ADMIN.index()));
        let (_, data) = masks.capset_args();
        assert_eq!(data[0].effective, kill_and_chown as u32);
        assert_eq!(data[1].effective, 0);
        // CAP_CHECKPOINT_RESTORE (40) lands in the high word.
        let high = CapMasks {
            effective: 1 << 40,
            ..masks
        };
        assert_eq!(high.capset_args().1[1].effective, 1 << 8);
    }
}
