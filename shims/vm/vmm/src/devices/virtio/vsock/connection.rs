//! One stream connection: its state, the bytes on their way to the host socket, and the
//! credit accounting both ways (virtio 1.2, 5.10.6.3).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::BUF_ALLOC;

/// (host port, guest port)
pub(super) type ConnKey = (u32, u32);

#[derive(PartialEq, Eq, Debug)]
pub(super) enum State {
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

/// What became of a [`Conn::flush`].
#[derive(PartialEq, Eq, Debug)]
pub(super) enum Flushed {
    /// Still open (whatever the socket did not take stays queued).
    Open,
    /// The guest is done and everything it sent reached the socket: reset the connection.
    Done,
    /// The socket failed: reset the connection.
    Failed,
}

/// The guest broke the stream protocol on this connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum GuestDataError {
    #[error("guest sent beyond its credit")]
    Credit,
    #[error("guest sent after shutting down")]
    AfterShutdown,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) state: State,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    pub(super) tx_cnt: u32,
    /// Bytes the guest sent us.
    rx_cnt: u32,
    /// Bytes from the guest written to the socket, and the value the guest last saw.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Guest bytes the socket has not taken yet (bounded by [`BUF_ALLOC`] through credit).
    out: VecDeque<u8>,
    /// Edge-triggered readiness: the socket may have data (or EOF) to read.
    pub(super) readable: bool,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    /// The guest shut down both ways: reset once `out` is flushed.
    rst_when_flushed: bool,
}

impl Conn {
    pub(super) fn new(
        stream: UnixStream,
        token: u64,
        state: State,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Self {
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

    /// How many more bytes the guest can take from us. Its counters are guest values: a
    /// `fwd_cnt` ahead of what we sent wraps to a huge in-flight count and yields no credit.
    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    pub(super) fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.guest_shut_recv
            && self.peer_credit() > 0
    }

    /// Update the guest's view of its own buffer from a packet header.
    pub(super) fn peer_credit_update(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Queue an OP_RW payload for the socket. What the guest may have in flight is what it
    /// sent beyond the `fwd_cnt` it last saw from us, at most [`BUF_ALLOC`]: this is what bounds
    /// `out`.
    pub(super) fn guest_data(&mut self, data: &[u8]) -> Result<(), GuestDataError> {
        if self.guest_shut_send {
            return Err(GuestDataError::AfterShutdown);
        }
        let in_flight = u64::from(self.rx_cnt.wrapping_sub(self.fwd_cnt_sent));
        let Ok(len) = u32::try_from(data.len()) else {
            return Err(GuestDataError::Credit);
        };
        if in_flight.saturating_add(u64::from(len)) > u64::from(BUF_ALLOC) {
            return Err(GuestDataError::Credit);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        self.out.extend(data);
        Ok(())
    }

    /// The guest's OP_SHUTDOWN flags.
    pub(super) fn guest_shutdown(&mut self, send: bool, recv: bool) {
        self.guest_shut_send |= send;
        self.guest_shut_recv |= recv;
        if self.guest_shut_send && self.guest_shut_recv {
            // The guest is done: it expects our OP_RST once we have passed on its data.
            self.rst_when_flushed = true;
        }
    }

    /// Write queued guest bytes to the socket, as far as it takes them without blocking.
    pub(super) fn flush(&mut self) -> Flushed {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            // std writes Unix sockets with MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
            match (&self.stream).write(a) {
                Ok(n) => {
                    let n = n.min(a.len());
                    self.out.drain(..n);
                    // n <= a.len() <= BUF_ALLOC: `guest_data` bounds what is queued.
                    self.fwd_cnt = self
                        .fwd_cnt
                        .wrapping_add(u32::try_from(n).unwrap_or(BUF_ALLOC));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Flushed::Failed,
            }
        }
        if self.out.is_empty() {
            if self.rst_when_flushed {
                return Flushed::Done;
            }
            if self.guest_shut_send {
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        Flushed::Open
    }

    /// The guest should hear about freed buffer space (half our buffer since it last did).
    pub(super) fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= BUF_ALLOC / 2
    }

    /// The `fwd_cnt` to put in a header we send now; the guest will have seen it.
    pub(super) fn fwd_cnt_for_header(&mut self) -> u32 {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.fwd_cnt
    }

    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.out.len()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::super::testing::*;
    use super::super::{OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RST, OP_RW};
    use super::*;

    fn conn() -> (Conn, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (Conn::new(ours, 0, State::Established, 0, 0), theirs)
    }

    #[test]
    fn guest_data_beyond_credit_is_refused_and_not_queued() {
        let (mut c, _peer) = conn();
        c.guest_data(&vec![0u8; BUF_ALLOC as usize - 1]).unwrap();
        assert_eq!(c.guest_data(&[0, 0]), Err(GuestDataError::Credit));
        assert_eq!(c.queued(), BUF_ALLOC as usize - 1, "nothing of it queued");
        c.guest_data(&[0]).unwrap();
        // What the socket took only frees credit once the guest has seen our fwd_cnt.
        assert_eq!(c.flush(), Flushed::Open);
        assert_eq!(c.guest_data(&[0]), Err(GuestDataError::Credit));
        c.fwd_cnt_for_header();
        c.guest_data(&[0]).unwrap();
    }

    #[test]
    fn hostile_guest_counters_yield_no_credit_and_no_panic() {
        let (mut c, _peer) = conn();
        c.peer_credit_update(16, 1000);
        assert_eq!(c.peer_credit(), 0);
        c.tx_cnt = u32::MAX;
        c.peer_credit_update(16, 5);
        assert_eq!(c.peer_credit(), 0);
        c.peer_credit_update(16, u32::MAX - 3);
        assert_eq!(c.peer_credit(), 13, "counters wrap");
    }

    #[test]
    fn flush_to_a_closed_peer_fails() {
        let (mut c, peer) = conn();
        drop(peer);
        c.guest_data(b"late").unwrap();
        assert_eq!(c.flush(), Flushed::Failed);
    }

    #[test]
    fn guest_shutdown_both_ways_resets_once_flushed() {
        let (mut c, mut peer) = conn();
        c.guest_data(b"bye").unwrap();
        c.guest_shutdown(true, true);
        assert_eq!(c.guest_data(b"more"), Err(GuestDataError::AfterShutdown));
        assert_eq!(c.flush(), Flushed::Done);
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"bye");
    }

    #[test]
    fn data_to_the_guest_respects_its_credit() {
        let mut r = rig();
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"CONNECT 9\n").unwrap();
        let req = r.recv();
        let hp = req.src_port;
        let mut resp = gp(9, hp, super::super::OP_RESPONSE);
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
        let chunk: Vec<u8> = (0..4096u32).map(|i| i.to_le_bytes()[0]).collect();
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
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let p = r.recv();
            if p.op == OP_CREDIT_UPDATE && p.dst_port == 1 && p.fwd_cnt == BUF_ALLOC {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
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
        r.kick_rx();
        p = r.recv();
        assert_eq!((p.op, p.dst_port), (OP_RST, 3));
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}
