//! Creating a container process: everything that can be checked or
//! allocated is done in the agent, then a launcher executes the agent's own
//! binary as the process's waiter (see `launch`), which waits on a pipe for
//! the host's `Start` before it `execve`s the process.

mod creds;
mod launch;
mod plan;
mod report;
mod waiter;

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use nix::unistd::pipe2;
use oci_spec::runtime::{PosixRlimitType, Process};
use skiff_protocol::ExitStatus;

pub use creds::CapPlan;
use launch::{ChildStdio, Launch};
pub use plan::WAITER_FLAG;
use plan::{Plan, Rlimit, WAITER_NAME};
pub use report::Stage;
use report::RECORD_LEN;
pub use waiter::main as waiter_main;

use crate::passwd;
use crate::reaper::reaper;
use crate::resolve::{self, in_root};

/// The agent's binary, opened before the agent changes its root: each
/// process's waiter is executed from it.
static AGENT_EXE: OnceLock<OwnedFd> = OnceLock::new();

/// Opens the agent's binary for later waiters; the first call decides.
pub fn open_agent_exe(path: &Path) -> Result<(), String> {
    if AGENT_EXE.get().is_some() {
        return Ok(());
    }
    let file = File::open(path).map_err(|e| format!("opening the agent's binary {}: {e}", path.display()))?;
    let _ = AGENT_EXE.set(OwnedFd::from(file));
    Ok(())
}

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

/// Everything the process needs, built in the agent.
pub struct Prepared {
    /// The waiter's argument vector: its name, its flag, the plan, then
    /// the process's own arguments. The pointer arrays point into these.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    plan: Plan,
    /// For messages about failures.
    rlimit_types: Vec<PosixRlimitType>,
    terminal: Option<Winsize>,
    exe_path: PathBuf,
}

// SAFETY: the raw pointers point into the CStrings owned alongside them,
// whose heap buffers stay put when the struct moves to another thread.
unsafe impl Send for Prepared {}

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
        let rlimits = creds::rlimits(process);
        let plan = Plan {
            exe: exe_path.as_os_str().as_bytes().to_vec(),
            cwd: in_root(root, &cwd).as_os_str().as_bytes().to_vec(),
            rlimits: rlimits
                .iter()
                .map(|(resource, limit, _)| Rlimit {
                    resource: *resource,
                    soft: limit.rlim_cur,
                    hard: limit.rlim_max,
                })
                .collect(),
            umask: user.umask().unwrap_or(0o022) as libc::mode_t,
            groups: user.additional_gids().clone().unwrap_or_default(),
            uid: user.uid(),
            gid: user.gid(),
            caps: process.capabilities().as_ref().map(CapPlan::from_spec),
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
        };
        // Checked here so the waiter's own checks cannot fail on them.
        cstring("the executable's path", &plan.exe)?;
        cstring("process.cwd", &plan.cwd)?;
        let mut waiter_argv = vec![
            cstring("the waiter's name", WAITER_NAME.as_bytes())?,
            cstring("the waiter's flag", WAITER_FLAG.as_bytes())?,
            cstring("the process's plan", plan.encode().as_bytes())?,
        ];
        waiter_argv.extend(argv);
        Ok(Prepared {
            argv_ptrs: pointers(&waiter_argv),
            _argv: waiter_argv,
            envp_ptrs: pointers(&envp),
            _envp: envp,
            plan,
            rlimit_types: rlimits.into_iter().map(|(_, _, typ)| typ).collect(),
            terminal,
            exe_path,
        })
    }

    /// The message for a failure the process reported.
    pub fn describe_failure(&self, stage: Stage, errno: i32) -> String {
        let err = Errno::from_raw(errno).desc();
        let plan = &self.plan;
        let what = match stage {
            Stage::Stdio => "setting up stdio".to_string(),
            Stage::Terminal => "making the terminal the controlling terminal".to_string(),
            Stage::Chdir => format!("chdir to `{}`", String::from_utf8_lossy(&plan.cwd)),
            Stage::Rlimit(i) => {
                let i = usize::from(i);
                match (plan.rlimits.get(i), self.rlimit_types.get(i)) {
                    (Some(limit), Some(typ)) => format!("setting {typ} to {}/{}", limit.soft, limit.hard),
                    _ => "setting an rlimit".to_string(),
                }
            }
            Stage::Groups => format!("setting additional gids {:?}", plan.groups),
            Stage::Gid => format!("setting gid {}", plan.gid),
            Stage::Uid => format!("setting uid {}", plan.uid),
            Stage::Bounding => "dropping from the capability bounding set".to_string(),
            Stage::Capabilities => "setting capabilities".to_string(),
            Stage::Ambient => "raising ambient capabilities".to_string(),
            Stage::NoNewPrivileges => "setting no_new_privs".to_string(),
            Stage::Exec => format!("exec `{}`", self.exe_path.display()),
            Stage::Waiter => "executing the agent's binary as the process's waiter".to_string(),
            Stage::Plan => "the waiter could not read its plan".to_string(),
        };
        format!("{what}: {err}")
    }
}

