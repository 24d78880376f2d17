//! Logging set-up, with the flags runc has: `--log FILE`, `--log-format text|json`, `--debug`.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `SKIFF_LOG` (an `EnvFilter` directive) overrides the level the flags pick.
pub const FILTER_ENV: &str = "SKIFF_LOG";

/// Returns where log lines go, so the caller does not print an error twice on stderr.
pub fn init(file: Option<&Path>, format: LogFormat, debug: bool) -> anyhow::Result<LogTarget> {
    let default_level = if debug { "debug" } else { "warn" };
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true);
    let result = match (file, format) {
        (Some(path), _) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            let writer = Mutex::new(f);
            match format {
                LogFormat::Text => builder.with_ansi(false).with_writer(writer).try_init(),
                LogFormat::Json => builder.json().with_writer(writer).try_init(),
            }
        }
        (None, LogFormat::Text) => builder.with_writer(std::io::stderr).try_init(),
        (None, LogFormat::Json) => builder.json().with_writer(std::io::stderr).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))?;
    // fuse-backend-rs logs each request at trace level by converting its
    // opcode to an enum unchecked; a guest may send one the enum lacks
    // (the device answers those itself, but a second vCPU can change the
    // header after that check). Its `log` records never go below debug.
    log::set_max_level(log::LevelFilter::Debug.min(log::max_level()));
    Ok(if file.is_some() {
        LogTarget::File
    } else {
        LogTarget::Stderr
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    File,
}
