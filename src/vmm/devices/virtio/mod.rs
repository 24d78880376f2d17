//! virtio devices on the MMIO transport (virtio 1.x, "modern" only).
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] owns its
//! registers and queues and hands them over at `DRIVER_OK`. Each device
//! processes its queues on a worker thread of its own ([`worker`]), woken by
//! ioeventfds KVM signals on queue notification, and interrupts the guest
//! through an irqfd.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::triggers::IrqLine;
use crate::vmm::memory::GuestMemoryHost;

/// Feature bit every device offers: the MMIO transport's version 2 requires it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A device's side of the interrupt: the status bits the driver reads and
/// acknowledges, and the GSI raised through an irqfd.
pub struct Interrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl Interrupt {
    pub fn new(line: IrqLine) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Interrupts the driver for `queue` after the device used buffers
    /// there, unless the driver asked not to be.
    pub fn used_buffers(&self, queue: &mut Queue, mem: &GuestMemoryHost) {
        if queue.needs_notification(mem).unwrap_or(true) {
            self.signal_used();
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.0.write(1) {
            tracing::warn!("raising a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Brings back the status bits a snapshot recorded; the line itself is
    /// part of the interrupt controller's state.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A device's queues, shared by its worker and the transport. The worker
/// holds the lock while it processes them, so whoever else holds it (a
/// snapshot) sees them, and the guest memory they point at, at rest.
#[derive(Clone, Default)]
pub struct SharedQueues(Arc<Mutex<Vec<Queue>>>);

impl SharedQueues {
    pub fn new(queues: Vec<Queue>) -> Self {
        SharedQueues(Arc::new(Mutex::new(queues)))
    }

    /// A worker that panicked mid-request left the rings no worse than a
    /// guest could, and the snapshot or the next request must still get in.
    pub fn lock(&self) -> MutexGuard<'_, Vec<Queue>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a device gets when the driver has set it up.
pub struct Activation {
    pub mem: GuestMemoryHost,
    pub queues: SharedQueues,
    /// One per queue, signalled when the driver notifies that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each of its queues; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits it offers.
    fn features(&self) -> u64;
    /// Reads its configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space. Most devices' config is read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            device = self.device_type(),
            offset,
            len = data.len(),
            "config write ignored"
        );
    }
    /// What tells this device apart from others of its type in a snapshot
    /// (a share's tag, a disk's id): a restored VM must have the devices,
    /// in order, that its guest probed.
    fn identity(&self) -> String {
        String::new()
    }
    /// Whether the state of its queues, `queues`, is all there is to save:
    /// an error says what lives only in the VMM and cannot be.
    fn check_snapshot(&self, _queues: &[virtio_queue::QueueState]) -> Result<(), String> {
        Ok(())
    }
    /// Called before `activate` on a device restored from a snapshot
    /// rather than set up by its driver.
    fn restored(&mut self) {}
    /// Starts processing the queues.
    fn activate(&mut self, activation: Activation) -> std::io::Result<()>;
    /// Stops processing and forgets the queues (the driver reset the device).
    fn reset(&mut self);
}

/// Copies the slice of `config` that `offset`/`data` address; the rest reads as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Answers every chain the driver has made available on `queue` with
/// `handle`, which returns how many bytes it wrote into the chain; then
/// interrupts the driver once, if any chain was used and it wants to know.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryHost,
    interrupt: &Interrupt,
    device: &str,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryHost>) -> u32,
) {
    let mut used_any = false;
    let mut idle_passes = 0;
    loop {
        if queue.disable_notification(mem).is_err() {
            return;
        }
        let mut used_now = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = handle(chain);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("{device}: returning a used buffer: {e:?}");
            }
            used_now = true;
        }
        used_any |= used_now;
        if !used_now {
            idle_passes += 1;
        }
        // A chain made available after the drain, before notifications
        // were back on, would otherwise wait for the next kick. A ring that
        // claims more chains than it yields (a bad available index) is
        // given up on after a second empty pass rather than spun on.
        match queue.enable_notification(mem) {
            Ok(true) if idle_passes < 2 => continue,
            _ => break,
        }
    }
    if used_any {
        interrupt.used_buffers(queue, mem);
    }
}
