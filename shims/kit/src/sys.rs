//! Kernel interfaces that need `unsafe` to reach from async code. Keep this module small.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Register an owned, non-blocking fd (eventfd, inotify, ...) with tokio for readiness.
pub fn readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd` and keeps it open for its whole life, and
    // OwnedFd::as_raw_fd always returns that same fd, so the registration cannot outlive it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
