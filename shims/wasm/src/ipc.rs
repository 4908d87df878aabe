//! The channel between the shim (the privileged parent) and its worker (the unprivileged
//! process that runs guests): length-prefixed JSON frames on a unix stream socket, with file
//! descriptors (stdio, a task's root, an HTTP listener, a compiled artifact) riding on a
//! frame's first bytes as `SCM_RIGHTS`.
//!
//! The parent trusts nothing the worker says: every frame it reads is bounded, and a malformed
//! one ends the worker.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use yard_shim_kit::Error;

use crate::config::TaskSettings;

/// Largest frame the worker accepts (a task's args and environment ride in one).
pub const MAX_REQUEST: usize = 4 << 20;
/// Largest frame the parent accepts from the worker: replies and events are small.
pub const MAX_EVENT: usize = 64 << 10;
/// File descriptors one frame may carry.
pub const MAX_FDS: usize = 4;

/// What the parent asks of the worker; each gets one [`Reply`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Load a compiled artifact (fd: a memfd holding it) under its module digest.
    Load {
        digest: String,
        component: bool,
        what: String,
    },
    /// A new task from a loaded artifact (fds: its root, stdin, stdout, stderr).
    Create {
        task: String,
        digest: String,
        guest: Box<GuestSpec>,
    },
    /// Run it (fd: the listening socket, for an HTTP component).
    Start {
        task: String,
    },
    Kill {
        task: String,
        signal: u32,
    },
    Pause {
        task: String,
    },
    Resume {
        task: String,
    },
    /// A new linear memory limit in bytes (0: none).
    Update {
        task: String,
        memory_limit: u64,
    },
    Stats {
        task: String,
    },
    /// Forget the task (killing it first if it still runs).
    Delete {
        task: String,
    },
}

/// What the guest gets besides its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestSpec {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub readonly: bool,
    pub settings: TaskSettings,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub msg: ToWorker,
}

/// What a loaded artifact turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Loaded {
    Module,
    Command,
    Http,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Done,
    Loaded(Loaded),
    Stats { used: u64, limit: u64 },
}

/// An error crossing the channel, with the kind the kit maps to a ttrpc code.
#[derive(Debug, Serialize, Deserialize)]
pub enum Failure {
    InvalidArgument(String),
    FailedPrecondition(String),
    NotFound(String),
    Internal(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let m = e.to_string();
        match e {
            Error::InvalidArgument(_) => Failure::InvalidArgument(m),
            Error::FailedPrecondition(_) => Failure::FailedPrecondition(m),
            Error::NotFound(_) => Failure::NotFound(m),
            _ => Failure::Internal(m),
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::InvalidArgument(m) => Error::InvalidArgument(m),
            Failure::FailedPrecondition(m) => Error::FailedPrecondition(m),
            Failure::NotFound(m) => Error::NotFound(m),
            Failure::Internal(m) => Error::Internal(m),
        }
    }
}

/// What the worker tells the parent.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    Reply {
        id: u64,
        result: Result<Answer, Failure>,
    },
    /// The task's guest ended with this status (its stdio already closed).
    Exited { task: String, status: u32 },
    /// The task's guest was stopped by its memory limit.
    Oom { task: String },
}

