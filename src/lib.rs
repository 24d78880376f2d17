//! skiff: an OCI container runtime that runs every container in its own KVM microVM.
//!
//! Data flows one way: [`cli`] → [`runtime`] → [`vmm`] → devices.

pub mod cli;
pub mod logging;
pub mod runtime;
pub mod vmm;
