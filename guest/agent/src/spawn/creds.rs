//! An OCI process's identity and limits translated, in the agent, into
//! the values the waiter hands straight to the kernel.

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities, PosixRlimit, PosixRlimitType, Process};
use serde::{Deserialize, Serialize};

use crate::log::info;

/// The capability sets to apply, resolved to the `caps` crate's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

    /// The sets in the order `capset` accepts them: the effective set
    /// shrinks first (it must stay within the permitted set), the
    /// inheritable set while the permitted set still covers it.
    pub fn base_sets(&self) -> [(CapSet, &CapsHashSet); 3] {
        [
            (CapSet::Effective, &self.effective),
            (CapSet::Inheritable, &self.inheritable),
            (CapSet::Permitted, &self.permitted),
        ]
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
    }
}
