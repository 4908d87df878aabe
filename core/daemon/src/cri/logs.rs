//! A CRI container's log: the daemon reads the container's output fifos (which the shim
//! writes) and appends them to the log file kubelet named, in the CRI format
//! (`switchyard_api::cri_log::Splitter`: whole lines `F`, lines over 16 KiB cut into `P`
//! records). `ReopenContainerLog` makes the copiers continue in a new file at the same path
//! (kubelet renames the old one to rotate it).
//!
//! Attach (the streaming server's) subscribes to the same copiers: each chunk also goes to
//! every attached session of its stream, without waiting for one (a session that falls
//! behind by [`ATTACH_QUEUE`] chunks loses output, never the log). A container made with
//! `stdin` has the write end of its stdin fifo held here (opened read-write, so neither side
//! waits), which attached sessions write into.
//!
//! A copier opens its fifo without blocking and waits with `poll` for the writer's data or its
//! hang-up, so a container whose shim never opens the fifo (a failed create) does not hold a
//! thread: [`ContainerLog::stop`] wakes it.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, poll};
use switchyard_api::cri_log::{Splitter, Stream};

/// Reads at most this much at once from a fifo.
const READ_CHUNK: usize = 32 << 10;
/// Chunks queued for one attached session.
const ATTACH_QUEUE: usize = 64;

/// The attached sessions of a container's output streams.
type Attached = Arc<Mutex<Vec<(Stream, tokio::sync::mpsc::Sender<Vec<u8>>)>>>;

/// The log file and the threads filling it.
pub struct ContainerLog {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    /// Written to wake the copiers (closing it is their stop signal).
    stop: Option<OwnedFd>,
    copiers: Vec<JoinHandle<()>>,
    attached: Attached,
    /// The stdin fifo's write end, for attached sessions (gone once closed for `stdin_once`).
    stdin: HeldStdin,
}

/// The write end of a container's stdin fifo that switchyardd holds.
#[derive(Clone, Default)]
pub struct HeldStdin(Arc<Mutex<Option<File>>>);

