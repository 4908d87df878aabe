//! The containerd task service (`containerd.task.v2.Task`, also served as `v3`) as a thin adapter
//! over an [`Engine`]. Every method of the generated trait is written out: one the engine cannot
//! do answers Unimplemented, never the generated NotFound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo as PbProcessInfo, Status};
use tokio::sync::{Notify, watch};

use crate::engine::{Container, CreateRequest, Engine, ExecRequest, Exit, Process};
use crate::error::Error;
use crate::events::Publisher;
use crate::stdio::StdioSpec;

type TResult<T> = ttrpc::Result<T>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Stopped,
}

struct Proc {
    exec_id: String,
    process: Arc<dyn Process>,
    stdio: StdioSpec,
    state: Mutex<State>,
    exit: watch::Sender<Option<Exit>>,
}

impl Proc {
    fn new(exec_id: &str, process: Arc<dyn Process>, stdio: StdioSpec) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_owned(),
            process,
            stdio,
            state: Mutex::new(State::Created),
            exit: watch::channel(None).0,
        })
    }

    fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Created → Running, unless the process already exited while it was being started.
    fn mark_started(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *st == State::Created {
            *st = State::Running;
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::now(255);
            }
        }
    }
}

struct TaskEntry {
    id: String,
    bundle: String,
    container: Arc<dyn Container>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    paused: Mutex<bool>,
}

impl TaskEntry {
    fn process(&self, exec_id: &str) -> Result<Arc<Proc>, Error> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("exec {exec_id:?} not found in task {:?}", self.id))
            })
    }
}

/// The task service of one shim process (which may hold several tasks of one group).
pub struct Service<E: Engine> {
    engine: Arc<E>,
    namespace: String,
    publisher: Publisher,
    tasks: Mutex<HashMap<String, Arc<TaskEntry>>>,
    exit: Arc<Notify>,
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl<E: Engine> Service<E> {
    pub fn new(engine: Arc<E>, namespace: &str, publisher: Publisher, exit: Arc<Notify>) -> Self {
        Service {
            engine,
            namespace: namespace.to_owned(),
            publisher,
            tasks: Mutex::new(HashMap::new()),
            exit,
        }
    }

    fn task(&self, id: &str) -> Result<Arc<TaskEntry>, Error> {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id:?} not found")))
    }

    /// Watch a started process and record and publish its exit.
    fn monitor(&self, task: &Arc<TaskEntry>, proc_: Arc<Proc>) {
        let publisher = self.publisher.clone();
        let container_id = task.id.clone();
        tokio::spawn(async move {
            let exit = proc_.process.wait().await;
            proc_.set_state(State::Stopped);
            proc_.exit.send_replace(Some(exit));
            let id = if proc_.exec_id.is_empty() {
                container_id.clone()
            } else {
                proc_.exec_id.clone()
            };
            tracing::debug!(container_id, id, status = exit.status, "exited");
            let ev = TaskExit {
                container_id,
                id,
                pid: proc_.process.pid(),
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            };
            publisher
                .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                .await;
        });
    }

