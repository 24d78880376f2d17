//! Finding the executable of a process before forking it, so a missing or
//! unusable one is a `Failed` with a shell's exit code instead of a child
//! that dies after `Start`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why an executable cannot be used, with the status a shell would give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveError {
    pub message: String,
    pub exit_code: i32,
}

impl ResolveError {
    fn new(exit_code: i32, message: String) -> Self {
        ResolveError { message, exit_code }
    }
}

/// The value of `PATH` in an environment list of `NAME=value` strings.
pub fn path_from_env(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Resolves `name` like a shell does: a name with a `/` is a path (relative
/// ones against `cwd`); any other is looked up in `path`. `root` is where
/// the container's `/` is in the agent's view (`/` after the switch of
/// root); the result is a path in the agent's view.
pub fn resolve(root: &Path, name: &str, cwd: &Path, path: &str) -> Result<PathBuf, ResolveError> {
    if name.is_empty() {
        return Err(ResolveError::new(
            127,
            "executable file `` not found in $PATH".into(),
        ));
    }
    if name.contains('/') {
        let full = in_root(root, &cwd.join(name));
        return match check(&full) {
            Candidate::Executable => Ok(full),
            Candidate::Missing => Err(ResolveError::new(
                127,
                format!("{name}: no such file or directory"),
            )),
            Candidate::Directory => Err(ResolveError::new(126, format!("{name}: is a directory"))),
            Candidate::NotExecutable => Err(ResolveError::new(126, format!("{name}: permission denied"))),
        };
    }
    let mut unusable = None;
    for dir in path.split(':') {
        // An empty entry means the working directory, as in POSIX shells.
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let full = in_root(root, &cwd.join(dir).join(name));
        match check(&full) {
            Candidate::Executable => return Ok(full),
            Candidate::NotExecutable if unusable.is_none() => unusable = Some(dir.join(name)),
            _ => {}
        }
    }
    match unusable {
        Some(found) => Err(ResolveError::new(
            126,
            format!("{}: permission denied", found.display()),
        )),
        None => Err(ResolveError::new(
            127,
            format!("executable file `{name}` not found in $PATH"),
        )),
    }
}

/// `path` (absolute in the container) as seen from the agent.
pub fn in_root(root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix("/") {
        Ok(rel) => root.join(rel),
        Err(_) => root.join(path),
    }
}

enum Candidate {
    Missing,
    Directory,
    NotExecutable,
    Executable,
}

fn check(path: &Path) -> Candidate {
    match std::fs::metadata(path) {
        Err(_) => Candidate::Missing,
        Ok(m) if m.is_dir() => Candidate::Directory,
        // Root, which the agent is, may run anything with one x bit set;
        // the container's user is checked by execve itself.
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Candidate::Executable,
        Ok(_) => Candidate::NotExecutable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
