//! virtio-blk backed by a host file: reads, writes (unless read-only),
//! flush and the device ID.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use super::{drain_queue, read_config_bytes, Activation, Interrupt, SharedQueues, VirtioDevice};
use crate::vmm::error::{Error, Result};
use crate::vmm::memory::GuestMemoryHost;

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// The request header the driver puts first: type, reserved, sector.
const REQUEST_HEADER_LEN: usize = 16;
/// How much of a request is staged in host memory at a time.
const CHUNK: usize = 128 << 10;

/// What the VMM is asked to attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Reported to the guest as the device's serial (`/sys/block/vdX/serial`).
    pub id: String,
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; 8],
    worker: Option<Worker>,
}

impl Block {
    pub fn open(config: &BlockConfig) -> Result<Block> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|e| block_error(&config.path, format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| block_error(&config.path, e.to_string()))?;
        if !meta.is_file() {
            return Err(block_error(&config.path, "is not a regular file".into()));
        }
        // A partial last sector cannot be addressed; the guest sees whole sectors.
        let capacity = meta.len() / SECTOR_SIZE;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = config.id.len().min(id.len());
        id[..n].copy_from_slice(&config.id.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only: config.read_only,
            capacity,
            id,
            config: capacity.to_le_bytes(),
            worker: None,
        })
    }
}

