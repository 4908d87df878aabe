//! `tasks.v1`: every call goes to the task manager, which routes it to the task's shim.

use std::sync::Arc;

use switchyard_api::containerd::services::tasks::v1 as api;
use tonic::{Request, Response, Status};

use super::{Shared, namespace};
use crate::error::status;
use crate::tasks::TaskError;

pub struct TasksService(pub Arc<Shared>);

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
        let r = req.into_inner();
        let id = r.container_id.clone();
        let pid = self.tasks().create(&ns, r).await.map_err(status)?;
        Ok(Response::new(api::CreateTaskResponse {
            container_id: id,
            pid,
        }))
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
        let r = req.into_inner();
        let resp = self
            .tasks()
            .delete(&ns, &r.container_id)
            .await
            .map_err(status)?;
        Ok(Response::new(resp))
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
        Ok(Response::new(resp))
    }

    async fn get(
        &self,
        req: Request<api::GetRequest>,
    ) -> Result<Response<api::GetResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let process = self
            .tasks()
            .get_process(&ns, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(api::GetResponse {
            process: Some(process),
        }))
    }

    async fn list(
        &self,
        req: Request<api::ListTasksRequest>,
    ) -> Result<Response<api::ListTasksResponse>, Status> {
        let ns = namespace(&req)?;
        let tasks = self.tasks().list(&ns).await;
        Ok(Response::new(api::ListTasksResponse { tasks }))
    }

    async fn kill(&self, req: Request<api::KillRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        self.tasks()
            .kill(&ns, req.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn exec(&self, req: Request<api::ExecProcessRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        self.tasks()
            .exec(&ns, req.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn resize_pty(
        &self,
        req: Request<api::ResizePtyRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        self.tasks()
            .resize_pty(&ns, req.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn close_io(&self, req: Request<api::CloseIoRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        self.tasks()
            .close_io(&ns, req.into_inner())
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
        self.tasks()
            .update(&ns, req.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn metrics(
        &self,
        req: Request<api::MetricsRequest>,
    ) -> Result<Response<api::MetricsResponse>, Status> {
        let ns = namespace(&req)?;
        let metrics = self
            .tasks()
            .metrics(&ns, &req.into_inner().filters)
            .await
            .map_err(status)?;
        Ok(Response::new(api::MetricsResponse { metrics }))
    }

    async fn wait(
        &self,
        req: Request<api::WaitRequest>,
    ) -> Result<Response<api::WaitResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let resp = self
            .tasks()
            .wait(&ns, &r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(resp))
    }
}
