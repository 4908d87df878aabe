//! The VM file descriptor and what hangs off it.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, MsrList, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestRam;
use super::vcpu::Vcpu;
use crate::GuestMemory;
use crate::irq::EventFdInterrupt;

#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    #[error("opening /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] SetMemoryError),
}

#[derive(Debug, thiserror::Error)]
#[error("KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_addr:#x}")]
pub struct SetMemoryError {
    pub slot: u32,
    pub guest_addr: u64,
    #[source]
    pub source: kvm_ioctls::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("KVM_IRQFD for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("KVM_CREATE_VCPU {id}")]
pub struct CreateVcpuError {
    pub id: u8,
    #[source]
    pub source: kvm_ioctls::Error,
}

const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM and the guest RAM it maps. Dropping it closes the VM fd (KVM frees the irqchip,
/// irqfds and ioeventfds with the VM).
///
/// The kernel VM lives until its last fd is closed, the vCPUs' included, and its memory slots
/// point into `ram` all that time. So `ram` is shared with every [`Vcpu`] and each of them
/// closes its fd before letting go of it: the RAM is unmapped only after the last KVM fd that
/// could reach it is closed, however the owners are dropped (a vCPU thread that never ends
/// keeps the memory mapped rather than have KVM write into whatever is mapped there next).
pub struct KvmVm {
    // Closed before `ram` is released (field order).
    fd: VmFd,
    ram: Arc<GuestRam>,
    kvm: Kvm,
    supported_cpuid: CpuId,
    msr_list: MsrList,
    irqchip: bool,
    pit: bool,
}

impl KvmVm {
    /// Opens `/dev/kvm`, creates a VM and registers every region of `ram` as a memory slot
    /// (slots 0, 1, ...). No vCPUs yet.
    pub fn new(ram: GuestRam) -> Result<KvmVm, CreateVmError> {
        let kvm = Kvm::new().map_err(CreateVmError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(CreateVmError::ApiVersion(version));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CreateVmError::Cpuid)?;
        let msr_list = kvm.get_msr_index_list().map_err(CreateVmError::MsrList)?;
        let fd = kvm.create_vm().map_err(CreateVmError::Create)?;
        // Intel VMX without unrestricted guest emulates real mode through a TSS in guest
        // physical space; three pages at the top of the MMIO gap that nothing else uses.
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            tracing::debug!(error = %e, "KVM_SET_TSS_ADDR refused");
        }
        // From here an error drops `fd` before `ram` (locals before arguments).
        set_memory(&fd, &ram)?;
        Ok(KvmVm {
            fd,
            ram: Arc::new(ram),
            kvm,
            supported_cpuid,
            msr_list,
            irqchip: false,
            pit: false,
        })
    }

    /// The guest memory (cheap to clone: devices keep their own handle).
    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    /// Creates the in-kernel interrupt controllers (PIC, IO-APIC, LAPICs) and the PIT where
    /// KVM offers them. Either may be refused (PVM refuses both for non-PVM guests): the VM
    /// then runs without interrupts, which is enough for polling guests.
    pub fn setup_irqchip(&mut self) {
        match self.fd.create_irq_chip() {
            Ok(()) => self.irqchip = true,
            Err(e) => tracing::debug!(error = %e, "KVM_CREATE_IRQCHIP refused; no interrupts"),
        }
        if !self.irqchip {
            return;
        }
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        match self.fd.create_pit2(pit_config) {
            Ok(()) => self.pit = true,
            Err(e) => tracing::debug!(error = %e, "KVM_CREATE_PIT2 refused; no PIT"),
        }
    }

    /// Whether the in-kernel irqchip exists (so interrupts can be delivered and `hlt` waits
    /// inside KVM).
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    pub fn has_pit(&self) -> bool {
        self.pit
    }

    /// Routes `irq`'s eventfd to `gsi` (needs the irqchip).
    pub fn register_irqfd(&self, irq: &EventFdInterrupt, gsi: u32) -> Result<(), IrqError> {
        self.fd
            .register_irqfd(irq.eventfd(), gsi)
            .map_err(|source| IrqError::Irqfd { gsi, source })
    }

    /// A guest 4-byte write of `datamatch` to MMIO address `addr` signals `evt` inside KVM,
    /// without an exit to userspace.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), IrqError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| IrqError::Ioeventfd { addr, source })
    }

    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, CreateVcpuError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| CreateVcpuError { id, source })?;
        Ok(Vcpu::new(id, fd, self.ram.clone()))
    }

    /// The CPUID entries KVM supports on this host (the base for each vCPU's CPUID).
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The MSRs KVM can save and restore (the only ones we set).
    pub fn msr_index_list(&self) -> &[u32] {
        self.msr_list.as_slice()
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

/// Registers every region of `ram` with the VM `fd`.
fn set_memory(fd: &VmFd, ram: &GuestRam) -> Result<(), SetMemoryError> {
    for (slot, (guest_addr, size, host_addr)) in (0u32..).zip(ram.regions()) {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the host range is a live mapping owned by `ram`. On success `ram` moves into
        // the `KvmVm`, which with each of its `Vcpu`s keeps it until after its own fd is
        // closed, so it stays mapped while any fd of this VM exists; on failure `fd` is closed
        // before `ram` is dropped (see `KvmVm::new`).
        unsafe { fd.set_user_memory_region(region) }.map_err(|source| SetMemoryError {
            slot,
            guest_addr,
            source,
        })?;
    }
    Ok(())
}
