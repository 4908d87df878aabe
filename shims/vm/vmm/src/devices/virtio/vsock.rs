//! virtio-vsock with firecracker's hybrid-vsock host side: guest streams map to Unix sockets.
//!
//! - Host-initiated: a client connects to `uds_path` and writes `CONNECT <port>\n`; we send the
//!   guest OP_REQUEST for that port from a fresh host port, and on its OP_RESPONSE answer the
//!   client `OK <host port>\n`. Then bytes flow both ways.
//! - Guest-initiated: OP_REQUEST to host port P connects to `<uds_path>_P`.
//!
//! Flow control is virtio-vsock's credit scheme: we advertise [`BUF_ALLOC`] per connection and
//! count what we forwarded to the socket (`fwd_cnt`), so bytes the guest sends that a slow
//! client has not taken yet stay bounded; we read from a socket only while the guest has credit
//! for it. Sockets are non-blocking and edge-triggered: one stalled peer never blocks another.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::block::read_config_bytes;
use super::worker::{Poller, STOP_TOKEN, Worker};
use super::{ActivateError, InterruptStatus, TYPE_VSOCK, VirtioDevice};
use crate::GuestMemory;
use crate::guest_warn;

pub const QUEUE_SIZE: u16 = 256;
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Receive buffer we advertise per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload per packet, either way.
const MAX_PKT_DATA: u32 = 64 * 1024;
/// Host ports for host-initiated connections start here (as in firecracker).
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// How long a client has to send its CONNECT line, the guest to answer a request, and the
/// guest to reset a connection we shut down.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_LINE_MAX: usize = 32;
const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("binding {path}")]
    Bind {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("guest CID {0} is reserved")]
    Cid(u64),
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    queue_sizes: [u16; 3],
    worker: Option<Worker>,
}

