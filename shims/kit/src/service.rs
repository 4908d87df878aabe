//! The containerd task service (`containerd.task.v2.Task` and `v3`: one generated service under
//! both names), a thin ttrpc adapter from the generated messages to the typed state machine in
//! `task.rs`. Every method of the generated trait is written out: one the shim cannot do answers
//! Unimplemented, never the generated NotFound.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo as PbProcessInfo, Status as PbStatus};

use crate::engine::Engine;
use crate::error::Error;
use crate::events::timestamp;
use crate::stdio::StdioSpec;
use crate::task::{CreateTask, ExecProcess, Status, TaskService};

type TResult<T> = ttrpc::Result<T>;

/// The ttrpc face of a [`TaskService`].
pub struct Service<E: Engine> {
    tasks: Arc<TaskService<E>>,
}

impl<E: Engine> Service<E> {
    pub fn new(tasks: Arc<TaskService<E>>) -> Self {
        Service { tasks }
    }
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioSpec {
    StdioSpec {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

/// Run one request: log how long it took (debug) and why it failed (warn).
async fn call<T>(
    method: &str,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> TResult<T> {
    let t = std::time::Instant::now();
    let r = f.await;
    tracing::debug!(
        method,
        us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
        ok = r.is_ok(),
        "request"
    );
    r.map_err(|e| {
        tracing::warn!(method, error = %e, "request failed");
        e.into()
    })
}

#[async_trait]
impl<E: Engine> Task for Service<E> {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> TResult<StateResponse> {
        call("State", async {
            let s = self.tasks.state(&req.id, &req.exec_id)?;
            let status = match s.status {
                Status::Created => PbStatus::CREATED,
                Status::Running => PbStatus::RUNNING,
                Status::Paused => PbStatus::PAUSED,
                Status::Stopped => PbStatus::STOPPED,
            };
            Ok(StateResponse {
                id: s.id,
                bundle: s.bundle,
                pid: s.pid,
                status: status.into(),
                stdin: s.stdio.stdin,
                stdout: s.stdio.stdout,
                stderr: s.stdio.stderr,
                terminal: s.stdio.terminal,
                exit_status: s.exit.map(|e| e.status).unwrap_or(0),
                exited_at: s
                    .exit
                    .map(|e| MessageField::some(timestamp(e.at)))
                    .unwrap_or_default(),
                exec_id: s.exec_id,
                ..Default::default()
            })
        })
        .await
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TResult<CreateTaskResponse> {
        call("Create", async {
            let pid = self
                .tasks
                .create(CreateTask {
                    stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
                    bundle: req.bundle.into(),
                    rootfs: req.rootfs,
                    options: req.options.into_option(),
                    checkpoint: req.checkpoint,
                    id: req.id,
                })
                .await?;
            Ok(CreateTaskResponse {
                pid,
                ..Default::default()
            })
        })
        .await
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TResult<StartResponse> {
        call("Start", async {
            let pid = self.tasks.start(&req.id, &req.exec_id).await?;
            Ok(StartResponse {
                pid,
                ..Default::default()
            })
        })
        .await
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TResult<DeleteResponse> {
        call("Delete", async {
            let d = self.tasks.delete(&req.id, &req.exec_id).await?;
            Ok(DeleteResponse {
                pid: d.pid,
                exit_status: d.exit.status,
                exited_at: MessageField::some(timestamp(d.exit.at)),
                ..Default::default()
            })
        })
        .await
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TResult<PidsResponse> {
        call("Pids", async {
            let pids = self.tasks.pids(&req.id).await?;
            Ok(PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|p| PbProcessInfo {
                        pid: p.pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        })
        .await
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TResult<Empty> {
        call("Pause", async {
            self.tasks.pause(&req.id).await.map(|()| Empty::new())
        })
        .await
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TResult<Empty> {
        call("Resume", async {
            self.tasks.resume(&req.id).await.map(|()| Empty::new())
        })
        .await
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: CheckpointTaskRequest) -> TResult<Empty> {
        Err(crate::error::unimplemented("Checkpoint"))
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TResult<Empty> {
        call("Kill", async {
            self.tasks
                .kill(&req.id, &req.exec_id, req.signal, req.all)
                .await
                .map(|()| Empty::new())
        })
        .await
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TResult<Empty> {
        call("Exec", async {
            self.tasks
                .exec(ExecProcess {
                    stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
                    spec: req.spec.as_ref().map(|a| a.value.clone()),
                    id: req.id,
                    exec_id: req.exec_id,
                })
                .await
                .map(|()| Empty::new())
        })
        .await
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TResult<Empty> {
        call("ResizePty", async {
            self.tasks
                .resize_pty(&req.id, &req.exec_id, req.width, req.height)
                .await
                .map(|()| Empty::new())
        })
        .await
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TResult<Empty> {
        call("CloseIO", async {
            self.tasks
                .close_io(&req.id, &req.exec_id, req.stdin)
                .await
                .map(|()| Empty::new())
        })
        .await
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TResult<Empty> {
        call("Update", async {
            self.tasks
                .update(&req.id, req.resources.as_ref())
                .await
                .map(|()| Empty::new())
        })
        .await
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TResult<WaitResponse> {
        call("Wait", async {
            let exit = self.tasks.wait(&req.id, &req.exec_id).await?;
            Ok(WaitResponse {
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            })
        })
        .await
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TResult<StatsResponse> {
        call("Stats", async {
            let stats = self.tasks.stats(&req.id).await?;
            Ok(StatsResponse {
                stats: MessageField::some(stats),
                ..Default::default()
            })
        })
        .await
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TResult<ConnectResponse> {
        let c = self.tasks.connect(&req.id);
        Ok(ConnectResponse {
            shim_pid: c.shim_pid,
            task_pid: c.task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TResult<Empty> {
        self.tasks.shutdown(req.now);
        Ok(Empty::new())
    }
}

/// The task service under both names containerd uses: `v2` (containerd 1.6/1.7, and 2.x with a
/// plain address) and `v3` (2.x with bootstrap version 3).
pub fn services<E: Engine>(svc: Arc<Service<E>>) -> HashMap<String, ttrpc::r#async::Service> {
    let mut all = HashMap::new();
    for version in [".v2.", ".v3."] {
        // The generated service names one of the two (v3 since containerd-shim-protos 0.12).
        for (name, service) in containerd_shim_protos::shim_async::create_task(svc.clone()) {
            let name = name.replace(".v2.", version).replace(".v3.", version);
            all.insert(name, service);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::shim_async::{Client, TaskClient};
    use containerd_shim_protos::ttrpc::r#async::Server;
    use containerd_shim_protos::ttrpc::context::Context;

    use super::*;
    use crate::engine::{Container, CreateRequest};

    /// Nothing gets as far as the engine in these tests.
    struct NoEngine;

    #[async_trait]
    impl Engine for NoEngine {
        fn name(&self) -> &'static str {
            "none"
        }
        async fn create(&self, _: CreateRequest) -> crate::Result<Arc<dyn Container>> {
            Err(Error::Unimplemented("create".into()))
        }
        async fn cleanup(&self, _: &str, _: &str, _: &std::path::Path) -> crate::Result<()> {
            Ok(())
        }
    }

    fn code<T: std::fmt::Debug>(r: TResult<T>) -> ttrpc::Code {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => s.code(),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn serves_v2_and_v3_and_maps_errors_to_codes() {
        let tasks = Arc::new(TaskService::new(
            Arc::new(NoEngine),
            "ns",
            crate::Publisher::none(),
        ));
        let all = services(Arc::new(Service::new(tasks)));
        assert!(
            all.contains_key("containerd.task.v2.Task"),
            "{:?}",
            all.keys()
        );
        assert!(
            all.contains_key("containerd.task.v3.Task"),
            "{:?}",
            all.keys()
        );

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("s");
        let listener = crate::perms::bind(&sock).unwrap_or_else(|e| panic!("{e}"));
        let listener = ttrpc::r#async::transport::Listener::try_from(listener)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut server = Server::new().add_listener(listener).register_service(all);
        server.start().await.unwrap_or_else(|e| panic!("{e}"));
        let client = Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let client = TaskClient::new(client);
        let ctx = Context::default;

        let c = client
            .connect(
                ctx(),
                &ConnectRequest {
                    id: "nope".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.shim_pid, c.task_pid), (std::process::id(), 0));
        let state = client
            .state(
                ctx(),
                &StateRequest {
                    id: "nope".into(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(code(state), ttrpc::Code::NOT_FOUND);
        let create = client
            .create(
                ctx(),
                &CreateTaskRequest {
                    id: "t".into(),
                    bundle: dir.path().join("no-bundle").display().to_string(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(code(create), ttrpc::Code::INVALID_ARGUMENT);
        let checkpoint = client
            .checkpoint(ctx(), &CheckpointTaskRequest::default())
            .await;
        assert_eq!(code(checkpoint), ttrpc::Code::UNIMPLEMENTED);
        let _ = server.shutdown().await;
    }
}
