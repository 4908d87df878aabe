//! Fuzz harnesses (the `fuzzing` feature): each takes the fuzzer's bytes as what a hostile guest
//! controls and drives a device model through the same code the VMM runs. The targets in
//! `fuzz/` are one call each; a crash they find becomes a regression test that calls the same
//! function with the crashing input.
//!
//! Guest memory is small (64 KiB) so that the fuzzer's addresses land both inside and outside
//! it; its first bytes are the input, so the descriptor tables and rings the harness points the
//! queues at are the fuzzer's.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::GuestMemory;
use crate::bus::BusDevice;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{self, Block};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{self, TapBackend};
use crate::devices::virtio::vsock::{self, Vsock};
use crate::irq::CountingInterrupt;
use crate::seccomp::Seccomp;

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
/// The sectors of a fuzzed disk.
const DISK_SECTORS: u64 = 8;
const GUEST_CID: u64 = 3;
/// The host port a guest connection to which finds a listener.
const LISTENING_PORT: u32 = 1024;

/// Guest memory whose first bytes are `data`.
fn memory(data: &[u8]) -> Option<GuestMemory> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    Some(mem)
}

/// A ready split queue with its descriptor table at `base`, its available ring at `base +
/// 0x100` and its used ring at `base + 0x200`.
fn queue(mem: &GuestMemory, base: u64) -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_desc_table_address(Some(low(base)), Some(0));
    q.set_avail_ring_address(Some(low(base + 0x100)), Some(0));
    q.set_used_ring_address(Some(low(base + 0x200)), Some(0));
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// Queue addresses here are below [`MEM_SIZE`].
fn low(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

/// A fresh in-memory disk file of [`DISK_SECTORS`] sectors.
fn disk() -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name and flags; it returns a new descriptor
    // or -1.
    let fd = unsafe { libc::memfd_create(c"yard-vmm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(DISK_SECTORS * block::SECTOR_SIZE).ok()?;
    Some(file)
}

/// virtio-blk request parsing: the requests the guest posted on the queue (descriptor table and
/// available ring from `data`) served against an 8-sector disk, writable unless `data`'s last
/// byte is odd.
pub fn virtio_blk(data: &[u8]) {
    let _ = blk_memory(data);
}

/// [`virtio_blk`], returning the guest memory afterwards.
fn blk_memory(data: &[u8]) -> Option<GuestMemory> {
    let mem = memory(data)?;
    let mut q = queue(&mem, 0)?;
    let read_only = data.last().is_some_and(|b| b & 1 == 1);
    block::serve_queue(&mem, &mut q, disk()?, read_only);
    Some(mem)
}

/// A directory for the vsock sockets, made once per process: the device's host listener and a
/// listener on [`LISTENING_PORT`] for guest connections.
struct VsockPlace {
    _dir: PathBuf,
    uds: PathBuf,
    host: UnixListener,
    peer: UnixListener,
}

fn vsock_place() -> Option<&'static VsockPlace> {
    static PLACE: OnceLock<Option<VsockPlace>> = OnceLock::new();
    PLACE
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("yard-vmm-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let uds = dir.join("v.sock");
            let _ = std::fs::remove_file(&uds);
            let peer_path = dir.join(format!("v.sock_{LISTENING_PORT}"));
            let _ = std::fs::remove_file(&peer_path);
            let host = UnixListener::bind(&uds).ok()?;
            host.set_nonblocking(true).ok()?;
            let peer = UnixListener::bind(&peer_path).ok()?;
            peer.set_nonblocking(true).ok()?;
            Some(VsockPlace {
                _dir: dir,
                uds,
                host,
                peer,
            })
        })
        .as_ref()
}

/// virtio-vsock packet parsing and the connection state machine: the guest's tx queue
/// (descriptor table at 0 in `data`) and rx queue (at 0x400), served for a few rounds. Guest
/// connections to port [`LISTENING_PORT`] reach a listener, others are refused.
pub fn virtio_vsock(data: &[u8]) {
    let _ = vsock_memory(data);
}

/// [`virtio_vsock`], returning the guest memory afterwards.
fn vsock_memory(data: &[u8]) -> Option<GuestMemory> {
    let place = vsock_place()?;
    let mem = memory(data)?;
    let (txq, rxq) = (queue(&mem, 0)?, queue(&mem, 0x400)?);
    let listener = place.host.try_clone().ok()?;
    let served = vsock::serve_queues(
        mem.clone(),
        rxq,
        txq,
        listener,
        place.uds.clone(),
        GUEST_CID,
        4,
    );
    // Connections this input made are closed with its backend; take them off the listener
    // so the next input starts from the same state.
    while place.peer.accept().is_ok() {}
    served.ok().map(|()| mem)
}

/// A tap that takes every frame and counts it.
struct CountingTap {
    null: File,
    frames: std::sync::atomic::AtomicUsize,
}

