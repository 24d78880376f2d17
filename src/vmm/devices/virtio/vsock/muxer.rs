//! The host end of the guest's vsock connections, as Unix sockets.
//!
//! The convention is Firecracker's documented one, so tools written for it
//! work unchanged:
//! - the host connects to the device's socket and writes `CONNECT <port>\n`;
//!   once the guest accepts, it reads `OK <host port>\n` and then the stream;
//! - a guest connection to host port P is a connection to `<socket>_P`.
//!
//! Flow control is vsock's credit scheme: each side tells the other how much
//! it may buffer (`buf_alloc`) and how much it has consumed (`fwd_cnt`), so
//! neither side ever holds more than the other allowed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;

/// How many bytes of guest data one connection may have waiting for the
/// host socket: the `buf_alloc` the guest is told.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Announce consumed credit once this much has been forwarded since the last
/// announcement, so a guest that filled the window gets going again.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side local ports for host-initiated connections start here, well
/// away from the ports guests listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll tokens below this are the device's own (queues, stop); above it,
/// `token - FD_TOKEN_BASE` is a socket fd.
pub const FD_TOKEN_BASE: u64 = 16;
const LISTENER_TOKEN: u64 = 8;
/// Connections (established, connecting, or host sockets still sending
/// `CONNECT`) one guest may hold; Firecracker's limit. Beyond it new ones are
/// refused, so a guest cannot exhaust the host's fds.
pub const MAX_CONNECTIONS: usize = 1023;
/// Packets without payload waiting for RX buffers. A guest that floods TX
/// while posting no RX buffers stops being served TX at this depth instead
/// of growing the queue.
pub const MAX_CONTROL_BACKLOG: usize = 1024;
/// How long a guest may take to answer a host-initiated REQUEST. Generous:
/// on a host that emulates guest kernel code, the answer is slow too.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection is identified by (host-side port, guest-side port).
type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent at this time, waiting for the guest's RESPONSE.
    Connecting(Instant),
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest data (or our `OK` line) not yet accepted by the host socket.
    to_host: VecDeque<u8>,
    /// How many bytes at the front of `to_host` are ours (the `OK` line),
    /// not the guest's: they must not count as forwarded credit.
    own_bytes: usize,
    /// Guest payload bytes forwarded to the host socket, and the count last
    /// told to the guest.
    fwd_cnt: u32,
    announced_fwd_cnt: u32,
    /// Host bytes read but not yet sent to the guest.
    staged: Vec<u8>,
    /// Host payload bytes sent to the guest, and what the guest last said
    /// about its buffer.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Edge-triggered readiness not yet consumed.
    host_readable: bool,
    /// The host ended its writing half; SHUTDOWN(SEND) still to send / sent.
    host_eof: bool,
    host_eof_sent: bool,
    /// The guest will send no more; shut the host's reading half once
    /// `to_host` is drained.
    guest_done_sending: bool,
    /// The guest will read no more.
    guest_done_receiving: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, peer: &Header) -> Conn {
        Conn {
            stream,
            state,
            to_host: VecDeque::new(),
            own_bytes: 0,
            fwd_cnt: 0,
            announced_fwd_cnt: 0,
            staged: Vec::new(),
            tx_cnt: 0,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            host_readable: false,
            host_eof: false,
            host_eof_sent: false,
            guest_done_sending: false,
            guest_done_receiving: false,
        }
    }

    /// How many more bytes the guest can take beyond what is already staged.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc
            .saturating_sub(in_flight)
            .saturating_sub(self.staged.len() as u32)
    }

    /// Writes what the host socket takes now. `Err` means the host side is gone.
    fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    let own = n.min(self.own_bytes);
                    self.own_bytes -= own;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - own) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.to_host.is_empty() && self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A packet for the guest without payload, its header built when it is sent
/// so it carries the connection's latest credit.
#[derive(Debug)]
enum Control {
    Conn {
        key: Key,
        op: u16,
        flags: u32,
    },
    /// A reset for something the muxer does not know.
    Reset(Header),
}

