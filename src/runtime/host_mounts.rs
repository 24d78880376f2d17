//! The OCI `mounts` of config.json, made to work in a guest that cannot see
//! the host's filesystem. Bind mounts name host paths as their sources:
//!
//! - a directory is shared by virtio-fs ([`FsConfig`]) and mounted at the
//!   destination by its tag: both sides see each other's changes live, and
//!   `ro` is enforced by the host as well as the guest;
//! - a small regular file is copied into the guest ([`StagedFile`]) and the
//!   bind names the copy: `/etc/hosts`, `/etc/resolv.conf`, secrets
//!   (virtio-fs shares directories, and sharing a file's directory would
//!   show the container its neighbours);
//! - a memory device such as `/dev/null` (engines bind it to mask paths)
//!   binds the guest's own device of the same kind;
//! - anything else (sockets, fifos, block devices) is refused.
//!
//! Mounts that are not binds name no host path and pass through unchanged.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::stat;
use oci_spec::runtime::Mount;
use skiff_protocol::{share_tag, staged_file_path, StagedFile, MAX_FRAME, SHARED_MOUNT_TYPE};

use super::error::RuntimeError;
use crate::vmm::{layout, FsConfig, MemorySize, ShareFlags};

/// The largest host file a bind may stage into the guest.
pub const MAX_STAGED_FILE: u64 = 1 << 20;
/// The most all of a container's staged files may hold: they travel in the
/// one `CreateContainer` frame, base64-encoded (4 bytes for every 3), and
/// must leave room there for the rest of the spec.
pub const MAX_STAGED_TOTAL: u64 = 8 << 20;
const _: () = assert!(MAX_STAGED_TOTAL / 3 * 4 < MAX_FRAME as u64 * 3 / 4);

/// The options a bind mount may have: those the agent applies (flags and
/// propagation) and runc's `defaults`. Anything else (`idmap`, a typo) is
/// refused rather than silently dropped.
pub const BIND_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "defaults",
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "sync",
    "async",
    "dirsync",
    "lazytime",
    "nolazytime",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
];
/// Options of a bind that describe the bind itself; a shared directory's
/// virtio-fs mount is not a bind.
const BIND_ONLY_OPTIONS: &[&str] = &["bind", "rbind", "defaults"];
/// Every VM has a vsock device and a root (shared or a disk); the rest of
/// the virtio slots can carry shared directories.
pub const MAX_SHARED_DIRS: usize = layout::MAX_VIRTIO_DEVICES - 2;

