//! Events a shim publishes, and where they go.
//!
//! The task state machine and the engines publish through a [`Publisher`], a handle on an
//! [`EventSink`]. In a shim server the sink is [`RemoteSink`]: the daemon that started the shim
//! (`TTRPC_ADDRESS`, the `containerd.services.events.ttrpc.v1.Events/Forward` endpoint that
//! containerd and switchyardd both serve), forwarded in order by one task that reconnects when
//! the daemon restarted (as containerd's Go publisher does) and tries the same event again, so
//! none is overtaken or lost with the old connection. Tests use [`channel`].
//!
//! Publishing never waits: a sink only queues, in order. That lets the state machine record a
//! change and queue its event in one step, so no client can see the event before the state
//! (a Delete right after `/tasks/exit` finds the task stopped) or two events out of order.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::context::with_timeout;
use tokio::sync::{mpsc, watch};

/// One containerd task event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Delete(TaskDelete),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Paused(TaskPaused),
    Resumed(TaskResumed),
    Oom(TaskOOM),
}

impl Event {
    /// containerd's topic for the event (`/tasks/exit`, ...).
    pub fn topic(&self) -> &'static str {
        match self {
            Event::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            Event::Start(_) => topics::TASK_START_EVENT_TOPIC,
            Event::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            Event::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            Event::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Event::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Event::Paused(_) => topics::TASK_PAUSED_EVENT_TOPIC,
            Event::Resumed(_) => topics::TASK_RESUMED_EVENT_TOPIC,
            Event::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
        }
    }

    /// The container the event is about.
    pub fn container_id(&self) -> &str {
        match self {
            Event::Create(e) => &e.container_id,
            Event::Start(e) => &e.container_id,
            Event::Exit(e) => &e.container_id,
            Event::Delete(e) => &e.container_id,
            Event::ExecAdded(e) => &e.container_id,
            Event::ExecStarted(e) => &e.container_id,
            Event::Paused(e) => &e.container_id,
            Event::Resumed(e) => &e.container_id,
            Event::Oom(e) => &e.container_id,
        }
    }

    fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            Event::Create(e) => Box::new(e),
            Event::Start(e) => Box::new(e),
            Event::Exit(e) => Box::new(e),
            Event::Delete(e) => Box::new(e),
            Event::ExecAdded(e) => Box::new(e),
            Event::ExecStarted(e) => Box::new(e),
            Event::Paused(e) => Box::new(e),
            Event::Resumed(e) => Box::new(e),
            Event::Oom(e) => Box::new(e),
        }
    }
}

/// A protobuf timestamp, as events and replies carry times.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Where published events go. `publish` queues and returns at once; events leave in the order
/// they were published.
pub trait EventSink: Send + Sync {
    fn publish(&self, event: Event);
}

/// What the kit and engines publish through: a cheap handle on one sink.
#[derive(Clone)]
pub struct Publisher {
    sink: Arc<dyn EventSink>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(sink: Arc<dyn EventSink>) -> Publisher {
        Publisher { sink }
    }

    /// A publisher that drops everything.
    pub fn none() -> Publisher {
        Publisher::new(Arc::new(NullSink))
    }

    pub fn publish(&self, event: Event) {
        self.sink.publish(event);
    }

    /// The kernel (or a guest's limit) killed a process of `container_id` for memory.
    pub fn oom(&self, container_id: &str) {
        self.publish(Event::Oom(TaskOOM {
            container_id: container_id.to_owned(),
            ..Default::default()
        }));
    }
}

struct NullSink;

impl EventSink for NullSink {
    fn publish(&self, _: Event) {}
}

