//! `switchyard.images.v1`: pulls, imports, listing, removal, collection and container roots,
//! adapted onto the image store. Pulls and imports run to completion in the daemon even if the
//! client goes away, so a half-done transfer never depends on a CLI staying alive.

use std::io::Read;
use std::sync::Arc;

use switchyard_api::containerd::types::Mount;
use switchyard_api::switchyard::images::v1 as api;
use switchyard_images::registry::RegistryError;
use switchyard_images::{ImageError, ImageStore, Platform, Progress, PullOptions, RootfsKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Shared, blocking, namespace, timestamp_ms};
use crate::error::{Classify, Kind, Simple, status};

pub struct ImagesService(pub Arc<Shared>);

/// The runtime whose containers get the image's EROFS file instead of a writable mount: the
/// guest agent makes the writable layer inside the VM.
const VM_RUNTIME_TYPE: &str = "io.containerd.yard-vm.v1";
/// The runtime name a Wasm image runs on when the client names none (the default config's).
const WASM_RUNTIME: &str = "wasm";
/// The wasm shim's runtime type: a root handed to it holds no device node or fifo, whatever
/// the image says (see `ImageStore::prepare_for`).
const WASM_RUNTIME_TYPE: &str = "io.containerd.yard-wasm.v1";

impl Classify for ImageError {
    fn kind(&self) -> Kind {
        use switchyard_images::content::ContentError as C;
        use switchyard_images::snapshot::SnapshotError as S;
        use switchyard_images::unpack::UnpackError as U;
        match self {
            ImageError::NotFound { .. } => Kind::NotFound,
            ImageError::Reference { .. }
            | ImageError::Import(_)
            | ImageError::User { .. }
            | ImageError::Manifest(_) => Kind::InvalidArgument,
            ImageError::Registry { source, .. } if source.is_not_found() => Kind::NotFound,
            ImageError::Registry { source, .. } if source.is_unauthorized() => {
                Kind::FailedPrecondition
            }
            ImageError::Registry { source, .. }
                if matches!(**source, RegistryError::NoEndpoint { .. }) =>
            {
                Kind::FailedPrecondition
            }
            ImageError::Registry { .. } => Kind::Unavailable,
            ImageError::Hosts(_) => Kind::FailedPrecondition,
            ImageError::Content(
                C::DigestMismatch { .. }
                | C::SizeMismatch { .. }
                | C::BadDigest(_)
                | C::TooLarge { .. },
            ) => Kind::InvalidArgument,
            ImageError::Content(C::NotFound(_)) => Kind::FailedPrecondition,
            ImageError::Snapshot(S::Unpack {
                source: U::Io { .. },
                ..
            }) => Kind::Internal,
            ImageError::Snapshot(S::Unpack { .. } | S::DiffId { .. } | S::BadKey { .. }) => {
                Kind::InvalidArgument
            }
            ImageError::Snapshot(S::ActiveExists { .. }) => Kind::AlreadyExists,
            ImageError::Snapshot(S::NotFound { .. } | S::ActiveNotFound { .. }) => Kind::NotFound,
            ImageError::Snapshot(S::Image { .. } | S::TooDeep { .. }) => Kind::FailedPrecondition,
            _ => Kind::Internal,
        }
    }
}

fn progress(p: Progress) -> api::Progress {
    let mut out = api::Progress::default();
    match p {
        Progress::Resolved {
            name,
            digest,
            layers,
            bytes,
        } => {
            out.phase = "resolved".into();
            out.name = name;
            out.digest = digest;
            out.current = layers;
            out.total = bytes;
        }
        Progress::Source { name, url } => {
            out.phase = "source".into();
            out.name = name;
            out.digest = url;
        }
        Progress::Fetch {
            digest,
            current,
            total,
        } => {
            out.phase = "fetch".into();
            out.digest = digest;
            out.current = current;
            out.total = total;
        }
        Progress::Fetched { digest, cached } => {
            out.phase = if cached { "cached" } else { "fetched" }.into();
            out.digest = digest;
        }
        Progress::Unpack { digest } => {
            out.phase = "unpack".into();
            out.digest = digest;
        }
        Progress::Stored { name, digest } => {
            out.phase = "stored".into();
            out.name = name;
            out.digest = digest;
        }
    }
    out
}

