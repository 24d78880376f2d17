//! What a container's microVM is made of beyond its bundle: the guest
//! kernel, the agent's initramfs, the image cache. containerd and podman
//! pass none of these, so each has an environment variable and an
//! installed default: beside the binary, in `<prefix>/share/skiff/` for a
//! skiff in `<prefix>/bin/` (where scripts/install.sh puts them).

use std::path::{Path, PathBuf};

use clap::Args;

use super::boot::{ProfileChoice, DEFAULT_IMAGE_CACHE};
use crate::runtime::image::ImageFormat;
use crate::runtime::template::TemplateStore;
use crate::vmm;

/// The installed guest kernel, relative to `<prefix>/share/skiff/`.
pub const INSTALLED_KERNEL: &str = "vmlinux";
/// The installed agent initramfs, relative to `<prefix>/share/skiff/`.
pub const INSTALLED_INITRD: &str = "agent-initrd.img";
/// The template store's directory under `--root`; `@` is not allowed in
/// container ids.
pub const DEFAULT_TEMPLATE_DIR: &str = "@templates";

#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Guest kernel (ELF vmlinux or bzImage) [default: <prefix>/share/skiff/vmlinux].
    #[arg(long, value_name = "FILE", env = "SKIFF_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// The skiff agent's initramfs [default: <prefix>/share/skiff/agent-initrd.img].
    #[arg(long, value_name = "FILE", env = "SKIFF_AGENT_INITRD")]
    pub initrd: Option<PathBuf>,
    /// Filesystem of the root image made from the bundle's rootfs.
    #[arg(long, default_value_t = ImageFormat::Erofs)]
    pub image_format: ImageFormat,
    /// Where root filesystem images are cached, by content.
    #[arg(long, value_name = "DIR", env = "SKIFF_IMAGE_CACHE", default_value = DEFAULT_IMAGE_CACHE)]
    pub image_cache: PathBuf,
    /// CPUID profile the guest sees.
    #[arg(long, value_enum, default_value_t = ProfileChoice::Auto)]
    pub cpu_profile: ProfileChoice,
    /// Keep each guest's console in `<DIR>/<id>.log` (diagnosis).
    #[arg(long, value_name = "DIR", env = "SKIFF_GUEST_CONSOLE_DIR", hide = true)]
    pub guest_console_dir: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = vmm::config::DEFAULT_KVM_DEVICE, value_name = "PATH", hide = true)]
    pub kvm_device: PathBuf,
    /// Boot every microVM from its kernel instead of restoring it from a
    /// template (as the annotation io.skiff.boot=cold does for one bundle).
    #[arg(long, env = "SKIFF_COLD_BOOT", value_parser = clap::builder::BoolishValueParser::new())]
    pub cold_boot: bool,
    #[command(flatten)]
    pub templates: TemplateDirArg,
}

/// Where templates are kept.
#[derive(Debug, Args, Clone)]
pub struct TemplateDirArg {
    /// Directory of booted template VMs [default: <root>/@templates].
    #[arg(long, value_name = "DIR", env = "SKIFF_TEMPLATE_DIR")]
    pub template_dir: Option<PathBuf>,
}

impl TemplateDirArg {
    /// The store, beside the containers under `root` unless given: a
    /// name no container id can have.
    pub fn store(&self, root: &Path) -> TemplateStore {
        let dir = self
            .template_dir
            .clone()
            .unwrap_or_else(|| root.join(DEFAULT_TEMPLATE_DIR));
        TemplateStore::new(super::absolute(&dir))
    }
}

impl VmArgs {
    /// Fails, naming the file and how to point skiff at it, when the kernel
    /// or initramfs is missing: before anything is created.
    pub fn check(&self) -> anyhow::Result<()> {
        for (path, what, env) in [
            (self.kernel(), "guest kernel", "SKIFF_KERNEL"),
            (self.initrd(), "agent initramfs", "SKIFF_AGENT_INITRD"),
        ] {
            if let Err(e) = std::fs::metadata(&path) {
                anyhow::bail!(
                    "{what} {}: {e} (install it with scripts/install.sh, or set {env})",
                    path.display()
                );
            }
        }
        Ok(())
    }

    pub fn kernel(&self) -> PathBuf {
        self.kernel.clone().unwrap_or_else(|| installed(INSTALLED_KERNEL))
    }

    pub fn initrd(&self) -> PathBuf {
        self.initrd.clone().unwrap_or_else(|| installed(INSTALLED_INITRD))
    }

    /// The template store to restore from; `None` boots cold.
    pub fn template_store(&self, root: &Path) -> Option<TemplateStore> {
        (!self.cold_boot).then(|| self.templates.store(root))
    }

    /// The same choices as flags of the monitor, whose `--root` is `root`.
    pub fn to_args(&self, root: &Path) -> Vec<std::ffi::OsString> {
        let abs = |p: &Path| super::absolute(p).into_os_string();
        let mut args = vec![
            "--kernel".into(),
            abs(&self.kernel()),
            "--initrd".into(),
            abs(&self.initrd()),
            "--image-format".into(),
            self.image_format.to_string().into(),
            "--image-cache".into(),
            abs(&self.image_cache),
            "--cpu-profile".into(),
            clap::ValueEnum::to_possible_value(&self.cpu_profile)
                .map_or("auto".into(), |v| v.get_name().into()),
            "--kvm-device".into(),
            self.kvm_device.clone().into_os_string(),
        ];
        if let Some(dir) = &self.guest_console_dir {
            args.push("--guest-console-dir".into());
            args.push(abs(dir));
        }
        if let Some(store) = self.template_store(root) {
            args.push("--template-dir".into());
            args.push(store.dir().as_os_str().to_owned());
        }
        args
    }
}

/// `<prefix>/share/skiff/<name>` for this binary's `<prefix>/bin/skiff`.
fn installed(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/local/bin/skiff"));
    let prefix = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/usr/local"));
    prefix.join("share/skiff").join(name)
}
