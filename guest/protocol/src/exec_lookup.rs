//! How the executable of a container's process is found. The host checks it
//! before it boots a VM and the agent before it forks, and both must come to
//! the same answer, so the algorithm is here once; each side says how to
//! look at a path in its own view of the rootfs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The search path when the process's environment has none (runc's and
/// `execvp`'s default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The value of `PATH` in an environment list of `NAME=value` strings; the
/// last one wins, as when runc applies the list in order.
pub fn path_from_env(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// What is at a candidate path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    Missing,
    Directory,
    NotExecutable,
    Executable,
}

impl Candidate {
    /// What is at `path` (a path in the caller's own view), following symlinks.
    pub fn at(path: &Path) -> Candidate {
        match std::fs::metadata(path) {
            Err(_) => Candidate::Missing,
            Ok(m) if m.is_dir() => Candidate::Directory,
            // One x bit is enough here; whether the container's user may
            // run it is for execve to say.
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Candidate::Executable,
            Ok(_) => Candidate::NotExecutable,
        }
    }
}

/// Why an executable cannot be used, with the status a shell would give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError {
    pub message: String,
    pub exit_code: i32,
}

impl LookupError {
    fn new(exit_code: i32, message: String) -> Self {
        LookupError { message, exit_code }
    }
}

/// Finds `name` like a shell does: a name with a `/` is a path (relative ones
/// against `cwd`); any other is looked up in `path`, where an empty entry is
/// the working directory. `check` says what is at a container path. Returns
/// the container path to execute.
pub fn find_executable(
    name: &str,
    cwd: &Path,
    path: &str,
    check: impl Fn(&Path) -> Candidate,
) -> Result<PathBuf, LookupError> {
    if name.is_empty() {
        return Err(LookupError::new(
            127,
            "executable file `` not found in $PATH".into(),
        ));
    }
    if name.contains('/') {
        let full = cwd.join(name);
        return match check(&full) {
            Candidate::Executable => Ok(full),
            Candidate::Missing => Err(LookupError::new(
                127,
                format!("{name}: no such file or directory"),
            )),
            Candidate::Directory => Err(LookupError::new(126, format!("{name}: is a directory"))),
            Candidate::NotExecutable => Err(LookupError::new(126, format!("{name}: permission denied"))),
        };
    }
    let mut unusable = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let full = cwd.join(dir).join(name);
        match check(&full) {
            Candidate::Executable => return Ok(full),
            Candidate::NotExecutable if unusable.is_none() => unusable = Some(full),
            _ => {}
        }
    }
    match unusable {
        Some(found) => Err(LookupError::new(
            126,
            format!("{}: permission denied", found.display()),
        )),
        None => Err(LookupError::new(
            127,
            format!("executable file `{name}` not found in $PATH"),
        )),
    }
}
