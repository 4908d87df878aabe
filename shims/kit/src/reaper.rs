//! Exit reaping. A shim is a subreaper: container processes whose parents exit are reparented
//! to it, and it must collect every child. One task owns `waitpid(-1)`; whoever starts a process
//! asks here for its exit, and for a pidfd to signal it by.
//!
//! Pids are reused. An exit reaped for pid P belongs to whichever process had P *then*; a
//! later process with P must never be handed it. So every reaped exit gets a sequence number,
//! and a starter takes a [`Mark`] before the process it starts can exist: only exits reaped
//! after the mark can be that process's. Exits nobody has asked for yet (a process that ends
//! before its starter asks, orphans nobody will ask about) are kept, bounded.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard, OnceLock};

use rustix::process::{Pid, PidfdFlags, WaitOptions, WaitStatus};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::engine::Exit;

/// How many reaped exits are remembered.
const REMEMBERED: usize = 4096;

/// A point in the reaper's history: exits reaped after it are of processes that existed after
/// it. Take one before starting a process, then [`Reaper::wait`] and [`Reaper::pidfd`] with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

#[derive(Clone, Copy)]
struct Reaped {
    seq: u64,
    exit: Exit,
}

#[derive(Default)]
struct Inner {
    /// How many exits have been reaped.
    seq: u64,
    waiters: HashMap<u32, Vec<oneshot::Sender<Exit>>>,
    /// The last exit reaped for each pid, while remembered.
    reaped: HashMap<u32, Reaped>,
    order: VecDeque<(u32, u64)>,
}

pub struct Reaper {
    inner: Mutex<Inner>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Make this process a subreaper and start collecting children. Call once, inside the runtime.
pub fn start() -> std::io::Result<&'static Reaper> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    let mut sigchld = signal(SignalKind::child())?;
    let reaper = global();
    tokio::spawn(async move {
        loop {
            reaper.reap();
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(reaper)
}

pub fn global() -> &'static Reaper {
    REAPER.get_or_init(Reaper::new)
}

/// Exit code as a shell reports it: the code, or 128 + the signal that killed it.
pub fn exit_code(status: WaitStatus) -> u32 {
    if let Some(code) = status.exit_status() {
        u32::try_from(code).unwrap_or(255)
    } else if let Some(sig) = status.terminating_signal() {
        128 + u32::try_from(sig).unwrap_or(127)
    } else {
        255
    }
}

impl Reaper {
    fn new() -> Reaper {
        Reaper {
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now, in the reaper's history.
    pub fn mark(&self) -> Mark {
        Mark(self.lock().seq)
    }

    /// Collect every exited child.
    pub fn reap(&self) {
        loop {
            // Held across waitpid: between a reap and its record nobody may look (see `pidfd`).
            let mut inner = self.lock();
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let pid = pid.as_raw_nonzero().get().unsigned_abs();
                    deliver(&mut inner, pid, Exit::now(exit_code(status)));
                }
                Ok(None) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break, // ECHILD: no children
            }
        }
    }

    /// The exit of child `pid` (a direct or reparented child of this process), started after
    /// `since`.
    pub async fn wait(&self, pid: u32, since: Mark) -> Exit {
        let rx = {
            let mut inner = self.lock();
            if let Some(r) = inner.reaped.get(&pid).filter(|r| r.seq > since.0) {
                return r.exit;
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.entry(pid).or_default().push(tx);
            rx
        };
        match rx.await {
            Ok(exit) => exit,
            // The reaper is never dropped; treat the impossible as an unknown exit.
            Err(_) => Exit::now(255),
        }
    }

    /// A pidfd for child `pid`, started after `since`, to signal it by: `None` when it has
    /// already been reaped, so the pid may be someone else's by now.
    pub fn pidfd(&self, pid: u32, since: Mark) -> Option<OwnedFd> {
        // Under the lock no reap happens: if none was recorded for `pid` since the mark, the
        // process with that pid now is still the one started after it (a child is only reaped
        // here, and its pid is not reused before it is).
        let inner = self.lock();
        if inner.reaped.get(&pid).is_some_and(|r| r.seq > since.0) {
            return None;
        }
        let raw = i32::try_from(pid).ok()?;
        rustix::process::pidfd_open(Pid::from_raw(raw)?, PidfdFlags::empty()).ok()
    }

    #[cfg(test)]
    fn deliver(&self, pid: u32, exit: Exit) {
        deliver(&mut self.lock(), pid, exit);
    }
}

fn deliver(inner: &mut Inner, pid: u32, exit: Exit) {
    inner.seq += 1;
    let seq = inner.seq;
    for w in inner.waiters.remove(&pid).unwrap_or_default() {
        let _ = w.send(exit);
    }
    inner.reaped.insert(pid, Reaped { seq, exit });
    inner.order.push_back((pid, seq));
    while inner.order.len() > REMEMBERED {
        if let Some((old, s)) = inner.order.pop_front()
            && inner.reaped.get(&old).is_some_and(|r| r.seq == s)
        {
            inner.reaped.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issue16_an_old_exit_is_never_handed_to_a_reused_pid() {
        let reaper = Reaper::new();
        // An orphan with pid 4242 exits; nobody asks about it.
        reaper.deliver(4242, Exit::now(1));
        // Later a process started by the shim gets pid 4242 again.
        let mark = reaper.mark();
        let wait = reaper.wait(4242, mark);
        tokio::pin!(wait);
        assert!(
            futures_poll_once(wait.as_mut()).await.is_none(),
            "the orphan's exit was handed to the new process"
        );
        reaper.deliver(4242, Exit::now(0));
        assert_eq!(wait.await.status, 0);
        // Its exit, reaped before the starter asked, is still its own.
        let mark = reaper.mark();
        reaper.deliver(4242, Exit::now(7));
        assert_eq!(reaper.wait(4242, mark).await.status, 7);
        // And it is remembered for a second waiter.
        assert_eq!(reaper.wait(4242, mark).await.status, 7);
        // No pidfd for a process reaped since the mark: its pid may be someone else's.
        assert!(reaper.pidfd(4242, mark).is_none());
    }

    #[tokio::test]
    async fn remembered_exits_are_bounded() {
        let reaper = Reaper::new();
        let mark = reaper.mark();
        for pid in 0..u32::try_from(REMEMBERED * 2).unwrap_or(u32::MAX) {
            reaper.deliver(100_000 + pid, Exit::now(0));
        }
        let inner = reaper.lock();
        assert_eq!(inner.reaped.len(), REMEMBERED);
        assert_eq!(inner.order.len(), REMEMBERED);
        assert!(!inner.reaped.contains_key(&100_000));
        drop(inner);
        assert!(reaper.mark() > mark);
    }

    /// Poll a future once: `Some` if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
