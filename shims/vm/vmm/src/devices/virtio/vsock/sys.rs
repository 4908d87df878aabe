//! The socket call std does not offer: a non-blocking Unix `connect(2)`, which fails with
//! `EAGAIN` when the listener's backlog is full instead of stalling the device thread.
//!
//! (Writes need nothing here: std's `UnixStream` writes with `send(MSG_NOSIGNAL)` on Linux,
//! so a peer that closed is `EPIPE`, never SIGPIPE; a device test guards that.)

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connect to the Unix socket at `path` without blocking; the stream is non-blocking.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let (addr, len) = sockaddr(path)?;
    // SAFETY: socket(2) with constant arguments reads no memory of ours.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2): it is open and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, `len` is no larger
    // than its size, and `fd` is open.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        // Unix sockets never return EINPROGRESS: a full backlog is EAGAIN, which we refuse.
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let mut addr = libc::sockaddr_un {
        sun_family: libc::sa_family_t::try_from(libc::AF_UNIX)
            .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?,
        sun_path: [0; 108],
    };
    let bytes = path.as_os_str().as_bytes();
    // Room for the terminating NUL; an embedded NUL would name another socket.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or has a NUL byte",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src.cast_signed();
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"))?;
    Ok((addr, len))
}

/// Test helpers that change process or socket state.
#[cfg(test)]
pub(super) mod test_support {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;

    /// Shrink `listener`'s backlog to `backlog` (listen(2) again on a listening socket).
    pub fn set_backlog(listener: &UnixListener, backlog: i32) {
        // SAFETY: listen(2) on an fd `listener` owns and keeps open; no memory is passed.
        let rc = unsafe { libc::listen(listener.as_raw_fd(), backlog) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    }

    /// Restore SIGPIPE's default action (terminate), which the Rust runtime replaced with
    /// "ignore". Only for a child process running a single test.
    pub fn default_sigpipe() {
        // SAFETY: signal(2) with a valid signal number and SIG_DFL; no handler code is
        // installed, and the caller is a process that runs nothing else concurrently that
        // depends on the old disposition.
        let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        assert_ne!(old, libc::SIG_ERR);
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::os::unix::net::UnixListener;

    use super::test_support::set_backlog;
    use super::*;

    #[test]
    fn nonblocking_connect_refuses_a_full_backlog_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        set_backlog(&listener, 0);
        // With backlog 0 Linux queues one connection; the next would block in connect(2).
        let mut held = Vec::new();
        let err = loop {
            match connect_nonblocking(&path) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 16, "the backlog never filled");
        };
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        // Accepting makes room again.
        drop(listener.accept().unwrap());
        connect_nonblocking(&path).unwrap();
    }

    #[test]
    fn connect_to_a_missing_or_overlong_path_fails() {
        let dir = tempfile::tempdir().unwrap();
        assert!(connect_nonblocking(&dir.path().join("nobody")).is_err());
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
