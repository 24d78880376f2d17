//! The one place that waits for children. The agent is PID 1 (or a child
//! subreaper when hosted), so orphans from anywhere in the guest end up as
//! its children: it must reap every pid, and route the exits of its own
//! processes to whoever waits for them. One reaper serves every agent in
//! the process, because `waitpid(-1)` in two of them would steal each
//! other's children.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use skiff_protocol::ExitStatus;

use crate::log::{debug, info};

pub struct Reaper {
    watched: Mutex<BTreeMap<i32, Sender<ExitStatus>>>,
    /// Signalled when a child is registered, to wake a reaper that found
    /// no children to wait for.
    spawned: Condvar,
}

/// Holds the reaper's table locked; see [`Reaper::lock`].
pub struct Registration<'a> {
    watched: MutexGuard<'a, BTreeMap<i32, Sender<ExitStatus>>>,
}

impl Registration<'_> {
    /// The exit status of `pid` will arrive on the returned receiver.
    pub fn watch(mut self, pid: i32) -> Receiver<ExitStatus> {
        let (tx, rx) = channel();
        self.watched.insert(pid, tx);
        REAPER.spawned.notify_all();
        rx
    }
}

static REAPER: Reaper = Reaper {
    watched: Mutex::new(BTreeMap::new()),
    spawned: Condvar::new(),
};
static STARTED: Mutex<bool> = Mutex::new(false);

/// The process's reaper, started on first use.
pub fn reaper() -> Result<&'static Reaper, String> {
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    if !*started {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(|| reap_forever(&REAPER))
            .map_err(|e| format!("starting the reaper thread: {e}"))?;
        *started = true;
    }
    Ok(&REAPER)
}

impl Reaper {
    /// Locks the table. Create the child while holding it and register it with
    /// [`Registration::watch`]: a child that dies at once is then reaped
    /// only after it is registered, so its status is never mistaken for an
    /// orphan's.
    pub fn lock(&self) -> Registration<'_> {
        Registration {
            watched: self.watched.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

fn reap_forever(reaper: &'static Reaper) {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer. libc rather than nix: nix
        // fails on a death by a signal it has no name for (real-time ones),
        // after the child is already reaped and its status lost.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let exit = if libc::WIFEXITED(status) {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                ExitStatus::Signal(libc::WTERMSIG(status))
            } else {
                continue;
            };
            let watcher = reaper.lock().watched.remove(&pid);
            match watcher {
                Some(tx) => {
                    debug!("pid {pid} exited: {exit:?}");
                    let _ = tx.send(exit);
                }
                None => debug!("reaped orphan {pid}: {exit:?}"),
            }
            continue;
        }
        match Errno::last() {
            Errno::EINTR => {}
            Errno::ECHILD => {
                // Nothing to wait for; sleep until a child is registered.
                // The timeout covers children that are not (orphans that
                // were reparented here).
                // A child registered between the waitpid and this lock
                // shows in the table, so its notification is not missed.
                let watched = reaper.watched.lock().unwrap_or_else(|e| e.into_inner());
                let pause = if watched.is_empty() { 100 } else { 5 };
                let _ = reaper.spawned.wait_timeout(watched, Duration::from_millis(pause));
            }
            e => {
                info!("waitpid: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
