//! Kernel interfaces that nix and rustix do not wrap: loop devices, network interface flags and
//! the boot-timer port; and fork, signal dispositions and received descriptors for the runtime
//! zygote.
//! Every `unsafe` block of the agent lives here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

// <linux/loop.h>
const LOOP_CTL_GET_FREE: u32 = 0x4C82;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopConfig {
    fn read_only(fd: u32, name: &str) -> LoopConfig {
        let mut file_name = [0u8; LO_NAME_SIZE];
        // Informational only (losetup -l); keep the NUL terminator.
        for (d, s) in file_name
            .iter_mut()
            .zip(name.bytes().take(LO_NAME_SIZE - 1))
        {
            *d = s;
        }
        LoopConfig {
            fd,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                lo_file_name: file_name,
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        }
    }
}

/// A loop device bound read-only to a file. It is created with autoclear: once this handle is
/// dropped, the kernel detaches the device when its last user (the mount) goes away.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    _fd: OwnedFd,
}

/// Binds a free loop device to `backing`, read-only.
pub fn attach_loop_read_only(backing: &File, name: &str) -> io::Result<LoopDevice> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let config = LoopConfig::read_only(backing.as_raw_fd() as u32, name);
    // Another process may take the free device between GET_FREE and CONFIGURE: try again.
    let mut last = io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..8 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns a number; `ctl` is an open
        // loop-control descriptor for the duration of the call.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        // SAFETY: `config` is a fully initialised `struct loop_config` that lives across the
        // call; the kernel only reads it. `dev` is an open loop device and `config.fd` an open
        // file, both borrowed for the duration of the call.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                LOOP_CONFIGURE as _,
                &config as *const LoopConfig,
            )
        };
        if r == 0 {
            return Ok(LoopDevice {
                path,
                _fd: dev.into(),
            });
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            break;
        }
    }
    Err(last)
}

/// Registers a descriptor with the tokio reactor (the caller set it non-blocking).
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that it alone closes, and its
    // `as_raw_fd()` returns that same descriptor for as long as the `AsyncFd` owns it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Writes the boot-timer magic to the built-in VMM's boot-timer port: `ioperm` for that one
/// port, one `out` instruction, and the permission dropped again.
#[cfg(target_arch = "x86_64")]
pub fn signal_boot_timer() -> io::Result<()> {
    use yard_agent_protocol::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
    let port = libc::c_ulong::from(BOOT_TIMER_PORT);
    // SAFETY: ioperm only changes this thread's I/O permission bitmap for one port.
    if unsafe { libc::ioperm(port, 1, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the port is ours to write (ioperm above granted exactly it); the instruction
    // touches no memory and clobbers no register but the ones named.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") BOOT_TIMER_PORT,
            in("al") BOOT_TIMER_MAGIC,
            options(nomem, nostack, preserves_flags)
        );
    }
    // SAFETY: as above; dropping the permission again.
    unsafe { libc::ioperm(port, 1, 0) };
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
pub fn signal_boot_timer() -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Which side of [`fork_single_threaded`] this is.
pub enum Forked {
    Child,
    Parent,
}

/// fork(2), refused unless this process has exactly one thread: the child may then run any
/// code (allocate, take locks), as a single-threaded process may.
pub fn fork_single_threaded() -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!("fork refused: {threads} threads")));
    }
    // SAFETY: the process has one thread (checked just above; only this thread could start
    // another), so no lock or allocator state is held by a thread the child would not have.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
        nix::unistd::ForkResult::Parent { .. } => Ok(Forked::Parent),
    }
}

/// Sets `sig`'s disposition to default or ignore (no handler function).
pub fn set_signal(
    sig: nix::sys::signal::Signal,
    handler: nix::sys::signal::SigHandler,
) -> nix::Result<()> {
    use nix::sys::signal::SigHandler;
    if !matches!(handler, SigHandler::SigDfl | SigHandler::SigIgn) {
        return Err(nix::errno::Errno::EINVAL);
    }
    // SAFETY: SIG_DFL and SIG_IGN run no code in this process, so no handler can break what
    // the interrupted code was doing.
    unsafe { nix::sys::signal::signal(sig, handler) }.map(|_| ())
}

/// Takes ownership of a descriptor received with `SCM_RIGHTS`.
pub fn received_fd(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: a descriptor just received with SCM_RIGHTS is new in this process: nothing else
    // owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_has_the_kernel_layout() {
        // sizeof(struct loop_info64) == 232, sizeof(struct loop_config) == 304 on every arch.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        let c = LoopConfig::read_only(7, "images/a.erofs");
        assert_eq!(c.fd, 7);
        assert_eq!(&c.info.lo_file_name[..6], b"images");
        assert_eq!(c.info.lo_flags, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR);
    }
}
