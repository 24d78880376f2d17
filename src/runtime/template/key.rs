//! What a template is made of, and the key it is stored under: two
//! machines with the same key boot to the same state, so one's snapshot
//! serves the other.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BIND_SLOTS;
use crate::runtime::error::RuntimeError;
use crate::runtime::sandbox::{guest_cmdline, VmResources};
use crate::vmm::{host, snapshot, CpuProfile};

/// How many hex digits of the inputs' hash name a template.
const KEY_DIGITS: usize = 32;

/// Everything that decides what a booted guest's memory and devices look
/// like at its agent's `Ready`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub skiff_version: String,
    pub snapshot_format: u32,
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub initrd: PathBuf,
    pub initrd_sha256: String,
    pub cmdline: String,
    pub cpu_profile: String,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub bind_slots: usize,
}

impl Inputs {
    /// The inputs of a VM with `resources`; the kernel and initramfs are
    /// hashed (or their hash found in `digests`, by file identity).
    pub fn of(resources: &VmResources, debug_guest: bool, digests: &Path) -> Result<Inputs, RuntimeError> {
        let profile = resources
            .cpu_profile
            .unwrap_or_else(|| CpuProfile::for_backend(host::detect_backend()));
        Ok(Inputs {
            skiff_version: crate::BUILD.to_owned(),
            snapshot_format: snapshot::FORMAT,
            kernel: resources.kernel.clone(),
            kernel_sha256: file_digest(&resources.kernel, digests)?,
            initrd: resources.initrd.clone(),
            initrd_sha256: file_digest(&resources.initrd, digests)?,
            cmdline: guest_cmdline(debug_guest),
            cpu_profile: profile.to_string(),
            vcpus: resources.vcpus,
            memory_bytes: resources.memory.0,
            bind_slots: BIND_SLOTS,
        })
    }

    /// The template's name. The files' paths are left out: the same
    /// kernel installed elsewhere boots the same guest.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        let fields = [
            self.skiff_version.as_str(),
            &self.snapshot_format.to_string(),
            &self.kernel_sha256,
            &self.initrd_sha256,
            &self.cmdline,
            &self.cpu_profile,
            &self.vcpus.to_string(),
            &self.memory_bytes.to_string(),
            &self.bind_slots.to_string(),
        ];
        for field in fields {
            // Length-prefixed, so no two lists of fields hash alike.
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        hex(&h.finalize())[..KEY_DIGITS].to_owned()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the file at `path`. Hashing a kernel at every `create`
/// would cost tens of milliseconds, so the result is kept in `memo`
/// under the file's identity: device, inode, size, and modification and
/// change times (a change time cannot be set back, so a rewritten file
/// never matches an old entry).
pub fn file_digest(path: &Path, memo: &Path) -> Result<String, RuntimeError> {
    let meta = fs::metadata(path).map_err(|e| RuntimeError::io(format!("reading {}", path.display()), e))?;
    let identity = format!(
        "{}-{}-{}-{}.{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let entry = memo.join(&identity);
    if let Ok(known) = fs::read_to_string(&entry) {
        if known.len() == 64 && known.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(known);
        }
    }
    let digest = hash_file(path).map_err(|e| RuntimeError::io(format!("reading {}", path.display()), e))?;
    // Only a speed-up: a memo that cannot be written is no failure.
    if fs::create_dir_all(memo).is_ok() {
        let tmp = memo.join(format!(".{identity}.{}", std::process::id()));
        if fs::write(&tmp, &digest).is_ok() && fs::rename(&tmp, &entry).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
    Ok(digest)
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            skiff_version: "0.1.0".into(),
            snapshot_format: 1,
            kernel: "/k".into(),
            kernel_sha256: "aa".into(),
            initrd: "/i".into(),
            initrd_sha256: "bb".into(),
            cmdline: "console=ttyS0".into(),
            cpu_profile: "baseline".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            bind_slots: 4,
        }
    }

    #[test]
    fn every_input_but_the_paths_changes_the_key() {
        let base = inputs();
        let key = base.key();
        assert_eq!(key.len(), KEY_DIGITS);
        let mut moved = base.clone();
        moved.kernel = "/elsewhere/k".into();
        moved.initrd = "/elsewhere/i".into();
        assert_eq!(moved.key(), key);
        let changes: [fn(&mut Inputs); 9] = [
            |i| i.skiff_version = "0.2.0".into(),
            |i| i.snapshot_format = 2,
            |i| i.kernel_sha256 = "ab".into(),
            |i| i.initrd_sha256 = "bc".into(),
            |i| i.cmdline.push_str(" skiff.debug"),
            |i| i.cpu_profile = "host".into(),
            |i| i.vcpus = 2,
            |i| i.memory_bytes = 512 << 20,
            |i| i.bind_slots = 5,
        ];
        for (n, change) in changes.iter().enumerate() {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(changed.key(), key, "change {n}");
        }
    }

    #[test]
    fn a_digest_is_remembered_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernel");
        let memo = dir.path().join("digests");
        fs::write(&file, b"one").unwrap();
        let first = file_digest(&file, &memo).unwrap();
        assert_eq!(first, hash_file(&file).unwrap());
        assert_eq!(fs::read_dir(&memo).unwrap().count(), 1);
        assert_eq!(file_digest(&file, &memo).unwrap(), first);
        fs::write(&file, b"two").unwrap();
        let second = file_digest(&file, &memo).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, hash_file(&file).unwrap());
        assert!(file_digest(&dir.path().join("missing"), &memo).is_err());
    }
}
