//! virtio-net on a tap: one RX and one TX queue, no control queue. Every frame either way is a
//! 12-byte `virtio_net_hdr_v1` followed by the Ethernet frame, exactly what a tap opened with
//! `IFF_VNET_HDR` and `TUNSETVNETHDRSZ` = 12 reads and writes, so headers pass through
//! untouched except `num_buffers`, which only the device can know.
//!
//! Offered: `VERSION_1`, `MAC`, `MTU`, `STATUS` (link always up), checksum and TSO offload both
//! ways (`CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`, `GUEST_TSO4/6`) and `MRG_RXBUF`. After
//! DRIVER_OK the worker tells the tap which offloaded frames the guest takes (`TUNSETOFFLOAD`
//! with `TUN_F_CSUM`/`TSO4`/`TSO6` for the accepted `GUEST_*` bits), so the host never hands the
//! guest a frame it cannot parse.
//!
//! RX with `MRG_RXBUF` spreads a frame over as many chains as it needs and says how many in
//! `num_buffers`; without it (a driver that declines it) a frame must fit one chain, as Linux's
//! "big packets" mode posts them (65562 bytes with guest TSO), and one that does not is dropped.
//! A frame is read off the tap only when the guest may take it: at most one frame is held on
//! the host ([`FRAME_BUF_LEN`] bytes), and while the guest has no room for it the tap is not
//! read at all until the guest posts buffers (its RX notification). The tap's own queue, then
//! the kernel's drops, are the backpressure, as on a real NIC whose ring is full.
//!
//! TX copies each chain (at most [`FRAME_BUF_LEN`] bytes in at most [`MAX_TX_DESCRIPTORS`]
//! descriptors) into a host buffer and writes it to the tap in one call: the kernel then reads
//! a header the guest can no longer change, and no guest address is handed to a system call.
//! A chain that breaks a bound is dropped (a rate-limited warning) and returned to the guest.
//! The header's fields are checked by the tap (`virtio_net_hdr_to_skb`), not here.
//!
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice).
//! - [`event_handler`]: the worker's loop, TX and RX.
//! - [`sys`]: `O_NONBLOCK` and `TUNSETOFFLOAD` on the tap.

mod device;
mod event_handler;
pub(crate) mod sys;
#[cfg(test)]
mod testing;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::virtio_net as vn;

use super::worker::{Worker, WorkerError};
use crate::seccomp::{Seccomp, ThreadKind};

pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1` (with `num_buffers`), before every frame either way.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame after the header: a 64 KiB TSO frame with its Ethernet and VLAN headers
/// (virtio 1.2, 5.1.6.3.1: the 65562-byte buffers of a driver without `MRG_RXBUF`).
pub const MAX_FRAME_LEN: usize = 65562;
/// Header and frame: the host buffer each way, and the largest TX chain taken.
pub const FRAME_BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Descriptors a TX chain may have (Linux sends at most `MAX_SKB_FRAGS` + 2).
pub const MAX_TX_DESCRIPTORS: usize = 256;
/// The smallest frame sent: the header and an Ethernet header.
pub const MIN_TX_LEN: usize = VNET_HDR_LEN + 14;
/// The MTU range the config space may say (virtio 1.2, 5.1.4.1: at least 68).
pub const MIN_MTU: u32 = 68;

const fn bit(b: u32) -> u64 {
    1 << b
}

pub const VIRTIO_NET_F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
pub const VIRTIO_NET_F_MTU: u64 = bit(vn::VIRTIO_NET_F_MTU);
pub const VIRTIO_NET_F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
pub const VIRTIO_NET_F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
pub const VIRTIO_NET_F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
pub const VIRTIO_NET_F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
pub const VIRTIO_NET_F_CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// What the device offers (the transport adds `VERSION_1`).
pub const OFFERED_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS;

/// The tap offloads (`TUN_F_*`) matching the driver's accepted features: what the guest can
/// take. TSO without checksum offload is refused by the tap (and by the spec), so it needs
/// `GUEST_CSUM` too.
pub fn tap_offloads(acked: u64) -> u32 {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("MTU {0} is outside {MIN_MTU}..=65535")]
    Mtu(u32),
    #[error("making the tap non-blocking")]
    NonBlocking(#[source] io::Error),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// The host side of the device: a descriptor that reads and writes whole frames (each with its
/// 12-byte header), and the tap's offload switch. A tap in the VMM; a `SOCK_SEQPACKET`
/// socket with a recording switch in tests.
pub trait TapBackend: Send + Sync {
    /// For the worker's epoll; made non-blocking by [`Net::with_backend`].
    fn fd(&self) -> BorrowedFd<'_>;
    /// One whole frame.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// One whole frame.
    fn write(&self, frame: &[u8]) -> io::Result<usize>;
    /// `TUNSETOFFLOAD`: the `TUN_F_*` flags of the frames the guest accepts. Called on the
    /// worker thread.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// A tap device opened on `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a
