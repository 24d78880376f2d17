//! Creating a process without ever sharing the agent's pages copy-on-write.
//!
//! A `fork` marks every private page of the agent copy-on-write for as
//! long as the child lives, and a child waiting for `Start` lives long. On
//! software-KVM hosts (guest page tables shadowed by the host), the agent
//! has then been seen to read stale copies of data the kernel had just
//! written for it (a received frame read back as the one before it), and
//! waiting children to die before `Start`. Real hardware has no such
//! trouble, but the cure costs nothing there either: the process is
//! created with `CLONE_VM | CLONE_VFORK`, so it runs on the agent's memory
//! instead of a copy until its `execve` gives it its own. A thread of the
//! agent's, made for it, stays suspended in `clone` until then, as
//! `posix_spawn`'s caller does; the process makes only system calls (see
//! `child`) on its own stack and on the plan, which that thread keeps
//! alive.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::child::{self, ChildFds};
use super::report::errno;
use super::Plan;

/// The process's stack until its `execve`; it makes a handful of system
/// calls.
const STACK_SIZE: usize = 64 * 1024;
/// The launching thread only waits in `clone`.
const THREAD_STACK_SIZE: usize = 64 * 1024;

/// What the process reads, kept at one address by the launching thread.
struct Shared {
    plan: Arc<Plan>,
    fds: ChildFds,
}

/// Creates the process; its pid.
pub fn launch(plan: Arc<Plan>, fds: ChildFds) -> Result<i32, String> {
    // The kernel writes the pid here (CLONE_PARENT_SETTID) before the
    // process first runs; a launch that failed stores minus the errno.
    let slot = Arc::new(AtomicI32::new(0));
    let thread = {
        let slot = Arc::clone(&slot);
        std::thread::Builder::new()
            .name("launch".into())
            .stack_size(THREAD_STACK_SIZE)
            .spawn(move || {
                let shared = Shared { plan, fds };
                if let Err(errno) = clone_process(&shared, &slot) {
                    slot.store(-errno, Ordering::Release);
                }
            })
            .map_err(|e| format!("starting a thread to launch the process: {e}"))?
    };
    loop {
        let pid = slot.load(Ordering::Acquire);
        if pid > 0 {
            return Ok(pid);
        }
        if pid < 0 {
            let _ = thread.join();
            return Err(format!("clone: {}", nix::errno::Errno::from_raw(-pid).desc()));
        }
        if thread.is_finished() && slot.load(Ordering::Acquire) == 0 {
            return Err("internal error: the launching thread ended without a process".into());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Runs on the launching thread: returns once the process has executed
/// or exited, or at once with the errno if it could not be created.
fn clone_process(shared: &Shared, slot: &AtomicI32) -> Result<(), i32> {
    let mut stack = vec![0u8; STACK_SIZE];
    // SAFETY: one past the end of the buffer, which the process's stack
    // grows down from; rounded down to the ABI's 16-byte alignment.
    let top = unsafe { stack.as_mut_ptr().add(STACK_SIZE) };
    let top = (top as usize & !15) as *mut libc::c_void;
    // No handler of the agent's may run on the process's borrowed stack:
    // it starts with every signal blocked (this thread's mask), and
    // unblocks them after it has reset their dispositions.
    // SAFETY: sigset_t is plain data, initialised by sigfillset.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sigset; this thread does nothing but wait in clone.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    let arg = shared as *const Shared as *mut libc::c_void;
    // SAFETY: `entry` runs on `stack` and reads `shared`, both of which
    // outlive its use of them: with CLONE_VFORK this call returns only
    // after the process has executed or exited. The kernel writes the pid
    // to `slot`, an i32 that lives as long as the Arc holding it.
    let pid = unsafe {
        libc::clone(
            entry,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD,
            arg,
            slot.as_ptr(),
        )
    };
    let result = if pid < 0 { Err(errno()) } else { Ok(()) };
    drop(stack);
    result
}

extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `&Shared` given to clone, alive until this
    // process has executed or exited.
    let shared = unsafe { &*(arg as *const Shared) };
    // SAFETY: this is the freshly cloned process, with `fds` valid in the
    // copy of the agent's descriptor table it got.
    unsafe { child::run(&shared.plan, &shared.fds) }
}