/// Character devices every guest has in its devtmpfs: (major, minor, path).
const GUEST_DEVICES: &[(u64, u64, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

/// The mounts to send the guest, the files their binds need there and the
/// directories the VM must share for them.
#[derive(Debug, Default, PartialEq)]
pub struct GuestMounts {
    pub mounts: Vec<Mount>,
    pub files: Vec<StagedFile>,
    pub shares: Vec<FsConfig>,
}

/// Translates config.json's `mounts` for the guest, keeping their order.
pub fn for_guest(mounts: &[Mount]) -> Result<GuestMounts, RuntimeError> {
    let mut guest = GuestMounts::default();
    for m in mounts {
        if !m.destination().is_absolute() {
            return Err(invalid(
                m.destination(),
                "the destination must be an absolute path",
            ));
        }
        let mount = if is_bind(m) {
            check_bind_options(m)?;
            bind_for_guest(m, &mut guest)?
        } else {
            m.clone()
        };
        guest.mounts.push(mount);
    }
    Ok(guest)
}

fn check_bind_options(m: &Mount) -> Result<(), RuntimeError> {
    match m
        .options()
        .iter()
        .flatten()
        .find(|o| !BIND_OPTIONS.contains(&o.as_str()))
    {
        Some(option) => Err(invalid(
            m.destination(),
            &format!("option {option:?} is not supported on a bind mount"),
        )),
        None => Ok(()),
    }
}

/// The guest's version of bind mount `m`, staging its source in `guest`'s
/// files if it is a file, sharing it if it is a directory.
fn bind_for_guest(m: &Mount, guest: &mut GuestMounts) -> Result<Mount, RuntimeError> {
    let files = &mut guest.files;
    let destination = m.destination();
    let source = m
        .source()
        .as_deref()
        .ok_or_else(|| invalid(destination, "a bind mount needs a source"))?;
    let fail = |what: &str| invalid(destination, &format!("source {} {what}", source.display()));
    if !source.is_absolute() {
        return Err(fail("is not an absolute path"));
    }
    let meta = fs::metadata(source).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => fail("does not exist"),
        _ => fail(&format!("cannot be read: {e}")),
    })?;
    let kind = meta.file_type();
    if kind.is_file() {
        let contents = read_capped(source).map_err(|e| fail(&e))?;
        let staged: u64 = files.iter().map(|f| f.contents.len() as u64).sum();
        if staged + contents.len() as u64 > MAX_STAGED_TOTAL {
            return Err(fail(&format!(
                "does not fit: the host files bound into a container may hold {} in all",
                MemorySize(MAX_STAGED_TOTAL)
            )));
        }
        let path = staged_file_path(files.len());
        files.push(StagedFile {
            path: path.clone(),
            contents,
            mode: meta.mode() & 0o7777,
        });
        Ok(with_source(m, PathBuf::from(path)))
    } else if kind.is_dir() {
        if guest.shares.len() == MAX_SHARED_DIRS {
            return Err(fail(&format!(
                "cannot be shared: a VM shares at most {MAX_SHARED_DIRS} host directories"
            )));
        }
        let tag = share_tag(guest.shares.len());
        // Shared as it resolves now: a symlink in the path is not followed
        // again later.
        let shared_dir = fs::canonicalize(source).map_err(|e| fail(&format!("cannot be resolved: {e}")))?;
        let options: Vec<&str> = m.options().iter().flatten().map(String::as_str).collect();
        let read_only = options.iter().rev().find(|o| matches!(**o, "ro" | "rw")) == Some(&"ro");
        guest.shares.push(FsConfig {
            tag: tag.clone(),
            shared_dir,
            flags: ShareFlags {
                read_only,
                recursive: options.contains(&"rbind"),
            },
        });
        Ok(shared_mount(m, tag))
    } else if kind.is_char_device() {
        let (major, minor) = (stat::major(meta.rdev()), stat::minor(meta.rdev()));
        let device = guest_device(major, minor).ok_or_else(|| {
            fail(&format!(
                "is character device {major}:{minor}, which the guest does not have"
            ))
        })?;
        Ok(with_source(m, PathBuf::from(device)))
    } else {
        let what = if kind.is_socket() {
            "a socket"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_block_device() {
            "a block device"
        } else {
            "of an unknown file type"
        };
        Err(fail(&format!(
            "is {what}; only files, directories and memory devices such as /dev/null \
             can be bound into a container's VM"
        )))
    }
}

fn invalid(destination: &Path, what: &str) -> RuntimeError {
    RuntimeError::Bundle(format!("mount {}: {what}", destination.display()))
}

/// As the agent reads mounts: a `bind` type or a `bind`/`rbind` option.
fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
}

/// The file's contents, if it is no larger than [`MAX_STAGED_FILE`]. Read
/// through a cap rather than trusting its size, which may have changed.
fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut contents = Vec::new();
    file.take(MAX_STAGED_FILE + 1)
        .read_to_end(&mut contents)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if contents.len() as u64 > MAX_STAGED_FILE {
        return Err(format!(
            "is larger than {}, the most a host file bound into a container may be",
            MemorySize(MAX_STAGED_FILE)
        ));
    }
    Ok(contents)
}

fn with_source(m: &Mount, source: PathBuf) -> Mount {
    let mut m = m.clone();
    m.set_source(Some(source));
    m
}

/// The virtio-fs mount of a shared directory, with the bind's options
/// that still apply.
fn shared_mount(m: &Mount, tag: String) -> Mount {
    let options: Vec<String> = m
        .options()
        .iter()
        .flatten()
        .filter(|o| !BIND_ONLY_OPTIONS.contains(&o.as_str()))
        .cloned()
        .collect();
    let mut m = m.clone();
    m.set_typ(Some(SHARED_MOUNT_TYPE.into()))
        .set_source(Some(tag.into()))
        .set_options(Some(options));
    m
}

