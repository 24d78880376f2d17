//! The code a forked child runs up to `execve`. The agent is multi-threaded,
//! so after `fork` only this thread exists and any lock another thread held
//! stays held: everything here is a plain system call on values prepared
//! before the fork, and failures go to the agent as a fixed-size record on
//! a close-on-exec pipe instead of as text.

use std::os::fd::RawFd;

use caps::CapSet;

use super::Prepared;

/// Where a child failed, sent with the errno. The agent turns it into a
/// message with [`super::describe_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Stdio,
    Terminal,
    Chdir,
    /// Index into the prepared rlimits.
    Rlimit(u16),
    Groups,
    Gid,
    Uid,
    Bounding,
    Capabilities,
    Ambient,
    NoNewPrivileges,
    Exec,
}

pub const RECORD_LEN: usize = 8;

impl Stage {
    fn code(self) -> u32 {
        match self {
            Stage::Stdio => 1,
            Stage::Terminal => 2,
            Stage::Chdir => 3,
            Stage::Groups => 4,
            Stage::Gid => 5,
            Stage::Uid => 6,
            Stage::Bounding => 7,
            Stage::Capabilities => 8,
            Stage::Ambient => 9,
            Stage::NoNewPrivileges => 10,
            Stage::Exec => 11,
            Stage::Rlimit(i) => 0x1_0000 + u32::from(i),
        }
    }

    pub fn decode(record: [u8; RECORD_LEN]) -> Option<(Stage, i32)> {
        let [a, b, c, d, e, f, g, h] = record;
        let code = u32::from_le_bytes([a, b, c, d]);
        let errno = i32::from_le_bytes([e, f, g, h]);
        let stage = match code {
            1 => Stage::Stdio,
            2 => Stage::Terminal,
            3 => Stage::Chdir,
            4 => Stage::Groups,
            5 => Stage::Gid,
            6 => Stage::Uid,
            7 => Stage::Bounding,
            8 => Stage::Capabilities,
            9 => Stage::Ambient,
            10 => Stage::NoNewPrivileges,
            11 => Stage::Exec,
            c if c >= 0x1_0000 => Stage::Rlimit(u16::try_from(c - 0x1_0000).ok()?),
            _ => return None,
        };
        Some((stage, errno))
    }

    pub fn encode(self, errno: i32) -> [u8; RECORD_LEN] {
        let mut record = [0; RECORD_LEN];
        record[..4].copy_from_slice(&self.code().to_le_bytes());
        record[4..].copy_from_slice(&errno.to_le_bytes());
        record
    }
}

/// The child's ends of its stdio.
#[derive(Debug, Clone, Copy)]
pub enum ChildStdio {
    Pipes {
        stdin: RawFd,
        stdout: RawFd,
        stderr: RawFd,
    },
    Terminal {
        slave: RawFd,
    },
}

