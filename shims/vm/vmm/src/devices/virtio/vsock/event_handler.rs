//! The vsock worker: its state ([`Backend`]) and the epoll loop that drives it. Queue
//! processing is in [`super::device`], the Unix side in [`super::unix`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::worker::{Poller, STOP_TOKEN};
use super::super::{CHAINS_PER_WAKE, InterruptStatus};
use super::connection::{Conn, ConnKey, Flushed, State};
use super::device::TxEnd;
use super::unix::PendingClient;
use super::{OP_CREDIT_UPDATE, OP_RST};
use crate::GuestMemory;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EV_TOKEN: u64 = 2;
const LISTENER_TOKEN: u64 = 3;
pub(super) const FIRST_STREAM_TOKEN: u64 = 16;

/// Headers we owe the guest, without payload, at most one per (connection, op). The guest
/// makes us queue them (an OP_RST for every packet to an unknown connection) faster than it
/// may take them, so the tx queue is not read while this is [`MAX_PENDING_CTRL`] long.
#[derive(Default)]
pub(super) struct CtrlQueue {
    queue: VecDeque<(ConnKey, u16)>,
    queued: HashSet<(ConnKey, u16)>,
}

/// Replies queued for the guest beyond which we stop reading its tx queue.
pub(super) const MAX_PENDING_CTRL: usize = 256;

impl CtrlQueue {
    pub(super) fn push(&mut self, key: ConnKey, op: u16) {
        if self.queued.insert((key, op)) {
            self.queue.push_back((key, op));
        }
    }

    pub(super) fn pop(&mut self) -> Option<(ConnKey, u16)> {
        let c = self.queue.pop_front()?;
        self.queued.remove(&c);
        Some(c)
    }

