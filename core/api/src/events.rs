//! Known containerd event payloads: their topics and a JSON view for people and filters.

use prost::Message;
use prost_types::{Any, Timestamp};
use serde_json::{Value, json};

use crate::containerd::events as ev;
use crate::typeurl::from_any;

/// Topics containerd's task runtime publishes (and so do shims).
pub mod topics {
    pub const TASK_CREATE: &str = "/tasks/create";
    pub const TASK_START: &str = "/tasks/start";
    pub const TASK_OOM: &str = "/tasks/oom";
    pub const TASK_EXIT: &str = "/tasks/exit";
    pub const TASK_DELETE: &str = "/tasks/delete";
    pub const TASK_EXEC_ADDED: &str = "/tasks/exec-added";
    pub const TASK_EXEC_STARTED: &str = "/tasks/exec-started";
    pub const TASK_PAUSED: &str = "/tasks/paused";
    pub const TASK_RESUMED: &str = "/tasks/resumed";
    pub const TASK_CHECKPOINTED: &str = "/tasks/checkpointed";
    pub const CONTAINER_CREATE: &str = "/containers/create";
    pub const CONTAINER_UPDATE: &str = "/containers/update";
    pub const CONTAINER_DELETE: &str = "/containers/delete";
    pub const NAMESPACE_CREATE: &str = "/namespaces/create";
    pub const NAMESPACE_UPDATE: &str = "/namespaces/update";
    pub const NAMESPACE_DELETE: &str = "/namespaces/delete";
}

/// RFC 3339 text of a protobuf timestamp (empty when unset).
pub fn time(ts: &Option<Timestamp>) -> String {
    ts.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn decoded<M: Message + prost::Name + Default>(any: &Any) -> Option<M> {
    from_any::<M>(any).and_then(Result::ok)
}

/// A JSON object of the event's fields (proto field names), or `None` for an event type this
/// build does not know.
pub fn to_json(any: &Any) -> Option<Value> {
    let t = any.type_url.rsplit('/').next().unwrap_or_default();
    Some(match t {
        "containerd.events.TaskCreate" => {
            let e: ev::TaskCreate = decoded(any)?;
            let io = e.io.unwrap_or_default();
            json!({"container_id": e.container_id, "bundle": e.bundle, "pid": e.pid,
                   "checkpoint": e.checkpoint,
                   "io": {"stdin": io.stdin, "stdout": io.stdout, "stderr": io.stderr, "terminal": io.terminal}})
        }
        "containerd.events.TaskStart" => {
            let e: ev::TaskStart = decoded(any)?;
            json!({"container_id": e.container_id, "pid": e.pid})
        }
        "containerd.events.TaskExit" => {
            let e: ev::TaskExit = decoded(any)?;
            json!({"container_id": e.container_id, "id": e.id, "pid": e.pid,
                   "exit_status": e.exit_status, "exited_at": time(&e.exited_at)})
        }
        "containerd.events.TaskDelete" => {
            let e: ev::TaskDelete = decoded(any)?;
            json!({"container_id": e.container_id, "id": e.id, "pid": e.pid,
                   "exit_status": e.exit_status, "exited_at": time(&e.exited_at)})
        }
        "containerd.events.TaskOOM" => {
            let e: ev::TaskOom = decoded(any)?;
            json!({"container_id": e.container_id})
        }
        "containerd.events.TaskExecAdded" => {
            let e: ev::TaskExecAdded = decoded(any)?;
            json!({"container_id": e.container_id, "exec_id": e.exec_id})
        }
        "containerd.events.TaskExecStarted" => {
            let e: ev::TaskExecStarted = decoded(any)?;
            json!({"container_id": e.container_id, "exec_id": e.exec_id, "pid": e.pid})
        }
        "containerd.events.TaskPaused" => {
            let e: ev::TaskPaused = decoded(any)?;
            json!({"container_id": e.container_id})
        }
        "containerd.events.TaskResumed" => {
            let e: ev::TaskResumed = decoded(any)?;
            json!({"container_id": e.container_id})
        }
        "containerd.events.TaskCheckpointed" => {
            let e: ev::TaskCheckpointed = decoded(any)?;
            json!({"container_id": e.container_id, "checkpoint": e.checkpoint})
        }
        "containerd.events.ContainerCreate" => {
            let e: ev::ContainerCreate = decoded(any)?;
            json!({"id": e.id, "image": e.image,
                   "runtime": {"name": e.runtime.map(|r| r.name).unwrap_or_default()}})
        }
        "containerd.events.ContainerUpdate" => {
            let e: ev::ContainerUpdate = decoded(any)?;
            json!({"id": e.id, "image": e.image, "labels": e.labels, "snapshot_key": e.snapshot_key})
        }
        "containerd.events.ContainerDelete" => {
            let e: ev::ContainerDelete = decoded(any)?;
            json!({"id": e.id})
        }
        "containerd.events.NamespaceCreate" => {
            let e: ev::NamespaceCreate = decoded(any)?;
            json!({"name": e.name, "labels": e.labels})
        }
        "containerd.events.NamespaceUpdate" => {
            let e: ev::NamespaceUpdate = decoded(any)?;
            json!({"name": e.name, "labels": e.labels})
        }
        "containerd.events.NamespaceDelete" => {
            let e: ev::NamespaceDelete = decoded(any)?;
            json!({"name": e.name})
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::typeurl::to_any;

    #[test]
    fn task_exit_as_json() {
        let any = to_any(&ev::TaskExit {
            container_id: "t1".into(),
            id: "t1".into(),
            pid: 42,
            exit_status: 3,
            exited_at: Some(Timestamp {
                seconds: 0,
                nanos: 0,
            }),
        });
        let v = to_json(&any).unwrap();
        assert_eq!(v["container_id"], "t1");
        assert_eq!(v["exit_status"], 3);
        assert_eq!(v["exited_at"], "1970-01-01T00:00:00Z");
        assert!(to_json(&Any::default()).is_none());
    }
}