impl HeldStdin {
    /// Lets it go: once attached sessions' copies are gone too, the process reads EOF.
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl ContainerLog {
    /// Opens the log at `path` (created 0640, appended to) and starts copying each fifo into
    /// it as its stream.
    pub fn start(
        path: &Path,
        streams: &[(Stream, PathBuf)],
        stdin: Option<&Path>,
    ) -> std::io::Result<ContainerLog> {
        let file = Arc::new(Mutex::new(open_log(path)?));
        let stdin = match stdin {
            // Read-write: the open never waits, and the process sees no EOF between sessions.
            Some(p) => Some(std::fs::OpenOptions::new().read(true).write(true).open(p)?),
            None => None,
        };
        let attached = Attached::default();
        let (stop_read, stop_write) = rustix::pipe::pipe()?;
        let stop_read = Arc::new(stop_read);
        let mut copiers = Vec::new();
        for (stream, fifo) in streams {
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(fifo)?
                .into();
            let (file, stop_read, stream) = (file.clone(), stop_read.clone(), *stream);
            let attached = attached.clone();
            let handle = std::thread::Builder::new()
                .name(format!("cri-log-{}", stream.as_str()))
                .spawn(move || copy(fd, stream, &file, &stop_read, &attached))?;
            copiers.push(handle);
        }
        Ok(ContainerLog {
            path: path.to_owned(),
            file,
            stop: Some(stop_write),
            copiers,
            attached,
            stdin: HeldStdin(Arc::new(Mutex::new(stdin))),
        })
    }

    /// The output of `stream` from now on, until the stream ends.
    pub fn attach(&self, stream: Stream) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = tokio::sync::mpsc::channel(ATTACH_QUEUE);
        self.attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stream, tx));
        rx
    }

    /// A copy of the stdin fifo's write end, if the container has stdin and it is not closed;
    /// and the held end, to close it.
    pub fn stdin(&self) -> Option<(std::io::Result<File>, HeldStdin)> {
        let held = self.stdin.0.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|f| (f.try_clone(), self.stdin.clone()))
    }

    /// Continues in a new file at the same path (ReopenContainerLog).
    pub fn reopen(&self) -> std::io::Result<()> {
        let new = open_log(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// Waits up to `drain` for the copiers to reach the end of their streams (the process and
    /// every writer gone), then stops them.
    pub fn stop(mut self, drain: Duration) {
        let deadline = Instant::now() + drain;
        while self.copiers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Closing the pipe's write end wakes every copier still waiting.
        self.stop.take();
        for h in self.copiers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for ContainerLog {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// Copies one fifo into the log until its writers have all gone or `stop` is closed.
fn copy(fifo: OwnedFd, stream: Stream, file: &Mutex<File>, stop: &OwnedFd, attached: &Attached) {
    let mut splitter = Splitter::new(stream);
    let mut buf = vec![0u8; READ_CHUNK];
    let write = |splitter: &mut Splitter, bytes: &[u8]| {
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = splitter.push(bytes, &mut *f) {
            tracing::warn!(error = %e, "write the container log");
        }
        drop(f);
        attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(s, tx)| {
                use tokio::sync::mpsc::error::TrySendError;
                *s != stream
                    || match tx.try_send(bytes.to_vec()) {
                        Ok(()) => true,
                        Err(TrySendError::Full(_)) => {
                            tracing::warn!(
                                stream = stream.as_str(),
                                "an attached session fell behind: output dropped"
                            );
                            true
                        }
                        Err(TrySendError::Closed(_)) => false,
                    }
            });
    };
    loop {
        let mut fds = [
            PollFd::new(&fifo, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
        let (fifo_ready, stopped) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if fifo_ready {
            match rustix::io::read(fifo.as_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => write(&mut splitter, &buf[..n]),
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(_) => break,
            }
        } else if stopped {
            break;
        }
    }
    // The stream ended: its attached sessions learn it.
    attached
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(s, _)| *s != stream);
    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = splitter.finish(&mut *f).and_then(|()| f.flush()) {
        tracing::warn!(error = %e, "write the container log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::Mode;

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        p
    }

    fn lines(path: &Path) -> Vec<(String, String)> {
        let f = std::io::BufReader::new(File::open(path).unwrap());
        switchyard_api::cri_log::Reader::new(f)
            .map(|l| l.map(|l| (l.stream, l.text)))
            .collect::<std::io::Result<_>>()
            .unwrap()
    }

    #[test]
    fn both_streams_reach_the_log_and_a_reopen_starts_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (fifo(dir.path(), "out"), fifo(dir.path(), "err"));
        let log_path = dir.path().join("pods/c.log");
        let log = ContainerLog::start(
            &log_path,
            &[(Stream::Stdout, out.clone()), (Stream::Stderr, err.clone())],
            None,
        )
        .unwrap();
        let mut o = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        let mut e = std::fs::OpenOptions::new().write(true).open(&err).unwrap();
        o.write_all(b"one\ntw").unwrap();
        e.write_all(b"oops\n").unwrap();
        o.write_all(b"o\n").unwrap();
        // Rotate: kubelet renames the file and asks for a reopen.
        let rotated = dir.path().join("pods/c.log.1");
        let got = |p: &Path, n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while lines(p).len() < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            lines(p)
        };
        assert_eq!(got(&log_path, 3).len(), 3);
        std::fs::rename(&log_path, &rotated).unwrap();
        log.reopen().unwrap();
        o.write_all(b"after\nlast, unfinished").unwrap();
        drop((o, e));
        log.stop(Duration::from_secs(10));
        let mut first = lines(&rotated);
        first.sort();
        assert_eq!(
            first,
            [
                ("stderr".to_owned(), "oops".to_owned()),
                ("stdout".to_owned(), "one".to_owned()),
                ("stdout".to_owned(), "two".to_owned()),
            ]
        );
        assert_eq!(
            lines(&log_path),
            [
                ("stdout".to_owned(), "after".to_owned()),
                ("stdout".to_owned(), "last, unfinished".to_owned()),
            ]
        );
    }

    /// A fifo nobody ever opens for writing (the shim failed before it did) does not keep its
    /// copier: stop ends it.
    #[test]
    fn a_fifo_never_opened_does_not_hold_a_thread() {
        let dir = tempfile::tempdir().unwrap();
        let out = fifo(dir.path(), "out");
        let log =
            ContainerLog::start(&dir.path().join("c.log"), &[(Stream::Stdout, out)], None).unwrap();
        let started = Instant::now();
        log.stop(Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
