//! Console logging. Every line starts with `skiff-agent:` so the host can
//! tell the agent's words from the kernel's on the serial console.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one line in a single `write`, so lines from different threads do
/// not interleave. A console that cannot be written to is not worth dying
/// for, hence the ignored result.
pub fn line(args: std::fmt::Arguments<'_>) {
    let text = format!("skiff-agent: {args}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Always printed: warnings and errors.
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}

/// Printed only with `skiff.debug` on the kernel command line (or
/// `Config::debug`).
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::line(format_args!($($arg)*))
        }
    };
}

pub(crate) use {debug, info};
