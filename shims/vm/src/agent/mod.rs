//! The shim's side of the agent protocol: a typed client over the VM's agent stream.
//!
//! The guest is untrusted, so everything it sends is bounded before use: frames are capped at
//! [`MAX_REPLY_FRAME`](proto::MAX_REPLY_FRAME) ([`frames`]), a read may not return more than
//! was asked for, and status messages are cut to [`MAX_MESSAGE`]. A violation is recorded in
//! the agent's [`Health`], which the sandbox watches to tear the VM down; from then on every
//! call fails with [`AgentError::Protocol`] naming it. The agent's statuses map back onto the
//! kit's errors, so containerd sees the code the agent meant (NOT_FOUND stays NOT_FOUND).

pub mod frames;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;
use yard_agent_protocol::ttrpc::asynchronous::transport::Socket;
use yard_agent_protocol::ttrpc::context::{self, Context};
use yard_agent_protocol::{self as proto, AgentClient, ttrpc};
use yard_shim_kit::Error;

/// Calls that should answer soon get this long: longer than the agent gives its own runtime
/// helper (60 s), because ttrpc cancels a handler whose deadline passed, mid-work.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest text from the guest (a status message, a kernel release) the shim keeps.
pub const MAX_MESSAGE: usize = 4096;

/// Why an agent call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error status.
    #[error("{message}")]
    Status {
        call: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    /// The channel is closed: the VM is gone (powered off, crashed or stopped).
    #[error("agent {call}: the VM is gone")]
    Gone { call: &'static str },
    /// The agent broke the protocol (`what`); the sandbox is torn down.
    #[error("agent {call}: the guest agent broke the protocol ({what}); the sandbox is torn down")]
    Protocol { call: &'static str, what: String },
    /// Anything else ttrpc reports (a deadline passed, a reply that does not decode).
    #[error("agent {call}: {reason}")]
    Failed { call: &'static str, reason: String },
}

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Error {
        match e {
            AgentError::Status {
                code,
                message,
                call,
            } => match code {
                ttrpc::Code::NOT_FOUND => Error::NotFound(message),
                ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(message),
                ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(message),
                ttrpc::Code::FAILED_PRECONDITION => Error::FailedPrecondition(message),
                ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(message),
                _ => Error::Internal(format!("agent {call}: {message}")),
            },
            e => Error::Internal(e.to_string()),
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Whether the agent has broken the protocol: shared by the client, its stream and whoever
/// must tear the sandbox down. The first violation is kept.
#[derive(Clone, Debug)]
pub struct Health(Arc<watch::Sender<Option<String>>>);

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(watch::channel(None).0))
    }
}

impl Health {
    /// Records a violation; false when one was recorded already.
    pub fn violated(&self, what: String) -> bool {
        self.0.send_if_modified(|v| {
            if v.is_some() {
                return false;
            }
            tracing::error!(violation = %what, "the guest agent broke the protocol");
            *v = Some(what);
            true
        })
    }

    pub fn violation(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Resolves with the violation once there is one.
    pub async fn broken(&self) -> String {
        let mut rx = self.0.subscribe();
        let what = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| v.clone().unwrap_or_default());
        // The sender lives in `self`, so the wait cannot fail.
        what.unwrap_or_default()
    }
}

/// What one stdio (or forwarded connection) read returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Data(Vec<u8>),
    /// No data, and not the end either: a well-behaved agent never answers so (reads are long
    /// polls), so the caller counts these.
    Empty,
    Eof,
}

#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    health: Health,
}

