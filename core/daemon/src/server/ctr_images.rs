//! containerd's `images.v1` over the image store: Get, List (filters `name`, `target.digest`,
//! `target.mediatype`) and Delete, so `ctr image ls` and `ctr image rm` see what `yard pull`
//! and `yard image import` stored. Create and Update stay UNIMPLEMENTED: they name content a
//! client wrote through `content.v1`, which switchyardd does not serve.

use std::sync::Arc;

use switchyard_api::containerd::services::images::v1 as api;
use switchyard_api::containerd::types::Descriptor;
use switchyard_images::ImageRecord;
use tonic::{Request, Response, Status};

use super::{Shared, blocking, namespace, timestamp_ms as ts};
use crate::error::{Kind, Simple, status};
use crate::filters::{Adaptor, Filter};

pub struct CtrImagesService(pub Arc<Shared>);

fn image(r: ImageRecord) -> api::Image {
    api::Image {
        name: r.name,
        labels: Default::default(),
        target: Some(Descriptor {
            media_type: r.target.media_type,
            digest: r.target.digest,
            size: i64::try_from(r.target.size).unwrap_or(i64::MAX),
            annotations: Default::default(),
        }),
        created_at: Some(ts(r.created_ms)),
        updated_at: Some(ts(r.updated_ms)),
    }
}

struct ImageFields<'a>(&'a api::Image);

impl Adaptor for ImageFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let t = self.0.target.as_ref();
        match p.as_slice() {
            ["name"] => Some(self.0.name.clone()),
            ["target", "digest"] => t.map(|t| t.digest.clone()),
            ["target", "mediatype"] => t.map(|t| t.media_type.clone()),
            _ => None,
        }
    }
}

#[tonic::async_trait]
impl api::images_server::Images for CtrImagesService {
    async fn get(
        &self,
        req: Request<api::GetImageRequest>,
    ) -> Result<Response<api::GetImageResponse>, Status> {
        let ns = namespace(&req)?;
        let name = req.into_inner().name;
        let images = self.0.images.clone();
        blocking(move || {
            let r = images.get(&ns, &name).map_err(status)?;
            Ok(api::GetImageResponse {
                image: Some(image(r)),
            })
        })
        .await
        .map(Response::new)
    }

    async fn list(
        &self,
        req: Request<api::ListImagesRequest>,
    ) -> Result<Response<api::ListImagesResponse>, Status> {
        let ns = namespace(&req)?;
        let filter = Filter::parse(&req.into_inner().filters).map_err(status)?;
        let images = self.0.images.clone();
        blocking(move || {
            let list = images
                .records(Some(&ns))
                .map_err(status)?
                .into_iter()
                .map(|(_, r)| image(r))
                .filter(|i| filter.matches(&ImageFields(i)))
                .collect();
            Ok(api::ListImagesResponse { images: list })
        })
        .await
        .map(Response::new)
    }

    async fn delete(&self, req: Request<api::DeleteImageRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let shared = self.0.clone();
        blocking(move || {
            let rec = shared.images.get(&ns, &r.name).map_err(status)?;
            if let Some(t) = &r.target
                && t.digest != rec.target.digest
            {
                return Err(status(Simple::new(
                    Kind::FailedPrecondition,
                    format!(
                        "image {:?} points at {}, not {}",
                        r.name, rec.target.digest, t.digest
                    ),
                )));
            }
            shared
                .images
                .remove(&ns, std::slice::from_ref(&r.name))
                .map_err(status)?;
            super::images::collect(&shared)?;
            Ok(())
        })
        .await
        .map(Response::new)
    }
}
