//! A test guest for the net device: its RX and TX queues in test memory, and a fake tap, one end
//! of a `SOCK_SEQPACKET` pair (frames keep their boundaries, as on a tap) whose offload switch
//! records what it was told.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::super::mmio::*;
use super::super::testing::*;
use super::*;
use crate::GuestMemory;
use crate::irq::CountingInterrupt;

/// RX buffers from here, TX frames from [`TX_AREA`].
pub const RX_AREA: u64 = 0x100000;
pub const TX_AREA: u64 = 0x200000;
pub const MAC: [u8; 6] = [0x02, 0x59, 0x41, 0x52, 0x44, 0x01];
pub const MTU: u32 = 1500;

/// One end of a seqpacket pair as the device's tap.
pub struct FakeTap {
    file: File,
    /// Every `set_offload` call, in order.
    pub offloads: Mutex<Vec<u32>>,
    pub reads: AtomicU64,
    /// The thread that reads: the worker.
    pub reader_tid: AtomicI32,
}

impl FakeTap {
    pub fn new(fd: OwnedFd) -> Self {
        FakeTap {
            file: File::from(fd),
            offloads: Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
            reader_tid: AtomicI32::new(0),
        }
    }
}

impl TapBackend for FakeTap {
    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        // SAFETY: gettid has no preconditions.
        self.reader_tid
            .store(unsafe { libc::gettid() }, Ordering::SeqCst);
        (&self.file).read(buf)
    }

    fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

pub struct Rig {
    pub t: MmioTransport,
    pub mem: GuestMemory,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    pub tap: Arc<FakeTap>,
    /// The host's end: what the device writes to the tap, and frames for the guest.
    pub peer: UnixDatagram,
    pub irq: Arc<CountingInterrupt>,
    /// The features the driver accepted.
    pub features: u64,
    next_rx: u64,
    next_tx: u64,
}

/// A device brought up by a driver that accepts the offered features in `accept` (VERSION_1
/// always), with its queues ready and no RX buffers posted.
pub fn rig(accept: u64) -> Rig {
    let (ours, theirs) = sys::test_support::seqpacket_pair();
    rig_on(
        Arc::new(FakeTap::new(ours)),
        theirs,
        accept,
        crate::seccomp::Seccomp::Enforce,
    )
}

pub fn rig_on(
    tap: Arc<FakeTap>,
    peer: OwnedFd,
    accept: u64,
    seccomp: crate::seccomp::Seccomp,
) -> Rig {
    let dev = Net::with_backend(tap.clone(), MAC, MTU, seccomp).unwrap();
    let mem = memory();
    let irq = CountingInterrupt::new();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
    let features = negotiate_some(&mut t, accept);
    let rx = DriverQueue::new(0, 16, 0x10000);
    let tx = DriverQueue::new(1, 16, 0x20000);
    rx.setup(&mut t);
    tx.setup(&mut t);
    driver_ok(&mut t);
    // A blocking receive with a deadline: the test never waits forever.
    let peer = UnixDatagram::from(peer);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    Rig {
        t,
        mem,
        rx,
        tx,
        tap,
        peer,
        irq,
        features,
        next_rx: RX_AREA,
        next_tx: TX_AREA,
    }
}