fn block_error(path: &Path, reason: String) -> Error {
    Error::Device(format!("block device {}: {reason}", path.display()))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
        ro | 1 << VIRTIO_BLK_F_FLUSH
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> io::Result<()> {
        let Activation {
            mem,
            queues,
            mut queue_events,
            interrupt,
        } = activation;
        let backend = Backend {
            file: self.file.try_clone()?,
            read_only: self.read_only,
            capacity_bytes: self.capacity * SECTOR_SIZE,
            id: self.id,
        };
        let event = queue_events.remove(0);
        self.worker = Some(Worker::spawn("virtio-blk".into(), move |stop| {
            if let Err(e) = serve(backend, mem, queues, event, interrupt, stop) {
                tracing::error!("virtio-blk worker: {e}");
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn identity(&self) -> String {
        String::from_utf8_lossy(&self.id)
            .trim_end_matches('\0')
            .to_owned()
    }
}

struct Backend {
    file: File,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

fn serve(
    mut backend: Backend,
    mem: GuestMemoryHost,
    queues: SharedQueues,
    event: EventFd,
    interrupt: std::sync::Arc<Interrupt>,
    stop: EventFd,
) -> io::Result<()> {
    const QUEUE: u64 = 0;
    const STOP: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        event_fd(&event),
        EpollEvent::new(EventSet::IN, QUEUE),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        event_fd(&stop),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    let mut events = vec![EpollEvent::default(); 2];
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP => return Ok(()),
                _ => {
                    let _ = event.read();
                    process_queue(&mut backend, &mem, &mut queues.lock()[0], &interrupt, &mut buf);
                }
            }
        }
    }
}

fn event_fd(evt: &EventFd) -> i32 {
    use std::os::fd::AsRawFd;
    evt.as_raw_fd()
}

fn process_queue(
    backend: &mut Backend,
    mem: &GuestMemoryHost,
    queue: &mut Queue,
    interrupt: &Interrupt,
    buf: &mut [u8],
) {
    drain_queue(queue, mem, interrupt, "virtio-blk", |chain| {
        handle_request(backend, mem, chain, buf)
    });
}

/// Carries out one request; returns how many bytes it wrote into the
/// chain (data plus the status byte), 0 for a chain too malformed to answer.
fn handle_request(
    backend: &mut Backend,
    mem: &GuestMemoryHost,
    chain: DescriptorChain<&GuestMemoryHost>,
    buf: &mut [u8],
) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader::<()>(mem), chain.writer::<()>(mem)) else {
        tracing::warn!("virtio-blk: a descriptor chain points outside guest memory");
        return 0;
    };
    let mut header = [0u8; REQUEST_HEADER_LEN];
    let data_len = writer.available_bytes().saturating_sub(1);
    if reader.read_exact(&mut header).is_err() || writer.available_bytes() == 0 {
        tracing::warn!("virtio-blk: a request without header or status byte");
        return 0;
    }
    let Ok(mut status_writer) = writer.split_at(data_len) else {
        return 0;
    };
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let result = match kind {
        VIRTIO_BLK_T_IN => backend.read(sector, &mut writer, buf),
        VIRTIO_BLK_T_OUT => backend.write(sector, &mut reader, buf),
        VIRTIO_BLK_T_FLUSH => backend.file.sync_data().map_err(|e| e.to_string()),
        VIRTIO_BLK_T_GET_ID => {
            let n = writer.available_bytes().min(backend.id.len());
            writer.write_all(&backend.id[..n]).map_err(|e| e.to_string())
        }
        other => Err(format!("unsupported request type {other}")),
    };
    let status = match (&result, kind) {
        (Ok(()), _) => VIRTIO_BLK_S_OK,
        (Err(_), VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID) => {
            VIRTIO_BLK_S_IOERR
        }
        (Err(_), _) => VIRTIO_BLK_S_UNSUPP,
    };
    if let Err(e) = &result {
        tracing::debug!(kind, sector, "virtio-blk request failed: {e}");
    }
    let _ = status_writer.write_all(&[status as u8]);
    (writer.bytes_written() + 1) as u32
}

impl Backend {
    /// The byte range a request of `len` bytes at `sector` covers, if it lies
    /// inside the disk.
    fn range(&self, sector: u64, len: usize) -> std::result::Result<u64, String> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|s| {
                s.checked_add(len as u64)
                    .is_some_and(|end| end <= self.capacity_bytes)
            })
            .ok_or_else(|| format!("{len} bytes at sector {sector} lie past the end of the disk"))?;
        Ok(start)
    }

    fn read(&self, sector: u64, to: &mut Writer<'_>, buf: &mut [u8]) -> std::result::Result<(), String> {
        let total = to.available_bytes();
        let mut offset = self.range(sector, total)?;
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| e.to_string())?;
            to.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn write(&self, sector: u64, from: &mut Reader<'_>, buf: &mut [u8]) -> std::result::Result<(), String> {
        if self.read_only {
            return Err("write to a read-only disk".into());
        }
        let mut offset = self.range(sector, 0)?;
        loop {
            let n = from.read(buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            self.range(sector, (offset - sector * SECTOR_SIZE) as usize + n)?;
            self.file
                .write_all_at(&buf[..n], offset)
                .map_err(|e| e.to_string())?;
            offset += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Disk {
        _dir: tempfile::TempDir,
        path: PathBuf,
        backend: Backend,
        mem: GuestMemoryHost,
    }

    fn disk(read_only: bool) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xaau8; 8 * SECTOR_SIZE as usize]).unwrap();
        let block = Block::open(&BlockConfig {
            path: path.clone(),
            read_only,
            id: "test-disk".into(),
        })
        .unwrap();
        let backend = Backend {
            file: block.file.try_clone().unwrap(),
            read_only,
            capacity_bytes: block.capacity * SECTOR_SIZE,
            id: block.id,
        };
        let mem = crate::vmm::memory::allocate(4 << 20).unwrap();
        Disk {
            _dir: dir,
            path,
            backend,
            mem,
        }
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Runs one request; returns the used length and the status byte.
    fn request(d: &mut Disk, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u32, u8) {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        d.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        let mut descs = vec![desc(HEADER, REQUEST_HEADER_LEN as u32, false)];
        if let Some((len, writable)) = data {
            descs.push(desc(DATA, len, writable));
        }
        descs.push(desc(STATUS, 1, true));
        let queue = MockSplitQueue::new(&d.mem, 16);
        let chain = queue.build_desc_chain(&descs).unwrap();
        let mut buf = vec![0u8; CHUNK];
        let used = handle_request(&mut d.backend, &d.mem, chain, &mut buf);
        (used, d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    #[test]
    fn writes_reach_the_file_and_read_back() {
        let mut d = disk(false);
        d.mem.write_slice(&[7u8; 1024], GuestAddress(DATA)).unwrap();
        let (_, status) = request(&mut d, VIRTIO_BLK_T_OUT, 2, Some((1024, false)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let file = std::fs::read(&d.path).unwrap();
        assert!(file[1024..2048].iter().all(|&b| b == 7));
        assert!(file[..1024].iter().all(|&b| b == 0xaa));

        d.mem.write_slice(&[0u8; 1536], GuestAddress(DATA)).unwrap();
        let (used, status) = request(&mut d, VIRTIO_BLK_T_IN, 1, Some((1536, true)));
        assert_eq!((used, status), (1537, VIRTIO_BLK_S_OK as u8));
        let mut back = [0u8; 1536];
        d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0xaa));
        assert!(back[512..].iter().all(|&b| b == 7));

        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_FLUSH, 0, None).1,
            VIRTIO_BLK_S_OK as u8
        );
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let mut d = disk(true);
        d.mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        let (_, status) = request(&mut d, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert!(std::fs::read(&d.path).unwrap().iter().all(|&b| b == 0xaa));
        assert_ne!(d_features(true) & (1 << VIRTIO_BLK_F_RO), 0);
    }

    fn d_features(read_only: bool) -> u64 {
        let d = disk(read_only);
        Block::open(&BlockConfig {
            path: d.path.clone(),
            read_only,
            id: String::new(),
        })
        .unwrap()
        .features()
    }

    #[test]
    fn requests_past_the_end_fail_without_touching_the_file() {
        let mut d = disk(false);
        let (_, status) = request(&mut d, VIRTIO_BLK_T_IN, 7, Some((1024, true)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        let (_, status) = request(&mut d, VIRTIO_BLK_T_OUT, u64::MAX / 256, Some((512, false)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::metadata(&d.path).unwrap().len(), 8 * SECTOR_SIZE);
    }

    #[test]
    fn device_id_and_unknown_requests() {
        let mut d = disk(false);
        let (_, status) = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, Some((VIRTIO_BLK_ID_BYTES, true)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 9];
        d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-disk");
        assert_eq!(request(&mut d, 99, 0, None).1, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn a_chain_without_a_status_byte_is_not_answered() {
        let mut d = disk(false);
        let queue = MockSplitQueue::new(&d.mem, 16);
        let chain = queue
            .build_desc_chain(&[desc(HEADER, REQUEST_HEADER_LEN as u32, false)])
            .unwrap();
        let mut buf = vec![0u8; CHUNK];
        assert_eq!(handle_request(&mut d.backend, &d.mem, chain, &mut buf), 0);
    }
}
