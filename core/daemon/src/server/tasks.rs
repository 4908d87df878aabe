//! `tasks.v1`: every call goes to the task manager, which routes it to the task's shim. This
//! adapter is where containerd's client API meets the shim task API: requests are translated
//! to `task.v2` messages and the shims' answers back to `tasks.v1` ones.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use switchyard_api::client::{REMOVE_HEADER, START_HEADER, flag, set_flag};
use switchyard_api::containerd::services::tasks::v1 as api;
use switchyard_api::containerd::task::v2 as shimapi;
use switchyard_api::containerd::types::Metric;
use switchyard_api::containerd::v1::types::Process;
use tonic::{Request, Response, Status};

use super::{Shared, namespace};
use crate::error::status;
use crate::tasks::TaskError;

pub struct TasksService(pub Arc<Shared>);

fn create_request(r: api::CreateTaskRequest) -> (shimapi::CreateTaskRequest, Option<PathBuf>) {
    let runtime_path = (!r.runtime_path.is_empty()).then(|| PathBuf::from(r.runtime_path));
    let req = shimapi::CreateTaskRequest {
        id: r.container_id,
        // The task manager writes the bundle and names it.
        bundle: String::new(),
        rootfs: r.rootfs,
        terminal: r.terminal,
        stdin: r.stdin,
        stdout: r.stdout,
        stderr: r.stderr,
        checkpoint: r.checkpoint.map(|c| c.digest).unwrap_or_default(),
        parent_checkpoint: String::new(),
        options: r.options,
    };
    (req, runtime_path)
}

/// `id` is the container's for the task, the exec id for an exec'd process.
fn delete_response(id: String, r: shimapi::DeleteResponse) -> api::DeleteResponse {
    api::DeleteResponse {
        id,
        pid: r.pid,
        exit_status: r.exit_status,
        exited_at: r.exited_at,
    }
}

/// A process as `tasks.v1` shows it: `id` is the container id for the task's init process,
/// the exec id otherwise.
fn process(s: shimapi::StateResponse) -> Process {
    Process {
        id: if s.exec_id.is_empty() {
            s.id.clone()
        } else {
            s.exec_id
        },
        container_id: s.id,
        pid: s.pid,
        status: s.status,
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
        terminal: s.terminal,
        exit_status: s.exit_status,
        exited_at: s.exited_at,
    }
}

impl TasksService {
    fn tasks(&self) -> &Arc<crate::tasks::TaskManager> {
        &self.0.tasks
    }
}

#[tonic::async_trait]
impl api::tasks_server::Tasks for TasksService {
    async fn create(
        &self,
        req: Request<api::CreateTaskRequest>,
    ) -> Result<Response<api::CreateTaskResponse>, Status> {
        let ns = namespace(&req)?;
        let start = flag(req.metadata(), START_HEADER);
        let (r, runtime_path) = create_request(req.into_inner());
        let id = r.id.clone();
        let mut pid = self
            .tasks()
            .create(&ns, r, runtime_path)
            .await
            .map_err(status)?;
        if start {
            // A failed start leaves the task created, as a failed Start call would.
            pid = self.tasks().start(&ns, &id, "").await.map_err(status)?;
        }
        let mut resp = Response::new(api::CreateTaskResponse {
            container_id: id,
            pid,
        });
        if start {
            set_flag(resp.metadata_mut(), START_HEADER);
        }
        Ok(resp)
    }

