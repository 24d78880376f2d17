//! What a waiter needs to turn itself into the container's process, handed
//! over in its argument vector: the agent computes it, the waiter applies
//! it. Both ends are built from the same source (the waiter is the agent's
//! own binary), so the contract has no version.

use serde::{Deserialize, Serialize};

use super::creds::{CapPlan, Resource};

/// The waiter's `argv[1]`; `argv[2]` is the plan as JSON and the rest is
/// the process's own argument vector.
pub const WAITER_FLAG: &str = "--skiff-waiter";
/// The waiter's `argv[0]` and command name, as `ps` shows it until
/// `Start`.
pub const WAITER_NAME: &str = "skiff-waiter";
/// Where the first process's arguments start in the waiter's `argv`.
pub const ARGS_AT: usize = 3;

/// The waiter's descriptors besides 0-2 (the process's stdio): the read end
/// of the pipe whose one byte is the host's `Start`, and the write end of
/// the failure pipe. Every other descriptor is closed before it runs.
pub const START_FD: libc::c_int = 3;
pub const REPORT_FD: libc::c_int = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The executable, as a path in the waiter's root; bytes, since a path
    /// need not be UTF-8.
    pub exe: Vec<u8>,
    pub cwd: Vec<u8>,
    pub rlimits: Vec<Rlimit>,
    pub umask: libc::mode_t,
    pub groups: Vec<libc::gid_t>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub caps: Option<CapPlan>,
    pub no_new_privileges: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

impl Plan {
    pub fn encode(&self) -> String {
        // Only numbers, byte arrays, booleans and capability names: it
        // cannot fail to serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &[u8]) -> Option<Plan> {
        serde_json::from_slice(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_survives_its_encoding() {
        let plan = Plan {
            exe: b"/bin/\xffodd".to_vec(),
            cwd: b"/".to_vec(),
            rlimits: vec![Rlimit {
                resource: libc::RLIMIT_NOFILE,
                soft: 1024,
                hard: u64::MAX,
            }],
            umask: 0o022,
            groups: vec![1, 2],
            uid: 1000,
            gid: 1000,
            caps: Some(CapPlan {
                drop_bounding: vec![caps::Capability::CAP_SYS_ADMIN],
                effective: [caps::Capability::CAP_KILL].into_iter().collect(),
                inheritable: Default::default(),
                permitted: [caps::Capability::CAP_KILL].into_iter().collect(),
                ambient: vec![],
            }),
            no_new_privileges: true,
        };
        let text = plan.encode();
        assert!(!text.contains('\0'), "an argument cannot hold a NUL");
        assert_eq!(Plan::decode(text.as_bytes()), Some(plan));
        assert_eq!(Plan::decode(b"{"), None);
    }
}
