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
//!
//! Everything the guest sends is hostile input; what bounds it: at most [`MAX_CONNECTIONS`]
//! connections of at most [`BUF_ALLOC`] buffered bytes each, at most one queued reply per
//! connection and op and a bounded reply queue (beyond which the tx queue waits), payloads of
//! at most 64 KiB, timeouts on every handshake, and no blocking call on the worker.
//!
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) and the rx/tx queues.
//! - [`connection`]: one connection's state and credit accounting.
//! - [`unix`]: the host side (listener, `CONNECT`/`OK`, dialing `<uds_path>_P`).
//! - [`event_handler`]: the worker's state and epoll loop.
//! - [`sys`]: `send(MSG_NOSIGNAL)` and a non-blocking `connect`.

mod connection;
mod device;
mod event_handler;
mod sys;
#[cfg(test)]
mod testing;
mod unix;

/// Handles what the guest posted on `txq` and fills its `rxq` buffers, `rounds` times (as the
/// worker does on notifications), with no worker thread: for the fuzz targets. Guest
/// connections dial `<uds_path>_<port>`; host clients arrive on `listener`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn serve_queues(
    mem: crate::GuestMemory,
    rxq: virtio_queue::Queue,
    txq: virtio_queue::Queue,
    listener: UnixListener,
    uds_path: PathBuf,
    guest_cid: u64,
    rounds: usize,
) -> io::Result<()> {
    let irq = std::sync::Arc::new(super::InterruptStatus::new(
        crate::irq::CountingInterrupt::new(),
    ));
    let mut backend =
        event_handler::Backend::new(mem, rxq, txq, irq, listener, uds_path, guest_cid);
    let poller = super::worker::Poller::new()?;
    for _ in 0..rounds {
        let mut budget = super::CHAINS_PER_WAKE;
        backend.process_tx(&poller, &mut budget);
        backend.fill_rx(&poller, &mut budget);
    }
    Ok(())
}

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::worker::{Worker, WorkerError};
use crate::seccomp::{Seccomp, ThreadKind};

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
/// How long the guest has to reset a connection we shut down.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections (and host clients still handshaking) per device.
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
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    queue_sizes: [u16; 3],
    /// Made with the device, so activation (on a vCPU thread) needs no new thread.
    worker: Worker,
    active: bool,
}

impl Vsock {
    /// Listen on `uds_path` for host clients (the path must not exist); the worker thread runs
    /// under the vsock worker's filter per `seccomp`.
    pub fn new(guest_cid: u64, uds_path: PathBuf, seccomp: Seccomp) -> Result<Vsock, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        let bind = |source| VsockError::Bind {
            path: uds_path.display().to_string(),
            source,
        };
        let worker = Worker::new("virtio-vsock", ThreadKind::VsockWorker, seccomp)?;
        let listener = UnixListener::bind(&uds_path).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(Vsock {
            guest_cid,
            uds_path,
            listener,
            queue_sizes: [QUEUE_SIZE; 3],
            worker,
            active: false,
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        super::VirtioDevice::reset(self);
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::warn!("removing {}: {e}", self.uds_path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_cids_and_taken_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(
                Vsock::new(cid, uds.clone(), Seccomp::Off),
                Err(VsockError::Cid(c)) if c == cid
            ));
        }
        let v = Vsock::new(3, uds.clone(), Seccomp::Enforce).unwrap();
        assert_eq!(v.uds_path(), uds);
        assert!(matches!(
            Vsock::new(4, uds.clone(), Seccomp::Enforce),
            Err(VsockError::Bind { .. })
        ));
        drop(v);
        assert!(!uds.exists());
    }
}
