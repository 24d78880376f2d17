//! The CPU state a vCPU starts in: 64-bit mode with paging on, as the Linux
//! x86 boot protocol's 64-bit entry requires.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{self, BOOT_GDT};
use super::page_tables;
use crate::vmm::error::{Error, Result};
use crate::vmm::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT, an empty IDT and the identity page tables into guest
/// memory. Shared by all vCPUs, so done once per VM.
pub fn write_boot_structures<M: GuestMemory>(mem: &M) -> Result<u64> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|e| Error::BootSetup(format!("writing the GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| Error::BootSetup(format!("writing the IDT: {e}")))?;
    page_tables::write_identity_map(mem)
        .map_err(|e| Error::BootSetup(format!("writing the page tables: {e}")))
}

/// Special registers for 64-bit mode on top of what KVM reports for a fresh vCPU.
pub fn long_mode_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = gdt::segment(
        gdt::CODE_SELECTOR_INDEX,
        BOOT_GDT[gdt::CODE_SELECTOR_INDEX as usize],
    );
    let data = gdt::segment(
        gdt::DATA_SELECTOR_INDEX,
        BOOT_GDT[gdt::DATA_SELECTOR_INDEX as usize],
    );
    let tss = gdt::segment(
        gdt::TSS_SELECTOR_INDEX,
        BOOT_GDT[gdt::TSS_SELECTOR_INDEX as usize],
    );

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the 64-bit entry: `rsi` carries the zero page address
/// (for Linux) or whatever `arg` the boot source passes.
pub fn entry_regs(entry: u64, arg: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: arg,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        // Bit 1 is reserved and always set.
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87 and SSE control words as after FNINIT and a reset.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// MSRs a kernel expects in a known state at entry: no stale syscall entry
/// points, fast strings on, and all memory write-back through the MTRR default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::BootSetup(format!("building the MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if written != entries.len() {
        let failed = entries[written].index;
        return Err(Error::BootSetup(format!("KVM refused MSR {failed:#x}")));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC's firmware does,
/// so legacy interrupts reach the boot CPU before Linux takes over the LAPIC.
pub fn configure_lint(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs_enable_paging_and_lma() {
        let s = long_mode_sregs(kvm_sregs::default(), 0x9000);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
        assert_eq!(s.tr.selector, 24);
    }

    #[test]
    fn entry_regs_pass_the_zero_page_in_rsi() {
        let r = entry_regs(0x100_0000, 0x7000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, 0x7000, 2));
        assert_eq!(r.rsp, BOOT_STACK_POINTER);
    }

    #[test]
    fn lint_modes_are_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        // Masked with some stale mode bits set, as a fresh LAPIC may report.
        lapic.regs[APIC_LVT0 + 1] = 0x11;
        lapic.regs[APIC_LVT0 + 2] = 0x01;
        let l = configure_lint(lapic);
        let read = |off: usize| u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8));
        assert_eq!(read(APIC_LVT0), 0x0001_1700);
        assert_eq!((read(APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((read(APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
        // Bits outside the delivery mode survive.
        assert_eq!(read(APIC_LVT0) & 0x1_0000, 0x1_0000);
    }

    #[test]
    fn mtrr_default_is_write_back_and_enabled() {
        let msrs = boot_msrs();
        let def = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(def.data, MTRR_ENABLE | MTRR_MEM_TYPE_WB);
    }
}
