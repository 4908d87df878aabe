//! `containers.v1`: container records, stored as sent.

use std::sync::Arc;

use switchyard_api::containerd::events::{
    ContainerCreate, ContainerDelete, ContainerUpdate, container_create,
};
use switchyard_api::containerd::services::containers::v1 as api;
use switchyard_api::events::topics;
use switchyard_api::typeurl::to_any;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::{Shared, namespace};
use crate::error::{Kind, Simple, status};
use crate::filters::{Adaptor, Filter};
use crate::runtime::resolve::ResolveError;

pub struct ContainersService(pub Arc<Shared>);

/// Filter fields of a container: `id`, `image`, `runtime.name`, `snapshotter`,
/// `snapshotkey`, `labels.KEY`.
struct ContainerFields<'a>(&'a api::Container);

impl Adaptor for ContainerFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let c = self.0;
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        match p.as_slice() {
            ["id"] => Some(c.id.clone()),
            ["image"] => Some(c.image.clone()),
            ["runtime", "name"] => c.runtime.as_ref().map(|r| r.name.clone()),
            ["snapshotter"] => Some(c.snapshotter.clone()),
            ["snapshotkey"] => Some(c.snapshot_key.clone()),
            ["labels", k] => c.labels.get(*k).cloned(),
            _ => None,
        }
    }
}

impl ContainersService {
    async fn list_filtered(
        &self,
        ns: String,
        filters: Vec<String>,
    ) -> Result<Vec<api::Container>, Status> {
        let filter = Filter::parse(&filters).map_err(status)?;
        Ok(self
            .0
            .store
            .run(move |s| s.list_containers(&ns))
            .await
            .map_err(status)?
            .into_iter()
            .filter(|c| filter.matches(&ContainerFields(c)))
            .collect())
    }
}

