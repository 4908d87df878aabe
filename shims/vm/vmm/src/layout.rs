//! The guest's physical memory map, IRQ lines and I/O ports: one place, so the boot code, the
//! device wiring and the kernel command line agree (addresses follow firecracker's x86_64 map).

/// The GDT the vCPU starts with (boot CS/DS/TSS descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`), passed in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The boot stack's top (`rsp`, `rbp`).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the first 4 GiB (so the MMIO gap is mapped too, for guests that
/// never build their own tables): PML4, PDPT, and four PDs of 2 MiB pages from [`PDE_START`].
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const PDE_COUNT: u64 = 4;
/// The kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;

/// `v` for a 32-bit field of a boot structure (an address or length below 4 GiB). Meant for
/// constants (`const { low32(X) }`), where a value that does not fit fails the build.
#[allow(clippy::cast_possible_truncation)] // the assert above the cast makes it lossless
pub const fn low32(v: u64) -> u32 {
    assert!(v <= u32::MAX as u64, "does not fit in 32 bits");
    v as u32
}
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The MP table (in the EBDA, where the kernel's `smp_scan_config` looks).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of low RAM given to the e820 map (the EBDA and the legacy hole follow).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and everything after it is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap below 4 GiB: guest RAM above it is placed after 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_SIZE: u64 = 0x3000_0000; // 768 MiB, up to 4 GiB
/// virtio-mmio devices: one page each from the gap's start, IRQs from [`VIRTIO_IRQ_BASE`].
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The most virtio-mmio devices a VM gets (IRQs 5..=23 on the IO-APIC).
pub const VIRTIO_MAX_DEVICES: u32 = 19;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1: the console.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_SIZE: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller (data 0x60, command/status 0x64): the guest's `reboot=k` path and the
/// kernel's probe.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_SIZE: u16 = 5;
/// The boot-timer pseudo device: the guest writes [`BOOT_TIMER_MAGIC`] to this port when its
/// agent is ready (the agent does, through `/dev/port`), and the VMM records the time since it
/// started the VM.
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The `virtio_mmio.device=` argument the kernel needs to find device `index` (requires
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn virtio_mmio_cmdline(index: u32) -> String {
    let base = VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE;
    format!(
        "virtio_mmio.device=4K@{base:#x}:{}",
        VIRTIO_IRQ_BASE + index
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // The virtio devices fit below the IO-APIC and on its 24 pins.
    const _: () =
        assert!(VIRTIO_MMIO_BASE + VIRTIO_MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE < IOAPIC_START);
    const _: () = assert!(VIRTIO_IRQ_BASE + VIRTIO_MAX_DEVICES <= 24);

    #[test]
    fn virtio_devices_are_declared_on_the_command_line() {
        assert_eq!(virtio_mmio_cmdline(1), "virtio_mmio.device=4K@0xd0001000:6");
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let ranges = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000 * PDE_COUNT),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    }
}
