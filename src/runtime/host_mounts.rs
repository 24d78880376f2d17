//! The OCI `mounts` of config.json, made to work in a guest that cannot see
//! the host's filesystem. Bind mounts name host paths as their sources;
//! until a shared filesystem exists:
//!
//! - a small regular file is copied into the guest ([`StagedFile`]) and the
//!   bind names the copy: `/etc/hosts`, `/etc/resolv.conf`, secrets;
//! - a directory becomes an empty tmpfs: the container runs, but does not
//!   see the host's files, and its writes stay in the VM (with a warning);
//! - a memory device such as `/dev/null` (engines bind it to mask paths)
//!   binds the guest's own device of the same kind;
//! - anything else (sockets, fifos, block devices) is refused.
//!
//! Mounts that are not binds name no host path and pass through unchanged.

use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::stat;
use oci_spec::runtime::Mount;
use skiff_protocol::{staged_file_path, StagedFile, MAX_FRAME};

use super::error::RuntimeError;
use crate::vmm::MemorySize;

/// The largest host file a bind may stage into the guest.
pub const MAX_STAGED_FILE: u64 = 1 << 20;
/// The most all of a container's staged files may hold: they travel in the
/// one `CreateContainer` frame, base64-encoded (4 bytes for every 3), and
/// must leave room there for the rest of the spec.
pub const MAX_STAGED_TOTAL: u64 = 8 << 20;
const _: () = assert!(MAX_STAGED_TOTAL / 3 * 4 < MAX_FRAME as u64 * 3 / 4);

/// Options of a bind that still make sense on the tmpfs that replaces a
/// host directory; `bind`, propagation and the rest are dropped.
const TMPFS_KEPT_OPTIONS: &[&str] = &["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec"];

/// Character devices every guest has in its devtmpfs: (major, minor, path).
const GUEST_DEVICES: &[(u64, u64, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

/// The mounts to send the guest, and the files their binds need there.
#[derive(Debug, Default, PartialEq)]
pub struct GuestMounts {
    pub mounts: Vec<Mount>,
    pub files: Vec<StagedFile>,
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
            bind_for_guest(m, &mut guest.files)?
        } else {
            m.clone()
        };
        guest.mounts.push(mount);
    }
    Ok(guest)
}

/// The guest's version of bind mount `m`, staging its source in `files`
/// if it is a file.
fn bind_for_guest(m: &Mount, files: &mut Vec<StagedFile>) -> Result<Mount, RuntimeError> {
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
        tracing::warn!(
            "mount {}: host directory {} is not shared with the guest; the container \
             sees an empty directory there, and what it writes stays in the VM",
            destination.display(),
            source.display()
        );
        Ok(empty_tmpfs(m, &meta))
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

/// A tmpfs in place of a bound host directory, with the directory's owner
/// and permissions so the container may write where it could have.
fn empty_tmpfs(m: &Mount, dir: &Metadata) -> Mount {
    let mut options: Vec<String> = m
        .options()
        .iter()
        .flatten()
        .filter(|o| TMPFS_KEPT_OPTIONS.contains(&o.as_str()))
        .cloned()
        .collect();
    options.push(format!("mode={:o}", dir.mode() & 0o7777));
    options.push(format!("uid={}", dir.uid()));
    options.push(format!("gid={}", dir.gid()));
    let mut m = m.clone();
    m.set_typ(Some("tmpfs".into()))
        .set_source(Some("tmpfs".into()))
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
                files: Vec::new()
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
    fn directories_become_empty_tmpfs() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o750)).unwrap();
        let meta = fs::metadata(&data).unwrap();
        let options = ["rbind", "ro", "nosuid", "nodev", "noexec", "rslave", "relatime"];
        let guest = for_guest(&[mount("/data", Some("bind"), Some(&data), &options)]).unwrap();
        assert!(guest.files.is_empty());
        let expected_options = [
            "ro".to_owned(),
            "nosuid".into(),
            "nodev".into(),
            "noexec".into(),
            "mode=750".into(),
            format!("uid={}", meta.uid()),
            format!("gid={}", meta.gid()),
        ];
        let expected = {
            let mut m = mount("/data", Some("tmpfs"), Some(Path::new("tmpfs")), &[]);
            m.set_options(Some(expected_options.to_vec()));
            m
        };
        assert_eq!(guest.mounts, [expected]);
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
