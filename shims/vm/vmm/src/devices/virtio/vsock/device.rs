//! The vsock device model: [`VirtioDevice`] for [`Vsock`], and the worker's queue handling,
//! reading the guest's packets off the tx queue and filling its rx buffers with ours.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vmm_sys_util::eventfd::EventFd;

use super::super::worker::Poller;
use super::super::{
    ActivateError, InterruptStatus, TYPE_VSOCK, VirtioDevice, more_after_enable, read_config_bytes,
};
use super::connection::{ConnKey, State};
use super::event_handler::Backend;
use super::{
    CLOSE_TIMEOUT, HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, Vsock, unix,
};
use crate::GuestMemory;
use crate::guest_warn;

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
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let (Ok([rxq, txq, _evq]), Ok([rx_evt, tx_evt, ev_evt])) = (
            <[Queue; 3]>::try_from(queues),
            <[EventFd; 3]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let listener = self
            .listener
            .try_clone()
            .map_err(ActivateError::QueueEvents)?;
        let (uds_path, guest_cid) = (self.uds_path.clone(), self.guest_cid);
        self.worker
            .start(Box::new(move |stop| {
                let backend = Backend::new(mem, rxq, txq, irq, listener, uds_path, guest_cid);
                if let Err(e) = backend.run(rx_evt, tx_evt, ev_evt, stop) {
                    tracing::error!("virtio-vsock worker: {e}");
                }
            }))
            .map_err(ActivateError::Worker)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.stop();
        self.active = false;
    }
}

/// [`PKT_HEADER_SIZE`] as a used length.
const HEADER_LEN: u32 = 44;
const _: () = assert!(PKT_HEADER_SIZE == HEADER_LEN as usize);

/// What the guest sent, copied out of guest memory.
pub(super) struct GuestPkt {
    src_cid: u64,
    dst_cid: u64,
    /// (our port, the guest's port)
    pub(super) key: ConnKey,
    type_: u16,
    op: u16,
    flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
    data: Vec<u8>,
}

