//! Creating a container process: everything that can be checked or
//! allocated is done in the agent; the process is then created sharing the
//! agent's memory (see `launch`) and waits on a pipe for the host's `Start`
//! before it `execve`s.

mod child;
mod creds;
mod launch;
mod report;

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use nix::unistd::pipe2;
use oci_spec::runtime::{PosixRlimitType, Process};
use skiff_protocol::ExitStatus;

use child::{ChildFds, ChildStdio};
use creds::CapMasks;
pub use creds::CapPlan;
pub use report::Stage;
use report::RECORD_LEN;

use crate::passwd;
use crate::reaper::reaper;
use crate::resolve::{self, in_root};

/// Why a process could not be created, with a shell's status for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    pub message: String,
    pub exit_code: i32,
}

impl SpawnError {
    fn new(message: impl Into<String>) -> Self {
        SpawnError {
            message: message.into(),
            exit_code: 1,
        }
    }
}

/// A process waiting for `Start`, with the agent's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// Its exit status, from the reaper.
    pub exit: Receiver<ExitStatus>,
    /// A byte written here releases the process; dropping it unwritten
    /// makes it exit.
    pub start: File,
    /// The process's failure report, if it failed before `execve`.
    pub failure: Failure,
    pub stdio: Stdio,
}

#[derive(Debug)]
pub enum Stdio {
    Pipes { stdin: File, stdout: File, stderr: File },
    Terminal { master: File },
}

/// Everything the process needs, built in the agent. Shared with the
/// process until it executes (it reads this memory, not a copy), so it is
/// never changed after it is built.
pub struct Prepared(Arc<Plan>);

struct Plan {
    exe: CString,
    // The pointer arrays point into these.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: CString,
    rlimits: Vec<(creds::Resource, libc::rlimit, PosixRlimitType)>,
    umask: libc::mode_t,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    caps: Option<CapMasks>,
    no_new_privileges: bool,
    terminal: Option<Winsize>,
    /// For messages about failures.
    exe_path: PathBuf,
}

// SAFETY: the raw pointers point into the CStrings owned alongside them,
// whose heap buffers never move and are never written after the plan is
// built; every thread (and the process itself) only reads them.
unsafe impl Send for Plan {}
// SAFETY: as above.
unsafe impl Sync for Plan {}

fn cstring(what: &str, bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::new(format!("{what} contains a NUL byte")))
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

impl Prepared {
    /// `root` is the container's `/` in the agent's view.
    pub fn new(root: &Path, process: &Process) -> Result<Prepared, SpawnError> {
        let args = process.args().as_deref().unwrap_or(&[]);
        let Some(name) = args.first() else {
            return Err(SpawnError::new(
                "process.args must name the executable, but it is empty",
            ));
        };
        let cwd = if process.cwd().is_absolute() {
            process.cwd().clone()
        } else {
            Path::new("/").join(process.cwd())
        };
        let mut env: Vec<String> = process.env().clone().unwrap_or_default();
        let path = resolve::path_from_env(&env).to_string();
        let exe_path = resolve::resolve(root, name, &cwd, &path).map_err(|e| SpawnError {
            message: e.message,
            exit_code: e.exit_code,
        })?;
        let user = process.user();
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            let home = passwd::home_of(&in_root(root, Path::new("/etc/passwd")), user.uid());
            env.push(format!("HOME={}", home.as_deref().unwrap_or("/")));
        }
        let argv = args
            .iter()
            .map(|a| cstring("an argument", a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = env
            .iter()
            .map(|e| cstring("an environment variable", e.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let terminal = process.terminal().unwrap_or(false).then(|| {
            let size = process.console_size().unwrap_or_default();
            Winsize {
                ws_row: u16::try_from(size.height()).unwrap_or(u16::MAX),
                ws_col: u16::try_from(size.width()).unwrap_or(u16::MAX),
                ws_xpixel: 0,
                ws_ypixel: 0,
            }
        });
        Ok(Prepared(Arc::new(Plan {
            exe: cstring("the executable's path", exe_path.as_os_str().as_bytes())?,
            argv_ptrs: pointers(&argv),
            _argv: argv,
            envp_ptrs: pointers(&envp),
            _envp: envp,
            cwd: cstring("process.cwd", in_root(root, &cwd).as_os_str().as_bytes())?,
            rlimits: creds::rlimits(process),
            umask: user.umask().unwrap_or(0o022) as libc::mode_t,
            groups: user.additional_gids().clone().unwrap_or_default(),
            uid: user.uid(),
            gid: user.gid(),
            caps: process
                .capabilities()
                .as_ref()
                .map(|spec| CapPlan::from_spec(spec).masks()),
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            terminal,
            exe_path,
        })))
    }

    /// The message for a failure the process reported.
    pub fn describe_failure(&self, stage: Stage, errno: i32) -> String {
        let p = &self.0;
        let err = Errno::from_raw(errno).desc();
        let what = match stage {
            Stage::Stdio => "setting up stdio".to_string(),
            Stage::Terminal => "making the terminal the controlling terminal".to_string(),
            Stage::Chdir => format!("chdir to `{}`", String::from_utf8_lossy(p.cwd.as_bytes())),
            Stage::Rlimit(i) => match p.rlimits.get(usize::from(i)) {
                Some((_, limit, typ)) => format!("setting {typ} to {}/{}", limit.rlim_cur, limit.rlim_max),
                None => "setting an rlimit".to_string(),
            },
            Stage::Groups => format!("setting additional gids {:?}", p.groups),
            Stage::Gid => format!("setting gid {}", p.gid),
            Stage::Uid => format!("setting uid {}", p.uid),
            Stage::Bounding => "dropping from the capability bounding set".to_string(),
            Stage::Capabilities => "setting capabilities".to_string(),
            Stage::Ambient => "raising ambient capabilities".to_string(),
            Stage::NoNewPrivileges => "setting no_new_privs".to_string(),
            Stage::Exec => format!("exec `{}`", p.exe_path.display()),
        };
        format!("{what}: {err}")
    }
}

/// How the process's failure record reaches the agent.
#[derive(Debug)]
pub struct Failure(File);

impl Failure {
    /// Reads the record once the process is gone (its write end closed by
    /// `execve` or exit): `None` when it got as far as `execve`.
    pub fn take(&mut self) -> Option<(Stage, i32)> {
        let mut record = [0u8; RECORD_LEN];
        self.0.read_exact(&mut record).ok()?;
        Stage::decode(record)
    }
}

fn cloexec_pipe() -> Result<(File, File), SpawnError> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| SpawnError::new(format!("creating a pipe: {e}")))?;
    Ok((File::from(r), File::from(w)))
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), SpawnError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(|e| SpawnError::new(format!("fcntl: {e}")))
}

