//! The devices of a skiff VM: legacy PC devices on the port I/O bus and
//! virtio devices on MMIO.

pub mod console;
pub mod pio;
pub mod triggers;
pub mod virtio;

pub use pio::{PioBus, PioOutcome};