/// A sink that hands every event to a channel, for tests (of the kit and of engines).
pub fn channel() -> (Publisher, mpsc::UnboundedReceiver<Event>) {
    struct ChannelSink(mpsc::UnboundedSender<Event>);
    impl EventSink for ChannelSink {
        fn publish(&self, event: Event) {
            let _ = self.0.send(event);
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    (Publisher::new(Arc::new(ChannelSink(tx))), rx)
}

/// How many events may wait for the daemon. Far more than a shim produces between two
/// forwards; past it the daemon is gone or stuck, and events are dropped with a warning rather
/// than held without bound.
const QUEUE: usize = 4096;

/// Events forwarded to the daemon over ttrpc, in order, by one task.
pub struct RemoteSink {
    queue: mpsc::Sender<Event>,
    /// Events queued and not yet handed to the ttrpc publisher.
    pending: watch::Sender<usize>,
}

/// How many times one event is tried (reconnecting in between) before it is dropped, the
/// first pause between tries (doubling), and how long one forward may take.
const ATTEMPTS: u32 = 6;
const RETRY: Duration = Duration::from_millis(100);
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

async fn events_client(address: &str) -> ttrpc::Result<EventsClient> {
    let address = if address.contains("://") {
        address.to_owned()
    } else {
        format!("unix://{address}")
    };
    Ok(EventsClient::new(Client::connect(&address).await?))
}

fn forward_request(namespace: &str, event: Event) -> crate::Result<ForwardRequest> {
    let topic = event.topic();
    let any = containerd_shim::util::convert_to_any(event.into_message())
        .map_err(|e| crate::Error::Internal(format!("encode {topic} event: {e}")))?;
    let mut envelope = Envelope::new();
    envelope.set_timestamp(timestamp(SystemTime::now()));
    envelope.set_namespace(namespace.to_owned());
    envelope.set_topic(topic.to_owned());
    envelope.set_event(any);
    let mut req = ForwardRequest::new();
    req.set_envelope(envelope);
    Ok(req)
}

/// Forwards one event. A closed connection (the daemon restarted) is replaced and the same
/// event sent again; an unreachable daemon is retried a few times; an error the daemon answered
/// drops the event.
async fn forward(
    address: &str,
    client: &mut Option<EventsClient>,
    topic: &str,
    req: &ForwardRequest,
) {
    let mut pause = RETRY;
    for attempt in 1..=ATTEMPTS {
        if client.is_none() {
            match events_client(address).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    tracing::debug!(topic, attempt, error = %e, "connect to the event address")
                }
            }
        }
        if let Some(c) = client.as_ref() {
            let timeout = i64::try_from(FORWARD_TIMEOUT.as_nanos()).unwrap_or(i64::MAX);
            match c.forward(with_timeout(timeout), req).await {
                Ok(_) => return,
                Err(ttrpc::Error::RpcStatus(status)) => {
                    tracing::warn!(topic, status = ?status, "the daemon refused an event");
                    return;
                }
                Err(e) => {
                    tracing::debug!(topic, attempt, error = %e, "forward event; reconnecting");
                    *client = None;
                    // A connection the daemon closed is replaced at once: it is back.
                    let closed = match &e {
                        ttrpc::Error::RemoteClosed | ttrpc::Error::LocalClosed => true,
                        ttrpc::Error::Others(m) => switchyard_base::ttrpc::closed_message(m),
                        _ => false,
                    };
                    if closed {
                        continue;
                    }
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    tracing::warn!(topic, address, "event dropped: the daemon is unreachable");
}

impl RemoteSink {
    /// Connect to `address` and start forwarding events of `namespace` there.
    pub async fn connect(address: &str, namespace: &str) -> crate::Result<Arc<RemoteSink>> {
        let first = events_client(address).await.map_err(|e| {
            crate::Error::Internal(format!("connect to event address {address}: {e}"))
        })?;
        let (queue, mut rx) = mpsc::channel::<Event>(QUEUE);
        let pending = watch::channel(0usize).0;
        let sink = Arc::new(RemoteSink {
            queue,
            pending: pending.clone(),
        });
        let namespace = namespace.to_owned();
        let address = address.to_owned();
        tokio::spawn(async move {
            let mut client = Some(first);
            while let Some(event) = rx.recv().await {
                let topic = event.topic();
                match forward_request(&namespace, event) {
                    Ok(req) => forward(&address, &mut client, topic, &req).await,
                    Err(e) => tracing::warn!(topic, error = %e, "publish event"),
                }
                pending.send_modify(|n| *n = n.saturating_sub(1));
            }
        });
        Ok(sink)
    }

    /// Wait (up to `timeout`) until every queued event has been forwarded (or dropped): before
    /// the server exits, so the last `/tasks/delete` is not lost with the process.
    pub async fn flush(&self, timeout: Duration) {
        let mut rx = self.pending.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await;
    }
}

impl EventSink for RemoteSink {
    fn publish(&self, event: Event) {
        let topic = event.topic();
        self.pending.send_modify(|n| *n += 1);
        if self.queue.try_send(event).is_err() {
            self.pending.send_modify(|n| *n = n.saturating_sub(1));
            tracing::warn!(topic, "event queue full or closed: event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channel_keeps_order_and_topics() {
        let (publisher, mut rx) = channel();
        publisher.oom("c1");
        publisher.publish(Event::Paused(TaskPaused {
            container_id: "c1".into(),
            ..Default::default()
        }));
        let a = rx.recv().await;
        let b = rx.recv().await;
        assert!(
            matches!(&a, Some(Event::Oom(e)) if e.container_id == "c1"),
            "{a:?}"
        );
        assert_eq!(a.as_ref().map(Event::topic), Some("/tasks/oom"));
        assert_eq!(b.as_ref().map(Event::topic), Some("/tasks/paused"));
        assert_eq!(b.as_ref().map(Event::container_id), Some("c1"));
    }
}
