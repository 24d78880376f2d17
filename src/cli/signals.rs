//! Turning SIGINT and SIGTERM into an orderly stop of the VM, so an
//! interrupted `skiff` still joins its vCPU threads and flushes the console.

use std::sync::mpsc;

use anyhow::Context;

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
