//! The boot GDT and IDT, and the `kvm_segment`s loaded from it: the vCPU starts with its
//! segment registers already describing these entries, as if the guest had loaded them.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};

/// Null, 64-bit code, data, TSS (flags in the descriptor's access/flags bit layout).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_INDEX: u16 = 1;
pub const DATA_INDEX: u16 = 2;
pub const TSS_INDEX: u16 = 3;

/// A segment descriptor. `flags` holds the access byte in bits 0..8 and the G/DB/L/AVL nibble
/// in bits 12..16, as they sit in the descriptor's second dword shifted down by 8.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

#[allow(clippy::cast_possible_truncation)] // masked to the 20 bits of a segment limit
fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The segment register contents for GDT entry `index`.
pub fn segment(index: u16, entry: u64) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes [`BOOT_GDT`] and an empty IDT to guest memory.
pub fn write_gdt_idt(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in (0u64..).zip(BOOT_GDT) {
        mem.write_obj(entry, GuestAddress(BOOT_GDT_START + i * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_their_hardware_encoding() {
        // Values from the Intel SDM layout: 64-bit ring-0 code (L=1, G=1), flat data (DB=1).
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0x9b, 0x1234_5678, 0xabcde), 0x120a_9b34_5678_bcde);
    }

    #[test]
    fn segments_decode_the_entries() {
        let code = segment(CODE_INDEX, BOOT_GDT[1]);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.present, code.s, code.dpl, code.unusable),
            (1, 1, 0, 0)
        );
        assert_eq!((code.base, code.limit), (0, 0xfffff));
        let data = segment(DATA_INDEX, BOOT_GDT[2]);
        assert_eq!((data.selector, data.type_, data.l, data.db), (16, 3, 0, 1));
        let tss = segment(TSS_INDEX, BOOT_GDT[3]);
        assert_eq!((tss.selector, tss.type_, tss.s), (24, 0xb, 0));
        let null = segment(0, BOOT_GDT[0]);
        assert_eq!(null.unusable, 1);
        let odd = segment(5, gdt_entry(0x9b, 0x1234_5678, 0xabcde));
        assert_eq!((odd.base, odd.limit), (0x1234_5678, 0xabcde));
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(u64::MAX, GuestAddress(BOOT_IDT_START))
            .unwrap();
        write_gdt_idt(&mem).unwrap();
        for (i, e) in BOOT_GDT.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *e);
        }
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BOOT_IDT_START)).unwrap(),
            0
        );
    }
}
