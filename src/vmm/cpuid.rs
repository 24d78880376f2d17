//! CPUID profiles: what the guest is told about its CPU.
//!
//! Both profiles start from what KVM supports on this host and normalize the
//! topology the way microVMs usually do (Firecracker documents the same idea):
//! one thread per core, one socket, APIC IDs equal to vCPU indices, the
//! hypervisor bit set, no PMU. `Baseline` additionally hides what KVM's
//! instruction emulator cannot execute on hosts without hardware
//! virtualization, where guest kernel code runs through that emulator.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::host::KvmBackend;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuProfile {
    /// Host features, normalized: for hosts with VT-x or AMD-V.
    Host,
    /// A conservative subset for software KVM.
    Baseline,
}

impl CpuProfile {
    pub fn for_backend(backend: KvmBackend) -> Self {
        match backend {
            KvmBackend::Hardware => CpuProfile::Host,
            KvmBackend::Software => CpuProfile::Baseline,
        }
    }

    /// Kernel command-line arguments that go with the profile. Some software
    /// KVMs answer CPUID leaves 1, 7 and 0xD with the host's values whatever
    /// KVM_SET_CPUID2 said (the guest's user mode runs natively and could see
    /// them anyway), so hiding a feature from the guest kernel takes its own
    /// `clearcpuid=`: the features whose instructions the emulator lacks, or
    /// that the kernel would start using in ring 0 through alternatives.
    pub fn kernel_args(self) -> &'static [&'static str] {
        match self {
            CpuProfile::Host => &[],
            CpuProfile::Baseline => &[
                "noxsave",
                "clearcpuid=popcnt,cx16,smap,smep,fsgsbase,rdrand,rdseed,pcid,invpcid,pku",
            ],
        }
    }
}

impl fmt::Display for CpuProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuProfile::Host => "host",
            CpuProfile::Baseline => "baseline",
        })
    }
}

impl FromStr for CpuProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuProfile::Host),
            "baseline" => Ok(CpuProfile::Baseline),
            other => Err(format!(
                "unknown CPU profile {other:?} (expected host or baseline)"
            )),
        }
    }
}

