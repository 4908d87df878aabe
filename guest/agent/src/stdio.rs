//! A process's stdio as the host sees it: output streams read by long polls, a stdin it writes
//! and closes, and a pty for terminal processes.
//!
//! The agent reads pipes and pty masters itself (non-blocking descriptors in `AsyncFd`): no copy
//! task, no buffer in the guest, so a host that stops reading stalls the writer like a full pipe
//! would. A stream is at end-of-file once its writers are gone and it is drained; a pty master
//! reports that as EIO once the last slave is closed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// A non-blocking descriptor in the tokio reactor.
#[derive(Debug)]
pub struct Fd(AsyncFd<OwnedFd>);

impl Fd {
    pub fn new(fd: OwnedFd) -> io::Result<Fd> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Fd(crate::sys::async_fd(fd)?))
    }

    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .async_io(Interest::READABLE, |fd| {
                rustix::io::read(fd, &mut *buf).map_err(io::Error::from)
            })
            .await
    }

    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .async_io(Interest::WRITABLE, |fd| {
                rustix::io::write(fd, buf).map_err(io::Error::from)
            })
            .await
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }
}

impl AsFd for Fd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

/// One output stream. `None` once at end-of-file (or for a stream that does not exist, such as
/// stderr of a terminal process).
pub struct Output {
    fd: tokio::sync::Mutex<Option<Arc<Fd>>>,
}

impl Output {
    fn new(fd: Option<Arc<Fd>>) -> Output {
        Output {
            fd: tokio::sync::Mutex::new(fd),
        }
    }

    /// Up to `len` bytes as soon as there are some; empty with `true` at end-of-file.
    pub async fn read(&self, len: usize) -> Result<(Vec<u8>, bool)> {
        let mut slot = self.fd.lock().await;
        let Some(fd) = slot.as_ref() else {
            return Ok((Vec::new(), true));
        };
        let mut buf = vec![0u8; len.clamp(1, MAX_READ)];
        match fd.read(&mut buf).await {
            Ok(0) => {
                *slot = None;
                Ok((Vec::new(), true))
            }
            Ok(n) => {
                buf.truncate(n);
                Ok((buf, false))
            }
            // A pty master whose slave side is closed everywhere.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                *slot = None;
                Ok((Vec::new(), true))
            }
            Err(e) => Err(Error::io("read output")(e)),
        }
    }
}

/// The largest read the agent does for one request (ttrpc messages are limited to 4 MiB).
pub const MAX_READ: usize = 1 << 20;

/// The host's side of a process's stdio, once it exists.
pub struct Io {
    pub stdout: Output,
    pub stderr: Output,
    stdin: Mutex<Option<Arc<Fd>>>,
    /// Serialises writers, so two WriteStdin calls do not interleave.
    write_lock: tokio::sync::Mutex<()>,
    pty: Option<Arc<Fd>>,
}

impl Io {
    /// Pipes: stdout, stderr and (maybe) stdin read/written by the host.
    pub fn pipes(stdout: Fd, stderr: Fd, stdin: Option<Fd>) -> Io {
        Io {
            stdout: Output::new(Some(Arc::new(stdout))),
            stderr: Output::new(Some(Arc::new(stderr))),
            stdin: Mutex::new(stdin.map(Arc::new)),
            write_lock: tokio::sync::Mutex::new(()),
            pty: None,
        }
    }

    /// A terminal: the pty master is stdout and stdin; there is no stderr.
    pub fn pty(master: Fd) -> Io {
        let master = Arc::new(master);
        Io {
            stdout: Output::new(Some(master.clone())),
            stderr: Output::new(None),
            stdin: Mutex::new(Some(master.clone())),
            write_lock: tokio::sync::Mutex::new(()),
            pty: Some(master),
        }
    }

    /// Streams that are at end-of-file (a process that never started).
    pub fn closed() -> Io {
        Io {
            stdout: Output::new(None),
            stderr: Output::new(None),
            stdin: Mutex::new(None),
            write_lock: tokio::sync::Mutex::new(()),
            pty: None,
        }
    }

