//! The flat GDT a 64-bit kernel is entered with, and the matching segment registers.

use kvm_bindings::kvm_segment;

/// Builds a segment descriptor from its flags (the access byte in bits 0..8 and
/// the G/DB/L/AVL nibble in bits 12..16), base and limit, as the SDM lays it out.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Null, 64-bit code, data, and a TSS that KVM wants to see loaded.
pub const BOOT_GDT: [u64; 4] = [
    0,
    descriptor(0xa09b, 0, 0xfffff), // code: present, DPL 0, L=1, G=1
    descriptor(0xc093, 0, 0xfffff), // data: present, writable, DB=1, G=1
    descriptor(0x808b, 0, 0xfffff), // busy 64-bit TSS
];
pub const CODE_SELECTOR_INDEX: u8 = 1;
pub const DATA_SELECTOR_INDEX: u8 = 2;
pub const TSS_SELECTOR_INDEX: u8 = 3;

/// Decodes GDT entry `index` into what KVM_SET_SREGS takes for a segment register.
pub fn segment(index: u8, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // The hidden part of the register holds the limit in bytes.
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let cs = segment(CODE_SELECTOR_INDEX, BOOT_GDT[1]);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_segment_is_flat_and_writable() {
        let ds = segment(DATA_SELECTOR_INDEX, BOOT_GDT[2]);
        assert_eq!((ds.l, ds.db, ds.g, ds.type_), (0, 1, 1, 3));
        assert_eq!(ds.limit, 0xffff_ffff);
        assert_eq!(ds.unusable, 0);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let d = descriptor(0x4093, 0x1234_5678, 0xabcde);
        let s = segment(5, d);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
        assert_eq!(s.selector, 40);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
