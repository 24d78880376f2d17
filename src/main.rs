use clap::Parser;

use skiff::cli::{self, Cli};
use skiff::logging::{self, LogTarget};

fn main() {
    let cli = Cli::parse();
    let target = match logging::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        Ok(target) => target,
        Err(e) => {
            eprintln!("skiff: error: {e:#}");
            std::process::exit(1);
        }
    };
    let code = match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Callers read the error from stderr, as from runc; the log file keeps a copy.
            if target == LogTarget::File {
                tracing::error!("{e:#}");
            }
            eprintln!("skiff: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
