//! The register state a vCPU starts in: 64-bit long mode at the kernel's entry (the Linux
//! 64-bit boot protocol), or real mode for tiny test guests. Also the LAPIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::gdt::{BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX, segment};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START, ZERO_PAGE_START,
};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SetupRegsError {
    #[error("KVM_GET_SREGS")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_LAPIC")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// The GDT's limit: its size in bytes, less one.
#[allow(clippy::cast_possible_truncation)] // four 8-byte entries: 31
const GDT_LIMIT: u16 = (BOOT_GDT.len() * 8 - 1) as u16;

/// Long mode with paging on [`PML4_START`]'s identity map and the boot GDT loaded.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment(CODE_INDEX, BOOT_GDT[usize::from(CODE_INDEX)]);
    let data = segment(DATA_INDEX, BOOT_GDT[usize::from(DATA_INDEX)]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_INDEX, BOOT_GDT[usize::from(TSS_INDEX)]);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The general registers at the 64-bit entry point: `rsi` points at the zero page.
pub fn long_mode_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87 control word and MXCSR at their reset values (exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Sets sregs, regs and FPU for the 64-bit entry at `entry`.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64) -> Result<(), SetupRegsError> {
    let sregs = vcpu.get_sregs().map_err(SetupRegsError::GetSregs)?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(SetupRegsError::SetSregs)?;
    vcpu.set_regs(&long_mode_regs(entry))
        .map_err(SetupRegsError::SetRegs)?;
    vcpu.set_fpu(&boot_fpu()).map_err(SetupRegsError::SetFpu)
}

/// Real mode with every segment at 0 and `ip` = `entry` (below 64 KiB): for tiny test guests.
pub fn setup_real_mode(vcpu: &VcpuFd, entry: u16) -> Result<(), SetupRegsError> {
    let mut sregs = vcpu.get_sregs().map_err(SetupRegsError::GetSregs)?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).map_err(SetupRegsError::SetSregs)?;
    let regs = kvm_regs {
        rip: u64::from(entry),
        rsp: 0x7000,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(SetupRegsError::SetRegs)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn read_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *b = r.cast_unsigned();
    }
    u32::from_le_bytes(bytes)
}

fn write_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (r, b) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *r = b.cast_signed();
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 = ExtINT (the PIC's output), LINT1 = NMI: what the BIOS leaves for the kernel's
/// virtual-wire mode. Needs the in-kernel irqchip.
pub fn lint_lapic(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = read_reg(&lapic, APIC_LVT0);
    write_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = read_reg(&lapic, APIC_LVT1);
    write_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    lapic
}

pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), SetupRegsError> {
    let lapic = vcpu.get_lapic().map_err(SetupRegsError::GetLapic)?;
    vcpu.set_lapic(&lint_lapic(lapic))
        .map_err(SetupRegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_state() {
        let s = long_mode_sregs(kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        });
        assert_eq!(s.cr0, 0x6000_0010 | 0x8000_0011);
        assert_eq!((s.cr3, s.cr4, s.efer), (0x9000, 0x20, 0x500));
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit),
            (0x500, 31, 0x520, 7)
        );
        assert_eq!(
            (s.cs.selector, s.cs.l, s.ds.selector, s.ss.selector),
            (8, 1, 16, 16)
        );
        assert_eq!(s.tr.selector, 24);
        let r = long_mode_regs(0x20_0000);
        assert_eq!(
            (r.rip, r.rsp, r.rbp, r.rsi, r.rflags),
            (0x20_0000, 0x8ff0, 0x8ff0, 0x7000, 2)
        );
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        write_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        write_reg(&mut lapic, APIC_LVT1, 0x0001_0000);
        let lapic = lint_lapic(lapic);
        assert_eq!(read_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(read_reg(&lapic, APIC_LVT1), 0x0001_0400);
        assert_eq!(with_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }
}