#[tonic::async_trait]
impl api::containers_server::Containers for ContainersService {
    async fn get(
        &self,
        req: Request<api::GetContainerRequest>,
    ) -> Result<Response<api::GetContainerResponse>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().id;
        let c = self
            .0
            .store
            .run(move |s| s.get_container(&ns, &id))
            .await
            .map_err(status)?;
        Ok(Response::new(api::GetContainerResponse {
            container: Some(c),
        }))
    }

    async fn list(
        &self,
        req: Request<api::ListContainersRequest>,
    ) -> Result<Response<api::ListContainersResponse>, Status> {
        let ns = namespace(&req)?;
        let containers = self.list_filtered(ns, req.into_inner().filters).await?;
        Ok(Response::new(api::ListContainersResponse { containers }))
    }

    async fn list_stream(
        &self,
        req: Request<api::ListContainersRequest>,
    ) -> Result<Response<BoxStream<api::ListContainerMessage>>, Status> {
        let ns = namespace(&req)?;
        let containers = self.list_filtered(ns, req.into_inner().filters).await?;
        let s = futures::stream::iter(
            containers
                .into_iter()
                .map(|c| Ok(api::ListContainerMessage { container: Some(c) })),
        );
        Ok(Response::new(Box::pin(s)))
    }

    async fn create(
        &self,
        req: Request<api::CreateContainerRequest>,
    ) -> Result<Response<api::CreateContainerResponse>, Status> {
        let ns = namespace(&req)?;
        let c = req
            .into_inner()
            .container
            .ok_or_else(|| status(Simple::new(Kind::InvalidArgument, "container is required")))?;
        // An unknown runtime is refused now rather than at task creation; a known runtime
        // whose shim is not installed yet is accepted (it may be installed before the task).
        let runtime = c
            .runtime
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        if let Err(e @ ResolveError::Unknown { .. }) = self.0.tasks.runtimes().resolve(&runtime) {
            return Err(Status::invalid_argument(format!(
                "container {:?}: {}",
                c.id,
                crate::error::chain(&e)
            )));
        }
        let n = ns.clone();
        let (c, ns_created) = self
            .0
            .store
            .run(move |s| s.create_container(&n, c))
            .await
            .map_err(status)?;
        self.0.store.sync_soon();
        if ns_created {
            self.0.exchange.publish(
                &ns,
                topics::NAMESPACE_CREATE,
                to_any(&switchyard_api::containerd::events::NamespaceCreate {
                    name: ns.clone(),
                    labels: Default::default(),
                }),
            );
        }
        self.0.exchange.publish(
            &ns,
            topics::CONTAINER_CREATE,
            to_any(&ContainerCreate {
                id: c.id.clone(),
                image: c.image.clone(),
                runtime: c.runtime.as_ref().map(|r| container_create::Runtime {
                    name: r.name.clone(),
                    options: r.options.clone(),
                }),
            }),
        );
        Ok(Response::new(api::CreateContainerResponse {
            container: Some(c),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateContainerRequest>,
    ) -> Result<Response<api::UpdateContainerResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let c = r
            .container
            .ok_or_else(|| status(Simple::new(Kind::InvalidArgument, "container is required")))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let n = ns.clone();
        let c = self
            .0
            .store
            .run(move |s| s.update_container(&n, c, &paths))
            .await
            .map_err(status)?;
        self.0.exchange.publish(
            &ns,
            topics::CONTAINER_UPDATE,
            to_any(&ContainerUpdate {
                id: c.id.clone(),
                image: c.image.clone(),
                labels: c.labels.clone(),
                snapshot_key: c.snapshot_key.clone(),
            }),
        );
        Ok(Response::new(api::UpdateContainerResponse {
            container: Some(c),
        }))
    }

    async fn delete(
        &self,
        req: Request<api::DeleteContainerRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().id;
        delete_container(&self.0, &ns, id).await?;
        Ok(Response::new(()))
    }
}

/// At the daemon's start, before it serves: removes every container labelled
/// [`crate::metadata::REMOVE_LABEL`] that has no task. Its client meant to remove it with its
/// task, and a crash (the daemon's, losing a removal not yet durable, or the client's) kept it.
pub(crate) async fn remove_leftovers(shared: &Shared) {
    let found = shared
        .store
        .run(|s| {
            let mut found = Vec::new();
            for ns in s.list_namespaces()? {
                for c in s.list_containers(&ns.name)? {
                    if crate::metadata::removed_with_task(&c) {
                        found.push((ns.name.clone(), c.id));
                    }
                }
            }
            Ok(found)
        })
        .await;
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "list the containers removed with their tasks");
            return;
        }
    };
    for (ns, id) in found {
        if shared.tasks.exists(&ns, &id) {
            continue;
        }
        match delete_container(shared, &ns, id.clone()).await {
            Ok(()) => {
                tracing::info!(namespace = %ns, container_id = %id, "removed a container its client removes with its task, left without one")
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, container_id = %id, error = %e.message(), "remove a container left without its task")
            }
        }
    }
}

/// Containers.Delete: the record, the root the image store made for it, the event. Refused
/// while the container has a task. Also what Tasks.Delete does after the task with the
/// `switchyard-remove-container` header (`server/tasks.rs`).
pub(super) async fn delete_container(shared: &Shared, ns: &str, id: String) -> Result<(), Status> {
    if shared.tasks.exists(ns, &id) {
        return Err(status(Simple::new(
            Kind::FailedPrecondition,
            format!("container {id:?} has a task: delete the task first"),
        )));
    }
    let (n, i) = (ns.to_owned(), id.clone());
    let record = shared
        .store
        .run(move |s| {
            let c = s.get_container(&n, &i)?;
            s.delete_container(&n, &i)?;
            Ok(c)
        })
        .await
        .map_err(status)?;
    shared.store.sync_soon();
    // A root made by the image store goes with its container (containerd leaves that to
    // the client; `ctr run --rm` and `yard rm` both end here).
    let (images, n) = (shared.images.clone(), ns.to_owned());
    let _ = tokio::task::spawn_blocking(move || {
        super::images::release_rootfs(
            &images,
            &n,
            &record.id,
            &record.snapshotter,
            &record.snapshot_key,
        )
    })
    .await;
    shared.exchange.publish(
        ns,
        topics::CONTAINER_DELETE,
        to_any(&ContainerDelete { id }),
    );
    Ok(())
}