/// Copy a packet out of guest memory; its payload is at most [`MAX_PKT_DATA`] (the parser
/// refuses longer `len` fields).
fn copy_packet(pkt: &VsockPacket<'_, ()>) -> GuestPkt {
    let mut data = Vec::new();
    if let Some(s) = pkt.data_slice() {
        let n = usize::try_from(pkt.len()).map_or(0, |len| len.min(s.len()));
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

/// Why [`Backend::process_tx`] stopped reading the guest's tx queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxEnd {
    /// Nothing more to read (or the ring is broken and left until a reset).
    Drained,
    /// Too many replies wait for rx buffers: read on once the guest takes some.
    Throttled,
    /// The wakeup's budget ran out with packets left: come back after a look at `stop`.
    Yielded,
}

impl Backend {
    /// Handle the guest's packets, at most `budget` chains of them (counted down).
    pub(super) fn process_tx(&mut self, poller: &Poller, budget: &mut usize) -> TxEnd {
        if !self.txq.ready() {
            return TxEnd::Drained;
        }
        let mem = self.mem.clone();
        let mut used = false;
        let mut rechecked = false;
        let end = 'outer: loop {
            let _ = self.txq.disable_notification(&mem);
            let mut popped = false;
            loop {
                if self.ctrl.is_full() {
                    // Notifications stay off: the run loop comes back once rx drains.
                    break 'outer TxEnd::Throttled;
                }
                if *budget == 0 {
                    break 'outer TxEnd::Yielded;
                }
                let Some(mut chain) = self.txq.pop_descriptor_chain(&mem) else {
                    break;
                };
                *budget -= 1;
                popped = true;
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
                    break 'outer TxEnd::Drained;
                }
                used = true;
                if let Some(pkt) = pkt {
                    self.guest_packet(poller, pkt);
                }
            }
            if !more_after_enable(
                &mut self.txq,
                &mem,
                "virtio-vsock tx",
                popped,
                &mut rechecked,
            ) {
                break TxEnd::Drained;
            }
        };
        if used && self.txq.needs_notification(&mem).unwrap_or(true) {
            self.irq.signal_used();
        }
        end
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
        if pkt.dst_cid != HOST_CID || pkt.type_ != TYPE_STREAM {
            if pkt.op != OP_RST {
                self.ctrl.push(key, OP_RST);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match pkt.op {
                OP_REQUEST => self.guest_connect(poller, &pkt),
                OP_RST => {}
                _ => self.ctrl.push(key, OP_RST),
            }
            return;
        };
        conn.peer_credit_update(pkt.buf_alloc, pkt.fwd_cnt);
        match (&conn.state, pkt.op) {
            (_, OP_RST) => self.drop_conn(poller, key),
            (State::Requested { .. }, OP_RESPONSE) => {
                conn.state = State::Established;
                conn.readable = true;
                if unix::send_ok(&conn.stream, key.0).is_err() {
                    self.reset_conn(poller, key);
                }
            }
            (State::Established | State::Closing { .. }, OP_RW) => {
                if let Err(e) = conn.guest_data(&pkt.data) {
                    guest_warn!("virtio-vsock: {e}");
                    self.reset_conn(poller, key);
                    return;
                }
                self.flush(poller, key);
            }
            (State::Established | State::Closing { .. }, OP_CREDIT_UPDATE) => {}
            (State::Established | State::Closing { .. }, OP_CREDIT_REQUEST) => {
                self.ctrl.push(key, OP_CREDIT_UPDATE);
            }
            (State::Established | State::Closing { .. }, OP_SHUTDOWN) => {
                conn.guest_shutdown(
                    pkt.flags & SHUTDOWN_SEND != 0,
                    pkt.flags & SHUTDOWN_RCV != 0,
                );
                self.flush(poller, key);
            }
            _ => self.reset_conn(poller, key),
        }
    }

    fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || self.conns.values().any(|c| c.can_send_data())
    }

    /// Fill the guest's rx buffers with what we owe it, at most `budget` of them (counted
    /// down); `true` if the budget ran out with work left.
    pub(super) fn fill_rx(&mut self, poller: &Poller, budget: &mut usize) -> bool {
        if !self.rxq.ready() {
            return false;
        }
        let mem = self.mem.clone();
        let mut used = false;
        let mut popped = false;
        let mut rechecked = false;
        let mut yielded = false;
        while self.has_rx_work() {
            if *budget == 0 {
                yielded = true;
                break;
            }
            let Some(mut chain) = self.rxq.pop_descriptor_chain(&mem) else {
                // Out of buffers: the guest notifies the rx queue when it adds some.
                let more = more_after_enable(
                    &mut self.rxq,
                    &mem,
                    "virtio-vsock rx",
                    popped,
                    &mut rechecked,
                );
                popped = false;
                if more {
                    continue;
                }
                break;
            };
            *budget -= 1;
            popped = true;
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
                return false;
            }
            used = true;
        }
        if used && self.rxq.needs_notification(&mem).unwrap_or(true) {
            self.irq.signal_used();
        }
        yielded
    }

    /// Fill `pkt` with the next control packet or data; its used length, or `None` if there
    /// was nothing to send after all.
    fn next_rx_packet(&mut self, poller: &Poller, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        if let Some((key, op)) = self.ctrl.pop() {
            self.write_header(pkt, key, op, 0, 0);
            return Some(HEADER_LEN);
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
            // A buffer past 4 GiB has no more room than MAX_PKT_DATA.
            let room = u32::try_from(pkt.data_slice().map_or(0, |s| s.len())).unwrap_or(u32::MAX);
            let want = conn.peer_credit().min(room).min(MAX_PKT_DATA);
            if want == 0 {
                continue;
            }
            let mut buf = vec![0u8; want as usize];
            match std::io::Read::read(&mut conn.stream, &mut buf) {
                Ok(0) => {
                    // The host client closed: tell the guest, and wait for its OP_RST.
                    conn.readable = false;
                    conn.state = State::Closing {
                        deadline: Instant::now() + CLOSE_TIMEOUT,
                    };
                    self.write_header(pkt, key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0);
                    return Some(HEADER_LEN);
                }
                Ok(n) => {
                    // read() returns at most buf.len() == want bytes.
                    let len = u32::try_from(n).map_or(want, |n| n.min(want));
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(len);
                    if let Some(s) = pkt.data_slice() {
                        s.copy_from(&buf[..len as usize]);
                    }
                    self.write_header(pkt, key, OP_RW, 0, len);
                    return Some(HEADER_LEN + len);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(poller, key);
                    self.write_header(pkt, key, OP_RST, 0, 0);
                    return Some(HEADER_LEN);
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
        let fwd_cnt = self
            .conns
            .get_mut(&key)
            .map_or(0, |c| c.fwd_cnt_for_header());
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(key.0)
            .set_dst_port(key.1)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(super::BUF_ALLOC)
            .set_fwd_cnt(fwd_cnt);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::super::super::mmio::REG_STATUS;
    use super::super::super::testing::write32;
    use super::super::event_handler::MAX_PENDING_CTRL;
    use super::super::testing::*;
    use super::*;

    #[test]
    fn stray_packets_are_reset_and_resets_are_not_answered() {
        let mut r = rig();
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

    /// Regression: every stray packet queued an OP_RST with no bound, so a guest that sent
    /// them without ever posting rx buffers grew host memory without limit.
    #[test]
    fn stray_packets_without_rx_buffers_do_not_queue_unbounded_replies() {
        let mut r = rig_with(0);
        for port in 0..u32::try_from(MAX_PENDING_CTRL).unwrap() {
            r.send(&gp(port, 20, OP_RW));
        }
        // Our reply queue is full: the next packet waits in the guest's tx queue.
        let head = r.post_tx(&gp(5000, 20, OP_RW));
        assert_eq!(r.try_tx_used(Duration::from_millis(200)), None);
        // Once the guest takes the replies, it is read and answered too.
        for _ in 0..16 {
            r.post_rx();
        }
        r.kick_rx();
        let mut seen = std::collections::HashSet::new();
        while seen.len() <= MAX_PENDING_CTRL {
            let p = r.recv();
            assert_eq!(p.op, OP_RST);
            assert!(seen.insert(p.dst_port), "one reset per connection");
        }
        assert!(seen.contains(&5000));
        assert_eq!(r.try_tx_used(Duration::from_secs(5)), Some(u32::from(head)));
    }

    /// Regression: a guest's OP_CREDIT_REQUEST flood queued one OP_CREDIT_UPDATE each.
    #[test]
    fn credit_requests_are_answered_once_while_unanswered() {
        let mut r = rig_with(0);
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_80", r.uds.display())).unwrap();
        r.send(&gp(1, 80, OP_REQUEST));
        for _ in 0..100 {
            r.send(&gp(1, 80, OP_CREDIT_REQUEST));
        }
        r.post_rx();
        r.kick_rx();
        assert_eq!(r.recv().op, OP_RESPONSE);
        assert_eq!(r.recv().op, OP_CREDIT_UPDATE);
        assert!(r.try_recv(Duration::from_millis(100)).is_none());
        drop(listener);
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

    const SIGPIPE_CHILD: &str = "YARD_VMM_SIGPIPE_CHILD";

    /// Guest data for a host client that closed must not raise SIGPIPE: the VMM may be
    /// embedded where SIGPIPE is not ignored. (std's UnixStream writes with MSG_NOSIGNAL; a
    /// raw write(2) here would kill the process.) Runs in a child process with SIGPIPE's
    /// default action, terminate.
    #[test]
    fn guest_data_to_a_closed_client_does_not_raise_sigpipe() {
        if std::env::var_os(SIGPIPE_CHILD).is_some() {
            super::super::sys::test_support::default_sigpipe();
            let mut r = rig();
            let (s, hp) = client(&mut r, 5);
            drop(s);
            // Before and after the device sees the EOF, guest data must reach a dead socket.
            for _ in 0..2 {
                let mut p = gp(5, hp, OP_RW);
                p.data = b"late".to_vec();
                r.send(&p);
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut ops = Vec::new();
            while let Some(p) = r.try_recv(Duration::from_millis(200)) {
                ops.push(p.op);
            }
            assert!(ops.contains(&OP_RST), "the connection was reset: {ops:?}");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "devices::virtio::vsock::device::tests::guest_data_to_a_closed_client_does_not_raise_sigpipe",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SIGPIPE_CHILD, "1")
            .output()
            .unwrap();
        let mut log = std::io::stderr();
        let _ = log.write_all(&out.stdout);
        let _ = log.write_all(&out.stderr);
        assert!(out.status.success(), "child: {:?}", out.status);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the child ran the test"
        );
    }
}
