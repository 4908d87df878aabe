//! Per-vCPU CPUID, built only from what `KVM_GET_SUPPORTED_CPUID` returned (never from the
//! host's own CPUID): the topology leaves, Intel's (1, 4, 0xb, 0x1f) and AMD's (0x8000_0008,
//! 0x8000_001d, 0x8000_001e), are rewritten so each vCPU sees its APIC id and one package of
//! `count` single-threaded cores, whatever the host's own topology; the hypervisor bit is set;
//! everything else, the KVM signature leaves included, passes through.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EDX_MTRR: u32 = 1 << 12;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_SIZE: u32 = 8;

const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits of the APIC id that number the cores of one package.
fn core_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

fn normalize_entry(e: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    let id32 = u32::from(id);
    let count32 = u32::from(count.max(1));
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (e.ebx & 0xff) | (CLFLUSH_SIZE << 8) | (count32 << 16) | (id32 << 24);
            e.ecx |= ECX_HYPERVISOR;
            if count32 > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        // Cache type 0 ends the list (and AMD hosts report leaf 4 as all zeros): left alone.
        LEAF_CACHE if e.eax & 0x1f != 0 => {
            // Cores per package - 1 in bits 26..32; threads sharing the cache - 1 in 14..26.
            e.eax =
                (e.eax & 0x3fff) | (cache_sharing(e.eax, count32) << 14) | ((count32 - 1) << 26);
        }
        LEAF_AMD_CACHE if e.eax & 0x1f != 0 => {
            e.eax = (e.eax & !(0xfff << 14)) | (cache_sharing(e.eax, count32) << 14);
        }
        LEAF_AMD_SIZES => {
            // ECX: threads per package - 1 in bits 0..8 (NC), APIC id bits for them in 12..16;
            // Linux's AMD topology code counts cores from these, not from leaf 1.
            e.ecx = (e.ecx & !0xf0ff) | (count32 - 1) | (core_bits(count) << 12);
        }
        LEAF_AMD_TOPOLOGY => {
            // Extended APIC id; compute unit id with one thread per unit; node 0 of 1.
            e.eax = id32;
            e.ebx = id32 & 0xff;
            e.ecx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = id32;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = LEVEL_SMT << 8;
                }
                1 => {
                    e.eax = core_bits(count);
                    e.ebx = count32;
                    e.ecx = 1 | (LEVEL_CORE << 8);
                }
                index => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = index & 0xff;
                }
            }
        }
        _ => {}
    }
}

/// Threads sharing the cache a leaf 4 / 0x8000_001d EAX describes, minus one: a core's own for
/// L1 and L2, every vCPU for L3.
fn cache_sharing(eax: u32, count: u32) -> u32 {
    let level = (eax >> 5) & 0x7;
    if level >= 3 { (count - 1) & 0xfff } else { 0 }
}

/// Whether `cpuid` reports MTRRs (leaf 1 EDX bit 12).
pub fn has_mtrr(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_FEATURES && e.edx & EDX_MTRR != 0)
}

/// The CPUID of vCPU `id` of `count`.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        normalize_entry(e, id, count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x806f8, 0xff12_3456, 0x8000_0000 - 1, EDX_HTT | 1),
            entry(4, 0, 0x121, 0, 0, 0),
            entry(4, 3, 0x163, 0, 0, 0),
            entry(0xb, 0, 9, 9, 9, 9),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xb, 2, 9, 9, 9, 9),
            entry(4, 4, 0, 0, 0, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x8000_0008, 0, 0x3030, 0, 0x0001_7003, 0),
            entry(0x8000_001d, 0, 0x0000_4121, 1, 2, 3),
            entry(0x8000_001d, 3, 0x0003_c163, 1, 2, 3),
            entry(0x8000_001d, 4, 0, 0, 0, 0),
            entry(0x8000_001e, 0, 7, 0x0000_0107, 0x0000_0101, 0),
        ])
        .unwrap()
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let c = for_vcpu(&supported(), 2, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx, 0x0204_0856);
        assert_eq!(l1.ecx, 0xffff_ffff);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = find(&for_vcpu(&supported(), 0, 1), 1, 0);
        assert_eq!(single.ebx >> 16, 0x0001);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_describes_one_package_of_cores() {
        let c = for_vcpu(&supported(), 3, 3);
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 3));
        let end = find(&c, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 3));
        assert_eq!(find(&c, 4, 0).eax, (2 << 26) | 0x121);
        assert_eq!(find(&c, 4, 3).eax, (2 << 26) | (2 << 14) | 0x163);
    }

    #[test]
    fn amd_topology_leaves_describe_the_same_package() {
        let c = for_vcpu(&supported(), 2, 3);
        let sizes = find(&c, 0x8000_0008, 0);
        // NC = 2, ApicIdSize = 2; PerfTscSize (bits 16..18) and the address sizes kept.
        assert_eq!((sizes.eax, sizes.ecx), (0x3030, 0x0001_2002));
        let topo = find(&c, 0x8000_001e, 0);
        assert_eq!((topo.eax, topo.ebx, topo.ecx, topo.edx), (2, 2, 0, 0));
        assert_eq!(find(&c, 0x8000_001d, 0).eax, 0x0000_0121, "L1: one thread");
        assert_eq!(find(&c, 0x8000_001d, 3).eax, (2 << 14) | 0x163, "L3: all");
        assert_eq!(find(&c, 0x8000_001d, 4).eax, 0, "the list's end");
        assert_eq!(find(&c, 4, 4).eax, 0, "the list's end");
        let single = for_vcpu(&supported(), 0, 1);
        assert_eq!(find(&single, 0x8000_0008, 0).ecx, 0x0001_0000);
    }

    #[test]
    fn other_leaves_pass_through() {
        let s = supported();
        let c = for_vcpu(&s, 1, 2);
        assert_eq!(find(&c, 0, 0), find(&s, 0, 0));
        assert_eq!(find(&c, 0x4000_0000, 0), find(&s, 0x4000_0000, 0));
        assert_eq!(c.as_slice().len(), s.as_slice().len());
        assert_eq!(core_bits(1), 0);
        assert_eq!(core_bits(2), 1);
        assert_eq!(core_bits(5), 3);
        assert!(!has_mtrr(&s));
        assert!(has_mtrr(
            &CpuId::from_entries(&[entry(1, 0, 0, 0, 0, EDX_MTRR)]).unwrap()
        ));
    }
}
