//! Copying between a process's stdio and its stream connections.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::log::debug;
use crate::transport::Conn;

/// How long output may pause after the process exited before the relay
/// stops waiting for more. Only a descendant that inherited the pipe (a
/// daemon started in the background) can still write then; the process's
/// own output is in the pipe already.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);
const POLL_INTERVAL: u16 = 100;
const BUF: usize = 64 * 1024;

/// Set once the process has been reaped.
#[derive(Debug, Default)]
pub struct ExitFlag(OnceLock<Instant>);

impl ExitFlag {
    pub fn set(&self) {
        let _ = self.0.set(Instant::now());
    }

    pub fn is_set(&self) -> bool {
        self.0.get().is_some()
    }

    fn since(&self) -> Option<Instant> {
        self.0.get().copied()
    }
}

/// Copies `from` (a pipe or a pty master) to `to` until end of file, then
/// shuts down `to`'s writing half. A pty master reports the end, once the
/// last slave fd is closed, as EIO. If the host stops reading, the output
/// is still drained so the process never blocks on a full pipe.
pub fn output(name: &str, mut from: File, to: Conn, exited: &ExitFlag) {
    let mut to = Some(to);
    let mut buf = vec![0u8; BUF];
    let mut last_data = Instant::now();
    let mut total = 0u64;
    loop {
        let ready = {
            let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(POLL_INTERVAL))
        };
        match ready {
            Ok(0) => {
                if let Some(exit) = exited.since() {
                    if last_data.max(exit).elapsed() >= OUTPUT_GRACE {
                        debug!("{name}: still open {OUTPUT_GRACE:?} after the exit, closing it");
                        break;
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                debug!("{name}: poll: {e}");
                break;
            }
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => continue,
            // EIO is how a pty master says the slave side is gone.
            Err(e) => {
                if e.raw_os_error() != Some(libc::EIO) {
                    debug!("{name}: read: {e}");
                }
                break;
            }
        };
        last_data = Instant::now();
        total += n as u64;
        if let Some(conn) = to.as_mut() {
            if let Err(e) = conn.write_all(&buf[..n]) {
                debug!("{name}: the host stopped reading ({e}); discarding the rest");
                to = None;
            }
        }
    }
    debug!("{name}: end after {total} bytes");
    if let Some(conn) = to {
        let _ = conn.shutdown_write();
    }
}

/// Copies the host's stdin stream into the process until the host shuts
/// its side down; dropping `to` then closes the pipe, which is the
/// process's end of file.
pub fn input(name: &str, mut from: Conn, mut to: File) {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                debug!("{name}: read: {e}");
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            // The process closed its stdin or exited.
            debug!("{name}: write: {e}");
            break;
        }
    }
    debug!("{name}: end");
}
