//! Interrupt lines as devices see them: something to trigger. The VMM backs each with an
//! eventfd registered as a KVM irqfd on the line's GSI; tests count triggers.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line into the guest.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// A line backed by an eventfd (registered with `KVM_IRQFD` by the VMM).
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    pub fn new() -> io::Result<Self> {
        Ok(EventFdInterrupt {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as the irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

/// Counts triggers: for device tests, and for lines nobody listens to.
#[derive(Default)]
pub struct CountingInterrupt {
    count: AtomicU64,
}

impl CountingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(CountingInterrupt::default())
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
