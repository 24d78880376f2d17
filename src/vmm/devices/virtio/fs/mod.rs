//! virtio-fs: a host directory shared with the guest, which mounts it by its
//! tag. Requests are FUSE messages, answered by the passthrough filesystem
//! of fuse-backend-rs working in the directory. The guest is untrusted: every
//! chain is checked against guest memory by the transport before the FUSE
//! server reads it, and the server works in a confined view of the share
//! ([`confine`]).

pub mod confine;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::DescriptorChain;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub use confine::ShareFlags;

use super::worker::Worker;
use super::{drain_queue, read_config_bytes, Activation, VirtioDevice};
use crate::vmm::error::{Error, Result};
use crate::vmm::memory::GuestMemoryHost;

/// The longest tag the configuration space holds (virtio 1.2, 5.11.4).
pub const MAX_TAG_LEN: usize = 36;
/// The high-priority queue (FORGET, INTERRUPT) and one request queue.
const QUEUE_SIZES: [u16; 2] = [128, 256];
const REQUEST_QUEUES: u32 = 1;
/// How long the guest may trust names and attributes it looked up. Short,
/// because the host may change a shared directory at any time and a bind
/// mount must look live from both sides.
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the VMM is asked to share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The name the guest mounts it by (`mount -t virtiofs TAG dir`).
    pub tag: String,
    pub shared_dir: PathBuf,
    pub flags: ShareFlags,
}

impl FsConfig {
    /// Checks what can be checked before a VM exists.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let tag = &self.tag;
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
            return Err(format!(
                "tag {tag:?} must have 1 to {MAX_TAG_LEN} bytes and no NUL"
            ));
        }
        let dir = &self.shared_dir;
        if !dir.is_absolute() {
            return Err(format!("{} is not an absolute path", dir.display()));
        }
        if dir.to_str().is_none() {
            return Err(format!("{} is not valid UTF-8", dir.display()));
        }
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(format!("{} is not a directory", dir.display())),
            Err(e) => Err(format!("{}: {e}", dir.display())),
        }
    }
}

pub struct Fs {
    config: FsConfig,
    /// The shared directory, opened when the VM is made.
    dir: Arc<File>,
    config_space: Vec<u8>,
    worker: Option<Worker>,
}

