//! The `skiff` command line.

mod boot;
mod signals;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

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
    #[arg(long, global = true, default_value = "/run/skiff", value_name = "DIR")]
    pub root: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel in a microVM with its console on standard output, or run
    /// an OCI bundle in one in the foreground (debugging aids).
    Boot(boot::BootArgs),
}

/// Runs the command; the result is the process exit status.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Boot(args) => boot::run(args, cli.root, cli.debug),
    }
}
