//! Legacy PC devices on the port I/O bus.

pub mod console;
pub mod pio;
pub mod triggers;

pub use pio::{PioBus, PioOutcome};
