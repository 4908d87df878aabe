//! x86_64 boot, following the Linux 64-bit boot protocol as firecracker does: the kernel ELF at
//! its physical addresses, zero page + e820 + command line + initrd, an MP table for the CPUs
//! and the IO-APIC, identity page tables and a flat GDT, and each vCPU in long mode at the entry
//! with CPUID normalized from what KVM supports, then MSRs, FPU and the LAPIC's LINT pins.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;

use std::path::Path;

use crate::GuestMemory;
use crate::kvm::{KvmVm, Vcpu};

pub use boot::LoadedKernel;

#[derive(Debug, thiserror::Error)]
pub enum ConfigureMemoryError {
    #[error(transparent)]
    Kernel(#[from] boot::LoadKernelError),
    #[error(transparent)]
    Initrd(#[from] boot::LoadInitrdError),
    #[error(transparent)]
    Cmdline(#[from] boot::CmdlineError),
    #[error(transparent)]
    ZeroPage(#[from] boot::ZeroPageError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("writing the boot page tables and GDT")]
    Tables(#[source] vm_memory::GuestMemoryError),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigureVcpuError {
    #[error("KVM_SET_CPUID2 on vCPU {id}")]
    Cpuid {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("MSRs of vCPU {id}")]
    Msrs {
        id: u8,
        #[source]
        source: msr::SetupMsrsError,
    },
    #[error("registers of vCPU {id}")]
    Regs {
        id: u8,
        #[source]
        source: regs::SetupRegsError,
    },
}

/// What to put in guest memory.
pub struct BootImages<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a linux_loader::cmdline::Cmdline,
    pub vcpus: u8,
}

/// Loads the kernel, initrd and command line and writes every boot structure; returns the
/// kernel's entry point. `regions` are the RAM regions (start, size).
pub fn configure_memory(
    mem: &GuestMemory,
    regions: &[(u64, u64)],
    images: &BootImages<'_>,
) -> Result<LoadedKernel, ConfigureMemoryError> {
    boot::clear_low_page(mem).map_err(ConfigureMemoryError::Tables)?;
    let kernel = boot::load_kernel(mem, images.kernel)?;
    let initrd = match images.initrd {
        Some(path) => Some(boot::load_initrd(
            mem,
            path,
            boot::lowmem_end(regions),
            kernel.end,
        )?),
        None => None,
    };
    let cmdline_size = boot::write_cmdline(mem, images.cmdline)?;
    let params = boot::boot_params_for(cmdline_size, initrd, &boot::e820_map(regions))?;
    boot::write_zero_page(mem, &params)?;
    mptable::write(mem, images.vcpus)?;
    gdt::write_gdt_idt(mem).map_err(ConfigureMemoryError::Tables)?;
    paging::write_identity_tables(mem).map_err(ConfigureMemoryError::Tables)?;
    Ok(kernel)
}

/// Puts vCPU `vcpu` of `count` in long mode at `entry`: CPUID first (KVM derives MSR and
/// feature checks from it), then MSRs, registers, FPU, and the LAPIC when the irqchip exists.
pub fn configure_vcpu(
    vm: &KvmVm,
    vcpu: &Vcpu,
    count: u8,
    entry: u64,
) -> Result<(), ConfigureVcpuError> {
    let id = vcpu.id();
    let cpuid = cpuid::for_vcpu(vm.supported_cpuid(), id, count);
    vcpu.fd()
        .set_cpuid2(&cpuid)
        .map_err(|source| ConfigureVcpuError::Cpuid { id, source })?;
    msr::setup_msrs(vcpu.fd(), vm.msr_index_list(), cpuid::has_mtrr(&cpuid))
        .map_err(|source| ConfigureVcpuError::Msrs { id, source })?;
    regs::setup_long_mode(vcpu.fd(), entry)
        .map_err(|source| ConfigureVcpuError::Regs { id, source })?;
    if vm.has_irqchip() {
        regs::setup_lapic(vcpu.fd()).map_err(|source| ConfigureVcpuError::Regs { id, source })?;
    }
    Ok(())
}

/// Real mode at `entry` (below 64 KiB) with the CPUID KVM supports: for tiny test guests.
pub fn configure_vcpu_real_mode(
    vm: &KvmVm,
    vcpu: &Vcpu,
    count: u8,
    entry: u16,
) -> Result<(), ConfigureVcpuError> {
    let id = vcpu.id();
    let cpuid = cpuid::for_vcpu(vm.supported_cpuid(), id, count);
    vcpu.fd()
        .set_cpuid2(&cpuid)
        .map_err(|source| ConfigureVcpuError::Cpuid { id, source })?;
    regs::setup_real_mode(vcpu.fd(), entry)
        .map_err(|source| ConfigureVcpuError::Regs { id, source })
}
