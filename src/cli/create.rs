//! `skiff create`: checks the bundle, claims the id, and starts the
//! container's monitor in its own session; returns once the container's
//! process exists and waits for `start`, with the monitor's pid in
//! `--pid-file`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::detach::{self, Detached};
use super::vm_args::VmArgs;
use super::{absolute, Globals};
use crate::runtime::bundle::Bundle;
use crate::runtime::monitor::ReadyReport;
use crate::runtime::sizing::{self, VmSize};
use crate::runtime::state::{self, Container, Record, Status};
use crate::runtime::RuntimeError;
use crate::runtime::{host_mounts, root, template};

/// The monitor's log when the caller asked for none: not the container's
/// stderr, which the monitor's own stderr is.
const MONITOR_LOG: &str = "monitor.log";

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The container's id (unique under --root).
    pub id: String,
    #[command(flatten)]
    pub common: CreateOptions,
}

/// What `create` and `run` share.
#[derive(Debug, Args)]
pub struct CreateOptions {
    /// The bundle directory (config.json and the rootfs).
    #[arg(long, short = 'b', default_value = ".", value_name = "DIR")]
    pub bundle: PathBuf,
    /// Write the container's pid (its monitor's) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the master of the container's terminal
    /// when process.terminal is true.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility: the guest has no pivot_root concerns.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility: the guest has its own keyrings.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass this many descriptors beyond stdio to the container (none can
    /// cross into a microVM, so only 0 is accepted).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub preserve_fds: u32,
    #[command(flatten)]
    pub vm: VmArgs,
}

pub fn run(globals: &Globals, args: CreateArgs) -> anyhow::Result<i32> {
    create(globals, &args.id, &args.common, false).map(|_| 0)
}

/// Creates the container; its monitor is the returned child. `foreground`
/// is `run` without `--detach`: the caller's terminal, if any, is the
/// container's.
pub fn create(
    globals: &Globals,
    id: &str,
    options: &CreateOptions,
    foreground: bool,
) -> anyhow::Result<Detached> {
    state::validate_id(id)?;
    if options.preserve_fds > 0 {
        bail!("--preserve-fds: descriptors cannot be passed into a microVM");
    }
    let bundle_dir = absolute(&options.bundle);
    let bundle = Bundle::load(&bundle_dir)?;
    let terminal = bundle.process().terminal().unwrap_or(false);
    if terminal && options.console_socket.is_none() && !foreground {
        bail!("cannot allocate tty if skiff will detach without setting console socket");
    }
    if !terminal && options.console_socket.is_some() {
        bail!("cannot use console socket if skiff will not detach or allocate tty");
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = sizing::size_for(&bundle.spec, host_cpus)?;
    // Checked here too, so that a bad mount or root is reported before an
    // id is claimed; the monitor does the work.
    host_mounts::for_guest(bundle.spec.mounts().as_deref().unwrap_or(&[]))?;
    root::mode(&bundle.spec)?;
    template::boot_mode(&bundle.spec)?;
    options.vm.check()?;

    let store = globals.store();
    // A directory without a record is a create that died early; runc
    // removes those too.
    if store.open(id).is_err() {
        store.remove_leftover(id)?;
    }
    let container = store.create(&Record {
        id: id.to_owned(),
        status: Status::Creating,
        pid: 0,
        pid_start: 0,
        bundle: bundle_dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: state::now_rfc3339(),
        owner: state::owner(),
        annotations: bundle
            .spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        exit_status: None,
        hooks: bundle.spec.hooks().clone(),
    })?;
    match start_monitor(
        globals,
        &container,
        options,
        &bundle_dir,
        &size,
        terminal && !foreground,
    ) {
        Ok(monitor) => Ok(monitor),
        Err(e) => {
            let _ = container.remove();
            Err(e)
        }
    }
}

fn start_monitor(
    globals: &Globals,
    container: &Container,
    options: &CreateOptions,
    bundle: &Path,
    size: &VmSize,
    quiet: bool,
) -> anyhow::Result<Detached> {
    let log = globals.log.is_none().then(|| container.dir.join(MONITOR_LOG));
    let mut args = globals.args(log);
    args.extend(["monitor".into(), container.id.clone().into()]);
    args.extend(["--bundle".into(), bundle.as_os_str().to_owned()]);
    args.extend(["--vcpus".into(), size.vcpus.to_string().into()]);
    args.extend(["--memory".into(), size.memory.0.to_string().into()]);
    if let Some(cpus) = &size.cpus {
        let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
        args.extend(["--cpus".into(), list.join(",").into()]);
    }
    if let Some(socket) = &options.console_socket {
        args.extend(["--console-socket".into(), absolute(socket).into()]);
    }
    args.extend(options.vm.to_args(&globals.root));

    let mut monitor = detach::spawn(args, quiet)?;
    match monitor.wait_ready::<ReadyReport>() {
        Ok(Some(ReadyReport::Created)) => {}
        Ok(Some(ReadyReport::Failed { message, code })) => {
            let _ = monitor.child.wait();
            return Err(RuntimeError::Exec { message, code }.into());
        }
        Ok(None) | Err(_) => {
            let status = monitor.child.wait().context("waiting for the VMM process")?;
            bail!(
                "the container's VMM process exited during create ({status}); its log says why ({})",
                globals
                    .log
                    .clone()
                    .unwrap_or_else(|| container.dir.join(MONITOR_LOG))
                    .display()
            );
        }
    }
    if let Some(path) = &options.pid_file {
        if let Err(e) = write_pid_file(path, monitor.child.id()) {
            // The container exists but nobody could find its process: undo it.
            let _ = monitor.child.kill();
            let _ = monitor.child.wait();
            return Err(e);
        }
    }
    Ok(monitor)
}

/// Written whole or not at all, as runc does: a shim reading it early
/// never sees half a number.
pub fn write_pid_file(path: &Path, pid: u32) -> anyhow::Result<()> {
    let path = absolute(path);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing pid file {}", path.display()))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}
