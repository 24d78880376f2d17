//! The sockets the agent talks over: AF_VSOCK in the VM, Unix sockets when
//! the agent runs hosted (tests). Both end up as a [`Conn`] around a socket
//! fd, so nothing above this module knows which one it has.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Where a connection goes, or where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `cid` is ignored for listening, which always binds `VMADDR_CID_ANY`.
    Vsock {
        cid: u32,
        port: u32,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Address::Unix(path) => write!(f, "unix {}", path.display()),
        }
    }
}

impl Address {
    /// Connects, retrying `attempts` times `pause` apart: at boot the host
    /// side may not be listening yet.
    pub fn connect(&self, attempts: u32, pause: Duration) -> io::Result<Conn> {
        let mut last = io::Error::other("no connection attempt made");
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(pause);
            }
            let result = match self {
                Address::Vsock { cid, port } => vsock_connect(*cid, *port),
                Address::Unix(path) => UnixStream::connect(path).map(Conn::from),
            };
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => last = e,
            }
        }
        Err(io::Error::new(
            last.kind(),
            format!("connecting to {self}: {last}"),
        ))
    }

    pub fn listen(&self) -> io::Result<Listener> {
        let listener = match self {
            Address::Vsock { port, .. } => vsock_listen(*port).map(Listener::Vsock),
            Address::Unix(path) => UnixListener::bind(path).map(Listener::Unix),
        };
        listener.map_err(|e| io::Error::new(e.kind(), format!("listening on {self}: {e}")))
    }
}

/// One connected stream socket.
#[derive(Debug)]
pub struct Conn(OwnedFd);

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Self {
        Conn(s.into())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Conn {
    /// Another handle on the same socket, so one thread can read while
    /// another writes.
    pub fn try_clone(&self) -> io::Result<Conn> {
        self.0.try_clone().map(Conn)
    }

    /// Tells the peer there is no more to read, while it may still write.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(libc::SHUT_WR)
    }

    /// Ends the connection both ways; a thread blocked reading it wakes up
    /// with end-of-file.
    pub fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(libc::SHUT_RDWR)
    }

    fn shutdown(&self, how: libc::c_int) -> io::Result<()> {
        // SAFETY: shutdown on a socket fd we own; no memory is involved.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), how) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for buf.len() writable bytes.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // MSG_NOSIGNAL: a host that hung up must show up as EPIPE here,
            // not as a SIGPIPE.
            // SAFETY: buf is valid for buf.len() readable bytes.
            let n = unsafe {
                libc::send(
                    self.0.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket handing out [`Conn`]s.
#[derive(Debug)]
pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::from(s)),
            Listener::Vsock(fd) => loop {
                // SAFETY: null address pointers are allowed when the peer's
                // address is not wanted.
                let raw = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if raw >= 0 {
                    // SAFETY: accept4 returned a new fd that nothing else owns.
                    return Ok(Conn(unsafe { OwnedFd::from_raw_fd(raw) }));
                }
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            },
        }
    }

    /// Makes a thread blocked in [`Listener::accept`] return with an error,
    /// so a hosted agent can wind down its acceptor.
    pub fn close_for_accept(&self) {
        let fd = match self {
            Listener::Vsock(fd) => fd.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        };
        // SAFETY: shutdown on a listening socket we own; Linux wakes its
        // blocked accept calls with EINVAL.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value
    // and the reserved fields must be zero.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_connect(cid: u32, port: u32) -> io::Result<Conn> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    loop {
        // SAFETY: addr is a valid sockaddr_vm of the length passed.
        let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), VSOCK_ADDR_LEN) };
        if r == 0 {
            return Ok(Conn(fd));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of the length passed.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), VSOCK_ADDR_LEN) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
