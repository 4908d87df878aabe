//! OOM reports from the guest, turned into `/tasks/oom` events.
//!
//! Two paths ask: the agent's `WaitOom` long poll, and a process's exit with 137, which must
//! not be reported before its OOM (the agent polls `memory.events`, so the exit can come
//! first, and a delete right after it would lose the OOM with the VM). Both are untrusted
//! input: a report is taken only for one of the sandbox's own containers (a guest naming
//! another sandbox's container must not reach containerd's view of it), the per-container
//! count is dropped when the container is, and the `WaitOom` loop takes at most one report per
//! [`REPORT_INTERVAL`], so a guest answering it in a tight loop neither spins the shim nor
//! floods containerd (the agent waits with its next report meanwhile).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use yard_shim_kit::Publisher;

use crate::agent::{Agent, bounded};

/// The `WaitOom` loop's pace: at most ten reports a second per sandbox. A container being
/// OOM-killed in a loop still gets its events (they are per count, and coalesce).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);

pub struct OomReporter {
    agent: Agent,
    events: Publisher,
    /// The sandbox's containers → the OOM kills already published for each.
    published: Mutex<HashMap<String, u64>>,
    /// Reports naming no container of the sandbox.
    foreign: AtomicU64,
}

impl OomReporter {
    pub fn new(agent: Agent, events: Publisher) -> OomReporter {
        OomReporter {
            agent,
            events,
            published: Mutex::new(HashMap::new()),
            foreign: AtomicU64::new(0),
        }
    }

    fn published(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `id` is one of the sandbox's containers from now on.
    pub fn add(&self, id: &str) {
        self.published().entry(id.to_owned()).or_insert(0);
    }

    /// `id` is gone: reports about it are foreign from now on.
    pub fn remove(&self, id: &str) {
        self.published().remove(id);
    }

    pub fn tracked(&self) -> usize {
        self.published().len()
    }

    /// Publishes an OOM event for `id` if the guest counted a kill not yet published.
    pub async fn report(&self, id: &str) {
        if !self.published().contains_key(id) {
            let n = self.foreign.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8, ...: a flood cannot fill the log.
            if n.is_power_of_two() {
                tracing::warn!(
                    container_id = %bounded(id),
                    reports = n,
                    "the guest reported an OOM kill in a container that is not the sandbox's; \
                     ignored"
                );
            }
            return;
        }
        let Ok(stats) = self.agent.stats(id).await else {
            return;
        };
        let new = {
            let mut p = self.published();
            // Removed while the agent answered.
            let Some(seen) = p.get_mut(id) else {
                return;
            };
            let new = stats.oom_kills > *seen;
            *seen = (*seen).max(stats.oom_kills);
            new
        };
        if new {
            self.events.oom(id);
        }
    }

    /// The `WaitOom` loop, until the channel fails (the VM is gone).
    pub async fn watch(&self) {
        let mut next = tokio::time::Instant::now();
        while let Ok(id) = self.agent.wait_oom().await {
            tokio::time::sleep_until(next).await;
            next = tokio::time::Instant::now() + REPORT_INTERVAL;
            self.report(&id).await;
        }
    }
}
