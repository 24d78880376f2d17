//! Templates: for each kind of machine (kernel, initramfs, command line,
//! CPU profile, vCPUs, memory) one VM is booted cold, snapshotted while
//! its agent waits for its first container, and kept; every later
//! container of that kind is restored from it instead of booting.
//!
//! A snapshot fixes the VM's devices, so a template VM has a fixed layout:
//! the root share, [`BIND_SLOTS`] bind-mount shares, and vsock. A
//! container whose shares fit is restored with its own directories behind
//! those devices and an empty one behind the rest, which its guest never
//! mounts. A container with a block-image root or more bind mounts boots
//! cold, as does one whose config.json asks for it ([`BOOT_ANNOTATION`]).

pub mod key;
pub mod store;

use std::path::Path;

use oci_spec::runtime::Spec;
use skiff_protocol::share_tag;

pub use store::{Template, TemplateInfo, TemplateStore};

use super::error::RuntimeError;
use super::root::GuestRoot;
use super::sandbox::{Cancel, Launch, Sandbox, SandboxConfig};
use crate::vmm::{self, FsConfig, ShareFlags};

/// `io.skiff.boot: cold` in config.json's annotations boots the
/// container's VM from its kernel; `template` (the default) restores it.
pub const BOOT_ANNOTATION: &str = "io.skiff.boot";
/// Bind-mount shares a template VM has. Each costs a virtio-mmio slot and
/// a little guest memory; containers with more boot cold.
pub const BIND_SLOTS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    Template,
    Cold,
}

/// The boot mode config.json's annotations ask for.
pub fn boot_mode(spec: &Spec) -> Result<BootMode, RuntimeError> {
    let value = spec.annotations().as_ref().and_then(|a| a.get(BOOT_ANNOTATION));
    match value.map(String::as_str) {
        None | Some("template") => Ok(BootMode::Template),
        Some("cold") => Ok(BootMode::Cold),
        Some(other) => Err(RuntimeError::Bundle(format!(
            "annotation {BOOT_ANNOTATION}: {other:?} is neither \"template\" nor \"cold\""
        ))),
    }
}

/// `shares` followed by read-only shares of `empty` up to [`BIND_SLOTS`].
pub fn padded_layout(mut shares: Vec<FsConfig>, empty: &Path) -> Vec<FsConfig> {
    for index in shares.len()..BIND_SLOTS {
        shares.push(FsConfig {
            tag: share_tag(index),
            shared_dir: empty.to_owned(),
            flags: ShareFlags {
                read_only: true,
                recursive: false,
            },
        });
    }
    shares
}

/// Why a VM with `config` cannot come from a template, if it cannot.
fn unfit(config: &SandboxConfig) -> Option<String> {
    if let GuestRoot::Image(_) = config.root {
        return Some("its root is a block image".into());
    }
    if config.shares.len() > BIND_SLOTS {
        return Some(format!(
            "it shares {} directories, a template VM has room for {BIND_SLOTS}",
            config.shares.len()
        ));
    }
    let in_order = config
        .shares
        .iter()
        .enumerate()
        .all(|(i, share)| share.tag == share_tag(i));
    if !in_order {
        return Some("its shares are not the bind-mount slots in order".into());
    }
    None
}

