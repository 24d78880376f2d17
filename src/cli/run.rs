//! `skiff run`: create, start and (unless detached) wait for the container,
//! then delete it, exiting with its status.

use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;

use anyhow::Context;
use clap::Args;

use super::create::{self, CreateOptions};
use super::lifecycle::{self, call, DeleteArgs, IdArg};
use super::signals::ForwardSignals;
use super::Globals;
use crate::runtime::control::Request;
use crate::runtime::foreground::SignalSource;
use crate::runtime::sandbox::Cancel;
use crate::runtime::terminal::{self, RawMode};

#[derive(Debug, Args)]
pub struct RunArgs {
    pub id: String,
    #[command(flatten)]
    pub common: CreateOptions,
    /// Return once the container runs.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Keep the container's state after it exits (delete it yourself).
    #[arg(long)]
    pub keep: bool,
}

pub fn run(globals: &Globals, args: RunArgs) -> anyhow::Result<i32> {
    let cancel = Cancel::default();
    let mut signals = ForwardSignals::start(cancel).context("setting up signals")?;
    let mut monitor = create::create(globals, &args.id, &args.common, !args.detach)?;
    let container = globals.store().open(&args.id)?;
    // Our terminal is the container's: keys go to it as typed.
    let raw = (!args.detach && terminal::is_terminal(std::io::stdin()))
        .then(|| RawMode::enable(std::io::stdin().as_fd()))
        .flatten();
    if let Err(e) = lifecycle::start(globals, IdArg { id: args.id.clone() }) {
        drop(raw);
        let _ = lifecycle::delete(
            globals,
            DeleteArgs {
                force: true,
                id: args.id.clone(),
            },
        );
        let _ = monitor.child.wait();
        return Err(e);
    }
    if args.detach {
        return Ok(0);
    }
    let target = container.clone();
    signals.forward(Box::new(move |signal| {
        let request = Request::Signal {
            signal,
            all: false,
            process: None,
        };
        if let Err(e) = call(&target, &request) {
            tracing::debug!("forwarding signal {signal}: {e}");
        }
    }));
    let status = monitor.child.wait().context("waiting for the container")?;
    drop(raw);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(libc::SIGKILL));
    if !args.keep {
        lifecycle::delete(
            globals,
            DeleteArgs {
                force: true,
                id: args.id,
            },
        )?;
    }
    Ok(code)
}
