//! The shim task API over ttrpc: one typed call per RPC, under the service name the shim
//! serves (`containerd.task.v2.Task`, or `v3` for shims that declare it; the messages are the
//! same). This is the only place that knows the two versions apart.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use switchyard_api::containerd::task::v2 as task;

use crate::error::{Classify, Kind, kind_of_code};

/// Shim task API versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskApi {
    V2,
    V3,
}

impl TaskApi {
    pub fn from_version(v: u32) -> Option<TaskApi> {
        match v {
            2 => Some(TaskApi::V2),
            3 => Some(TaskApi::V3),
            _ => None,
        }
    }

    pub fn version(self) -> u32 {
        match self {
            TaskApi::V2 => 2,
            TaskApi::V3 => 3,
        }
    }

    fn service(self) -> &'static str {
        match self {
            TaskApi::V2 => "containerd.task.v2.Task",
            TaskApi::V3 => "containerd.task.v3.Task",
        }
    }
}

/// A failed call to a shim.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{message}")]
    Status {
        method: &'static str,
        code: i32,
        message: String,
    },
    #[error("shim {method}: the shim closed the connection")]
    Closed { method: &'static str },
    #[error("shim {method}: no answer within {timeout:?}")]
    Timeout {
        method: &'static str,
        timeout: Duration,
    },
    #[error("shim {method}: {detail}")]
    Transport {
        method: &'static str,
        detail: String,
    },
    #[error("shim {method}: malformed response")]
    Decode {
        method: &'static str,
        #[source]
        source: prost::DecodeError,
    },
}

impl CallError {
    /// Whether the shim is gone (as opposed to having answered with an error).
    pub fn is_disconnected(&self) -> bool {
        matches!(self, CallError::Closed { .. } | CallError::Transport { .. })
    }

    /// Whether the shim answered that it does not know the task or process.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CallError::Status { .. }) && self.kind() == Kind::NotFound
    }
}

impl Classify for CallError {
    fn kind(&self) -> Kind {
        match self {
            CallError::Status { code, .. } => kind_of_code(*code),
            CallError::Closed { .. } | CallError::Transport { .. } => Kind::Unavailable,
            CallError::Timeout { .. } => Kind::DeadlineExceeded,
            CallError::Decode { .. } => Kind::Internal,
        }
    }
}

/// A task API client on one shim connection.
#[derive(Clone)]
pub struct TaskClient {
    client: ttrpc::r#async::Client,
    api: TaskApi,
    namespace: String,
}

impl std::fmt::Debug for TaskClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskClient")
            .field("api", &self.api)
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// Calls that return at once get this long; Wait has no deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

