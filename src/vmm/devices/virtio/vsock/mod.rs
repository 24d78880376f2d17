//! virtio-vsock whose host side is a Unix socket (see [`muxer`]); no vhost
//! kernel module is involved.

pub mod muxer;
pub mod packet;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use super::{read_config_bytes, Activation, VirtioDevice};
use crate::vmm::error::{Error, Result};
use crate::vmm::memory::GuestMemoryHost;
use muxer::Muxer;
use packet::{Header, HEADER_LEN, MAX_PAYLOAD};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const STOP_TOKEN: u64 = 3;
/// CIDs 0–2 are reserved (hypervisor, local, host).
pub const MIN_GUEST_CID: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u32,
    /// The Unix socket the host connects to; `<path>_<port>` are where guest
    /// connections to host ports arrive.
    pub uds_path: PathBuf,
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    config: [u8; 8],
    worker: Option<Worker>,
    /// Restored from a snapshot: the guest's connections are to a host side
    /// that is gone, and it must re-read its CID.
    announce_reset: bool,
}

impl Vsock {
    /// Binds the host socket; it exists (and is removed again) with the device.
    pub fn new(config: &VsockConfig) -> Result<Vsock> {
        let err =
            |reason: String| Error::Device(format!("vsock socket {}: {reason}", config.uds_path.display()));
        if config.guest_cid < MIN_GUEST_CID {
            return Err(err(format!(
                "guest CID {} is reserved (use {MIN_GUEST_CID} or more)",
                config.guest_cid
            )));
        }
        let listener = UnixListener::bind(&config.uds_path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => err("already exists".into()),
            _ => err(e.to_string()),
        })?;
        Ok(Vsock {
            guest_cid: u64::from(config.guest_cid),
            uds_path: config.uds_path.clone(),
            listener,
            config: u64::from(config.guest_cid).to_le_bytes(),
            worker: None,
            announce_reset: false,
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn identity(&self) -> String {
        "vsock".into()
    }

    fn restored(&mut self) {
        self.announce_reset = true;
    }

    fn activate(&mut self, activation: Activation) -> io::Result<()> {
        let muxer = Muxer::new(self.guest_cid, &self.uds_path, self.listener.try_clone()?)?;
        let announce_reset = std::mem::take(&mut self.announce_reset);
        self.worker = Some(Worker::spawn("virtio-vsock".into(), move |stop| {
            if announce_reset {
                announce_transport_reset(&activation);
            }
            if let Err(e) = serve(muxer, activation, stop) {
                tracing::error!("virtio-vsock worker: {e}");
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        // The connections go with the worker's muxer: a reset driver has
        // forgotten them too.
        self.worker = None;
    }
}

fn serve(mut muxer: Muxer, activation: Activation, stop: EventFd) -> io::Result<()> {
    let Activation {
        mem,
        queues: shared,
        queue_events,
        interrupt,
    } = activation;
    for (index, evt) in queue_events.iter().enumerate() {
        muxer.epoll().ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, index as u64),
        )?;
    }
    muxer.epoll().ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    let mut events = vec![EpollEvent::default(); 32];
    // TX packets left in the ring while the muxer's reply backlog was full.
    let mut tx_waiting = false;
    let mut payload = vec![0u8; MAX_PAYLOAD as usize];
    let mut packet = Vec::with_capacity(HEADER_LEN + MAX_PAYLOAD as usize);
    loop {
        // A periodic wake-up expires connections the guest never answered.
        let n = match muxer.epoll().wait(1000, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut tx_used = false;
        for ev in &events[..n] {
            match ev.data() {
                STOP_TOKEN => return Ok(()),
                t if t == RX as u64 || t == EVENT as u64 => {
                    let _ = queue_events[t as usize].read();
                }
                t if t == TX as u64 => {
                    let _ = queue_events[TX].read();
                    tx_waiting = true;
                }
                token => muxer.handle_event(token, ev.event_set()),
            }
        }
        muxer.expire_connecting(std::time::Instant::now());
        let mut queues = shared.lock();
        if tx_waiting {
            let (used, done) = drain_tx(&mut muxer, &mem, &mut queues[TX], &mut payload);
            tx_used |= used;
            tx_waiting = !done;
        }
        if tx_used {
            interrupt.used_buffers(&mut queues[TX], &mem);
        }
        if fill_rx(&mut muxer, &mem, &mut queues[RX], &mut packet) {
            interrupt.used_buffers(&mut queues[RX], &mem);
        }
        // Replies went out, so packets left waiting can be taken now.
        if tx_waiting && muxer.accepts_guest_packets() {
            let (used, done) = drain_tx(&mut muxer, &mem, &mut queues[TX], &mut payload);
            tx_waiting = !done;
            if used {
                interrupt.used_buffers(&mut queues[TX], &mem);
            }
        }
    }
}

/// Tells the guest driver its transport was reset (virtio 1.2 §5.10.6.6):
/// it re-reads its CID from the config space and resets every socket, so
/// the agent's connection to the VMM that took the snapshot ends and it
/// connects again to this one.
fn announce_transport_reset(activation: &Activation) {
    const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
    let mem = &activation.mem;
    let mut queues = activation.queues.lock();
    let queue = &mut queues[EVENT];
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        tracing::warn!("vsock: the guest left no event buffer for the transport reset");
        return;
    };
    let head = chain.head_index();
    let id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
    let written = match chain.writer::<()>(mem).map(|mut w| w.write_all(&id)) {
        Ok(Ok(())) => id.len() as u32,
        _ => {
            tracing::warn!("vsock: an event buffer too small or outside guest memory");
            0
        }
    };
    let _ = queue.add_used(mem, head, written);
    activation.interrupt.used_buffers(queue, mem);
    tracing::debug!("vsock: transport reset announced");
}

/// Hands the packets the guest queued to the muxer, as long as it takes them.
/// Returns whether any was used, and whether the ring was emptied (rather
/// than left for when the muxer's replies have drained).
fn drain_tx(muxer: &mut Muxer, mem: &GuestMemoryHost, queue: &mut Queue, payload: &mut [u8]) -> (bool, bool) {
    let mut used = false;
    loop {
        let _ = queue.disable_notification(mem);
        while muxer.accepts_guest_packets() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match chain.reader::<()>(mem) {
                Ok(mut reader) => {
                    let mut raw = [0u8; HEADER_LEN];
                    if reader.read_exact(&mut raw).is_ok() {
                        let hdr = Header::decode(&raw);
                        let len = hdr.len.min(MAX_PAYLOAD) as usize;
                        if hdr.len <= MAX_PAYLOAD && reader.read_exact(&mut payload[..len]).is_ok() {
                            muxer.handle_guest_packet(&hdr, &payload[..len]);
                        } else {
                            tracing::warn!(
                                len = hdr.len,
                                "vsock: a TX packet shorter or longer than it says"
                            );
                        }
                    } else {
                        tracing::warn!("vsock: a TX chain without a header");
                    }
                }
                Err(e) => tracing::warn!("vsock: a TX chain outside guest memory: {e:?}"),
            }
            let _ = queue.add_used(mem, head, 0);
            used = true;
        }
        if !muxer.accepts_guest_packets() {
            let _ = queue.enable_notification(mem);
            return (used, false);
        }
        if !matches!(queue.enable_notification(mem), Ok(true)) {
            return (used, true);
        }
    }
}

/// Moves packets for the guest into its RX buffers while both exist.
fn fill_rx(muxer: &mut Muxer, mem: &GuestMemoryHost, queue: &mut Queue, packet: &mut Vec<u8>) -> bool {
    let mut used = false;
    while muxer.has_packet_for_guest() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Out of RX buffers: the guest's next RX notification resumes this.
            break;
        };
        let head = chain.head_index();
        let written = match chain.writer::<()>(mem) {
            Ok(mut writer) => {
                if muxer.next_packet_for_guest(writer.available_bytes(), packet)
                    && writer.write_all(packet).is_ok()
                {
                    packet.len() as u32
                } else {
                    0
                }
            }
            Err(e) => {
                tracing::warn!("vsock: an RX chain outside guest memory: {e:?}");
                0
            }
        };
        let _ = queue.add_used(mem, head, written);
        used = true;
    }
    used
}
