//! `namespaces.v1`.

use std::sync::Arc;

use switchyard_api::containerd::events::{NamespaceCreate, NamespaceDelete, NamespaceUpdate};
use switchyard_api::containerd::services::namespaces::v1 as api;
use switchyard_api::events::topics;
use switchyard_api::typeurl::to_any;
use tonic::{Request, Response, Status};

use super::Shared;
use crate::error::{Kind, Simple, status};

pub struct NamespacesService(pub Arc<Shared>);

fn required(ns: Option<api::Namespace>) -> Result<api::Namespace, Status> {
    ns.ok_or_else(|| status(Simple::new(Kind::InvalidArgument, "namespace is required")))
}

#[tonic::async_trait]
impl api::namespaces_server::Namespaces for NamespacesService {
    async fn get(
        &self,
        req: Request<api::GetNamespaceRequest>,
    ) -> Result<Response<api::GetNamespaceResponse>, Status> {
        let name = req.into_inner().name;
        let ns = self
            .0
            .store
            .run(move |s| s.get_namespace(&name))
            .await
            .map_err(status)?;
        Ok(Response::new(api::GetNamespaceResponse {
            namespace: Some(ns),
        }))
    }

    async fn list(
        &self,
        _: Request<api::ListNamespacesRequest>,
    ) -> Result<Response<api::ListNamespacesResponse>, Status> {
        let namespaces = self
            .0
            .store
            .run(|s| s.list_namespaces())
            .await
            .map_err(status)?;
        Ok(Response::new(api::ListNamespacesResponse { namespaces }))
    }

    async fn create(
        &self,
        req: Request<api::CreateNamespaceRequest>,
    ) -> Result<Response<api::CreateNamespaceResponse>, Status> {
        let ns = required(req.into_inner().namespace)?;
        let ns = self
            .0
            .store
            .run(move |s| s.create_namespace(ns))
            .await
            .map_err(status)?;
        self.0.exchange.publish(
            &ns.name,
            topics::NAMESPACE_CREATE,
            to_any(&NamespaceCreate {
                name: ns.name.clone(),
                labels: ns.labels.clone(),
            }),
        );
        Ok(Response::new(api::CreateNamespaceResponse {
            namespace: Some(ns),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateNamespaceRequest>,
    ) -> Result<Response<api::UpdateNamespaceResponse>, Status> {
        let req = req.into_inner();
        let ns = required(req.namespace)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let ns = self
            .0
            .store
            .run(move |s| s.update_namespace(ns, &paths))
            .await
            .map_err(status)?;
        self.0.exchange.publish(
            &ns.name,
            topics::NAMESPACE_UPDATE,
            to_any(&NamespaceUpdate {
                name: ns.name.clone(),
                labels: ns.labels.clone(),
            }),
        );
        Ok(Response::new(api::UpdateNamespaceResponse {
            namespace: Some(ns),
        }))
    }

    async fn delete(
        &self,
        req: Request<api::DeleteNamespaceRequest>,
    ) -> Result<Response<()>, Status> {
        let name = req.into_inner().name;
        let n = name.clone();
        self.0
            .store
            .run(move |s| s.delete_namespace(&n))
            .await
            .map_err(status)?;
        self.0.exchange.publish(
            &name,
            topics::NAMESPACE_DELETE,
            to_any(&NamespaceDelete { name: name.clone() }),
        );
        Ok(Response::new(()))
    }
}
