//! `skiff boot`: boot a kernel and stream its console, exiting when the guest
//! does; or, with `--bundle`, run an OCI bundle's process in the foreground
//! with this process's stdio, exiting with its status.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::signals::{ForwardSignals, StopOnSignal};
use super::vm_args::TemplateDirArg;
use crate::runtime::foreground::{self, RunOptions};
use crate::runtime::image::ImageFormat;
use crate::runtime::sandbox::{Cancel, VmResources};
use crate::vmm::{self, BootSource, ConsoleOutput, CpuProfile, MemorySize, Vm, VmConfig, VmExit};

/// Where root filesystem images are cached unless told otherwise.
pub const DEFAULT_IMAGE_CACHE: &str = "/var/cache/skiff/images";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileChoice {
    /// host on hardware-virtualized KVM, baseline otherwise.
    Auto,
    Host,
    Baseline,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Kernel image: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "FILE", env = "SKIFF_KERNEL")]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio archive, optionally compressed). With --bundle,
    /// the skiff agent's initramfs ($SKIFF_AGENT_INITRD when not given).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Run this OCI bundle's process in the VM with this process's stdio,
    /// and exit with its status.
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Filesystem of the root image made from the bundle's rootfs.
    #[arg(long, default_value_t = ImageFormat::Erofs, requires = "bundle")]
    pub image_format: ImageFormat,
    /// Where root filesystem images are cached, by content.
    #[arg(long, value_name = "DIR", env = "SKIFF_IMAGE_CACHE", default_value = DEFAULT_IMAGE_CACHE)]
    pub image_cache: PathBuf,
    /// Kernel command line; replaces the default.
    #[arg(long, default_value = vmm::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory, e.g. 128M or 1G.
    #[arg(long, default_value = "128M")]
    pub memory: MemorySize,
    /// CPUID profile the guest sees.
    #[arg(long, value_enum, default_value_t = ProfileChoice::Auto)]
    pub cpu_profile: ProfileChoice,
    /// Write the guest console to this file instead of standard output
    /// (with --bundle the console is discarded unless this is given).
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = vmm::config::DEFAULT_KVM_DEVICE, value_name = "PATH", hide = true)]
    pub kvm_device: PathBuf,
    /// With --bundle: boot the microVM from its kernel instead of
    /// restoring it from a template.
    #[arg(long, env = "SKIFF_COLD_BOOT", value_parser = clap::builder::BoolishValueParser::new())]
    pub cold_boot: bool,
    #[command(flatten)]
    pub templates: TemplateDirArg,
}

pub fn run(args: BootArgs, state_dir: PathBuf, debug: bool) -> anyhow::Result<i32> {
    if let Some(bundle) = args.bundle.clone() {
        return run_bundle(args, bundle, state_dir, debug);
    }
    let mut config = VmConfig::new(BootSource::Linux {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
    });
    config.vcpus = args.vcpus;
    config.memory = args.memory;
    config.cpu_profile = args.cpu_profile.profile();
    config.console = match args.console {
        Some(path) => ConsoleOutput::File(path),
        None => ConsoleOutput::Stdout,
    };
    config.kvm_device = args.kvm_device;

    let signals = StopOnSignal::block()?;
    let vm = Vm::create(config)?;
    tracing::info!(profile = %vm.cpu_profile(), "booting");
    let running = vm.start()?;
    let received = signals.watch(running.stop_handle())?;
    match running.wait()? {
        VmExit::GuestReset => Ok(0),
        VmExit::TripleFault => bail!("the guest crashed: a vCPU triple-faulted"),
        VmExit::GuestPanic => bail!("the guest kernel panicked (its console says why)"),
        // As a shell reports a command killed by a signal.
        VmExit::Stopped => Ok(128 + received.try_recv().unwrap_or(libc::SIGTERM)),
    }
}

impl ProfileChoice {
    pub fn profile(self) -> Option<CpuProfile> {
        match self {
            ProfileChoice::Auto => None,
            ProfileChoice::Host => Some(CpuProfile::Host),
            ProfileChoice::Baseline => Some(CpuProfile::Baseline),
        }
    }
}

fn run_bundle(args: BootArgs, bundle: PathBuf, state_dir: PathBuf, debug: bool) -> anyhow::Result<i32> {
    let initrd = match args
        .initrd
        .or_else(|| std::env::var_os("SKIFF_AGENT_INITRD").map(PathBuf::from))
    {
        Some(p) => p,
        None => bail!("--bundle needs the agent initramfs: pass --initrd or set SKIFF_AGENT_INITRD"),
    };
    let cancel = Cancel::default();
    let mut signals = ForwardSignals::start(cancel.clone())?;
    let options = RunOptions {
        bundle,
        vm: VmResources {
            kernel: args.kernel,
            initrd,
            vcpus: args.vcpus,
            memory: args.memory,
            cpu_profile: args.cpu_profile.profile(),
            kvm_device: args.kvm_device,
        },
        image_format: args.image_format,
        image_cache: args.image_cache,
        console: args.console,
        debug_guest: debug,
        templates: (!args.cold_boot).then(|| args.templates.store(&state_dir)),
        state_dir,
    };
    match foreground::run(options, &cancel, &mut signals) {
        Ok(code) => Ok(code),
        Err(_) if signals.cancelled_by().is_some() => Ok(128 + signals.cancelled_by().unwrap_or(0)),
        Err(e) => {
            // The status carries meaning (127: no such executable), so the
            // error is reported here rather than as a generic failure.
            tracing::debug!("{e}");
            eprintln!("skiff: error: {e}");
            Ok(e.exit_code())
        }
    }
}
