//! The Intel MultiProcessor table (MP spec 1.4): how a kernel without ACPI finds the other
//! CPUs, the IO-APIC, and how the 24 ISA/IO-APIC interrupt lines are wired (identity).
//!
//! Built as bytes here (no `#[repr(C)]` casts), written at [`MPTABLE_START`] in the EBDA where
//! the kernel's `smp_scan_config` looks: the floating pointer, then the configuration table.

use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;
use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, MPTABLE_START};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1;
const CPU_FEATURE_APIC: u32 = 1 << 9;
/// IO-APIC inputs: ISA IRQs 0..16 and the virtio lines up to 23.
pub const IRQ_COUNT: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
/// The table must fit between `MPTABLE_START` and the end of the EBDA's 1 KiB.
const SPACE: usize = 0x400;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {max})", max = max_cpus())]
    TooManyCpus(u8),
    #[error("writing the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn table_len(cpus: usize) -> usize {
    FLOATING_LEN
        + HEADER_LEN
        + cpus * PROCESSOR_LEN
        + SMALL_ENTRY_LEN * (1 + 1 + usize::from(IRQ_COUNT) + 2)
}

/// The most vCPUs the table has room for.
pub fn max_cpus() -> usize {
    (SPACE - table_len(0)) / PROCESSOR_LEN
}

/// The IO-APIC's id: after the CPUs' APIC ids.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus + 1
}

/// Makes the byte sum of `bytes` zero by setting `bytes[at]`.
fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes[at] = 0u8.wrapping_sub(sum);
}

/// The table for `cpus` vCPUs (APIC ids 0..cpus, vCPU 0 the bootstrap processor).
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || usize::from(cpus) > max_cpus() {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = const { crate::layout::low32(MPTABLE_START + FLOATING_LEN as u64) };
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fix_checksum(&mut floating, 10);

    let ioapic = ioapic_id(cpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION]);
        // Enabled, and the bootstrap processor for vCPU 0.
        entries.push(if id == 0 { 0x3 } else { 0x1 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, APIC_VERSION, 1]);
    entries.extend_from_slice(&const { crate::layout::low32(IOAPIC_START) }.to_le_bytes());
    count += 2;
    for irq in 0..IRQ_COUNT {
        // Default polarity and trigger for the bus, ISA bus 0 line `irq` to IO-APIC pin `irq`.
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // The PIC on LINT0 of the bootstrap processor, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    let len =
        u16::try_from(HEADER_LEN + entries.len()).map_err(|_| MptableError::TooManyCpus(cpus))?;
    table.extend_from_slice(&len.to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]);
    table.extend_from_slice(b"SWITCHYD");
    table.extend_from_slice(b"YARD-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&const { crate::layout::low32(APIC_START) }.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum
    table.extend_from_slice(&entries);
    fix_checksum(&mut table, 7);

    floating.extend_from_slice(&table);
    debug_assert_eq!(floating.len(), table_len(usize::from(cpus)));
    Ok(floating)
}

/// Writes the table for `cpus` vCPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    debug_assert!(MPTABLE_START + bytes.len() as u64 <= EBDA_START + SPACE as u64);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn checksums_and_header() {
        let b = build(2).unwrap();
        let (fp, table) = b.split_at(FLOATING_LEN);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(u32_at(fp, 4) as u64, MPTABLE_START + 16);
        assert_eq!((fp[8], fp[9]), (1, 4));
        assert_eq!(sum(fp), 0);
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(usize::from(u16_at(table, 4)), table.len());
        assert_eq!(sum(table), 0);
        assert_eq!(u16_at(table, 34), 2 + 2 + 24 + 2);
        assert_eq!(u32_at(table, 36) as u64, APIC_START);
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_irqs() {
        let b = build(3).unwrap();
        let e = &b[FLOATING_LEN + HEADER_LEN..];
        for id in 0..3u8 {
            let p = &e[usize::from(id) * PROCESSOR_LEN..][..PROCESSOR_LEN];
            assert_eq!((p[0], p[1], p[2]), (ENTRY_PROCESSOR, id, APIC_VERSION));
            assert_eq!(p[3], if id == 0 { 3 } else { 1 });
        }
        let rest = &e[3 * PROCESSOR_LEN..];
        assert_eq!(&rest[..8], b"\x01\x00ISA   ");
        assert_eq!(&rest[8..12], &[ENTRY_IOAPIC, 4, APIC_VERSION, 1]);
        assert_eq!(u32_at(rest, 12) as u64, IOAPIC_START);
        for irq in 0..24u8 {
            let s = &rest[16 + 8 * usize::from(irq)..][..8];
            assert_eq!(s, &[ENTRY_INTSRC, 0, 0, 0, 0, irq, 4, irq]);
        }
        let lint = &rest[16 + 8 * 24..];
        assert_eq!(lint, &[4, 3, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0xff, 1]);
    }

    #[test]
    fn the_table_fits_the_ebda_or_is_refused() {
        assert_eq!(max_cpus(), 37);
        assert!(build(37).unwrap().len() <= SPACE);
        assert!(matches!(build(38), Err(MptableError::TooManyCpus(38))));
        assert!(matches!(build(0), Err(MptableError::TooManyCpus(0))));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write(&mem, 1).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
