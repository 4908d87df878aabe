//! A test guest for the block device: one request queue in test memory, requests built by
//! hand.

use std::io::Write as _;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::super::mmio::MmioTransport;
use super::super::testing::*;
use super::*;
use crate::GuestMemory;
use crate::irq::CountingInterrupt;
use crate::seccomp::Seccomp;

pub const HDR: u64 = 0x100000;
pub const DATA: u64 = 0x110000;
pub const STATUS: u64 = 0x130000;

pub struct Rig {
    pub t: MmioTransport,
    pub q: DriverQueue,
    pub mem: GuestMemory,
    pub irq: Arc<CountingInterrupt>,
    pub file: tempfile::NamedTempFile,
}

/// A disk file of 8 sectors (and a partial one) whose sector `i` is filled with byte `i`.
pub fn disk_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut content = vec![0u8; 8 * 512 + 100];
    for (i, b) in content.iter_mut().enumerate() {
        *b = u8::try_from(i / 512).unwrap();
    }
    file.write_all(&content).unwrap();
    file
}

pub fn rig(read_only: bool) -> Rig {
    let file = disk_file();
    let dev = Block::new(file.path(), read_only, Seccomp::Enforce).unwrap();
    assert_eq!(dev.capacity(), 8);
    rig_with(dev, read_only, file)
}

/// An empty device (as the VMM's spare disks start) with `file` not yet attached, and the
/// handle that swaps it in.
pub fn empty_rig(read_only: bool) -> (Rig, BlockHandle) {
    let dev = Block::empty(read_only, Seccomp::Enforce).unwrap();
    assert_eq!(dev.capacity(), 0);
    let handle = dev.handle();
    (rig_with(dev, read_only, disk_file()), handle)
}

fn rig_with(dev: Block, read_only: bool, file: tempfile::NamedTempFile) -> Rig {
    let mem = memory();
    let irq = CountingInterrupt::new();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
    let features = negotiate(&mut t);
    assert_ne!(features & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(features & VIRTIO_BLK_F_RO != 0, read_only);
    let q = DriverQueue::new(0, 16, 0x10000);
    q.setup(&mut t);
    driver_ok(&mut t);
    Rig {
        t,
        q,
        mem,
        irq,
        file,
    }
}

impl Rig {
    /// Submit one request; (status, used len).
    pub fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        let head = self.q.add(&self.mem, &chain);
        // Notify as an MMIO exit would (no ioeventfd in tests).
        notify(&mut self.t, 0);
        let (id, len) = self.q.wait_used(&self.mem);
        assert_eq!(id, u32::from(head));
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }
}
