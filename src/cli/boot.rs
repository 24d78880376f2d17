//! `skiff boot`: boot a kernel and stream its console, exiting when the guest does.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::signals::StopOnSignal;
use crate::vmm::{self, BootSource, ConsoleOutput, CpuProfile, MemorySize, Vm, VmConfig, VmExit};

/// The microVM defaults: serial console, keyboard-controller reboot so a
/// guest `reboot` ends the VM, one UART to probe, and no speculative-execution
/// mitigations inside a guest that is already isolated by the hypervisor.
/// Parameters the guest kernel does not know would be handed to its init as
/// arguments, so there are none for features the skiff kernel leaves out.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 mitigations=off";

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
    #[arg(long, value_name = "FILE")]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio archive, optionally compressed).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; replaces the default.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
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
    /// Write the guest console to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = vmm::config::DEFAULT_KVM_DEVICE, value_name = "PATH", hide = true)]
    pub kvm_device: PathBuf,
}

pub fn run(args: BootArgs) -> anyhow::Result<i32> {
    let mut config = VmConfig::new(BootSource::Linux {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
    });
    config.vcpus = args.vcpus;
    config.memory = args.memory;
    config.cpu_profile = match args.cpu_profile {
        ProfileChoice::Auto => None,
        ProfileChoice::Host => Some(CpuProfile::Host),
        ProfileChoice::Baseline => Some(CpuProfile::Baseline),
    };
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
