//! Finding the executable of a process before creating it, so a missing or
//! unusable one is a `Failed` with a shell's exit code instead of a child
//! that dies after `Start`.

use std::path::{Path, PathBuf};

use skiff_protocol::exec_lookup::{find_executable, Candidate};
pub use skiff_protocol::exec_lookup::{path_from_env, LookupError, DEFAULT_PATH};

/// Resolves `name` as [`find_executable`] does, in the container whose `/`
/// is at `root` in the agent's view (`/` after the switch of root); the
/// result is a path in the agent's view.
pub fn resolve(root: &Path, name: &str, cwd: &Path, path: &str) -> Result<PathBuf, LookupError> {
    find_executable(name, cwd, path, |p| Candidate::at(&in_root(root, p))).map(|p| in_root(root, &p))
}

/// `path` (absolute in the container) as seen from the agent.
pub fn in_root(root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix("/") {
        Ok(rel) => root.join(rel),
        Err(_) => root.join(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("skiff-resolve-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::write(dir.join("bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(dir.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("data/plain"), "x").unwrap();
        fs::set_permissions(dir.join("data/plain"), fs::Permissions::from_mode(0o644)).unwrap();
        Dir(dir)
    }

    #[test]
    fn path_comes_from_the_environment_or_the_default() {
        let env = vec!["A=1".to_string(), "PATH=/x:/y".to_string()];
        assert_eq!(path_from_env(&env), "/x:/y");
        assert_eq!(path_from_env(&[]), DEFAULT_PATH);
    }

    #[test]
    fn names_are_looked_up_in_path_inside_the_root() {
        let d = scratch("lookup");
        let found = resolve(&d.0, "tool", Path::new("/"), "/nowhere:/bin").unwrap();
        assert_eq!(found, d.0.join("bin/tool"));
        let err = resolve(&d.0, "missing", Path::new("/"), "/bin").unwrap_err();
        assert_eq!(err.exit_code, 127);
        assert_eq!(err.message, "executable file `missing` not found in $PATH");
        let err = resolve(&d.0, "plain", Path::new("/"), "/data").unwrap_err();
        assert_eq!(err.exit_code, 126);
        // A directory of that name in an earlier entry is skipped, like a shell does.
        assert!(resolve(&d.0, "bin", Path::new("/"), "/").is_err());
    }

    #[test]
    fn paths_are_checked_and_relative_ones_start_at_cwd() {
        let d = scratch("paths");
        assert_eq!(
            resolve(&d.0, "/bin/tool", Path::new("/"), "").unwrap(),
            d.0.join("bin/tool")
        );
        assert_eq!(
            resolve(&d.0, "./tool", Path::new("/bin"), "").unwrap(),
            d.0.join("bin/./tool")
        );
        let err = resolve(&d.0, "/bin/nope", Path::new("/"), "").unwrap_err();
        assert_eq!(
            (err.exit_code, err.message.as_str()),
            (127, "/bin/nope: no such file or directory")
        );
        let err = resolve(&d.0, "/data/plain", Path::new("/"), "").unwrap_err();
        assert_eq!(
            (err.exit_code, err.message.as_str()),
            (126, "/data/plain: permission denied")
        );
        assert_eq!(
            resolve(&d.0, "/bin", Path::new("/"), "").unwrap_err().exit_code,
            126
        );
    }
}
