//! The config.json `skiff spec` writes: runc's example spec (a shell on a
//! terminal with few privileges), under skiff's name.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use oci_spec::runtime::{Capabilities, Capability, Linux, LinuxCapabilities, Spec, VERSION};

use super::error::RuntimeError;

pub const CONFIG_FILE: &str = "config.json";
pub const DEFAULT_HOSTNAME: &str = "skiff";

/// A spec with runc's defaults; `rootless` adapts it for an unprivileged
/// user as `runc spec --rootless` does.
pub fn default_spec(rootless: bool) -> Spec {
    // oci-spec's default is runc's example with a few differences, undone
    // here: its version, hostname and terminal, and the inheritable and
    // ambient capabilities runc stopped granting (CVE-2022-29162).
    let mut spec = Spec::default();
    spec.set_version(VERSION.to_owned())
        .set_hostname(Some(DEFAULT_HOSTNAME.to_owned()));
    if let Some(process) = spec.process_mut() {
        let caps: Capabilities = [
            Capability::AuditWrite,
            Capability::Kill,
            Capability::NetBindService,
        ]
        .into_iter()
        .collect();
        let mut capabilities = LinuxCapabilities::default();
        capabilities
            .set_bounding(Some(caps.clone()))
            .set_effective(Some(caps.clone()))
            .set_permitted(Some(caps))
            .set_inheritable(None)
            .set_ambient(None);
        process
            .set_terminal(Some(true))
            .set_capabilities(Some(capabilities));
    }
    if let Some(linux) = spec.linux_mut() {
        // runc's list gained this entry after oci-spec copied it.
        linux
            .masked_paths_mut()
            .get_or_insert_with(Vec::new)
            .push("/sys/devices/virtual/tpm".to_owned());
    }
    if rootless {
        make_rootless(&mut spec);
    }
    spec
}

/// runc's rootless changes: a user namespace mapping the caller to root,
/// no network namespace or cgroup resources, and no `uid=`/`gid=` mount
/// options naming ids the mapping lacks. Unlike runc's, `/sys` stays a
/// sysfs: a bind of the host's could not reach the guest.
fn make_rootless(spec: &mut Spec) {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let rootless = Linux::rootless(uid, gid);
    if let Some(linux) = spec.linux_mut() {
        linux
            .set_namespaces(rootless.namespaces().clone())
            .set_uid_mappings(rootless.uid_mappings().clone())
            .set_gid_mappings(rootless.gid_mappings().clone())
            .set_resources(None);
    }
    for m in spec.mounts_mut().iter_mut().flatten() {
        if let Some(options) = m.options_mut() {
            options.retain(|o| !o.starts_with("uid=") && !o.starts_with("gid="));
        }
    }
}

