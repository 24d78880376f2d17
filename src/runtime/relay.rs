//! Copying a process's stdio between host descriptors and its guest
//! streams.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use super::error::RuntimeError;

const BUF: usize = 64 << 10;

/// Host input into a guest stream, ending the stream's writing half at
/// end of input. Detached: a read of the input may block forever (a
/// terminal nobody types into) and must not keep anyone waiting.
pub fn input(mut from: impl Read + Send + 'static, mut stream: UnixStream) -> Result<(), RuntimeError> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; BUF];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        })
        .map(drop)
        .map_err(|e| RuntimeError::io("starting the stdin relay", e))
}

/// A guest output stream to a host writer, until the guest ends it. Join
/// the handle to know everything was written.
pub fn output(
    mut stream: UnixStream,
    mut to: impl Write + Send + 'static,
    meter: Option<Arc<OutputMeter>>,
) -> Result<JoinHandle<()>, RuntimeError> {
    std::thread::Builder::new()
        .name("output".into())
        .spawn(move || {
            let mut buf = vec![0u8; BUF];
            let mut writable = true;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Some(m) = &meter {
                            m.record(n);
                        }
                        // Once our reader is gone, keep draining so the guest
                        // is not blocked on a full stream.
                        if writable && to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                            writable = false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
        .map_err(|e| RuntimeError::io("starting an output relay", e))
}

/// When a process's output started and ended, and how much there was.
#[derive(Default)]
pub struct OutputMeter {
    pub first: OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    bytes: AtomicU64,
}

impl OutputMeter {
    fn record(&self, n: usize) {
        let now = Instant::now();
        let _ = self.first.set(now);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Output rate between the first and the last byte; only meaningful for
    /// output large enough to take a while.
    pub fn throughput_mib_s(&self) -> Option<f64> {
        let first = *self.first.get()?;
        let last = (*self.last.lock().unwrap_or_else(|p| p.into_inner()))?;
        let secs = (last - first).as_secs_f64();
        (secs > 0.01).then(|| self.bytes() as f64 / (1 << 20) as f64 / secs)
    }
}