impl Fs {
    pub fn new(config: &FsConfig) -> Result<Fs> {
        config
            .validate()
            .map_err(|reason| Error::Device(format!("virtio-fs {}: {reason}", config.tag)))?;
        let dir = confine::open_dir(&config.shared_dir).map_err(|e| {
            Error::Device(format!(
                "virtio-fs {}: opening {}: {e}",
                config.tag,
                config.shared_dir.display()
            ))
        })?;
        raise_open_file_limit();
        let mut config_space = vec![0u8; MAX_TAG_LEN + 4];
        config_space[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        config_space[MAX_TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        Ok(Fs {
            config: config.clone(),
            dir: Arc::new(dir),
            config_space,
            worker: None,
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> io::Result<()> {
        let (tag, flags, dir) = (self.config.tag.clone(), self.config.flags, self.dir.clone());
        let path = self.config.shared_dir.clone();
        self.worker = Some(Worker::spawn(format!("virtio-fs-{tag}"), move |stop| {
            // A share that cannot be served answers every request with EIO,
            // so the guest's mount fails and says so; a driver is not told
            // that a device it already set up has failed.
            let handler: Box<RequestHandler> =
                match confine::enter(&path, &dir, flags).and_then(FsServer::new) {
                    Ok(server) => Box::new(move |mem, chain| server.handle(mem, chain)),
                    Err(e) => {
                        tracing::error!(%tag, "virtio-fs: cannot serve {}: {e}", path.display());
                        Box::new(refuse)
                    }
                };
            if let Err(e) = serve(&handler, activation, &stop) {
                tracing::error!(%tag, "virtio-fs: {e}");
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn identity(&self) -> String {
        self.config.tag.clone()
    }

    fn check_snapshot(&self, queues: &[virtio_queue::QueueState]) -> std::result::Result<(), String> {
        // Once the guest has sent a request, its FUSE session (node ids,
        // open handles) lives in this VMM's passthrough and would not
        // exist in a restored one.
        if queues.iter().any(|q| q.next_avail != 0) {
            return Err(format!(
                "virtio-fs {}: the guest has used the share, and its FUSE session cannot be saved",
                self.config.tag
            ));
        }
        Ok(())
    }
}

/// A passthrough filesystem rooted at a directory, answering FUSE requests
/// read from descriptor chains.
pub struct FsServer {
    server: Server<Arc<PassthroughFs>>,
}

impl FsServer {
    /// Serves `dir` as the calling thread sees it, which [`confine::enter`]
    /// first makes a confined view. The root is opened at the guest's
    /// `FUSE_INIT`, on this thread.
    pub fn new(dir: &Path) -> io::Result<FsServer> {
        let root_dir = dir
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} is not valid UTF-8", dir.display())))?
            .to_owned();
        let fs = PassthroughFs::new(PassthroughConfig {
            root_dir,
            // The filesystem opens its root at FUSE_INIT, on the serving
            // thread, and negotiates no more than it was configured for.
            do_import: true,
            cache_policy: CachePolicy::Auto,
            entry_timeout: CACHE_TIMEOUT,
            attr_timeout: CACHE_TIMEOUT,
            ..Default::default()
        })?;
        Ok(FsServer {
            server: Server::new(Arc::new(fs)),
        })
    }

    /// Carries out the request in `chain`; returns how many bytes of reply
    /// it wrote there, 0 when there is no reply (FORGET) or the chain is
    /// malformed.
    pub fn handle(&self, mem: &GuestMemoryHost, chain: DescriptorChain<&GuestMemoryHost>) -> u32 {
        if let Some(unique) = unknown_opcode(mem, &chain) {
            return reply_error(mem, chain, unique, libc::ENOSYS);
        }
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("virtio-fs: unreadable request: {e}");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("virtio-fs: unwritable reply buffer: {e}");
                return 0;
            }
        };
        match self.server.handle_message(reader, writer.into(), None, None) {
            Ok(n) => u32::try_from(n).unwrap_or(0),
            Err(e) => {
                tracing::debug!("virtio-fs: request failed: {e}");
                0
            }
        }
    }
}

/// The `unique` of a request whose opcode is a gap in the FUSE numbering
/// (0, 7, 19). fuse-backend-rs converts opcodes below its maximum to its
/// `Opcode` enum unchecked, which for those values is undefined behaviour;
/// a guest must not be able to reach it.
fn unknown_opcode(mem: &GuestMemoryHost, chain: &DescriptorChain<&GuestMemoryHost>) -> Option<u64> {
    let header = request_header(mem, chain)?;
    matches!(header.opcode, 0 | 7 | 19).then_some(header.unique)
}

fn request_header(mem: &GuestMemoryHost, chain: &DescriptorChain<&GuestMemoryHost>) -> Option<InHeader> {
    chain.clone().reader::<()>(mem).ok()?.read_obj().ok()
}

/// Answers a request with just an error, as the server does.
fn reply_error(
    mem: &GuestMemoryHost,
    chain: DescriptorChain<&GuestMemoryHost>,
    unique: u64,
    errno: i32,
) -> u32 {
    let header = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    let written = VirtioFsWriter::new(mem, chain)
        .map_err(|e| e.to_string())
        .and_then(|mut w| w.write_obj(header).map_err(|e| e.to_string()));
    match written {
        Ok(()) => header.len,
        Err(e) => {
            tracing::warn!("virtio-fs: unwritable reply buffer: {e}");
            0
        }
    }
}

type RequestHandler = dyn Fn(&GuestMemoryHost, DescriptorChain<&GuestMemoryHost>) -> u32;

/// Answers a request with EIO.
fn refuse(mem: &GuestMemoryHost, chain: DescriptorChain<&GuestMemoryHost>) -> u32 {
    let unique = request_header(mem, &chain).map_or(0, |h| h.unique);
    reply_error(mem, chain, unique, libc::EIO)
}

fn serve(handler: &RequestHandler, activation: Activation, stop: &EventFd) -> io::Result<()> {
    let Activation {
        mem,
        queues,
        queue_events,
        interrupt,
    } = activation;
    let epoll = Epoll::new()?;
    let stop_token = queue_events.len() as u64;
    for (index, event) in queue_events.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            event.as_raw_fd(),
            EpollEvent::new(EventSet::IN, index as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, stop_token),
    )?;
    let mut events = vec![EpollEvent::default(); queue_events.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == stop_token {
                return Ok(());
            }
            let index = token as usize;
            let _ = queue_events[index].read();
            drain_queue(
                &mut queues.lock()[index],
                &mem,
                &interrupt,
                "virtio-fs",
                |chain| handler(&mem, chain),
            );
        }
    }
}

/// The passthrough filesystem holds a descriptor for every inode the guest
/// has looked up, so a large root filesystem needs far more than the usual
/// soft limit of 1024.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur >= limit.rlim_max {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads only the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::debug!("raising the open file limit: {}", io::Error::last_os_error());
    }
}
