//! Kernel interfaces that need `unsafe` to reach from async code. Keep this module small.

/// pidfds: waiting for a process that is not our child.
pub mod pidfd {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    /// A pidfd registered with the async runtime.
    pub struct PidFd(AsyncFd<OwnedFd>);

    impl PidFd {
        /// Opens a pidfd for `pid`; fails with ESRCH when the process is already gone.
        pub fn open(pid: u32) -> io::Result<PidFd> {
            let pid = i32::try_from(pid)
                .ok()
                .and_then(Pid::from_raw)
                .ok_or_else(|| io::Error::from_raw_os_error(libc_esrch()))?;
            let fd = pidfd_open(pid, PidfdFlags::empty())?;
            // SAFETY: `fd` is an open pidfd owned by the OwnedFd we hand over; AsyncFd keeps
            // it for its whole life and OwnedFd::as_raw_fd always returns that same fd.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
            Ok(PidFd(fd))
        }

        /// Resolves when the process exits (a pidfd turns readable then).
        pub async fn exited(&self) {
            let _ = self.0.readable().await;
        }
    }

    fn libc_esrch() -> i32 {
        rustix::io::Errno::SRCH.raw_os_error()
    }
}

/// Process creation.
pub mod spawn {
    use std::sync::OnceLock;

    use rustix::fs::Mode;
    use rustix::process::{Resource, Rlimit, setrlimit};

    /// The daemon's soft `RLIMIT_NOFILE` before [`raise_nofile_limit`] raised it.
    static ORIGINAL_NOFILE: OnceLock<Rlimit> = OnceLock::new();

    /// Raises the daemon's soft `RLIMIT_NOFILE` to its hard limit
    /// ([`switchyard_base::limits::raise_nofile_limit`]), as the Go runtime does for containerd
    /// at start: the daemon holds descriptors for every CRI container's output (`cri/logs.rs`)
    /// and every shim connection. Shims get the original back ([`child_nofile`]), as Go's
    /// `os/exec` gives containerd's shims theirs.
    pub fn raise_nofile_limit() {
        match switchyard_base::limits::raise_nofile_limit() {
            Ok(Some(before)) => {
                let _ = ORIGINAL_NOFILE.set(before);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
        }
    }

    /// Give the child `cmd` spawns the soft `RLIMIT_NOFILE` the daemon started with (nothing
    /// to do when [`raise_nofile_limit`] did not raise it).
    pub fn child_nofile(cmd: &mut tokio::process::Command) {
        let Some(&original) = ORIGINAL_NOFILE.get() else {
            return;
        };
        // SAFETY: the closure runs in the child between fork and exec. It only makes the
        // prlimit64(2) system call (rustix's setrlimit, with the limit copied in before the
        // fork), which is async-signal-safe, touches no lock and allocates nothing.
        unsafe {
            cmd.pre_exec(move || setrlimit(Resource::Nofile, original).map_err(Into::into));
        }
    }

    /// The umask shims start with: what containerd's shims inherit from a containerd that
    /// systemd started. The daemon's own is 077, and a shim that does not set one for its
    /// workloads (containerd's runc shim, a real Kata's) passes it on to every container.
    pub const SHIM_UMASK: u32 = 0o022;

    /// Give the child `cmd` spawns `mask` as its umask instead of the daemon's.
    pub fn child_umask(cmd: &mut tokio::process::Command, mask: u32) {
        let mode = Mode::from_raw_mode(mask);
        // SAFETY: the closure runs in the child between fork and exec. It only makes the
        // umask(2) system call, which is async-signal-safe, touches no lock and allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::umask(mode);
                Ok(())
            });
        }
    }
}
