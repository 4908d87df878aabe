//! The tap calls std does not offer: `O_NONBLOCK` on a descriptor we were handed, and
//! `TUNSETOFFLOAD`. (Opening the tap, `TUNSETIFF` and `TUNSETVNETHDRSZ`, is the caller's; the
//! tests' version is in [`test_support`].)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets `O_NONBLOCK` on `fd` (shared by every descriptor of its open file).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) on a descriptor `fd` borrows, so it is open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an int argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETOFFLOAD`: which offloaded frames (`TUN_F_*`) the tap may hand us.
pub(crate) fn set_offload(tap: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long), reads no memory of
    // ours; `tap` is open for the call's duration. On a descriptor that is not a tap the
    // kernel answers ENOTTY/EBADFD.
    let rc = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the tests need to stand in for the caller: a frame-preserving socket pair, a real tap
/// in a network namespace of their own.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A connected `AF_UNIX` `SOCK_SEQPACKET` pair: each write is read as one whole frame, as
    /// from a tap.
    pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two descriptors into `fds`, which has room for them.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both were just returned by socketpair(2) and nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Moves the calling thread into a fresh network namespace (root only).
    pub fn unshare_net() -> io::Result<()> {
        // SAFETY: unshare(2) with a constant flag; it changes only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        assert!(name.len() < req.ifr_name.len());
        for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src.cast_signed();
        }
        req
    }

    /// Opens tap `name` as the shim does: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
    /// vnet header.
    pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
        // SAFETY: open(2) with a NUL-terminated path and constant flags.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(name);
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        req.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).unwrap();
        // SAFETY: TUNSETIFF reads and writes the ifreq `req` points to, which lives across the
        // call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads the int `size` points to.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw const size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Brings interface `name` up (`SIOCSIFFLAGS` with `IFF_UP`).
    pub fn set_up(name: &str) -> io::Result<()> {
        // SAFETY: socket(2) with constant arguments.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` was just returned by socket(2) and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = ifreq(name);
        // SAFETY: SIOCGIFFLAGS fills the ifreq `req` points to, which lives across the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS set the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::c_short::try_from(libc::IFF_UP).unwrap();
        // SAFETY: SIOCSIFFLAGS reads the ifreq `req` points to.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `frame` (an Ethernet frame) out of interface `name` through an `AF_PACKET`
    /// socket: what a tap's reader then receives.
    pub fn send_on(name: &str, frame: &[u8]) -> io::Result<()> {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name, which lives across the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) with constant arguments.
        let sock = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` was just returned by socket(2) and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_ifindex = i32::try_from(index).unwrap();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the lengths given and outlive the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast::<libc::sockaddr>(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Interface `name`'s received packets (`/proc/thread-self/net/dev`: this thread's
    /// network namespace).
    pub fn rx_packets(name: &str) -> u64 {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        dev.lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{name}:")))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .map_or(0, |n| n.parse().unwrap())
    }
}
