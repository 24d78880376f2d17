//! What `skiff features` reports: the OCI runtime-spec "features" document
//! (features.md), which engines read to learn what a runtime supports.
//!
//! Each container is a whole VM rather than a set of namespaces and cgroups
//! on the host kernel, so the answers differ from runc's: the isolation a
//! namespace would give comes with the VM, and nothing is placed in a host
//! cgroup or confined by seccomp, AppArmor or SELinux.

use serde_json::{json, Value};

use super::hooks::HookKind;
use super::sizing::{DEFAULT_VCPUS, MEMORY_ANNOTATION, VCPUS_ANNOTATION};
use crate::vmm::config::DEFAULT_MEMORY;
use crate::vmm::MemorySize;

/// The oldest runtime-spec version whose config.json skiff reads.
pub const OCI_VERSION_MIN: &str = "1.0.0";
/// Annotation (in the features document) carrying skiff's version.
pub const VERSION_ANNOTATION: &str = "io.skiff.version";

/// The mount options the guest agent understands (guest/agent/src/mounts.rs:
/// its flag and propagation tables, and `defaults`, which it accepts as a
/// no-op). Filesystem-specific data options are not listed, per the spec.
const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];

/// The namespaces whose isolation a container has: the VM gives it its own
/// kernel, hence its own instance of each. Not `user` (ids are not
/// remapped) nor `time` (offsets are not applied).
const NAMESPACES: &[&str] = &["cgroup", "ipc", "mount", "network", "pid", "uts"];

/// The capabilities the agent can grant: those the `caps` crate it uses
/// knows, Linux's 0 (CAP_CHOWN) to 40 (CAP_CHECKPOINT_RESTORE).
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The features document.
pub fn features() -> Value {
    let hooks: Vec<&str> = HookKind::ALL.iter().map(|k| k.name()).collect();
    json!({
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": oci_spec::runtime::VERSION,
        "hooks": hooks,
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": CAPABILITIES,
            // Whether support is built in, not what the host runs: skiff
            // puts no container in a host cgroup, so none is.
            "cgroup": {
                "v1": false,
                "v2": false,
                "systemd": false,
                "systemdUser": false,
                "rdma": false,
            },
            "seccomp": { "enabled": false },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false },
            "intelRdt": { "enabled": false },
            "mountExtensions": { "idmap": { "enabled": false } },
        },
        "annotations": {
            VERSION_ANNOTATION: env!("CARGO_PKG_VERSION"),
            VCPUS_ANNOTATION: format!(
                "config.json annotation: the VM's vCPUs, 1 to the host's CPU count \
                 (default: from linux.resources.cpu, else {DEFAULT_VCPUS})"
            ),
            MEMORY_ANNOTATION: format!(
                "config.json annotation: the VM's memory, e.g. 256M or 1G \
                 (default: linux.resources.memory.limit, else {})",
                MemorySize(DEFAULT_MEMORY)
            ),
        },
        // They override the resource limits an engine set, so an engine
        // should pass them from untrusted users only on purpose.
        "potentiallyUnsafeConfigAnnotations": [VCPUS_ANNOTATION, MEMORY_ANNOTATION],
    })
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{Capability, Features, LinuxNamespaceType};

    use super::*;

    #[test]
    fn it_is_a_features_document() {
        let value = features();
        let text = serde_json::to_string(&value).unwrap();
        let parsed: Features = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.oci_version_min(), "1.0.0");
        assert_eq!(parsed.oci_version_max(), oci_spec::runtime::VERSION);
        assert_eq!(parsed.hooks().as_ref().unwrap().len(), 6);
        assert!(parsed
            .mount_options()
            .as_ref()
            .unwrap()
            .contains(&"rbind".to_owned()));

        let linux = parsed.linux().as_ref().unwrap();
        let namespaces = linux.namespaces().as_ref().unwrap();
        assert!(namespaces.contains(&LinuxNamespaceType::Pid));
        assert!(!namespaces.contains(&LinuxNamespaceType::User));
        let cgroup = linux.cgroup().as_ref().unwrap();
        assert_eq!(
            (*cgroup.v1(), *cgroup.v2(), *cgroup.systemd()),
            (Some(false), Some(false), Some(false))
        );
        assert_eq!(*linux.seccomp().as_ref().unwrap().enabled(), Some(false));
        assert_eq!(*linux.apparmor().as_ref().unwrap().enabled(), Some(false));
        assert_eq!(*linux.selinux().as_ref().unwrap().enabled(), Some(false));

        let annotations = parsed.annotations().as_ref().unwrap();
        assert_eq!(annotations[VERSION_ANNOTATION], env!("CARGO_PKG_VERSION"));
        assert!(annotations.contains_key(VCPUS_ANNOTATION));
        assert!(annotations[MEMORY_ANNOTATION].contains("128 MiB"));
        assert_eq!(
            value["hooks"],
            json!([
                "prestart",
                "createRuntime",
                "createContainer",
                "startContainer",
                "poststart",
                "poststop"
            ])
        );
    }

    #[test]
    fn capabilities_are_the_kernels_names() {
        assert_eq!(CAPABILITIES.len(), 41);
        for name in CAPABILITIES {
            let cap: Capability = serde_json::from_value(json!(name)).unwrap();
            assert_eq!(serde_json::to_value(cap).unwrap(), json!(name));
        }
    }

    #[test]
    fn mount_options_match_the_agents_tables() {
        // The agent's tables are the truth; this catches a list that drifts.
        let source = include_str!("../../guest/agent/src/mounts.rs");
        let mut agent: Vec<&str> = ["FLAG_OPTIONS", "PROPAGATION_OPTIONS"]
            .iter()
            .flat_map(|table| {
                let start = source.find(&format!("const {table}")).expect(table);
                let body = &source[start..start + source[start..].find("];").unwrap()];
                body.lines()
                    .filter_map(|l| l.trim().strip_prefix("(\""))
                    .map(|l| &l[..l.find('"').unwrap()])
                    .collect::<Vec<_>>()
            })
            .collect();
        agent.push("defaults");
        agent.sort_unstable();
        let mut ours = MOUNT_OPTIONS.to_vec();
        ours.sort_unstable();
        assert_eq!(ours, agent);
    }
}
