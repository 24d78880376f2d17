//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! learns how many CPUs it has, where its IOAPIC is and how ISA IRQs are wired.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::vmm::layout::{HIMEM_START, MPTABLE_START};

/// Physical address of the local APIC as every x86 CPU has it by default.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// Physical address of the in-kernel IOAPIC KVM emulates.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// Pins of KVM's IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
/// xAPIC IDs are 8 bits, 0xff is broadcast, and the IOAPIC takes the next free ID.
pub const MAX_VCPUS: u8 = 254;

const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ISA: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6; only informational for Linux, which reads CPUID.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and on-chip APIC.
const CPU_FEATURES: u32 = 0x201;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (1 to {MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("the MP table does not fit below 1 MiB")]
    TooLarge,
    #[error("writing the MP table to guest memory: {0}")]
    Write(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The floating pointer followed by the configuration table, as laid out at
/// `base` in guest memory.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus;
    let table_addr = base + FLOATING_POINTER_LEN as u64;

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ n arrives on IOAPIC pin n, edge-triggered active-high
        // ("conforms to bus"), which is how KVM routes its in-kernel PIC/IOAPIC.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    let entry_count = u16::from(vcpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"SKIFF   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended entries
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REVISION);
    out.push(0); // checksum, filled below
    out.extend_from_slice(&[0; 5]); // feature byte 1 = 0: the table above describes the system
    out[10] = checksum(&out);
    out.extend_from_slice(&table);

    if base + out.len() as u64 > HIMEM_START {
        return Err(MpTableError::TooLarge);
    }
    Ok(out)
}

/// Writes the MP table for `vcpus` CPUs at [`MPTABLE_START`].
pub fn write<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(MPTABLE_START, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| MpTableError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid() {
        for n in [1, 2, 32, MAX_VCPUS] {
            let t = build(MPTABLE_START, n).unwrap();
            assert_eq!(sum(&t[..16]), 0, "floating pointer, {n} cpus");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0, "table, {n} cpus");
        }
    }

    #[test]
    fn floating_pointer_points_at_the_table() {
        let t = build(MPTABLE_START, 2).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        assert_eq!(&t[16..20], b"PCMP");
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_one_bsp() {
        let n = 4;
        let t = build(MPTABLE_START, n).unwrap();
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        let mut off = 16 + HEADER_LEN;
        let (mut cpus, mut bsps, mut seen) = (0, 0, 0);
        while seen < count {
            let len = if t[off] == ENTRY_PROCESSOR { 20 } else { 8 };
            if t[off] == ENTRY_PROCESSOR {
                assert_eq!(t[off + 1], cpus);
                cpus += 1;
                bsps += usize::from(t[off + 3] & CPU_BOOTSTRAP != 0);
            }
            off += len;
            seen += 1;
        }
        assert_eq!(off, t.len());
        assert_eq!((cpus, bsps), (n, 1));
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert_eq!(build(MPTABLE_START, 0), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(build(MPTABLE_START, 255), Err(MpTableError::TooManyCpus(255)));
    }
}
