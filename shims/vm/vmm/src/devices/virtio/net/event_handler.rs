//! The net worker: sets the tap's offloads, then waits on the TX and RX notifications and the
//! tap (edge-triggered) and moves frames until stopped.
//!
//! The RX queue's notifications are never suppressed: the guest kicks whenever it posts
//! buffers, which is what wakes a frame waiting for room. The tap is read only while the guest
//! has room for what was read before, so nothing spins and at most one frame waits here.

use std::io::{self, Read, Write as _};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::worker::{Poller, STOP_TOKEN};
use super::super::{CHAINS_PER_WAKE, InterruptStatus, more_after_enable};
use super::{
    FRAME_BUF_LEN, MAX_TX_DESCRIPTORS, MIN_TX_LEN, TapBackend, VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR_LEN, tap_offloads,
};
use crate::GuestMemory;
use crate::guest_warn;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;

/// Why a TX chain was dropped.
#[derive(Debug, thiserror::Error)]
pub(super) enum TxDrop {
    #[error("more than {MAX_TX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("{0} bytes, more than a header and a {max}-byte frame", max = super::MAX_FRAME_LEN)]
    TooLong(usize),
    #[error("{0} bytes, less than a header and an Ethernet header")]
    TooShort(usize),
    #[error("outside guest memory")]
    Memory,
}

/// What became of the frame waiting for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    Delivered,
    /// Bigger than all the room the guest can give it: gone, the buffers stay the guest's.
    Dropped,
    /// Not enough buffers now: it waits for the guest's next RX notification.
    NoRoom,
    /// The used ring cannot be written: left until the driver resets the device.
    Broken,
}

pub(super) struct Backend {
    pub(super) mem: GuestMemory,
    pub(super) rxq: Queue,
    pub(super) txq: Queue,
    pub(super) tap: Arc<dyn TapBackend>,
    pub(super) irq: Arc<InterruptStatus>,
    /// The features the driver accepted.
    pub(super) acked: u64,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    /// The length of the frame in `rx_buf` waiting for room in the guest.
    pending: Option<usize>,
    /// The tap may have frames: set by its (edge-triggered) readiness, cleared on EAGAIN.
    tap_readable: bool,
}

impl Backend {
    pub(super) fn new(
        mem: GuestMemory,
        rxq: Queue,
        txq: Queue,
        tap: Arc<dyn TapBackend>,
        irq: Arc<InterruptStatus>,
        acked: u64,
    ) -> Self {
        Backend {
            mem,
            rxq,
            txq,
            tap,
            irq,
            acked,
            tx_buf: vec![0; FRAME_BUF_LEN],
            rx_buf: vec![0; FRAME_BUF_LEN],
            pending: None,
            tap_readable: true,
        }
    }

