//! What can go wrong in the VMM, each variant naming the thing that was wrong.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    KvmUnavailable(String),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("kernel {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {}: {reason}", path.display())]
    Initrd { path: PathBuf, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("setting up the boot CPU state: {0}")]
    BootSetup(String),
    #[error("console output {}: {source}", path.display())]
    Console { path: PathBuf, source: std::io::Error },
    #[error("installing the vCPU kick signal handler: {0}")]
    KickHandler(std::io::Error),
    #[error("starting vCPU thread {index}: {source}")]
    Thread { index: u8, source: std::io::Error },
    #[error(
        "vCPU {vcpu}: the host's KVM cannot emulate the instruction at guest RIP {rip:#x} (bytes {})",
        hex(bytes)
    )]
    UnsupportedInstruction { vcpu: u8, rip: u64, bytes: Vec<u8> },
    #[error("{0}")]
    Device(String),
    #[error("vCPU {vcpu}: {reason}")]
    Vcpu { vcpu: u8, reason: String },
    #[error("snapshot {0}")]
    Snapshot(String),
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
