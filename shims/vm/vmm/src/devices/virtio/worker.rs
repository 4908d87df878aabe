//! The device worker thread and its epoll loop: one thread per device, made when the device
//! is, which installs the device's seccomp filter and then runs one job per activation (waiting
//! on the queue eventfds, the backend's fds and a stop eventfd) until reset.
//!
//! The thread exists before the guest can reach the device because activation happens on a
//! vCPU thread, whose filter allows no thread creation (and whose filter a thread made there
//! would inherit).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Seccomp, SeccompError, ThreadFilter, ThreadKind};

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

/// One activation's work: runs until the stop eventfd it is handed fires (register it with
/// [`STOP_TOKEN`]) or it fails.
pub type Job = Box<dyn FnOnce(&EventFd) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("creating the {name} thread")]
    Spawn {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("the {name} thread has ended")]
    Gone { name: &'static str },
}

/// A device's worker thread: [`Worker::start`] runs a job on it, [`Worker::stop`] ends the job,
/// drop ends the thread.
pub struct Worker {
    name: &'static str,
    jobs: Option<mpsc::Sender<Job>>,
    /// One message per job that ended (or the thread's end, as a disconnect).
    done: mpsc::Receiver<()>,
    stop: EventFd,
    running: bool,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Makes the thread (named `name`), which installs `kind`'s filter under `seccomp` before
    /// anything else; returns once it has, or with why it could not.
    pub fn new(
        name: &'static str,
        kind: ThreadKind,
        seccomp: Seccomp,
    ) -> Result<Worker, WorkerError> {
        let filter = ThreadFilter::new(kind, seccomp)?;
        let spawn = |source| WorkerError::Spawn { name, source };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn)?;
        let theirs = stop.try_clone().map_err(spawn)?;
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let installed = filter.install();
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if !ok {
                    return;
                }
                for job in jobs_rx {
                    job(&theirs);
                    if done_tx.send(()).is_err() {
                        return;
                    }
                }
            })
            .map_err(spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = handle.join();
                return Err(WorkerError::Gone { name });
            }
        }
        Ok(Worker {
            name,
            jobs: Some(jobs_tx),
            done: done_rx,
            stop,
            running: false,
            handle: Some(handle),
        })
    }

    /// Runs `job` on the thread. The previous job must have been stopped.
    pub fn start(&mut self, job: Job) -> Result<(), WorkerError> {
        let name = self.name;
        let jobs = self.jobs.as_ref().ok_or(WorkerError::Gone { name })?;
        jobs.send(job).map_err(|_| WorkerError::Gone { name })?;
        self.running = true;
        Ok(())
    }

    /// Ends the running job, if any, and waits until it has.
    pub fn stop(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        if let Err(e) = self.stop.write(1) {
            tracing::error!("stopping the {} worker: {e}", self.name);
            return;
        }
        // A disconnect means the thread is gone (a job panicked): nothing left to wait for.
        let _ = self.done.recv();
        // The job is over, so nothing reads the eventfd now; a job that had ended on its own
        // left this stop unread, and the next job must not see it.
        let _ = self.stop.read();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        drop(self.jobs.take());
        if let Some(handle) = self.handle.take()
            && handle.join().is_err()
        {
            tracing::error!("the {} worker panicked", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::mpsc;

    use super::*;

    fn seccomp_of(tid: i32) -> String {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Runs `job` on a vsock worker under `seccomp`, once its thread id is known; waits for it.
    fn on_vsock_worker(seccomp: Seccomp, job: impl FnOnce() + Send + 'static) -> (i32, String) {
        let mut w = Worker::new("test-worker", ThreadKind::VsockWorker, seccomp).unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        w.start(Box::new(move |_stop| {
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            if go_rx.recv().is_ok() {
                job();
            }
        }))
        .unwrap();
        let tid = tid_rx.recv().unwrap();
        let mode = seccomp_of(tid);
        go_tx.send(()).unwrap();
        drop(w);
        (tid, mode)
    }

    const CHILD: &str = "YARD_VMM_WORKER_SECCOMP_CHILD";

    /// In the child: a vsock worker may make Unix sockets, not Internet ones.
    fn child(seccomp: Seccomp) {
        let (_, mode) = on_vsock_worker(seccomp, || {
            let mut err = std::io::stderr();
            for (name, family) in [("AF_UNIX", libc::AF_UNIX), ("AF_INET", libc::AF_INET)] {
                let _ = writeln!(err, "worker: socket({name})");
                // SAFETY: socket(2) with constant arguments; the fd is closed right away.
                let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
                let _ = writeln!(err, "worker: socket({name}) returned {}", fd >= 0);
                if fd >= 0 {
                    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
                    unsafe { libc::close(fd) };
                }
            }
        });
        let _ = writeln!(std::io::stderr(), "worker: seccomp mode {mode}; child done");
    }

    #[test]
    fn issue16_a_worker_runs_its_jobs_under_its_filter_and_a_call_outside_it_kills() {
        const NAME: &str = "devices::virtio::worker::tests::\
                            issue16_a_worker_runs_its_jobs_under_its_filter_and_a_call_outside_it_kills";
        match std::env::var(CHILD).as_deref() {
            Ok("enforce") => return child(Seccomp::Enforce),
            Ok("off") => return child(Seccomp::Off),
            _ => {}
        }
        // In this process: the worker is filtered, the thread that made it is not.
        let (tid, mode) = on_vsock_worker(Seccomp::Enforce, || {});
        assert_eq!(mode, "2", "worker {tid}");
        // SAFETY: gettid has no preconditions.
        assert_eq!(seccomp_of(unsafe { libc::gettid() }), "0");

        let run = |mode: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, mode)
                .output()
                .unwrap();
            (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (status, log) = run("off");
        assert!(status.success(), "{status:?}\n{log}");
        assert!(log.contains("socket(AF_INET) returned true"), "{log}");
        assert!(log.contains("seccomp mode 0; child done"), "{log}");

        let (status, log) = run("enforce");
        assert!(log.contains("socket(AF_UNIX) returned true"), "{log}");
        assert!(log.contains("worker: socket(AF_INET)\n"), "{log}");
        assert!(!log.contains("socket(AF_INET) returned"), "{log}");
        assert!(!log.contains("child done"), "{log}");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{log}");
    }
}