/// Whether container `ns/id` exists (its root must survive a collection).
fn container_exists(shared: &Shared, ns: &str, id: &str) -> bool {
    !matches!(
        shared.store.get_container(ns, id),
        Err(crate::metadata::StoreError::NotFound { .. })
    )
}

/// Collects what nothing references (after a removal).
pub(crate) fn collect(shared: &Shared) -> Result<api::PruneResponse, Status> {
    let r = shared
        .images
        .gc(&|ns, id| container_exists(shared, ns, id))
        .map_err(status)?;
    Ok(api::PruneResponse {
        blobs: r.blobs,
        blob_bytes: r.blob_bytes,
        snapshots: r.snapshots,
        active: r.active,
    })
}

/// A `Read` over chunks arriving on a channel (an import's request stream).
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[tonic::async_trait]
impl api::images_server::Images for ImagesService {
    async fn pull(
        &self,
        req: Request<api::PullRequest>,
    ) -> Result<Response<BoxStream<api::Progress>>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let platform = if r.platform.is_empty() {
            None
        } else {
            Some(Platform::parse(&r.platform).map_err(|e| {
                status(Simple::new(Kind::InvalidArgument, format!("platform: {e}")))
            })?)
        };
        let opts = PullOptions {
            platform,
            auth: (!r.username.is_empty()).then(|| (r.username.clone(), r.password.clone())),
            plain_http: r.plain_http,
            concurrency: 0,
            hosts: self.0.registry_hosts.clone(),
        };
        let shared = self.0.clone();
        let n = ns.clone();
        shared
            .store
            .run(move |s| s.ensure_ns(&n))
            .await
            .map_err(status)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let report_tx = tx.clone();
            let report = move |p: Progress| {
                let _ = report_tx.send(Ok(progress(p)));
            };
            let result = shared.images.pull(&ns, &r.reference, &opts, &report).await;
            if let Err(e) = result {
                tracing::warn!(reference = %r.reference, error = %crate::error::chain(&e), "pull failed");
                let _ = tx.send(Err(status(e)));
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn import(
        &self,
        req: Request<Streaming<api::ImportRequest>>,
    ) -> Result<Response<BoxStream<api::Progress>>, Status> {
        let ns = namespace(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.unwrap_or_default();
        let name = (!first.name.is_empty()).then_some(first.name);
        let shared = self.0.clone();
        let n = ns.clone();
        shared
            .store
            .run(move |s| s.ensure_ns(&n))
            .await
            .map_err(status)?;
        let (chunk_tx, chunk_rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(16);
        tokio::spawn(async move {
            if !first.data.is_empty() && chunk_tx.send(Ok(first.data)).await.is_err() {
                return;
            }
            loop {
                let next = match inbound.message().await {
                    Ok(Some(m)) => Ok(m.data),
                    Ok(None) => break,
                    Err(e) => Err(std::io::Error::other(format!("import stream: {e}"))),
                };
                let stop = next.is_err();
                if chunk_tx.send(next).await.is_err() || stop {
                    break;
                }
            }
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::task::spawn_blocking(move || {
            let report_tx = tx.clone();
            let report = move |p: Progress| {
                let _ = report_tx.send(Ok(progress(p)));
            };
            let reader = ChannelReader {
                rx: chunk_rx,
                buf: Vec::new(),
                pos: 0,
            };
            if let Err(e) = shared.images.import(&ns, reader, name.as_deref(), &report) {
                tracing::warn!(error = %crate::error::chain(&e), "import failed");
                let _ = tx.send(Err(status(e)));
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn list(
        &self,
        req: Request<api::ListImagesRequest>,
    ) -> Result<Response<api::ListImagesResponse>, Status> {
        let ns = namespace(&req)?;
        let images = self.0.images.clone();
        blocking(move || {
            let list = images.list(&ns).map_err(status)?;
            let usage = images.usage().map_err(status)?;
            Ok(api::ListImagesResponse {
                images: list
                    .into_iter()
                    .map(|s| api::Image {
                        name: s.record.name,
                        media_type: s.record.target.media_type,
                        digest: s.record.target.digest,
                        manifest: s.manifest,
                        platform: s.record.platform,
                        size: s.size,
                        unpacked: s.unpacked,
                        layers: s.layers,
                        wasm: s.wasm,
                        created_at: Some(timestamp_ms(s.record.created_ms)),
                        updated_at: Some(timestamp_ms(s.record.updated_ms)),
                        problem: s.problem.unwrap_or_default(),
                    })
                    .collect(),
                usage: Some(api::Usage {
                    blobs: usage.blobs,
                    blob_bytes: usage.blob_bytes,
                    snapshots: usage.snapshots,
                    snapshot_bytes: usage.snapshot_bytes,
                    snapshotter: match images.snapshots().driver() {
                        switchyard_images::snapshot::Driver::Overlay => "overlayfs".into(),
                        switchyard_images::snapshot::Driver::Copy => "copy".into(),
                    },
                }),
            })
        })
        .await
        .map(Response::new)
    }

    async fn remove(
        &self,
        req: Request<api::RemoveImagesRequest>,
    ) -> Result<Response<api::RemoveImagesResponse>, Status> {
        let ns = namespace(&req)?;
        let names = req.into_inner().names;
        let shared = self.0.clone();
        blocking(move || {
            let removed = shared.images.remove(&ns, &names).map_err(status)?;
            let collected = collect(&shared)?;
            Ok(api::RemoveImagesResponse {
                removed,
                collected: Some(collected),
            })
        })
        .await
        .map(Response::new)
    }

    async fn prune(
        &self,
        _req: Request<api::PruneRequest>,
    ) -> Result<Response<api::PruneResponse>, Status> {
        let shared = self.0.clone();
        blocking(move || collect(&shared)).await.map(Response::new)
    }

    async fn prepare(
        &self,
        req: Request<api::PrepareRequest>,
    ) -> Result<Response<api::PrepareResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        crate::ident::check("key", &r.key).map_err(status)?;
        // A Wasm image without a runtime goes to the wasm runtime (when one is configured),
        // whatever the default runtime is.
        let mut chosen = String::new();
        if r.runtime.is_empty() {
            let (images, n, name) = (self.0.images.clone(), ns.clone(), r.image.clone());
            let wasm = blocking(move || images.is_wasm(&n, &name).map_err(status)).await?;
            if wasm && self.0.tasks.runtimes().resolve(WASM_RUNTIME).is_ok() {
                chosen = WASM_RUNTIME.to_owned();
            }
        }
        let runtime = if chosen.is_empty() {
            r.runtime.clone()
        } else {
            chosen.clone()
        };
        let runtime_type = self
            .0
            .tasks
            .runtimes()
            .resolve(&runtime)
            .map(|rt| rt.runtime_type.clone());
        let for_wasm = runtime_type
            .as_deref()
            .is_ok_and(|t| t == WASM_RUNTIME_TYPE);
        let kind = match r.rootfs.as_str() {
            "" => {
                if runtime_type.map_err(status)? == VM_RUNTIME_TYPE {
                    RootfsKind::Erofs
                } else {
                    RootfsKind::Mounts
                }
            }
            "mounts" => RootfsKind::Mounts,
            "erofs" => RootfsKind::Erofs,
            other => {
                return Err(status(Simple::new(
                    Kind::InvalidArgument,
                    format!("rootfs {other:?}: expected \"mounts\" or \"erofs\""),
                )));
            }
        };
        let images = self.0.images.clone();
        blocking(move || {
            let p = images
                .prepare_for(&ns, &r.image, &r.key, kind, for_wasm)
                .map_err(status)?;
            Ok(api::PrepareResponse {
                image: p.name,
                mounts: p
                    .mounts
                    .into_iter()
                    .map(|m| Mount {
                        r#type: m.kind,
                        source: m.source,
                        options: m.options,
                        ..Default::default()
                    })
                    .collect(),
                entrypoint: p.run.entrypoint,
                cmd: p.run.cmd,
                env: p.run.env,
                working_dir: p.run.working_dir,
                uid: p.uid,
                gid: p.gid,
                wasm: p.run.wasm,
                snapshotter: match kind {
                    RootfsKind::Mounts => switchyard_images::SNAPSHOTTER.into(),
                    RootfsKind::Erofs => String::new(),
                },
                rootfs: match kind {
                    RootfsKind::Mounts => "mounts".into(),
                    RootfsKind::Erofs => "erofs".into(),
                },
                runtime: chosen,
            })
        })
        .await
        .map(Response::new)
    }

    async fn release(
        &self,
        req: Request<api::ReleaseRequest>,
    ) -> Result<Response<api::ReleaseResponse>, Status> {
        let ns = namespace(&req)?;
        let key = req.into_inner().key;
        crate::ident::check("key", &key).map_err(status)?;
        let shared = self.0.clone();
        blocking(move || {
            if container_exists(&shared, &ns, &key) {
                return Err(status(Simple::new(
                    Kind::FailedPrecondition,
                    format!("container {key:?} exists: its root goes when it is deleted"),
                )));
            }
            shared.images.remove_rootfs(&ns, &key).map_err(status)?;
            Ok(api::ReleaseResponse {})
        })
        .await
        .map(Response::new)
    }
}

/// Removes the active snapshot of a deleted container whose root came from the image store.
pub fn release_rootfs(images: &ImageStore, ns: &str, id: &str, snapshotter: &str, key: &str) {
    // Only the root named after this container: a record naming another container's key
    // (any client can write one) must not remove that container's root.
    if snapshotter != switchyard_images::SNAPSHOTTER || key != id {
        return;
    }
    if let Err(e) = images.remove_rootfs(ns, key) {
        tracing::warn!(namespace = ns, key, error = %crate::error::chain(&e), "remove a container's snapshot");
    }
}

#[cfg(test)]
mod tests {
    use switchyard_images::content::ContentError;
    use switchyard_images::registry::RegistryError;
    use switchyard_images::snapshot::SnapshotError;
    use switchyard_images::unpack::UnpackError;

    use super::*;

    #[test]
    fn image_errors_map_to_containerd_codes() {
        let registry = |e| ImageError::Registry {
            reference: "r".into(),
            source: Box::new(e),
        };
        let status = |status: u16, code: &str| RegistryError::Status {
            url: "u".into(),
            status,
            codes: vec![code.to_owned()],
            message: "m".into(),
        };
        let cases: Vec<(ImageError, Kind)> = vec![
            (ImageError::NotFound { name: "x".into() }, Kind::NotFound),
            (registry(status(404, "MANIFEST_UNKNOWN")), Kind::NotFound),
            (
                registry(status(401, "UNAUTHORIZED")),
                Kind::FailedPrecondition,
            ),
            (registry(status(503, "UNAVAILABLE")), Kind::Unavailable),
            (
                registry(RegistryError::TooLarge {
                    url: "u".into(),
                    limit: 4 << 20,
                }),
                Kind::Unavailable,
            ),
            (
                ImageError::Content(ContentError::DigestMismatch {
                    expected: "a".into(),
                    actual: "b".into(),
                }),
                Kind::InvalidArgument,
            ),
            (
                ImageError::Snapshot(SnapshotError::Unpack {
                    layer: "l".into(),
                    source: UnpackError::Escape {
                        entry: "../x".into(),
                        reason: "r".into(),
                    },
                }),
                Kind::InvalidArgument,
            ),
            (
                ImageError::Snapshot(SnapshotError::Unpack {
                    layer: "l".into(),
                    source: UnpackError::Io {
                        entry: "x".into(),
                        op: "write",
                        source: std::io::Error::other("disk full"),
                    },
                }),
                Kind::Internal,
            ),
            (
                ImageError::Snapshot(SnapshotError::ActiveExists { key: "k".into() }),
                Kind::AlreadyExists,
            ),
            (
                ImageError::Import("truncated".into()),
                Kind::InvalidArgument,
            ),
            // The hosts configuration is the node's, not the request's.
            (
                registry(RegistryError::NoEndpoint {
                    namespace: "registry.k8s.io".into(),
                    what: "resolve a tag",
                }),
                Kind::FailedPrecondition,
            ),
            (
                ImageError::Hosts(switchyard_images::HostsError::Namespace {
                    namespace: "..".into(),
                }),
                Kind::FailedPrecondition,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.kind(), want, "{e}");
        }
    }
}
