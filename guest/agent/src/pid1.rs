//! What the agent does because it is the VM's init: the early mounts and
//! console, signal dispositions, and powering off.

use skiff_protocol::DEBUG_FLAG;
use std::fs;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::stat::Mode;

use crate::log::info;

/// The mounts every guest gets before talking to the host; the initramfs
/// has the directories but no device nodes.
pub fn early_setup() {
    // devtmpfs first: without /dev/console there is nowhere to log to.
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    attach_console();
    mount_fs(
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    );
    mount_fs(
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    );
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    // The kernel only delivers signals to PID 1 that it has handlers for,
    // but a console's ^C or a stray kill should not even be a question.
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = fs::create_dir_all(target) {
        info!("creating {target}: {e}");
    }
    match mount(Some(source), target, Some(fstype), flags, data) {
        // The kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT when
        // it mounted the root; that is as good.
        Ok(()) | Err(Errno::EBUSY) => {}
        Err(e) => info!("mounting {fstype} on {target}: {e}"),
    }
}

/// Points fds 0, 1 and 2 at the console. The kernel tried already, but the
/// initramfs may have had no /dev/console node; a console that cannot be
/// opened leaves /dev/null there, so pipes never land on fds 0-2.
fn attach_console() {
    let fd = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .or_else(|_| open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()));
    let Ok(fd) = fd else { return };
    for target in 0..3 {
        // SAFETY: dup2 onto the standard fds, which the agent only uses
        // through std's stdio handles.
        unsafe { libc::dup2(fd.as_raw_fd(), target) };
    }
    if fd.as_raw_fd() <= 2 {
        // The kernel left 0-2 closed, so the console landed on one of them:
        // that fd is now part of the standard set and must stay open.
        let _ = fd.into_raw_fd();
    }
}

/// `skiff.debug` on the kernel command line.
pub fn debug_requested() -> bool {
    fs::read_to_string("/proc/cmdline")
        .map(|cmdline| {
            cmdline.split_whitespace().any(|w| {
                w.strip_prefix(DEBUG_FLAG)
                    .is_some_and(|rest| rest.is_empty() || rest == "=1")
            })
        })
        .unwrap_or(false)
}

/// Ends the VM. PID 1 must never exit (that panics the kernel), so if the
/// power-off itself fails there is nothing left but to wait.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    info!("power-off failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A panic in PID 1 would abort it and panic the kernel; power off
/// instead, after saying why, so the host sees an ordinary VM exit.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|panic| {
        info!("internal error: {panic}");
        power_off();
    }));
}
