//! Guest physical memory layout: the one place that says where everything lives.
//!
//! The low addresses follow the Linux x86 boot protocol and the PC memory map
//! (real-mode IVT and BDA at the bottom, EBDA just below 640 KiB, the kernel at
//! 1 MiB or above), so a stock kernel finds what it expects.

/// GDT used to enter long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: Linux installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The "zero page": `struct boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU; grows down, stays below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, one PD with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// How much the boot page tables identity-map (512 entries of 2 MiB).
pub const IDENTITY_MAPPED: u64 = 1 << 30;
/// Kernel command line; the boot protocol limits it to below 0xA0000.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below it is usable, the MP table lives in it.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// First byte above the legacy ISA hole (VGA, option ROMs, BIOS).
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: devices (LAPIC, IOAPIC, virtio-mmio) live in
/// [`MMIO_GAP_START`, 4 GiB), guest RAM that would overlap it moves above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio windows, one page each, from here up (the IOAPIC and LAPIC
/// sit at 0xfec0_0000 and 0xfee0_0000, far above).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// virtio devices get IOAPIC pins from here up: 0–4 are the PIT, keyboard,
/// cascade and COM ports' ISA IRQs.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// As many virtio devices as there are IOAPIC pins (all wired by the MP table) for them.
pub const MAX_VIRTIO_DEVICES: usize =
    (super::x86_64::mptable::IOAPIC_PINS as u32 - VIRTIO_FIRST_IRQ) as usize;

/// Where the `index`th virtio device lives: its MMIO base and its GSI.
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * 0x1000,
        VIRTIO_FIRST_IRQ + index as u32,
    )
}

/// Smallest guest a config may ask for. Linux itself needs more than this
/// for a useful boot; the loaders check that the kernel and initrd fit.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Guest RAM is allocated in whole pages of this size.
pub const PAGE_SIZE: u64 = 4096;

// The boot page tables have one page directory: 512 entries of 2 MiB.
const _: () = assert!(IDENTITY_MAPPED <= 512 << 21);
// The boot stack grows down from between the zero page and the page tables,
// and the command line must end below the EBDA.
const _: () = assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 4096);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);

/// Guest RAM regions as (start, length): below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

/// e820 memory types from the ACPI spec, as Linux's `boot_params.e820_table` takes them.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One e820 entry: (address, size, type).
pub type E820Entry = (u64, u64, u32);

/// The e820 map Linux reads from the zero page: conventional memory up to the
/// EBDA, the EBDA and the ISA hole reserved, then RAM from 1 MiB on, split
/// around the MMIO gap.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_regions(mem_size) {
        let end = start + len;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// The highest guest-physical address below 4 GiB that is RAM, plus one.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_reserves_the_ebda_and_isa_hole() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_above_the_gap_counts_all_memory() {
        let mem = 5u64 << 30;
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM));
        assert_eq!(map[3], (MMIO_GAP_END, mem - MMIO_GAP_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Only the EBDA and ISA hole are missing from RAM.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (BOOT_GDT_START, 4 * 8),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 4096),
            (PML4_START, 4096),
            (PDPTE_START, 4096),
            (PDE_START, 4096),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
    }
}
