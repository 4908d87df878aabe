//! The runtime zygote: a single-threaded copy of the agent, forked before the agent starts its
//! async runtime, that forks one child per runtime-mode request (create, exec) instead of the
//! agent executing itself again. Under TCG an exec of the agent costs about 23 ms before the
//! runtime does anything (the static binary's relocation and page faults, measured with a
//! no-op runtime command); a fork of the zygote, which is already relocated and small, does
//! not pay that.
//!
//! The agent sends a request as one message on a `SOCK_SEQPACKET` pair: the arguments after
//! `yard-agent`, each ended by a NUL, with four descriptors (a reply socket, then the child's
//! stdin, stdout and stderr). The child writes its pid (4 bytes) and, when runtime mode is done,
//! its exit code (4 bytes) on the reply socket; end of file without the code means it died.
//! The zygote ignores `SIGCHLD`, so the kernel collects its children; a container's init,
//! once its runtime process exits, is the agent's (PID 1), as with the exec'd runtime. The
//! zygote exits when the agent's end of the pair closes. When the zygote cannot be started or
//! has gone, the agent executes itself as before ([`crate::container`]).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::sys::signal::{SigHandler, Signal};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use tokio::io::AsyncReadExt;

use crate::sys::{self, Forked};

/// The largest request: the arguments of one runtime command, which the agent builds.
const MAX_REQUEST: usize = 64 << 10;

/// The agent's end of the zygote.
#[derive(Debug)]
pub struct Zygote {
    /// `None` once a send failed (the zygote is gone) or it was forsaken.
    sock: Mutex<Option<OwnedFd>>,
}

/// A runtime process the zygote started.
pub struct Started {
    pub pid: u32,
    reply: tokio::net::UnixStream,
}

impl Started {
    /// Its exit code; `None` when it ended without one (killed, or it crashed).
    pub async fn wait(mut self) -> Option<u32> {
        let mut code = [0u8; 4];
        self.reply.read_exact(&mut code).await.ok()?;
        Some(u32::from_le_bytes(code) & 0xff)
    }
}

/// Forks the zygote. Call it while the agent has a single thread, before anything installs a
/// global logger (runtime mode installs its own in each child). `None` when it could not be
/// started; the agent then executes itself for runtime mode.
pub fn start() -> Option<Zygote> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .ok()?;
    match sys::fork_single_threaded() {
        Ok(Forked::Child) => {
            drop(ours);
            serve(&theirs)
        }
        Ok(Forked::Parent) => Some(Zygote {
            sock: Mutex::new(Some(ours)),
        }),
        Err(_) => None,
    }
}

