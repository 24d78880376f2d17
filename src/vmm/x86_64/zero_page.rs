//! `struct boot_params` ("the zero page") as the Linux x86 boot protocol
//! (Documentation/arch/x86/boot.rst) asks a 64-bit boot loader to fill it.

use linux_loader::loader::bootparam::{boot_params, setup_header};

use crate::vmm::layout::{self, E820Entry};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS", at offset 0x202 of a bzImage and in every zero page.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// A vmlinux has no setup header of its own; this is the alignment an x86_64
/// kernel is built for (CONFIG_PHYSICAL_ALIGN).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Linux's `E820_MAX_ENTRIES_ZEROPAGE`.
const E820_MAX_ENTRIES: usize = 128;

/// Where the initrd was placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub address: u64,
    pub size: u64,
}

/// Builds the zero page. `header` is the bzImage's own setup header, if the
/// kernel has one; a vmlinux gets a minimal synthetic header.
pub fn build(
    header: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address as u32;
        params.ext_ramdisk_image = (initrd.address >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    let map: Vec<E820Entry> = layout::e820_map(mem_size);
    debug_assert!(map.len() <= E820_MAX_ENTRIES);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = *addr;
        slot.size = *size;
        slot.type_ = *kind;
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Where an initrd of `size` bytes goes: as high as it can in low RAM (below
/// the MMIO gap and the kernel's `initrd_addr_max`), page aligned, and above
/// the kernel. `None` if it does not fit.
pub fn place_initrd(mem_size: u64, kernel_end: u64, size: u64, addr_max: u64) -> Option<InitrdPlacement> {
    let ceiling = layout::low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let address = ceiling.checked_sub(size)? & !(layout::PAGE_SIZE - 1);
    (address >= kernel_end && size > 0).then_some(InitrdPlacement { address, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_header_has_the_magic_and_command_line() {
        let p = build(None, 128 << 20, 42, None);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn bzimage_header_fields_are_kept() {
        let hdr = setup_header {
            version: 0x020f,
            xloadflags: 0x7f,
            ..Default::default()
        };
        let p = build(Some(hdr), 128 << 20, 1, None);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.xloadflags }, 0x7f);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
    }

    #[test]
    fn e820_is_copied() {
        let p = build(None, 5 << 30, 1, None);
        let map = layout::e820_map(5 << 30);
        assert_eq!(p.e820_entries as usize, map.len());
        for (e, m) in p.e820_table.iter().zip(&map) {
            assert_eq!(({ e.addr }, { e.size }, { e.type_ }), *m);
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = 128 << 20;
        let placed = place_initrd(mem, 20 << 20, 10_000, u64::from(u32::MAX)).unwrap();
        assert_eq!(placed.address % layout::PAGE_SIZE, 0);
        assert!(placed.address + placed.size <= mem);
        assert!(mem - (placed.address + placed.size) < layout::PAGE_SIZE);
        let p = build(None, mem, 1, Some(placed));
        assert_eq!({ p.hdr.ramdisk_image } as u64, placed.address);
        assert_eq!({ p.hdr.ramdisk_size }, 10_000);
    }

    #[test]
    fn initrd_respects_addr_max_and_the_kernel() {
        let placed = place_initrd(1 << 30, 16 << 20, 4096, 0x37ff_ffff).unwrap();
        assert!(placed.address + placed.size <= 0x3800_0000);
        assert_eq!(place_initrd(32 << 20, 30 << 20, 4 << 20, u64::MAX), None);
        assert_eq!(place_initrd(32 << 20, 0, 64 << 20, u64::MAX), None);
    }
}
