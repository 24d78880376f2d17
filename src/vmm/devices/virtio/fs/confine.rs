//! The view of a shared directory the FUSE server works in.
//!
//! The server thread gets a mount namespace and filesystem context of its
//! own (`unshare(CLONE_NEWNS | CLONE_FS)` affects only the calling thread),
//! where the shared directory is bound over itself with `nosuid`, `nodev`
//! and, for a read-only share, `ro`. The host kernel then enforces those on
//! every request the guest makes, whatever the guest kernel claims: a
//! read-only share answers writes with EROFS, a device node the guest
//! creates cannot be opened on the host, a set-uid file is not honoured
//! through the share. Its umask is 0, so the modes the guest asks for are
//! the modes files get; the rest of the VMM keeps its own.

use std::io;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{umask, Mode};

/// How the share is bound in the server's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareFlags {
    pub read_only: bool,
    /// `rbind`: mounts below the directory are shared too.
    pub recursive: bool,
}

/// Makes the calling thread's private view of `dir`. Call it on the thread
/// that will serve the share, before the server opens anything.
pub fn enter(dir: &Path, flags: ShareFlags) -> io::Result<()> {
    let fail = |what: &str, e: nix::Error| io::Error::other(format!("{what} for {}: {e}", dir.display()));
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS)
        .map_err(|e| fail("a private mount namespace", e))?;
    // Nothing done in this namespace may reach the host's.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| fail("making / a slave mount", e))?;
    let mut bind = MsFlags::MS_BIND;
    if flags.recursive {
        bind |= MsFlags::MS_REC;
    }
    mount(Some(dir), dir, None::<&str>, bind, None::<&str>).map_err(|e| fail("binding the share", e))?;
    let mut restrict = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if flags.read_only {
        restrict |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, dir, None::<&str>, restrict, None::<&str>)
        .map_err(|e| fail("restricting the share", e))?;
    umask(Mode::empty());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    fn in_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| s.spawn(f).join().expect("thread"))
    }

    #[test]
    fn a_read_only_share_refuses_writes_in_its_thread_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let result = in_thread(|| {
            enter(
                &path,
                ShareFlags {
                    read_only: true,
                    recursive: false,
                },
            )?;
            std::fs::write(path.join("x"), b"x")
        });
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EROFS));
        // The host (this thread) still writes there, and nothing stayed mounted.
        std::fs::write(path.join("y"), b"y").unwrap();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(path.to_str().unwrap()));
    }

    #[test]
    fn modes_are_the_guests_and_the_rest_keeps_its_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mine = thread_umask();
        in_thread(|| {
            enter(
                &path,
                ShareFlags {
                    read_only: false,
                    recursive: true,
                },
            )
            .unwrap();
            let f = path.join("open");
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o666)
                .open(&f)
                .unwrap();
            assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o666);
            assert_eq!(thread_umask(), "0000");
        });
        assert_eq!(thread_umask(), mine);
    }

    fn thread_umask() -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        line["Umask:".len()..].trim().to_string()
    }
}
