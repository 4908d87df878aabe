//! The shim's side of the agent protocol: a typed client over the VM's agent stream, with the
//! agent's ttrpc statuses mapped back onto the kit's errors (so containerd sees the code the
//! agent meant: NOT_FOUND stays NOT_FOUND).

use std::time::Duration;

use tokio::net::UnixStream;
use yard_agent_protocol::ttrpc::asynchronous::transport::Socket;
use yard_agent_protocol::ttrpc::context::{self, Context};
use yard_agent_protocol::{self as proto, AgentClient, ttrpc};
use yard_shim_kit::{Error, Result};

/// Calls that should answer soon get this long: longer than the agent gives its own runtime
/// helper (60 s), because ttrpc cancels a handler whose deadline passed, mid-work.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
}

fn quick() -> Context {
    context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// Long polls (wait, read, OOM) have no deadline.
fn long() -> Context {
    context::Context::default()
}

/// The agent's status → the kit's error; a broken channel is INTERNAL and says the VM is gone.
fn map(what: &str) -> impl FnOnce(ttrpc::Error) -> Error + '_ {
    move |e| match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg = s.message().to_owned();
            match s.code() {
                ttrpc::Code::NOT_FOUND => Error::NotFound(msg),
                ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(msg),
                ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(msg),
                ttrpc::Code::FAILED_PRECONDITION => Error::FailedPrecondition(msg),
                ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(msg),
                _ => Error::Internal(format!("agent {what}: {msg}")),
            }
        }
        other => Error::Internal(format!("agent {what}: {other} (is the VM still running?)")),
    }
}

fn process(container_id: &str, exec_id: &str) -> proto::ProcessRequest {
    proto::ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

impl Agent {
    pub fn new(stream: UnixStream) -> Agent {
        let client = ttrpc::asynchronous::Client::new(Socket::new(stream));
        Agent {
            client: AgentClient::new(client),
        }
    }

    pub async fn hello(&self) -> Result<proto::HelloResponse> {
        self.client
            .hello(quick(), &proto::HelloRequest::default())
            .await
            .map_err(map("Hello"))
    }

    pub async fn create_container(&self, req: proto::CreateContainerRequest) -> Result<()> {
        self.client
            .create_container(quick(), &req)
            .await
            .map(drop)
            .map_err(map("CreateContainer"))
    }

    pub async fn start(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        self.client
            .start_process(quick(), &process(container_id, exec_id))
            .await
            .map(|r| r.pid)
            .map_err(map("StartProcess"))
    }

    pub async fn exec(&self, req: proto::ExecProcessRequest) -> Result<()> {
        self.client
            .exec_process(quick(), &req)
            .await
            .map(drop)
            .map_err(map("ExecProcess"))
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
        self.client
            .signal_process(quick(), &req)
            .await
            .map(drop)
            .map_err(map("SignalProcess"))
    }

    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        self.client
            .wait_process(long(), &process(container_id, exec_id))
            .await
            .map(|r| r.status)
            .map_err(map("WaitProcess"))
    }

    /// Up to `len` bytes of stdout (or stderr); `None` at the end of the stream.
    pub async fn read(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Option<Vec<u8>>> {
        let req = proto::ReadRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            len,
            ..Default::default()
        };
        let r = if stderr {
            self.client
                .read_stderr(long(), &req)
                .await
                .map_err(map("ReadStderr"))?
        } else {
            self.client
                .read_stdout(long(), &req)
                .await
                .map_err(map("ReadStdout"))?
        };
        Ok(if r.eof && r.data.is_empty() {
            None
        } else {
            Some(r.data)
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
        self.client
            .write_stdin(long(), &req)
            .await
            .map(|r| r.len)
            .map_err(map("WriteStdin"))
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        self.client
            .close_stdin(quick(), &process(container_id, exec_id))
            .await
            .map(drop)
            .map_err(map("CloseStdin"))
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
        self.client
            .resize_pty(quick(), &req)
            .await
            .map(drop)
            .map_err(map("ResizePty"))
    }

    fn container(container_id: &str) -> proto::ContainerRequest {
        proto::ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        }
    }

    pub async fn pids(&self, container_id: &str) -> Result<Vec<u32>> {
        self.client
            .list_pids(quick(), &Self::container(container_id))
            .await
            .map(|r| r.pids)
            .map_err(map("ListPids"))
    }

    pub async fn stats(&self, container_id: &str) -> Result<proto::StatsResponse> {
        self.client
            .stats(quick(), &Self::container(container_id))
            .await
            .map_err(map("Stats"))
    }

    pub async fn pause(&self, container_id: &str) -> Result<()> {
        self.client
            .pause_container(quick(), &Self::container(container_id))
            .await
            .map(drop)
            .map_err(map("PauseContainer"))
    }

    pub async fn resume(&self, container_id: &str) -> Result<()> {
        self.client
            .resume_container(quick(), &Self::container(container_id))
            .await
            .map(drop)
            .map_err(map("ResumeContainer"))
    }

    pub async fn update(&self, container_id: &str, resources: Vec<u8>) -> Result<()> {
        let req = proto::UpdateRequest {
            container_id: container_id.to_owned(),
            resources,
            ..Default::default()
        };
        self.client
            .update_container(quick(), &req)
            .await
            .map(drop)
            .map_err(map("UpdateContainer"))
    }

    pub async fn remove(&self, container_id: &str) -> Result<()> {
        self.client
            .remove_container(quick(), &Self::container(container_id))
            .await
            .map(drop)
            .map_err(map("RemoveContainer"))
    }

    /// The next container the guest's OOM killer hit.
    pub async fn wait_oom(&self) -> Result<String> {
        self.client
            .wait_oom(long(), &proto::Empty::default())
            .await
            .map(|r| r.container_id)
            .map_err(map("WaitOom"))
    }

    pub async fn shutdown(&self) -> Result<()> {
        self.client
            .shutdown(quick(), &proto::Empty::default())
            .await
            .map(drop)
            .map_err(map("Shutdown"))
    }
}
