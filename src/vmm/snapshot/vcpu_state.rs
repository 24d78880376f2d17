//! One vCPU's architectural state as KVM reports it, and putting it back.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::vmm::error::{Error, Result};

/// The time-stamp counter: restored first, because KVM derives the
/// TSC-deadline timer and the guest's TSC offset from it.
const MSR_IA32_TSC: u32 = 0x10;

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The FPU, SSE and any extended state, in the XSAVE layout (KVM fills
    /// in the legacy area even where the guest cannot use XSAVE itself).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Reads the vCPU's state. The vCPU must be out of `KVM_RUN` with any I/O
/// it exited for completed (see `Vcpu::capture`). `msr_indices` is what
/// KVM can save (`KVM_GET_MSR_INDEX_LIST`); those it then refuses for this
/// vCPU are left out.
pub fn capture(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    Ok(VcpuState {
        regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, msr_indices)?,
        events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
    })
}

/// Reads every MSR in `indices` that KVM will read for this vCPU, the TSC first.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut wanted: Vec<u32> = Vec::with_capacity(indices.len());
    wanted.push(MSR_IA32_TSC);
    wanted.extend(indices.iter().copied().filter(|&i| i != MSR_IA32_TSC));
    let mut got = Vec::with_capacity(wanted.len());
    // KVM_GET_MSRS stops at the first MSR it cannot read: keep what came
    // before it, skip it, and go on from the next.
    let mut rest = &wanted[..];
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Device(format!("building the MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        got.extend_from_slice(&msrs.as_slice()[..read]);
        if read < rest.len() {
            tracing::trace!(
                msr = format_args!("{:#x}", rest[read]),
                "MSR not saved: KVM cannot read it"
            );
        }
        rest = &rest[(read + 1).min(rest.len())..];
    }
    if got.first().map(|e| e.index) != Some(MSR_IA32_TSC) {
        return Err(Error::Device("KVM would not read the guest's TSC".into()));
    }
    Ok(got)
}

/// Puts `state` back on a vCPU whose CPUID is already set (it decides
/// which MSRs and XSAVE features KVM accepts). The order is what KVM needs:
/// the LAPIC before the MSRs that address it, the events last.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<()> {
    fd.set_mp_state(state.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy buffer KVM_GET_XSAVE
    // filled; KVM reads no more than that for the features this vCPU's
    // CPUID enables, which is the same profile the snapshot was taken with.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs)
        .map_err(|e| Error::Device(format!("building the MSR list: {e:?}")))?;
    let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != state.msrs.len() {
        return Err(Error::Device(format!(
            "KVM refused to restore MSR {:#x}",
            state.msrs[written].index
        )));
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
