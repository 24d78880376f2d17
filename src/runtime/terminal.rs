//! Host ends of container terminals: a pty whose master goes to the
//! caller's `--console-socket` (as runc hands it over), window sizes, and
//! raw mode for a caller's own terminal.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

use super::error::RuntimeError;

/// A host pty pair: the master for whoever shows the terminal, the slave
/// for the relay to the guest.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl Pty {
    /// The slave is raw: the guest's own terminal does the line discipline
    /// and echo, so the host one must pass bytes through untouched.
    pub fn open() -> Result<Pty, RuntimeError> {
        let pty = nix::pty::openpty(None, None).map_err(|e| RuntimeError::io("opening a pty", e.into()))?;
        let mut attrs =
            termios::tcgetattr(&pty.slave).map_err(|e| RuntimeError::io("reading pty modes", e.into()))?;
        termios::cfmakeraw(&mut attrs);
        termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs)
            .map_err(|e| RuntimeError::io("setting the pty raw", e.into()))?;
        Ok(Pty {
            master: pty.master,
            slave: pty.slave,
        })
    }
}

/// Sends `master` to the Unix socket at `socket`, as runc does for
/// `--console-socket`: one message carrying the descriptor.
pub fn send_console(socket: &Path, master: BorrowedFd<'_>) -> Result<(), RuntimeError> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| RuntimeError::io(format!("connecting to console socket {}", socket.display()), e))?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[io::IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| RuntimeError::io(format!("sending the terminal to {}", socket.display()), e.into()))?;
    Ok(())
}

/// The window size of the terminal on `fd`, if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data the ioctl fills in.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize through the valid pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Makes `fd` (a pty slave) the controlling terminal of this process, the
/// leader of its own session, so that a resize of the master by whoever
/// holds it arrives here as SIGWINCH.
pub fn take_control(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument and touches no memory.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A caller's terminal in raw mode until dropped, so keys reach the
/// container's terminal as they are typed.
pub struct RawMode {
    fd: RawFd,
    saved: Termios,
}

impl RawMode {
    /// `None` when `fd` is not a terminal.
    pub fn enable(fd: BorrowedFd<'_>) -> Option<RawMode> {
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode {
            fd: fd.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: the descriptor is one of this process's standard streams,
        // open for its whole life.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: impl AsFd) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_reaches_the_console_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = Pty::open().unwrap();
        send_console(&path, pty.master.as_fd()).unwrap();

        let (conn, _) = listener.accept().unwrap();
        let fds = crate::runtime::control::recv_fds(&conn).unwrap();
        assert_eq!(fds.len(), 1);
        // Bytes written to the received master come out of our slave, untouched.
        let mut master = std::fs::File::from(fds.into_iter().next().unwrap());
        master.write_all(b"a\rb").unwrap();
        let mut slave = std::fs::File::from(pty.slave);
        let mut buf = [0u8; 3];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a\rb");
    }

    #[test]
    fn window_sizes_are_read_from_the_pty() {
        let pty = Pty::open().unwrap();
        assert_eq!(window_size(pty.slave.as_fd()), None);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize through the valid pointer.
        assert_eq!(
            unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            0
        );
        assert_eq!(window_size(pty.slave.as_fd()), Some((40, 120)));
    }
}
