//! A test-side virtio driver: lays out split virtqueues in a test's guest memory, brings a
//! device up through the MMIO registers as Linux does, posts descriptor chains and reads the
//! used ring.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::*;
use crate::GuestMemory;
use crate::bus::BusDevice;

pub const MEM_SIZE: usize = 0x40_0000;
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

pub fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(0, offset, &v.to_le_bytes());
}

/// One split virtqueue in guest memory, driven from the test.
pub struct DriverQueue {
    pub index: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Queue `index` with its rings at `base` (64 KiB reserved).
    pub fn new(index: u32, size: u16, base: u64) -> Self {
        DriverQueue {
            index,
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + 0x8000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Program this queue into the transport and mark it ready.
    pub fn setup(&self, t: &mut MmioTransport) {
        write32(t, REG_QUEUE_SEL, self.index);
        write32(t, REG_QUEUE_NUM, u32::from(self.size));
        let [desc_lo, desc_hi] = halves(self.desc);
        let [avail_lo, avail_hi] = halves(self.avail);
        let [used_lo, used_hi] = halves(self.used);
        write32(t, REG_QUEUE_DESC_LOW, desc_lo);
        write32(t, REG_QUEUE_DESC_HIGH, desc_hi);
        write32(t, REG_QUEUE_DRIVER_LOW, avail_lo);
        write32(t, REG_QUEUE_DRIVER_HIGH, avail_hi);
        write32(t, REG_QUEUE_DEVICE_LOW, used_lo);
        write32(t, REG_QUEUE_DEVICE_HIGH, used_hi);
        write32(t, REG_QUEUE_READY, 1);
        assert_eq!(read32(t, REG_QUEUE_READY), 1, "queue {} ready", self.index);
    }

    /// The descriptor index the next chain starts at.
    pub fn peek_next_desc(&self) -> u16 {
        self.next_desc
    }

    /// Post a chain of (addr, len, device-writable) buffers; returns its head index.
    pub fn add(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (self.next_desc) % self.size;
            let last = i + 1 == bufs.len();
            let next = (idx + 1) % self.size;
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let d = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(if last { 0u16 } else { next }, GuestAddress(d + 14))
                .unwrap();
            self.next_desc = next;
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The next used element, if the device published one: (head id, len).
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        ))
    }

    /// Wait (polling, as a guest without interrupts would) for the next used element.
    pub fn wait_used(&mut self, mem: &GuestMemory) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = self.pop_used(mem) {
                return u;
            }
            assert!(
                Instant::now() < deadline,
                "no used buffer on queue {}",
                self.index
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// ACKNOWLEDGE, DRIVER, features (all offered), FEATURES_OK; queues are set up by the caller,
/// then [`driver_ok`].
pub fn negotiate(t: &mut MmioTransport) -> u64 {
    assert_eq!(read32(t, REG_MAGIC), MAGIC_VALUE);
    assert_eq!(read32(t, REG_VERSION), 2);
    write32(t, REG_STATUS, 0);
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write32(t, REG_DEVICE_FEATURES_SEL, 0);
    let lo = read32(t, REG_DEVICE_FEATURES);
    write32(t, REG_DEVICE_FEATURES_SEL, 1);
    let hi = read32(t, REG_DEVICE_FEATURES);
    write32(t, REG_DRIVER_FEATURES_SEL, 0);
    write32(t, REG_DRIVER_FEATURES, lo);
    write32(t, REG_DRIVER_FEATURES_SEL, 1);
    write32(t, REG_DRIVER_FEATURES, hi);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write32(t, REG_STATUS, s);
    assert_eq!(read32(t, REG_STATUS), s);
    u64::from(lo) | (u64::from(hi) << 32)
}

pub fn driver_ok(t: &mut MmioTransport) {
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    write32(t, REG_STATUS, s);
    assert_eq!(read32(t, REG_STATUS), s);
    assert!(t.is_activated());
}

/// Notify queue `index` as a guest's MMIO write would.
pub fn notify(t: &mut MmioTransport, index: u32) {
    write32(t, REG_QUEUE_NOTIFY, index);
}
