//! `start`, `state`, `kill`, `delete`, `list`, `pause` and `resume`: the
//! commands that act on an existing container, with runc's messages.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::Globals;
use crate::runtime::control::{self, Request, Response};
use crate::runtime::hooks::{run_hooks_logged, HookKind};
use crate::runtime::state::{self, Container, Record, Status};
use crate::runtime::RuntimeError;

/// How long `delete` waits for a killed container's monitor to exit before
/// killing the monitor itself.
const MONITOR_EXIT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct IdArg {
    pub id: String,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Send the signal to every process in the container.
    #[arg(long, short = 'a')]
    pub all: bool,
    pub id: String,
    /// A name (TERM, SIGTERM) or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill the container first if it still runs.
    #[arg(long, short = 'f')]
    pub force: bool,
    pub id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Only the ids.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn start(globals: &Globals, args: IdArg) -> anyhow::Result<i32> {
    let container = globals.store().open(&args.id)?;
    let _lock = container.lock()?;
    let (_, status) = container.current()?;
    match status {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Running | Status::Paused => bail!("cannot start an already running container"),
        Status::Creating => bail!("cannot start a container that is still being created"),
    }
    call(&container, &Request::Start)?;
    Ok(0)
}

pub fn state(globals: &Globals, args: IdArg) -> anyhow::Result<i32> {
    let container = globals.store().open(&args.id)?;
    let (record, status) = container.current()?;
    println!("{}", serde_json::to_string_pretty(&record.oci_state(status))?);
    Ok(0)
}

pub fn kill(globals: &Globals, args: KillArgs) -> anyhow::Result<i32> {
    let signal = parse_signal(&args.signal)?;
    let container = globals.store().open(&args.id)?;
    let (_, status) = container.current()?;
    if matches!(status, Status::Stopped | Status::Creating) {
        bail!("container not running");
    }
    call(
        &container,
        &Request::Signal {
            signal,
            all: args.all,
            process: None,
        },
    )?;
    Ok(0)
}

pub fn delete(globals: &Globals, args: DeleteArgs) -> anyhow::Result<i32> {
    let store = globals.store();
    let container = match store.open(&args.id) {
        Ok(c) => c,
        Err(RuntimeError::NotFound(_)) => {
            // What a create that died early may have left.
            store.remove_leftover(&args.id)?;
            if args.force {
                return Ok(0);
            }
            return Err(RuntimeError::NotFound(args.id).into());
        }
        Err(e) => return Err(e.into()),
    };
    let _lock = container.lock()?;
    let (record, status) = container.current()?;
    match status {
        // The monitor records the end before it has unmapped the guest and
        // exited; delete leaves no process behind.
        Status::Stopped => await_monitor_exit(&record),
        // As runc: a container that never ran goes without --force.
        Status::Created | Status::Creating => stop(&container, &record),
        Status::Running | Status::Paused if args.force => stop(&container, &record),
        Status::Running | Status::Paused => {
            bail!(
                "cannot delete container {} that is not stopped: {status}",
                args.id
            )
        }
    }
    if let Some(hooks) = &record.hooks {
        run_hooks_logged(hooks, HookKind::Poststop, &record.oci_state(Status::Stopped));
    }
    container.remove()?;
    Ok(0)
}

pub fn list(globals: &Globals, args: ListArgs) -> anyhow::Result<i32> {
    let mut rows = Vec::new();
    for container in globals.store().list()? {
        // One vanishing under us (a concurrent delete) is not an error.
        if let Ok((record, status)) = container.current() {
            rows.push(record.oci_state(status));
        }
    }
    if args.quiet {
        for r in &rows {
            println!("{}", r.id);
        }
        return Ok(0);
    }
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&rows)?),
        Format::Table => {
            let mut table = vec![["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from)];
            for r in rows {
                table.push([
                    r.id,
                    r.pid.to_string(),
                    r.status.to_string(),
                    r.bundle.display().to_string(),
                    r.created,
                    r.owner,
                ]);
            }
            print!("{}", format_table(&table));
        }
    }
    Ok(0)
}

pub fn pause(globals: &Globals, args: IdArg) -> anyhow::Result<i32> {
    let container = globals.store().open(&args.id)?;
    let _lock = container.lock()?;
    if container.current()?.1 != Status::Running {
        bail!("container not running");
    }
    call(&container, &Request::Pause)?;
    Ok(0)
}

pub fn resume(globals: &Globals, args: IdArg) -> anyhow::Result<i32> {
    let container = globals.store().open(&args.id)?;
    let _lock = container.lock()?;
    if container.current()?.1 != Status::Paused {
        bail!("container not paused");
    }
    call(&container, &Request::Resume)?;
    Ok(0)
}

/// One request to the container's monitor; its error becomes ours.
pub fn call(container: &Container, request: &Request) -> Result<Response, RuntimeError> {
    let mut conn = control::connect(&container.control_socket())?;
    control::call(&mut conn, request, &[])?.into_result()
}

/// Kills the container and waits until its monitor is gone; a monitor that
/// does not answer or does not exit is killed itself.
fn stop(container: &Container, record: &Record) {
    let kill = Request::Signal {
        signal: libc::SIGKILL,
        all: true,
        process: None,
    };
    if call(container, &kill).is_err() {
        kill_monitor(record);
    }
    await_monitor_exit(record);
}

/// Waits for the container's monitor to exit, and kills it if it takes
/// longer than [`MONITOR_EXIT_GRACE`].
fn await_monitor_exit(record: &Record) {
    let deadline = Instant::now() + MONITOR_EXIT_GRACE;
    while state::monitor_alive(record) {
        if Instant::now() > deadline {
            tracing::warn!(pid = record.pid, "the container's VMM did not exit; killing it");
            kill_monitor(record);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_monitor(record: &Record) {
    // Checked right before, so a recycled pid is not someone else's process.
    if state::monitor_alive(record) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(record.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A signal as runc takes it: `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(text: &str) -> anyhow::Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        // Real-time signals have no names nix knows; the kernel's range is what counts.
        if (1..=libc::SIGRTMAX()).contains(&n) {
            return Ok(n);
        }
        bail!("unknown signal {text:?}");
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name)
        .map(|s| s as i32)
        .map_err(|_| anyhow::anyhow!("unknown signal {text:?}"))
}

/// Columns padded to their widest cell, as runc's tabwriter prints them.
pub fn format_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_as_runc_takes_them() {
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("term").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("40").unwrap(), 40);
        for bad in ["FOO", "SIGFOO", "0", "-1", "99", ""] {
            let e = parse_signal(bad).unwrap_err().to_string();
            assert!(e.starts_with("unknown signal"), "{bad}: {e}");
        }
    }

    #[test]
    fn tables_line_up() {
        let t = format_table(&[
            ["ID".to_string(), "PID".to_string()],
            ["long-name".to_string(), "1".to_string()],
        ]);
        assert_eq!(t, "ID          PID\nlong-name   1\n");
    }
}
