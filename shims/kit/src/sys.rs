//! Kernel interfaces that need `unsafe` to reach, and the process-wide file mode rule. Keep
//! this module small.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use rustix::fs::Mode;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The umask of every shim process: what it creates (sockets, state, logs, images) is its
/// owner's alone. Set before anything is created.
pub const SHIM_UMASK: u32 = 0o077;

/// The umask a container's processes start with when the spec gives none: runc's default, so
/// files a workload creates look as they do under runc.
pub const WORKLOAD_UMASK: u32 = 0o022;

/// Set this process's umask to [`SHIM_UMASK`].
pub fn restrict_umask() {
    rustix::process::umask(Mode::from_raw_mode(SHIM_UMASK));
}

/// Give the child `cmd` spawns `mask` as its umask instead of the shim's.
pub fn child_umask(cmd: &mut Command, mask: u32) {
    let mode = Mode::from_raw_mode(mask);
    // SAFETY: the closure runs in the child between fork and exec. It only makes the umask(2)
    // system call, which is async-signal-safe, touches no lock and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::umask(mode);
            Ok(())
        });
    }
}

/// The descriptor a server started by `start` finds its listening socket on (containerd's Go
/// shims use the same).
pub const LISTENER_FD: RawFd = 3;

/// The listening socket `start` bound for this server, if descriptor [`LISTENER_FD`] is a
/// listening unix socket bound to `path`; it is then close-on-exec, so no process the server
/// runs inherits it. Anything else found there is left as it was. Call it first in serve mode,
/// before the process opens a file of its own.
pub fn inherited_listener(path: &Path) -> Option<UnixListener> {
    // SAFETY: fcntl(F_GETFD) on a descriptor number only reads its flags: no memory is touched,
    // and a number that is not open gives EBADF.
    if unsafe { libc::fcntl(LISTENER_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open (above). This runs before the process opens any file of its
    // own, so it is one the process inherited, and no other object here owns it. It is owned
    // from here on: kept when it is the listener, released unclosed (`into_raw_fd`) otherwise.
    let listener = UnixListener::from(unsafe { OwnedFd::from_raw_fd(LISTENER_FD) });
    let listening = rustix::net::sockopt::socket_acceptconn(&listener).unwrap_or(false);
    let bound_here = listener
        .local_addr()
        .ok()
        .is_some_and(|a| a.as_pathname() == Some(path));
    if !(listening && bound_here) {
        let _ = listener.into_raw_fd();
        return None;
    }
    // Failing cannot happen on a descriptor known to be open; serving on it is still right.
    let _ = rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC);
    Some(listener)
}

/// Register an owned, non-blocking fd (eventfd, inotify, ...) with tokio for readiness.
pub fn readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd` and keeps it open for its whole life, and
    // OwnedFd::as_raw_fd always returns that same fd, so the registration cannot outlive it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_gets_the_workload_umask() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "umask"]);
        child_umask(&mut cmd, WORKLOAD_UMASK);
        let out = cmd.output().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0022");
    }
}
