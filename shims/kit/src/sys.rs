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

/// Fork a child that closes its standard descriptors (a caller's pipes, which it must not hold
/// open; not `fd`, should it be one of them), writes `bytes` to `fd` and exits; its pid is
/// returned. `start` does not wait for it: it exits soon after, and the child is reparented.
/// For a write that may block (a cgroup migration waiting for the kernel) made on behalf of a
/// process that must not.
pub fn write_in_child(fd: OwnedFd, bytes: &'static [u8]) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    let raw = fd.as_raw_fd();
    // SAFETY: fork(2) copies the process and touches no memory of ours. The parent's `fd` is
    // closed when it is dropped here, the child's copy when the child exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: in the child, only the async-signal-safe system calls close(2), write(2) and
        // _exit(2), on descriptor numbers and static memory: no lock, no allocation, so it is
        // sound whatever threads the parent has.
        0 => unsafe {
            for std_fd in (0..3).filter(|n| *n != raw) {
                libc::close(std_fd);
            }
            libc::write(raw, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        },
        pid => Ok(pid.unsigned_abs()),
    }
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

    /// The child writes, and neither it nor the parent keeps the descriptor: the reader sees
    /// the bytes, then end of file.
    #[test]
    fn a_child_writes_for_its_parent_and_lets_go_of_the_descriptor() {
        use std::io::Read as _;
        let (r, w) = rustix::pipe::pipe().unwrap_or_else(|e| panic!("{e}"));
        let pid = write_in_child(w, b"0").unwrap_or_else(|e| panic!("{e}"));
        let mut got = String::new();
        std::fs::File::from(r)
            .read_to_string(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, "0");
        let pid = rustix::process::Pid::from_raw(pid.try_into().unwrap_or(-1));
        let status = rustix::process::waitpid(pid, rustix::process::WaitOptions::empty())
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|(_, s)| s.exit_status());
        assert_eq!(status, Some(Some(0)));
    }
}