    fn stdin(&self) -> MutexGuard<'_, Option<Arc<Fd>>> {
        self.stdin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes all of `data`, waiting for room.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let _serial = self.write_lock.lock().await;
        let Some(fd) = self.stdin().clone() else {
            return Err(Error::FailedPrecondition(
                "stdin is closed or was not requested".into(),
            ));
        };
        match fd.write_all(data).await {
            Ok(()) => Ok(data.len()),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => Err(Error::FailedPrecondition(
                "stdin: the process closed its end".into(),
            )),
            Err(e) => Err(Error::io("write stdin")(e)),
        }
    }

    /// Closes stdin: the pipe's write end, or ^D on a terminal (as a shell's user would type).
    pub async fn close_stdin(&self) {
        let taken = self.stdin().take();
        if taken.is_some()
            && let Some(pty) = &self.pty
        {
            let _serial = self.write_lock.lock().await;
            let _ = pty.write_all(&[4]).await;
        }
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(pty) = &self.pty else {
            return Err(Error::FailedPrecondition("process has no terminal".into()));
        };
        let size = rustix::termios::Winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(pty.as_fd(), size).map_err(Error::errno("resize pty"))
    }
}

/// The process's side of its pipes, handed to the runtime.
#[derive(Debug)]
pub struct ChildPipes {
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Pipes for a non-terminal process: the host's ends (non-blocking) and the process's ends.
pub fn pipes(with_stdin: bool) -> Result<(Io, ChildPipes)> {
    let pipe =
        || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(Error::errno("pipe"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (stdin_host, stdin_child) = if with_stdin {
        let (r, w) = pipe()?;
        (Some(Fd::new(w).map_err(Error::io("stdin pipe"))?), Some(r))
    } else {
        (None, None)
    };
    let io = Io::pipes(
        Fd::new(out_r).map_err(Error::io("stdout pipe"))?,
        Fd::new(err_r).map_err(Error::io("stderr pipe"))?,
        stdin_host,
    );
    Ok((
        io,
        ChildPipes {
            stdin: stdin_child,
            stdout: out_w,
            stderr: err_w,
        },
    ))
}

/// A process's stdio slot: empty until its streams exist (a terminal exec gets its pty when it
/// starts), so long polls that come early wait.
pub struct Slot(watch::Sender<Option<Arc<Io>>>);

impl Default for Slot {
    fn default() -> Self {
        Slot(watch::channel(None).0)
    }
}

impl Slot {
    pub fn set(&self, io: Io) {
        self.set_arc(Arc::new(io));
    }

    pub fn set_arc(&self, io: Arc<Io>) {
        self.0.send_replace(Some(io));
    }

    pub fn is_set(&self) -> bool {
        self.0.borrow().is_some()
    }

    pub async fn get(&self) -> Arc<Io> {
        let mut rx = self.0.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(io) => match io.as_ref() {
                Some(io) => io.clone(),
                None => Arc::new(Io::closed()),
            },
            // The sender lives in the process, which outlives this call.
            Err(_) => Arc::new(Io::closed()),
        }
    }

    /// The streams if they exist already.
    pub fn now(&self) -> Option<Arc<Io>> {
        self.0.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_readable_to_eof_after_the_writer_is_gone() {
        let (io, child) = pipes(true).unwrap();
        rustix::io::write(&child.stdout, b"hello").unwrap();
        drop(child);
        let (data, eof) = io.stdout.read(100).await.unwrap();
        assert_eq!((data.as_slice(), eof), (&b"hello"[..], false));
        let (data, eof) = io.stdout.read(100).await.unwrap();
        assert!(data.is_empty() && eof);
        // And stays at end-of-file.
        assert!(io.stdout.read(100).await.unwrap().1);
        assert!(io.stderr.read(100).await.unwrap().1);
    }

    #[tokio::test]
    async fn stdin_reaches_the_child_and_closes() {
        let (io, child) = pipes(true).unwrap();
        assert_eq!(io.write_stdin(b"abc").await.unwrap(), 3);
        io.close_stdin().await;
        assert!(matches!(
            io.write_stdin(b"x").await,
            Err(Error::FailedPrecondition(_))
        ));
        let stdin = child.stdin.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(rustix::io::read(&stdin, &mut buf).unwrap(), 3);
        assert_eq!(rustix::io::read(&stdin, &mut buf).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_slot_wakes_early_readers() {
        let slot = Arc::new(Slot::default());
        let reader = {
            let slot = slot.clone();
            tokio::spawn(async move { slot.get().await.stdout.read(10).await.unwrap() })
        };
        tokio::task::yield_now().await;
        slot.set(Io::closed());
        assert!(reader.await.unwrap().1);
    }
}
