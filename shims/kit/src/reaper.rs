//! Exit reaping. A shim is a subreaper: container processes whose parents exit are reparented
//! to it, and it must collect every child. One task owns `waitpid(-1)`; whoever starts a process
//! asks here for its exit. An exit that nobody has asked for yet is kept (bounded), so a process
//! that ends before its starter asks is not lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use rustix::process::{WaitOptions, WaitStatus};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::engine::Exit;

/// How many unclaimed exits are remembered (orphans nobody will ask about end up here).
const UNCLAIMED: usize = 1024;

#[derive(Default)]
struct Inner {
    waiters: HashMap<u32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<u32, Exit>,
    order: VecDeque<u32>,
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
    REAPER.get_or_init(|| Reaper {
        inner: Mutex::new(Inner::default()),
    })
}

/// Exit code as a shell reports it: the code, or 128 + the signal that killed it.
pub fn exit_code(status: WaitStatus) -> u32 {
    if let Some(code) = status.exit_status() {
        code as u32
    } else if let Some(sig) = status.terminating_signal() {
        128 + sig as u32
    } else {
        255
    }
}

impl Reaper {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Collect every exited child.
    pub fn reap(&self) {
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let exit = Exit::now(exit_code(status));
                    self.deliver(pid.as_raw_nonzero().get() as u32, exit);
                }
                Ok(None) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break, // ECHILD: no children
            }
        }
    }

    fn deliver(&self, pid: u32, exit: Exit) {
        let mut inner = self.lock();
        match inner.waiters.remove(&pid) {
            Some(waiters) => {
                for w in waiters {
                    let _ = w.send(exit);
                }
            }
            None => {
                if inner.unclaimed.insert(pid, exit).is_none() {
                    inner.order.push_back(pid);
                }
                while inner.order.len() > UNCLAIMED {
                    if let Some(old) = inner.order.pop_front() {
                        inner.unclaimed.remove(&old);
                    }
                }
            }
        }
    }

    /// The exit of child `pid` (a direct or reparented child of this process).
    pub async fn wait(&self, pid: u32) -> Exit {
        let rx = {
            let mut inner = self.lock();
            if let Some(exit) = inner.unclaimed.remove(&pid) {
                inner.order.retain(|p| *p != pid);
                return exit;
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.entry(pid).or_default().push(tx);
            rx
        };
        // A child exiting between the last SIGCHLD and the registration is picked up here.
        self.reap();
        match rx.await {
            Ok(exit) => exit,
            // The reaper is never dropped; treat the impossible as an unknown exit.
            Err(_) => Exit::now(255),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reaper, not the std handle, waits for these children: that is what is tested.
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn collects_exit_codes_and_signals_even_when_asked_late() {
        let reaper = start().unwrap();
        let ok = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let killed = std::process::Command::new("/bin/sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(reaper.wait(ok.id()).await.status, 7);
        assert_eq!(reaper.wait(killed.id()).await.status, 137);
    }
}
