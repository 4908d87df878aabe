//! `runtime.v1.ImageService` over the image store, in the `k8s.io` namespace. An image's id is
//! its config's digest, as containerd's CRI has it; its names are its tags, its manifest (or
//! index) digest gives its repo digests.

use std::sync::Arc;

use base64::Engine as _;
use switchyard_api::cri::v1 as cri;
use switchyard_images::{ImageSummary, PullOptions, normalize};
use tonic::{Request, Response, Status};

use super::{Cri, NAMESPACE};
use crate::error::status;
use crate::server::blocking;

#[derive(Clone)]
pub struct ImageService(pub Arc<Cri>);

/// `repo` of `repo:tag` or `repo@digest` (a port's colon is not a tag's).
fn repository(name: &str) -> &str {
    if let Some((repo, _)) = name.split_once('@') {
        return repo;
    }
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

/// The CRI images of `ns`: the store's records grouped by image id.
pub(super) fn images(list: Vec<ImageSummary>) -> Vec<cri::Image> {
    let mut out: Vec<cri::Image> = Vec::new();
    for s in list.into_iter().filter(|s| !s.config.is_empty()) {
        let digest = format!("{}@{}", repository(&s.record.name), s.record.target.digest);
        let tagged = !s.record.name.contains('@');
        let i = match out.iter().position(|i| i.id == s.config) {
            Some(i) => i,
            None => {
                let uid = s.user.split(':').next().and_then(|u| u.parse::<i64>().ok());
                out.push(cri::Image {
                    id: s.config.clone(),
                    size: s.size,
                    uid: uid.map(|value| cri::Int64Value { value }),
                    username: if uid.is_some() {
                        String::new()
                    } else {
                        s.user.split(':').next().unwrap_or("").to_owned()
                    },
                    spec: Some(cri::ImageSpec {
                        image: s.config.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let image = &mut out[i];
        if tagged && !image.repo_tags.contains(&s.record.name) {
            image.repo_tags.push(s.record.name.clone());
        }
        if !image.repo_digests.contains(&digest) {
            image.repo_digests.push(digest);
        }
    }
    out
}

/// The image `reference` names: a name (normalized as `yard pull` does), an id, or an id's
/// unambiguous hex prefix.
pub(super) fn find(all: Vec<cri::Image>, reference: &str) -> Option<cri::Image> {
    let name = normalize(reference).ok();
    let by_name = all.iter().position(|i| {
        name.as_ref()
            .is_some_and(|n| i.repo_tags.contains(n) || i.repo_digests.contains(n))
    });
    if let Some(i) = by_name {
        return all.into_iter().nth(i);
    }
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut matching = all
        .into_iter()
        .filter(|i| i.id.trim_start_matches("sha256:").starts_with(hex));
    let first = matching.next()?;
    matching.next().is_none().then_some(first)
}

impl ImageService {
    async fn list(&self) -> Result<Vec<cri::Image>, Status> {
        let store = self.0.shared.images.clone();
        blocking(move || store.list(NAMESPACE).map(images).map_err(status)).await
    }

    async fn lookup(&self, spec: Option<cri::ImageSpec>) -> Result<Option<cri::Image>, Status> {
        let reference = spec.map(|s| s.image).unwrap_or_default();
        if reference.is_empty() {
            return Err(Status::invalid_argument("image.image: empty"));
        }
        Ok(find(self.list().await?, &reference))
    }
}

/// A registry login from CRI's `AuthConfig`: username and password, or `auth` (base64 of
/// `user:password`). Tokens are not supported.
fn credentials(auth: Option<cri::AuthConfig>) -> Result<Option<(String, String)>, Status> {
    let Some(a) = auth else { return Ok(None) };
    if !a.username.is_empty() {
        return Ok(Some((a.username, a.password)));
    }
    if !a.auth.is_empty() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|e| Status::invalid_argument(format!("auth.auth: not base64: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Status::invalid_argument("auth.auth: not UTF-8"))?;
        let (user, password) = text
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth.auth: not user:password"))?;
        return Ok(Some((user.to_owned(), password.to_owned())));
    }
    if !a.identity_token.is_empty() || !a.registry_token.is_empty() {
        return Err(Status::invalid_argument(
            "auth: identity_token and registry_token are not supported; give username and \
             password",
        ));
    }
    Ok(None)
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageService {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .unwrap_or_default();
        let all = self.list().await?;
        let images = if filter.is_empty() {
            all
        } else {
            find(all, &filter).into_iter().collect()
        };
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let r = req.into_inner();
        let image = self.lookup(r.image).await?;
        let mut info = std::collections::HashMap::new();
        if r.verbose
            && let Some(i) = &image
        {
            let v = serde_json::json!({
                "id": i.id,
                "repoTags": i.repo_tags,
                "repoDigests": i.repo_digests,
                "size": i.size,
                "namespace": NAMESPACE,
            });
            info.insert("info".to_owned(), v.to_string());
        }
        Ok(Response::new(cri::ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = req.into_inner();
        let reference = r.image.map(|s| s.image).unwrap_or_default();
        if reference.is_empty() {
            return Err(Status::invalid_argument("image.image: empty"));
        }
        let name =
            normalize(&reference).map_err(|e| Status::invalid_argument(format!("image: {e}")))?;
        let opts = PullOptions {
            platform: None,
            auth: credentials(r.auth)?,
            plain_http: false,
            concurrency: 0,
            hosts: self.0.shared.registry_hosts.clone(),
        };
        let shared = self.0.shared.clone();
        shared
            .store
            .run(|s| s.ensure_ns(NAMESPACE))
            .await
            .map_err(status)?;
        let report = |_: switchyard_images::Progress| {};
        shared
            .images
            .pull(NAMESPACE, &name, &opts, &report)
            .await
            .map_err(|e| {
                tracing::warn!(image = %name, error = %crate::error::chain(&e), "CRI pull failed");
                status(e)
            })?;
        let image = find(self.list().await?, &name)
            .ok_or_else(|| Status::internal(format!("{name}: pulled but not listed")))?;
        tracing::info!(image = %name, id = %image.id, "CRI pull");
        Ok(Response::new(cri::PullImageResponse {
            image_ref: image.id,
        }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        // Removing an image that is not there succeeds (CRI: idempotent). Every name of the
        // image goes, then what nothing else uses.
        let Some(image) = self.lookup(req.into_inner().image).await? else {
            return Ok(Response::new(cri::RemoveImageResponse {}));
        };
        let shared = self.0.shared.clone();
        blocking(move || {
            let names: Vec<String> = shared
                .images
                .list(NAMESPACE)
                .map_err(status)?
                .into_iter()
                .filter(|s| s.config == image.id)
                .map(|s| s.record.name)
                .collect();
            shared.images.remove(NAMESPACE, &names).map_err(status)?;
            crate::server::collect(&shared).map(drop)
        })
        .await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let store = self.0.shared.images.clone();
        let (usage, (content, snapshots)) =
            blocking(move || Ok((store.usage().map_err(status)?, store.paths()))).await?;
        let timestamp = super::now_nanos();
        let fs = |path: &std::path::Path, used: u64, inodes: u64| cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: path.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: used }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![
                fs(&content, usage.blob_bytes, usage.blobs),
                fs(&snapshots, usage.snapshot_bytes, usage.snapshots),
            ],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_of_names() {
        assert_eq!(
            repository("docker.io/library/busybox:1"),
            "docker.io/library/busybox"
        );
        assert_eq!(repository("localhost:5000/app"), "localhost:5000/app");
        assert_eq!(repository("localhost:5000/app:2"), "localhost:5000/app");
        assert_eq!(repository("x.io/a@sha256:ab"), "x.io/a");
    }

    #[test]
    fn credentials_from_auth_config() {
        let auth = |a: cri::AuthConfig| credentials(Some(a));
        assert_eq!(
            auth(cri::AuthConfig {
                auth: "dTpwOng=".into(),
                ..Default::default()
            })
            .unwrap(),
            Some(("u".into(), "p:x".into()))
        );
        assert!(
            auth(cri::AuthConfig {
                auth: "!!".into(),
                ..Default::default()
            })
            .unwrap_err()
            .message()
            .contains("auth.auth")
        );
        assert!(
            auth(cri::AuthConfig {
                registry_token: "t".into(),
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!(credentials(None).unwrap(), None);
    }
}
