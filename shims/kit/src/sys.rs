//! Kernel interfaces that need `unsafe` to reach, and the process-wide file mode rule. Keep
//! this module small.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
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