/// A host socket that has connected but not yet finished its `CONNECT` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingHost>,
    control: VecDeque<Control>,
    next_local_port: u32,
    scratch: Vec<u8>,
    listener_paused: bool,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0u8; MAX_PAYLOAD as usize],
            listener_paused: false,
        })
    }

    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Handles readiness of one of the muxer's own fds (token ≥ LISTENER_TOKEN).
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host_connections();
            return;
        }
        let fd = (token - FD_TOKEN_BASE) as RawFd;
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else { return };
        let mut gone = false;
        if let Some(conn) = self.conns.get_mut(&key) {
            if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            {
                conn.host_readable = true;
            }
            if events.contains(EventSet::OUT) {
                gone = conn.flush_to_host().is_err();
                // A guest that closed its socket waits for our RST, which
                // waited for its last bytes to reach the host.
                gone |= conn.guest_done_sending && conn.guest_done_receiving && conn.to_host.is_empty();
            }
        }
        if gone {
            self.reset(key);
        } else {
            self.maybe_announce_credit(key);
        }
    }

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(EventSet::IN, FD_TOKEN_BASE + fd as u64);
                    if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                        self.pending.insert(
                            fd,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of fds, typically. The listener stays readable, so
                    // listening stops until a connection goes away, instead
                    // of spinning on the same error.
                    tracing::warn!("vsock: accepting a host connection: {e}; pausing the listener");
                    self.pause_listener();
                    return;
                }
            }
        }
    }

    fn pause_listener(&mut self) {
        if !self.listener_paused {
            let fd = self.listener.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.listener_paused = true;
        }
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
            if self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
                .is_ok()
            {
                self.listener_paused = false;
            }
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing after the newline (the stream itself) is consumed here.
        let outcome = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err("closed before sending CONNECT".to_owned()),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err("CONNECT line too long".to_owned()),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let port = match outcome {
            Ok(false) => return,
            Ok(true) => parse_connect(&p.line),
            Err(e) => Err(e),
        };
        let p = self.pending.remove(&fd).expect("present above");
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let port = match port {
            Ok(port) => port,
            Err(e) => {
                tracing::debug!("vsock: dropping a host connection: {e}");
                return;
            }
        };
        let local = self.allocate_local_port();
        let key = (local, port);
        // The guest's credit is unknown until it answers; none until then.
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing another from the host");
            return;
        }
        let conn = Conn::new(p.stream, State::Connecting(Instant::now()), &Header::default());
        if self.register(key, conn).is_ok() {
            self.control.push_back(Control::Conn {
                key,
                op: OP_REQUEST,
                flags: 0,
            });
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    fn register(&mut self, key: Key, conn: Conn) -> io::Result<()> {
        let fd = conn.stream.as_raw_fd();
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, FD_TOKEN_BASE + fd as u64),
        )?;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        Ok(())
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
        }
        self.resume_listener();
    }

    /// Drops a connection and tells the guest.
    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.control
            .push_back(Control::Reset(reset_header(self.guest_cid, key.0, key.1)));
    }

    /// One packet the guest put on the TX queue.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        tracing::trace!(?hdr, "vsock: from the guest");
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.kind != TYPE_STREAM {
            tracing::debug!(
                ?hdr,
                "vsock: packet not from this guest to the host, or not a stream"
            );
            if hdr.op != OP_RST {
                self.reset_unknown(hdr);
            }
            return;
        }
        if hdr.op == OP_REQUEST {
            self.guest_connects(hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.reset_unknown(hdr);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE if matches!(conn.state, State::Connecting(_)) => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                conn.own_bytes += ok.len();
                conn.to_host.extend(ok.as_bytes());
                if conn.flush_to_host().is_err() {
                    self.reset(key);
                    return;
                }
                // Linux takes the peer's credit from the REQUEST into the
                // listening socket, not the accepted one, which starts out
                // believing the host can take nothing: tell it.
                self.control.push_back(Control::Conn {
                    key,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                });
            }
            OP_RW if conn.state == State::Established => {
                if conn.to_host.len() + payload.len() > CONN_BUF_ALLOC as usize {
                    tracing::warn!(?key, "vsock: the guest sent more than its credit; resetting");
                    self.reset(key);
                    return;
                }
                conn.to_host.extend(payload);
                if conn.flush_to_host().is_err() {
                    self.reset(key);
                    return;
                }
                self.maybe_announce_credit(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if !self.control_pending_for(key) {
                    self.control.push_back(Control::Conn {
                        key,
                        op: OP_CREDIT_UPDATE,
                        flags: 0,
                    });
                }
            }
            OP_SHUTDOWN => {
                conn.guest_done_sending |= hdr.flags & SHUTDOWN_SEND != 0;
                conn.guest_done_receiving |= hdr.flags & SHUTDOWN_RCV != 0;
                if conn.guest_done_receiving {
                    conn.staged.clear();
                    let _ = conn.stream.shutdown(std::net::Shutdown::Read);
                }
                let flushed = conn.flush_to_host();
                let both = conn.guest_done_sending && conn.guest_done_receiving;
                // A guest that closed its socket waits for our RST; give it once
                // its last bytes are out (or can never be).
                if flushed.is_err() || (both && conn.to_host.is_empty()) {
                    self.reset(key);
                }
            }
            OP_RST => {
                // Whatever the host socket still takes now is delivered; a
                // reset connection cannot wait for a slow reader.
                let _ = conn.flush_to_host();
                self.remove(key);
            }
            op => {
                tracing::debug!(?key, op, state = ?conn.state, "vsock: unexpected packet; resetting");
                self.reset(key);
            }
        }
    }

    fn guest_connects(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.reset_unknown(hdr);
            return;
        }
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing another from the guest");
            self.reset_unknown(hdr);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), hdr.dst_port));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = %path.display(), "vsock: guest connection refused: {e}");
                self.reset_unknown(hdr);
                return;
            }
        };
        if self
            .register(key, Conn::new(stream, State::Established, hdr))
            .is_ok()
        {
            self.control.push_back(Control::Conn {
                key,
                op: OP_RESPONSE,
                flags: 0,
            });
        }
    }

    fn reset_unknown(&mut self, hdr: &Header) {
        self.control.push_back(Control::Reset(reset_header(
            hdr.src_cid,
            hdr.dst_port,
            hdr.src_port,
        )));
    }

    fn maybe_announce_credit(&mut self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            let unannounced = conn.fwd_cnt.wrapping_sub(conn.announced_fwd_cnt);
            // A guest only stalls once all of its window is unannounced, so
            // announcing at a quarter of it never leaves one waiting.
            if unannounced >= CREDIT_UPDATE_THRESHOLD && !self.control_pending_for(key) {
                self.control.push_back(Control::Conn {
                    key,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                });
            }
        }
    }

    fn control_pending_for(&self, key: Key) -> bool {
        self.control
            .iter()
            .any(|c| matches!(c, Control::Conn { key: k, op: OP_CREDIT_UPDATE, .. } if *k == key))
    }

    /// Reads host data for connections that can send it, up to their credit.
    fn stage_host_data(&mut self) {
        let mut ended = Vec::new();
        for (&key, conn) in self.conns.iter_mut() {
            if conn.state != State::Established
                || !conn.host_readable
                || conn.host_eof
                || conn.guest_done_receiving
                || !conn.staged.is_empty()
            {
                continue;
            }
            let want = conn.credit().min(MAX_PAYLOAD) as usize;
            if want == 0 {
                continue;
            }
            match conn.stream.read(&mut self.scratch[..want]) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.host_readable = false;
                }
                Ok(n) => conn.staged.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.host_readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => ended.push(key),
            }
            if conn.host_eof && conn.staged.is_empty() && !conn.host_eof_sent {
                conn.host_eof_sent = true;
                self.control.push_back(Control::Conn {
                    key,
                    op: OP_SHUTDOWN,
                    flags: SHUTDOWN_SEND,
                });
            }
        }
        for key in ended {
            self.reset(key);
        }
    }

    /// Whether a packet is waiting for an RX buffer.
    pub fn has_packet_for_guest(&mut self) -> bool {
        self.stage_host_data();
        !self.control.is_empty() || self.conns.values().any(|c| !c.staged.is_empty())
    }

    /// Puts the next packet for the guest into `out` (header and payload),
    /// at most `capacity` bytes; false when there is none or it does not fit.
    pub fn next_packet_for_guest(&mut self, capacity: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        if capacity < HEADER_LEN || !self.has_packet_for_guest() {
            return false;
        }
        while let Some(ctl) = self.control.pop_front() {
            let hdr = match ctl {
                Control::Reset(h) => h,
                Control::Conn { key, op, flags } => match self.conns.get_mut(&key) {
                    Some(conn) => {
                        conn.announced_fwd_cnt = conn.fwd_cnt;
                        header_for(self.guest_cid, key, conn, op, flags, 0)
                    }
                    // Gone since it was queued (e.g. reset); a RST followed.
                    None => continue,
                },
            };
            tracing::trace!(?hdr, "vsock: to the guest");
            out.extend_from_slice(&hdr.encode());
            return true;
        }
        let Some((&key, conn)) = self.conns.iter_mut().find(|(_, c)| !c.staged.is_empty()) else {
            return false;
        };
        let n = conn.staged.len().min(capacity - HEADER_LEN);
        conn.announced_fwd_cnt = conn.fwd_cnt;
        let hdr = header_for(self.guest_cid, key, conn, OP_RW, 0, n as u32);
        tracing::trace!(?hdr, "vsock: to the guest");
        out.extend_from_slice(&hdr.encode());
        out.extend(conn.staged.drain(..n));
        conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
        if conn.staged.is_empty() && conn.host_eof && !conn.host_eof_sent {
            conn.host_eof_sent = true;
            self.control.push_back(Control::Conn {
                key,
                op: OP_SHUTDOWN,
                flags: SHUTDOWN_SEND,
            });
        }
        true
    }

    /// Whether the guest's TX packets may be taken now: not while the replies
    /// they could cause have nowhere to go.
    pub fn accepts_guest_packets(&self) -> bool {
        self.control.len() < MAX_CONTROL_BACKLOG
    }

    /// Resets host-initiated connections the guest never answered.
    pub fn expire_connecting(&mut self, now: Instant) {
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(
                |(_, c)| matches!(c.state, State::Connecting(t) if now.duration_since(t) >= CONNECT_TIMEOUT),
            )
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            tracing::debug!(?key, "vsock: the guest did not answer a connection in time");
            self.reset(key);
        }
    }

    /// Open connections, for tests and diagnostics.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

