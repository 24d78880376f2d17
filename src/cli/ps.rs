//! `skiff ps`: the processes of a container. The table lists them as the
//! guest sees them; the JSON form, which tools use to act on host pids, is
//! the host processes that stand for the container (its VMM).

use anyhow::bail;
use clap::Args;

use super::lifecycle::{call, format_table, Format};
use super::Globals;
use crate::runtime::control::{Request, Response};
use crate::runtime::state::Status;

#[derive(Debug, Args)]
pub struct PsArgs {
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
    pub format: Format,
    pub id: String,
    /// Options runc hands to ps(1); accepted, the table has fixed columns.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

pub fn run(globals: &Globals, args: PsArgs) -> anyhow::Result<i32> {
    let container = globals.store().open(&args.id)?;
    let (record, status) = container.current()?;
    if matches!(status, Status::Stopped | Status::Creating) {
        bail!("container not running");
    }
    if args.format == Format::Json {
        println!("{}", serde_json::to_string(&[record.pid])?);
        return Ok(0);
    }
    let Response::Processes { processes } = call(&container, &Request::Ps)? else {
        bail!("unexpected answer from the container's VMM");
    };
    let mut table = vec![["UID", "PID", "PPID", "STAT", "CMD"].map(String::from)];
    for p in processes {
        table.push([
            p.uid.to_string(),
            p.pid.to_string(),
            p.ppid.to_string(),
            p.state.to_string(),
            p.command,
        ]);
    }
    print!("{}", format_table(&table));
    Ok(0)
}
