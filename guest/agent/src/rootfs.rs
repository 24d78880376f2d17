//! The container's root in the VM: the host's rootfs directory shared by
//! virtio-fs, or an image device with an overlay over it; and the switch of
//! root.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};
use skiff_protocol::{RootFs, RootSource, SHARED_MOUNT_TYPE};

use crate::log::debug;

const LOWER: &str = "/run/skiff/lower";
const RW: &str = "/run/skiff/rw";
const MERGED: &str = "/run/skiff/root";
/// virtio-blk probes before PID 1 starts, but devtmpfs may publish the node
/// a moment later.
const DEVICE_WAIT: Duration = Duration::from_secs(2);

/// Mounts the root and returns the directory that becomes `/`.
pub fn mount_root(root: &RootFs) -> Result<PathBuf, String> {
    match &root.source {
        RootSource::Shared { tag } => mount_shared(tag),
        RootSource::Block { device, fstype } => mount_image(device, fstype, root.readonly),
    }
}

/// Read-write even for a read-only root: the mount points of the OCI mounts
/// are made first, as runc makes them, then [`seal`] makes it read-only.
fn mount_shared(tag: &str) -> Result<PathBuf, String> {
    mkdir(MERGED)?;
    mount(
        Some(tag),
        MERGED,
        Some(SHARED_MOUNT_TYPE),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mounting the shared root `{tag}`: {e}"))?;
    debug!("mounted shared root {tag} at {MERGED}");
    Ok(PathBuf::from(MERGED))
}

/// Makes a shared root read-only once the mounts are in place (OCI
/// `root.readonly`). An image root was read-only from the start.
pub fn seal(root: &RootFs, dir: &Path) -> Result<(), String> {
    if !root.readonly || !matches!(root.source, RootSource::Shared { .. }) {
        return Ok(());
    }
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    mount(None::<&str>, dir, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("making the root read-only: {e}"))
}

fn mount_image(device: &str, fstype: &str, readonly: bool) -> Result<PathBuf, String> {
    let device = Path::new(device);
    let deadline = Instant::now() + DEVICE_WAIT;
    while !device.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    mkdir(LOWER)?;
    // Always read-only: the host shares one cached image between
    // containers, so no guest may write to it.
    mount(
        Some(device),
        LOWER,
        Some(fstype),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("mounting root device {} ({fstype}): {e}", device.display()))?;
    debug!("mounted {} ({fstype}) at {LOWER}", device.display());
    if readonly {
        return Ok(PathBuf::from(LOWER));
    }
    mkdir(RW)?;
    mount(
        Some("tmpfs"),
        RW,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| format!("mounting the overlay's tmpfs: {e}"))?;
    let upper = format!("{RW}/upper");
    let work = format!("{RW}/work");
    mkdir(&upper)?;
    mkdir(&work)?;
    mkdir(MERGED)?;
    let data = format!("lowerdir={LOWER},upperdir={upper},workdir={work}");
    mount(
        Some("overlay"),
        MERGED,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| format!("mounting the overlay: {e}"))?;
    debug!("overlay on {LOWER} at {MERGED}");
    Ok(PathBuf::from(MERGED))
}

/// Makes `newroot` the root. The initramfs cannot be unmounted (it is the
/// kernel's rootfs), so the new root is moved over it, as switch_root does.
pub fn switch_root(newroot: &Path) -> Result<(), String> {
    chdir(newroot).map_err(|e| format!("chdir {}: {e}", newroot.display()))?;
    mount(Some(newroot), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving {} to /: {e}", newroot.display()))?;
    chroot(".").map_err(|e| format!("chroot: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

fn mkdir(path: &str) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("creating {path}: {e}"))
}
