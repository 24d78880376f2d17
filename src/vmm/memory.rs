//! Guest RAM: anonymous host memory, mapped lazily, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use super::error::{Error, Result};
use super::layout;

pub type GuestMemoryHost = GuestMemoryMmap<()>;

/// Maps the guest's RAM. `MAP_NORESERVE` keeps a large, mostly idle guest
/// from counting against the host's commit limit: pages are only backed
/// when the guest touches them.
pub fn allocate(mem_size: u64) -> Result<GuestMemoryHost> {
    let mut regions = Vec::new();
    for (start, len) in layout::ram_regions(mem_size) {
        let len = usize::try_from(len)
            .map_err(|_| Error::Memory(format!("{len} bytes do not fit the address space")))?;
        let mapping = MmapRegion::build(
            None,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("mapping {len} bytes: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| Error::Memory(format!("region at {start:#x} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

/// Tells KVM which host memory backs which guest-physical range.
pub fn register(vm: &VmFd, mem: &GuestMemoryHost) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the range is a live mapping owned by `mem`, which the VM keeps
        // alive for as long as the VM fd exists (see `Vm`'s field order).
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// Bytes of guest RAM the host has actually backed so far.
pub fn resident_bytes(mem: &GuestMemoryHost) -> u64 {
    // One status byte per page, a chunk at a time, so a huge guest does not
    // cost a huge buffer.
    const CHUNK: usize = 64 << 20;
    let page = layout::PAGE_SIZE as usize;
    let mut status = vec![0u8; CHUNK / page];
    let mut total = 0u64;
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        for offset in (0..len).step_by(CHUNK) {
            let chunk = CHUNK.min(len - offset);
            // SAFETY: `host+offset .. +chunk` lies within one page-aligned
            // mapping owned by `mem`, and `status` has a byte for each of its pages.
            let ret = unsafe { libc::mincore(host.add(offset).cast(), chunk, status.as_mut_ptr()) };
            if ret == 0 {
                let pages = &status[..chunk.div_ceil(page)];
                total += pages.iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64;
            }
        }
    }
    total
}

/// Calls `visit` with the index of every page of `len` bytes at `host`
/// (page-aligned, in this process) that the guest or host ever touched:
/// those present in RAM or in swap, from /proc/self/pagemap, read a chunk
/// at a time. The others have never been written and read as zeros, so a
/// snapshot skips them instead of reading (and mapping) the whole of a
/// mostly idle guest's RAM.
pub fn touched_pages<E>(
    host: *const u8,
    len: usize,
    mut visit: impl FnMut(usize) -> std::result::Result<(), E>,
) -> std::io::Result<std::result::Result<(), E>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const CHUNK_PAGES: usize = 1 << 16;
    let page = layout::PAGE_SIZE as usize;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let pages = len.div_ceil(page);
    let first = (host as usize / page) as u64 * 8;
    let mut entries = vec![0u8; CHUNK_PAGES.min(pages) * 8];
    for chunk_start in (0..pages).step_by(CHUNK_PAGES) {
        let n = CHUNK_PAGES.min(pages - chunk_start);
        let buf = &mut entries[..n * 8];
        pagemap.read_exact_at(buf, first + chunk_start as u64 * 8)?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            if e & (PRESENT | SWAPPED) != 0 {
                if let Err(e) = visit(chunk_start + i) {
                    return Ok(Err(e));
                }
            }
        }
    }
    Ok(Ok(()))
}

/// Resident set size of this process, from /proc/self/statm.
pub fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * layout::PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn size_is_exact_and_untouched_memory_is_not_resident() {
        let mem = allocate(64 << 20).unwrap();
        // With transparent huge pages always on, one touch would back 2 MiB.
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            // SAFETY: advice on a mapping owned by `mem`; it changes no contents.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_NOHUGEPAGE) };
        }
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 64 << 20);
        assert_eq!(resident_bytes(&mem), 0);
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(resident_bytes(&mem), 2 * layout::PAGE_SIZE);
        let region = mem.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        let mut at = Vec::new();
        touched_pages(host, 4 << 20, |i| {
            at.push(i);
            Ok::<_, ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(at, [1, 0x200]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        // NORESERVE makes this cheap even on a small host.
        let mem = allocate(4 << 30).unwrap();
        assert!(mem.address_in_range(GuestAddress(layout::MMIO_GAP_START - 1)));
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_GAP_START)));
        assert!(mem.address_in_range(GuestAddress(layout::MMIO_GAP_END)));
        assert_eq!(resident_bytes(&mem), 0);
    }
}
