//! The device worker thread and its epoll loop: one thread per activated device, waiting on the
//! queue eventfds, the backend's fds and a stop eventfd.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The token the stop eventfd is registered with; device tokens must differ.
pub const STOP_TOKEN: u64 = u64::MAX;

/// An epoll instance with the operations the workers use.
pub struct Poller {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        Ok(Poller {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); 64],
        })
    }

    pub fn add(&self, fd: &impl AsRawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.ctl(ControlOperation::Add, fd.as_raw_fd(), token, events)
    }

    pub fn remove(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            0,
            EventSet::empty(),
        )
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }

    /// Wait up to `timeout_ms` (-1: forever); the (token, events) that are ready.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<Vec<(u64, EventSet)>> {
        let n = match self.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        Ok(self.events[..n]
            .iter()
            .map(|e| (e.data(), e.event_set()))
            .collect())
    }
}

/// A running worker: stopping writes the stop eventfd and joins the thread.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawn `run` with a stop eventfd it must watch (register it with [`STOP_TOKEN`] and
    /// return when it fires).
    pub fn spawn<F>(name: &str, run: F) -> io::Result<Worker>
    where
        F: FnOnce(EventFd) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(theirs))?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    pub fn stop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            tracing::error!("stopping device worker: {e}");
            return;
        }
        if handle.join().is_err() {
            tracing::error!("device worker panicked");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
