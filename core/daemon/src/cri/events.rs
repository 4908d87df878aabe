//! `GetContainerEvents`: CRI container created, started, stopped and deleted events, as
//! containerd sends them (the container's id, when, its pod's status and the statuses of the
//! pod's containers).
//!
//! Created, started and deleted come from the CRI operations themselves; stopped from the
//! daemon's event exchange (`/tasks/exit` of a CRI container's init process in `k8s.io`), so a
//! container that exits on its own is reported as one that was stopped. Subscribers share one
//! bounded broadcast channel: one that falls [`BACKLOG`] events behind loses the oldest, with a
//! warning, and never holds the daemon up or makes it buffer without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt as _;
use switchyard_api::containerd::events::{TaskExit, TaskOom};
use switchyard_api::containerd::v1::types::Status as TaskStatus;
use switchyard_api::cri::v1 as cri;
use tokio::sync::broadcast;
use tonic::codegen::BoxStream;

use super::{Cri, NAMESPACE};

/// Events a subscriber may fall behind by before it misses some.
const BACKLOG: usize = 1024;

/// The exchange's topics for task exits and OOM kills.
const TASK_EXIT: &str = switchyard_api::events::topics::TASK_EXIT;
const TASK_OOM: &str = switchyard_api::events::topics::TASK_OOM;

pub use cri::ContainerEventType as Kind;

/// Where container events fan out to `GetContainerEvents` streams.
pub struct ContainerEvents {
    tx: broadcast::Sender<cri::ContainerEventResponse>,
    /// Held by StartContainer until it has sent started, and by the exit watcher while it
    /// sends stopped: a container that exits at once is still started before it is stopped.
    order: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Containers whose stopped event was sent: once each, whether the exit watcher or
    /// StopContainer/RemoveContainer sends it first.
    stopped: Mutex<std::collections::HashSet<String>>,
}

impl Default for ContainerEvents {
    fn default() -> Self {
        ContainerEvents {
            tx: broadcast::channel(BACKLOG).0,
            order: Mutex::default(),
            stopped: Mutex::default(),
        }
    }
}

impl ContainerEvents {
    /// Holds container `id`'s events in order until the guard is dropped.
    pub async fn hold(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// The events from now on.
    pub fn subscribe(&self) -> BoxStream<cri::ContainerEventResponse> {
        let mut rx = self.tx.subscribe();
        Box::pin(async_stream::stream! {
            loop {
                match rx.recv().await {
                    Ok(e) => yield Ok(e),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "GetContainerEvents subscriber fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }
}

impl Cri {
    /// Sends container `id`'s stopped event now if its task has exited and the exit watcher
    /// has not sent it yet: StopContainer and RemoveContainer return only after it went out,
    /// so an exit whose `/tasks/exit` arrives after the container's removal is not lost.
    pub async fn stopped_event(&self, id: &str, pod_id: &str) {
        let exited = self
            .process(id)
            .await
            .is_some_and(|p| p.status == TaskStatus::Stopped as i32);
        if exited {
            let _order = self.events.hold(id).await;
            self.container_event(Kind::ContainerStoppedEvent, id, pod_id)
                .await;
        }
    }

    /// Sends a container event to `GetContainerEvents` subscribers (none: nothing is built).
    /// A deleted container's stats sample is forgotten too.
    pub async fn container_event(&self, kind: Kind, id: &str, pod_id: &str) {
        if kind == Kind::ContainerStoppedEvent
            && !self
                .events
                .stopped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned())
        {
            return;
        }
        if kind == Kind::ContainerDeletedEvent {
            self.stats.forget(&super::stats::container_key(id));
            self.events
                .order
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            self.events
                .stopped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        if self.events.tx.receiver_count() == 0 {
            return;
        }
        let pod_sandbox_status = self
            .sandboxes
            .get(pod_id)
            .ok()
            .map(|p| super::runtime::pod_status(&p));
        let mut containers_statuses = Vec::new();
        for c in self.containers.of_pod(pod_id) {
            if let Ok(st) = self.container_status(&c.id).await {
                containers_statuses.push(st);
            }
        }
        let _ = self.events.tx.send(cri::ContainerEventResponse {
            container_id: id.to_owned(),
            container_event_type: kind as i32,
            created_at: super::now_nanos(),
            pod_sandbox_status,
            containers_statuses,
        });
    }

    /// Turns exits of CRI containers' tasks into stopped events and marks OOM kills, until the
    /// daemon's CRI state is dropped. One subscription for both, so they are handled in the
    /// order the shim sent them: a kill before the exit it caused. Subscribed before this
    /// returns: no event after it is missed.
    pub(super) fn watch_exits(cri: &Arc<Cri>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Cri> = Arc::downgrade(cri);
        let exits = cri
            .shared
            .exchange
            .subscribe(crate::filters::Filter::default());
        runtime.spawn(async move {
            tokio::pin!(exits);
            while let Some(env) = exits.next().await {
                if env.namespace != NAMESPACE {
                    continue;
                }
                if env.topic == TASK_OOM {
                    let oom = env
                        .event
                        .as_ref()
                        .and_then(|e| <TaskOom as prost::Message>::decode(e.value.as_slice()).ok());
                    if let (Some(e), Some(cri)) = (oom, weak.upgrade()) {
                        tracing::info!(container = %e.container_id, "CRI container OOM-killed");
                        cri.containers.mark_oom(&e.container_id);
                    }
                    continue;
                }
                if env.topic != TASK_EXIT {
                    continue;
                }
                let Some(exit) = env
                    .event
                    .as_ref()
                    .and_then(|e| <TaskExit as prost::Message>::decode(e.value.as_slice()).ok())
                else {
                    continue;
                };
                // An exec'd process's exit is not the container's.
                if exit.id != exit.container_id {
                    continue;
                }
                let Some(cri) = weak.upgrade() else { return };
                if let Ok(r) = cri.containers.find(&exit.container_id)
                    && r.id == exit.container_id
                {
                    cri.containers.exit_handled(&r.id);
                    let _order = cri.events.hold(&r.id).await;
                    cri.container_event(Kind::ContainerStoppedEvent, &r.id, &r.pod_id)
                        .await;
                }
            }
        });
    }
}
