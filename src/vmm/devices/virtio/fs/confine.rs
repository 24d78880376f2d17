//! The view of a shared directory the FUSE server works in.
//!
//! The server thread gets a mount namespace and filesystem context of its
//! own (`unshare(CLONE_NEWNS | CLONE_FS)` affects only the calling thread).
//! There a copy of the directory's mount, checked to be the directory
//! opened before the VM started, is attached at [`VIEW`], a mount point on
//! a tmpfs only that namespace has, and every mount of the copy is made
//! `nosuid`, `nodev` and, for a read-only share, `ro`. So:
//! - the host kernel enforces those on every request, whatever the guest
//!   kernel claims: a read-only share answers writes with EROFS, mounts
//!   below an `rbind` included; a device node cannot be opened through it;
//! - the path the server opens its root by (again at every `FUSE_INIT`)
//!   resolves through nothing the guest can change: not a symlink swapped
//!   into another share, not a renamed parent;
//! - its umask is 0, so files get the modes the guest asks for, while the
//!   rest of the VMM keeps its own.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{umask, Mode};

/// Where the share is in the server's namespace.
pub const VIEW: &str = "/tmp/skiff-share";
/// The tmpfs [`VIEW`] is made on, mounted over the host's `/tmp` in the
/// server's namespace only.
const VIEW_PARENT: &str = "/tmp";

// The new mount API (Linux 5.2, mount_setattr 5.12), which libc does not
// define for glibc targets.
const AT_RECURSIVE: libc::c_uint = 0x8000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// How the share is bound in the server's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareFlags {
    pub read_only: bool,
    /// `rbind`: mounts below the directory are shared too.
    pub recursive: bool,
}

/// Makes the calling thread's private view of directory `path` at
/// [`VIEW`]; `opened` is that directory as [`open_dir`] found it when the VM
/// was made, and the view must still be it. Call it on the thread that will
/// serve the share, before the server opens anything.
pub fn enter(path: &Path, opened: &File, flags: ShareFlags) -> io::Result<&'static Path> {
    let fail = |what: &str, e: nix::Error| io::Error::other(format!("{what}: {e}"));
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
    // The share is taken as a detached copy of its mounts first: the
    // tmpfs below hides the host's /tmp, where it may well lie. A mount
    // of another namespace (where `opened` was opened) cannot be copied
    // here, so the path is, and what it reached is checked.
    let tree = open_tree(path, flags.recursive)?;
    let (taken, expected) = (tree.metadata()?, opened.metadata()?);
    if (taken.dev(), taken.ino()) != (expected.dev(), expected.ino()) {
        return Err(io::Error::other(format!(
            "{} is no longer the directory it was when the VM was made",
            path.display()
        )));
    }
    mount(
        Some("tmpfs"),
        VIEW_PARENT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=64k"),
    )
    .map_err(|e| fail("a tmpfs for the share's mount point", e))?;
    std::fs::create_dir(VIEW)?;
    move_mount(&tree)?;
    restrict(flags.read_only)?;
    umask(Mode::empty());
    Ok(Path::new(VIEW))
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("a NUL in a path"))
}

/// A detached copy of the mount at `path` (and those below it if
/// `recursive`), as open_tree(2) with `OPEN_TREE_CLONE` makes it.
fn open_tree(path: &Path, recursive: bool) -> io::Result<File> {
    let cpath = c_path(path)?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: the path is NUL-terminated; the call only reads it.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, cpath.as_ptr(), flags) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!("taking {}: {e}", path.display())));
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Attaches a tree from [`open_tree`] at [`VIEW`].
fn move_mount(tree: &File) -> io::Result<()> {
    let view = c_path(Path::new(VIEW))?;
    // SAFETY: both paths are NUL-terminated; the call only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            view.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::other(format!("mounting the share's copy: {e}")));
    }
    Ok(())
}

