//! An OCI bundle on the host: its config.json read and checked, its rootfs
//! located, and what can be known about the process before a VM is booted
//! for it.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Process, Spec};
use skiff_protocol::{ContainerSpec, RootFs, RootSource, StagedFile};

use super::error::RuntimeError;
use super::resolve::{find_executable, lookup_passwd, resolve_in_root};

/// A bundle whose config.json parsed and whose rootfs and process make sense.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Reads `<dir>/config.json` and checks it against `<dir>`'s rootfs.
    pub fn load(dir: &Path) -> Result<Bundle, RuntimeError> {
        let meta = std::fs::metadata(dir)
            .map_err(|e| RuntimeError::Bundle(format!("bundle {}: {e}", dir.display())))?;
        if !meta.is_dir() {
            return Err(RuntimeError::Bundle(format!(
                "bundle {} is not a directory",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        let file = File::open(&config).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RuntimeError::Bundle(format!("bundle {} has no config.json", dir.display()))
            }
            _ => RuntimeError::Bundle(format!("{}: {e}", config.display())),
        })?;
        let spec = parse_spec(BufReader::new(file))
            .map_err(|e| RuntimeError::Bundle(format!("{}: {e}", config.display())))?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| invalid(&config, "root", "is missing"))?;
        let rootfs = dir.join(root.path());
        let meta = std::fs::metadata(&rootfs)
            .map_err(|e| invalid(&config, "root.path", &format!("{}: {e}", rootfs.display())))?;
        if !meta.is_dir() {
            return Err(invalid(
                &config,
                "root.path",
                &format!("{} is not a directory", rootfs.display()),
            ));
        }
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid(&config, "process", "is missing"))?;
        check_process(&config, &rootfs, process)?;
        Ok(Bundle {
            dir: dir.to_owned(),
            spec,
            rootfs,
        })
    }

    pub fn process(&self) -> &Process {
        self.spec.process().as_ref().expect("checked in load")
    }

    /// What the agent needs to make this bundle's container from its root
    /// and the mounts as the guest can have them.
    pub fn container_spec(
        &self,
        root: RootSource,
        mounts: Vec<Mount>,
        files: Vec<StagedFile>,
    ) -> ContainerSpec {
        ContainerSpec {
            root: RootFs {
                source: root,
                readonly: self.readonly_root(),
            },
            hostname: self.spec.hostname().clone(),
            mounts,
            files,
            process: self.process().clone(),
        }
    }

    pub fn readonly_root(&self) -> bool {
        self.spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false)
    }
}

/// Parses config.json, naming the field that is wrong when it does not fit
/// the OCI schema.
pub fn parse_spec(reader: impl std::io::Read) -> Result<Spec, String> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path.is_empty() || path == "." {
            format!("invalid JSON: {inner}")
        } else {
            format!("invalid field `{path}`: {inner}")
        }
    })
}

fn invalid(config: &Path, field: &str, what: &str) -> RuntimeError {
    RuntimeError::Bundle(format!("{}: `{field}` {what}", config.display()))
}

/// What the agent would find out only after a boot, found out now: the
/// executable and the user must exist in the rootfs.
fn check_process(config: &Path, rootfs: &Path, process: &Process) -> Result<(), RuntimeError> {
    let args = process.args().as_deref().unwrap_or_default();
    let Some(program) = args.first().filter(|a| !a.is_empty()) else {
        return Err(invalid(config, "process.args", "is empty"));
    };
    if !process.cwd().is_absolute() {
        return Err(invalid(
            config,
            "process.cwd",
            &format!("{} is not an absolute path", process.cwd().display()),
        ));
    }
    let env = process.env().as_deref().unwrap_or_default();
    if let Err(e) = find_executable(rootfs, program, env, process.cwd()) {
        return Err(RuntimeError::Exec {
            message: e.message,
            code: e.exit_code,
        });
    }
    // Images without /etc/passwd (scratch, static binaries) run any uid, as
    // under runc; in one that has it, a uid it does not list is a mistake.
    let uid = process.user().uid();
    let has_passwd = resolve_in_root(rootfs, Path::new("/etc/passwd")).is_ok_and(|p| p.is_file());
    if uid != 0 && has_passwd && lookup_passwd(rootfs, uid).is_none() {
        return Err(invalid(
            config,
            "process.user.uid",
            &format!("{uid} does not exist in the container's /etc/passwd"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_field_is_named() {
        let e = parse_spec(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":"x","gid":0}}}"#.as_bytes(),
        )
        .unwrap_err();
        assert!(e.contains("process.user.uid"), "{e}");
        let e = parse_spec("{not json".as_bytes()).unwrap_err();
        assert!(e.starts_with("invalid JSON"), "{e}");
    }
}