/// How the process's failure record reaches the agent.
#[derive(Debug)]
pub struct Failure(File);

impl Failure {
    /// Reads the record once the waiter is gone (its write end closed by
    /// `execve` or exit): `None` when it got as far as `execve`.
    pub fn take(&mut self) -> Option<(Stage, i32)> {
        let mut record = [0u8; RECORD_LEN];
        self.0.read_exact(&mut record).ok()?;
        Stage::decode(record)
    }

    /// The record if it is there already, without waiting.
    fn ready(&mut self) -> Option<(Stage, i32)> {
        let mut fd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        if n == 1 && fd.revents & libc::POLLIN != 0 {
            self.take()
        } else {
            None
        }
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
    let exe = AGENT_EXE
        .get()
        .ok_or_else(|| SpawnError::new("internal error: the agent's binary was not opened"))?;
    let (start_r, start_w) = cloexec_pipe()?;
    let (report_r, report_w) = cloexec_pipe()?;
    // The agent's ends go to `Stdio`, the process's are closed once it has
    // its copies.
    let (stdio, child_ends): (Stdio, Vec<File>) = match &p.terminal {
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
    // The launcher replaces 0-2 with the stdio first; an fd of ours among
    // them would be overwritten before it is used.
    if child_ends
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain([start_r.as_raw_fd(), report_w.as_raw_fd(), exe.as_raw_fd()])
        .any(|fd| fd <= 2)
    {
        return Err(SpawnError::new(
            "internal error: fds 0-2 are not open in the agent",
        ));
    }
    let launch = Launch {
        stdio: child_stdio,
        start: start_r.as_raw_fd(),
        report: report_w.as_raw_fd(),
        exe: exe.as_raw_fd(),
        argv: p.argv_ptrs.as_ptr(),
        envp: p.envp_ptrs.as_ptr(),
    };

    let registration = reaper().map_err(SpawnError::new)?;
    let registration = registration.lock();
    let pid = launch::launch(&launch)
        .map_err(|errno| SpawnError::new(format!("clone: {}", Errno::from_raw(errno).desc())))?;
    drop(child_ends);
    drop(start_r);
    drop(report_w);
    let mut failure = Failure(report_r);
    // `clone` returned after the launcher executed the waiter or gave up,
    // so a launch that failed has its record in the pipe now and is a
    // failure to create, not an exit after `Start`. Its launcher is reaped
    // as an orphan.
    if let Some((stage, errno)) = failure.ready() {
        return Err(SpawnError {
            message: p.describe_failure(stage, errno),
            exit_code: if stage == Stage::Exec { 126 } else { 1 },
        });
    }
    let exit = registration.watch(pid);
    Ok(Spawned {
        pid,
        exit,
        start: start_w,
        failure,
        stdio,
    })
}