/// The device's offered features (both words).
pub fn offered(t: &mut MmioTransport) -> u64 {
    write32(t, REG_DEVICE_FEATURES_SEL, 0);
    let lo = read32(t, REG_DEVICE_FEATURES);
    write32(t, REG_DEVICE_FEATURES_SEL, 1);
    let hi = read32(t, REG_DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// ACKNOWLEDGE, DRIVER, the offered features within `accept` (and VERSION_1), FEATURES_OK.
pub fn negotiate_some(t: &mut MmioTransport, accept: u64) -> u64 {
    write32(t, REG_STATUS, 0);
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    let features = offered(t) & (accept | VIRTIO_F_VERSION_1_BIT);
    let [lo, hi] = halves(features);
    write32(t, REG_DRIVER_FEATURES_SEL, 0);
    write32(t, REG_DRIVER_FEATURES, lo);
    write32(t, REG_DRIVER_FEATURES_SEL, 1);
    write32(t, REG_DRIVER_FEATURES, hi);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write32(t, REG_STATUS, s);
    assert_eq!(read32(t, REG_STATUS), s);
    features
}

const VIRTIO_F_VERSION_1_BIT: u64 = super::super::VIRTIO_F_VERSION_1;

/// A 12-byte header with `num_buffers` set to garbage (the device must overwrite it), then
/// `payload_len` bytes of a pattern seeded by `seed`.
pub fn frame(seed: u8, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 0; // flags
    f[1] = 0; // gso_type
    f[10..12].copy_from_slice(&0xbeefu16.to_le_bytes());
    f.extend((0..payload_len).map(|i| seed.wrapping_add(i.to_le_bytes()[0])));
    f
}

impl Rig {
    /// Posts one RX chain of buffers of the given sizes; its head.
    pub fn post_rx(&mut self, sizes: &[u32]) -> u16 {
        let mut bufs = Vec::new();
        for &len in sizes {
            bufs.push((self.next_rx, len, true));
            self.next_rx += u64::from(len).next_multiple_of(64);
        }
        assert!(self.next_rx < TX_AREA, "RX area full");
        self.rx.add(&self.mem, &bufs)
    }

    /// Notifies the RX queue, as the guest does after posting buffers.
    pub fn kick_rx(&mut self) {
        notify(&mut self.t, 0);
    }

    /// Posts `data` as a TX chain split into `pieces` readable descriptors and notifies; the
    /// head.
    pub fn send(&mut self, data: &[u8], pieces: usize) -> u16 {
        let chunk = data.len().div_ceil(pieces).max(1);
        let mut bufs = Vec::new();
        for part in data.chunks(chunk) {
            self.mem
                .write_slice(part, GuestAddress(self.next_tx))
                .unwrap();
            bufs.push((self.next_tx, u32::try_from(part.len()).unwrap(), false));
            self.next_tx += (part.len() as u64).next_multiple_of(64);
        }
        if self.next_tx > TX_AREA + 0x100000 {
            self.next_tx = TX_AREA;
        }
        let head = self.tx.add(&self.mem, &bufs);
        notify(&mut self.t, 1);
        head
    }

    /// Posts a raw TX chain (addr, len, device-writable) and notifies; the head.
    pub fn send_raw(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.tx.add(&self.mem, bufs);
        notify(&mut self.t, 1);
        head
    }

    /// The next frame the device wrote to the tap.
    pub fn tap_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; FRAME_BUF_LEN + 100];
        let n = self.peer.recv(&mut buf).expect("a frame on the tap");
        buf.truncate(n);
        buf
    }

    /// The frame the device wrote to the tap, if one is there now (no waiting).
    pub fn tap_frame_now(&self) -> Option<Vec<u8>> {
        self.peer.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; FRAME_BUF_LEN + 100];
        let got = self.peer.recv(&mut buf);
        self.peer.set_nonblocking(false).unwrap();
        match got {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Puts a frame on the tap for the guest.
    pub fn host_sends(&self, f: &[u8]) {
        assert_eq!(self.peer.send(f).unwrap(), f.len());
    }

    /// The bytes of a used RX chain posted as one buffer at `addr`.
    pub fn read_guest(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// Waits up to `window` for a used RX entry; `None` if none came.
    pub fn rx_used_within(&mut self, window: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + window;
        loop {
            if let Some(u) = self.rx.pop_used(&self.mem) {
                return Some(u);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// CPU time a thread of this process has used, in nanoseconds.
pub fn thread_cpu_ns(tid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

pub use switchyard_base::gate::{is_root, require};

/// Waits until `done` holds, polling every millisecond for 5 s at most; panics with `what`
/// after that.
pub fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A frame's length as a used length.
pub fn len32(f: &[u8]) -> u32 {
    u32::try_from(f.len()).unwrap()
}