    async fn start(
        &self,
        req: Request<api::StartRequest>,
    ) -> Result<Response<api::StartResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let pid = self
            .tasks()
            .start(&ns, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(api::StartResponse { pid }))
    }

    async fn delete(
        &self,
        req: Request<api::DeleteTaskRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let ns = namespace(&req)?;
        let remove = flag(req.metadata(), REMOVE_HEADER);
        let r = req.into_inner();
        let resp = self
            .tasks()
            .delete(&ns, &r.container_id)
            .await
            .map_err(status)?;
        let mut resp = Response::new(delete_response(r.container_id.clone(), resp));
        if remove {
            // The task is gone either way: a container that cannot be removed is left to the
            // client's own Containers.Delete, which says why.
            match super::containers::delete_container(&self.0, &ns, r.container_id).await {
                Ok(()) => set_flag(resp.metadata_mut(), REMOVE_HEADER),
                Err(e) => {
                    tracing::debug!(namespace = %ns, error = %e.message(), "remove the container after its task");
                }
            }
        }
        Ok(resp)
    }

    async fn delete_process(
        &self,
        req: Request<api::DeleteProcessRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let resp = self
            .tasks()
            .delete_process(&ns, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(delete_response(r.exec_id, resp)))
    }

    async fn get(
        &self,
        req: Request<api::GetRequest>,
    ) -> Result<Response<api::GetResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let state = self
            .tasks()
            .state_of(&ns, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(api::GetResponse {
            process: Some(process(state)),
        }))
    }

    async fn list(
        &self,
        req: Request<api::ListTasksRequest>,
    ) -> Result<Response<api::ListTasksResponse>, Status> {
        let ns = namespace(&req)?;
        let tasks = self.tasks().list(&ns).await;
        Ok(Response::new(api::ListTasksResponse {
            tasks: tasks.into_iter().map(process).collect(),
        }))
    }

    async fn kill(&self, req: Request<api::KillRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        self.tasks()
            .kill(
                &ns,
                shimapi::KillRequest {
                    id: r.container_id,
                    exec_id: r.exec_id,
                    signal: r.signal,
                    all: r.all,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn exec(&self, req: Request<api::ExecProcessRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        self.tasks()
            .exec(
                &ns,
                shimapi::ExecProcessRequest {
                    id: r.container_id,
                    exec_id: r.exec_id,
                    terminal: r.terminal,
                    stdin: r.stdin,
                    stdout: r.stdout,
                    stderr: r.stderr,
                    spec: r.spec,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn resize_pty(
        &self,
        req: Request<api::ResizePtyRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        self.tasks()
            .resize_pty(
                &ns,
                shimapi::ResizePtyRequest {
                    id: r.container_id,
                    exec_id: r.exec_id,
                    width: r.width,
                    height: r.height,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn close_io(&self, req: Request<api::CloseIoRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        self.tasks()
            .close_io(
                &ns,
                shimapi::CloseIoRequest {
                    id: r.container_id,
                    exec_id: r.exec_id,
                    stdin: r.stdin,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn pause(&self, req: Request<api::PauseTaskRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().container_id;
        self.tasks().pause(&ns, &id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn resume(&self, req: Request<api::ResumeTaskRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().container_id;
        self.tasks().resume(&ns, &id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn list_pids(
        &self,
        req: Request<api::ListPidsRequest>,
    ) -> Result<Response<api::ListPidsResponse>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().container_id;
        let processes = self.tasks().pids(&ns, &id).await.map_err(status)?;
        Ok(Response::new(api::ListPidsResponse { processes }))
    }

    async fn checkpoint(
        &self,
        req: Request<api::CheckpointTaskRequest>,
    ) -> Result<Response<api::CheckpointTaskResponse>, Status> {
        namespace(&req)?;
        Err(status(TaskError::Checkpoint))
    }

    async fn update(&self, req: Request<api::UpdateTaskRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        self.tasks()
            .update(
                &ns,
                shimapi::UpdateTaskRequest {
                    id: r.container_id,
                    resources: r.resources,
                    annotations: r.annotations,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn metrics(
        &self,
        req: Request<api::MetricsRequest>,
    ) -> Result<Response<api::MetricsResponse>, Status> {
        let ns = namespace(&req)?;
        let stats = self
            .tasks()
            .metrics(&ns, &req.into_inner().filters)
            .await
            .map_err(status)?;
        let timestamp = Some(prost_types::Timestamp::from(SystemTime::now()));
        let metrics = stats
            .into_iter()
            .map(|(id, s)| Metric {
                timestamp,
                id,
                data: s.stats,
            })
            .collect();
        Ok(Response::new(api::MetricsResponse { metrics }))
    }

    async fn wait(
        &self,
        req: Request<api::WaitRequest>,
    ) -> Result<Response<api::WaitResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let r = self
            .tasks()
            .wait(&ns, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(api::WaitResponse {
            exit_status: r.exit_status,
            exited_at: r.exited_at,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_named_as_tasks_v1_names_them() {
        let init = process(shimapi::StateResponse {
            id: "c".into(),
            pid: 7,
            ..Default::default()
        });
        assert_eq!((init.container_id.as_str(), init.id.as_str()), ("c", "c"));
        let exec = process(shimapi::StateResponse {
            id: "c".into(),
            exec_id: "e".into(),
            ..Default::default()
        });
        assert_eq!((exec.container_id.as_str(), exec.id.as_str()), ("c", "e"));
    }

    #[test]
    fn create_takes_the_runtime_path_apart() {
        let (r, path) = create_request(api::CreateTaskRequest {
            container_id: "c".into(),
            runtime_path: "/opt/shim".into(),
            terminal: true,
            ..Default::default()
        });
        assert_eq!((r.id.as_str(), r.terminal), ("c", true));
        assert_eq!(path, Some(PathBuf::from("/opt/shim")));
        let (_, path) = create_request(api::CreateTaskRequest::default());
        assert_eq!(path, None);
    }
}
