//! Event publishing to the daemon that started the shim (`TTRPC_ADDRESS`, the
//! `containerd.services.events.ttrpc.v1.Events/Forward` endpoint that containerd and switchyardd
//! both serve), queued and retried by `containerd-shim`'s `RemotePublisher`.

use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;

#[derive(Clone)]
pub struct Publisher {
    remote: Option<Arc<RemotePublisher>>,
    namespace: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("address", &self.remote.as_ref().map(|r| r.address.clone()))
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Publisher {
    /// Connect to `address`; an empty address gives a publisher that drops events (tests).
    pub async fn connect(address: &str, namespace: &str) -> crate::Result<Publisher> {
        let remote = if address.is_empty() {
            None
        } else {
            Some(Arc::new(RemotePublisher::new(address).await.map_err(
                |e| crate::Error::Internal(format!("connect to event address {address}: {e}")),
            )?))
        };
        Ok(Publisher {
            remote,
            namespace: namespace.to_owned(),
        })
    }

    /// A publisher that drops everything.
    pub fn none(namespace: &str) -> Publisher {
        Publisher {
            remote: None,
            namespace: namespace.to_owned(),
        }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(remote) = &self.remote else { return };
        if let Err(e) = remote
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "publish event");
        }
    }

    pub async fn oom(&self, container_id: &str) {
        let ev = TaskOOM {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
            .await;
    }
}
