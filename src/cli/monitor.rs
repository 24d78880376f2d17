//! `skiff monitor` (hidden): the process `create` starts to own a
//! container's microVM; see `runtime::monitor`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::boot::ProfileChoice;
use super::detach;
use super::signals::ForwardSignals;
use super::Globals;
use crate::runtime::image::ImageFormat;
use crate::runtime::monitor::{self, MonitorOptions};
use crate::runtime::sandbox::{Cancel, VmResources};
use crate::runtime::template::TemplateStore;
use crate::vmm::MemorySize;

#[derive(Debug, Args)]
pub struct MonitorArgs {
    pub id: String,
    #[arg(long)]
    pub bundle: PathBuf,
    #[arg(long)]
    pub vcpus: u8,
    #[arg(long)]
    pub memory: MemorySize,
    /// Host CPUs to run on, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub cpus: Option<Vec<usize>>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: PathBuf,
    #[arg(long)]
    pub image_format: ImageFormat,
    #[arg(long)]
    pub image_cache: PathBuf,
    #[arg(long, value_enum)]
    pub cpu_profile: ProfileChoice,
    #[arg(long)]
    pub kvm_device: PathBuf,
    #[arg(long)]
    pub guest_console_dir: Option<PathBuf>,
    /// Restore from the templates here; without it, boot cold.
    #[arg(long)]
    pub template_dir: Option<PathBuf>,
}

pub fn run(globals: &Globals, args: MonitorArgs) -> anyhow::Result<i32> {
    // First, before any thread exists: it edits the environment.
    let Some(ready) = detach::ready_pipe() else {
        bail!("the monitor is started by `skiff create`, not by hand");
    };
    let container = globals.store().open(&args.id)?;
    let cancel = Cancel::default();
    let mut signals = ForwardSignals::start(cancel.clone()).context("setting up signals")?;
    let guest_console = match &args.guest_console_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Some(dir.join(format!("{}.log", args.id)))
        }
        None => None,
    };
    let options = MonitorOptions {
        container,
        bundle: args.bundle,
        vm: VmResources {
            kernel: args.kernel,
            initrd: args.initrd,
            vcpus: args.vcpus,
            memory: args.memory,
            cpu_profile: args.cpu_profile.profile(),
            kvm_device: args.kvm_device,
        },
        cpus: args.cpus,
        image_format: args.image_format,
        image_cache: args.image_cache,
        console_socket: args.console_socket,
        guest_console,
        debug_guest: globals.debug,
        templates: args.template_dir.map(TemplateStore::new),
    };
    Ok(monitor::run(options, ready, &cancel, &mut signals))
}
