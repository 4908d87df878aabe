//! `leases.v1`: clients (ctr among them) take a lease around every operation. Leases and
//! their resources are recorded; content and snapshots they will protect arrive with images.

use std::sync::Arc;

use switchyard_api::containerd::services::leases::v1 as api;
use tonic::{Request, Response, Status};

use super::{Shared, namespace};
use crate::error::{Kind, Simple, status};
use crate::filters::{Adaptor, Filter};

pub struct LeasesService(pub Arc<Shared>);

struct LeaseFields<'a>(&'a api::Lease);

impl Adaptor for LeaseFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.0.id.clone()),
            [f, k] if f == "labels" => self.0.labels.get(k).cloned(),
            _ => None,
        }
    }
}

fn required(r: Option<api::Resource>) -> Result<api::Resource, Status> {
    r.ok_or_else(|| status(Simple::new(Kind::InvalidArgument, "resource is required")))
}

#[tonic::async_trait]
impl api::leases_server::Leases for LeasesService {
    async fn create(
        &self,
        req: Request<api::CreateRequest>,
    ) -> Result<Response<api::CreateResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let lease = api::Lease {
            id: r.id,
            created_at: None,
            labels: r.labels,
        };
        let lease = self
            .0
            .store
            .run(move |s| s.create_lease(&ns, lease))
            .await
            .map_err(status)?;
        Ok(Response::new(api::CreateResponse { lease: Some(lease) }))
    }

    async fn delete(&self, req: Request<api::DeleteRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().id;
        self.0
            .store
            .run(move |s| s.delete_lease(&ns, &id))
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn list(
        &self,
        req: Request<api::ListRequest>,
    ) -> Result<Response<api::ListResponse>, Status> {
        let ns = namespace(&req)?;
        let filter = Filter::parse(&req.get_ref().filters).map_err(status)?;
        let leases = self
            .0
            .store
            .run(move |s| s.list_leases(&ns))
            .await
            .map_err(status)?
            .into_iter()
            .filter(|l| filter.matches(&LeaseFields(l)))
            .collect();
        Ok(Response::new(api::ListResponse { leases }))
    }

    async fn add_resource(
        &self,
        req: Request<api::AddResourceRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let res = required(r.resource)?;
        self.0
            .store
            .run(move |s| s.add_lease_resource(&ns, &r.id, &res))
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn delete_resource(
        &self,
        req: Request<api::DeleteResourceRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let res = required(r.resource)?;
        self.0
            .store
            .run(move |s| s.delete_lease_resource(&ns, &r.id, &res))
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn list_resources(
        &self,
        req: Request<api::ListResourcesRequest>,
    ) -> Result<Response<api::ListResourcesResponse>, Status> {
        let ns = namespace(&req)?;
        let id = req.into_inner().id;
        let resources = self
            .0
            .store
            .run(move |s| s.list_lease_resources(&ns, &id))
            .await
            .map_err(status)?;
        Ok(Response::new(api::ListResourcesResponse { resources }))
    }
}
