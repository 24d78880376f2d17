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
//! instead of a copy until its `execve` gives it its own. A launcher thread
//! of the agent's stays suspended in `clone` until then, as `posix_spawn`'s
//! caller does; the process makes only system calls (see `child`) on a
//! stack of its own and on the plan, which the launcher keeps alive.
//!
//! Launchers never exit, and wait for the next process once theirs has
//! executed: the kernel sends a process's parent-death signal when the
//! thread that created it exits, so a launcher that ended would fire a
//! `PR_SET_PDEATHSIG` the process had just set (as `tini -p` does). Their
//! number is the most processes ever waiting for `Start` at once.
//!
//! Each waiting process also counts in the guest's load average, since its
//! launcher waits in an uninterruptible (though killable) sleep.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::child::{self, ChildFds};
use super::report::errno;
use super::Plan;

/// The process's stack until its `execve`; it makes a handful of system
/// calls. A guard page below it turns an overflow into a fault.
const STACK_SIZE: usize = 64 * 1024;
const GUARD_SIZE: usize = 4096;
/// A launcher only waits in `clone` and on its channel.
const THREAD_STACK_SIZE: usize = 64 * 1024;

/// What the process reads, kept at one address by its launcher.
struct Shared {
    plan: Arc<Plan>,
    fds: ChildFds,
}

/// A process to create, and where its pid goes: the kernel writes it there
/// (CLONE_PARENT_SETTID) before the process first runs; a launch that
/// failed stores minus the errno.
type Job = (Shared, Arc<AtomicI32>);

/// Launchers waiting for a process to create.
static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

/// Creates the process; its pid.
pub fn launch(plan: Arc<Plan>, fds: ChildFds) -> Result<i32, String> {
    let slot = Arc::new(AtomicI32::new(0));
    let idle = IDLE.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let launcher = match idle {
        Some(launcher) => launcher,
        None => start_launcher()?,
    };
    launcher
        .send((Shared { plan, fds }, Arc::clone(&slot)))
        .map_err(|_| "internal error: a launcher thread is gone".to_string())?;
    loop {
        let pid = slot.load(Ordering::Acquire);
        if pid > 0 {
            return Ok(pid);
        }
        if pid < 0 {
            return Err(format!("clone: {}", nix::errno::Errno::from_raw(-pid).desc()));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn start_launcher() -> Result<Sender<Job>, String> {
    // A waiting process that has taken the spec's uid still runs on the
    // agent's memory: were it dumpable, any process of that uid could
    // ptrace it and so write into the agent. The kernel makes it so at the
    // first change of ids anyway; this closes the window before it, for
    // good (the agent is root and needs no ptrace access to itself).
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(format!("PR_SET_DUMPABLE: {}", std::io::Error::last_os_error()));
    }
    let stack = Stack::new().map_err(|e| format!("mapping a stack for a process: {e}"))?;
    let (tx, jobs) = channel::<Job>();
    // Its own sender keeps the channel, and so the thread, alive for good.
    let me = tx.clone();
    std::thread::Builder::new()
        .name("launch".into())
        .stack_size(THREAD_STACK_SIZE)
        .spawn(move || {
            // Every signal blocked, which its processes start with: no
            // handler of the agent's may run on their borrowed memory
            // until they have reset every disposition.
            child::set_signal_mask(!0);
            for (shared, slot) in jobs {
                if let Err(errno) = clone_process(&stack, &shared, &slot) {
                    slot.store(-errno, Ordering::Release);
                }
                drop(shared);
                IDLE.lock().unwrap_or_else(|e| e.into_inner()).push(me.clone());
            }
        })
        .map_err(|e| format!("starting a thread to launch processes: {e}"))?;
    Ok(tx)
}

/// A process's stack: an anonymous mapping with an inaccessible page at
/// its low end.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by one launcher thread, moved to it once.
unsafe impl Send for Stack {}

impl Stack {
    fn new() -> std::io::Result<Stack> {
        let len = GUARD_SIZE + STACK_SIZE;
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the first page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD_SIZE, libc::PROT_NONE) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// Where the stack starts: its high end, 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        self.base.wrapping_byte_add(self.len)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Runs on a launcher: returns once the process has executed or exited,
/// or at once with the errno if it could not be created.
fn clone_process(stack: &Stack, shared: &Shared, slot: &AtomicI32) -> Result<(), i32> {
    let arg = shared as *const Shared as *mut libc::c_void;
    // SAFETY: `entry` runs on `stack` and reads `shared`, both of which
    // outlive its use of them: with CLONE_VFORK this call returns only
    // after the process has executed or exited, and only then is either
    // used again. The kernel writes the pid to `slot`, an i32 that lives as
    // long as the Arc holding it.
    let pid = unsafe {
        libc::clone(
            entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD,
            arg,
            slot.as_ptr(),
        )
    };
    if pid < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `&Shared` given to clone, alive until this
    // process has executed or exited.
    let shared = unsafe { &*(arg as *const Shared) };
    // SAFETY: this is the freshly cloned process, with `fds` valid in the
    // copy of the agent's descriptor table it got.
    unsafe { child::run(&shared.plan, &shared.fds) }
}