/// A RST from host port `host_port` to `guest_port` of `guest_cid`.
fn reset_header(guest_cid: u64, host_port: u32, guest_port: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: host_port,
        dst_port: guest_port,
        kind: TYPE_STREAM,
        op: OP_RST,
        ..Header::default()
    }
}

fn header_for(guest_cid: u64, key: Key, conn: &Conn, op: u16, flags: u32, len: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.0,
        dst_port: key.1,
        len,
        kind: TYPE_STREAM,
        op,
        flags,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

/// Connects without ever blocking the device's thread: a Unix socket whose
/// listener's backlog is full answers EAGAIN at once instead of waiting.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let ret = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len as libc::socklen_t) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let line = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text".to_owned())?;
    let line = line.trim_end_matches('\r');
    line.strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GUEST: u64 = 3;

    fn muxer(dir: &Path) -> (Muxer, PathBuf) {
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (Muxer::new(GUEST, &path, listener).unwrap(), path)
    }

    /// Runs the muxer's own epoll once, as the device loop does.
    fn pump(m: &mut Muxer) {
        let mut events = vec![EpollEvent::default(); 16];
        let n = m.epoll.wait(50, &mut events).unwrap();
        for ev in &events[..n] {
            m.handle_event(ev.data(), ev.event_set());
        }
    }

    fn take(m: &mut Muxer) -> Option<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        m.next_packet_for_guest(4096 + HEADER_LEN, &mut out).then(|| {
            let hdr = Header::decode(out[..HEADER_LEN].try_into().unwrap());
            (hdr, out[HEADER_LEN..].to_vec())
        })
    }

    fn guest(op: u16, guest_port: u32, host_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 64 << 10,
            ..Header::default()
        }
    }

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT x").is_err());
        assert!(parse_connect(b"HELLO 1").is_err());
    }

    #[test]
    fn host_initiated_connection_gets_ok_and_carries_data_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = muxer(dir.path());
        let mut host = UnixStream::connect(&path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(b"CONNECT 1025\n").unwrap();
        pump(&mut m);
        pump(&mut m);
        let (req, _) = take(&mut m).expect("a REQUEST for the guest");
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1025, GUEST));
        let local = req.src_port;
        m.handle_guest_packet(&guest(OP_RESPONSE, 1025, local, 0), &[]);
        let mut line = [0u8; 64];
        let n = host.read(&mut line).unwrap();
        assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {local}\n"));
        let (update, _) = take(&mut m).expect("a credit update for the accepted socket");
        // Our own OK line is not guest data: nothing is forwarded yet.
        assert_eq!(
            (update.op, update.buf_alloc, update.fwd_cnt),
            (OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 0)
        );

        m.handle_guest_packet(&guest(OP_RW, 1025, local, 5), b"hello");
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"hello");
        assert_eq!(m.conns[&(local, 1025)].fwd_cnt, 5);

        host.write_all(b"world").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        pump(&mut m);
        let mut got = Vec::new();
        let mut ops = Vec::new();
        while let Some((h, data)) = take(&mut m) {
            ops.push(h.op);
            got.extend(data);
        }
        assert_eq!(got, b"world");
        assert!(ops.contains(&OP_SHUTDOWN), "{ops:?}");
    }

    #[test]
    fn guest_connection_reaches_the_port_socket_and_unknown_ports_are_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = muxer(dir.path());
        let port_listener = UnixListener::bind(format!("{}_1024", path.display())).unwrap();
        m.handle_guest_packet(&guest(OP_REQUEST, 5000, 1024, 0), &[]);
        let (resp, _) = take(&mut m).unwrap();
        assert_eq!((resp.op, resp.src_port, resp.dst_port), (OP_RESPONSE, 1024, 5000));
        let (mut accepted, _) = port_listener.accept().unwrap();
        m.handle_guest_packet(&guest(OP_RW, 5000, 1024, 3), b"abc");
        let mut buf = [0u8; 3];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");

        m.handle_guest_packet(&guest(OP_REQUEST, 5001, 4242, 0), &[]);
        let (rst, _) = take(&mut m).unwrap();
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 5001));
        // Data for a connection that does not exist is answered with RST.
        m.handle_guest_packet(&guest(OP_RW, 6000, 1024, 1), b"x");
        assert_eq!(take(&mut m).unwrap().0.op, OP_RST);
        // A packet claiming another guest's CID is refused.
        let mut spoofed = guest(OP_REQUEST, 5002, 1024, 0);
        spoofed.src_cid = 9;
        m.handle_guest_packet(&spoofed, &[]);
        assert_eq!(take(&mut m).unwrap().0.op, OP_RST);
        assert_eq!(m.connection_count(), 1);
    }

    #[test]
    fn host_data_never_exceeds_the_guests_credit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = muxer(dir.path());
        let port_listener = UnixListener::bind(format!("{}_1024", path.display())).unwrap();
        let mut hello = guest(OP_REQUEST, 5000, 1024, 0);
        hello.buf_alloc = 1000;
        m.handle_guest_packet(&hello, &[]);
        take(&mut m).unwrap();
        let (mut accepted, _) = port_listener.accept().unwrap();
        accepted.write_all(&[7u8; 5000]).unwrap();
        pump(&mut m);
        let mut sent = 0;
        while let Some((h, data)) = take(&mut m) {
            assert_eq!(h.op, OP_RW);
            sent += data.len();
        }
        assert_eq!(sent, 1000);
        // The guest consumed 600 bytes: 600 more may go.
        let mut update = guest(OP_CREDIT_UPDATE, 5000, 1024, 0);
        update.buf_alloc = 1000;
        update.fwd_cnt = 600;
        m.handle_guest_packet(&update, &[]);
        while let Some((_, data)) = take(&mut m) {
            sent += data.len();
        }
        assert_eq!(sent, 1600);
    }

    #[test]
    fn a_flood_of_replies_is_bounded_until_the_guest_takes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = muxer(dir.path());
        let mut n = 0;
        while m.accepts_guest_packets() {
            // Each asks for a port nobody listens on: one RST each.
            m.handle_guest_packet(&guest(OP_REQUEST, 10_000 + n, 4242, 0), &[]);
            n += 1;
            assert!(n <= MAX_CONTROL_BACKLOG as u32);
        }
        assert_eq!(n as usize, MAX_CONTROL_BACKLOG);
        assert_eq!(take(&mut m).unwrap().0.op, OP_RST);
        assert!(m.accepts_guest_packets());
    }

    #[test]
    fn an_unanswered_host_connection_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = muxer(dir.path());
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 1025\n").unwrap();
        pump(&mut m);
        pump(&mut m);
        assert_eq!(take(&mut m).unwrap().0.op, OP_REQUEST);
        m.expire_connecting(Instant::now());
        assert_eq!(m.connection_count(), 1, "expired too early");
        m.expire_connecting(Instant::now() + CONNECT_TIMEOUT);
        assert_eq!(m.connection_count(), 0);
        assert_eq!(take(&mut m).unwrap().0.op, OP_RST);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0, "the host sees the end, never OK");
    }

    #[test]
    fn a_guest_that_overruns_its_credit_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = muxer(dir.path());
        let _l = UnixListener::bind(format!("{}_1024", path.display())).unwrap();
        m.handle_guest_packet(&guest(OP_REQUEST, 5000, 1024, 0), &[]);
        take(&mut m).unwrap();
        // Nobody reads the host end, so the data piles up until the limit.
        let chunk = vec![0u8; MAX_PAYLOAD as usize];
        let mut reset = false;
        for _ in 0..64 {
            m.handle_guest_packet(&guest(OP_RW, 5000, 1024, MAX_PAYLOAD), &chunk);
            if m.connection_count() == 0 {
                reset = true;
                break;
            }
        }
        assert!(reset);
    }
}
