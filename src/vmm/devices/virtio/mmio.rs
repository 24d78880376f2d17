//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 register layout)
//! and the bus that routes guest MMIO exits to it.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, SharedQueues, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::devices::triggers::IrqLine;
use crate::vmm::error::{Error, Result};
use crate::vmm::memory::GuestMemoryHost;

/// "virt" in little endian, as the spec requires.
const MMIO_MAGIC: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Reported as the vendor; the spec leaves it to the implementation.
const VENDOR_ID: u32 = 0x6666_6b73; // "skff"
/// Each device's register window; the size Linux's `virtio_mmio.device=` announces.
pub const MMIO_WINDOW: u64 = 0x1000;

/// One device's registers, queues and state as the driver sees them.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryHost,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    /// The queues the device's worker runs on, once activated.
    active: Option<SharedQueues>,
}

/// One queue as a snapshot records it (virtio-queue's `QueueState`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A device's transport as a snapshot records it: what its driver wrote and
/// where its queues stand.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TransportSnapshot {
    pub device_type: u32,
    /// The device's [`VirtioDevice::identity`].
    pub identity: String,
    pub status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// Wires the device at `base`: an ioeventfd per queue on the notify
    /// register (so a notification wakes the device's worker without a
    /// round trip through the vCPU thread) and an irqfd on `gsi`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        vm: &VmFd,
        mem: GuestMemoryHost,
        base: u64,
        gsi: u32,
    ) -> Result<Self> {
        let new_eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| Error::Device(format!("eventfd: {e}")))
        };
        let irq = new_eventfd()?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &max) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(max).map_err(|e| Error::Device(format!("queue of {max}: {e:?}")))?);
            let evt = new_eventfd()?;
            let notify = IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
            vm.register_ioevent(&evt, &notify, index as u32)
                .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
            queue_events.push(evt);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(IrqLine(irq))),
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: None,
        })
    }

    /// The transport's state; the caller holds the worker still (see
    /// [`MmioBus::freeze`]) by passing the queues it locked, if active.
    fn snapshot(&self, active_queues: Option<&[Queue]>) -> Result<TransportSnapshot> {
        let states: Vec<QueueState> = match active_queues {
            Some(queues) => queues.iter().map(|q| q.state()).collect(),
            None => self.queues.iter().map(|q| q.state()).collect(),
        };
        self.device.check_snapshot(&states).map_err(Error::Device)?;
        Ok(TransportSnapshot {
            device_type: self.device.device_type(),
            identity: self.device.identity(),
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.active.is_some(),
            queues: states.into_iter().map(QueueSnapshot::from).collect(),
        })
    }

    /// Puts back what [`snapshot`](Self::snapshot) recorded, on a transport
    /// just made for a device of the same type and identity; a device that
    /// was running starts its worker on the restored queues.
    pub fn restore(&mut self, saved: &TransportSnapshot) -> Result<()> {
        let what = format!(
            "device type {} `{}`",
            self.device.device_type(),
            self.device.identity()
        );
        if saved.device_type != self.device.device_type() || saved.identity != self.device.identity() {
            return Err(Error::Device(format!(
                "the snapshot has device type {} `{}` where this VM has {what}",
                saved.device_type, saved.identity
            )));
        }
        if saved.queues.len() != self.queues.len() {
            return Err(Error::Device(format!(
                "{what}: the snapshot has {} queues, the device {}",
                saved.queues.len(),
                self.queues.len()
            )));
        }
        for (q, state) in self.queues.iter_mut().zip(&saved.queues) {
            *q = Queue::try_from(QueueState::from(state))
                .map_err(|e| Error::Device(format!("{what}: a saved queue is invalid: {e:?}")))?;
        }
        self.status = saved.status;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.config_generation = saved.config_generation;
        self.interrupt.restore_status(saved.interrupt_status);
        if saved.activated {
            self.device.restored();
            self.activate();
            if self.active.is_none() {
                return Err(Error::Device(format!(
                    "{what}: could not be restarted from the snapshot"
                )));
            }
        }
        Ok(())
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue setup is only legal before DRIVER_OK.
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such.
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            other => {
                tracing::debug!(offset = other, "read of an unknown virtio-mmio register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register write of the wrong width"
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                // Features are frozen once the driver said FEATURES_OK.
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    match self.driver_features_select {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                // A size that does not fit 16 bits is invalid, not a smaller size.
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    q.set_size(size);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd takes this write; without it, do its job.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            other => tracing::debug!(offset = other, value, "write to an unknown virtio-mmio register"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        self.status = value;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features() | VIRTIO_F_VERSION_1;
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    device = self.device.device_type(),
                    accepted = format_args!("{:#x}", self.driver_features),
                    offered = format_args!("{offered:#x}"),
                    "the driver accepted features the device does not offer"
                );
                self.status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & ready == ready && self.active.is_none() {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let device = self.device.device_type();
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut events = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                tracing::warn!(device, queue = index, "the driver set up an invalid queue");
                self.status |= VIRTIO_CONFIG_S_FAILED;
                return;
            }
            // The transport keeps its own copy so QueueReady and friends still
            // read back what the driver wrote.
            queues.push(Queue::try_from(q.state()).expect("a valid queue converts"));
            match self.queue_events[index].try_clone() {
                Ok(e) => events.push(e),
                Err(e) => {
                    tracing::error!(device, "cloning a queue eventfd: {e}");
                    self.status |= VIRTIO_CONFIG_S_FAILED;
                    return;
                }
            }
        }
        let shared = SharedQueues::new(queues);
        let activation = Activation {
            mem: self.mem.clone(),
            queues: shared.clone(),
            queue_events: events,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => {
                tracing::debug!(device, "virtio device activated");
                self.active = Some(shared);
            }
            Err(e) => {
                tracing::error!(device, "activating virtio device: {e}");
                self.status |= VIRTIO_CONFIG_S_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        if self.active.take().is_some() {
            self.device.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.config_generation = 0;
        self.interrupt.acknowledge(u32::MAX);
    }
}

/// The guest-physical windows of the virtio-mmio devices.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<(u64, Mutex<MmioTransport>)>,
}

impl MmioBus {
    pub fn add(&mut self, base: u64, transport: MmioTransport) {
        self.devices.push((base, Mutex::new(transport)));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Mutex<MmioTransport>)> {
        self.devices
            .iter()
            .find(|(base, _)| addr >= *base && addr < base + MMIO_WINDOW)
            .map(|(base, t)| (addr - base, t))
    }

    /// Every device's transport state, taken with all their workers held
    /// still; `while_frozen` runs before they are let go, so what it saves
    /// (guest memory) matches the queues.
    pub fn freeze<T>(
        &self,
        while_frozen: impl FnOnce(&[TransportSnapshot]) -> Result<T>,
    ) -> Result<(Vec<TransportSnapshot>, T)> {
        let transports: Vec<_> = self
            .devices
            .iter()
            .map(|(_, t)| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let shared: Vec<Option<SharedQueues>> = transports.iter().map(|t| t.active.clone()).collect();
        let held: Vec<_> = shared
            .iter()
            .map(|s| s.as_ref().map(SharedQueues::lock))
            .collect();
        let snapshots = transports
            .iter()
            .zip(&held)
            .map(|(t, queues)| t.snapshot(queues.as_deref().map(Vec::as_slice)))
            .collect::<Result<Vec<_>>>()?;
        let saved = while_frozen(&snapshots)?;
        Ok((snapshots, saved))
    }

    /// Returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, t)) => {
                t.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, t)) => {
                t.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}
