//! Starting a copy of skiff that outlives the command that started it (a
//! container's monitor, a detached exec), in a session of its own, and
//! hearing from it once it is ready: a pipe whose write end only the
//! child holds, so end of file without a report means it died.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Tells the child which descriptor is its ready pipe.
const READY_FD_ENV: &str = "_SKIFF_READY_FD";
/// The ready pipe's descriptor in the child: the first after stdio.
const READY_FD: i32 = 3;

/// A started child and the read end of its ready pipe.
pub struct Detached {
    pub child: Child,
    ready: File,
}

/// Starts `skiff <args>`; with `quiet`, its stdio is /dev/null rather
/// than ours.
pub fn spawn(args: Vec<OsString>, quiet: bool) -> anyhow::Result<Detached> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the ready pipe")?;
    let exe = std::env::current_exe().context("finding the skiff executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).env(READY_FD_ENV, READY_FD.to_string());
    if quiet {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let fd = write.as_raw_fd();
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // system calls and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the caller's session: a Ctrl-C at the caller's terminal
            // is not the container's, and the caller's exit does not hang it up.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The ready pipe becomes fd 3 (dup2 leaves it open across exec;
            // if it is 3 already, its close-on-exec flag is cleared) ...
            if fd == READY_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // ... and every other descriptor the caller leaked to us goes: a
            // process that lives as long as the container must not keep, say,
            // a shim's listening socket open (containerd's leaks into create).
            libc::syscall(libc::SYS_close_range, READY_FD + 1, libc::c_uint::MAX, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting a skiff process")?;
    drop(write);
    Ok(Detached {
        child,
        ready: File::from(read),
    })
}

impl Detached {
    /// The child's report, or `None` if it exited (or closed the pipe)
    /// without one.
    pub fn wait_ready<T: DeserializeOwned>(&mut self) -> anyhow::Result<Option<T>> {
        let mut text = Vec::new();
        self.ready
            .read_to_end(&mut text)
            .context("reading from the started process")?;
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&text)
            .map(Some)
            .context("the started process sent a report that is not valid")
    }
}

/// In the child: the ready pipe its parent gave it, if any.
pub fn ready_pipe() -> Option<File> {
    let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    // Not for the container's or anyone else's children.
    std::env::remove_var(READY_FD_ENV);
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the parent made this descriptor for us alone and nothing else
    // in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(File::from(owned))
}