mod bits {
    // Leaf 1 ECX
    pub const FMA: u32 = 1 << 12;
    pub const CX16: u32 = 1 << 13;
    pub const PCID: u32 = 1 << 17;
    pub const POPCNT: u32 = 1 << 23;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
    // Leaf 1 EDX
    pub const HTT: u32 = 1 << 28;
    // Leaf 6
    pub const TURBO: u32 = 1 << 1;
    pub const ENERGY_PERF_BIAS: u32 = 1 << 3;
    // Leaf 7.0 EBX
    pub const FSGSBASE: u32 = 1 << 0;
    pub const AVX2: u32 = 1 << 5;
    pub const SMEP: u32 = 1 << 7;
    pub const INVPCID: u32 = 1 << 10;
    pub const RDSEED: u32 = 1 << 18;
    pub const SMAP: u32 = 1 << 20;
    /// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL.
    pub const AVX512_EBX: u32 =
        (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
    // Leaf 7.0 ECX
    pub const UMIP: u32 = 1 << 2;
    pub const PKU: u32 = 1 << 3;
    pub const OSPKE: u32 = 1 << 4;
    pub const RDPID: u32 = 1 << 22;
    /// AVX-512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ and the AVX encodings of
    /// GFNI, VAES and VPCLMULQDQ, which all need XSAVE-managed state.
    pub const AVX_ECX: u32 =
        (1 << 1) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
    // Leaf 0x8000_0008 EBX
    pub const XSAVEERPTR: u32 = 1 << 2;
    // Leaf 0x4000_0001 EAX: paravirtual features whose use is a hypercall.
    pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
    pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
    pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_V2_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// Leaf 0xB / 0x1F level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things: the shift of the next topology level.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID table for vCPU `index` of `count`, derived from `supported`
/// (KVM_GET_SUPPORTED_CPUID).
pub fn for_vcpu(supported: &CpuId, profile: CpuProfile, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        normalize(entry, u32::from(index), u32::from(count));
        if profile == CpuProfile::Baseline {
            restrict_to_baseline(entry);
        }
    }
    cpuid
}

fn normalize(e: &mut kvm_cpuid_entry2, index: u32, count: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: initial APIC ID, logical processors per package, CLFLUSH line in 8-byte units.
            e.ebx = (index << 24) | ((count & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= bits::HYPERVISOR;
            if count > 1 {
                e.edx |= bits::HTT;
            } else {
                e.edx &= !bits::HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
        }
        LEAF_THERMAL_POWER => {
            e.eax &= !bits::TURBO;
            e.ecx &= !bits::ENERGY_PERF_BIAS;
        }
        LEAF_PMU => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_V2_TOPOLOGY => {
            let (shift, processors, level) = match e.index {
                0 => (0, 1, LEVEL_SMT),
                1 => (id_bits(count), count, LEVEL_CORE),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = processors;
            e.ecx = (level << 8) | (e.index & 0xff);
            e.edx = index;
        }
        LEAF_AMD_ADDR_SIZES => {
            // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID bits for them.
            e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | ((count - 1) & 0xff);
        }
        LEAF_AMD_EXT_APIC => {
            e.eax = index;
            // One thread per compute unit, unit ID = vCPU index, one node.
            e.ebx = index & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

fn restrict_to_baseline(e: &mut kvm_cpuid_entry2) {
    match (e.function, e.index) {
        (LEAF_FEATURES, _) => {
            e.ecx &= !(bits::CX16
                | bits::POPCNT
                | bits::XSAVE
                | bits::OSXSAVE
                | bits::AVX
                | bits::FMA
                | bits::F16C
                | bits::RDRAND
                | bits::PCID);
        }
        (LEAF_EXT_FEATURES, 0) => {
            e.ebx &= !(bits::FSGSBASE
                | bits::AVX2
                | bits::SMEP
                | bits::SMAP
                | bits::INVPCID
                | bits::RDSEED
                | bits::AVX512_EBX);
            e.ecx &= !(bits::UMIP | bits::PKU | bits::OSPKE | bits::RDPID | bits::AVX_ECX);
            e.edx &= !0xc; // AVX512_4VNNIW, AVX512_4FMAPS
        }
        (LEAF_EXT_FEATURES, _) => {
            // Subleaf 1 and up only describe AVX-era extensions.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (LEAF_XSAVE, _) => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (LEAF_KVM_FEATURES, _) => {
            // A software KVM may never return from a guest's hypercall, so the
            // guest must not send IPIs, kick halted spinners or yield through one.
            e.eax &= !(bits::KVM_FEATURE_PV_SEND_IPI
                | bits::KVM_FEATURE_PV_UNHALT
                | bits::KVM_FEATURE_PV_SCHED_YIELD);
        }
        (LEAF_AMD_ADDR_SIZES, _) => {
            // Tells Linux that FXSAVE does not leak FPU pointers, so it skips
            // the x87 workaround sequence (fnclex/emms/fild) the emulator lacks.
            e.ebx |= bits::XSAVEERPTR;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn host_like() -> CpuId {
        CpuId::from_entries(&[
            entry(0x0, 0, [0x1f, 0, 0, 0]),
            entry(
                LEAF_FEATURES,
                0,
                [0x00a00f11, 0x0102_0800, 0x7ef8_3203, 0x178b_fbff],
            ),
            entry(LEAF_CACHE_PARAMS, 0, [0x0000_0121, 0, 0, 0]),
            entry(LEAF_CACHE_PARAMS, 3, [0x0000_0163, 0, 0, 0]),
            entry(LEAF_THERMAL_POWER, 0, [0x4, 0, 0x9, 0]),
            entry(LEAF_EXT_FEATURES, 0, [0, 0xf1bf_07ab, 0x0040_5fce, 0x10]),
            entry(LEAF_PMU, 0, [0x0000_7604, 1, 2, 3]),
            entry(LEAF_TOPOLOGY, 0, [1, 2, 0x100, 7]),
            entry(LEAF_TOPOLOGY, 1, [4, 16, 0x201, 7]),
            entry(LEAF_TOPOLOGY, 2, [0, 0, 2, 7]),
            entry(LEAF_XSAVE, 0, [0x2e7, 0x980, 0x980, 0]),
            entry(LEAF_AMD_ADDR_SIZES, 0, [0x3030, 0x0100_d000, 0x1, 0]),
            entry(LEAF_AMD_EXT_APIC, 0, [9, 0x100, 0, 0]),
            entry(LEAF_KVM_FEATURES, 0, [0x0100_7efb, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_id_and_count_follow_the_vcpu() {
        let c = for_vcpu(&host_like(), CpuProfile::Host, 3, 4);
        let l1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & bits::HTT, 0);
        assert_ne!(l1.ecx & bits::HYPERVISOR, 0);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 0).edx, 3);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 1).ebx, 4);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 1).eax, 2);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 2).ecx >> 8, 0);
        assert_eq!(find(&c, LEAF_AMD_EXT_APIC, 0).eax, 3);
        assert_eq!(find(&c, LEAF_AMD_ADDR_SIZES, 0).ecx & 0xff, 3);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_shares_no_cache() {
        let c = for_vcpu(&host_like(), CpuProfile::Host, 0, 1);
        assert_eq!(find(&c, LEAF_FEATURES, 0).edx & bits::HTT, 0);
        assert_eq!(find(&c, LEAF_CACHE_PARAMS, 3).eax >> 14, 0);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 1).eax, 0);
    }

    #[test]
    fn pmu_is_hidden_in_both_profiles() {
        for p in [CpuProfile::Host, CpuProfile::Baseline] {
            let pmu = find(&for_vcpu(&host_like(), p, 0, 1), LEAF_PMU, 0);
            assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        }
    }

    #[test]
    fn host_profile_keeps_features() {
        let c = for_vcpu(&host_like(), CpuProfile::Host, 0, 1);
        assert_ne!(find(&c, LEAF_FEATURES, 0).ecx & bits::XSAVE, 0);
        assert_ne!(find(&c, LEAF_EXT_FEATURES, 0).ebx & bits::SMAP, 0);
        assert_ne!(find(&c, LEAF_XSAVE, 0).eax, 0);
        assert_ne!(
            find(&c, LEAF_KVM_FEATURES, 0).eax & bits::KVM_FEATURE_PV_SEND_IPI,
            0
        );
    }

    #[test]
    fn baseline_hides_what_the_emulator_cannot_run() {
        let c = for_vcpu(&host_like(), CpuProfile::Baseline, 0, 2);
        let l1 = find(&c, LEAF_FEATURES, 0);
        for bit in [bits::CX16, bits::POPCNT, bits::XSAVE, bits::OSXSAVE, bits::AVX] {
            assert_eq!(l1.ecx & bit, 0, "leaf 1 ecx bit {bit:#x}");
        }
        let l7 = find(&c, LEAF_EXT_FEATURES, 0);
        for bit in [bits::SMEP, bits::SMAP, bits::FSGSBASE, bits::AVX2] {
            assert_eq!(l7.ebx & bit, 0, "leaf 7 ebx bit {bit:#x}");
        }
        assert_eq!(find(&c, LEAF_XSAVE, 0).eax, 0);
        assert_ne!(find(&c, LEAF_AMD_ADDR_SIZES, 0).ebx & bits::XSAVEERPTR, 0);
        let kvm = find(&c, LEAF_KVM_FEATURES, 0).eax;
        assert_eq!(kvm & bits::KVM_FEATURE_PV_SEND_IPI, 0);
        assert_eq!(kvm & bits::KVM_FEATURE_PV_UNHALT, 0);
        // kvm-clock and the rest stay.
        assert_ne!(kvm & 1, 0);
        // Topology normalization still applies.
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
    }

    #[test]
    fn profile_names_round_trip() {
        for p in [CpuProfile::Host, CpuProfile::Baseline] {
            assert_eq!(p.to_string().parse::<CpuProfile>().unwrap(), p);
        }
        assert!("fast".parse::<CpuProfile>().is_err());
        assert_eq!(
            CpuProfile::for_backend(KvmBackend::Software),
            CpuProfile::Baseline
        );
        assert_eq!(CpuProfile::for_backend(KvmBackend::Hardware), CpuProfile::Host);
    }
}
