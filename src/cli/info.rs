//! `skiff features` and `skiff spec`.

use std::path::PathBuf;

use clap::Args;

use crate::runtime::{default_spec, features};

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Directory to write config.json into.
    #[arg(long, short = 'b', default_value = ".", value_name = "DIR")]
    pub bundle: PathBuf,
    /// A spec for a container started by an unprivileged user.
    #[arg(long)]
    pub rootless: bool,
}

pub fn features() -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(&features::features())?);
    Ok(0)
}

pub fn spec(args: SpecArgs) -> anyhow::Result<i32> {
    default_spec::write_spec(&args.bundle, args.rootless)?;
    Ok(0)
}
