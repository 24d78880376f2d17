//! The channel between `skiff` commands and a container's monitor (the
//! process that owns its VM): a Unix socket in the container's state
//! directory, one request per connection, framed like the guest protocol.
//!
//! File descriptors (an exec's stdio) travel ahead of the request frame as
//! SCM_RIGHTS on a one-byte message, so the frame itself stays plain JSON.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use skiff_protocol::{read_frame, write_frame, Process};

use super::error::RuntimeError;

/// Socket paths at least this long are connected to through their
/// directory (sun_path holds 108 bytes with its terminating zero).
const SUN_PATH_SHORT: usize = 100;

/// Most descriptors one message carries: stdin, stdout, stderr.
pub const MAX_FDS: usize = 3;

/// What a command asks of the monitor.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Let the container's process run.
    Start,
    /// Send a signal to the container's process (or to the exec'd process
    /// `process`), or to every process in the container.
    Signal {
        signal: i32,
        #[serde(default)]
        all: bool,
        #[serde(default)]
        process: Option<String>,
    },
    /// Run a further process. Its stdio arrives as descriptors with the
    /// request, unless it has a terminal and `console_socket` is given, which
    /// then receives the terminal's master.
    Exec {
        process: Box<Process>,
        console_socket: Option<PathBuf>,
    },
    /// The processes in the container.
    Ps,
    Pause,
    Resume,
}

/// The monitor's answer.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Error {
        message: String,
        /// The status a command should exit with for this failure.
        code: i32,
    },
    Processes {
        processes: Vec<skiff_protocol::ProcessInfo>,
    },
    /// An exec'd process runs; its `Exited` follows on the same connection.
    ExecStarted {
        id: String,
    },
    /// An exec'd process ended, with the status a shell would report.
    Exited {
        status: i32,
    },
}

impl Response {
    pub fn error(e: &RuntimeError) -> Response {
        Response::Error {
            message: e.to_string(),
            code: e.exit_code(),
        }
    }

    /// `Ok` as `Ok(())`, an error as the error.
    pub fn into_result(self) -> Result<Response, RuntimeError> {
        match self {
            Response::Error { message, code } => Err(RuntimeError::Exec { message, code }),
            other => Ok(other),
        }
    }
}

/// Connects to a monitor's socket; a monitor that is gone reads as a
/// container that is not running.
pub fn connect(socket: &Path) -> Result<UnixStream, RuntimeError> {
    // A socket path past sun_path's 108 bytes (a deep root, a 64-character
    // id) is reached through a descriptor of its directory instead.
    let dir;
    let short;
    let path = match (socket.parent(), socket.file_name()) {
        (Some(parent), Some(name)) if socket.as_os_str().len() >= SUN_PATH_SHORT => {
            dir = std::fs::File::open(parent)
                .map_err(|e| RuntimeError::io(format!("opening {}", parent.display()), e))?;
            short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
            short.as_path()
        }
        _ => socket,
    };
    UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            RuntimeError::State("container not running".into())
        }
        _ => RuntimeError::io(format!("connecting to {}", socket.display()), e),
    })
}

/// Sends a request, with descriptors if any, and returns the first answer.
pub fn call(stream: &mut UnixStream, request: &Request, fds: &[RawFd]) -> Result<Response, RuntimeError> {
    send_fds(stream, fds).map_err(|e| RuntimeError::io("passing descriptors to the monitor", e))?;
    write_frame(stream, request).map_err(|e| RuntimeError::io("sending to the monitor", e))?;
    next_response(stream)
}

/// The next answer on a connection.
pub fn next_response(stream: &mut UnixStream) -> Result<Response, RuntimeError> {
    match read_frame(stream) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(RuntimeError::State(
            "the container's VMM closed the connection without answering (it may have exited)".into(),
        )),
        Err(e) => Err(RuntimeError::io("reading the monitor's answer", e)),
    }
}

/// One byte with `fds` attached (none is fine: the byte still goes, so the
/// receiver always reads the same shape).
pub fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(&[0u8])];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// The counterpart of [`send_fds`]; the descriptors are owned by the caller.
pub fn recv_fds(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for fd in received {
                // SAFETY: the kernel just installed this descriptor in our
                // table for us; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too many descriptors"));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn descriptors_travel_with_the_request() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut p1, p2) = UnixStream::pair().unwrap();
        let request = Request::Signal {
            signal: 15,
            all: true,
            process: None,
        };
        send_fds(&a, &[p2.as_raw_fd()]).unwrap();
        write_frame(&mut a, &request).unwrap();
        drop(p2);

        let fds = recv_fds(&b).unwrap();
        assert_eq!(fds.len(), 1);
        let got: Request = read_frame(&mut &b).unwrap().unwrap();
        assert!(matches!(
            got,
            Request::Signal {
                signal: 15,
                all: true,
                ..
            }
        ));
        let mut passed = UnixStream::from(fds.into_iter().next().unwrap());
        passed.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        p1.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
    }

    #[test]
    fn no_descriptors_is_one_plain_byte() {
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, &[]).unwrap();
        assert!(recv_fds(&b).unwrap().is_empty());
        drop(a);
        assert_eq!(recv_fds(&b).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn errors_come_back_as_errors() {
        let e = RuntimeError::State("container not running".into());
        let r = Response::error(&e).into_result().unwrap_err();
        assert_eq!(r.to_string(), "container not running");
    }
}
