//! virtio-blk on a plain file: IN, OUT, FLUSH and GET_ID, with pread/pwrite on 512-byte
//! sectors. Malformed requests complete with IOERR/UNSUPP; nothing the guest sends panics.
//!
//! The backing file can be swapped (or removed) while the device runs, through a
//! [`BlockHandle`]: the VMM boots with spare, empty devices and gives them a later container's
//! image at run time, since virtio-mmio has no hotplug.
//!
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice).
//! - [`event_handler`]: the worker's loop over the request queue.
//! - [`request`]: parsing and serving one request against the file.

mod device;
mod event_handler;
mod request;
#[cfg(test)]
mod testing;

/// Serves every request the guest has posted on `queue` against `file` (as the worker does on a
/// notification), with no worker thread: for the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn serve_queue(
    mem: &crate::GuestMemory,
    queue: &mut virtio_queue::Queue,
    file: std::fs::File,
    read_only: bool,
) {
    let capacity = file.metadata().map_or(0, |m| m.len()) / SECTOR_SIZE;
    let disk = Disk {
        file,
        read_only,
        capacity,
        id: *b"fuzz-disk-0000000000",
    };
    let irq = super::InterruptStatus::new(crate::irq::CountingInterrupt::new());
    event_handler::process_queue(&Arc::new(Mutex::new(Some(disk))), mem, queue, &irq);
}

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use self::request::Disk;
use super::worker::{Worker, WorkerError};
use crate::seccomp::{Seccomp, ThreadKind};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const VIRTIO_BLK_ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sizing {path}")]
    Size {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// The backing file, shared by the device (config space), its worker (requests) and every
/// [`BlockHandle`]; `None` is an empty slot (capacity 0).
type Backend = Arc<Mutex<Option<Disk>>>;

fn lock(backend: &Backend) -> MutexGuard<'_, Option<Disk>> {
    backend.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Block {
    backend: Backend,
    /// Offered as `VIRTIO_BLK_F_RO`: fixed for the device's life (the guest reads it once, at
    /// probe), so every backing file swapped in later is opened read-only too.
    read_only: bool,
    queue_sizes: [u16; 1],
    /// Made with the device, so activation (on a vCPU thread) needs no new thread.
    worker: Worker,
    active: bool,
}

impl Block {
    /// A device on `path`; its worker thread runs under the block worker's filter per
    /// `seccomp`.
    pub fn new(path: &Path, read_only: bool, seccomp: Seccomp) -> Result<Block, BlockError> {
        let disk = Disk::open(path, read_only)?;
        Block::with_backend(Some(disk), read_only, seccomp)
    }

    /// A device without a backing file: capacity 0, every read and write fails with IOERR,
    /// until a [`BlockHandle::set`] swaps one in.
    pub fn empty(read_only: bool, seccomp: Seccomp) -> Result<Block, BlockError> {
        Block::with_backend(None, read_only, seccomp)
    }

    fn with_backend(
        disk: Option<Disk>,
        read_only: bool,
        seccomp: Seccomp,
    ) -> Result<Block, BlockError> {
        Ok(Block {
            backend: Arc::new(Mutex::new(disk)),
            read_only,
            queue_sizes: [QUEUE_SIZE],
            worker: Worker::new("virtio-blk", ThreadKind::BlockWorker, seccomp)?,
            active: false,
        })
    }

    /// Size in 512-byte sectors (a trailing partial sector is not exposed); 0 when empty.
    pub fn capacity(&self) -> u64 {
        lock(&self.backend).as_ref().map_or(0, |d| d.capacity)
    }

    /// Swaps the backing file from another thread, while the device runs.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            backend: self.backend.clone(),
            read_only: self.read_only,
        }
    }

    pub(super) fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity().to_le_bytes());
        // size_max (8..12) unused; seg_max:
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

/// Replaces a [`Block`]'s backing file at run time (firecracker's "update a drive's backing
/// file"). The caller then tells the driver with a config-change interrupt
/// ([`MmioTransport::notify_config_change`](super::mmio::MmioTransport::notify_config_change)),
/// so it re-reads the capacity.
#[derive(Clone)]
pub struct BlockHandle {
    backend: Backend,
    read_only: bool,
}

impl BlockHandle {
    /// Opens `path` (read-only if `read_only` or the device is) and swaps it in; `None`
    /// empties the device. Waits for the request being served, if any: requests after the swap
    /// see the new file; the old one is closed here.
    pub fn set(&self, disk: Option<(&Path, bool)>) -> Result<(), BlockError> {
        let disk = match disk {
            Some((path, read_only)) => Some(Disk::open(path, read_only || self.read_only)?),
            None => None,
        };
        let old = std::mem::replace(&mut *lock(&self.backend), disk);
        drop(old);
        Ok(())
    }

    /// Current size in sectors; 0 when empty.
    pub fn capacity(&self) -> u64 {
        lock(&self.backend).as_ref().map_or(0, |d| d.capacity)
    }
}

impl Disk {
    fn open(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
        let name = || path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: name(),
                source,
            })?;
        // Block devices report size 0 in their metadata; seeking to the end works for both.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: name(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: name(),
            source,
        })?;
        // A stable serial: the backing file's identity, like firecracker's device id.
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let s = format!("{:x}{:x}", meta.dev(), meta.ino());
        let n = s.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        Ok(Disk {
            file,
            read_only,
            capacity: size / SECTOR_SIZE,
            id,
        })
    }
}
