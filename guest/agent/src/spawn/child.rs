//! The code the process runs up to `execve`. It runs on the agent's memory
//! while the agent's other threads run on (see `launch`), under the
//! identity of its launcher thread, which is suspended: that thread's
//! thread-local storage, errno and cancellation state are the ones glibc's
//! wrappers (`read`, `write`, `close` among them) touch here. So everything
//! here is a system call on values prepared in the agent, nothing
//! allocates or locks, and failures go to the agent as a fixed-size record
//! (see `report`). The calls that glibc would broadcast to every thread it
//! believes it has (setgroups, setresgid, setresuid), or refuses for its
//! own signals, are made directly. For the same reason the agent itself
//! must never use glibc's set*id functions: they would wait for every
//! launcher to answer a signal, and a launcher whose process waits for
//! `Start` cannot.

use std::os::fd::RawFd;

use super::report::{check, errno, fail, Stage};
use super::Plan;

/// The process's ends of its stdio.
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
    /// Write end of the pipe that tells the agent the process is set up.
    pub ready: RawFd,
}

/// The kernel's `struct sigaction` on x86_64, for `rt_sigaction` itself.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The kernel's signal set is 64 bits on x86_64.
const SIGSET_SIZE: usize = std::mem::size_of::<u64>();

/// Gives every signal its default disposition. The process has its own
/// table of handlers (no CLONE_SIGHAND), so the agent's are untouched.
fn reset_dispositions() {
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction reads a structure of the kernel's layout
            // and size, and writes nothing.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &raw const default,
                    std::ptr::null_mut::<KernelSigaction>(),
                    SIGSET_SIZE,
                )
            };
        }
    }
}

/// Sets the calling thread's signal mask, raw: glibc's wrappers leave its
/// own two signals out of any change.
pub fn set_signal_mask(mask: u64) {
    // SAFETY: rt_sigprocmask reads a signal set of the kernel's size and
    // changes only this thread's mask.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const mask,
            std::ptr::null_mut::<u64>(),
            SIGSET_SIZE,
        )
    };
}

/// Puts `from` on `to` so that it survives `execve`.
fn install(report: RawFd, from: RawFd, to: RawFd) {
    // SAFETY: fcntl and dup2 on fds this process has; dup2 onto the same
    // number keeps close-on-exec, so that case clears it instead.
    let r = unsafe {
        if from == to {
            libc::fcntl(to, libc::F_SETFD, 0)
        } else {
            libc::dup2(from, to)
        }
    };
    check(report, Stage::Stdio, r);
}

/// Closes every fd from `first` up except those in `keep` (sorted), so the
/// process holds none of the agent's descriptors (other processes' pipes
/// among them) while it waits for `Start`.
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

/// Runs in the process; never returns.
///
/// # Safety
/// Only in a process made by `launch`, with `fds` valid in its table.
pub unsafe fn run(p: &Plan, fds: &ChildFds) -> ! {
    reset_dispositions();
    // SAFETY: system calls on values prepared by the agent.
    unsafe {
        // Its own session (and process group), so a terminal can be its
        // controlling terminal and `Signal` can reach the whole group.
        libc::setsid();
        match fds.stdio {
            ChildStdio::Terminal { slave } => {
                check(
                    fds.report,
                    Stage::Terminal,
                    libc::ioctl(slave, libc::TIOCSCTTY, 0),
                );
                for to in 0..3 {
                    install(fds.report, slave, to);
                }
            }
            ChildStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                install(fds.report, stdin, 0);
                install(fds.report, stdout, 1);
                install(fds.report, stderr, 2);
            }
        }
        let mut keep = [fds.start, fds.report, fds.ready];
        keep.sort_unstable();
        close_all_but(3, &keep);
        let byte = 1u8;
        libc::write(fds.ready, (&raw const byte).cast(), 1);
        libc::close(fds.ready);
    }
    // From here a `Signal` before `Start` works as on any process.
    set_signal_mask(0);
    // SAFETY: system calls on values prepared by the agent.
    unsafe {
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
        check(fds.report, Stage::Chdir, libc::chdir(p.cwd.as_ptr()));
        for (i, (resource, limit, _)) in p.rlimits.iter().enumerate() {
            let stage = Stage::Rlimit(u16::try_from(i).unwrap_or(u16::MAX));
            check(fds.report, stage, libc::setrlimit(*resource, limit));
        }
        libc::umask(p.umask);
    }
    apply_identity(p, fds.report);
    // SAFETY: the pointers are NUL-terminated arrays into the plan.
    unsafe { libc::execve(p.exe.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr()) };
    let err = errno();
    // What a shell answers: 127 when there is nothing to run (a missing
    // interpreter too), 126 when it cannot be run.
    let code = if err == libc::ENOENT || err == libc::ENOTDIR {
        127
    } else {
        126
    };
    fail(fds.report, Stage::Exec, err, code)
}

/// Converts a raw system call's result for [`check`].
fn result(r: libc::c_long) -> libc::c_int {
    if r < 0 {
        -1
    } else {
        0
    }
}

/// Capabilities, groups, gid and uid, in the order that keeps each step
/// permitted.
fn apply_identity(p: &Plan, report: RawFd) {
    // SAFETY: prctl, capset and the id calls read values of the plan.
    unsafe {
        if let Some(caps) = &p.caps {
            // Keep the permitted set across the change of uid; the listed
            // sets are applied after it.
            check(
                report,
                Stage::Capabilities,
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
            );
            for &cap in &caps.drop_bounding {
                check(
                    report,
                    Stage::Bounding,
                    libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0),
                );
            }
        }
        check(
            report,
            Stage::Groups,
            result(libc::syscall(
                libc::SYS_setgroups,
                p.groups.len(),
                p.groups.as_ptr(),
            )),
        );
        check(
            report,
            Stage::Gid,
            result(libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid)),
        );
        check(
            report,
            Stage::Uid,
            result(libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid)),
        );
        if let Some(caps) = &p.caps {
            let (header, data) = caps.capset_args();
            check(
                report,
                Stage::Capabilities,
                result(libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr())),
            );
            for &cap in &caps.ambient {
                check(
                    report,
                    Stage::Ambient,
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        libc::c_ulong::from(cap),
                        0,
                        0,
                    ),
                );
            }
        }
        if p.no_new_privileges {
            check(
                report,
                Stage::NoNewPrivileges,
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            );
        }
    }
}
