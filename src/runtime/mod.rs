//! Containers in microVMs: a bundle's rootfs made into an image, a VM booted
//! with the guest agent, and the process driven through the skiff protocol.

pub mod bundle;
pub mod control;
pub mod default_spec;
pub mod error;
pub mod features;
pub mod foreground;
pub mod hooks;
pub mod host_mounts;
pub mod image;
pub mod monitor;
pub mod relay;
pub mod resolve;
pub mod root;
pub mod sandbox;
pub mod sizing;
pub mod state;
pub mod template;
pub mod terminal;

pub use error::RuntimeError;