    /// Forget what we owed a connection that is gone.
    pub(super) fn remove_key(&mut self, key: ConnKey) {
        if self.queue.iter().any(|c| c.0 == key) {
            self.queue.retain(|c| c.0 != key);
            self.queued.retain(|c| c.0 != key);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn is_full(&self) -> bool {
        self.queue.len() >= MAX_PENDING_CTRL
    }
}

pub(super) struct Backend {
    pub(super) mem: GuestMemory,
    pub(super) rxq: Queue,
    pub(super) txq: Queue,
    pub(super) irq: Arc<InterruptStatus>,
    pub(super) listener: UnixListener,
    pub(super) uds_path: PathBuf,
    pub(super) guest_cid: u64,
    pub(super) conns: HashMap<ConnKey, Conn>,
    pub(super) pending: HashMap<u64, PendingClient>,
    pub(super) token_conn: HashMap<u64, ConnKey>,
    pub(super) next_token: u64,
    pub(super) next_local_port: u32,
    pub(super) ctrl: CtrlQueue,
    /// Round-robin start among connections with data for the guest.
    pub(super) rr: usize,
}

/// Socket readiness we follow (edge-triggered: one stalled peer never costs a wakeup).
pub(super) fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Backend {
    pub(super) fn new(
        mem: GuestMemory,
        rxq: Queue,
        txq: Queue,
        irq: Arc<InterruptStatus>,
        listener: UnixListener,
        uds_path: PathBuf,
        guest_cid: u64,
    ) -> Self {
        Backend {
            mem,
            rxq,
            txq,
            irq,
            listener,
            uds_path,
            guest_cid,
            conns: HashMap::new(),
            pending: HashMap::new(),
            token_conn: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: super::unix::LOCAL_PORT_BASE,
            ctrl: CtrlQueue::default(),
            rr: 0,
        }
    }

    pub(super) fn run(
        mut self,
        rx_evt: EventFd,
        tx_evt: EventFd,
        ev_evt: EventFd,
        stop: &EventFd,
    ) -> io::Result<()> {
        let mut poller = Poller::new()?;
        poller.add(stop, STOP_TOKEN, EventSet::IN)?;
        poller.add(&rx_evt, RX_TOKEN, EventSet::IN)?;
        poller.add(&tx_evt, TX_TOKEN, EventSet::IN)?;
        poller.add(&ev_evt, EV_TOKEN, EventSet::IN)?;
        poller.add(&self.listener, LISTENER_TOKEN, EventSet::IN)?;
        loop {
            let timeout = self.next_deadline().map_or(-1, |d| {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                i32::try_from(ms.saturating_add(1)).unwrap_or(i32::MAX)
            });
            for (token, events) in poller.wait(timeout)? {
                match token {
                    STOP_TOKEN => return Ok(()),
                    RX_TOKEN => {
                        let _ = rx_evt.read();
                    }
                    TX_TOKEN => {
                        let _ = tx_evt.read();
                    }
                    EV_TOKEN => {
                        let _ = ev_evt.read();
                    }
                    LISTENER_TOKEN => self.accept(&poller),
                    t if self.pending.contains_key(&t) => self.read_connect_line(&poller, t),
                    t => self.stream_event(&poller, t, events),
                }
            }
            self.expire(&poller);
            // A wakeup serves at most CHAINS_PER_WAKE chains before `stop` is looked at again.
            let mut budget = CHAINS_PER_WAKE;
            loop {
                // Guest packets first: they may add credit and control replies.
                let tx = self.process_tx(&poller, &mut budget);
                if self.fill_rx(&poller, &mut budget) {
                    rx_evt.write(1)?;
                }
                match tx {
                    TxEnd::Drained => break,
                    TxEnd::Yielded => {
                        tx_evt.write(1)?;
                        break;
                    }
                    // The tx queue was left unread for want of room for our replies: read on
                    // if the guest took some, else wait for it to post rx buffers.
                    TxEnd::Throttled if self.ctrl.is_full() => break,
                    TxEnd::Throttled if budget == 0 => {
                        tx_evt.write(1)?;
                        break;
                    }
                    TxEnd::Throttled => {}
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|p| p.deadline);
        let conns = self.conns.values().filter_map(|c| match c.state {
            State::Requested { deadline } | State::Closing { deadline } => Some(deadline),
            State::Established => None,
        });
        pending.chain(conns).min()
    }

    fn expire(&mut self, poller: &Poller) {
        let now = Instant::now();
        self.pending.retain(|_, p| {
            let keep = p.deadline > now;
            if !keep {
                let _ = poller.remove(&p.stream);
            }
            keep
        });
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.state {
                State::Requested { deadline } | State::Closing { deadline } => deadline <= now,
                State::Established => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset_conn(poller, key);
        }
    }

    pub(super) fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_STREAM_TOKEN);
        t
    }

    /// Watch a socket with a fresh token.
    pub(super) fn watch(&mut self, poller: &Poller, stream: &UnixStream) -> io::Result<u64> {
        let token = self.token();
        poller.add(stream, token, stream_events())?;
        Ok(token)
    }

    fn stream_event(&mut self, poller: &Poller, token: u64, events: EventSet) {
        let Some(&key) = self.token_conn.get(&token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush(poller, key);
        }
    }

    /// Pass what the guest sent on to the socket, and settle what follows from it.
    pub(super) fn flush(&mut self, poller: &Poller, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.flush() {
            Flushed::Open => {
                if conn.credit_update_due() {
                    self.ctrl.push(key, OP_CREDIT_UPDATE);
                }
            }
            Flushed::Done | Flushed::Failed => self.reset_conn(poller, key),
        }
    }

    /// Send the guest OP_RST for `key` and drop the connection (closing its socket).
    pub(super) fn reset_conn(&mut self, poller: &Poller, key: ConnKey) {
        self.drop_conn(poller, key);
        self.ctrl.push(key, OP_RST);
    }

    pub(super) fn drop_conn(&mut self, poller: &Poller, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = poller.remove(&conn.stream);
            self.token_conn.remove(&conn.token);
        }
        self.ctrl.remove_key(key);
    }

    pub(super) fn connection_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_queue_holds_one_reply_per_connection_and_op() {
        let mut q = CtrlQueue::default();
        for _ in 0..1000 {
            q.push((1, 2), OP_CREDIT_UPDATE);
        }
        q.push((1, 2), OP_RST);
        q.push((3, 4), OP_RST);
        assert_eq!(q.len(), 3);
        q.remove_key((1, 2));
        assert_eq!(q.pop(), Some(((3, 4), OP_RST)));
        assert_eq!(q.pop(), None);
        q.push((1, 2), OP_RST);
        assert_eq!(q.len(), 1, "can be queued again once sent");
    }
}