/// One received frame.
pub struct Frame {
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Not every descriptor sent with it is here: the kernel could not install them all (the
    /// receiver's open-file limit reached: `MSG_CTRUNC`), or the sender sent more than
    /// [`MAX_FDS`] (the rest are closed). `fds` holds at most [`MAX_FDS`] that arrived; the
    /// body is whole.
    pub truncated: bool,
}

/// A failure of the channel itself.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("wasm worker channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("wasm worker channel: a frame of {size} bytes is over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("wasm worker channel: more than {MAX_FDS} file descriptors in one frame")]
    TooManyFds,
    #[error("wasm worker channel: malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Send one frame: a 4-byte little-endian length, the body, `fds` riding on the first bytes.
/// `fd` must be a blocking socket (a send timeout bounds a peer that stops reading).
pub fn send(fd: BorrowedFd<'_>, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
    if fds.len() > MAX_FDS {
        return Err(ChannelError::TooManyFds);
    }
    let len = u32::try_from(body.len()).map_err(|_| ChannelError::TooLarge {
        size: body.len(),
        max: u32::MAX as usize,
    })?;
    let header = len.to_le_bytes();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(ChannelError::TooManyFds);
    }
    let total = header.len() + body.len();
    let mut sent = loop {
        match rustix::net::sendmsg(
            fd,
            &[IoSlice::new(&header), IoSlice::new(body)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    };
    // The rest of a large frame, without descriptors.
    while sent < total {
        let rest: Vec<IoSlice<'_>> = if sent < header.len() {
            vec![IoSlice::new(&header[sent..]), IoSlice::new(body)]
        } else {
            vec![IoSlice::new(&body[sent - header.len()..])]
        };
        match rustix::net::sendmsg(
            fd,
            &rest,
            &mut SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    }
    Ok(())
}

/// Receive one frame of at most `max` bytes; `None` at end of stream between frames. A frame
/// whose descriptors did not all arrive is still read whole (the stream stays in step), and
/// says so in [`Frame::truncated`].
pub fn recv(fd: BorrowedFd<'_>, max: usize) -> Result<Option<Frame>, ChannelError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    let mut fds = Vec::new();
    let mut truncated = false;
    while got < header.len() {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let r = match rustix::net::recvmsg(
            fd,
            &mut [IoSliceMut::new(&mut header[got..])],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        };
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        // More than a frame carries: the extra ones are closed.
        truncated |= r.flags.contains(rustix::net::ReturnFlags::CTRUNC) || fds.len() > MAX_FDS;
        fds.truncate(MAX_FDS);
        if r.bytes == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += r.bytes;
    }
    let size = u32::from_le_bytes(header) as usize;
    if size > max {
        return Err(ChannelError::TooLarge { size, max });
    }
    let mut body = vec![0u8; size];
    let mut got = 0;
    while got < size {
        match rustix::io::read(fd, &mut body[got..]) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    }
    Ok(Some(Frame {
        body,
        fds,
        truncated,
    }))
}

/// Serialize and send `msg`.
pub fn send_json<T: Serialize>(
    fd: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    let body = serde_json::to_vec(msg)?;
    send(fd, &body, fds)
}

/// A connected pair: the parent's end (blocking, with a send timeout so a worker that stops
/// reading cannot hold the shim) and the worker's.
pub fn pair(send_timeout: Duration) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_timeout(
        &a,
        rustix::net::sockopt::Timeout::Send,
        Some(send_timeout),
    )?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn frames_carry_bodies_and_descriptors() {
        let (a, b) = pair(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
        let mut file = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        file.write_all(b"through the socket")
            .unwrap_or_else(|e| panic!("{e}"));
        let big = vec![7u8; 1 << 20];
        send(a.as_fd(), b"small", &[file.as_fd()]).unwrap_or_else(|e| panic!("{e}"));
        // A frame larger than the socket buffer needs a reader while it is sent.
        let writer = std::thread::spawn({
            let big = big.clone();
            move || {
                send(a.as_fd(), &big, &[]).unwrap_or_else(|e| panic!("{e}"));
                send(a.as_fd(), b"after", &[]).unwrap_or_else(|e| panic!("{e}"));
                a
            }
        });
        let f = recv(b.as_fd(), MAX_REQUEST)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("eof"));
        assert_eq!(f.body, b"small");
        assert_eq!(f.fds.len(), 1);
        let mut got = std::fs::File::from(f.fds.into_iter().next().unwrap_or_else(|| panic!()));
        let mut s = String::new();
        got.rewind().unwrap_or_else(|e| panic!("{e}"));
        got.read_to_string(&mut s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s, "through the socket");
        let f = recv(b.as_fd(), MAX_REQUEST)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("eof"));
        assert_eq!(f.body, big);
        assert!(f.fds.is_empty());
        let f = recv(b.as_fd(), MAX_REQUEST)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("eof"));
        assert_eq!(f.body, b"after");
        drop(writer.join());
        assert!(matches!(recv(b.as_fd(), MAX_REQUEST), Ok(None)));
    }

    /// Descriptors that do not all arrive as sent (here: more than a frame carries; in a worker
    /// at its open-file limit, those the kernel could not install) mark the frame truncated,
    /// and the frame and the next one still read whole.
    #[test]
    fn a_frame_whose_descriptors_did_not_all_arrive_says_so() {
        let (a, b) = pair(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
        let files: Vec<std::fs::File> = (0..=MAX_FDS)
            .map(|_| tempfile::tempfile().unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        assert!(cmsg.push(SendAncillaryMessage::ScmRights(&fds)));
        let body = b"five";
        let header = (body.len() as u32).to_le_bytes();
        rustix::net::sendmsg(
            &a,
            &[IoSlice::new(&header), IoSlice::new(body)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        send(a.as_fd(), b"next", &[files[0].as_fd()]).unwrap_or_else(|e| panic!("{e}"));
        let f = recv(b.as_fd(), MAX_REQUEST)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("eof"));
        assert_eq!(f.body, body);
        assert!(f.truncated);
        assert!(f.fds.len() <= MAX_FDS);
        let f = recv(b.as_fd(), MAX_REQUEST)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("eof"));
        assert_eq!(
            (f.body.as_slice(), f.fds.len(), f.truncated),
            (&b"next"[..], 1, false)
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let (a, b) = pair(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
        send(a.as_fd(), &[1u8; 100], &[]).unwrap_or_else(|e| panic!("{e}"));
        let e = recv(b.as_fd(), 10).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("100 bytes is over the limit of 10")),
            "{e:?}"
        );
    }
}
