//! virtio devices behind the virtio-mmio transport ([`mmio`]). A device model implements
//! [`VirtioDevice`]; on activation it gets the guest memory, its queues, their notification
//! eventfds and the interrupt status, and runs its I/O on a worker thread ([`worker`]) until
//! reset or drop.

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;
use crate::guest_warn;
use crate::irq::Interrupt;

/// Chains a device loop serves per wakeup before it looks at its stop eventfd again: a guest
/// that keeps a queue full never holds a reset (which waits for the worker) for longer.
pub(crate) const CHAINS_PER_WAKE: usize = 1024;

/// Re-enables `queue`'s notifications and says whether the guest added more buffers
/// meanwhile, so a device loop goes round again. `popped` says whether the round just ended
/// took a chain; `rechecked` is the loop's own flag, false when it starts.
///
/// The guest can break the ring in two ways that make "more" true forever with nothing to pop
/// (device loops spun on both: found by the fuzz targets, `fuzz/regressions`): an available
/// index more than a queue's size ahead of the device, and an entry of the ring or a head
/// descriptor in memory that cannot be read. The first is seen at once; the second when a
/// round that popped nothing is followed by a recheck that pops nothing either (one recheck,
/// as the guest may have published a buffer just after the round's last pop). Either way the
/// queue is left until the driver resets the device.
pub(crate) fn more_after_enable(
    queue: &mut Queue,
    mem: &GuestMemory,
    device: &str,
    popped: bool,
    rechecked: &mut bool,
) -> bool {
    match queue.enable_notification(mem) {
        Ok(true) => {
            let ahead = queue
                .avail_idx(mem, Ordering::Acquire)
                .map(|idx| idx.0.wrapping_sub(queue.next_avail()));
            match ahead {
                Ok(n) if n > queue.size() => {
                    guest_warn!(
                        "{device}: available index {n} ahead of a queue of {}: ring ignored",
                        queue.size()
                    );
                    false
                }
                Ok(_) if popped || !*rechecked => {
                    *rechecked = !popped;
                    true
                }
                Ok(_) => {
                    guest_warn!(
                        "{device}: available entry {} cannot be popped: ring ignored",
                        queue.next_avail()
                    );
                    false
                }
                Err(e) => {
                    guest_warn!("{device}: queue: {e}");
                    false
                }
            }
        }
        Ok(false) => false,
        Err(e) => {
            guest_warn!("{device}: queue: {e}");
            false
        }
    }
}

/// Device ids (virtio 1.2, 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits common to all devices.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device model on the virtio-mmio transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size (a power of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered; the transport adds [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// The features the driver accepted, before activation.
    fn ack_features(&mut self, _features: u64) {}
    /// Read device config space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device config space; most devices ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device: queues are validated and ready.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: Arc<InterruptStatus>,
    ) -> Result<(), ActivateError>;
    /// Stop the device (worker joined, backend state dropped) and return to the state before
    /// activation.
    fn reset(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("starting the device worker")]
    Worker(#[source] worker::WorkerError),
    #[error("cloning the queue eventfds")]
    QueueEvents(#[source] std::io::Error),
    #[error("queue state")]
    Queue(#[source] virtio_queue::Error),
    #[error("device is already active")]
    AlreadyActive,
}

/// The InterruptStatus register shared by the transport (guest reads and acknowledges it) and
/// the device worker (which sets bits and raises the line).
pub struct InterruptStatus {
    status: AtomicU32,
    irq: Arc<dyn Interrupt>,
}

impl InterruptStatus {
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        InterruptStatus {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Set `bits` (a combination of [`INT_USED_RING`], [`INT_CONFIG`]) and raise the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irq.trigger() {
            crate::guest_warn!("virtio: raising interrupt: {e}");
        }
    }

    pub fn signal_used(&self) {
        self.signal(INT_USED_RING);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Config space reads: any width, bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(rest) = config.get(start..) else {
        return;
    };
    let n = data.len().min(rest.len());
    data[..n].copy_from_slice(&rest[..n]);
}
