//! Looking things up inside a container's rootfs from the host, the way the
//! container will see them: symlinks are followed relative to the rootfs and
//! never lead out of it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use skiff_protocol::exec_lookup::{self, Candidate, LookupError};
use skiff_protocol::passwd::{self, PasswdEntry};

/// Linux's limit on symlinks followed in one lookup.
const MAX_SYMLINKS: usize = 40;

/// The host path of the container path `path` (absolute, or relative to
/// `/`), with every symlink resolved inside `root`.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut pending: VecDeque<OsString> = components(path);
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        let meta = std::fs::symlink_metadata(&candidate)?;
        if !meta.file_type().is_symlink() {
            resolved.push(part);
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINKS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let target = std::fs::read_link(&candidate)?;
        if target.is_absolute() {
            resolved.clear();
        }
        for c in components(&target).into_iter().rev() {
            pending.push_front(c);
        }
    }
    Ok(resolved.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Finds `program` as the agent will in the VM (one algorithm for both,
/// [`exec_lookup::find_executable`]), looking at the rootfs from the host
/// with its symlinks confined to it. Returns the container path.
pub fn find_executable(
    root: &Path,
    program: &str,
    env: &[String],
    cwd: &Path,
) -> Result<PathBuf, LookupError> {
    let path = exec_lookup::path_from_env(env);
    exec_lookup::find_executable(program, cwd, path, |p| {
        resolve_in_root(root, p).map_or(Candidate::Missing, |host| Candidate::at(&host))
    })
}

/// The container's /etc/passwd entry for `uid`, if it has one.
pub fn lookup_passwd(root: &Path, uid: u32) -> Option<PasswdEntry> {
    let path = resolve_in_root(root, Path::new("/etc/passwd")).ok()?;
    passwd::entry_for(&std::fs::read_to_string(path).ok()?, uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("bin/busybox"), b"#!").unwrap();
        std::fs::set_permissions(
            d.path().join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        symlink("/bin/busybox", d.path().join("bin/sh")).unwrap();
        symlink("busybox", d.path().join("bin/cat")).unwrap();
        std::fs::write(d.path().join("bin/data"), b"x").unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let r = rootfs();
        assert_eq!(
            resolve_in_root(r.path(), Path::new("/bin/sh")).unwrap(),
            r.path().join("bin/busybox")
        );
        symlink("../../../../etc/shadow", r.path().join("bin/escape")).unwrap();
        let escaped = resolve_in_root(r.path(), Path::new("/bin/escape"));
        // Clamped at the root: it names <root>/etc/shadow, which does not exist.
        assert_eq!(escaped.unwrap_err().kind(), io::ErrorKind::NotFound);
        symlink("loop", r.path().join("bin/loop")).unwrap();
        assert_eq!(
            resolve_in_root(r.path(), Path::new("/bin/loop"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ELOOP)
        );
    }

    #[test]
    fn executables_are_found_like_execvp() {
        let r = rootfs();
        let env = vec!["PATH=/usr/bin:/bin".to_owned()];
        let find = |name, cwd| find_executable(r.path(), name, &env, Path::new(cwd));
        assert_eq!(find("cat", "/"), Ok("/bin/cat".into()));
        assert_eq!(find("/bin/sh", "/"), Ok("/bin/sh".into()));
        let missing = find("nope", "/").unwrap_err();
        assert_eq!(missing.exit_code, 127);
        assert!(missing.message.contains("`nope`"), "{}", missing.message);
        assert_eq!(find("/bin/data", "/").unwrap_err().exit_code, 126);
        assert!(find("./busybox", "/bin").is_ok());
    }

    #[test]
    fn passwd_entries_are_found_by_uid() {
        let r = rootfs();
        assert_eq!(lookup_passwd(r.path(), 1000).unwrap().home, "/home/user");
        assert!(lookup_passwd(r.path(), 4242).is_none());
    }
}
