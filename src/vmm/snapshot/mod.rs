//! A paused VM written to a directory, and read back for a restore.
//!
//! ```text
//! <dir>/state.json     vCPUs, interrupt controllers, PIT, clock, devices
//! <dir>/memory         guest RAM, sparse
//! <dir>/snapshot.json  format, and hashes of the two above; written last
//! ```
//! A snapshot is only used whole: a missing or changed file, one of another
//! format or skiff version, or one taken with other CPUID leaves than this
//! host's KVM gives is refused with the reason, never half-restored.

pub mod memory_file;
pub mod vcpu_state;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, CpuId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_superio::serial::SerialState;

use super::devices::virtio::mmio::TransportSnapshot;
use super::error::{Error, Result};
pub use vcpu_state::VcpuState;

/// Bumped whenever what is saved, or how, changes.
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "snapshot.json";
const STATE: &str = "state.json";
const MEMORY: &str = "memory";

/// The 8259 PICs and the IOAPIC, as `KVM_GET_IRQCHIP` numbers them.
pub const IRQCHIPS: [u32; 3] = [
    kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
    kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    kvm_bindings::KVM_IRQCHIP_IOAPIC,
];

/// How vm-superio's `SerialState` (the 16550's registers) is saved.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Everything but the memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub memory_bytes: u64,
    /// The CPU profile by name, and a hash of the CPUID leaves vCPU 0 was
    /// given: a guest kernel patched itself for those features.
    pub cpu_profile: String,
    pub cpuid_hash: String,
    pub vcpus: Vec<VcpuState>,
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// In virtio-mmio slot order.
    pub devices: Vec<TransportSnapshot>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Manifest {
    format: u32,
    /// The skiff that wrote it: the device models and the meaning of their
    /// state are this build's.
    skiff_version: String,
    state_sha256: String,
    memory_bytes: u64,
    memory_sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What CPUID a vCPU was given, as one hash.
pub fn cpuid_hash(cpuid: &CpuId) -> String {
    let mut h = Sha256::new();
    for e in cpuid.as_slice() {
        for word in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            h.update(word.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn snapshot_err(dir: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Snapshot(format!("{}: {reason}", dir.display()))
}

/// Writes `state` and guest RAM (through `save_memory`, which gets the
/// memory file's path and returns its content hash) into `dir`, which
/// must not exist yet. On failure nothing is left.
pub fn write(dir: &Path, state: &VmState, save_memory: impl FnOnce(&Path) -> Result<String>) -> Result<()> {
    std::fs::create_dir(dir).map_err(|e| snapshot_err(dir, format!("creating it: {e}")))?;
    let written = (|| {
        let json =
            serde_json::to_vec(state).map_err(|e| snapshot_err(dir, format!("encoding the state: {e}")))?;
        write_synced(&dir.join(STATE), &json)?;
        let memory_sha256 = save_memory(&dir.join(MEMORY))?;
        let manifest = Manifest {
            format: FORMAT,
            skiff_version: crate::BUILD.to_owned(),
            state_sha256: sha256_hex(&json),
            memory_bytes: state.memory_bytes,
            memory_sha256,
        };
        let manifest = serde_json::to_vec_pretty(&manifest).expect("a manifest encodes");
        write_synced(&dir.join(MANIFEST), &manifest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    written
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| Error::Snapshot(format!("writing {}: {e}", path.display()));
    let mut f = File::create_new(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// A snapshot read back and checked whole.
pub struct Loaded {
    pub state: VmState,
    pub memory: File,
    pub dir: PathBuf,
}

/// Reads the snapshot in `dir`, checking every file against the manifest.
pub fn load(dir: &Path) -> Result<Loaded> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| snapshot_err(dir, format!("reading {name}: {e}")))
    };
    let manifest: Manifest = serde_json::from_slice(&read(MANIFEST)?)
        .map_err(|e| snapshot_err(dir, format!("{MANIFEST} is damaged: {e}")))?;
    if manifest.format != FORMAT || manifest.skiff_version != crate::BUILD {
        return Err(snapshot_err(
            dir,
            format!(
                "written by skiff {} in format {}; this is skiff {} with format {FORMAT}",
                manifest.skiff_version,
                manifest.format,
                crate::BUILD
            ),
        ));
    }
    let json = read(STATE)?;
    if sha256_hex(&json) != manifest.state_sha256 {
        return Err(snapshot_err(
            dir,
            format!("{STATE} does not match its hash: it was changed or cut short"),
        ));
    }
    let state: VmState =
        serde_json::from_slice(&json).map_err(|e| snapshot_err(dir, format!("{STATE} is damaged: {e}")))?;
    let memory_path = dir.join(MEMORY);
    let memory = File::open(&memory_path).map_err(|e| snapshot_err(dir, format!("opening {MEMORY}: {e}")))?;
    let len = memory
        .metadata()
        .map_err(|e| snapshot_err(dir, format!("{MEMORY}: {e}")))?
        .len();
    if len != manifest.memory_bytes || len != state.memory_bytes {
        return Err(snapshot_err(
            dir,
            format!("{MEMORY} has {len} bytes, the snapshot {}", manifest.memory_bytes),
        ));
    }
    let hash = memory_file::content_hash(&memory)
        .map_err(|e| snapshot_err(dir, format!("reading {MEMORY}: {e}")))?;
    if hash != manifest.memory_sha256 {
        return Err(snapshot_err(
            dir,
            format!("{MEMORY} does not match its hash: it was changed"),
        ));
    }
    Ok(Loaded {
        state,
        memory,
        dir: dir.to_owned(),
    })
}
