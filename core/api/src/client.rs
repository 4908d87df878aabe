//! Connecting to containerd-API servers (switchyardd, containerd) over a Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// The metadata header carrying the containerd namespace of a request.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Switchyard's own metadata header on `Tasks.Create`: with the value `1`, switchyardd starts
/// the task as soon as it is created and answers with the pid Start returned (`yard run` in
/// one round trip instead of two), with this header set to `1` in the response's metadata.
/// containerd ignores it: a client that sees no such header in the answer sends Start itself.
pub const START_HEADER: &str = "switchyard-start";

/// Switchyard's own metadata header on `Tasks.Delete`: with the value `1`, switchyardd removes
/// the container as Containers.Delete would once its task is deleted (`yard run --rm` in one
/// round trip instead of two), and sets this header to `1` in the response's metadata when it
/// did. A client that sees no such header in the answer (containerd ignores it; or the
/// container could not be removed) sends Containers.Delete itself.
pub const REMOVE_HEADER: &str = "switchyard-remove-container";

/// Label of a container record (value `true`) that its client removes with its task, as
/// `yard run --rm` does: switchyardd writes the record's create and delete without waiting for
/// the disk, makes them durable in the background (before any task of the container exists),
/// and at its start removes such a record whose task is gone (one a crash kept from its
/// removal). containerd keeps it as an ordinary label.
pub const REMOVE_LABEL: &str = "io.switchyard.rm";

/// Sets one of Switchyard's flag headers ([`START_HEADER`], [`REMOVE_HEADER`]) to `1`.
pub fn set_flag(metadata: &mut tonic::metadata::MetadataMap, header: &'static str) {
    metadata.insert(header, tonic::metadata::MetadataValue::from_static("1"));
}

/// Whether one of Switchyard's flag headers is set (to `1`) in a request's or answer's metadata.
pub fn flag(metadata: &tonic::metadata::MetadataMap, header: &str) -> bool {
    metadata.get(header).is_some_and(|v| v.as_bytes() == b"1")
}

/// Opens a gRPC channel to the Unix socket at `path` (an optional `unix://` prefix is removed).
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let raw = path.as_ref().to_string_lossy();
    let path = PathBuf::from(raw.strip_prefix("unix://").unwrap_or(&raw));
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Adds the namespace header to every request.
#[derive(Debug, Clone)]
pub struct WithNamespace(pub AsciiMetadataValue);

impl WithNamespace {
    /// `None` when `ns` cannot be a header value.
    pub fn new(ns: &str) -> Option<Self> {
        ns.parse().ok().map(WithNamespace)
    }
}

impl Interceptor for WithNamespace {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(NAMESPACE_HEADER, self.0.clone());
        Ok(req)
    }
}
