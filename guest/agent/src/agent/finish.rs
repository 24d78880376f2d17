//! The end of a process: its exit is reported once its output is all
//! sent, and the end of the container's process ends everything else.

use std::sync::Arc;
use std::time::Instant;

use skiff_protocol::{AgentMessage, ExitStatus, StreamKind, INIT_ID};

use super::{spawn_thread, Agent, Container, Finish, OTHERS_WAIT, SHUTDOWN_WAIT};
use crate::log::{debug, info};

impl Agent {
    /// Waits for a process's exit and reports it once its output is all
    /// sent.
    pub(super) fn finish(self: &Arc<Self>, mut f: Finish) {
        let status = match f.spawned_exit.recv() {
            Ok(status) => status,
            Err(_) => {
                info!("lost track of process {}", f.id);
                ExitStatus::Signal(libc::SIGKILL)
            }
        };
        f.exited.set();
        let is_init = f.id == INIT_ID;
        if is_init {
            // No more `Exec`s from here on: they would only be killed.
            self.state().container = Container::Over;
            self.kill_everything_else();
        }
        let outputs = {
            let mut state = self.state();
            loop {
                match state.procs.get_mut(&f.id) {
                    Some(p) if p.starting => {}
                    Some(p) => {
                        // Never started: the child's pipes close with it.
                        p.pending = None;
                        break std::mem::take(&mut p.outputs);
                    }
                    None => break Vec::new(),
                }
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        for relay in outputs {
            let _ = relay.join();
        }
        let error = f
            .failure
            .take()
            .map(|(stage, errno)| f.prepared.describe_failure(stage, errno));
        if let Some(error) = &error {
            info!("process {}: {error}", f.id);
        }
        if is_init {
            self.wait_for_others();
        }
        let failed = self.state().procs.get(&f.id).is_some_and(|p| p.failed);
        if !failed {
            self.send(&AgentMessage::Exited {
                id: f.id.clone(),
                status,
                error,
            });
        }
        {
            let mut state = self.state();
            if let Some(proc) = state.procs.remove(&f.id) {
                if let Some(stdin) = proc.stdin {
                    let _ = stdin.shutdown_both();
                }
            }
            for kind in [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr] {
                if let Some(conn) = state.streams.remove(&(f.id.clone(), kind)) {
                    let _ = conn.shutdown_both();
                }
            }
            state.finished.insert(f.id.clone());
        }
        self.changed.notify_all();
        if is_init {
            self.arm_shutdown_timer();
        }
    }

    /// The container's process ended, so everything else in it ends too.
    fn kill_everything_else(&self) {
        if self.hosted_root.is_none() {
            debug!("container process exited; killing every other process");
            // SAFETY: kill has no memory effects; from PID 1, -1 means
            // every process but the caller.
            unsafe { libc::kill(-1, libc::SIGKILL) };
            return;
        }
        // Hosted, only the agent's own process groups are its to kill.
        let pids: Vec<i32> = self.state().procs.values().map(|p| p.pid).collect();
        for pid in pids {
            // SAFETY: as above. Each process leads its own group, which may
            // outlive it; the pid itself, if reaped already, is skipped.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }

    fn wait_for_others(&self) {
        let only_init = |state: &super::State| state.procs.keys().all(|id| id == INIT_ID);
        let (state, done) = self.wait_until(Instant::now() + OTHERS_WAIT, only_init);
        if !done {
            let left: Vec<&String> = state.procs.keys().filter(|id| *id != INIT_ID).collect();
            info!("processes {left:?} did not end with the container");
        }
    }

    /// Ends the control loop if `Shutdown` does not come in time after the
    /// container ended.
    fn arm_shutdown_timer(self: &Arc<Self>) {
        let agent = Arc::clone(self);
        let armed = spawn_thread("shutdown-timer", move || {
            let (_state, shut) = agent.wait_until(Instant::now() + SHUTDOWN_WAIT, |s| s.shutdown);
            if !shut {
                info!("no shutdown from the host within {SHUTDOWN_WAIT:?}");
                let _ = agent.control_wake.shutdown_both();
            }
        });
        if let Err(e) = armed {
            info!("{e}");
        }
    }

    /// Hosted only: kills what is left of the agent's processes and closes
    /// their streams, so nothing outlives the agent.
    pub fn wind_down(&self) {
        let mut state = self.state();
        state.shutdown = true;
        for proc in state.procs.values() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(-proc.pid, libc::SIGKILL) };
            if let Some(stdin) = &proc.stdin {
                let _ = stdin.shutdown_both();
            }
        }
        for (_, conn) in state.streams.drain() {
            let _ = conn.shutdown_both();
        }
        drop(state);
        self.changed.notify_all();
    }
}