fn guest_device(major: u64, minor: u64) -> Option<&'static str> {
    GUEST_DEVICES
        .iter()
        .find(|&&(a, b, _)| (a, b) == (major, minor))
        .map(|&(_, _, path)| path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mount(destination: &str, typ: Option<&str>, source: Option<&Path>, options: &[&str]) -> Mount {
        let mut m = Mount::default();
        m.set_destination(destination.into())
            .set_typ(typ.map(Into::into))
            .set_source(source.map(Into::into))
            .set_options(Some(options.iter().map(|o| o.to_string()).collect()));
        m
    }

    fn error(mounts: &[Mount]) -> String {
        for_guest(mounts).unwrap_err().to_string()
    }

    #[test]
    fn other_mounts_pass_through() {
        let defaults = oci_spec::runtime::get_default_mounts();
        assert_eq!(
            for_guest(&defaults).unwrap(),
            GuestMounts {
                mounts: defaults,
                ..Default::default()
            }
        );
    }

    #[test]
    fn small_files_are_staged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        fs::set_permissions(&hosts, fs::Permissions::from_mode(0o640)).unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, [0u8, 255, 7]).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o400)).unwrap();

        let proc = mount("/proc", Some("proc"), Some(Path::new("proc")), &[]);
        let mounts = [
            mount(
                "/etc/hosts",
                Some("bind"),
                Some(&hosts),
                &["rbind", "ro", "rprivate"],
            ),
            proc.clone(),
            mount("/run/secret", None, Some(&secret), &["bind", "nosuid"]),
        ];
        let guest = for_guest(&mounts).unwrap();
        assert_eq!(
            guest.files,
            [
                StagedFile {
                    path: staged_file_path(0),
                    contents: b"127.0.0.1 localhost\n".to_vec(),
                    mode: 0o640,
                },
                StagedFile {
                    path: staged_file_path(1),
                    contents: vec![0, 255, 7],
                    mode: 0o400,
                },
            ]
        );
        let staged = |i| Path::new(&staged_file_path(i)).to_owned();
        assert_eq!(
            guest.mounts,
            [
                mount(
                    "/etc/hosts",
                    Some("bind"),
                    Some(&staged(0)),
                    &["rbind", "ro", "rprivate"]
                ),
                proc,
                mount("/run/secret", None, Some(&staged(1)), &["bind", "nosuid"]),
            ]
        );
    }

    #[test]
    fn files_over_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(MAX_STAGED_FILE + 1).unwrap();
        let e = error(&[mount("/big", Some("bind"), Some(&big), &[])]);
        assert!(
            e.starts_with("mount /big: source ") && e.contains("larger than 1 MiB"),
            "{e}"
        );

        let full = dir.path().join("full");
        File::create(&full).unwrap().set_len(MAX_STAGED_FILE).unwrap();
        let n = (MAX_STAGED_TOTAL / MAX_STAGED_FILE) as usize;
        let many: Vec<_> = (0..=n)
            .map(|i| mount(&format!("/f{i}"), Some("bind"), Some(&full), &[]))
            .collect();
        for_guest(&many[..n]).unwrap();
        let e = error(&many);
        assert!(
            e.contains(&format!("mount /f{n}")) && e.contains("8 MiB in all"),
            "{e}"
        );
    }

    #[test]
    fn directories_are_shared_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let logs = dir.path().join("logs");
        fs::create_dir(&data).unwrap();
        fs::create_dir(&logs).unwrap();
        let options = ["rbind", "ro", "nosuid", "nodev", "noexec", "rslave", "relatime"];
        let guest = for_guest(&[
            mount("/data", Some("bind"), Some(&data), &options),
            mount("/proc", Some("proc"), Some(Path::new("proc")), &[]),
            mount("/logs", None, Some(&logs), &["bind", "ro", "rw", "defaults"]),
        ])
        .unwrap();
        assert!(guest.files.is_empty());
        assert_eq!(
            guest.shares,
            [
                FsConfig {
                    tag: share_tag(0),
                    shared_dir: data.clone(),
                    flags: ShareFlags {
                        read_only: true,
                        recursive: true
                    },
                },
                FsConfig {
                    tag: share_tag(1),
                    shared_dir: logs.clone(),
                    flags: ShareFlags {
                        read_only: false,
                        recursive: false
                    },
                },
            ]
        );
        let tag = |i| PathBuf::from(share_tag(i));
        assert_eq!(
            guest.mounts,
            [
                mount(
                    "/data",
                    Some(SHARED_MOUNT_TYPE),
                    Some(&tag(0)),
                    &["ro", "nosuid", "nodev", "noexec", "rslave", "relatime"]
                ),
                mount("/proc", Some("proc"), Some(Path::new("proc")), &[]),
                mount("/logs", Some(SHARED_MOUNT_TYPE), Some(&tag(1)), &["ro", "rw"]),
            ]
        );
    }

    #[test]
    fn too_many_shared_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let many: Vec<_> = (0..=MAX_SHARED_DIRS)
            .map(|i| mount(&format!("/d{i}"), Some("bind"), Some(dir.path()), &[]))
            .collect();
        for_guest(&many[..MAX_SHARED_DIRS]).unwrap();
        let e = error(&many);
        assert!(
            e.starts_with(&format!("mount /d{MAX_SHARED_DIRS}: source ")),
            "{e}"
        );
        assert!(
            e.contains(&format!("at most {MAX_SHARED_DIRS} host directories")),
            "{e}"
        );
    }

    #[test]
    fn unsupported_bind_options_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for option in ["idmap", "frobnicate", "size=1m", "mode=0755"] {
            let e = error(&[mount("/data", Some("bind"), Some(dir.path()), &["rbind", option])]);
            assert_eq!(
                e,
                format!("mount /data: option {option:?} is not supported on a bind mount")
            );
        }
        // Data options of other filesystems are theirs to judge.
        for_guest(&[mount(
            "/tmp",
            Some("tmpfs"),
            Some(Path::new("tmpfs")),
            &["size=1m"],
        )])
        .unwrap();
    }

    /// [`BIND_OPTIONS`] must be options the agent knows: it applies them.
    #[test]
    fn bind_options_are_the_agents() {
        let agent = include_str!("../../guest/agent/src/mounts.rs");
        for option in BIND_OPTIONS {
            assert!(
                agent.contains(&format!("(\"{option}\",")) || agent.contains(&format!("\"{option}\"")),
                "the agent does not know {option}"
            );
        }
    }

    #[test]
    fn memory_devices_bind_the_guests_own() {
        let guest = for_guest(&[
            mount(
                "/proc/kcore",
                Some("bind"),
                Some(Path::new("/dev/null")),
                &["bind", "ro"],
            ),
            mount("/dev/random", None, Some(Path::new("/dev/urandom")), &["rbind"]),
        ])
        .unwrap();
        assert!(guest.files.is_empty());
        assert_eq!(
            guest.mounts,
            [
                mount(
                    "/proc/kcore",
                    Some("bind"),
                    Some(Path::new("/dev/null")),
                    &["bind", "ro"]
                ),
                mount("/dev/random", None, Some(Path::new("/dev/urandom")), &["rbind"]),
            ]
        );
    }

    #[test]
    fn other_kinds_of_source_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        for (source, what) in [(&fifo, "is a FIFO"), (&socket, "is a socket")] {
            let e = error(&[mount("/x", Some("bind"), Some(source), &[])]);
            assert_eq!(
                e,
                format!(
                    "mount /x: source {} {what}; only files, directories and memory devices \
                     such as /dev/null can be bound into a container's VM",
                    source.display()
                )
            );
        }
        if Path::new("/dev/tty").exists() {
            let e = error(&[mount("/x", Some("bind"), Some(Path::new("/dev/tty")), &[])]);
            assert!(e.contains("character device 5:0"), "{e}");
        }
    }

    #[test]
    fn bad_sources_and_destinations_are_named() {
        let e = error(&[mount(
            "/etc/hosts",
            Some("bind"),
            Some(Path::new("/x/nonexistent")),
            &[],
        )]);
        assert_eq!(e, "mount /etc/hosts: source /x/nonexistent does not exist");
        let e = error(&[mount("/etc/hosts", None, Some(Path::new("hosts")), &["rbind"])]);
        assert_eq!(e, "mount /etc/hosts: source hosts is not an absolute path");
        let e = error(&[mount("/etc/hosts", Some("bind"), None, &[])]);
        assert_eq!(e, "mount /etc/hosts: a bind mount needs a source");
        let e = error(&[mount(
            "etc/hosts",
            Some("bind"),
            Some(Path::new("/dev/null")),
            &[],
        )]);
        assert_eq!(e, "mount etc/hosts: the destination must be an absolute path");
        let e = error(&[mount("proc", Some("proc"), Some(Path::new("proc")), &[])]);
        assert_eq!(e, "mount proc: the destination must be an absolute path");
    }
}