fn quick() -> Context {
    context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// Long polls (wait, read, OOM) have no deadline.
fn long() -> Context {
    context::Context::default()
}

/// At most [`MAX_MESSAGE`] bytes of `s`, cut at a character boundary.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn process(container_id: &str, exec_id: &str) -> proto::ProcessRequest {
    proto::ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

fn container(container_id: &str) -> proto::ContainerRequest {
    proto::ContainerRequest {
        container_id: container_id.to_owned(),
        ..Default::default()
    }
}

impl Agent {
    /// A client over `stream`, which must be past the agent's ready banner.
    pub fn new(stream: UnixStream) -> Agent {
        let health = Health::default();
        let stream = frames::FrameLimit::new(stream, proto::MAX_REPLY_FRAME, health.clone());
        let client = ttrpc::asynchronous::Client::new(Socket::new(stream));
        Agent {
            client: AgentClient::new(client),
            health,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Records that the agent broke the protocol in `call`, and the error to return.
    pub fn violation(&self, call: &'static str, what: String) -> AgentError {
        self.health.violated(format!("{call}: {what}"));
        self.broken(call)
            .unwrap_or(AgentError::Protocol { call, what })
    }

    fn broken(&self, call: &'static str) -> Option<AgentError> {
        self.health
            .violation()
            .map(|what| AgentError::Protocol { call, what })
    }

    /// ttrpc's error → ours. Once the agent broke the protocol, that is the error of every call
    /// (the connection failing is its consequence).
    fn map(&self, call: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError + '_ {
        move |e| {
            if let Some(e) = self.broken(call) {
                return e;
            }
            match e {
                ttrpc::Error::RpcStatus(s) => AgentError::Status {
                    call,
                    code: s.code(),
                    message: bounded(s.message()),
                },
                ttrpc::Error::Socket(_)
                | ttrpc::Error::LocalClosed
                | ttrpc::Error::RemoteClosed
                | ttrpc::Error::Eof
                | ttrpc::Error::Nix(_) => AgentError::Gone { call },
                ttrpc::Error::Others(m) if switchyard_base::ttrpc::closed_message(&m) => {
                    AgentError::Gone { call }
                }
                ttrpc::Error::Others(m) => AgentError::Failed {
                    call,
                    reason: bounded(&m),
                },
            }
        }
    }

    /// Runs one call, refusing at once when the agent has broken the protocol.
    async fn call<T>(
        &self,
        name: &'static str,
        f: impl Future<Output = ttrpc::Result<T>>,
    ) -> Result<T> {
        if let Some(e) = self.broken(name) {
            return Err(e);
        }
        f.await.map_err(self.map(name))
    }

    pub async fn hello(&self) -> Result<proto::HelloResponse> {
        let req = proto::HelloRequest::default();
        self.call("Hello", self.client.hello(quick(), &req)).await
    }

    pub async fn create_container(&self, req: proto::CreateContainerRequest) -> Result<()> {
        self.call(
            "CreateContainer",
            self.client.create_container(quick(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn start(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let req = process(container_id, exec_id);
        self.call("StartProcess", self.client.start_process(quick(), &req))
            .await
            .map(|r| r.pid)
    }

    pub async fn exec(&self, req: proto::ExecProcessRequest) -> Result<()> {
        self.call("ExecProcess", self.client.exec_process(quick(), &req))
            .await
            .map(drop)
    }

    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = proto::SignalRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", self.client.signal_process(quick(), &req))
            .await
            .map(drop)
    }

    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let req = process(container_id, exec_id);
        self.call("WaitProcess", self.client.wait_process(long(), &req))
            .await
            .map(|r| r.status)
    }

    /// Up to `len` bytes of stdout (or stderr). More than `len` is a protocol violation.
    pub async fn read(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Read> {
        let req = proto::ReadRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            len,
            ..Default::default()
        };
        let (name, r) = if stderr {
            let r = self.call("ReadStderr", self.client.read_stderr(long(), &req));
            ("ReadStderr", r.await?)
        } else {
            let r = self.call("ReadStdout", self.client.read_stdout(long(), &req));
            ("ReadStdout", r.await?)
        };
        self.checked_read(name, r, len)
    }

    /// A read's reply, refused when it holds more than was asked for.
    fn checked_read(&self, call: &'static str, r: proto::ReadResponse, len: u32) -> Result<Read> {
        if r.data.len() > len as usize {
            return Err(self.violation(
                call,
                format!("{} bytes for a read of at most {len}", r.data.len()),
            ));
        }
        Ok(match (r.data.is_empty(), r.eof) {
            (false, _) => Read::Data(r.data),
            (true, true) => Read::Eof,
            (true, false) => Read::Empty,
        })
    }

    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<u32> {
        let req = proto::WriteRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            data,
            ..Default::default()
        };
        // No deadline: a process that does not read its stdin holds the write up.
        self.call("WriteStdin", self.client.write_stdin(long(), &req))
            .await
            .map(|r| r.len)
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = process(container_id, exec_id);
        self.call("CloseStdin", self.client.close_stdin(quick(), &req))
            .await
            .map(drop)
    }

    pub async fn resize(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let req = proto::ResizeRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            width,
            height,
            ..Default::default()
        };
        self.call("ResizePty", self.client.resize_pty(quick(), &req))
            .await
            .map(drop)
    }

    pub async fn pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = container(container_id);
        self.call("ListPids", self.client.list_pids(quick(), &req))
            .await
            .map(|r| r.pids)
    }

    pub async fn stats(&self, container_id: &str) -> Result<proto::StatsResponse> {
        let req = container(container_id);
        self.call("Stats", self.client.stats(quick(), &req)).await
    }

    pub async fn pause(&self, container_id: &str) -> Result<()> {
        let req = container(container_id);
        self.call("PauseContainer", self.client.pause_container(quick(), &req))
            .await
            .map(drop)
    }

    pub async fn resume(&self, container_id: &str) -> Result<()> {
        let req = container(container_id);
        self.call(
            "ResumeContainer",
            self.client.resume_container(quick(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn update(&self, container_id: &str, resources: Vec<u8>) -> Result<()> {
        let req = proto::UpdateRequest {
            container_id: container_id.to_owned(),
            resources,
            ..Default::default()
        };
        self.call(
            "UpdateContainer",
            self.client.update_container(quick(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn remove(&self, container_id: &str) -> Result<()> {
        let req = container(container_id);
        self.call(
            "RemoveContainer",
            self.client.remove_container(quick(), &req),
        )
        .await
        .map(drop)
    }

    /// Writes (or removes) a copy of a host file in the guest.
    pub async fn write_file(&self, req: proto::WriteFileRequest) -> Result<()> {
        self.call("WriteFile", self.client.write_file(quick(), &req))
            .await
            .map(drop)
    }

    /// Writes a copy of a host directory in the guest.
    pub async fn write_dir(&self, req: proto::WriteDirRequest) -> Result<()> {
        self.call("WriteDir", self.client.write_dir(quick(), &req))
            .await
            .map(drop)
    }

    /// The next container the guest's OOM killer hit (any id: the caller checks it is one of
    /// the sandbox's).
    pub async fn wait_oom(&self) -> Result<String> {
        let req = proto::Empty::default();
        self.call("WaitOom", self.client.wait_oom(long(), &req))
            .await
            .map(|r| r.container_id)
    }

    /// Gives the guest the pod network's configuration ([`crate::engine::net`]).
    pub async fn configure_network(&self, config: &proto::NetworkConfig) -> Result<()> {
        self.call(
            "ConfigureNetwork",
            self.client.configure_network(quick(), config),
        )
        .await
        .map(|_| ())
    }

    /// A connection to `port` on the guest's loopback (port forwarding); returns its id.
    pub async fn dial_loopback(&self, port: u16) -> Result<u32> {
        let req = proto::DialRequest {
            port: u32::from(port),
            ..Default::default()
        };
        self.call("DialLoopback", self.client.dial_loopback(quick(), &req))
            .await
            .map(|r| r.connection_id)
    }

    /// Up to `len` bytes connection `id` received. More than `len` is a protocol violation.
    pub async fn read_connection(&self, id: u32, len: u32) -> Result<Read> {
        let req = proto::ConnectionReadRequest {
            connection_id: id,
            len,
            ..Default::default()
        };
        let r = self
            .call("ReadConnection", self.client.read_connection(long(), &req))
            .await?;
        self.checked_read("ReadConnection", r, len)
    }

    /// Sends `data` on connection `id`.
    pub async fn write_connection(&self, id: u32, data: Vec<u8>) -> Result<()> {
        let req = proto::ConnectionWriteRequest {
            connection_id: id,
            data,
            ..Default::default()
        };
        // No deadline: a peer that does not read holds the write up, as TCP would.
        self.call(
            "WriteConnection",
            self.client.write_connection(long(), &req),
        )
        .await
        .map(drop)
    }

    /// Shuts connection `id`'s sending side (`write_only`), or closes it.
    pub async fn close_connection(&self, id: u32, write_only: bool) -> Result<()> {
        let req = proto::ConnectionCloseRequest {
            connection_id: id,
            write_only,
            ..Default::default()
        };
        self.call(
            "CloseConnection",
            self.client.close_connection(quick(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn shutdown(&self) -> Result<()> {
        let req = proto::Empty::default();
        self.call("Shutdown", self.client.shutdown(quick(), &req))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_their_code_and_the_rest_says_what_happened() {
        let status = |code| AgentError::Status {
            call: "Stats",
            code,
            message: "no container x".into(),
        };
        assert!(matches!(
            Error::from(status(ttrpc::Code::NOT_FOUND)),
            Error::NotFound(m) if m == "no container x"
        ));
        assert!(matches!(
            Error::from(status(ttrpc::Code::INTERNAL)),
            Error::Internal(m) if m == "agent Stats: no container x"
        ));
        let e = Error::from(AgentError::Protocol {
            call: "ReadStdout",
            what: "8 empty replies".into(),
        });
        assert_eq!(
            e.to_string(),
            "agent ReadStdout: the guest agent broke the protocol (8 empty replies); the \
             sandbox is torn down"
        );
        assert_eq!(
            Error::from(AgentError::Gone { call: "Wait" }).to_string(),
            "agent Wait: the VM is gone"
        );
    }

    #[test]
    fn guest_text_is_bounded_at_a_char_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_MESSAGE);
        let b = bounded(&long);
        assert!(
            b.len() <= MAX_MESSAGE + 3 && b.ends_with("..."),
            "{}",
            b.len()
        );
    }

    #[tokio::test]
    async fn the_first_violation_is_kept_and_wakes_waiters() {
        let h = Health::default();
        let waiter = tokio::spawn({
            let h = h.clone();
            async move { h.broken().await }
        });
        assert!(h.violated("first".into()));
        assert!(!h.violated("second".into()));
        assert_eq!(h.violation().as_deref(), Some("first"));
        assert_eq!(waiter.await.ok().as_deref(), Some("first"));
    }
}