pub struct ChildFds {
    pub stdio: ChildStdio,
    /// Read end of the pipe whose one byte is the host's `Start`.
    pub start: RawFd,
    /// Write end of the close-on-exec failure pipe.
    pub report: RawFd,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reports the failure and exits with `code`.
fn fail(fds: &ChildFds, stage: Stage, err: i32, code: i32) -> ! {
    let record = stage.encode(err);
    // SAFETY: record is valid for its length; _exit ends the process
    // without running the parent's atexit handlers or destructors.
    unsafe {
        libc::write(fds.report, record.as_ptr().cast(), record.len());
        libc::_exit(code)
    }
}

fn check(fds: &ChildFds, stage: Stage, result: libc::c_int) {
    if result < 0 {
        fail(fds, stage, errno(), 1);
    }
}

/// Puts `from` on `to` so that it survives `execve`.
fn install(fds: &ChildFds, from: RawFd, to: RawFd) {
    // SAFETY: fcntl and dup2 on fds this process has; dup2 onto the same
    // number keeps close-on-exec, so that case clears it instead.
    let r = unsafe {
        if from == to {
            libc::fcntl(to, libc::F_SETFD, 0)
        } else {
            libc::dup2(from, to)
        }
    };
    check(fds, Stage::Stdio, r);
}

/// Closes every fd from `first` up except those in `keep` (sorted), so the
/// child does not hold other processes' pipes open while it waits for
/// `Start`: fds of a sibling forked at the same moment are not yet
/// close-on-exec-protected by an exec.
fn close_all_but(first: RawFd, keep: &[RawFd]) {
    let mut low = first as libc::c_uint;
    for &fd in keep {
        let fd = fd as libc::c_uint;
        if fd > low {
            // SAFETY: closes fds only; nothing here uses them.
            unsafe { libc::close_range(low, fd - 1, 0) };
        }
        low = low.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::close_range(low, libc::c_uint::MAX, 0) };
}

/// Runs in the child after `fork`; never returns.
///
/// # Safety
/// Must be called only in a freshly forked child, with `fds` valid there.
pub unsafe fn run(p: &Prepared, fds: &ChildFds) -> ! {
    // Dispositions the agent set (ignored SIGPIPE, SIGTERM as PID 1) would
    // be inherited; a process starts with defaults and no blocked signals,
    // and gets them now so a `Signal` before `Start` already works.
    // SAFETY: resetting dispositions and the mask installs no handlers.
    unsafe {
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    // SAFETY: plain system calls on values prepared before the fork.
    unsafe {
        // Its own session (and process group), so a terminal can be its
        // controlling terminal and `Signal` can reach the whole group.
        libc::setsid();
        match fds.stdio {
            ChildStdio::Terminal { slave } => {
                check(fds, Stage::Terminal, libc::ioctl(slave, libc::TIOCSCTTY, 0));
                for to in 0..3 {
                    install(fds, slave, to);
                }
            }
            ChildStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                install(fds, stdin, 0);
                install(fds, stdout, 1);
                install(fds, stderr, 2);
            }
        }
        let mut keep = [fds.start, fds.report];
        keep.sort_unstable();
        close_all_but(3, &keep);

        let mut byte = 0u8;
        loop {
            let n = libc::read(fds.start, (&raw mut byte).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            // The agent dropped the process without starting it.
            libc::_exit(1);
        }
        libc::close(fds.start);

        // Before the uid changes: the new user may not be able to reach it.
        check(fds, Stage::Chdir, libc::chdir(p.cwd.as_ptr()));
        for (i, (resource, limit, _)) in p.rlimits.iter().enumerate() {
            let stage = Stage::Rlimit(u16::try_from(i).unwrap_or(u16::MAX));
            check(fds, stage, libc::setrlimit(*resource, limit));
        }
        libc::umask(p.umask);

        if let Some(plan) = &p.caps {
            // Keep the permitted set across the change of uid; the listed
            // sets are applied after it.
            check(
                fds,
                Stage::Capabilities,
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
            );
            for &cap in &plan.drop_bounding {
                if caps::drop(None, CapSet::Bounding, cap).is_err() {
                    fail(fds, Stage::Bounding, errno(), 1);
                }
            }
        }
        check(
            fds,
            Stage::Groups,
            libc::setgroups(p.groups.len(), p.groups.as_ptr()),
        );
        check(fds, Stage::Gid, libc::setresgid(p.gid, p.gid, p.gid));
        check(fds, Stage::Uid, libc::setresuid(p.uid, p.uid, p.uid));
        if let Some(plan) = &p.caps {
            for (set, value) in plan.base_sets() {
                if caps::set(None, set, value).is_err() {
                    fail(fds, Stage::Capabilities, errno(), 1);
                }
            }
            for &cap in &plan.ambient {
                if caps::raise(None, CapSet::Ambient, cap).is_err() {
                    fail(fds, Stage::Ambient, errno(), 1);
                }
            }
        }
        if p.no_new_privileges {
            check(
                fds,
                Stage::NoNewPrivileges,
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            );
        }

        libc::execve(p.exe.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
        let err = errno();
        // What a shell answers: 127 when there is nothing to run (a missing
        // interpreter too), 126 when it cannot be run.
        let code = if err == libc::ENOENT || err == libc::ENOTDIR {
            127
        } else {
            126
        };
        fail(fds, Stage::Exec, err, code)
    }
}
