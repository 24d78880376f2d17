//! Containers in microVMs: a bundle's rootfs made into an image, a VM booted
//! with the guest agent, and the process driven through the skiff protocol.

pub mod bundle;
pub mod error;
pub mod foreground;
pub mod image;
pub mod resolve;
pub mod sandbox;

pub use error::RuntimeError;