    pub(super) fn run(
        mut self,
        rx_evt: EventFd,
        tx_evt: EventFd,
        stop: &EventFd,
    ) -> io::Result<()> {
        // Here, on the worker, whose filter allows this ioctl; the vCPU thread that activated
        // the device may make none.
        let offloads = tap_offloads(self.acked);
        if let Err(e) = self.tap.set_offload(offloads) {
            // The tap keeps what it had: none on a fresh tap, so the guest is handed only plain
            // frames and works, slower.
            tracing::error!(offloads, "virtio-net: setting the tap's offloads: {e}");
        }
        let mut poller = Poller::new()?;
        poller.add(stop, STOP_TOKEN, EventSet::IN)?;
        poller.add(&rx_evt, RX_TOKEN, EventSet::IN)?;
        poller.add(&tx_evt, TX_TOKEN, EventSet::IN)?;
        poller.add(
            &self.tap.fd(),
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        loop {
            for (token, _) in poller.wait(-1)? {
                match token {
                    STOP_TOKEN => return Ok(()),
                    RX_TOKEN => {
                        let _ = rx_evt.read();
                    }
                    TX_TOKEN => {
                        let _ = tx_evt.read();
                    }
                    TAP_TOKEN => self.tap_readable = true,
                    _ => {}
                }
            }
            // A wakeup serves at most CHAINS_PER_WAKE chains each way before `stop` is looked
            // at again; what is left comes back through the queue's own eventfd.
            let mut budget = CHAINS_PER_WAKE;
            if process_tx(
                &self.mem,
                &mut self.txq,
                &*self.tap,
                &self.irq,
                &mut self.tx_buf,
                &mut budget,
            ) {
                tx_evt.write(1)?;
            }
            let mut budget = CHAINS_PER_WAKE;
            if self.process_rx(&mut budget) {
                rx_evt.write(1)?;
            }
        }
    }

    /// Moves frames from the tap into the guest's buffers while both have some; `true` if it
    /// stopped on the budget with more to do.
    fn process_rx(&mut self, budget: &mut usize) -> bool {
        let mut delivered = false;
        let yielded = loop {
            if *budget == 0 {
                break true;
            }
            let Some(len) = self.pending else {
                if !self.tap_readable {
                    break false;
                }
                self.read_frame();
                continue;
            };
            *budget -= 1;
            match self.deliver(len) {
                Rx::Delivered => {
                    self.pending = None;
                    delivered = true;
                }
                Rx::Dropped => self.pending = None,
                Rx::NoRoom | Rx::Broken => break false,
            }
        };
        if delivered && self.rxq.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.signal_used();
        }
        yielded
    }

    /// Reads one frame off the tap into `rx_buf` (`pending`), or learns it has none.
    fn read_frame(&mut self) {
        match self.tap.read(&mut self.rx_buf) {
            Ok(n) if n >= VNET_HDR_LEN => self.pending = Some(n),
            Ok(0) => {
                tracing::error!("virtio-net: the tap was closed");
                self.tap_readable = false;
            }
            Ok(n) => tracing::warn!(len = n, "virtio-net: a tap frame without its header"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tap_readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                guest_warn!("virtio-net: reading the tap: {e}");
                self.tap_readable = false;
            }
        }
    }

    /// Puts the `len`-byte frame in `rx_buf` into the guest's RX buffers: one chain, or as
    /// many as it needs with `MRG_RXBUF`, their count in the header's `num_buffers`.
    fn deliver(&mut self, len: usize) -> Rx {
        if !self.rxq.ready() {
            return Rx::NoRoom;
        }
        let mem = self.mem.clone();
        let mergeable = self.acked & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mut start = self.rxq.next_avail();
        // (head, writer; None for a chain outside guest memory, which takes no bytes)
        let mut chains = Vec::new();
        let mut room = 0usize;
        while room < len {
            if !mergeable && !chains.is_empty() {
                guest_warn!(
                    len,
                    room,
                    "virtio-net: frame larger than an RX buffer dropped"
                );
                self.rxq.set_next_avail(start);
                return Rx::Dropped;
            }
            let Some(chain) = self.rxq.pop_descriptor_chain(&mem) else {
                self.rxq.set_next_avail(start);
                if chains.len() >= usize::from(self.rxq.size()) {
                    // The guest's whole ring cannot hold it, and the guest cannot add more.
                    guest_warn!(
                        len,
                        room,
                        "virtio-net: frame larger than the RX ring dropped"
                    );
                    return Rx::Dropped;
                }
                return Rx::NoRoom;
            };
            let head = chain.head_index();
            match chain.writer(&mem) {
                Ok(w) => {
                    room = room.saturating_add(w.available_bytes());
                    chains.push((head, Some(w)));
                }
                Err(e) if chains.is_empty() => {
                    // Before the frame starts: hand it back empty and go on.
                    guest_warn!("virtio-net: RX chain: {e}");
                    if let Err(e) = self.rxq.add_used(&mem, head, 0) {
                        guest_warn!("virtio-net: RX used ring: {e}");
                        return Rx::Broken;
                    }
                    start = self.rxq.next_avail();
                }
                Err(e) => {
                    guest_warn!("virtio-net: RX chain: {e}");
                    chains.push((head, None));
                }
            }
        }
        // At most a queue's worth of chains, so this fits.
        let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        self.rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for (head, writer) in chains {
            let mut written = 0;
            if let Some(mut w) = writer {
                let n = w.available_bytes().min(len - offset);
                if let Err(e) = w.write_all(&self.rx_buf[offset..offset + n]) {
                    guest_warn!("virtio-net: RX buffer: {e}");
                }
                written = w.bytes_written();
            }
            offset += written;
            let used = u32::try_from(written).unwrap_or(u32::MAX);
            if let Err(e) = self.rxq.add_used(&mem, head, used) {
                guest_warn!("virtio-net: RX used ring: {e}");
                return Rx::Broken;
            }
        }
        Rx::Delivered
    }
}

