//! The kernel interfaces this crate uses beyond std: pidfds for the VMM process, the child-side
//! setup of a VMM (parent-death signal), `flock`, and the pod network's tap. The crate's only
//! `unsafe` is here.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, getppid, pidfd_open, pidfd_send_signal,
    set_parent_process_death_signal,
};

use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdRegisterError};

use crate::hypervisor::VmmExit;

/// Make the child die (SIGKILL) when the thread that spawned it exits, even when the shim is
/// SIGKILLed, and refuse to start it when that happened before the signal was armed.
///
/// `PR_SET_PDEATHSIG` is tied to the parent *thread*: spawn from a thread that lives as long as
/// the child.
pub fn kill_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes two raw syscalls
    // (prctl, getppid) through rustix, which are async-signal-safe, and builds an `io::Error`
    // from an errno, which does not allocate: no allocation, no locks. It captures a `Pid` (a
    // plain integer) by value.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // The parent may have exited between fork and prctl: then nobody would kill us.
            if getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// A process file descriptor: signals and waits that cannot hit a recycled pid.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

impl PidFd {
    /// Open the pidfd of our child `pid`. It cannot have been recycled yet: nobody has reaped it
    /// (a subreaper's `waitpid(-1)` racing with this would need the child to have exited already,
    /// which this call then reports as `ESRCH`).
    pub fn open(pid: u32) -> io::Result<PidFd> {
        let raw = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let p = Pid::from_raw(raw).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fd = pidfd_open(p, PidfdFlags::empty())?;
        Ok(PidFd { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn try_clone(&self) -> io::Result<PidFd> {
        Ok(PidFd {
            fd: self.fd.try_clone()?,
            pid: self.pid,
        })
    }

    /// Send `SIGKILL`; a process that already exited is not an error.
    pub fn kill(&self) -> io::Result<()> {
        self.signal(Signal::KILL)
    }

    /// Send `SIGTERM`; a process that already exited is not an error.
    pub fn terminate(&self) -> io::Result<()> {
        self.signal(Signal::TERM)
    }

    fn signal(&self, sig: Signal) -> io::Result<()> {
        match pidfd_send_signal(&self.fd, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Collect the exit if the process has exited: `None` while it runs; `Some(Unknown)` when
    /// someone else (a subreaper's `waitpid(-1)`) collected it first.
    pub fn try_reap(&self) -> Option<VmmExit> {
        self.reap(WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
    }

    /// Wait for the process to exit and collect it (blocking).
    pub fn reap_blocking(&self) -> VmmExit {
        self.reap(WaitIdOptions::EXITED).unwrap_or(VmmExit::Unknown)
    }

    fn reap(&self, options: WaitIdOptions) -> Option<VmmExit> {
        loop {
            return match rustix::process::waitid(WaitId::PidFd(self.fd.as_fd()), options) {
                Ok(Some(status)) => Some(if let Some(code) = status.exit_status() {
                    VmmExit::Code(code)
                } else if let Some(sig) = status.terminating_signal() {
                    VmmExit::Signal(sig)
                } else {
                    VmmExit::Unknown
                }),
                Ok(None) => None,
                Err(rustix::io::Errno::INTR) => continue,
                // ECHILD: reaped elsewhere.
                Err(_) => Some(VmmExit::Unknown),
            };
        }
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Register `pidfd` with the current tokio runtime: it turns readable when the process exits.
/// On failure the pidfd comes back with the error.
pub fn watch(pidfd: PidFd) -> Result<AsyncFd<PidFd>, (PidFd, io::Error)> {
    // SAFETY: a `PidFd` owns its fd (an `OwnedFd` in a private field that nothing replaces), so
    // `as_raw_fd` returns the same open fd, of the same file description, for as long as the
    // `AsyncFd` owns the `PidFd`.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(AsyncFdRegisterError::into_parts)
}

/// The host TSC's rate in kHz, measured against `CLOCK_MONOTONIC` across `sample` (an async
/// sleep: only the reads are timed tightly). `None` off x86_64.
pub async fn measure_tsc_khz(sample: std::time::Duration) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        fn read() -> (u64, std::time::Instant) {
            // SAFETY: `rdtsc` exists on every x86_64 CPU and only faults when CR4.TSD is set for
            // this process, which Linux does only after prctl(PR_SET_TSC, PR_TSC_SIGSEGV), a
            // call this program never makes. It reads a counter and touches no memory.
            let before = unsafe { core::arch::x86_64::_rdtsc() };
            let now = std::time::Instant::now();
            // SAFETY: as above.
            let after = unsafe { core::arch::x86_64::_rdtsc() };
            (before / 2 + after / 2, now)
        }
        let (c0, t0) = read();
        tokio::time::sleep(sample).await;
        let (c1, t1) = read();
        let nanos = u64::try_from(t1.duration_since(t0).as_nanos()).ok()?;
        (nanos > 0).then(|| c1.wrapping_sub(c0).saturating_mul(1_000_000) / nanos)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = sample;
        None
    }
}

/// Block until this process holds an exclusive `flock` on `file`. The lock goes with the open
/// file description: closing it, or the process dying, releases it.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Register an owned fd (an eventfd) with the current tokio runtime, for readability.
pub fn watch_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` owns its fd and nothing replaces it, so `as_raw_fd` returns the same
    // open fd for as long as the `AsyncFd` owns it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// The size of the `virtio_net_hdr_v1` before every frame on a tap ([`open_tap`]).
pub const VNET_HDR_LEN: libc::c_int = 12;

/// A tap named `name` in the calling thread's network namespace: `/dev/net/tun` attached with
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a [`VNET_HDR_LEN`]-byte header. Not persistent: the
/// device goes when the last fd of it closes. A name in use is `EBUSY`.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?}: 1 to 15 bytes, no NUL"),
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let fd = OwnedFd::from(tun);
    // SAFETY: all-zero bytes are a valid `ifreq` (a name and a union of plain integers).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the `ifreq` the pointer refers to, which lives across
    // the call; `fd` is an open /dev/net/tun.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let len: libc::c_int = VNET_HDR_LEN;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