impl Vsock {
    /// Listen on `uds_path` for host clients (the path must not exist).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        let bind = |source| VsockError::Bind {
            path: uds_path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(&uds_path).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(Vsock {
            guest_cid,
            uds_path,
            listener,
            queue_sizes: [QUEUE_SIZE; 3],
            worker: None,
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::warn!("removing {}: {e}", self.uds_path.display());
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        guest_warn!("virtio-vsock: config space is read-only");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: Arc<InterruptStatus>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let (Ok([rxq, txq, _evq]), Ok([rx_evt, tx_evt, ev_evt])) = (
            <[Queue; 3]>::try_from(queues),
            <[EventFd; 3]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let backend = Backend {
            mem,
            rxq,
            txq,
            irq,
            listener,
            uds_path: self.uds_path.clone(),
            guest_cid: self.guest_cid,
            conns: HashMap::new(),
            pending: HashMap::new(),
            token_conn: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: LOCAL_PORT_BASE,
            ctrl: VecDeque::new(),
            rr: 0,
        };
        let worker = Worker::spawn("virtio-vsock", move |stop| {
            if let Err(e) = backend.run(rx_evt, tx_evt, ev_evt, stop) {
                tracing::error!("virtio-vsock worker: {e}");
            }
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EV_TOKEN: u64 = 2;
const LISTENER_TOKEN: u64 = 3;
const FIRST_STREAM_TOKEN: u64 = 16;

/// (host port, guest port)
type ConnKey = (u32, u32);

/// A header we owe the guest with no payload.
#[derive(Clone, Copy, Debug)]
struct Ctrl {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// A host client that has not sent its CONNECT line yet.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(PartialEq, Eq, Debug)]
enum State {
    /// We sent OP_REQUEST for a host client; waiting for the guest's answer.
    Requested {
        deadline: Instant,
    },
    Established,
    /// We sent OP_SHUTDOWN; waiting for the guest's OP_RST.
    Closing {
        deadline: Instant,
    },
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    /// Bytes the guest sent us.
    rx_cnt: u32,
    /// Bytes from the guest written to the socket, and the value the guest last saw.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Guest bytes the socket has not taken yet (bounded by [`BUF_ALLOC`] through credit).
    out: VecDeque<u8>,
    /// Edge-triggered readiness: the socket may have data (or EOF) to read.
    readable: bool,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    /// The guest shut down both ways: reset once `out` is flushed.
    rst_when_flushed: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State, buf_alloc: u32, fwd_cnt: u32) -> Self {
        Conn {
            stream,
            token,
            state,
            peer_buf_alloc: buf_alloc,
            peer_fwd_cnt: fwd_cnt,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            out: VecDeque::new(),
            readable: false,
            guest_shut_send: false,
            guest_shut_recv: false,
            rst_when_flushed: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.guest_shut_recv
            && self.peer_credit() > 0
    }
}

struct Backend {
    mem: GuestMemory,
    rxq: Queue,
    txq: Queue,
    irq: Arc<InterruptStatus>,
    listener: UnixListener,
    uds_path: PathBuf,
    guest_cid: u64,
    conns: HashMap<ConnKey, Conn>,
    pending: HashMap<u64, PendingClient>,
    token_conn: HashMap<u64, ConnKey>,
    next_token: u64,
    next_local_port: u32,
    ctrl: VecDeque<Ctrl>,
    rr: usize,
}

/// What the guest sent, copied out of guest memory.
struct GuestPkt {
    src_cid: u64,
    dst_cid: u64,
    key: ConnKey,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Backend {
    fn run(
        mut self,
        rx_evt: EventFd,
        tx_evt: EventFd,
        ev_evt: EventFd,
        stop: EventFd,
    ) -> io::Result<()> {
        let mut poller = Poller::new()?;
        poller.add(&stop, STOP_TOKEN, EventSet::IN)?;
        poller.add(&rx_evt, RX_TOKEN, EventSet::IN)?;
        poller.add(&tx_evt, TX_TOKEN, EventSet::IN)?;
        poller.add(&ev_evt, EV_TOKEN, EventSet::IN)?;
        poller.add(&self.listener, LISTENER_TOKEN, EventSet::IN)?;
        loop {
            let timeout = self.next_deadline().map_or(-1, |d| {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                i32::try_from(ms + 1).unwrap_or(i32::MAX)
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
            // Guest packets first: they may add credit and control replies.
            self.process_tx(&poller);
            self.fill_rx(&poller);
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

    fn accept(&mut self, poller: &Poller) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                        tracing::warn!("vsock: too many connections, refusing a host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: host client: {e}");
                        continue;
                    }
                    let token = self.token();
                    if let Err(e) = poller.add(&stream, token, stream_events()) {
                        tracing::warn!("vsock: watching a host client: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                    self.pending.insert(
                        token,
                        PendingClient {
                            stream,
                            line: Vec::new(),
                            deadline,
                        },
                    );
                    self.read_connect_line(poller, token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Read the client's `CONNECT <port>\n` a byte at a time, so nothing after it is consumed.
    fn read_connect_line(&mut self, poller: &Poller, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < CONNECT_LINE_MAX => p.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Some(guest_port) = port else {
            tracing::debug!("vsock: host client sent a bad CONNECT line");
            let _ = poller.remove(&p.stream);
            return;
        };
        let local = self.local_port();
        let key = (local, guest_port);
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        self.conns.insert(
            key,
            Conn::new(p.stream, token, State::Requested { deadline }, 0, 0),
        );
        self.token_conn.insert(token, key);
        self.ctrl.push_back(Ctrl {
            key,
            op: OP_REQUEST,
            flags: 0,
        });
    }

    fn local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match p.checked_add(1) {
                Some(n) => n,
                None => LOCAL_PORT_BASE,
            };
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
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

    /// Write what the guest sent to the socket, as far as it takes it.
    fn flush(&mut self, poller: &Poller, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while !conn.out.is_empty() {
            let (a, _) = conn.out.as_slices();
            match conn.stream.write(a) {
                Ok(n) => {
                    conn.out.drain(..n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset_conn(poller, key);
                    return;
                }
            }
        }
        if conn.out.is_empty() {
            if conn.rst_when_flushed {
                self.reset_conn(poller, key);
                return;
            }
            if conn.guest_shut_send {
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
        }
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 2 {
            self.ctrl.push_back(Ctrl {
                key,
                op: OP_CREDIT_UPDATE,
                flags: 0,
            });
        }
    }

    /// Send the guest OP_RST for `key` and drop the connection (closing its socket).
    fn reset_conn(&mut self, poller: &Poller, key: ConnKey) {
        self.drop_conn(poller, key);
        self.ctrl.push_back(Ctrl {
            key,
            op: OP_RST,
            flags: 0,
        });
    }

    fn drop_conn(&mut self, poller: &Poller, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = poller.remove(&conn.stream);
            self.token_conn.remove(&conn.token);
        }
        self.ctrl.retain(|c| c.key != key);
    }

    fn process_tx(&mut self, poller: &Poller) {
        let mem = self.mem.clone();
        if !self.txq.ready() {
            return;
        }
        let mut used = false;
        loop {
            let _ = self.txq.disable_notification(&mem);
            while let Some(mut chain) = self.txq.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let pkt = match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => Some(copy_packet(&pkt)),
                    Err(e) => {
                        guest_warn!("virtio-vsock: bad tx packet: {e}");
                        None
                    }
                };
                if let Err(e) = self.txq.add_used(&mem, head, 0) {
                    guest_warn!("virtio-vsock: tx used ring: {e}");
                    return;
                }
                used = true;
                if let Some(pkt) = pkt {
                    self.guest_packet(poller, pkt);
                }
            }
            match self.txq.enable_notification(&mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used && self.txq.needs_notification(&mem).unwrap_or(true) {
            self.irq.signal_used();
        }
    }

    fn guest_packet(&mut self, poller: &Poller, pkt: GuestPkt) {
        if pkt.src_cid != self.guest_cid {
            guest_warn!(
                src_cid = pkt.src_cid,
                "virtio-vsock: packet from a foreign CID dropped"
            );
            return;
        }
        let key = pkt.key;
        let refuse = pkt.op != OP_RST;
        if pkt.dst_cid != HOST_CID || pkt.type_ != TYPE_STREAM {
            if refuse {
                self.ctrl.push_back(Ctrl {
                    key,
                    op: OP_RST,
                    flags: 0,
                });
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match pkt.op {
                OP_REQUEST => self.guest_connect(poller, &pkt),
                OP_RST => {}
                _ => self.ctrl.push_back(Ctrl {
                    key,
                    op: OP_RST,
                    flags: 0,
                }),
            }
            return;
        };
        conn.peer_buf_alloc = pkt.buf_alloc;
        conn.peer_fwd_cnt = pkt.fwd_cnt;
        match (&conn.state, pkt.op) {
            (_, OP_RST) => self.drop_conn(poller, key),
            (State::Requested { .. }, OP_RESPONSE) => {
                conn.state = State::Established;
                conn.readable = true;
                let ok = format!("OK {}\n", key.0);
                // A fresh socket's buffer takes a short line; a client that cannot is gone.
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_conn(poller, key);
                }
            }
            (State::Established | State::Closing { .. }, OP_RW) => {
                // What the guest may have in flight is what it sent beyond the fwd_cnt it saw.
                let in_flight = conn.rx_cnt.wrapping_sub(conn.fwd_cnt_sent) as usize;
                conn.rx_cnt = conn.rx_cnt.wrapping_add(pkt.data.len() as u32);
                if conn.guest_shut_send || in_flight + pkt.data.len() > BUF_ALLOC as usize {
                    guest_warn!("virtio-vsock: guest sent beyond its credit or after shutdown");
                    self.reset_conn(poller, key);
                    return;
                }
                conn.out.extend(&pkt.data);
                self.flush(poller, key);
            }
            (State::Established | State::Closing { .. }, OP_CREDIT_UPDATE) => {}
            (State::Established | State::Closing { .. }, OP_CREDIT_REQUEST) => {
                self.ctrl.push_back(Ctrl {
                    key,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                });
            }
            (State::Established | State::Closing { .. }, OP_SHUTDOWN) => {
                conn.guest_shut_send |= pkt.flags & SHUTDOWN_SEND != 0;
                conn.guest_shut_recv |= pkt.flags & SHUTDOWN_RCV != 0;
                if conn.guest_shut_send && conn.guest_shut_recv {
                    // The guest is done: it expects our OP_RST once we have passed on its data.
                    conn.rst_when_flushed = true;
                }
                self.flush(poller, key);
            }
            _ => self.reset_conn(poller, key),
        }
    }

    fn guest_connect(&mut self, poller: &Poller, pkt: &GuestPkt) {
        let key = pkt.key;
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        let stream = if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            Err(io::Error::other("too many connections"))
        } else {
            UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s))
        };
        let token = self.token();
        let stream = stream.and_then(|s| poller.add(&s, token, stream_events()).map(|()| s));
        match stream {
            Ok(stream) => {
                let mut conn = Conn::new(
                    stream,
                    token,
                    State::Established,
                    pkt.buf_alloc,
                    pkt.fwd_cnt,
                );
                conn.readable = true;
                self.conns.insert(key, conn);
                self.token_conn.insert(token, key);
                self.ctrl.push_back(Ctrl {
                    key,
                    op: OP_RESPONSE,
                    flags: 0,
                });
            }
            Err(e) => {
                tracing::debug!("vsock: guest connect to {path}: {e}");
                self.ctrl.push_back(Ctrl {
                    key,
                    op: OP_RST,
                    flags: 0,
                });
            }
        }
    }

    fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || self.conns.values().any(Conn::can_send_data)
    }

    fn fill_rx(&mut self, poller: &Poller) {
        if !self.rxq.ready() {
            return;
        }
        let mem = self.mem.clone();
        let mut used = false;
        while self.has_rx_work() {
            let Some(mut chain) = self.rxq.pop_descriptor_chain(&mem) else {
                // Out of buffers: the guest notifies the rx queue when it adds some.
                if let Ok(true) = self.rxq.enable_notification(&mem) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.next_rx_packet(poller, &mut pkt) {
                    Some(len) => len,
                    None => {
                        self.rxq.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    guest_warn!("virtio-vsock: bad rx buffer: {e}");
                    0
                }
            };
            if let Err(e) = self.rxq.add_used(&mem, head, len) {
                guest_warn!("virtio-vsock: rx used ring: {e}");
                return;
            }
            used = true;
        }
        if used && self.rxq.needs_notification(&mem).unwrap_or(true) {
            self.irq.signal_used();
        }
    }

    /// Fill `pkt` with the next control packet or data; its used length, or `None` if there
    /// was nothing to send after all.
    fn next_rx_packet(&mut self, poller: &Poller, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        if let Some(c) = self.ctrl.pop_front() {
            self.write_header(pkt, c.key, c.op, c.flags, 0);
            return Some(PKT_HEADER_SIZE as u32);
        }
        let mut keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.can_send_data())
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        if keys.is_empty() {
            return None;
        }
        let start = self.rr % keys.len();
        self.rr = self.rr.wrapping_add(1);
        for &key in keys[start..].iter().chain(&keys[..start]) {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let room = pkt.data_slice().map_or(0, |s| s.len());
            let want = (conn.peer_credit() as usize)
                .min(room)
                .min(MAX_PKT_DATA as usize);
            if want == 0 {
                continue;
            }
            let mut buf = vec![0u8; want];
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    // The host client closed: tell the guest, and wait for its OP_RST.
                    conn.readable = false;
                    conn.state = State::Closing {
                        deadline: Instant::now() + CLOSE_TIMEOUT,
                    };
                    self.write_header(pkt, key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0);
                    return Some(PKT_HEADER_SIZE as u32);
                }
                Ok(n) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    if let Some(s) = pkt.data_slice() {
                        s.copy_from(&buf[..n]);
                    }
                    self.write_header(pkt, key, OP_RW, 0, n as u32);
                    return Some((PKT_HEADER_SIZE + n) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(poller, key);
                    self.write_header(pkt, key, OP_RST, 0, 0);
                    return Some(PKT_HEADER_SIZE as u32);
                }
            }
        }
        None
    }

    fn write_header(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        key: ConnKey,
        op: u16,
        flags: u32,
        len: u32,
    ) {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_sent = c.fwd_cnt;
                c.fwd_cnt
            }
            None => 0,
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(key.0)
            .set_dst_port(key.1)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(BUF_ALLOC)
            .set_fwd_cnt(fwd_cnt);
    }
}

fn copy_packet(pkt: &VsockPacket<'_, ()>) -> GuestPkt {
    let mut data = Vec::new();
    if let Some(s) = pkt.data_slice() {
        let n = (pkt.len() as usize).min(s.len());
        data = vec![0u8; n];
        s.copy_to(&mut data[..]);
    }
    GuestPkt {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        key: (pkt.dst_port(), pkt.src_port()),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
        data,
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::mmio::{MmioTransport, REG_STATUS};
    use super::super::testing::*;
    use super::*;
    use crate::irq::CountingInterrupt;

    const CID: u64 = 3;
    const RXBUF: u64 = 0x100000;
    const TXBUF: u64 = 0x200000;
    const RX_DATA: u32 = 4096;

    #[derive(Debug, Default, Clone)]
    struct Pkt {
        src_cid: u64,
        dst_cid: u64,
        src_port: u32,
        dst_port: u32,
        type_: u16,
        op: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        data: Vec<u8>,
    }

    struct Rig {
        t: MmioTransport,
        mem: GuestMemory,
        rx: DriverQueue,
        tx: DriverQueue,
        uds: PathBuf,
        _dir: tempfile::TempDir,
        tx_slot: u64,
        repost: bool,
    }

    fn rig() -> Rig {
        rig_with(8)
    }

    fn rig_with(rx_buffers: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let dev = Vsock::new(CID, uds.clone()).unwrap();
        let mem = memory();
        let mut t =
            MmioTransport::new(mem.clone(), Box::new(dev), CountingInterrupt::new()).unwrap();
        negotiate(&mut t);
        let mut cfg = [0u8; 8];
        crate::bus::BusDevice::read(&mut t, 0, 0x100, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), CID);
        let rx = DriverQueue::new(0, 16, 0x10000);
        let tx = DriverQueue::new(1, 16, 0x20000);
        rx.setup(&mut t);
        tx.setup(&mut t);
        DriverQueue::new(2, 16, 0x30000).setup(&mut t);
        driver_ok(&mut t);
        let mut r = Rig {
            t,
            mem,
            rx,
            tx,
            uds,
            _dir: dir,
            tx_slot: 0,
            repost: true,
        };
        for _ in 0..rx_buffers {
            r.post_rx();
        }
        notify(&mut r.t, 0);
        r
    }

    impl Rig {
        fn post_rx(&mut self) {
            // Single-descriptor chains: the head index is the descriptor index.
            let idx = u64::from(self.rx.peek_next_desc());
            self.rx.add(
                &self.mem,
                &[(RXBUF + idx * 0x2000, PKT_HEADER_SIZE as u32 + RX_DATA, true)],
            );
        }

        fn try_recv(&mut self, wait: Duration) -> Option<Pkt> {
            let deadline = Instant::now() + wait;
            let (head, len) = loop {
                if let Some(u) = self.rx.pop_used(&self.mem) {
                    break u;
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let addr = RXBUF + u64::from(head) * 0x2000;
            let mut h = [0u8; PKT_HEADER_SIZE];
            self.mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let le32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
            let le64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
            let n = le32(24) as usize;
            assert_eq!(len as usize, PKT_HEADER_SIZE + n);
            let mut data = vec![0u8; n];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + PKT_HEADER_SIZE as u64))
                .unwrap();
            if self.repost {
                self.post_rx();
                notify(&mut self.t, 0);
            }
            Some(Pkt {
                src_cid: le64(0),
                dst_cid: le64(8),
                src_port: le32(16),
                dst_port: le32(20),
                type_: u16::from_le_bytes([h[28], h[29]]),
                op: u16::from_le_bytes([h[30], h[31]]),
                flags: le32(32),
                buf_alloc: le32(36),
                fwd_cnt: le32(40),
                data,
            })
        }

        fn recv(&mut self) -> Pkt {
            self.try_recv(Duration::from_secs(5))
                .expect("a packet for the guest")
        }

        fn send(&mut self, p: &Pkt) {
            let addr = TXBUF + (self.tx_slot % 16) * 0x20000;
            self.tx_slot += 1;
            let mut h = [0u8; PKT_HEADER_SIZE];
            h[0..8].copy_from_slice(&p.src_cid.to_le_bytes());
            h[8..16].copy_from_slice(&p.dst_cid.to_le_bytes());
            h[16..20].copy_from_slice(&p.src_port.to_le_bytes());
            h[20..24].copy_from_slice(&p.dst_port.to_le_bytes());
            h[24..28].copy_from_slice(&(p.data.len() as u32).to_le_bytes());
            h[28..30].copy_from_slice(&p.type_.to_le_bytes());
            h[30..32].copy_from_slice(&p.op.to_le_bytes());
            h[32..36].copy_from_slice(&p.flags.to_le_bytes());
            h[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
            h[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
            self.mem
                .write_slice(&p.data, GuestAddress(addr + 0x100))
                .unwrap();
            let mut chain = vec![(addr, PKT_HEADER_SIZE as u32, false)];
            if !p.data.is_empty() {
                chain.push((addr + 0x100, p.data.len() as u32, false));
            }
            let head = self.tx.add(&self.mem, &chain);
            notify(&mut self.t, 1);
            assert_eq!(self.tx.wait_used(&self.mem).0, u32::from(head));
        }
    }

    /// A packet from the guest on connection (guest port, host port).
    fn gp(guest_port: u32, host_port: u32, op: u16) -> Pkt {
        Pkt {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Pkt::default()
        }
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    fn client(r: &mut Rig, guest_port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let req = r.recv();
        assert_eq!(
            (req.op, req.dst_port, req.src_cid, req.dst_cid),
            (OP_REQUEST, guest_port, HOST_CID, CID)
        );
        assert_eq!(req.type_, TYPE_STREAM);
        assert!(req.src_port >= LOCAL_PORT_BASE);
        r.send(&gp(guest_port, req.src_port, OP_RESPONSE));
        let ok = format!("OK {}\n", req.src_port);
        assert_eq!(read_n(&mut s, ok.len()), ok.as_bytes());
        (s, req.src_port)
    }

    #[test]
    fn host_connect_data_both_ways_and_guest_shutdown() {
        let mut r = rig();
        let (mut s, hp) = client(&mut r, 1234);
        s.write_all(b"ping").unwrap();
        let p = r.recv();
        assert_eq!(
            (p.op, p.src_port, p.dst_port, &p.data[..]),
            (OP_RW, hp, 1234, &b"ping"[..])
        );
        assert_eq!(p.buf_alloc, BUF_ALLOC);
        let mut pong = gp(1234, hp, OP_RW);
        pong.data = b"pong".to_vec();
        r.send(&pong);
        assert_eq!(read_n(&mut s, 4), b"pong");
        let mut shut = gp(1234, hp, OP_SHUTDOWN);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        r.send(&shut);
        let rst = r.recv();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, hp, 1234));
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "client sees EOF");
    }

    #[test]
    fn host_close_shuts_down_the_guest_side() {
        let mut r = rig();
        let (s, hp) = client(&mut r, 7);
        drop(s);
        let p = r.recv();
        assert_eq!(
            (p.op, p.flags, p.src_port),
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, hp)
        );
        r.send(&gp(7, hp, OP_RST));
        assert!(r.try_recv(Duration::from_millis(100)).is_none());
        // The connection is gone: data for it is answered with a reset.
        r.send(&gp(7, hp, OP_RW));
        assert_eq!(r.recv().op, OP_RST);
    }

    #[test]
    fn guest_connects_to_a_host_listener() {
        let mut r = rig();
        let listener = UnixListener::bind(format!("{}_5000", r.uds.display())).unwrap();
        r.send(&gp(777, 5000, OP_REQUEST));
        let resp = r.recv();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 5000, 777)
        );
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hi = gp(777, 5000, OP_RW);
        hi.data = b"hi".to_vec();
        r.send(&hi);
        assert_eq!(read_n(&mut s, 2), b"hi");
        s.write_all(b"yo").unwrap();
        let p = r.recv();
        assert_eq!((p.op, &p.data[..]), (OP_RW, &b"yo"[..]));
        // Nobody listens on 5001.
        r.send(&gp(778, 5001, OP_REQUEST));
        let p = r.recv();
        assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 5001, 778));
    }

    #[test]
    fn data_to_the_guest_respects_its_credit() {
        let mut r = rig();
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"CONNECT 9\n").unwrap();
        let req = r.recv();
        let hp = req.src_port;
        let mut resp = gp(9, hp, OP_RESPONSE);
        resp.buf_alloc = 8;
        r.send(&resp);
        read_n(&mut s, format!("OK {hp}\n").len());
        s.write_all(&[1u8; 20]).unwrap();
        let p = r.recv();
        assert_eq!(p.data, vec![1u8; 8]);
        assert!(
            r.try_recv(Duration::from_millis(100)).is_none(),
            "no credit left"
        );
        let mut upd = gp(9, hp, OP_CREDIT_UPDATE);
        upd.buf_alloc = 8;
        upd.fwd_cnt = 8;
        r.send(&upd);
        assert_eq!(r.recv().data, vec![1u8; 8]);
        // A credit request is answered with our counters.
        let mut creq = gp(9, hp, OP_CREDIT_REQUEST);
        creq.buf_alloc = 8;
        creq.fwd_cnt = 16;
        r.send(&creq);
        let mut got = Vec::new();
        for _ in 0..2 {
            let p = r.recv();
            if p.op == OP_CREDIT_UPDATE {
                assert_eq!((p.buf_alloc, p.fwd_cnt), (BUF_ALLOC, 0));
            } else {
                got.extend(p.data);
            }
        }
        assert_eq!(got, vec![1u8; 4]);
    }

    #[test]
    fn a_slow_reader_does_not_block_other_connections() {
        let mut r = rig();
        let (mut slow, slow_hp) = client(&mut r, 1);
        let (mut fast, fast_hp) = client(&mut r, 2);
        // Fill the slow client's socket and our buffer: a full credit window.
        let chunk: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        for _ in 0..(BUF_ALLOC as usize / chunk.len()) {
            let mut p = gp(1, slow_hp, OP_RW);
            p.data = chunk.clone();
            r.send(&p);
        }
        let mut p = gp(2, fast_hp, OP_RW);
        p.data = b"fast".to_vec();
        r.send(&p);
        assert_eq!(read_n(&mut fast, 4), b"fast");
        fast.write_all(b"back").unwrap();
        let mut back = r.recv();
        while back.op == OP_CREDIT_UPDATE {
            back = r.recv();
        }
        assert_eq!((back.dst_port, &back.data[..]), (2, &b"back"[..]));
        // The slow reader gets everything, in order.
        let all = read_n(&mut slow, BUF_ALLOC as usize);
        assert!(all.chunks(4096).all(|c| c == &chunk[..]));
        // And the guest hears about the freed credit.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let p = r.recv();
            if p.op == OP_CREDIT_UPDATE && p.dst_port == 1 && p.fwd_cnt == BUF_ALLOC {
                break;
            }
            assert!(Instant::now() < deadline);
        }
    }