/// Sends the guest's frames to the tap, at most `budget` chains (counted down); `true` if it
/// stopped on the budget with more waiting.
pub(super) fn process_tx(
    mem: &GuestMemory,
    txq: &mut Queue,
    tap: &dyn TapBackend,
    irq: &InterruptStatus,
    buf: &mut [u8],
    budget: &mut usize,
) -> bool {
    if !txq.ready() {
        return false;
    }
    let mut used = false;
    let mut rechecked = false;
    let yielded = 'outer: loop {
        if let Err(e) = txq.disable_notification(mem) {
            guest_warn!("virtio-net: TX queue: {e}");
            break false;
        }
        let mut popped = false;
        while *budget > 0 {
            let Some(chain) = txq.pop_descriptor_chain(mem) else {
                break;
            };
            *budget -= 1;
            popped = true;
            let head = chain.head_index();
            match gather(mem, chain, buf) {
                Ok(len) => send(tap, &buf[..len]),
                Err(why) => guest_warn!("virtio-net: TX chain dropped: {why}"),
            }
            // A dropped chain is returned too: the guest's buffer is never lost.
            if let Err(e) = txq.add_used(mem, head, 0) {
                guest_warn!("virtio-net: TX used ring: {e}");
                break 'outer false;
            }
            used = true;
        }
        if *budget == 0 {
            break true;
        }
        if !more_after_enable(txq, mem, "virtio-net tx", popped, &mut rechecked) {
            break false;
        }
    };
    if used && txq.needs_notification(mem).unwrap_or(true) {
        irq.signal_used();
    }
    yielded
}

/// Copies a TX chain (header and frame) into `buf`, bounded before anything is read; its
/// length.
pub(super) fn gather(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Result<usize, TxDrop> {
    if chain.clone().take(MAX_TX_DESCRIPTORS + 1).count() > MAX_TX_DESCRIPTORS {
        return Err(TxDrop::TooManyDescriptors);
    }
    let mut reader = chain.reader(mem).map_err(|_| TxDrop::Memory)?;
    let len = reader.available_bytes();
    if len > FRAME_BUF_LEN.min(buf.len()) {
        return Err(TxDrop::TooLong(len));
    }
    if len < MIN_TX_LEN {
        return Err(TxDrop::TooShort(len));
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(|_| TxDrop::Memory)?;
    Ok(len)
}

fn send(tap: &dyn TapBackend, frame: &[u8]) {
    match tap.write(frame) {
        Ok(n) if n == frame.len() => {}
        Ok(n) => guest_warn!(n, len = frame.len(), "virtio-net: short write to the tap"),
        // The tap's queue is full: dropped, as a NIC whose ring is full drops.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            guest_warn!("virtio-net: tap busy, frame dropped");
        }
        // The tap refuses a header it cannot parse (EINVAL): the guest's doing.
        Err(e) => guest_warn!("virtio-net: writing to the tap: {e}"),
    }
}