/// Makes the VM for `config` and provisions it: restored from its
/// template in `store` (built first if need be), or booted cold when no
/// store is given or the VM does not fit a template.
///
/// A restore that fails does not fail the container. A template the
/// restore refuses (damaged, cut short, from another build or host) is
/// thrown away and built again, once, and a second failure boots cold.
/// Any other failure boots cold at once; if that works, the template was
/// at fault and is thrown away, to be built again by the next container.
pub fn start(
    config: SandboxConfig,
    store: Option<&TemplateStore>,
    cancel: &Cancel,
) -> Result<Sandbox, RuntimeError> {
    let Some(store) = store else {
        return Sandbox::boot(config, cancel);
    };
    if let Some(why) = unfit(&config) {
        tracing::info!("booting cold: {why}");
        return Sandbox::boot(config, cancel);
    }
    let inputs = store.inputs(&config.vm, config.debug_guest)?;
    let empty = store.empty_dir()?;
    let config = SandboxConfig {
        shares: padded_layout(config.shares, &empty),
        ..config
    };
    let template = store.ensure(&inputs, &config.vm, config.debug_guest, cancel)?;
    let again = config.try_clone();
    let failed = match restore(config, &template, cancel) {
        Ok(sandbox) => return Ok(sandbox),
        Err(e) => e,
    };
    let Some(again) = again.filter(|_| !cancel.is_cancelled()) else {
        return Err(failed);
    };
    let discard = |template: &Template| {
        if let Err(e) = store.discard(template) {
            tracing::warn!(template = %template.info.key, "throwing the template away: {e}");
        }
    };
    match failed {
        RuntimeError::Vmm(vmm::Error::Snapshot(why)) => {
            tracing::warn!(template = %template.info.key, "the template was refused ({why}); building it again");
            discard(&template);
            let template = store.ensure(&inputs, &again.vm, again.debug_guest, cancel)?;
            let cold = again.try_clone();
            match restore(again, &template, cancel) {
                Ok(sandbox) => Ok(sandbox),
                Err(e) => match cold.filter(|_| !cancel.is_cancelled()) {
                    Some(cold) => {
                        tracing::warn!(template = %template.info.key, "the rebuilt template failed too ({e}); booting cold");
                        Sandbox::boot(cold, cancel)
                    }
                    None => Err(e),
                },
            }
        }
        other => {
            tracing::warn!(template = %template.info.key, "restoring from the template failed ({other}); booting cold");
            let sandbox = Sandbox::boot(again, cancel)?;
            tracing::warn!(template = %template.info.key, "the cold boot worked: the template is thrown away");
            discard(&template);
            Ok(sandbox)
        }
    }
}

fn restore(config: SandboxConfig, template: &Template, cancel: &Cancel) -> Result<Sandbox, RuntimeError> {
    let mut sandbox = Sandbox::launch(config, Launch::Restore(template.snapshot_dir()), cancel)?;
    tracing::debug!(template = %template.info.key, "restored from the template");
    sandbox.provision()?;
    Ok(sandbox)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(annotation: Option<&str>) -> Spec {
        let mut spec = Spec::default();
        if let Some(value) = annotation {
            spec.set_annotations(Some([(BOOT_ANNOTATION.to_owned(), value.to_owned())].into()));
        }
        spec
    }

    #[test]
    fn the_annotation_chooses_the_boot() {
        assert_eq!(boot_mode(&spec(None)).unwrap(), BootMode::Template);
        assert_eq!(boot_mode(&spec(Some("template"))).unwrap(), BootMode::Template);
        assert_eq!(boot_mode(&spec(Some("cold"))).unwrap(), BootMode::Cold);
        let e = boot_mode(&spec(Some("warm"))).unwrap_err().to_string();
        assert!(e.contains(BOOT_ANNOTATION) && e.contains("warm"), "{e}");
    }

    fn share(i: usize) -> FsConfig {
        FsConfig {
            tag: share_tag(i),
            shared_dir: PathBuf::from(format!("/data/{i}")),
            flags: ShareFlags {
                read_only: false,
                recursive: true,
            },
        }
    }

    fn config(root: GuestRoot, shares: Vec<FsConfig>) -> SandboxConfig {
        SandboxConfig {
            vm: crate::runtime::sandbox::VmResources {
                kernel: "/k".into(),
                initrd: "/i".into(),
                vcpus: 1,
                memory: vmm::MemorySize(128 << 20),
                cpu_profile: None,
                kvm_device: "/dev/kvm".into(),
            },
            root,
            shares,
            work_dir: "/w".into(),
            console: vmm::ConsoleOutput::Null,
            debug_guest: false,
        }
    }

    #[test]
    fn unused_slots_show_the_empty_directory_read_only() {
        let padded = padded_layout(vec![share(0)], Path::new("/empty"));
        assert_eq!(padded.len(), BIND_SLOTS);
        assert_eq!(padded[0], share(0));
        for (i, s) in padded.iter().enumerate().skip(1) {
            assert_eq!(s.tag, share_tag(i));
            assert_eq!(s.shared_dir, Path::new("/empty"));
            assert!(s.flags.read_only);
        }
    }

    #[test]
    fn block_roots_and_too_many_shares_boot_cold() {
        let shared = || GuestRoot::Shared("/root".into());
        assert_eq!(unfit(&config(shared(), vec![])), None);
        assert_eq!(
            unfit(&config(shared(), (0..BIND_SLOTS).map(share).collect())),
            None
        );
        assert!(unfit(&config(GuestRoot::Image("/img".into()), vec![])).is_some());
        assert!(unfit(&config(shared(), (0..=BIND_SLOTS).map(share).collect())).is_some());
        assert!(unfit(&config(shared(), vec![share(1)])).is_some());
    }
}
