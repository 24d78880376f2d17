//! Stream connections and `Start`: a process is released once the host
//! has attached all its streams, and its stdio relays run from then on.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use skiff_protocol::{read_frame, AgentMessage, StreamHello, StreamKind};

use super::{failed, spawn_thread, Agent, STREAM_WAIT};
use crate::log::{debug, info};
use crate::relay;
use crate::spawn::Stdio;
use crate::transport::{Conn, Listener};

impl Agent {
    /// Accepts stream connections and files them by their hello.
    pub fn accept_streams(self: &Arc<Self>, listener: &Listener) {
        loop {
            let conn = match listener.accept() {
                Ok(conn) => conn,
                Err(e) => {
                    debug!("accepting streams ends: {e}");
                    return;
                }
            };
            let agent = Arc::clone(self);
            // A thread each: a peer that connects and says nothing must
            // not hold up the next one.
            if let Err(e) = spawn_thread("stream-hello", move || agent.attach_stream(conn)) {
                info!("{e}");
            }
        }
    }

    fn attach_stream(&self, mut conn: Conn) {
        let hello = match read_frame::<_, StreamHello>(&mut conn) {
            Ok(Some(hello)) => hello,
            Ok(None) => return,
            Err(e) => {
                info!("bad stream hello: {e}");
                return;
            }
        };
        debug!("stream {:?} of {} attached", hello.kind, hello.id);
        let mut state = self.state();
        if state.finished.contains(&hello.id) {
            let _ = conn.shutdown_both();
            return;
        }
        if let Some(old) = state.streams.insert((hello.id, hello.kind), conn) {
            let _ = old.shutdown_both();
        }
        drop(state);
        self.changed.notify_all();
    }

    pub(super) fn start(self: &Arc<Self>, id: String) {
        let pending = {
            let mut state = self.state();
            match state.procs.get_mut(&id) {
                None => Err("no such process"),
                Some(p) if p.pending.is_none() || p.starting => Err("the process was started already"),
                Some(p) => {
                    p.starting = true;
                    Ok((p.pending.take(), p.streams))
                }
            }
        };
        let (pending, kinds) = match pending {
            Ok((Some(pending), kinds)) => (pending, kinds),
            Ok((None, _)) => return,
            Err(problem) => {
                self.send(&failed(&id, problem, 1));
                return;
            }
        };
        let agent = Arc::clone(self);
        let thread_id = id.clone();
        // Streams may arrive after `Start`; waiting for them must not hold
        // up the control loop.
        if let Err(e) = spawn_thread("start", move || {
            agent.start_when_attached(thread_id, pending, kinds)
        }) {
            info!("{e}");
            self.abandon_start(&id, &e);
        }
    }

    fn start_when_attached(self: &Arc<Self>, id: String, pending: (File, Stdio), kinds: &[StreamKind]) {
        let attached = |state: &super::State| {
            kinds
                .iter()
                .all(|&k| state.streams.contains_key(&(id.clone(), k)))
        };
        let (mut state, all) = self.wait_until(Instant::now() + STREAM_WAIT, attached);
        if !all {
            let missing: Vec<_> = kinds
                .iter()
                .filter(|&&k| !state.streams.contains_key(&(id.clone(), k)))
                .collect();
            drop(state);
            self.abandon_start(
                &id,
                &format!("streams {missing:?} not attached within {STREAM_WAIT:?}"),
            );
            return;
        }
        let mut conns = kinds
            .iter()
            .filter_map(|&k| state.streams.remove(&(id.clone(), k)).map(|c| (k, c)))
            .collect::<HashMap<_, _>>();
        let Some(proc) = state.procs.get_mut(&id) else {
            return;
        };
        let (mut start, stdio) = pending;
        let mut take = |kind| conns.remove(&kind).ok_or(format!("no {kind:?} stream"));
        let wired = (|| -> Result<(), String> {
            let stdin = take(StreamKind::Stdin)?;
            proc.stdin = stdin.try_clone().ok();
            let exited = &proc.exited;
            let output = |name: String, from: File, to: Conn| {
                let exited = Arc::clone(exited);
                spawn_thread(&name.clone(), move || relay::output(&name, from, to, &exited))
            };
            match stdio {
                Stdio::Pipes {
                    stdin: w,
                    stdout,
                    stderr,
                } => {
                    let name = format!("{id}/stdin");
                    spawn_thread(&name.clone(), move || relay::input(&name, stdin, w))?;
                    proc.outputs
                        .push(output(format!("{id}/stdout"), stdout, take(StreamKind::Stdout)?)?);
                    proc.outputs
                        .push(output(format!("{id}/stderr"), stderr, take(StreamKind::Stderr)?)?);
                }
                Stdio::Terminal { master } => {
                    let writer = master
                        .try_clone()
                        .map_err(|e| format!("dup of the pty master: {e}"))?;
                    let name = format!("{id}/stdin");
                    spawn_thread(&name.clone(), move || relay::input(&name, stdin, writer))?;
                    proc.outputs
                        .push(output(format!("{id}/tty"), master, take(StreamKind::Stdout)?)?);
                }
            }
            Ok(())
        })();
        drop(state);
        if let Err(e) = wired {
            self.abandon_start(&id, &e);
            return;
        }
        if let Err(e) = start.write_all(&[1]) {
            // The child is gone already; its exit is reported as usual.
            debug!("releasing {id}: {e}");
        }
        drop(start);
        self.send(&AgentMessage::Started { id: id.clone() });
        if let Some(proc) = self.state().procs.get_mut(&id) {
            proc.starting = false;
        }
        self.changed.notify_all();
    }

    /// `Start` could not be carried out: kill the process and say so
    /// instead of reporting its exit.
    fn abandon_start(&self, id: &str, error: &str) {
        info!("starting {id}: {error}");
        {
            let mut state = self.state();
            if let Some(proc) = state.procs.get_mut(id) {
                proc.failed = true;
                proc.starting = false;
                // Once reaped, the pid may be someone else's.
                if !proc.exited.is_set() {
                    // SAFETY: kill has no memory effects.
                    unsafe { libc::kill(proc.pid, libc::SIGKILL) };
                }
            }
        }
        self.changed.notify_all();
        self.send(&failed(id, error, 1));
    }
}