    async fn do_create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse, Error> {
        crate::ident::check("id", &req.id)?;
        if self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&req.id)
        {
            return Err(Error::AlreadyExists(format!(
                "task {:?} already exists",
                req.id
            )));
        }
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let container = self
            .engine
            .create(CreateRequest {
                namespace: self.namespace.clone(),
                id: req.id.clone(),
                bundle: req.bundle.clone().into(),
                rootfs: req.rootfs.clone(),
                stdio: stdio.clone(),
                options: req.options.clone().into_option(),
                events: self.publisher.clone(),
            })
            .await?;
        let init = Proc::new("", container.init(), stdio.clone());
        let pid = init.process.pid();
        let entry = Arc::new(TaskEntry {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            container,
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
            paused: Mutex::new(false),
        });
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), entry.clone());
        self.monitor(&entry, init);
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        self.publisher
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn do_start(&self, req: StartRequest) -> Result<StartResponse, Error> {
        let task = self.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        if p.state() != State::Created {
            return Err(Error::FailedPrecondition(format!(
                "{} {:?} is {:?}, not created",
                if req.exec_id.is_empty() {
                    "task"
                } else {
                    "exec"
                },
                if req.exec_id.is_empty() {
                    &req.id
                } else {
                    &req.exec_id
                },
                p.state()
            )));
        }
        let pid = p.process.start().await?;
        p.mark_started();
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publisher
                .publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            self.monitor(&task, p.clone());
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publisher
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: DeleteRequest) -> Result<DeleteResponse, Error> {
        let task = self.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        if req.exec_id.is_empty() {
            match p.state() {
                State::Running => {
                    return Err(Error::FailedPrecondition(format!(
                        "task {:?} is running: kill it before deleting",
                        req.id
                    )));
                }
                State::Created => {
                    // Never started: containerd deletes such tasks; kill the waiting init.
                    task.container.delete(true).await?;
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), p.wait()).await;
                }
                State::Stopped => task.container.delete(false).await?,
            }
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.id);
        } else {
            if p.state() == State::Running {
                return Err(Error::FailedPrecondition(format!(
                    "exec {:?} is running: kill it before deleting",
                    req.exec_id
                )));
            }
            task.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.exec_id);
        }
        let exit = p.exited().unwrap_or_else(|| Exit::now(255));
        let pid = p.process.pid();
        if req.exec_id.is_empty() {
            let ev = TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                id: req.id.clone(),
                ..Default::default()
            };
            self.publisher
                .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        crate::stdio::release_stdin_fifo(&p.stdio.stdin);
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn do_exec(&self, req: ExecProcessRequest) -> Result<(), Error> {
        let task = self.task(&req.id)?;
        crate::ident::check("exec_id", &req.exec_id)?;
        if task.init.state() == State::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "task {:?} has exited",
                req.id
            )));
        }
        if task
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&req.exec_id)
        {
            return Err(Error::AlreadyExists(format!(
                "exec {:?} already exists in task {:?}",
                req.exec_id, req.id
            )));
        }
        let spec =
            req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
                Error::InvalidArgument("spec: the process spec is missing".into())
            })?;
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let process = task
            .container
            .exec(ExecRequest {
                exec_id: req.exec_id.clone(),
                stdio: stdio.clone(),
                spec,
            })
            .await?;
        task.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.exec_id.clone(), Proc::new(&req.exec_id, process, stdio));
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publisher
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(())
    }

    async fn do_kill(&self, req: KillRequest) -> Result<(), Error> {
        let task = self.task(&req.id)?;
        if req.all && req.exec_id.is_empty() {
            return task.container.kill_all(req.signal).await;
        }
        let p = task.process(&req.exec_id)?;
        if p.state() == State::Stopped {
            return Err(Error::NotFound(format!(
                "process {:?} already finished",
                if req.exec_id.is_empty() {
                    &req.id
                } else {
                    &req.exec_id
                }
            )));
        }
        if p.state() == State::Created && !req.exec_id.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "exec {:?} has not started",
                req.exec_id
            )));
        }
        p.process.kill(req.signal).await
    }

    async fn do_state(&self, req: StateRequest) -> Result<StateResponse, Error> {
        let task = self.task(&req.id)?;
        let p = task.process(&req.exec_id)?;
        let paused = *task.paused.lock().unwrap_or_else(|p| p.into_inner());
        let status = match p.state() {
            State::Created => Status::CREATED,
            State::Running if paused => Status::PAUSED,
            State::Running => Status::RUNNING,
            State::Stopped => Status::STOPPED,
        };
        let exit = p.exited();
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: task.bundle.clone(),
            pid: p.process.pid(),
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit
                .map(|e| MessageField::some(timestamp(e.at)))
                .unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn do_pause(&self, id: &str, pause: bool) -> Result<(), Error> {
        let task = self.task(id)?;
        if task.init.state() != State::Running {
            return Err(Error::FailedPrecondition(format!(
                "task {id:?} is not running"
            )));
        }
        if pause {
            task.container.pause().await?;
        } else {
            task.container.resume().await?;
        }
        *task.paused.lock().unwrap_or_else(|p| p.into_inner()) = pause;
        if pause {
            let ev = TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            };
            self.publisher
                .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            let ev = TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            };
            self.publisher
                .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        Ok(())
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
        us = t.elapsed().as_micros() as u64,
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
        call("State", self.do_state(req)).await
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TResult<CreateTaskResponse> {
        call("Create", self.do_create(req)).await
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TResult<StartResponse> {
        call("Start", self.do_start(req)).await
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TResult<DeleteResponse> {
        call("Delete", self.do_delete(req)).await
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TResult<PidsResponse> {
        let r = async {
            let task = self.task(&req.id)?;
            let pids = task.container.pids().await?;
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
        }
        .await;
        call("Pids", std::future::ready(r)).await
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TResult<Empty> {
        call("Pause", async {
            self.do_pause(&req.id, true).await.map(|_| Empty::new())
        })
        .await
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TResult<Empty> {
        call("Resume", async {
            self.do_pause(&req.id, false).await.map(|_| Empty::new())
        })
        .await
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: CheckpointTaskRequest) -> TResult<Empty> {
        Err(crate::error::unimplemented("Checkpoint"))
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TResult<Empty> {
        call("Kill", async {
            self.do_kill(req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TResult<Empty> {
        call("Exec", async {
            self.do_exec(req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TResult<Empty> {
        let r = async {
            let p = self.task(&req.id)?.process(&req.exec_id)?;
            p.process.resize_pty(req.width, req.height).await
        }
        .await;
        call("ResizePty", std::future::ready(r.map(|_| Empty::new()))).await
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TResult<Empty> {
        let r = async {
            let p = self.task(&req.id)?.process(&req.exec_id)?;
            if req.stdin {
                p.process.close_stdin().await?;
            }
            Ok(())
        }
        .await;
        call("CloseIO", std::future::ready(r.map(|_| Empty::new()))).await
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TResult<Empty> {
        let r = async {
            let task = self.task(&req.id)?;
            let res = req
                .resources
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("resources: missing".into()))?;
            task.container.update(res).await
        }
        .await;
        call("Update", std::future::ready(r.map(|_| Empty::new()))).await
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TResult<WaitResponse> {
        let r = async {
            let p = self.task(&req.id)?.process(&req.exec_id)?;
            let exit = p.wait().await;
            Ok(WaitResponse {
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            })
        }
        .await;
        call("Wait", std::future::ready(r)).await
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TResult<StatsResponse> {
        let r = async {
            let task = self.task(&req.id)?;
            let stats = task.container.stats().await?;
            Ok(StatsResponse {
                stats: MessageField::some(stats),
                ..Default::default()
            })
        }
        .await;
        call("Stats", std::future::ready(r)).await
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TResult<ConnectResponse> {
        let task_pid = self
            .task(&req.id)
            .map(|t| t.init.process.pid())
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TResult<Empty> {
        let remaining = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).len();
        if remaining == 0 || req.now {
            tracing::info!(remaining, "shutdown");
            self.exit.notify_one();
        }
        Ok(Empty::new())
    }
}

/// The task service under both names containerd uses: `v2` (containerd 1.6/1.7, and 2.x with a
/// plain address) and `v3` (2.x with bootstrap version 3).
pub fn services<E: Engine>(svc: Arc<Service<E>>) -> HashMap<String, ttrpc::r#async::Service> {
    let mut all = containerd_shim_protos::shim_async::create_task(svc.clone());
    let v3 = containerd_shim_protos::shim_async::create_task(svc);
    for (name, service) in v3 {
        all.insert(name.replace(".v2.", ".v3."), service);
    }
    all
}
