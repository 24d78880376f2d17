//! Identity-mapping page tables for entering long mode.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::vmm::layout::{IDENTITY_MAPPED, PDE_START, PDPTE_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes a PML4 → PDPT → PD chain that maps the first [`IDENTITY_MAPPED`]
/// bytes 1:1 with 2 MiB pages. Linux replaces them early in `startup_64`,
/// so they only need to cover the kernel image, the zero page and the stack.
/// Returns the value for CR3.
pub fn write_identity_map<M: GuestMemory>(mem: &M) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))?;
    let entries = IDENTITY_MAPPED >> 21;
    for i in 0..entries {
        let entry = (i << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE;
        mem.write_obj(entry, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn walk(mem: &GuestMemoryMmap, cr3: u64, vaddr: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((vaddr >> 39) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pml4e & 1, 1);
        let pdpt = pml4e & !0xfff;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(pdpt + ((vaddr >> 30) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pdpte & 1, 1);
        let pd = pdpte & !0xfff;
        let pde: u64 = mem
            .read_obj(GuestAddress(pd + ((vaddr >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pde & (PAGE_SIZE_2M | 1), PAGE_SIZE_2M | 1);
        (pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (vaddr & 0x1f_ffff)
    }

    #[test]
    fn maps_the_first_gigabyte_one_to_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_map(&mem).unwrap();
        for vaddr in [0, 0x7000, 0x100_0000, 0x1234_5678, IDENTITY_MAPPED - 1] {
            assert_eq!(walk(&mem, cr3, vaddr), vaddr);
        }
    }
}