/// 12-byte vnet header.
pub struct Tap(File);

impl Tap {
    pub fn new(fd: OwnedFd) -> Tap {
        Tap(File::from(fd))
    }
}

impl TapBackend for Tap {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }

    fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.0).write(frame)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        sys::set_offload(self.0.as_fd(), flags)
    }
}

pub struct Net {
    tap: Arc<dyn TapBackend>,
    /// mac[6], status, max_virtqueue_pairs, mtu (virtio 1.2, 5.1.4).
    config: [u8; 12],
    acked: u64,
    queue_sizes: [u16; 2],
    /// Made with the device, so activation (on a vCPU thread) needs no new thread.
    worker: Worker,
    active: bool,
}

impl Net {
    /// A device on the tap `fd`; its worker thread runs under the net worker's filter per
    /// `seccomp`.
    pub fn new(fd: OwnedFd, mac: [u8; 6], mtu: u32, seccomp: Seccomp) -> Result<Net, NetError> {
        Net::with_backend(Arc::new(Tap::new(fd)), mac, mtu, seccomp)
    }

    pub fn with_backend(
        tap: Arc<dyn TapBackend>,
        mac: [u8; 6],
        mtu: u32,
        seccomp: Seccomp,
    ) -> Result<Net, NetError> {
        let mtu16 = u16::try_from(mtu)
            .ok()
            .filter(|&m| u32::from(m) >= MIN_MTU)
            .ok_or(NetError::Mtu(mtu))?;
        sys::set_nonblocking(tap.fd()).map_err(NetError::NonBlocking)?;
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu16.to_le_bytes());
        Ok(Net {
            tap,
            config,
            acked: 0,
            queue_sizes: [QUEUE_SIZE; 2],
            worker: Worker::new("virtio-net", ThreadKind::NetWorker, seccomp)?,
            active: false,
        })
    }
}

/// Sends every frame the guest posted on `txq` to `tap` (as the worker does on a
/// notification), with no worker thread: for the fuzz targets. `acked` is the features the
/// driver accepted.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn serve_tx(
    mem: &crate::GuestMemory,
    txq: &mut virtio_queue::Queue,
    tap: &dyn TapBackend,
) {
    let irq = super::InterruptStatus::new(crate::irq::CountingInterrupt::new());
    let mut buf = vec![0u8; FRAME_BUF_LEN];
    let mut budget = super::CHAINS_PER_WAKE;
    let _ = event_handler::process_tx(mem, txq, tap, &irq, &mut buf, &mut budget);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_accepted_guest_bits() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(
            tap_offloads(VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
        // Host-side offloads (what the guest sends) are no concern of the tap's RX switch.
        assert_eq!(tap_offloads(OFFERED_FEATURES & !VIRTIO_NET_F_GUEST_CSUM), 0);
        assert_eq!(
            tap_offloads(OFFERED_FEATURES),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn mtus_outside_the_range_are_refused() {
        let (a, _b) = sys::test_support::seqpacket_pair();
        for mtu in [0, 67, 65536, u32::MAX] {
            let tap = Arc::new(Tap::new(a.try_clone().unwrap()));
            assert!(matches!(
                Net::with_backend(tap, [0; 6], mtu, Seccomp::Off),
                Err(NetError::Mtu(m)) if m == mtu
            ));
        }
        Net::with_backend(Arc::new(Tap::new(a)), [0; 6], 68, Seccomp::Off).unwrap();
    }
}
