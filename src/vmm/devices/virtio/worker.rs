//! The thread a virtio device processes its queues on, and how it is stopped.

use std::io;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

/// A device's worker thread. Dropping it stops and joins the thread, so a
/// VM that goes away leaves no thread behind.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `body` on a new thread; `body` gets an eventfd that becomes
    /// readable when the worker must return.
    pub fn spawn(name: String, body: impl FnOnce(EventFd) + Send + 'static) -> io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let theirs = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(name)
            .stack_size(512 << 10)
            .spawn(move || body(theirs))?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("a virtio worker thread panicked");
            }
        }
    }
}
