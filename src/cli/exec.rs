//! `skiff exec`: a further process in a running container. The command
//! (or, detached, a copy of skiff it leaves behind) holds a connection to
//! the container's monitor for as long as the process runs and exits with
//! its status, so a shim can wait on its pid as on runc's exec'd process;
//! signals it receives are forwarded, and killing it kills the process.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use oci_spec::runtime::{Process, User};
use serde::{Deserialize, Serialize};

use super::detach;
use super::lifecycle::call;
use super::signals::ForwardSignals;
use super::Globals;
use crate::runtime::bundle;
use crate::runtime::control::{self, Request, Response};
use crate::runtime::sandbox::Cancel;
use crate::runtime::state::Container;
use crate::runtime::terminal::RawMode;
use crate::runtime::RuntimeError;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The process as OCI JSON (a config.json `process`), instead of the
    /// command and flags.
    #[arg(long, short = 'p', value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Return once the process runs.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the pid that stands for the process (it exits with the
    /// process's status) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Add an environment variable (NAME=value).
    #[arg(long, short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// uid[:gid] to run as.
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Supplementary group ids.
    #[arg(long, short = 'g', value_name = "GID")]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privs for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// The copy of skiff a detached exec leaves behind.
    #[arg(long, hide = true)]
    pub detached_child: bool,
    pub id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// What a detached exec's child reports to the command that started it.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ExecReport {
    Started,
    Failed { message: String, code: i32 },
}

pub fn run(globals: &Globals, args: ExecArgs) -> anyhow::Result<i32> {
    let container = globals.store().open(&args.id)?;
    let process = build_process(&container, &args)?;
    let terminal = process.terminal().unwrap_or(false);
    if terminal && args.detach && args.console_socket.is_none() {
        bail!("cannot allocate tty if skiff will detach without setting console socket");
    }
    if args.detach && !args.detached_child {
        return start_detached(&args, terminal);
    }
    let ready = if args.detached_child {
        detach::ready_pipe()
    } else {
        None
    };
    let cancel = Cancel::default();
    let mut signals = ForwardSignals::start(cancel).context("setting up signals")?;

    let console_socket = args.console_socket.clone().filter(|_| terminal);
    let fds: Vec<i32> = if console_socket.is_some() {
        vec![]
    } else {
        vec![0, 1, 2]
    };
    let request = Request::Exec {
        process: Box::new(process),
        console_socket: console_socket.map(|s| super::absolute(&s)),
    };
    let mut conn = control::connect(&container.control_socket())?;
    let first = control::call(&mut conn, &request, &fds).and_then(Response::into_result);
    let id = match first {
        Ok(Response::ExecStarted { id }) => id,
        Ok(other) => bail!("unexpected answer from the container's VMM: {other:?}"),
        Err(e) => {
            report(ready, &ExecReport::failed(&e));
            // The status says what went wrong (127: no such executable), as
            // a shell's does.
            tracing::debug!("{e}");
            eprintln!("skiff: error: {e}");
            return Ok(e.exit_code());
        }
    };
    report(ready, &ExecReport::Started);
    // Detached, the command that started this one writes the file.
    if let (Some(path), false) = (&args.pid_file, args.detached_child) {
        super::create::write_pid_file(path, std::process::id())?;
    }

    let target = container.clone();
    let process_id = id.clone();
    signals_forward(&mut signals, target, process_id);
    let _raw = (terminal && !args.detached_child)
        .then(|| RawMode::enable(std::io::stdin().as_fd()))
        .flatten();
    match control::next_response(&mut conn)? {
        Response::Exited { status } => Ok(status),
        Response::Error { message, code } => Err(RuntimeError::Exec { message, code }.into()),
        other => bail!("unexpected answer from the container's VMM: {other:?}"),
    }
}

impl ExecReport {
    fn failed(e: &RuntimeError) -> ExecReport {
        ExecReport::Failed {
            message: e.to_string(),
            code: e.exit_code(),
        }
    }
}

