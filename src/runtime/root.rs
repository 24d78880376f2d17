//! Where a container's root filesystem comes from. By default the bundle's
//! rootfs directory is shared with the guest by virtio-fs, so what the
//! container writes lands there, as under runc. The annotation
//! `io.skiff.rootfs: block` attaches a cached image of it as a disk
//! instead: nothing the container writes reaches the host, which suits
//! read-only roots and large images read more than written.

use std::path::PathBuf;

use oci_spec::runtime::Spec;
use skiff_protocol::{RootSource, ROOT_TAG};

use super::bundle::Bundle;
use super::error::RuntimeError;
use super::image::{self, ImageFormat};

pub const ROOTFS_ANNOTATION: &str = "io.skiff.rootfs";
/// The guest's name for the root image: the VM's first virtio disk.
const ROOT_DEVICE: &str = "/dev/vda";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootMode {
    Shared,
    Block,
}

/// The mode config.json's annotations ask for.
pub fn mode(spec: &Spec) -> Result<RootMode, RuntimeError> {
    let value = spec.annotations().as_ref().and_then(|a| a.get(ROOTFS_ANNOTATION));
    match value.map(String::as_str) {
        None | Some("virtiofs") => Ok(RootMode::Shared),
        Some("block") => Ok(RootMode::Block),
        Some(other) => Err(RuntimeError::Bundle(format!(
            "annotation {ROOTFS_ANNOTATION}: {other:?} is neither \"virtiofs\" nor \"block\""
        ))),
    }
}

/// What the VM gets as the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestRoot {
    /// A directory shared by virtio-fs under [`ROOT_TAG`].
    Shared(PathBuf),
    /// An image file, attached read-only as the first disk.
    Image(PathBuf),
}

/// The root as the VM gets it and as the agent is told to mount it.
#[derive(Debug)]
pub struct PreparedRoot {
    pub guest: GuestRoot,
    pub source: RootSource,
}

/// Makes the bundle's root ready for a VM: for a block root, finds or
/// builds its image in `image_cache`.
pub fn prepare(
    bundle: &Bundle,
    image_cache: &std::path::Path,
    format: ImageFormat,
) -> Result<PreparedRoot, RuntimeError> {
    match mode(&bundle.spec)? {
        RootMode::Shared => {
            let dir = std::fs::canonicalize(&bundle.rootfs)
                .map_err(|e| RuntimeError::io(format!("resolving {}", bundle.rootfs.display()), e))?;
            Ok(PreparedRoot {
                guest: GuestRoot::Shared(dir),
                source: RootSource::Shared { tag: ROOT_TAG.into() },
            })
        }
        RootMode::Block => {
            let t0 = std::time::Instant::now();
            let image = image::prepare(&bundle.rootfs, image_cache, format)?;
            tracing::info!(
                image = %image.path.display(),
                reused = image.reused,
                ms = t0.elapsed().as_millis() as u64,
                "root filesystem image ready"
            );
            Ok(PreparedRoot {
                guest: GuestRoot::Image(image.path),
                source: RootSource::Block {
                    device: ROOT_DEVICE.into(),
                    fstype: image.format.fstype().into(),
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(annotation: Option<&str>) -> Spec {
        let mut spec = Spec::default();
        if let Some(value) = annotation {
            spec.set_annotations(Some([(ROOTFS_ANNOTATION.to_string(), value.to_string())].into()));
        }
        spec
    }

    #[test]
    fn the_shared_root_is_the_default_and_block_is_asked_for() {
        assert_eq!(mode(&spec_with(None)).unwrap(), RootMode::Shared);
        assert_eq!(mode(&spec_with(Some("virtiofs"))).unwrap(), RootMode::Shared);
        assert_eq!(mode(&spec_with(Some("block"))).unwrap(), RootMode::Block);
        let err = mode(&spec_with(Some("nfs"))).unwrap_err().to_string();
        assert!(err.contains(ROOTFS_ANNOTATION) && err.contains("nfs"), "{err}");
    }
}
