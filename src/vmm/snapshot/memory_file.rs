//! Guest RAM as a file: written sparsely (pages of zeros are holes), read
//! back by mapping it privately, so every VM restored from one file shares
//! its pages until it writes them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::vmm::error::{Error, Result};
use crate::vmm::layout::{self, PAGE_SIZE};
use crate::vmm::memory::GuestMemoryHost;

const PAGE: usize = PAGE_SIZE as usize;

/// What the file's contents hash to: every page that is not all zeros,
/// with its offset. Holes and written zeros hash alike, so how a file
/// system stores the file does not matter.
#[derive(Default)]
struct ContentHash(Sha256);

impl ContentHash {
    fn page(&mut self, offset: u64, page: &[u8]) {
        if page.iter().any(|&b| b != 0) {
            self.0.update(offset.to_le_bytes());
            self.0.update(page);
        }
    }

    fn hex(self) -> String {
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Writes all of guest RAM to `path` (created; it must not exist) and
/// returns its content hash. The regions follow each other in the file.
pub fn save(mem: &GuestMemoryHost, path: &Path) -> Result<String> {
    let err = |e: io::Error| Error::Memory(format!("writing {}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let mut hash = ContentHash::default();
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let mut write_page = |i: usize| -> Result<()> {
            // SAFETY: page `i` lies within the region, a live mapping of
            // `len` bytes owned by `mem`; the vCPUs are paused and the
            // device workers held, so nothing writes it while it is read.
            let page = unsafe { std::slice::from_raw_parts(host.cast_const().add(i * PAGE), PAGE) };
            let at = offset + (i * PAGE) as u64;
            if page.iter().any(|&b| b != 0) {
                file.write_all_at(page, at).map_err(err)?;
            }
            hash.page(at, page);
            Ok(())
        };
        // A restored VM's RAM is mapped from a file: its untouched pages
        // hold the file's data, so all of them are read; so are all pages
        // when the page map cannot be read at all.
        let mut visited = 0usize;
        let skipped = region.file_offset().is_none()
            && match crate::vmm::memory::touched_pages(host.cast_const(), len, |i| {
                visited += 1;
                write_page(i)
            }) {
                Ok(written) => {
                    written?;
                    true
                }
                Err(e) if visited == 0 => {
                    tracing::warn!("/proc/self/pagemap: {e}; reading all of guest memory");
                    false
                }
                Err(e) => return Err(Error::Memory(format!("reading /proc/self/pagemap: {e}"))),
            };
        if !skipped {
            (0..len.div_ceil(PAGE)).try_for_each(&mut write_page)?;
        }
        offset += len as u64;
    }
    file.set_len(offset).map_err(err)?;
    // Read-only from now on: VMs restored from it read pages they have not
    // touched yet from the file itself.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(hash.hex())
}

/// The content hash of `file`, read extent by extent so the holes cost
/// nothing. Hashing the descriptor that is then mapped means the pages
/// checked are the pages the guest gets.
pub fn content_hash(file: &File) -> io::Result<String> {
    let len = file.metadata()?.len();
    let mut hash = ContentHash::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let Some(start) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        // Extents start on page boundaries on every file system that
        // stores this file; round down anyway so pages line up.
        let mut pos = start - start % PAGE_SIZE;
        while pos < end {
            let n = buf.len().min((end - pos) as usize).next_multiple_of(PAGE);
            let got = file.read_at(&mut buf[..n], pos)?;
            if got == 0 {
                break;
            }
            buf[got..n].fill(0);
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let page_at = pos + (i * PAGE) as u64;
                if page_at < end {
                    hash.page(page_at, page);
                }
            }
            pos += n as u64;
        }
        at = pos.max(end);
    }
    Ok(hash.hex())
}

fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek only moves the offset of a descriptor `file` owns.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if pos < 0 {
        let e = io::Error::last_os_error();
        // No data at or after `from`.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(pos as u64))
}

/// Reads `file` into fresh anonymous RAM for a `mem_size` guest, extent
/// by extent: holes stay untouched, so they cost no memory.
pub fn load_copy(file: &File, mem_size: u64) -> Result<GuestMemoryHost> {
    let mem = crate::vmm::memory::allocate(mem_size)?;
    let err = |e: io::Error| Error::Snapshot(format!("reading the memory file: {e}"));
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let Some(start) = seek(file, at, libc::SEEK_DATA).map_err(err)? else {
                break;
            };
            if start >= end {
                break;
            }
            let stop = seek(file, start, libc::SEEK_HOLE)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            // SAFETY: `start..stop` lies within this region's part of the
            // file, so the slice lies within the region's live mapping of
            // `len` bytes, which nothing else uses before the VM runs.
            let dest = unsafe {
                std::slice::from_raw_parts_mut(host.add((start - offset) as usize), (stop - start) as usize)
            };
            file.read_exact_at(dest, start).map_err(err)?;
            at = stop;
        }
        offset = end;
    }
    Ok(mem)
}

/// Maps `file` as the RAM of a `mem_size` guest, copy-on-write: the guest's
/// writes stay in this process, the file and its other users never see them.
pub fn map_private(file: &File, mem_size: u64) -> Result<GuestMemoryHost> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in layout::ram_regions(mem_size) {
        let size = usize::try_from(len)
            .map_err(|_| Error::Memory(format!("{len} bytes do not fit the address space")))?;
        let dup = file
            .try_clone()
            .map_err(|e| Error::Memory(format!("memory file: {e}")))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(dup, offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("mapping the memory file: {e}")))?;
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(start))
                .ok_or_else(|| Error::Memory(format!("region at {start:#x} overflows")))?,
        );
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn a_saved_guest_maps_back_privately_and_hashes_alike() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let mem = crate::vmm::memory::allocate(size).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"somewhere", GuestAddress(0x2a_1234)).unwrap();
        let path = dir.path().join("memory");
        let saved = save(&mem, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        assert_eq!(content_hash(&File::open(&path).unwrap()).unwrap(), saved);
        // Sparse: two pages of data, not four MiB.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);

        let file = File::open(&path).unwrap();
        let a = map_private(&file, size).unwrap();
        let b = map_private(&file, size).unwrap();
        let mut buf = [0u8; 9];
        a.read_slice(&mut buf, GuestAddress(0x2a_1234)).unwrap();
        assert_eq!(&buf, b"somewhere");
        a.write_slice(b"changed!!", GuestAddress(0x2a_1234)).unwrap();
        b.read_slice(&mut buf, GuestAddress(0x2a_1234)).unwrap();
        assert_eq!(&buf, b"somewhere", "a write of one VM reached another");
        assert_eq!(
            content_hash(&File::open(&path).unwrap()).unwrap(),
            saved,
            "a write reached the file"
        );
        // A copy holds the same, in memory of its own.
        let c = load_copy(&file, size).unwrap();
        c.read_slice(&mut buf, GuestAddress(0x2a_1234)).unwrap();
        assert_eq!(&buf, b"somewhere");
        c.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first pag");
        assert_eq!(crate::vmm::memory::resident_bytes(&c), 2 * PAGE as u64);

        // One byte changed, or the file cut short, is seen.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"X", 0x3f_0000)
            .unwrap();
        assert_ne!(content_hash(&File::open(&path).unwrap()).unwrap(), saved);
    }
}