fn report(ready: Option<File>, report: &ExecReport) {
    if let Some(mut f) = ready {
        let _ = serde_json::to_writer(&mut f, report);
    }
}

fn signals_forward(signals: &mut ForwardSignals, container: Container, id: String) {
    use crate::runtime::foreground::SignalSource;
    signals.forward(Box::new(move |signal| {
        let request = Request::Signal {
            signal,
            all: false,
            process: Some(id.clone()),
        };
        if let Err(e) = call(&container, &request) {
            tracing::debug!("forwarding signal {signal}: {e}");
        }
    }));
}

/// Leaves a copy of this command behind that holds the process, and
/// returns once the process runs with that copy's pid in --pid-file.
fn start_detached(args: &ExecArgs, terminal: bool) -> anyhow::Result<i32> {
    // The same command line, marked: everything the caller said still holds.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let Some(pos) = argv.iter().position(|a| a == "exec") else {
        bail!("cannot find the exec command in the command line");
    };
    argv.insert(pos + 1, "--detached-child".into());
    let mut child = detach::spawn(argv, terminal)?;
    match child.wait_ready::<ExecReport>() {
        Ok(Some(ExecReport::Started)) => {}
        Ok(Some(ExecReport::Failed { message, code })) => {
            let _ = child.child.wait();
            return Err(RuntimeError::Exec { message, code }.into());
        }
        Ok(None) | Err(_) => {
            let status = child.child.wait()?;
            bail!("the exec process exited before the process started ({status})");
        }
    }
    if let Some(path) = &args.pid_file {
        if let Err(e) = super::create::write_pid_file(path, child.child.id()) {
            let _ = child.child.kill();
            return Err(e);
        }
    }
    Ok(0)
}

/// The process from --process, or runc's way: the container's own process
/// with the command, terminal, env, cwd and user of the flags.
fn build_process(container: &Container, args: &ExecArgs) -> anyhow::Result<Process> {
    if let Some(path) = &args.process {
        let file = File::open(path).with_context(|| format!("opening process file {}", path.display()))?;
        let de = &mut serde_json::Deserializer::from_reader(BufReader::new(file));
        let process: Process = serde_path_to_error::deserialize(de).map_err(|e| {
            anyhow::anyhow!(
                "process file {}: invalid field `{}`: {}",
                path.display(),
                e.path(),
                e.inner()
            )
        })?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            bail!("process file {}: args must not be empty", path.display());
        }
        return Ok(process);
    }
    if args.command.is_empty() {
        bail!("exec needs a command to run (or --process)");
    }
    let record = container.load()?;
    let config = record.bundle.join("config.json");
    let file = File::open(&config).with_context(|| format!("reading {}", config.display()))?;
    let spec =
        bundle::parse_spec(BufReader::new(file)).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.command.clone()));
    process.set_terminal(Some(args.tty));
    process.set_console_size(None);
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.into());
    }
    if let Some(user) = &args.user {
        process.set_user(parse_user(user, &args.additional_gids)?);
    } else if !args.additional_gids.is_empty() {
        let mut u = process.user().clone();
        u.set_additional_gids(Some(args.additional_gids.clone()));
        process.set_user(u);
    }
    if args.no_new_privs {
        process.set_no_new_privileges(Some(true));
    }
    Ok(process)
}

fn parse_user(text: &str, gids: &[u32]) -> anyhow::Result<User> {
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let uid: u32 = uid
        .parse()
        .map_err(|_| anyhow::anyhow!("--user {text:?}: expected uid[:gid] as numbers"))?;
    let gid: u32 = match gid {
        Some(g) => g
            .parse()
            .map_err(|_| anyhow::anyhow!("--user {text:?}: expected uid[:gid] as numbers"))?,
        None => 0,
    };
    let mut user = User::default();
    user.set_uid(uid);
    user.set_gid(gid);
    if !gids.is_empty() {
        user.set_additional_gids(Some(gids.to_vec()));
    }
    Ok(user)
}
