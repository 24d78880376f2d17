//! skiff: an OCI container runtime that runs every container in its own KVM microVM.
//!
//! Data flows one way: [`cli`] → [`runtime`] → [`vmm`] → devices.

pub mod cli;
pub mod logging;
pub mod runtime;
pub mod vmm;

/// This build: the version and a hash of the sources it was built from.
/// Snapshots and templates carry it and are only restored by the same.
pub const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("SKIFF_SOURCE_ID"));