    #[test]
    fn sending_beyond_credit_resets() {
        // One rx buffer: the guest cannot hear about freed credit beyond the first update, so
        // it runs out of credit for sure.
        let mut r = rig_with(1);
        let (mut s, hp) = client(&mut r, 3);
        r.repost = false;
        let big = vec![0u8; 60 * 1024];
        for _ in 0..8 {
            let mut p = gp(3, hp, OP_RW);
            p.data = big.clone();
            r.send(&p);
        }
        let mut p = r.recv();
        assert_eq!(p.op, OP_CREDIT_UPDATE);
        r.repost = true;
        r.post_rx();
        notify(&mut r.t, 0);
        p = r.recv();
        assert_eq!((p.op, p.dst_port), (OP_RST, 3));
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    #[test]
    fn bad_connect_lines_and_stray_packets() {
        let mut r = rig();
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"HELLO 5\n").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "closed");
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&[b'x'; 100]).unwrap();
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "overlong line: closed"
        );
        assert!(r.try_recv(Duration::from_millis(50)).is_none());

        // Packets for unknown connections are reset; to other CIDs too; resets are not answered.
        r.send(&gp(10, 20, OP_RW));
        assert_eq!(r.recv().op, OP_RST);
        let mut p = gp(10, 20, OP_REQUEST);
        p.dst_cid = 9;
        r.send(&p);
        assert_eq!(r.recv().op, OP_RST);
        r.send(&gp(10, 20, OP_RST));
        let mut p = gp(10, 20, OP_REQUEST);
        p.src_cid = 99;
        r.send(&p);
        assert!(r.try_recv(Duration::from_millis(50)).is_none());
    }

    #[test]
    fn reset_closes_connections_and_drop_removes_the_socket() {
        let mut r = rig();
        let (mut s, _) = client(&mut r, 4);
        write32(&mut r.t, REG_STATUS, 0);
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "connection closed by reset");
        assert!(r.uds.exists(), "still listening after a reset");
        let uds = r.uds.clone();
        drop(r.t);
        assert!(!uds.exists());
    }
}
