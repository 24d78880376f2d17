//! The `skiff` command line: runc's commands and flags, so containerd's
//! runc shim and podman can drive skiff as they drive runc, plus `boot`.

mod boot;
mod create;
mod detach;
mod exec;
mod info;
mod lifecycle;
mod monitor;
mod ps;
mod run;
mod signals;
mod template;
mod vm_args;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;
use crate::runtime::state::Store;

/// Where runc keeps its state; skiff's sits beside it.
pub const DEFAULT_ROOT: &str = "/run/skiff";

#[derive(Debug, Parser)]
#[command(
    name = "skiff",
    version,
    about = "An OCI runtime that runs each container in its own KVM microVM"
)]
pub struct Cli {
    /// Write logs to this file instead of standard error.
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log at debug level.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Directory for runtime state.
    #[arg(long, global = true, default_value = DEFAULT_ROOT, value_name = "DIR")]
    pub root: PathBuf,
    /// Accepted for runc compatibility: skiff does not place containers in
    /// host cgroups, so the cgroup manager makes no difference.
    #[arg(long)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility (true, false or auto); a microVM
    /// needs /dev/kvm whoever runs it.
    #[arg(long, value_name = "VALUE")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility; checkpointing is not supported.
    #[arg(long, value_name = "PATH", hide = true)]
    pub criu: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container: boot its microVM and prepare its process, which
    /// waits for `start`.
    Create(create::CreateArgs),
    /// Start the process of a created container.
    Start(lifecycle::IdArg),
    /// Print a container's state as JSON.
    State(lifecycle::IdArg),
    /// Send a signal to a container's process (SIGTERM by default).
    Kill(lifecycle::KillArgs),
    /// Delete a stopped container (any container with --force).
    Delete(lifecycle::DeleteArgs),
    /// Create and start a container, and wait for it unless detached.
    Run(run::RunArgs),
    /// Run a further process in a running container.
    Exec(exec::ExecArgs),
    /// List the processes running in a container.
    Ps(ps::PsArgs),
    /// List containers.
    #[command(alias = "ls")]
    List(lifecycle::ListArgs),
    /// Freeze every process of a container (its vCPUs stop).
    Pause(lifecycle::IdArg),
    /// Let a paused container go on.
    Resume(lifecycle::IdArg),
    /// What this runtime supports, as JSON.
    Features,
    /// Write a default config.json into a bundle directory.
    Spec(info::SpecArgs),
    /// Boot a kernel in a microVM with its console on standard output, or run
    /// an OCI bundle in one in the foreground (debugging aids).
    Boot(boot::BootArgs),
    /// List, prebuild or remove the template VMs containers are restored from.
    Template(template::TemplateArgs),
    /// The process that owns a container's microVM (started by `create`).
    #[command(hide = true)]
    Monitor(monitor::MonitorArgs),
}

/// The global flags, as the commands need them.
#[derive(Debug, Clone)]
pub struct Globals {
    pub root: PathBuf,
    pub log: Option<PathBuf>,
    pub log_format: LogFormat,
    pub debug: bool,
}

impl Globals {
    pub fn store(&self) -> Store {
        Store::new(&self.root)
    }

    /// The flags a process skiff starts of itself must get to log and keep
    /// state where this one does.
    fn args(&self, log: Option<PathBuf>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--root".into(), absolute(&self.root).into()];
        if let Some(log) = log.or_else(|| self.log.clone()) {
            args.push("--log".into());
            args.push(absolute(&log).into());
        }
        args.push("--log-format".into());
        args.push(
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into(),
        );
        if self.debug {
            args.push("--debug".into());
        }
        args
    }
}

/// Runs the command; the result is the process exit status.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let globals = Globals {
        root: cli.root,
        log: cli.log,
        log_format: cli.log_format,
        debug: cli.debug,
    };
    match cli.command {
        Command::Create(args) => create::run(&globals, args),
        Command::Start(args) => lifecycle::start(&globals, args),
        Command::State(args) => lifecycle::state(&globals, args),
        Command::Kill(args) => lifecycle::kill(&globals, args),
        Command::Delete(args) => lifecycle::delete(&globals, args),
        Command::Run(args) => run::run(&globals, args),
        Command::Exec(args) => exec::run(&globals, args),
        Command::Ps(args) => ps::run(&globals, args),
        Command::List(args) => lifecycle::list(&globals, args),
        Command::Pause(args) => lifecycle::pause(&globals, args),
        Command::Resume(args) => lifecycle::resume(&globals, args),
        Command::Features => info::features(),
        Command::Spec(args) => info::spec(args),
        Command::Boot(args) => boot::run(args, globals.root, globals.debug),
        Command::Template(args) => template::run(&globals, args),
        Command::Monitor(args) => monitor::run(&globals, args),
    }
}

/// `path` made absolute against the working directory (which a detached
/// process does not share the meaning of).
pub fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