/// `nosuid`, `nodev` and maybe `ro` on the view and every mount below it.
fn restrict(read_only: bool) -> io::Result<()> {
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if read_only {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    let path = c_path(Path::new(VIEW))?;
    // SAFETY: the path is a NUL-terminated string and `attr` a live
    // mount_attr of the size passed; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(io::Error::other(format!("restricting the share: {err}")));
    }
    // Before Linux 5.12: the top mount only.
    tracing::warn!("no mount_setattr(2): mounts below a shared directory keep their flags");
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, VIEW, None::<&str>, flags, None::<&str>)
        .map_err(|e| io::Error::other(format!("restricting the share: {e}")))
}

/// Opens a directory to share: once, before the VM starts, so what is
/// shared is what was checked.
pub fn open_dir(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    fn in_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| s.spawn(f).join().expect("thread"))
    }

    const RO: ShareFlags = ShareFlags {
        read_only: true,
        recursive: true,
    };

    #[test]
    fn a_read_only_share_refuses_writes_in_its_thread_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let result = in_thread(|| {
            let view = enter(&path, &open_dir(&path)?, RO)?;
            std::fs::write(view.join("x"), b"x")
        });
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EROFS));
        // The host (this thread) still writes there, and nothing is mounted
        // in its namespace.
        std::fs::write(path.join("y"), b"y").unwrap();
        let mounts = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        assert!(!mounts.contains(VIEW) && !mounts.contains(path.to_str().unwrap()));
    }

    #[test]
    fn mounts_below_a_recursive_share_are_read_only_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        std::fs::create_dir(path.join("sub")).unwrap();
        let (below, view_of_plain_bind) = in_thread(|| {
            // A mount below the directory, in a namespace of this thread's.
            unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_SLAVE,
                None::<&str>,
            )
            .unwrap();
            mount(
                Some("tmpfs"),
                &path.join("sub"),
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            std::fs::write(path.join("sub/on-the-submount"), b"x").unwrap();
            let dir = open_dir(&path).unwrap();
            let below = in_thread(|| {
                let view = enter(&path, &dir, RO).unwrap();
                std::fs::write(view.join("sub/x"), b"x").map_err(|e| e.raw_os_error())
            });
            let plain = in_thread(|| {
                let flags = ShareFlags {
                    read_only: false,
                    recursive: false,
                };
                let view = enter(&path, &dir, flags).unwrap();
                view.join("sub/on-the-submount").exists()
            });
            (below, plain)
        });
        assert_eq!(below, Err(Some(libc::EROFS)));
        assert!(!view_of_plain_bind, "a plain bind showed a mount below it");
    }

    #[test]
    fn a_directory_swapped_after_it_was_opened_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("share");
        std::fs::create_dir(&path).unwrap();
        let opened = open_dir(&path).unwrap();
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink("/etc", &path).unwrap();
        let flags = ShareFlags {
            read_only: false,
            recursive: false,
        };
        let err = in_thread(|| enter(&path, &opened, flags).map(|_| ()).unwrap_err().to_string());
        assert!(err.contains("no longer the directory"), "{err}");
    }

    #[test]
    fn device_nodes_cannot_be_opened_through_a_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        nix::sys::stat::mknod(
            &path.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let opened = in_thread(|| {
            let flags = ShareFlags {
                read_only: false,
                recursive: false,
            };
            let view = enter(&path, &open_dir(&path).unwrap(), flags).unwrap();
            std::fs::File::open(view.join("null")).map_err(|e| e.raw_os_error())
        });
        assert_eq!(opened.err(), Some(Some(libc::EACCES)));
        std::fs::File::open(path.join("null")).unwrap();
    }

    #[test]
    fn modes_are_the_guests_and_the_rest_keeps_its_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mine = thread_umask();
        in_thread(|| {
            let flags = ShareFlags {
                read_only: false,
                recursive: true,
            };
            let view = enter(&path, &open_dir(&path).unwrap(), flags).unwrap();
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o666)
                .open(view.join("open"))
                .unwrap();
            assert_eq!(thread_umask(), "0000");
        });
        let meta = std::fs::metadata(path.join("open")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o666);
        assert_eq!(thread_umask(), mine);
    }

    fn thread_umask() -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        line["Umask:".len()..].trim().to_string()
    }
}