/// Writes the default spec to `<bundle>/config.json`, never over one that
/// exists.
pub fn write_spec(bundle: &Path, rootless: bool) -> Result<(), RuntimeError> {
    let path = bundle.join(CONFIG_FILE);
    let mut json = serde_json::to_vec_pretty(&default_spec(rootless))
        .map_err(|e| RuntimeError::Bundle(format!("serializing the default spec: {e}")))?;
    json.push(b'\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            // runc's words, which scripts may look for.
            std::io::ErrorKind::AlreadyExists => {
                RuntimeError::Bundle(format!("File {CONFIG_FILE} exists. Remove it first"))
            }
            _ => RuntimeError::io(format!("creating {}", path.display()), e),
        })?;
    file.write_all(&json)
        .map_err(|e| RuntimeError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use oci_spec::runtime::LinuxNamespaceType;

    use super::*;
    use crate::runtime::bundle::Bundle;

    /// A bundle directory whose rootfs has the `sh` the default spec runs.
    fn bundle_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("rootfs/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sh"), b"#!").unwrap();
        std::fs::set_permissions(bin.join("sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn namespaces(spec: &Spec) -> Vec<LinuxNamespaceType> {
        let linux = spec.linux().as_ref().unwrap();
        linux.namespaces().iter().flatten().map(|n| n.typ()).collect()
    }

    #[test]
    fn the_written_spec_loads_as_a_bundle_with_runcs_defaults() {
        let dir = bundle_dir();
        write_spec(dir.path(), false).unwrap();
        let bundle = Bundle::load(dir.path()).unwrap();
        let spec = &bundle.spec;

        assert_eq!(spec.version(), VERSION);
        assert_eq!(spec.hostname().as_deref(), Some("skiff"));
        let root = spec.root().as_ref().unwrap();
        assert_eq!(
            (root.path().to_str(), root.readonly()),
            (Some("rootfs"), Some(true))
        );
        assert!(bundle.readonly_root());

        let process = bundle.process();
        assert_eq!(process.args().as_deref(), Some(&["sh".to_owned()][..]));
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(process.cwd().to_str(), Some("/"));
        let caps = process.capabilities().as_ref().unwrap();
        let expected: Capabilities = [
            Capability::AuditWrite,
            Capability::Kill,
            Capability::NetBindService,
        ]
        .into_iter()
        .collect();
        assert_eq!(caps.bounding().as_ref(), Some(&expected));
        assert_eq!(caps.effective().as_ref(), Some(&expected));
        assert_eq!(caps.permitted().as_ref(), Some(&expected));
        assert!(caps.inheritable().is_none() && caps.ambient().is_none());
        let rlimits = process.rlimits().as_ref().unwrap();
        assert_eq!(rlimits.len(), 1);
        assert_eq!((rlimits[0].soft(), rlimits[0].hard()), (1024, 1024));

        let destinations: Vec<_> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| (m.destination().to_str().unwrap(), m.typ().as_deref().unwrap()))
            .collect();
        assert_eq!(
            destinations,
            [
                ("/proc", "proc"),
                ("/dev", "tmpfs"),
                ("/dev/pts", "devpts"),
                ("/dev/shm", "tmpfs"),
                ("/dev/mqueue", "mqueue"),
                ("/sys", "sysfs"),
                ("/sys/fs/cgroup", "cgroup"),
            ]
        );
        for ns in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
        ] {
            assert!(namespaces(spec).contains(&ns), "{ns:?}");
        }
        let linux = spec.linux().as_ref().unwrap();
        let masked = linux.masked_paths().as_ref().unwrap();
        assert!(masked.iter().any(|p| p == "/proc/kcore"));
        assert!(masked.iter().any(|p| p == "/sys/devices/virtual/tpm"));
        let readonly = linux.readonly_paths().as_ref().unwrap();
        assert!(readonly.iter().any(|p| p == "/proc/sys"));
        assert!(linux.uid_mappings().is_none());
    }

    #[test]
    fn an_existing_config_is_not_overwritten() {
        let dir = bundle_dir();
        let config = dir.path().join(CONFIG_FILE);
        std::fs::write(&config, "{}").unwrap();
        let e = write_spec(dir.path(), false).unwrap_err().to_string();
        assert_eq!(e, "File config.json exists. Remove it first");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "{}");
    }

    #[test]
    fn a_missing_bundle_directory_is_named() {
        let e = write_spec(Path::new("/nonexistent/bundle"), false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("creating /nonexistent/bundle/config.json"), "{e}");
    }

    #[test]
    fn rootless_maps_the_caller_to_root() {
        let dir = bundle_dir();
        write_spec(dir.path(), true).unwrap();
        let spec = Bundle::load(dir.path()).unwrap().spec;
        let ns = namespaces(&spec);
        assert!(ns.contains(&LinuxNamespaceType::User));
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        let linux = spec.linux().as_ref().unwrap();
        let uid = linux.uid_mappings().as_ref().unwrap();
        assert_eq!(uid.len(), 1);
        assert_eq!(
            (uid[0].host_id(), uid[0].container_id(), uid[0].size()),
            (nix::unistd::geteuid().as_raw(), 0, 1)
        );
        let gid = linux.gid_mappings().as_ref().unwrap();
        assert_eq!(gid[0].host_id(), nix::unistd::getegid().as_raw());
        assert!(linux.resources().is_none());
        assert!(linux.masked_paths().is_some());
        for m in spec.mounts().iter().flatten() {
            let options = m.options().iter().flatten();
            assert!(options
                .clone()
                .all(|o| !o.starts_with("gid=") && !o.starts_with("uid=")));
            if m.destination() == Path::new("/sys") {
                assert_eq!(m.typ().as_deref(), Some("sysfs"));
            }
        }
    }
}