impl TapBackend for CountingTap {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.null)
    }

    fn read(&self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }

    fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.frames
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(frame.len())
    }

    fn set_offload(&self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// virtio-net TX chain parsing: the frames the guest posted on the TX queue (descriptor table
/// at 0 and available ring from `data`), sent to a tap that counts them.
pub fn virtio_net_tx(data: &[u8]) {
    let _ = net_tx_memory(data);
}

/// [`virtio_net_tx`], returning the guest memory and the frames sent.
fn net_tx_memory(data: &[u8]) -> Option<(GuestMemory, usize)> {
    let mem = memory(data)?;
    let mut q = queue(&mem, 0)?;
    let tap = CountingTap {
        null: File::open("/dev/null").ok()?,
        frames: std::sync::atomic::AtomicUsize::new(0),
    };
    net::serve_tx(&mem, &mut q, &tap);
    Some((mem, tap.frames.into_inner()))
}

/// MMIO register accesses to a virtio-blk (or, with `data[0]` odd, virtio-vsock) transport:
/// the rest of `data` is a sequence of 7-byte operations `[op, offset (u16 LE), value (u32
/// LE)]`: op % 4 == 0 writes `value` to register `offset`, 1 reads it, 2 writes `value`'s
/// low `op / 4 % 8 + 1` bytes (any width, any alignment, config space included), 3 stores
/// `value` in guest memory at `offset * 4` (descriptors and rings for a queue notify).
pub fn mmio(data: &[u8]) {
    let Some((&which, ops)) = data.split_first() else {
        return;
    };
    let Some(mem) = memory(&[]) else { return };
    let device: Box<dyn VirtioDevice> = if which & 1 == 0 {
        let Some(file) = disk() else { return };
        let path = PathBuf::from(format!("/proc/self/fd/{}", raw(&file)));
        match Block::new(&path, which & 2 != 0, Seccomp::Off) {
            Ok(dev) => Box::new(dev),
            Err(_) => return,
        }
    } else {
        let dir = std::env::temp_dir().join(format!("yard-vmm-fuzz-mmio-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        match Vsock::new(GUEST_CID, dir.join("v.sock"), Seccomp::Off) {
            Ok(dev) => Box::new(dev),
            Err(_) => return,
        }
    };
    let Ok(mut t) = MmioTransport::new(mem.clone(), device, CountingInterrupt::new()) else {
        return;
    };
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1000;
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 4 {
            0 => t.write(0, offset, &value.to_le_bytes()),
            1 => t.read(0, offset, &mut [0u8; 4]),
            2 => {
                let width = usize::from(op[0] / 4 % 8 + 1);
                let bytes = u64::from(value).to_le_bytes();
                t.write(0, offset, &bytes[..width]);
            }
            _ => {
                let _ = mem.write_obj(value, GuestAddress(offset * 4));
            }
        }
    }
    // Dropping the transport resets an active device (its worker stops).
}

fn raw(file: &File) -> std::os::fd::RawFd {
    std::os::fd::AsRawFd::as_raw_fd(file)
}

#[cfg(test)]
mod tests {
    //! The harnesses over the committed seeds (fuzz/corpus), as the fuzzer starts; a crash a
    //! fuzzer finds is added here as a regression test.

    use super::*;

    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        inputs("corpus", target)
    }

    /// The files in `fuzz/<kind>/<target>`.
    fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../fuzz")
            .join(kind)
            .join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no inputs in {}", dir.display());
        seeds
    }

    /// Issue 16, found by the fuzz targets in their first minute: a guest that set a queue's
    /// available index more than a queue ahead made the virtio-blk and vsock loops spin forever
    /// (pops found nothing, `enable_notification` kept saying there was more), and a reset then
    /// waited forever for the spinning worker. Every input in `fuzz/regressions` must finish.
    #[test]
    fn issue16_fuzz_regressions_finish() {
        type Harness = fn(&[u8]);
        let targets: [(&str, Harness); 3] = [
            ("vmm_virtio_blk", virtio_blk),
            ("vmm_virtio_vsock", virtio_vsock),
            ("vmm_mmio", mmio),
        ];
        for (target, run) in targets {
            for (name, data) in inputs("regressions", target) {
                let (done, finished) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    run(&data);
                    let _ = done.send(());
                });
                assert!(
                    finished
                        .recv_timeout(std::time::Duration::from_secs(20))
                        .is_ok(),
                    "{target}/{name} did not finish"
                );
            }
        }
    }

    fn used_idx(mem: &GuestMemory, queue_base: u64) -> u16 {
        mem.read_obj(GuestAddress(queue_base + 0x202)).unwrap()
    }

    #[test]
    fn blk_seeds_complete_their_requests() {
        for (name, data) in seeds("vmm_virtio_blk") {
            let mem = blk_memory(&data).unwrap_or_else(|| panic!("{name}: not served"));
            assert_eq!(used_idx(&mem, 0), 1, "{name}: one request completed");
            let status: u8 = mem.read_obj(GuestAddress(0x1500)).unwrap();
            assert_eq!(status, block::VIRTIO_BLK_S_OK, "{name}");
        }
    }

    #[test]
    fn vsock_seeds_are_answered() {
        for (name, data) in seeds("vmm_virtio_vsock") {
            let mem = vsock_memory(&data).unwrap_or_else(|| panic!("{name}: not served"));
            assert_ne!(used_idx(&mem, 0), 0, "{name}: tx packets consumed");
            // A connection the guest reset is owed nothing; any other gets a reply.
            let replies = used_idx(&mem, 0x400);
            if name.ends_with("-reset") {
                assert_eq!(replies, 0, "{name}: nothing owed after the guest's reset");
            } else {
                assert_ne!(replies, 0, "{name}: a reply in an rx buffer");
            }
        }
    }

    #[test]
    fn net_tx_seeds_send_their_frames_and_return_every_chain() {
        for (name, data) in seeds("vmm_virtio_net_tx") {
            let (mem, frames) =
                net_tx_memory(&data).unwrap_or_else(|| panic!("{name}: not served"));
            let avail: u16 = mem.read_obj(GuestAddress(0x102)).unwrap();
            assert_eq!(used_idx(&mem, 0), avail, "{name}: every chain returned");
            // Seeds named `drop-*` hold only chains the device must refuse.
            let want = if name.starts_with("drop-") {
                0
            } else {
                usize::from(avail)
            };
            assert_eq!(frames, want, "{name}");
        }
    }

    #[test]
    fn mmio_seeds_run() {
        for (_, data) in seeds("vmm_mmio") {
            mmio(&data);
        }
        mmio(&[]);
        mmio(&[1, 2, 3]);
    }
}
