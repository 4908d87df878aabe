//! Memory for the drivers: a bump heap for `alloc` and a bump page allocator for DMA, both in
//! `.bss`, and the virtio-mmio transports. Nothing is ever freed (the program is short-lived).
//! The VMM identity-maps the first 4 GiB, so a buffer's physical address is its address.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// virtio-mmio devices: one page each from the start of the MMIO gap (yard-vmm's `layout.rs`).
const VIRTIO_MMIO_BASE: usize = 0xd000_0000;
const VIRTIO_MMIO_SIZE: usize = 0x1000;
const VIRTIO_MMIO_DEVICES: usize = 2;

/// A fixed, page-aligned arena handing out memory from its start, never reusing it, so every
/// allocation is fresh zeroed `.bss` memory.
#[repr(C, align(4096))]
struct Bump<const N: usize> {
    memory: UnsafeCell<[u8; N]>,
    used: AtomicUsize,
}

// SAFETY: the arena's bytes are only reached through `alloc`, whose atomic update of `used` hands
// every byte to at most one caller.
unsafe impl<const N: usize> Sync for Bump<N> {}

impl<const N: usize> Bump<N> {
    const fn new() -> Self {
        Self {
            memory: UnsafeCell::new([0; N]),
            used: AtomicUsize::new(0),
        }
    }

    fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        let base = self.memory.get() as usize;
        let mut start = 0;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                start = (base + used).next_multiple_of(layout.align()) - base;
                let end = start.checked_add(layout.size())?;
                (end <= N).then_some(end)
            })
            .ok()?;
        NonNull::new(self.memory.get().cast::<u8>().wrapping_add(start))
    }
}

struct Heap(Bump<{ 512 * 1024 }>);

// SAFETY: `alloc` returns a block of the requested size and alignment inside the arena that no
// other allocation overlaps (the arena never reuses memory), or null when the arena is full.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .alloc(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static HEAP: Heap = Heap(Bump::new());

static DMA: Bump<{ 64 * PAGE_SIZE }> = Bump::new();

/// The drivers' view of this machine: DMA pages from [`DMA`], identity mapping everywhere.
pub struct DmaHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned pages used by nobody else (the arena never
// reuses memory) whose physical address is their address (identity mapping); `share` hands the
// device the buffer itself, which is in identity-mapped RAM like all of this program's memory.
unsafe impl Hal for DmaHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE);
        match layout.ok().and_then(|l| DMA.alloc(l)) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

static TAKEN: [AtomicBool; VIRTIO_MMIO_DEVICES] =
    [const { AtomicBool::new(false) }; VIRTIO_MMIO_DEVICES];

/// Why a transport could not be opened.
pub enum TransportError {
    /// Not one of the device slots this program knows, or already opened.
    Unavailable(usize),
    Mmio(MmioError),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(index) => write!(f, "slot {index} unavailable"),
            Self::Mmio(e) => write!(f, "{e}"),
        }
    }
}

/// The virtio-mmio transport of device `index` (0: block, 1: vsock), at most once per index.
pub fn mmio_transport(index: usize) -> Result<MmioTransport<'static>, TransportError> {
    let first = TAKEN
        .get(index)
        .is_some_and(|taken| !taken.swap(true, Ordering::Relaxed));
    let addr = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
    let header = NonNull::new(addr as *mut VirtIOHeader);
    let (true, Some(header)) = (first, header) else {
        return Err(TransportError::Unavailable(index));
    };
    // SAFETY: the VMM puts a virtio-mmio register page (header and config space) at this
    // identity-mapped, page-aligned address for the whole life of the VM, and `TAKEN` makes this
    // transport its only user in the program.
    unsafe { MmioTransport::new(header, VIRTIO_MMIO_SIZE) }.map_err(TransportError::Mmio)
}
