//! Guest RAM: anonymous mappings, each inside a larger `PROT_NONE` reservation so one unmapped
//! guard page sits before and after it (a device model that runs off the end of a region faults
//! instead of touching a neighbouring host mapping).
//!
//! vm-memory regions built from a raw pointer do not unmap on drop, so [`GuestRam`] owns the
//! reservations and unmaps them only once it holds the last reference to each region; if a
//! clone of the memory is still alive somewhere (a leaked device), the mapping is leaked instead
//! of being pulled from under it.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::GuestMemory;
use crate::layout::{MMIO_GAP_SIZE, MMIO_GAP_START};

const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;

#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    #[error("guest memory size {0:#x} is not a non-zero multiple of the page size")]
    BadSize(u64),
    #[error("reserving guest memory")]
    Reserve(#[source] io::Error),
    #[error("mapping guest memory")]
    Map(#[source] io::Error),
    #[error("building the guest memory region")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("assembling guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// The guest physical RAM ranges for `size` bytes: from 0, with whatever would overlap the MMIO
/// gap moved above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        debug_assert_eq!(MMIO_GAP_START + MMIO_GAP_SIZE, FOUR_GIB);
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(FOUR_GIB), size - MMIO_GAP_START),
        ]
    }
}

/// Guest RAM and the host mappings behind it.
pub struct GuestRam {
    // Dropped before `reservations` (field order), so a reservation holding the last reference
    // to its region knows nobody else uses it.
    mem: GuestMemory,
    // Held only to be dropped after `mem`.
    _reservations: Vec<Reservation>,
}

impl GuestRam {
    /// `size` bytes of RAM laid out by [`ram_ranges`].
    pub fn new(size: u64) -> Result<GuestRam, GuestRamError> {
        if size == 0 || !size.is_multiple_of(page_size()) {
            return Err(GuestRamError::BadSize(size));
        }
        let mut reservations = Vec::new();
        let mut regions = Vec::new();
        for (base, len) in ram_ranges(size) {
            let len = usize::try_from(len).map_err(|_| GuestRamError::BadSize(size))?;
            let reservation = Reservation::new(len)?;
            // SAFETY: `ram_ptr()..+len` is a readable, writable MAP_SHARED anonymous mapping
            // owned by `reservation`, which this `GuestRam` keeps until the region's last
            // reference is gone (see `Drop`).
            let mapping = unsafe {
                MmapRegion::build_raw(
                    reservation.ram_ptr(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    RAM_FLAGS,
                )
            }
            .map_err(GuestRamError::Region)?;
            let mapping = Arc::new(mapping);
            let region = GuestRegionMmap::with_arc(mapping.clone(), base)
                .ok_or(GuestRamError::BadSize(size))?;
            let mut reservation = reservation;
            reservation.region = Some(mapping);
            reservations.push(reservation);
            regions.push(region);
        }
        let mem = GuestMemory::from_regions(regions).map_err(GuestRamError::Collection)?;
        Ok(GuestRam {
            mem,
            _reservations: reservations,
        })
    }

    /// The guest memory (cheap to clone: devices keep their own handle).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Each region as KVM needs it: (guest address, size, host address).
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
    }
}

const RAM_FLAGS: i32 = libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant and has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// A `PROT_NONE` reservation of `len` + two pages with RAM mapped over all but the first and
/// last page. Unmapped (all of it) on drop, unless the region over it is still referenced.
struct Reservation {
    base: NonNull<libc::c_void>,
    total: usize,
    len: usize,
    /// Our reference to the region over the RAM, kept so teardown can tell whether anybody
    /// else still holds it.
    region: Option<Arc<MmapRegion<()>>>,
}

impl Reservation {
    fn new(len: usize) -> Result<Reservation, GuestRamError> {
        let page = usize::try_from(page_size()).unwrap_or(4096);
        let total = len
            .checked_add(2 * page)
            .ok_or(GuestRamError::BadSize(len as u64))?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address the kernel picks; it
        // touches no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(GuestRamError::Reserve(io::Error::last_os_error()));
        }
        let base = NonNull::new(base).ok_or(GuestRamError::Reserve(io::ErrorKind::Other.into()))?;
        // Owned from here: an error below unmaps it.
        let reservation = Reservation {
            base,
            total,
            len,
            region: None,
        };
        let ram = reservation.ram_ptr().cast::<libc::c_void>();
        // SAFETY: MAP_FIXED replaces only pages inside our own reservation (from one page
        // after its start, `len` bytes, ending one page before its end), which nothing else
        // references yet.
        let mapped = unsafe {
            libc::mmap(
                ram,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                RAM_FLAGS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED || mapped != ram {
            return Err(GuestRamError::Map(io::Error::last_os_error()));
        }
        Ok(reservation)
    }

    fn ram_ptr(&self) -> *mut u8 {
        // The first page is the leading guard page.
        self.base
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(usize::try_from(page_size()).unwrap_or(4096))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(region) = self.region.take()
            && Arc::into_inner(region).is_none()
        {
            tracing::warn!(
                size = self.len,
                "guest memory still referenced at teardown; leaking its mapping"
            );
            return;
        }
        // SAFETY: the whole reservation is ours; the region over it is gone (we held its last
        // reference, or it was never built), so no slice into it is alive.
        let rc = unsafe { libc::munmap(self.base.as_ptr(), self.total) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "unmapping guest memory");
        }
    }
}

// SAFETY: the reservation is plain address space; the pointer is only used to unmap it.
unsafe impl Send for Reservation {}
// SAFETY: as above: no method reads or writes through the pointer.
unsafe impl Sync for Reservation {}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_memory_is_one_region_from_zero() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let size = 4 * GIB;
        assert_eq!(
            ram_ranges(size),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(FOUR_GIB), size - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn ram_is_usable_and_guarded() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        mem.write_obj(7u8, GuestAddress((16 << 20) - 1)).unwrap();
        assert!(mem.write_obj(7u8, GuestAddress(16 << 20)).is_err());
        let (gpa, size, host) = ram.regions().next().unwrap();
        assert_eq!((gpa, size), (0, 16 << 20));
        // The pages either side of the RAM are reserved PROT_NONE.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let page = page_size();
        let guard_before = format!("{:x}-{:x} ---p", host - page, host);
        let guard_after = format!("{:x}-", host + size);
        assert!(
            maps.contains(&guard_before),
            "no guard before {host:x}:\n{maps}"
        );
        let after = maps.lines().find(|l| l.starts_with(&guard_after)).unwrap();
        assert!(after.contains(" ---p "), "{after}");
    }

    #[test]
    fn teardown_unmaps_unless_memory_is_still_shared() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let host = ram.regions().next().unwrap().2;
        drop(ram);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!maps.contains(&format!("{host:x}-")));

        let ram = GuestRam::new(1 << 20).unwrap();
        let kept = ram.memory().clone();
        drop(ram);
        // Still readable: the mapping was leaked, not unmapped.
        kept.write_obj(1u64, GuestAddress(0)).unwrap();
        assert_eq!(kept.read_obj::<u64>(GuestAddress(0)).unwrap(), 1);
    }

    #[test]
    fn odd_sizes_are_refused() {
        assert!(matches!(GuestRam::new(0), Err(GuestRamError::BadSize(0))));
        assert!(matches!(
            GuestRam::new(1000),
            Err(GuestRamError::BadSize(1000))
        ));
    }
}
