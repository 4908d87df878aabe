//! Port forwarding's guest side: TCP connections the agent makes, for the host, to a port on the
//! guest's loopback, where a pod's containers listen (CRI PortForward into a vm pod; the host
//! side is the vm shim's `forward` module). The host drives each connection by long-poll reads
//! and writes, as it does a process's stdio: the agent keeps no buffer of its own, so a host that
//! stops reading stalls the sender as TCP would.
//!
//! At most [`MAX_CONNECTIONS`] are open at once; ids are never reused while the agent runs.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use yard_agent_protocol::MAX_CONNECTIONS;

use crate::error::{Error, Result};
use crate::stdio::MAX_READ;

struct Connection {
    port: u16,
    /// `None` once at end-of-file.
    read: tokio::sync::Mutex<Option<OwnedReadHalf>>,
    /// `None` once shut down.
    write: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    /// Set by a full close: ends a read or write waiting on the socket, whose halves then drop
    /// with the last handle (closing the socket).
    closed: watch::Sender<bool>,
}

impl Connection {
    /// Resolves once the connection is closed.
    async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

#[derive(Default)]
pub struct Forwards {
    open: Mutex<HashMap<u32, Arc<Connection>>>,
    next: AtomicU32,
}

impl Forwards {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Connection>>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: u32) -> Result<Arc<Connection>> {
        self.open()
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("connection {id}: no such connection")))
    }

    /// Connects to `port` on the guest's loopback; returns the connection's id.
    pub async fn dial(&self, port: u32) -> Result<u32> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::InvalidArgument(format!("port: {port} is not a TCP port")))?;
        if self.open().len() >= MAX_CONNECTIONS {
            return Err(Error::FailedPrecondition(format!(
                "port {port}: {MAX_CONNECTIONS} forwarded connections are open already"
            )));
        }
        let stream = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
            .map_err(Error::io(format!(
                "connect to port {port} on the guest's loopback"
            )))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let conn = Arc::new(Connection {
            port,
            read: tokio::sync::Mutex::new(Some(read)),
            write: tokio::sync::Mutex::new(Some(write)),
            closed: watch::channel(false).0,
        });
        let mut open = self.open();
        // Checked again: other dials may have finished while this one connected.
        if open.len() >= MAX_CONNECTIONS {
            return Err(Error::FailedPrecondition(format!(
                "port {port}: {MAX_CONNECTIONS} forwarded connections are open already"
            )));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(id, conn);
        tracing::debug!(id, port, "forwarded connection open");
        Ok(id)
    }

    /// Up to `len` bytes (64 KiB for 0) as soon as there are some; empty with `true` at
    /// end-of-file.
    pub async fn read(&self, id: u32, len: u32) -> Result<(Vec<u8>, bool)> {
        let conn = self.get(id)?;
        let mut slot = tokio::select! {
            s = conn.read.lock() => s,
            () = conn.closed() => return Ok((Vec::new(), true)),
        };
        let Some(read) = slot.as_mut() else {
            return Ok((Vec::new(), true));
        };
        let len = if len == 0 { 64 << 10 } else { len as usize };
        let mut buf = vec![0u8; len.min(MAX_READ)];
        let got = tokio::select! {
            r = read.read(&mut buf) => r,
            () = conn.closed() => Ok(0),
        };
        match got {
            Ok(0) => {
                *slot = None;
                Ok((Vec::new(), true))
            }
            Ok(n) => {
                buf.truncate(n);
                Ok((buf, false))
            }
            Err(e) => {
                *slot = None;
                Err(Error::io(format!("read from port {}", conn.port))(e))
            }
        }
    }

    /// Sends all of `data`.
    pub async fn write(&self, id: u32, data: &[u8]) -> Result<usize> {
        let conn = self.get(id)?;
        let shut =
            || Error::FailedPrecondition(format!("connection {id}: its sending side is shut down"));
        let mut slot = tokio::select! {
            s = conn.write.lock() => s,
            () = conn.closed() => return Err(shut()),
        };
        let Some(write) = slot.as_mut() else {
            return Err(shut());
        };
        tokio::select! {
            r = write.write_all(data) => r.map_err(Error::io(format!("write to port {}", conn.port)))?,
            () = conn.closed() => return Err(shut()),
        }
        Ok(data.len())
    }

    /// Shuts the sending side down (`write_only`), or closes the connection and forgets it: a
    /// read waiting on it then ends at end-of-file, a write with an error.
    pub async fn close(&self, id: u32, write_only: bool) -> Result<()> {
        if write_only {
            let conn = self.get(id)?;
            if let Some(mut w) = conn.write.lock().await.take() {
                let _ = w.shutdown().await;
            }
            return Ok(());
        }
        let conn = self
            .open()
            .remove(&id)
            .ok_or_else(|| Error::NotFound(format!("connection {id}: no such connection")))?;
        tracing::debug!(id, port = conn.port, "forwarded connection closed");
        conn.closed.send_replace(true);
        Ok(())
    }

    /// How many connections are open (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn echo_server() -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn a_connection_carries_bytes_both_ways_and_ends_with_its_peer() {
        let (port, _server) = echo_server().await;
        let f = Forwards::default();
        let id = f.dial(u32::from(port)).await.unwrap();
        assert_eq!(f.write(id, b"hello").await.unwrap(), 5);
        let mut got = Vec::new();
        while got.len() < 5 {
            let (data, eof) = f.read(id, 3).await.unwrap();
            assert!(!eof && data.len() <= 3);
            got.extend(data);
        }
        assert_eq!(got, b"hello");
        // Half-close: the echo server sees end-of-file and ends its side too.
        f.close(id, true).await.unwrap();
        assert_eq!(f.read(id, 0).await.unwrap(), (Vec::new(), true));
        assert!(f.write(id, b"x").await.is_err());
        f.close(id, false).await.unwrap();
        assert_eq!(f.len(), 0);
        assert!(matches!(f.read(id, 0).await, Err(Error::NotFound(_))));
        assert!(matches!(f.close(id, false).await, Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn closing_wakes_a_waiting_read() {
        let (port, _server) = echo_server().await;
        let f = Arc::new(Forwards::default());
        let id = f.dial(u32::from(port)).await.unwrap();
        let reader = tokio::spawn({
            let f = f.clone();
            async move { f.read(id, 0).await }
        });
        // The read is parked on the socket (nothing was sent); closing must end it.
        tokio::task::yield_now().await;
        f.close(id, false).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the read ended")
            .unwrap();
        assert!(
            matches!(r, Ok((ref d, true)) if d.is_empty()) || r.is_err(),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn bad_ports_and_closed_ports_are_clear_errors() {
        let f = Forwards::default();
        for p in [0, 65536, u32::MAX] {
            let e = f.dial(p).await.unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(ref m) if m.starts_with("port: ")),
                "{e}"
            );
        }
        // A port nothing listens on: bind one, note it, close it.
        let port = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let e = f.dial(u32::from(port)).await.unwrap_err();
        assert!(
            crate::error::chain(&e).contains(&format!("connect to port {port}")),
            "{}",
            crate::error::chain(&e)
        );
        assert_eq!(f.len(), 0);
    }

    #[tokio::test]
    async fn no_more_than_the_bound_are_open() {
        let (port, _server) = echo_server().await;
        let f = Forwards::default();
        let mut ids = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            ids.push(f.dial(u32::from(port)).await.unwrap());
        }
        let e = f.dial(u32::from(port)).await.unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        f.close(ids[0], false).await.unwrap();
        let again = f.dial(u32::from(port)).await.unwrap();
        assert!(!ids.contains(&again), "ids are not reused");
    }
}