impl Zygote {
    /// Stops using the zygote (it started nothing in time): closing the agent's end makes it
    /// exit, and later requests go the exec way. A request still queued there forks a child
    /// that finds its reply closed and exits before runtime mode.
    pub fn forsake(&self) {
        *self.sock.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Starts `yard-agent ARGS` in a child of the zygote with copies of `stdio` (the caller
    /// closes its own). An error means nothing was started (and after a failed send the
    /// zygote is not asked again).
    pub async fn spawn(&self, args: &[String], stdio: &[OwnedFd; 3]) -> std::io::Result<Started> {
        let mut request = Vec::new();
        for a in args {
            request.extend_from_slice(a.as_bytes());
            request.push(0);
        }
        if request.len() > MAX_REQUEST {
            return Err(std::io::Error::other("runtime arguments over 64 KiB"));
        }
        let (reply, child_reply) = std::os::unix::net::UnixStream::pair()?;
        {
            let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
            let Some(sock) = guard.as_ref() else {
                return Err(std::io::ErrorKind::NotConnected.into());
            };
            let fds: [RawFd; 4] = [
                child_reply.as_raw_fd(),
                stdio[0].as_raw_fd(),
                stdio[1].as_raw_fd(),
                stdio[2].as_raw_fd(),
            ];
            // One small message on a local socket: it does not wait for the zygote.
            let sent = sendmsg::<()>(
                sock.as_raw_fd(),
                &[IoSlice::new(&request)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            );
            if let Err(e) = sent {
                // A full queue is not a dead zygote: this request alone goes another way.
                if e != nix::errno::Errno::EAGAIN {
                    *guard = None;
                }
                return Err(e.into());
            }
        }
        // The child has its own copy now: with ours closed, end of file is its exit.
        drop(child_reply);
        reply.set_nonblocking(true)?;
        let mut reply = tokio::net::UnixStream::from_std(reply)?;
        let mut pid = [0u8; 4];
        reply.read_exact(&mut pid).await?;
        Ok(Started {
            pid: u32::from_le_bytes(pid),
            reply,
        })
    }
}

/// The zygote's loop: one child per request, until the agent's end closes.
fn serve(sock: &OwnedFd) -> ! {
    // SIG_IGN makes the kernel collect the children; the agent's own handlers do not apply.
    let _ = sys::set_signal(Signal::SIGCHLD, SigHandler::SigIgn);
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (len, fds) = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                for c in msg.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        fds.extend(received.into_iter().map(sys::received_fd));
                    }
                }
                (msg.bytes, fds)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => std::process::exit(1),
        };
        if len == 0 && fds.is_empty() {
            // The agent's end closed.
            std::process::exit(0);
        }
        let Ok([reply, stdin, stdout, stderr]) = <[OwnedFd; 4]>::try_from(fds) else {
            continue;
        };
        let args: Vec<String> = buf[..len]
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Ok(Forked::Child) = sys::fork_single_threaded() {
            run(&args, reply, [stdin, stdout, stderr]);
        }
        // The parent's copies close here (or the fork failed: the agent reads end of file).
    }
}

/// A child of the zygote: runtime mode with the request's stdio, its pid and exit code on
/// `reply`. (The zygote's socket is close-on-exec: the container's process never has it.)
fn run(args: &[String], reply: OwnedFd, stdio: [OwnedFd; 3]) -> ! {
    use std::io::Write as _;
    let _ = sys::set_signal(Signal::SIGCHLD, SigHandler::SigDfl);
    let [stdin, stdout, stderr] = &stdio;
    let dup = rustix::stdio::dup2_stdin(stdin)
        .and_then(|()| rustix::stdio::dup2_stdout(stdout))
        .and_then(|()| rustix::stdio::dup2_stderr(stderr));
    if dup.is_err() {
        std::process::exit(crate::runtime::EXIT_FAILED);
    }
    drop(stdio);
    let mut reply = std::fs::File::from(reply);
    if reply.write_all(&std::process::id().to_le_bytes()).is_err() {
        std::process::exit(crate::runtime::EXIT_FAILED);
    }
    let rest = args.get(1..).unwrap_or_default();
    let code = if args.first().map(String::as_str) == Some(crate::runtime::MODE) {
        crate::runtime::main(rest)
    } else {
        crate::runtime::EXIT_INVALID
    };
    let _ = reply.write_all(&(code as u32).to_le_bytes());
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zygote that started nothing in time is not asked again, and its end of the pair sees
    /// end of file (the zygote exits on it).
    #[tokio::test]
    async fn a_forsaken_zygote_is_not_asked_again() {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let z = Zygote {
            sock: Mutex::new(Some(ours)),
        };
        z.forsake();
        let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let (args, stdio) = (["runtime".to_owned()], [null(), null(), null()]);
        let asked = z.spawn(&args, &stdio);
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), asked)
            .await
            .expect("a forsaken zygote was asked (and never answered)")
            .err()
            .expect("a forsaken zygote was asked");
        assert_eq!(err.kind(), std::io::ErrorKind::NotConnected);
        let mut buf = [0u8; 8];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let got = recvmsg::<()>(theirs.as_raw_fd(), &mut iov, None, MsgFlags::empty()).unwrap();
        assert_eq!(got.bytes, 0, "the zygote's end did not see end of file");
    }
}
