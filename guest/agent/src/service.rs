//! The ttrpc `Agent` service: a thin adapter from requests to [`container::Agent`]'s typed
//! calls; errors become statuses in `error.rs`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use yard_agent_protocol::ttrpc::{self, r#async::TtrpcContext};
use yard_agent_protocol::*;

use crate::container;

pub struct Service {
    pub agent: Arc<container::Agent>,
    pub forwards: Arc<crate::forward::Forwards>,
}

type R<T> = ttrpc::Result<T>;

fn log_err<T>(method: &str, r: crate::error::Result<T>) -> R<T> {
    r.map_err(|e| {
        tracing::debug!(method, error = %crate::error::chain(&e), "failed");
        e.into()
    })
}

impl Service {
    async fn read(&self, method: &str, req: ReadRequest, stderr: bool) -> R<ReadResponse> {
        let (data, eof) = log_err(
            method,
            self.agent
                .read(&req.container_id, &req.exec_id, req.len, stderr)
                .await,
        )?;
        Ok(ReadResponse {
            data,
            eof,
            ..Default::default()
        })
    }
}

#[async_trait]
impl Agent for Service {
    async fn hello(&self, _: &TtrpcContext, _: HelloRequest) -> R<HelloResponse> {
        let f = crate::boot::facts();
        Ok(HelloResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_release: f.kernel_release,
            vcpus: f.vcpus,
            memory_bytes: f.memory_bytes,
            uptime_ms: f.uptime.as_millis() as u64,
            ..Default::default()
        })
    }

    async fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> R<Empty> {
        log_err("CreateContainer", self.agent.create(req).await)?;
        Ok(Empty::default())
    }

    async fn start_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> R<StartProcessResponse> {
        let pid = log_err(
            "StartProcess",
            self.agent.start(&req.container_id, &req.exec_id).await,
        )?;
        Ok(StartProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> R<Empty> {
        log_err("ExecProcess", self.agent.exec(req).await)?;
        Ok(Empty::default())
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalRequest) -> R<Empty> {
        log_err(
            "SignalProcess",
            self.agent
                .signal(&req.container_id, &req.exec_id, req.signal, req.all)
                .await,
        )?;
        Ok(Empty::default())
    }

    async fn wait_process(&self, _: &TtrpcContext, req: ProcessRequest) -> R<WaitResponse> {
        let status = log_err(
            "WaitProcess",
            self.agent.wait(&req.container_id, &req.exec_id).await,
        )?;
        Ok(WaitResponse {
            status,
            ..Default::default()
        })
    }

    async fn read_stdout(&self, _: &TtrpcContext, req: ReadRequest) -> R<ReadResponse> {
        self.read("ReadStdout", req, false).await
    }

    async fn read_stderr(&self, _: &TtrpcContext, req: ReadRequest) -> R<ReadResponse> {
        self.read("ReadStderr", req, true).await
    }

    async fn write_stdin(&self, _: &TtrpcContext, req: WriteRequest) -> R<WriteResponse> {
        let n = log_err(
            "WriteStdin",
            self.agent
                .write_stdin(&req.container_id, &req.exec_id, &req.data)
                .await,
        )?;
        Ok(WriteResponse {
            len: n as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> R<Empty> {
        log_err(
            "CloseStdin",
            self.agent
                .close_stdin(&req.container_id, &req.exec_id)
                .await,
        )?;
        Ok(Empty::default())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizeRequest) -> R<Empty> {
        log_err(
            "ResizePty",
            self.agent
                .resize(&req.container_id, &req.exec_id, req.width, req.height)
                .await,
        )?;
        Ok(Empty::default())
    }

    async fn list_pids(&self, _: &TtrpcContext, req: ContainerRequest) -> R<PidsResponse> {
        let pids = log_err("ListPids", self.agent.pids(&req.container_id).await)?;
        Ok(PidsResponse {
            pids,
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> R<StatsResponse> {
        let s = log_err("Stats", self.agent.stats(&req.container_id).await)?;
        Ok(StatsResponse {
            memory_usage_bytes: s.memory_usage,
            memory_limit_bytes: s.memory_limit,
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            oom_kills: s.oom_kills,
            ..Default::default()
        })
    }

    async fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        log_err(
            "PauseContainer",
            self.agent.pause(&req.container_id, true).await,
        )?;
        Ok(Empty::default())
    }

    async fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        log_err(
            "ResumeContainer",
            self.agent.pause(&req.container_id, false).await,
        )?;
        Ok(Empty::default())
    }

    async fn update_container(&self, _: &TtrpcContext, req: UpdateRequest) -> R<Empty> {
        log_err(
            "UpdateContainer",
            self.agent.update(&req.container_id, &req.resources).await,
        )?;
        Ok(Empty::default())
    }

    async fn remove_container(&self, _: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        log_err(
            "RemoveContainer",
            self.agent.remove(&req.container_id).await,
        )?;
        Ok(Empty::default())
    }

    async fn write_file(&self, _: &TtrpcContext, req: WriteFileRequest) -> R<Empty> {
        log_err("WriteFile", self.agent.write_file(req).await)?;
        Ok(Empty::default())
    }

    async fn write_dir(&self, _: &TtrpcContext, req: WriteDirRequest) -> R<Empty> {
        log_err("WriteDir", self.agent.write_dir(req).await)?;
        Ok(Empty::default())
    }

    async fn wait_oom(&self, _: &TtrpcContext, _: Empty) -> R<OomEvent> {
        let container_id = self.agent.wait_oom().await;
        Ok(OomEvent {
            container_id,
            ..Default::default()
        })
    }

    async fn configure_network(&self, _: &TtrpcContext, req: NetworkConfig) -> R<Empty> {
        let r = tokio::task::spawn_blocking(move || crate::network::configure(&req))
            .await
            .unwrap_or_else(|e| {
                Err(crate::error::Error::Internal(format!(
                    "ConfigureNetwork task: {e}"
                )))
            });
        log_err("ConfigureNetwork", r)?;
        Ok(Empty::default())
    }

    async fn dial_loopback(&self, _: &TtrpcContext, req: DialRequest) -> R<DialResponse> {
        let connection_id = log_err("DialLoopback", self.forwards.dial(req.port).await)?;
        Ok(DialResponse {
            connection_id,
            ..Default::default()
        })
    }

    async fn read_connection(
        &self,
        _: &TtrpcContext,
        req: ConnectionReadRequest,
    ) -> R<ReadResponse> {
        let (data, eof) = log_err(
            "ReadConnection",
            self.forwards.read(req.connection_id, req.len).await,
        )?;
        Ok(ReadResponse {
            data,
            eof,
            ..Default::default()
        })
    }

    async fn write_connection(
        &self,
        _: &TtrpcContext,
        req: ConnectionWriteRequest,
    ) -> R<WriteResponse> {
        let n = log_err(
            "WriteConnection",
            self.forwards.write(req.connection_id, &req.data).await,
        )?;
        Ok(WriteResponse {
            len: n as u32,
            ..Default::default()
        })
    }

    async fn close_connection(&self, _: &TtrpcContext, req: ConnectionCloseRequest) -> R<Empty> {
        log_err(
            "CloseConnection",
            self.forwards.close(req.connection_id, req.write_only).await,
        )?;
        Ok(Empty::default())
    }

    async fn shutdown(&self, _: &TtrpcContext, _: Empty) -> R<Empty> {
        tracing::info!("shutdown");
        self.agent.kill_everything();
        nix::unistd::sync();
        // Answer first: the reboot ends the VM (and the connection) at once.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            crate::boot::power_off();
        });
        Ok(Empty::default())
    }
}
