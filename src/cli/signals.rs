//! Signals to `skiff` itself: for a bare boot, SIGINT and SIGTERM become an
//! orderly stop of the VM (so an interrupted `skiff` still joins its vCPU
//! threads and flushes the console); for a container, they go to its process.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::Context;

use crate::runtime::foreground::SignalSource;
use crate::runtime::sandbox::Cancel;
use crate::vmm::StopHandle;

/// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread it
/// starts later) and returns a guard whose thread waits for them.
pub struct StopOnSignal {
    sigset: libc::sigset_t,
}

impl StopOnSignal {
    pub fn block() -> anyhow::Result<Self> {
        // SAFETY: sigset_t is plain data, initialized by sigemptyset before use.
        let mut sigset: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to a local sigset; pthread_sigmask only reads it.
        let ret = unsafe {
            libc::sigemptyset(&mut sigset);
            libc::sigaddset(&mut sigset, libc::SIGINT);
            libc::sigaddset(&mut sigset, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &sigset, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(ret)).context("blocking SIGINT and SIGTERM");
        }
        Ok(StopOnSignal { sigset })
    }

    /// Starts the thread that stops the VM on the first SIGINT or SIGTERM and
    /// reports which one it was. A second one ends the process at once, in
    /// case the orderly stop is itself stuck (e.g. on a console pipe nobody reads).
    pub fn watch(self, stop: StopHandle) -> anyhow::Result<mpsc::Receiver<i32>> {
        let (tx, rx) = mpsc::channel();
        let sigset = self.sigset;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut stopping = false;
                loop {
                    let mut signal = 0;
                    // SAFETY: sigset holds signals blocked in this thread, as sigwait requires.
                    if unsafe { libc::sigwait(&sigset, &mut signal) } != 0 {
                        continue;
                    }
                    if stopping {
                        std::process::exit(128 + signal);
                    }
                    stopping = true;
                    tracing::info!(signal, "stopping the VM");
                    let _ = tx.send(signal);
                    stop.stop();
                }
            })
            .context("starting the signal thread")?;
        Ok(rx)
    }
}

/// The signals a container's process gets from `skiff boot --bundle`, as
/// runc's foreground mode forwards them.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

type Handler = Box<dyn Fn(i32) + Send>;

/// Before the container runs, a signal cancels the boot; once it runs, each
/// signal is forwarded to its process.
pub struct ForwardSignals {
    handler: Arc<Mutex<Option<Handler>>>,
    received: Arc<AtomicI32>,
}

impl ForwardSignals {
    /// Blocks the forwarded signals in this thread (and every thread started
    /// after) and starts the thread that waits for them.
    pub fn start(cancel: Cancel) -> anyhow::Result<Self> {
        // SAFETY: sigset_t is plain data, initialized by sigemptyset before use.
        let mut sigset: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to a local sigset; pthread_sigmask only reads it.
        let ret = unsafe {
            libc::sigemptyset(&mut sigset);
            for s in FORWARDED {
                libc::sigaddset(&mut sigset, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &sigset, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(ret)).context("blocking signals");
        }
        let handler: Arc<Mutex<Option<Handler>>> = Arc::default();
        let received = Arc::new(AtomicI32::new(0));
        let (h, r) = (handler.clone(), received.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut signal = 0;
                // SAFETY: sigset holds signals blocked in this thread, as sigwait requires.
                if unsafe { libc::sigwait(&sigset, &mut signal) } != 0 {
                    continue;
                }
                match &*h.lock().unwrap_or_else(|p| p.into_inner()) {
                    Some(forward) => {
                        tracing::debug!(signal, "forwarding to the container");
                        forward(signal);
                    }
                    None => {
                        if r.swap(signal, Ordering::SeqCst) != 0 {
                            // A second one while the first is being handled.
                            std::process::exit(128 + signal);
                        }
                        tracing::info!(signal, "cancelling the start");
                        cancel.cancel();
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(ForwardSignals { handler, received })
    }

    /// The signal that cancelled the start, if one did.
    pub fn cancelled_by(&self) -> Option<i32> {
        Some(self.received.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl SignalSource for ForwardSignals {
    fn forward(&mut self, forward: Box<dyn Fn(i32) + Send>) {
        let mut handler = self.handler.lock().unwrap_or_else(|p| p.into_inner());
        // A signal that came after the boot (when cancelling was no longer
        // possible) but before now is the container's to get.
        let early = self.received.swap(0, Ordering::SeqCst);
        if early != 0 {
            tracing::debug!(signal = early, "forwarding a signal received during the start");
            forward(early);
        }
        *handler = Some(forward);
    }
}
