//! Identity page tables for the first 4 GiB with 2 MiB pages: the kernel's 64-bit entry point
//! expects paging on, and a test guest can use them as they are (including the MMIO gap).

use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;
use crate::layout::{PDE_COUNT, PDE_START, PDPTE_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes the PML4, the PDPT and [`PDE_COUNT`] page directories; `cr3` is [`PML4_START`].
pub fn write_identity_tables(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    for pd in 0..PDE_COUNT {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(
            pd_addr | PRESENT_WRITABLE,
            GuestAddress(PDPTE_START + pd * 8),
        )?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                let phys = (pd << 30) | (i << 21);
                (phys | PRESENT_WRITABLE | PAGE_SIZE_2M).to_le_bytes()
            })
            .collect();
        mem.write_slice(&entries, GuestAddress(pd_addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(mem: &GuestMemory, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the tables like the MMU for a 2 MiB mapping.
    fn translate(mem: &GuestMemory, va: u64) -> Option<u64> {
        let pml4e = read(mem, PML4_START + ((va >> 39) & 511) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read(mem, (pml4e & !0xfff) + ((va >> 30) & 511) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = read(mem, (pdpte & !0xfff) + ((va >> 21) & 511) * 8);
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff))
    }

    #[test]
    fn the_first_four_gib_map_to_themselves() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        write_identity_tables(&mem).unwrap();
        for va in [
            0,
            0x7000,
            0x20_0000 + 0x123,
            0xd000_0050,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&mem, 0x1_0000_0000), None);
        assert_eq!(read(&mem, PML4_START), PDPTE_START | 3);
        assert_eq!(read(&mem, PDE_START + 8), 0x20_0000 | 0x83);
    }
}
