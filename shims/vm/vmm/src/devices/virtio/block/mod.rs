//! virtio-blk on a plain file: IN, OUT, FLUSH and GET_ID, with pread/pwrite on 512-byte
//! sectors. Malformed requests complete with IOERR/UNSUPP; nothing the guest sends panics.
//!
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice).
//! - [`event_handler`]: the worker's loop over the request queue.
//! - [`request`]: parsing and serving one request against the file.

mod device;
mod event_handler;
mod request;
#[cfg(test)]
mod testing;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::worker::Worker;

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
}

pub struct Block {
    file: Arc<File>,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    queue_sizes: [u16; 1],
    worker: Option<Worker>,
}

impl Block {
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
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
        Ok(Block {
            file: Arc::new(file),
            read_only,
            capacity: size / SECTOR_SIZE,
            id,
            queue_sizes: [QUEUE_SIZE],
            worker: None,
        })
    }

    /// Size in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) unused; seg_max:
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}