/// Creates the process described by `p`, stopped before `execve` until a
/// byte is written to [`Spawned::start`].
pub fn spawn(p: &Prepared) -> Result<Spawned, SpawnError> {
    let (start_r, start_w) = cloexec_pipe()?;
    let (report_r, report_w) = cloexec_pipe()?;
    let (ready_r, ready_w) = cloexec_pipe()?;
    // The agent's ends go to `Stdio`, the process's are closed once it has
    // its copies.
    let (stdio, child_ends): (Stdio, Vec<File>) = match &p.0.terminal {
        Some(size) => {
            let pty =
                openpty(Some(size), None).map_err(|e| SpawnError::new(format!("opening a pty: {e}")))?;
            set_cloexec(&pty.master)?;
            set_cloexec(&pty.slave)?;
            let master = File::from(pty.master);
            (Stdio::Terminal { master }, vec![File::from(pty.slave)])
        }
        None => {
            let (stdin_r, stdin_w) = cloexec_pipe()?;
            let (stdout_r, stdout_w) = cloexec_pipe()?;
            let (stderr_r, stderr_w) = cloexec_pipe()?;
            let stdio = Stdio::Pipes {
                stdin: stdin_w,
                stdout: stdout_r,
                stderr: stderr_r,
            };
            (stdio, vec![stdin_r, stdout_w, stderr_w])
        }
    };
    let child_stdio = match child_ends.as_slice() {
        [slave] => ChildStdio::Terminal {
            slave: slave.as_raw_fd(),
        },
        [stdin, stdout, stderr] => ChildStdio::Pipes {
            stdin: stdin.as_raw_fd(),
            stdout: stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
        },
        _ => return Err(SpawnError::new("internal error: unexpected stdio ends")),
    };
    let fds = ChildFds {
        stdio: child_stdio,
        start: start_r.as_raw_fd(),
        report: report_w.as_raw_fd(),
        ready: ready_w.as_raw_fd(),
    };
    // The process replaces 0-2 with its stdio; an fd of ours among them
    // would be overwritten before it is used.
    if child_ends
        .iter()
        .chain([&start_r, &report_w, &ready_w])
        .any(|f| f.as_raw_fd() <= 2)
    {
        return Err(SpawnError::new(
            "internal error: fds 0-2 are not open in the agent",
        ));
    }

    let registration = reaper().map_err(SpawnError::new)?;
    let registration = registration.lock();
    let pid = launch::launch(Arc::clone(&p.0), fds).map_err(SpawnError::new)?;
    let exit = registration.watch(pid);
    // The process has its own table of descriptors by now.
    drop(child_ends);
    drop(start_r);
    drop(report_w);
    drop(ready_w);
    let mut failure = Failure(report_r);
    if let Err(message) = await_ready(ready_r, pid) {
        let message = failure
            .take()
            .map(|(stage, errno)| p.describe_failure(stage, errno))
            .unwrap_or(message);
        return Err(SpawnError::new(message));
    }
    Ok(Spawned {
        pid,
        exit,
        start: start_w,
        failure,
        stdio,
    })
}

/// How long a new process may take to set itself up (stdio, descriptors):
/// a few system calls, though a stopped one (SIGSTOP cannot be blocked)
/// would hold up the agent's control loop for good.
const SETUP_TIMEOUT_MS: libc::c_int = 10_000;

/// Waits for the byte the process writes once its stdio is in place and
/// the agent's other descriptors are closed. End-of-file means it failed
/// on the way, which is then a failure to create, not an exit after
/// `Start`; one that takes too long is killed.
fn await_ready(mut ready: File, pid: i32) -> Result<(), String> {
    loop {
        let mut fd = libc::pollfd {
            fd: ready.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, SETUP_TIMEOUT_MS) };
        if n < 0 && Errno::last() == Errno::EINTR {
            continue;
        }
        if n == 0 {
            // SAFETY: kill has no memory effects. The pid is the agent's
            // child, which silent for this long has not been reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(format!(
                "the process was not set up within {} s",
                SETUP_TIMEOUT_MS / 1000
            ));
        }
        let mut byte = [0u8; 1];
        return match ready.read(&mut byte) {
            Ok(1) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => Err("the process ended while it was being set up".to_string()),
        };
    }
}
