//! The byte streams the host reaches the agent through, as ttrpc listeners.
//!
//! The virtio-serial port named `yard.agent` is the channel that must work (no vsock on hosts
//! without vhost-vsock). A port is a character device that can be open once: the listener yields
//! it as one connection, with the READY banner written first, and when that connection ends (the
//! host closed its socket: reads return end-of-file) it reopens the port and yields it again;
//! the banner write then waits until a host is connected. Where the guest has vsock, connections
//! to port 1024 are served too, each starting with the banner.
//!
//! The guest only learns "host connected: yes/no" from the port. A host that closes its socket
//! and connects again before the guest has looked (a few milliseconds) leaves no trace: the
//! agent keeps its ttrpc session and sends no new banner. A reconnecting host therefore waits a
//! short while for the banner and, without one, stays disconnected a moment and tries again
//! (`tests/boot.rs` does this).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use yard_agent_protocol::ttrpc::r#async::transport::Listener;
use yard_agent_protocol::{PORT_NAME, READY_BANNER, VSOCK_PORT};

const PORTS: &str = "/sys/class/virtio-ports";

/// The device of the virtio-serial port called `name` (`/dev/vport0p1`), if it exists yet.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(PORTS).ok()?;
    for e in entries.flatten() {
        let port_name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if port_name.trim_end_matches('\n') == name {
            return Some(PathBuf::from("/dev").join(e.file_name()));
        }
    }
    None
}

/// The open port. Dropping it closes the device and tells the listener to reopen it.
pub struct Port {
    fd: AsyncFd<OwnedFd>,
    _closed: oneshot::Sender<()>,
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Opens the port (waiting for it to appear) and writes the banner (waiting for the host).
async fn open_port(name: &str) -> io::Result<(Port, oneshot::Receiver<()>)> {
    let started = Instant::now();
    let mut warned = false;
    let path = loop {
        if let Some(p) = find_port(name) {
            break p;
        }
        if !warned && started.elapsed() > Duration::from_secs(5) {
            tracing::warn!(port = name, "still no virtio-serial port with this name");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)?;
    let (tx, rx) = oneshot::channel();
    let mut port = Port {
        fd: crate::sys::async_fd(OwnedFd::from(file))?,
        _closed: tx,
    };
    port.write_all(READY_BANNER).await?;
    tracing::info!(port = %path.display(), uptime_ms = crate::boot::uptime().as_millis() as u64, "ready");
    Ok((port, rx))
}

/// The serial port as a ttrpc listener: one connection at a time, for ever.
pub fn serial_listener() -> Listener {
    let connections =
        futures::stream::unfold(None, |previous: Option<oneshot::Receiver<()>>| async move {
            if let Some(closed) = previous {
                let _ = closed.await;
                tracing::info!("the host closed the agent port; reopening it");
            }
            loop {
                match open_port(PORT_NAME).await {
                    Ok((port, closed)) => return Some((Ok::<Port, io::Error>(port), Some(closed))),
                    Err(e) => {
                        tracing::warn!(port = PORT_NAME, error = %e, "open the agent port");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    Listener::new(connections)
}

/// vsock connections (each gets the banner first), where the guest has vsock.
pub fn vsock_listener() -> Option<Listener> {
    if !std::path::Path::new("/dev/vsock").exists() {
        return None;
    }
    let listener = match Listener::bind(format!("vsock://-1:{VSOCK_PORT}")) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "no vsock listener");
            return None;
        }
    };
    let connections = listener.then(|conn| async move {
        let mut socket = conn?;
        socket.write_all(READY_BANNER).await?;
        Ok::<_, io::Error>(socket)
    });
    Some(Listener::new(connections))
}
