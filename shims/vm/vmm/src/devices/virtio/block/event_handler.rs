//! The block worker: waits on the queue's notification eventfd and serves every request
//! the guest posted, until stopped. Each request holds the backend's lock while it is served,
//! so a swap of the backing file waits for it.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::worker::{Poller, STOP_TOKEN};
use super::super::{CHAINS_PER_WAKE, InterruptStatus, more_after_enable};
use super::{Backend, lock, request};
use crate::GuestMemory;
use crate::guest_warn;

const QUEUE_TOKEN: u64 = 0;

pub(super) fn run(
    backend: Backend,
    mem: GuestMemory,
    mut queue: Queue,
    evt: EventFd,
    irq: Arc<InterruptStatus>,
    stop: &EventFd,
) -> io::Result<()> {
    let mut poller = Poller::new()?;
    poller.add(&evt, QUEUE_TOKEN, EventSet::IN)?;
    poller.add(stop, STOP_TOKEN, EventSet::IN)?;
    loop {
        for (token, _) in poller.wait(-1)? {
            match token {
                STOP_TOKEN => return Ok(()),
                QUEUE_TOKEN => {
                    let _ = evt.read();
                    if queue.ready() && process_queue(&backend, &mem, &mut queue, &irq) {
                        // Served a wakeup's worth: come back after a look at `stop`.
                        evt.write(1)?;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Serves what the guest posted; `true` if it stopped after [`CHAINS_PER_WAKE`] chains with
/// more waiting.
pub(super) fn process_queue(
    backend: &Backend,
    mem: &GuestMemory,
    queue: &mut Queue,
    irq: &InterruptStatus,
) -> bool {
    let mut served = 0;
    let mut rechecked = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            guest_warn!("virtio-blk: queue: {e}");
            return false;
        }
        let mut popped = false;
        while served < CHAINS_PER_WAKE {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = request::handle(lock(backend).as_ref(), mem, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!("virtio-blk: used ring: {e}");
                return false;
            }
            popped = true;
            served += 1;
        }
        if popped && queue.needs_notification(mem).unwrap_or(true) {
            irq.signal_used();
        }
        if served >= CHAINS_PER_WAKE {
            return true;
        }
        if !more_after_enable(queue, mem, "virtio-blk", popped, &mut rechecked) {
            return false;
        }
    }
}
