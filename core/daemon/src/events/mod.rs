//! The event exchange: what shims forward (over ttrpc) and clients publish (over gRPC) fans out
//! to every `events.v1 Subscribe` stream whose filters match.

mod ttrpc_server;

pub use ttrpc_server::serve as serve_ttrpc;

use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use prost_types::{Any, Timestamp};
use switchyard_api::containerd::types::Envelope;
use tokio::sync::broadcast;

use crate::error::{Classify, Kind};
use crate::filters::{Adaptor, Filter};

/// Events a slow subscriber may fall behind by before it misses some.
const BACKLOG: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("invalid event topic {topic:?}: {reason}")]
    Topic { topic: String, reason: &'static str },
    #[error(transparent)]
    Namespace(#[from] crate::ident::InvalidIdent),
    #[error("event for topic {0:?} has no payload")]
    NoPayload(String),
}

impl Classify for EventError {
    fn kind(&self) -> Kind {
        Kind::InvalidArgument
    }
}

/// The fan-out point for events.
#[derive(Debug, Clone)]
pub struct Exchange {
    tx: broadcast::Sender<Arc<Envelope>>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

/// containerd's topic rule: `/` then identifier components separated by `/`.
fn validate_topic(topic: &str) -> Result<(), EventError> {
    let bad = |reason| EventError::Topic {
        topic: topic.to_owned(),
        reason,
    };
    let rest = topic
        .strip_prefix('/')
        .ok_or_else(|| bad("must start with '/'"))?;
    if rest.is_empty() {
        return Err(bad("must have a name after '/'"));
    }
    if !rest.split('/').all(crate::ident::is_valid) {
        return Err(bad("each part must be an identifier"));
    }
    Ok(())
}

impl Exchange {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        Self { tx }
    }

    /// Publishes an event the daemon itself raises.
    pub fn publish(&self, namespace: &str, topic: &str, event: Any) {
        let env = Envelope {
            timestamp: Some(Timestamp::from(SystemTime::now())),
            namespace: namespace.to_owned(),
            topic: topic.to_owned(),
            event: Some(event),
        };
        tracing::debug!(namespace, topic, "event");
        // No subscribers is not an error.
        let _ = self.tx.send(Arc::new(env));
    }

    /// Checks and publishes an event from a client or shim.
    pub fn forward(&self, mut env: Envelope) -> Result<(), EventError> {
        validate_topic(&env.topic)?;
        crate::ident::check("namespace", &env.namespace)?;
        if env.event.is_none() {
            return Err(EventError::NoPayload(env.topic));
        }
        if env.timestamp.is_none() {
            env.timestamp = Some(Timestamp::from(SystemTime::now()));
        }
        tracing::debug!(namespace = %env.namespace, topic = %env.topic, "forwarded event");
        let _ = self.tx.send(Arc::new(env));
        Ok(())
    }

    /// Events matching `filter`, from now on.
    pub fn subscribe(&self, filter: Filter) -> impl Stream<Item = Envelope> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async_stream::stream! {
            loop {
                match rx.recv().await {
                    Ok(env) => {
                        if filter.matches(&EnvelopeFields(&env)) {
                            yield (*env).clone();
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event subscriber fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
    }
}

/// Filter fields of an envelope: `topic`, `namespace`, and `event.FIELD` of known events.
struct EnvelopeFields<'a>(&'a Envelope);

impl Adaptor for EnvelopeFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str)? {
            "topic" if path.len() == 1 => Some(self.0.topic.clone()),
            "namespace" if path.len() == 1 => Some(self.0.namespace.clone()),
            "event" => {
                let mut v = switchyard_api::events::to_json(self.0.event.as_ref()?)?;
                for p in &path[1..] {
                    v = v.get(p)?.clone();
                }
                match v {
                    serde_json::Value::String(s) => Some(s),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use switchyard_api::containerd::events::{TaskExit, TaskStart};
    use switchyard_api::typeurl::to_any;

    #[tokio::test]
    async fn filtered_fan_out() {
        let x = Exchange::new();
        let all = x.subscribe(Filter::default());
        let exits = x.subscribe(Filter::parse(&["topic==/tasks/exit"]).unwrap());
        let by_ctr = x.subscribe(Filter::parse(&["event.container_id==b"]).unwrap());
        tokio::pin!(all, exits, by_ctr);
        x.publish(
            "default",
            "/tasks/start",
            to_any(&TaskStart {
                container_id: "a".into(),
                pid: 1,
            }),
        );
        x.forward(Envelope {
            timestamp: None,
            namespace: "default".into(),
            topic: "/tasks/exit".into(),
            event: Some(to_any(&TaskExit {
                container_id: "b".into(),
                ..Default::default()
            })),
        })
        .unwrap();
        assert_eq!(all.next().await.unwrap().topic, "/tasks/start");
        let e = all.next().await.unwrap();
        assert_eq!(e.topic, "/tasks/exit");
        assert!(e.timestamp.is_some());
        assert_eq!(exits.next().await.unwrap().topic, "/tasks/exit");
        assert_eq!(by_ctr.next().await.unwrap().topic, "/tasks/exit");
    }

    #[test]
    fn bad_envelopes_are_refused() {
        let x = Exchange::new();
        let env = |topic: &str, ns: &str| Envelope {
            timestamp: None,
            namespace: ns.into(),
            topic: topic.into(),
            event: Some(Any::default()),
        };
        assert!(x.forward(env("tasks/exit", "default")).is_err());
        assert!(x.forward(env("/", "default")).is_err());
        assert!(x.forward(env("/tasks//exit", "default")).is_err());
        assert!(x.forward(env("/tasks/exit", "")).is_err());
        assert!(x.forward(env("/tasks/exec-added", "k8s.io")).is_ok());
    }
}
