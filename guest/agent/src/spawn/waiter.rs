//! The waiter: the agent's own binary, executed by the launcher in the
//! process that becomes the container's. It starts with an address space of
//! its own, waits for the host's `Start`, applies the process's identity
//! and limits from its plan, and executes the process. Failures go to the
//! agent as a record on [`REPORT_FD`], which `execve` closes.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use caps::CapSet;

use super::plan::{Plan, ARGS_AT, REPORT_FD, START_FD};
use super::report::{check, errno, fail, Stage};

extern "C" {
    static environ: *const *const libc::c_char;
}

/// Runs the waiter; never returns.
pub fn main() -> ! {
    reset_signals();
    // Its command name would otherwise be the descriptor it was executed
    // from.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"skiff-waiter".as_ptr()) };
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some(plan) = args.get(ARGS_AT - 1).and_then(|p| Plan::decode(p.as_bytes())) else {
        fail(REPORT_FD, Stage::Plan, libc::EINVAL, 1)
    };
    // Arguments cannot hold a NUL: they came through an argv.
    let argv: Vec<CString> = args
        .iter()
        .skip(ARGS_AT)
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let (Ok(exe), Ok(cwd)) = (CString::new(plan.exe.clone()), CString::new(plan.cwd.clone())) else {
        fail(REPORT_FD, Stage::Plan, libc::EINVAL, 1)
    };

    wait_for_start();
    // SAFETY: plain system calls on values owned here.
    unsafe {
        // From now on end-of-file on it means `execve` worked.
        check(
            REPORT_FD,
            Stage::Waiter,
            libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC),
        );
        // Before the uid changes: the new user may not be able to reach it.
        check(REPORT_FD, Stage::Chdir, libc::chdir(cwd.as_ptr()));
        for (i, limit) in plan.rlimits.iter().enumerate() {
            let stage = Stage::Rlimit(u16::try_from(i).unwrap_or(u16::MAX));
            let value = libc::rlimit {
                rlim_cur: limit.soft,
                rlim_max: limit.hard,
            };
            check(REPORT_FD, stage, libc::setrlimit(limit.resource, &value));
        }
        libc::umask(plan.umask);
    }
    apply_identity(&plan);
    // SAFETY: exe and argv_ptrs are NUL-terminated and owned here; environ
    // is the environment this process was executed with, which is the
    // process's own.
    unsafe { libc::execve(exe.as_ptr(), argv_ptrs.as_ptr(), environ) };
    let err = errno();
    // What a shell answers: 127 when there is nothing to run (a missing
    // interpreter too), 126 when it cannot be run.
    let code = if err == libc::ENOENT || err == libc::ENOTDIR {
        127
    } else {
        126
    };
    fail(REPORT_FD, Stage::Exec, err, code)
}

/// The kernel's `struct sigaction` on x86_64, for `rt_sigaction` itself.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Gives every signal its default disposition and unblocks them all.
/// Dispositions the agent set (ignored SIGPIPE, SIGTERM as PID 1), the
/// ones Rust's runtime just set, and ignored ones the agent inherited
/// would otherwise carry over, and a `Signal` before `Start` must already
/// work as on a fresh process. The system calls directly, since glibc
/// refuses to touch the two signals it keeps for itself, which this
/// single-threaded process no longer needs.
fn reset_signals() {
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let none: u64 = 0;
    let size = std::mem::size_of::<u64>();
    // SAFETY: rt_sigaction and rt_sigprocmask read the structures above,
    // which match the kernel's layout and size, and write nothing.
    unsafe {
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &raw const default,
                    std::ptr::null_mut::<KernelSigaction>(),
                    size,
                );
            }
        }
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const none,
            std::ptr::null_mut::<u64>(),
            size,
        );
    }
}

/// Blocks until the agent writes the `Start` byte; exits if it drops the
/// process instead.
fn wait_for_start() {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads one byte into a local.
        let n = unsafe { libc::read(START_FD, (&raw mut byte).cast(), 1) };
        if n == 1 {
            break;
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        // SAFETY: ends the process; nothing of it needs cleaning up.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: the descriptor is this process's and unused from here.
    unsafe { libc::close(START_FD) };
}

/// Capabilities, groups, gid and uid, in the order that keeps each step
/// permitted.
fn apply_identity(plan: &Plan) {
    // SAFETY: prctl, setgroups, setresgid and setresuid on values owned
    // here; the caps crate makes capget/capset/prctl calls.
    unsafe {
        if let Some(caps_plan) = &plan.caps {
            // Keep the permitted set across the change of uid; the listed
            // sets are applied after it.
            check(
                REPORT_FD,
                Stage::Capabilities,
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
            );
            for &cap in &caps_plan.drop_bounding {
                if caps::drop(None, CapSet::Bounding, cap).is_err() {
                    fail(REPORT_FD, Stage::Bounding, errno(), 1);
                }
            }
        }
        check(
            REPORT_FD,
            Stage::Groups,
            libc::setgroups(plan.groups.len(), plan.groups.as_ptr()),
        );
        check(
            REPORT_FD,
            Stage::Gid,
            libc::setresgid(plan.gid, plan.gid, plan.gid),
        );
        check(
            REPORT_FD,
            Stage::Uid,
            libc::setresuid(plan.uid, plan.uid, plan.uid),
        );
        if let Some(caps_plan) = &plan.caps {
            for (set, value) in caps_plan.base_sets() {
                if caps::set(None, set, value).is_err() {
                    fail(REPORT_FD, Stage::Capabilities, errno(), 1);
                }
            }
            for &cap in &caps_plan.ambient {
                if caps::raise(None, CapSet::Ambient, cap).is_err() {
                    fail(REPORT_FD, Stage::Ambient, errno(), 1);
                }
            }
        }
        if plan.no_new_privileges {
            check(
                REPORT_FD,
                Stage::NoNewPrivileges,
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            );
        }
    }
}
