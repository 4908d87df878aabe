//! The containerd client API over gRPC: thin adapters from tonic requests to the metadata
//! store, the task manager and the event exchange. Everything is served on one Unix socket.

pub(crate) mod containers;
mod ctr_images;
mod events;
pub(crate) mod images;
mod introspection;
mod leases;
mod namespaces;
pub(crate) mod tasks;

pub(crate) use images::collect;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use switchyard_api::client::NAMESPACE_HEADER;
use switchyard_api::containerd::services as svc;
use tonic::{Request, Status};

use crate::error::{Kind, Simple, status};
use crate::events::Exchange;
use crate::metadata::Store;
use crate::tasks::TaskManager;

/// What the services share.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub tasks: Arc<TaskManager>,
    pub exchange: Exchange,
    pub uuid: String,
    pub images: Arc<switchyard_images::ImageStore>,
    /// `[images] registry_config_path`, read afresh by every pull.
    pub registry_hosts: Option<switchyard_images::RegistryHosts>,
}

/// The namespace a request acts in, from the `containerd-namespace` header.
fn namespace<T>(req: &Request<T>) -> Result<String, Status> {
    let Some(v) = req.metadata().get(NAMESPACE_HEADER) else {
        return Err(status(Simple::new(
            Kind::FailedPrecondition,
            "namespace is required: send the containerd-namespace header (ctr -n NS, yard -n NS)",
        )));
    };
    let ns = v.to_str().map_err(|_| {
        status(Simple::new(
            Kind::InvalidArgument,
            "namespace header is not text",
        ))
    })?;
    crate::ident::check("namespace", ns).map_err(status)?;
    Ok(ns.to_owned())
}

/// Runs blocking store work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| status(Simple::new(Kind::Internal, format!("worker: {e}"))))?
}

/// Milliseconds since the epoch as a protobuf timestamp.
fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The gRPC services this daemon serves; requests for any other path are answered
/// UNIMPLEMENTED with a message naming the method, never left hanging.
const SERVED: &[&str] = &[
    "/containerd.services.version.v1.Version/",
    "/containerd.services.namespaces.v1.Namespaces/",
    "/containerd.services.leases.v1.Leases/",
    "/containerd.services.containers.v1.Containers/",
    "/containerd.services.tasks.v1.Tasks/",
    "/containerd.services.events.v1.Events/",
    "/containerd.services.introspection.v1.Introspection/",
    "/switchyard.images.v1.Images/",
    "/containerd.services.images.v1.Images/",
    "/runtime.v1.RuntimeService/",
    "/runtime.v1.ImageService/",
];

/// Default gRPC message limit, as containerd's.
const MAX_MESSAGE: usize = 16 << 20;

/// Serves the API and CRI on `path` (mode 0600) until `shutdown` resolves.
pub async fn serve(
    path: &Path,
    shared: Arc<Shared>,
    cri: Arc<crate::cri::Cri>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let listener = crate::sock::bind_unix(path)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    macro_rules! svc {
        ($server:ty, $inner:expr) => {
            <$server>::new($inner)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
        };
    }
    let s = shared;
    use switchyard_api::cri::v1 as cri_v1;
    tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(|inner| Unsupported { inner }))
        .add_service(svc!(
            svc::version::v1::version_server::VersionServer<_>,
            introspection::VersionService
        ))
        .add_service(svc!(
            svc::introspection::v1::introspection_server::IntrospectionServer<_>,
            introspection::IntrospectionService(s.clone())
        ))
        .add_service(svc!(
            svc::namespaces::v1::namespaces_server::NamespacesServer<_>,
            namespaces::NamespacesService(s.clone())
        ))
        .add_service(svc!(
            svc::leases::v1::leases_server::LeasesServer<_>,
            leases::LeasesService(s.clone())
        ))
        .add_service(svc!(
            svc::containers::v1::containers_server::ContainersServer<_>,
            containers::ContainersService(s.clone())
        ))
        .add_service(svc!(
            svc::tasks::v1::tasks_server::TasksServer<_>,
            tasks::TasksService(s.clone())
        ))
        .add_service(svc!(
            svc::events::v1::events_server::EventsServer<_>,
            events::EventsService(s.clone())
        ))
        .add_service(svc!(
            svc::images::v1::images_server::ImagesServer<_>,
            ctr_images::CtrImagesService(s.clone())
        ))
        .add_service(svc!(
            switchyard_api::switchyard::images::v1::images_server::ImagesServer<_>,
            images::ImagesService(s.clone())
        ))
        .add_service(svc!(
            cri_v1::runtime_service_server::RuntimeServiceServer<_>,
            crate::cri::RuntimeService(cri.clone())
        ))
        .add_service(svc!(
            cri_v1::image_service_server::ImageServiceServer<_>,
            crate::cri::ImageService(cri)
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| std::io::Error::other(format!("serve {}: {e}", path.display())))
}

/// tonic's answer for a method of a served service that has no implementation says only "Not
/// yet implemented": say which method, and that switchyardd does not serve it yet.
fn name_unimplemented(path: &str, headers: &mut http::HeaderMap) {
    let unimplemented = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"12");
    let default_message = headers.get("grpc-message").is_some_and(|v| {
        v.as_bytes().starts_with(b"Not%20yet%20implemented")
            || v.as_bytes().starts_with(b"Not yet implemented")
    });
    if unimplemented && default_message {
        let msg = format!("{path}: not implemented by switchyardd yet");
        tracing::debug!(%path, "unimplemented RPC");
        if let Ok(v) = http::HeaderValue::from_str(&msg) {
            headers.insert("grpc-message", v);
        }
    }
}

/// Answers requests for services switchyardd does not serve.
#[derive(Clone)]
struct Unsupported<S> {
    inner: S,
}

type BoxFut<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Unsupported<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFut<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        if SERVED.iter().any(|p| path.starts_with(p)) {
            let served = self.inner.call(req);
            Box::pin(async move {
                let mut response = served.await?;
                name_unimplemented(&path, response.headers_mut());
                Ok(response)
            })
        } else {
            let msg = format!(
                "{path}: not implemented by switchyardd (served: version, namespaces, leases, containers, tasks, events, introspection, images (Get, List, Delete), switchyard.images.v1)"
            );
            tracing::debug!(%path, "unimplemented RPC");
            Box::pin(async move { Ok(Status::unimplemented(msg).into_http()) })
        }
    }
}
