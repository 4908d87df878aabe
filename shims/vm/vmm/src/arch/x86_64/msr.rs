//! The MSRs a vCPU boots with, restricted to those KVM lists in `KVM_GET_MSR_INDEX_LIST`
//! (setting anything else fails the whole `KVM_SET_MSRS`), plus the MTRR default type when the
//! vCPU's CPUID has MTRRs: KVM emulates the MTRRs without listing them, and with MTRRs off
//! Linux treats all memory as uncached and leaves PAT off.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

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
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum SetupMsrsError {
    #[error("building the MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS")]
    Set(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Partial { set: usize, wanted: usize },
}

/// The boot values, in order.
const BOOT_MSRS: [(u32, u64); 10] = [
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
];

/// The boot MSR entries KVM supports; `mtrr`: the vCPU's CPUID has MTRRs.
pub fn boot_msrs(supported: &[u32], mtrr: bool) -> Vec<kvm_msr_entry> {
    let mtrr = mtrr.then_some((MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB));
    BOOT_MSRS
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .copied()
        .chain(mtrr)
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32], mtrr: bool) -> Result<(), SetupMsrsError> {
    let entries = boot_msrs(supported, mtrr);
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(&entries).map_err(SetupMsrsError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(SetupMsrsError::Set)?;
    if set != entries.len() {
        return Err(SetupMsrsError::Partial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs_are_set() {
        let got = boot_msrs(
            &[MSR_IA32_TSC, 0x1234, MSR_IA32_MISC_ENABLE, MSR_LSTAR],
            false,
        );
        let got: Vec<_> = got.iter().map(|e| (e.index, e.data)).collect();
        assert_eq!(
            got,
            vec![(MSR_LSTAR, 0), (MSR_IA32_TSC, 0), (MSR_IA32_MISC_ENABLE, 1)]
        );
        assert!(boot_msrs(&[], false).is_empty());
        assert_eq!(boot_msrs(&BOOT_MSRS.map(|m| m.0), false).len(), 10);
    }

    #[test]
    fn mtrrs_are_enabled_write_back_when_the_cpu_has_them() {
        let got = boot_msrs(&[], true);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].index, got[0].data), (0x2ff, 0x806));
        assert_eq!(boot_msrs(&BOOT_MSRS.map(|m| m.0), true).len(), 11);
    }
}