macro_rules! calls {
    ($($(#[$m:meta])* $fn:ident($method:literal, $req:ty) -> $resp:ty, $timeout:expr;)*) => {
        impl TaskClient {
            $(
                $(#[$m])*
                pub async fn $fn(&self, req: $req) -> Result<$resp, CallError> {
                    self.call($method, &req, $timeout).await
                }
            )*
        }
    };
}

calls! {
    state("State", task::StateRequest) -> task::StateResponse, Some(CALL_TIMEOUT);
    create("Create", task::CreateTaskRequest) -> task::CreateTaskResponse, Some(CALL_TIMEOUT);
    start("Start", task::StartRequest) -> task::StartResponse, Some(CALL_TIMEOUT);
    delete("Delete", task::DeleteRequest) -> task::DeleteResponse, Some(CALL_TIMEOUT);
    pids("Pids", task::PidsRequest) -> task::PidsResponse, Some(CALL_TIMEOUT);
    pause("Pause", task::PauseRequest) -> (), Some(CALL_TIMEOUT);
    resume("Resume", task::ResumeRequest) -> (), Some(CALL_TIMEOUT);
    kill("Kill", task::KillRequest) -> (), Some(CALL_TIMEOUT);
    exec("Exec", task::ExecProcessRequest) -> (), Some(CALL_TIMEOUT);
    resize_pty("ResizePty", task::ResizePtyRequest) -> (), Some(CALL_TIMEOUT);
    close_io("CloseIO", task::CloseIoRequest) -> (), Some(CALL_TIMEOUT);
    update("Update", task::UpdateTaskRequest) -> (), Some(CALL_TIMEOUT);
    /// Blocks until the process exits.
    wait("Wait", task::WaitRequest) -> task::WaitResponse, None;
    stats("Stats", task::StatsRequest) -> task::StatsResponse, Some(CALL_TIMEOUT);
    connect("Connect", task::ConnectRequest) -> task::ConnectResponse, Some(Duration::from_secs(5));
}

impl TaskClient {
    pub fn new(client: ttrpc::r#async::Client, api: TaskApi, namespace: &str) -> Self {
        Self {
            client,
            api,
            namespace: namespace.to_owned(),
        }
    }

    pub fn api(&self) -> TaskApi {
        self.api
    }

    /// Asks the shim to exit once it has no tasks (`now`: at once). `Ok(false)`: the shim went
    /// away without an answer (it died, or exited before replying, which is success too).
    pub async fn shutdown(
        &self,
        id: &str,
        now: bool,
        timeout: Duration,
    ) -> Result<bool, CallError> {
        let req = task::ShutdownRequest {
            id: id.to_owned(),
            now,
        };
        match self.call::<_, ()>("Shutdown", &req, Some(timeout)).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_disconnected() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &'static str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, CallError> {
        let mut r = ttrpc::Request::new();
        r.service = self.api.service().to_owned();
        r.method = method.to_owned();
        r.payload = req.encode_to_vec();
        r.timeout_nano = timeout.map_or(0, |t| t.as_nanos().try_into().unwrap_or(i64::MAX));
        // containerd sends the namespace as ttrpc metadata too.
        r.metadata = ttrpc::context::to_pb(HashMap::from([(
            "containerd-namespace-ttrpc".to_owned(),
            vec![self.namespace.clone()],
        )]));
        let res = match timeout {
            Some(t) => tokio::time::timeout(t + Duration::from_secs(1), self.client.request(r))
                .await
                .map_err(|_| CallError::Timeout { method, timeout: t })?,
            None => self.client.request(r).await,
        };
        let res = res.map_err(|e| match e {
            ttrpc::Error::RpcStatus(s) => CallError::Status {
                method,
                code: s.code() as i32,
                message: s.message,
            },
            ttrpc::Error::RemoteClosed | ttrpc::Error::LocalClosed | ttrpc::Error::Eof => {
                CallError::Closed { method }
            }
            ttrpc::Error::Others(s) if switchyard_base::ttrpc::closed_message(&s) => {
                CallError::Closed { method }
            }
            ttrpc::Error::Others(s) if switchyard_base::ttrpc::timeout_message(&s) => {
                CallError::Timeout {
                    method,
                    timeout: timeout.unwrap_or_default(),
                }
            }
            other => CallError::Transport {
                method,
                detail: other.to_string(),
            },
        })?;
        // `()` is prost's google.protobuf.Empty.
        Resp::decode(res.payload.as_slice()).map_err(|source| CallError::Decode { method, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(stream: tokio::net::UnixStream) -> TaskClient {
        let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
        TaskClient::new(client, TaskApi::V2, "ns")
    }

    fn pause() -> task::PauseRequest {
        task::PauseRequest { id: "c".into() }
    }

    /// ttrpc 0.10 reports these two only as untyped text (`switchyard_base::ttrpc`).
    #[tokio::test]
    async fn a_shim_that_does_not_answer_in_time_is_a_timeout() {
        let (ours, _shim) = tokio::net::UnixStream::pair().unwrap();
        let c = client(ours);
        let e = c
            .call::<_, ()>("Pause", &pause(), Some(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Timeout { .. }), "{e:?}");
        assert_eq!(e.kind(), Kind::DeadlineExceeded);
    }

    #[tokio::test]
    async fn calls_on_a_connection_the_shim_closed_say_closed() {
        let (ours, shim) = tokio::net::UnixStream::pair().unwrap();
        let c = client(ours);
        drop(shim);
        // The first calls may meet the connection as it ends (a broken pipe); the later ones
        // find its sender closed, which ttrpc 0.10 says only in text.
        let mut closed = 0;
        for _ in 0..20 {
            let e = c.pause(pause()).await.unwrap_err();
            assert!(e.is_disconnected(), "{e:?}");
            assert_eq!(e.kind(), Kind::Unavailable);
            closed += usize::from(matches!(e, CallError::Closed { .. }));
        }
        assert!(closed > 0, "no call found the connection closed");
    }
}
