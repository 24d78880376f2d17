//! The container's processes as a whole: a signal to every one of them
//! (`kill --all`) and the list of them (`ps`).

use std::collections::HashSet;
use std::io;

use skiff_protocol::AgentMessage;

use super::{failed, Agent};
use crate::log::debug;
use crate::procfs::{self, Entry};

impl Agent {
    /// `Signal` with `all`. Answered like a signal to one process: nothing
    /// when it went out, `Failed` for an unknown id or an error. Unlike a
    /// single signal, it goes out even when `id`'s own process has exited,
    /// since others may still run.
    pub(super) fn signal_all(&self, id: &str, signal: i32) {
        if !self.state().procs.contains_key(id) {
            self.send(&failed(id, "no such process", 1));
            return;
        }
        // Checked here because hosted, with nobody to signal, the kernel
        // would never get to say so.
        if !(0..=libc::SIGRTMAX()).contains(&signal) {
            let e = io::Error::from_raw_os_error(libc::EINVAL);
            self.send(&failed(id, format!("signal {signal}: {e}"), 1));
            return;
        }
        let sent = match self.hosted_root {
            None => signal_every_process(signal),
            Some(_) => self.signal_own_processes(signal),
        };
        if let Err(e) = sent {
            self.send(&failed(id, format!("signal {signal} to every process: {e}"), 1));
        }
    }

    /// Hosted, `kill(-1)` would reach the whole host: only the agent's own
    /// processes, found in `/proc`, get the signal.
    fn signal_own_processes(&self, signal: i32) -> Result<(), String> {
        let entries = self.proc_entries()?;
        let mut first_error = None;
        for pid in self.own_processes(&entries) {
            // SAFETY: kill has no memory effects.
            if unsafe { libc::kill(pid, signal) } < 0 {
                let e = io::Error::last_os_error();
                // It ended after /proc was read.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    first_error.get_or_insert(format!("pid {pid}: {e}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `ListProcesses`: always answered, with `Processes` or `Failed`.
    pub(super) fn list_processes(&self, id: String) {
        let entries = match self.proc_entries() {
            Ok(entries) => entries,
            Err(e) => {
                self.send(&failed(&id, e, 1));
                return;
            }
        };
        let agent = std::process::id() as i32;
        let own: Option<HashSet<i32>> = self
            .hosted_root
            .is_some()
            .then(|| self.own_processes(&entries).into_iter().collect());
        let processes = entries
            .iter()
            .filter(|e| e.stat.pid != agent && !e.is_kernel_thread())
            .filter(|e| own.as_ref().is_none_or(|own| own.contains(&e.stat.pid)))
            .map(Entry::info)
            .collect();
        self.send(&AgentMessage::Processes { id, processes });
    }

    fn proc_entries(&self) -> Result<Vec<Entry>, String> {
        self.proc.as_ref().map_err(Clone::clone)?.processes()
    }

    /// Hosted: the processes the agent started, with their descendants and
    /// sessions, parents first. Not all of the agent's descendants: other
    /// agents may run in the same process (tests in parallel) and adopt
    /// orphans too.
    fn own_processes(&self, entries: &[Entry]) -> Vec<i32> {
        let (live, all): (Vec<i32>, Vec<i32>) = {
            let state = self.state();
            let live = state
                .procs
                .values()
                .filter(|p| !p.exited.is_set())
                .map(|p| p.pid)
                .collect();
            (live, state.procs.values().map(|p| p.pid).collect())
        };
        let agent = std::process::id() as i32;
        let mut own = procfs::members(entries, &live, &all);
        own.retain(|&pid| pid != agent);
        debug!("the agent's own processes: {own:?}");
        own
    }
}

/// In the VM: from PID 1, `kill(-1)` reaches every process but the agent.
fn signal_every_process(signal: i32) -> Result<(), String> {
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(-1, signal) } < 0 {
        let e = io::Error::last_os_error();
        // Nobody left to signal is not an error, as for an exited process.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e.to_string());
        }
    }
    Ok(())
}
