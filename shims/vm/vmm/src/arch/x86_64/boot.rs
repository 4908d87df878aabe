//! What the kernel finds in memory at its 64-bit entry: the kernel image itself (ELF, loaded at
//! its physical addresses), the initrd high in low RAM, the command line, and the zero page
//! (`struct boot_params`) with the e820 memory map.

use std::fs::File;
use std::io;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{Elf, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// The highest initrd address kernels accept since boot protocol 2.03 (an ELF vmlinux carries
/// no setup header to say otherwise).
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE: u64 = 0x1000;
const E820_RAM: u32 = 1;
/// The longest command line the kernel keeps, NUL included (x86 `COMMAND_LINE_SIZE`): it
/// silently cuts a longer one, which would lose the `virtio_mmio.device=` arguments at its end.
pub const KERNEL_CMDLINE_MAX: usize = 2048;
/// `boot_params.e820_table` has room for this many entries.
const E820_MAX: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum LoadKernelError {
    #[error("opening kernel {0}")]
    Open(String, #[source] io::Error),
    #[error("loading the kernel ELF")]
    Elf(#[source] linux_loader::loader::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadInitrdError {
    #[error("opening initrd {0}")]
    Open(String, #[source] io::Error),
    #[error(
        "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    TooBig {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("reading the initrd into guest memory")]
    Read(#[source] vm_memory::GuestMemoryError),
}

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error(
        "kernel command line of {len} bytes is too long (at most {max}, with the VMM's device arguments)",
        max = KERNEL_CMDLINE_MAX - 1
    )]
    TooLong { len: usize },
    #[error("building the kernel command line")]
    Build(#[source] linux_loader::cmdline::Error),
    #[error("writing the kernel command line")]
    Write(#[source] linux_loader::loader::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    #[error("{0} memory ranges overflow the zero page's e820 table")]
    TooManyRanges(usize),
    #[error("the initrd at {addr:#x} ({size} bytes) does not fit below 4 GiB")]
    InitrdAbove4G { addr: u64, size: u64 },
    #[error("writing the zero page")]
    Write(#[source] linux_loader::configurator::Error),
}

/// Where the kernel went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point (`rip`).
    pub entry: u64,
    /// First byte after the image.
    pub end: u64,
}

/// Loads an ELF (a vmlinux, or a static program linked at a physical address at or above
/// [`HIMEM_START`]) at its segments' physical addresses.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &std::path::Path,
) -> Result<LoadedKernel, LoadKernelError> {
    let mut file =
        File::open(path).map_err(|e| LoadKernelError::Open(path.display().to_string(), e))?;
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(LoadKernelError::Elf)?;
    Ok(LoadedKernel {
        entry: result.kernel_load.0,
        end: result.kernel_end,
    })
}

/// Where an initrd of `size` bytes goes: page aligned, as high as possible below the end of
/// low RAM (`lowmem_end`, below the MMIO gap) and the kernel's limit, and above `kernel_end`.
pub fn initrd_address(lowmem_end: u64, size: u64, kernel_end: u64) -> Option<u64> {
    let addr = initrd_limit(lowmem_end).checked_sub(size)? & !(PAGE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// The end of the space an initrd may occupy.
fn initrd_limit(lowmem_end: u64) -> u64 {
    lowmem_end.min(INITRD_ADDR_MAX + 1)
}

/// Reads the initrd into guest memory; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    path: &std::path::Path,
    lowmem_end: u64,
    kernel_end: u64,
) -> Result<(u64, u64), LoadInitrdError> {
    let open_err = |e| LoadInitrdError::Open(path.display().to_string(), e);
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let too_big = LoadInitrdError::TooBig {
        size,
        kernel_end,
        limit: initrd_limit(lowmem_end),
    };
    let Some(addr) = initrd_address(lowmem_end, size, kernel_end) else {
        return Err(too_big);
    };
    let len = usize::try_from(size).map_err(|_| too_big)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(LoadInitrdError::Read)?;
    Ok((addr, size))
}

/// The command line: `base` then each of `extra` (the `virtio_mmio.device=` arguments), at most
/// [`KERNEL_CMDLINE_MAX`] bytes with the terminating NUL.
pub fn build_cmdline(base: &str, extra: &[String]) -> Result<Cmdline, CmdlineError> {
    let len = std::iter::once(base.trim())
        .chain(extra.iter().map(String::as_str))
        .filter(|arg| !arg.is_empty())
        .map(|arg| arg.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    if len >= KERNEL_CMDLINE_MAX {
        return Err(CmdlineError::TooLong { len });
    }
    const _: () = assert!(KERNEL_CMDLINE_MAX <= CMDLINE_MAX_SIZE);
    let mut cmdline = Cmdline::new(KERNEL_CMDLINE_MAX).map_err(CmdlineError::Build)?;
    if !base.trim().is_empty() {
        cmdline
            .insert_str(base.trim())
            .map_err(CmdlineError::Build)?;
    }
    for arg in extra {
        cmdline.insert_str(arg).map_err(CmdlineError::Build)?;
    }
    Ok(cmdline)
}

/// Writes the command line at [`CMDLINE_START`]; returns its size with the NUL.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<u32, CmdlineError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(CmdlineError::Write)?;
    let len = cmdline
        .as_cstring()
        .map_err(CmdlineError::Build)?
        .as_bytes_with_nul()
        .len();
    // At most CMDLINE_MAX_SIZE, checked by the Cmdline's capacity.
    u32::try_from(len).map_err(|_| CmdlineError::TooLong { len })
}

/// The end of RAM below the MMIO gap, given the RAM regions (start, size).
pub fn lowmem_end(regions: &[(u64, u64)]) -> u64 {
    regions
        .iter()
        .filter(|(start, _)| *start < MMIO_GAP_START)
        .map(|(start, size)| (start + size).min(MMIO_GAP_START))
        .max()
        .unwrap_or(0)
}

/// The e820 RAM ranges for RAM `regions` (start, size): the region at 0 is cut into conventional
/// memory below the EBDA and everything from [`HIMEM_START`]; the EBDA (MP table), the VGA hole
/// and the BIOS area in between are left out, as is the MMIO gap between regions.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut map = Vec::new();
    for &(start, size) in regions {
        let end = start + size;
        if start == 0 {
            map.push((0, EBDA_START.min(end)));
            if end > HIMEM_START {
                map.push((HIMEM_START, end - HIMEM_START));
            }
        } else {
            map.push((start, size));
        }
    }
    map
}

/// The zero page contents.
pub fn boot_params_for(
    cmdline_size: u32,
    initrd: Option<(u64, u64)>,
    e820: &[(u64, u64)],
) -> Result<boot_params, ZeroPageError> {
    if e820.len() > E820_MAX {
        return Err(ZeroPageError::TooManyRanges(e820.len()));
    }
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = const { crate::layout::low32(CMDLINE_START) };
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initrd {
        // Both below 4 GiB: the address by `initrd_address`, the size by fitting below it.
        let (Ok(image), Ok(len)) = (u32::try_from(addr), u32::try_from(size)) else {
            return Err(ZeroPageError::InitrdAbove4G { addr, size });
        };
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = len;
    }
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries =
        u8::try_from(e820.len()).map_err(|_| ZeroPageError::TooManyRanges(e820.len()))?;
    Ok(params)
}

pub fn write_zero_page(mem: &GuestMemory, params: &boot_params) -> Result<(), ZeroPageError> {
    let params = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(ZeroPageError::Write)
}

/// Zeroes the first page so a stale value there cannot look like a BIOS data area pointer.
pub fn clear_low_page(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&[0u8; 0x400], GuestAddress(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MMIO_GAP_SIZE;

    #[test]
    fn e820_leaves_out_the_ebda_hole_and_the_gap() {
        assert_eq!(
            e820_map(&[(0, 128 << 20)]),
            vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]
        );
        let high = 4 << 30;
        let big = [(0, MMIO_GAP_START), (MMIO_GAP_START + MMIO_GAP_SIZE, high)];
        assert_eq!(
            e820_map(&big),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START),
                (1 << 32, high)
            ]
        );
        assert_eq!(lowmem_end(&big), MMIO_GAP_START);
        assert_eq!(lowmem_end(&[(0, 64 << 20)]), 64 << 20);
    }

    #[test]
    fn initrd_goes_high_in_low_ram_above_the_kernel() {
        assert_eq!(
            initrd_address(64 << 20, 0x1800, 0x40_0000),
            Some((64 << 20) - 0x2000)
        );
        assert_eq!(
            initrd_address(MMIO_GAP_START, 0x1000, 0),
            Some(INITRD_ADDR_MAX + 1 - 0x1000)
        );
        assert_eq!(initrd_address(8 << 20, 7 << 20, 2 << 20), None);
        assert_eq!(initrd_address(8 << 20, 9 << 20, 0), None);
    }

    #[test]
    fn cmdline_limits() {
        let extra = vec![crate::layout::virtio_mmio_cmdline(0)];
        let c = build_cmdline("console=ttyS0 reboot=k", &extra).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5"
        );
        // The kernel's limit, not the 4 KiB the VMM reserves for it in guest memory.
        let fits = "a".repeat(KERNEL_CMDLINE_MAX - 1);
        let c = build_cmdline(&fits, &[]).unwrap();
        assert_eq!(c.as_cstring().unwrap().as_bytes().len(), 2047);
        let long = "a".repeat(KERNEL_CMDLINE_MAX);
        let err = build_cmdline(&long, &[]).unwrap_err();
        assert!(
            matches!(err, CmdlineError::TooLong { len: 2048 }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "kernel command line of 2048 bytes is too long (at most 2047, with the VMM's device \
             arguments)"
        );
        // The device arguments count: 2000 + 1 + 34.
        let near = "a".repeat(2000);
        assert!(build_cmdline(&near, &extra).is_ok());
        let base = "a".repeat(KERNEL_CMDLINE_MAX - 1 - extra[0].len());
        assert!(matches!(
            build_cmdline(&base, &extra),
            Err(CmdlineError::TooLong { len: 2048 })
        ));
        assert!(build_cmdline(&base[1..], &extra).is_ok());
        assert!(build_cmdline("bad\u{1}char", &[]).is_err());
    }

    #[test]
    fn zero_page_and_cmdline_in_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let c = build_cmdline("console=ttyS0", &[]).unwrap();
        let size = write_cmdline(&mem, &c).unwrap();
        assert_eq!(size, 14);
        let mut got = [0u8; 14];
        mem.read_slice(&mut got, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&got, b"console=ttyS0\0");

        let e820 = e820_map(&[(0, 0x100_0000)]);
        let params = boot_params_for(size, Some((0xf0_0000, 0x1234)), &e820).unwrap();
        write_zero_page(&mem, &params).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = back.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(({ hdr.cmd_line_ptr }, { hdr.cmdline_size }), (0x20000, 14));
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0xf0_0000, 0x1234)
        );
        assert_eq!(back.e820_entries, 2);
        let e1 = back.e820_table[1];
        assert_eq!(
            (e1.addr, e1.size, e1.r#type),
            (HIMEM_START, 0xf0_0000, E820_RAM)
        );
        // Raw offsets from Documentation/arch/x86/zero-page.rst.
        let mut raw = [0u8; 4];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_START + 0x228))
            .unwrap();
        assert_eq!(u32::from_le_bytes(raw), 0x20000);
        assert!(boot_params_for(1, None, &vec![(0, 1); 129]).is_err());
    }
}
