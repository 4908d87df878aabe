//! The hybrid-vsock host side (as in firecracker): host clients connect to `uds_path` and
//! send `CONNECT <port>\n`, answered `OK <host port>\n` once the guest accepts; a guest
//! connection to host port P dials `<uds_path>_P`. Nothing here blocks the worker.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::super::worker::Poller;
use super::connection::{Conn, State};
use super::device::GuestPkt;
use super::event_handler::Backend;
use super::{MAX_CONNECTIONS, OP_REQUEST, OP_RESPONSE, OP_RST, sys};
use crate::guest_log;

/// Host ports for host-initiated connections start here (as in firecracker).
pub(super) const LOCAL_PORT_BASE: u32 = 1 << 30;
/// How long a client has to send its CONNECT line, and the guest to answer a request.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_LINE_MAX: usize = 32;

/// A host client that has not sent its CONNECT line yet.
pub(super) struct PendingClient {
    pub(super) stream: UnixStream,
    line: Vec<u8>,
    pub(super) deadline: Instant,
}

/// The socket a guest connection to host port `port` dials.
pub(super) fn peer_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds_path.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// The guest's OP_RESPONSE to our request: tell the host client.
pub(super) fn send_ok(stream: &UnixStream, host_port: u32) -> io::Result<()> {
    let ok = format!("OK {host_port}\n");
    // A fresh socket's buffer takes a short line at once; a client that cannot is gone.
    match (&*stream).write(ok.as_bytes())? {
        n if n == ok.len() => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

impl Backend {
    pub(super) fn accept(&mut self, poller: &Poller) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS {
                        // Host clients, not the guest, but a flood still must not flood logs.
                        guest_log!(warn, "vsock: too many connections, refusing a host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        guest_log!(warn, "vsock: host client: {e}");
                        continue;
                    }
                    let token = match self.watch(poller, &stream) {
                        Ok(t) => t,
                        Err(e) => {
                            guest_log!(warn, "vsock: watching a host client: {e}");
                            continue;
                        }
                    };
                    self.pending.insert(
                        token,
                        PendingClient {
                            stream,
                            line: Vec::new(),
                            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                        },
                    );
                    self.read_connect_line(poller, token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: the listener stays readable and we come back.
                    guest_log!(warn, "vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Read the client's `CONNECT <port>\n` a byte at a time, so nothing after it is consumed.
    pub(super) fn read_connect_line(&mut self, poller: &Poller, token: u64) {
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
            guest_log!(debug, "vsock: host client sent a bad CONNECT line");
            let _ = poller.remove(&p.stream);
            return;
        };
        let key = (self.local_port(), guest_port);
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        self.conns.insert(
            key,
            Conn::new(p.stream, token, State::Requested { deadline }, 0, 0),
        );
        self.token_conn.insert(token, key);
        self.ctrl.push(key, OP_REQUEST);
    }

    /// A host port no connection uses. Terminates: there are at most [`MAX_CONNECTIONS`]
    /// connections and 3 << 30 ports to pick from.
    fn local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// The guest's OP_REQUEST to host port `pkt.key.0`: dial `<uds_path>_<port>` without
    /// blocking (a listener with a full backlog is a refusal, not a stall).
    pub(super) fn guest_connect(&mut self, poller: &Poller, pkt: &GuestPkt) {
        let key = pkt.key;
        let path = peer_path(&self.uds_path, key.0);
        let stream = if self.connection_count() >= MAX_CONNECTIONS {
            Err(io::Error::other("too many connections"))
        } else {
            sys::connect_nonblocking(&path)
        };
        let watched = stream.and_then(|s| self.watch(poller, &s).map(|t| (s, t)));
        match watched {
            Ok((stream, token)) => {
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
                self.ctrl.push(key, OP_RESPONSE);
            }
            Err(e) => {
                guest_log!(debug, "vsock: guest connect to {}: {e}", path.display());
                self.ctrl.push(key, OP_RST);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    use super::super::sys::test_support::set_backlog;
    use super::super::testing::*;
    use super::super::{BUF_ALLOC, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
    use super::*;

    #[test]
    fn parse_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn peer_path_keeps_non_utf8_bytes() {
        let uds = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/v\xff.sock"));
        assert_eq!(
            peer_path(uds, 52).as_os_str().as_bytes(),
            b"/tmp/v\xff.sock_52"
        );
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
        assert_eq!(p.type_, TYPE_STREAM);
        // Nobody listens on 5001.
        r.send(&gp(778, 5001, OP_REQUEST));
        let p = r.recv();
        assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 5001, 778));
    }

    /// Regression: the guest's connect used a blocking connect(2), so a host listener that
    /// does not accept (full backlog) stalled the device thread, and with it every connection
    /// and the vCPU that reset the device.
    #[test]
    fn guest_connect_to_a_full_backlog_is_refused_without_stalling_the_device() {
        let mut r = rig();
        let path = format!("{}_6000", r.uds.display());
        let listener = UnixListener::bind(&path).unwrap();
        set_backlog(&listener, 0);
        let mut held = Vec::new();
        while let Ok(s) = sys::connect_nonblocking(Path::new(&path)) {
            held.push(s);
            assert!(held.len() < 16);
        }
        r.send(&gp(900, 6000, OP_REQUEST));
        let p = r
            .try_recv(Duration::from_secs(2))
            .expect("an answer without waiting for the listener");
        assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 6000, 900));
        // The device still serves host clients.
        let (mut s, hp) = client(&mut r, 901);
        let mut hi = gp(901, hp, OP_RW);
        hi.data = b"ok".to_vec();
        r.send(&hi);
        assert_eq!(read_n(&mut s, 2), b"ok");
    }

    #[test]
    fn bad_connect_lines_are_closed() {
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
    }
}
