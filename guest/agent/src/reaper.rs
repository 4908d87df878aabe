//! PID 1 reaps every child: one SIGCHLD-driven `waitpid(-1, WNOHANG)` loop, the only waiter in
//! the agent. Exits go to whoever registered the pid; the rest (orphans re-parented to PID 1) are
//! kept a short while, because a container process can exit before the agent has read its pid
//! from the runtime's pid file, and then dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How long the exit of a pid nobody registered is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);
/// At most this many unclaimed exits are kept.
const UNCLAIMED_MAX: usize = 4096;

/// An exit status: the exit code, or 128 + N for a process killed by signal N.
pub type Status = u32;

/// Resolves when the process has exited.
pub type ExitWatch = watch::Receiver<Option<Status>>;

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, Arc<watch::Sender<Option<Status>>>>,
    unclaimed: HashMap<i32, (Status, Instant)>,
}

#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns a child while holding the routing lock, so its exit cannot be routed before it is
    /// registered.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(u32, watch::Receiver<Option<Status>>)> {
        let mut inner = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id();
        // The reaper owns waitpid: the std handle is only dropped.
        drop(child);
        let (tx, rx) = watch::channel(None);
        inner.waiting.insert(pid as i32, Arc::new(tx));
        Ok((pid, rx))
    }

    /// Registers interest in `pid` (a process that is not our child yet, or already exited).
    pub fn watch(&self, pid: u32, exit: Arc<watch::Sender<Option<Status>>>) {
        let mut inner = self.lock();
        if let Some((status, _)) = inner.unclaimed.remove(&(pid as i32)) {
            exit.send_replace(Some(status));
        } else {
            inner.waiting.insert(pid as i32, exit);
        }
    }

    /// Stops routing `pid` (its owner is gone).
    pub fn forget(&self, pid: u32) {
        self.lock().waiting.remove(&(pid as i32));
    }

    /// Reaps every child that has exited.
    pub fn reap(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code as u32 & 0xff),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as u32),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid");
                    return;
                }
            };
            self.route(pid.as_raw(), status);
        }
    }

    fn route(&self, pid: i32, status: Status) {
        let mut inner = self.lock();
        if let Some(tx) = inner.waiting.remove(&pid) {
            tracing::debug!(pid, status, "exit");
            tx.send_replace(Some(status));
            return;
        }
        let now = Instant::now();
        inner
            .unclaimed
            .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
        if inner.unclaimed.len() >= UNCLAIMED_MAX {
            return;
        }
        inner.unclaimed.insert(pid, (status, now));
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => s,
            Err(e) => {
                // Without the signal, poll: zombies must not pile up under PID 1.
                tracing::error!(error = %e, "no SIGCHLD stream; reaping by polling");
                loop {
                    self.reap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        loop {
            self.reap();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }
}

/// Waits for an exit.
pub async fn wait(mut rx: ExitWatch) -> Option<Status> {
    match rx.wait_for(Option::is_some).await {
        Ok(s) => *s,
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_before_registration_is_kept_for_the_owner() {
        let r = Reaper::default();
        r.route(4242, 137);
        let (tx, rx) = watch::channel(None);
        r.watch(4242, Arc::new(tx));
        assert_eq!(*rx.borrow(), Some(137));
    }

    #[test]
    fn a_registered_pid_gets_its_exit() {
        let r = Reaper::default();
        let (tx, rx) = watch::channel(None);
        r.watch(7, Arc::new(tx));
        r.route(8, 1);
        assert_eq!(*rx.borrow(), None);
        r.route(7, 3);
        assert_eq!(*rx.borrow(), Some(3));
    }

    #[tokio::test]
    async fn spawned_children_are_reaped() {
        let r = Arc::new(Reaper::default());
        let (_pid, rx) = r
            .spawn(std::process::Command::new("sh").args(["-c", "exit 5"]))
            .unwrap_or_else(|e| panic!("spawn sh: {e}"));
        // Not PID 1 here: poll instead of waiting for SIGCHLD.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.borrow().is_none() && Instant::now() < deadline {
            // Only reap our own child, not the test harness's.
            r.reap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*rx.borrow(), Some(5));
    }
}
