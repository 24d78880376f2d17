//! Starting a process without ever sharing the agent's pages copy-on-write.
//!
//! A `fork` marks every private page of the agent copy-on-write for as
//! long as the child lives, and a child waiting for `Start` lives long. On
//! software-KVM hosts (nested paging emulated by shadow page tables), the
//! agent has then been seen to read stale copies of data the kernel had
//! just written for it (a received frame read back as the one before it)
//! and waiting children to die before `Start`. Real hardware has no such
//! trouble, but the cure costs little anywhere: the child is created with
//! `CLONE_VM | CLONE_VFORK`, so it borrows the agent's memory instead of
//! copying it, and does nothing but arrange its descriptors and execute
//! the agent's own binary as a waiter (see `waiter`), which starts with a
//! fresh address space. The agent's thread is suspended until then, as
//! with `posix_spawn`.

use std::os::fd::RawFd;

use super::plan::{REPORT_FD, START_FD};
use super::report::{check, errno, fail, Stage};

/// The launcher's stack; it makes a handful of system calls.
const STACK_SIZE: usize = 64 * 1024;

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

/// Everything the launcher touches, prepared by the agent; the pointers
/// stay valid because the agent's thread waits in `clone` until the
/// launcher has executed the waiter or exited.
pub struct Launch {
    pub stdio: ChildStdio,
    /// Read end of the `Start` pipe.
    pub start: RawFd,
    /// Write end of the failure pipe.
    pub report: RawFd,
    /// The agent's binary, opened when the agent started.
    pub exe: RawFd,
    pub argv: *const *const libc::c_char,
    pub envp: *const *const libc::c_char,
}

/// Creates the process; its pid, or the errno of `clone`.
pub fn launch(launch: &Launch) -> Result<i32, i32> {
    let mut stack = vec![0u8; STACK_SIZE];
    // SAFETY: one past the end of the buffer, which the child's stack
    // grows down from; rounded down to the ABI's 16-byte alignment.
    let top = unsafe { stack.as_mut_ptr().add(STACK_SIZE) };
    let top = (top as usize & !15) as *mut libc::c_void;
    // No signal handler of the agent may run on the launcher's borrowed
    // memory: every signal glibc lets a thread block is blocked across the
    // clone (its two internal ones ignore other processes' signals), and
    // the waiter resets the dispositions before it unblocks them.
    // SAFETY: sigset_t is plain data, initialised by sigfillset.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointers; affects only this thread's mask.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let arg = launch as *const Launch as *mut libc::c_void;
    // SAFETY: `entry` runs on `stack`, which outlives the child's use of
    // it (CLONE_VFORK returns only after the child's execve or exit), and
    // reads `launch` only, which is borrowed for as long.
    let pid = unsafe {
        libc::clone(
            entry,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        )
    };
    let err = errno();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        Err(err)
    } else {
        Ok(pid)
    }
}

extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `&Launch` given to clone, alive until this
    // child has executed or exited.
    let launch = unsafe { &*(arg as *const Launch) };
    // SAFETY: this is the freshly cloned child.
    unsafe { run(launch) }
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

/// The launcher: plain system calls only. It runs on the agent's memory
/// under the suspended thread's identity (its thread-local storage, errno
/// and malloc caches, while that thread holds the reaper's table), so it
/// must not allocate, lock or touch anything of the agent's but `l`.
///
/// # Safety
/// Only in a child made by [`launch`], with `l`'s descriptors open.
unsafe fn run(l: &Launch) -> ! {
    // SAFETY: plain system calls on values prepared by the agent.
    unsafe {
        // Its own session (and process group), so a terminal can be its
        // controlling terminal and `Signal` can reach the whole group, from
        // the moment the agent knows its pid.
        libc::setsid();
        match l.stdio {
            ChildStdio::Terminal { slave } => {
                check(l.report, Stage::Terminal, libc::ioctl(slave, libc::TIOCSCTTY, 0));
                for to in 0..3 {
                    install(l.report, slave, to);
                }
            }
            ChildStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                install(l.report, stdin, 0);
                install(l.report, stdout, 1);
                install(l.report, stderr, 2);
            }
        }
        // Out of the way first (to numbers above the fixed ones), since
        // any of them may sit on a number another is about to take.
        let above = REPORT_FD + 1;
        let exe = libc::fcntl(l.exe, libc::F_DUPFD_CLOEXEC, above);
        check(l.report, Stage::Waiter, exe);
        let start = libc::fcntl(l.start, libc::F_DUPFD_CLOEXEC, above);
        check(l.report, Stage::Waiter, start);
        let report = libc::fcntl(l.report, libc::F_DUPFD_CLOEXEC, above);
        check(l.report, Stage::Waiter, report);
        check(report, Stage::Waiter, libc::dup2(start, START_FD));
        check(report, Stage::Waiter, libc::dup2(report, REPORT_FD));
        // Whatever the agent inherited without close-on-exec (a test
        // harness's descriptors, say) must not reach the process either.
        let exe = exe as libc::c_uint;
        if exe > above as libc::c_uint {
            libc::close_range(above as libc::c_uint, exe - 1, 0);
        }
        libc::close_range(exe + 1, libc::c_uint::MAX, 0);

        libc::syscall(
            libc::SYS_execveat,
            exe as libc::c_int,
            c"".as_ptr(),
            l.argv,
            l.envp,
            libc::AT_EMPTY_PATH,
        );
        let err = errno();
        // The process's arguments and environment are too big for any
        // execve: its own exec would have failed the same way.
        if err == libc::E2BIG {
            fail(REPORT_FD, Stage::Exec, err, 126)
        }
        fail(REPORT_FD, Stage::Waiter, err, 1)
    }
}
