//! A connection to switchyardd (or anything speaking containerd's API) in one namespace.

use std::path::Path;

use anyhow::Context;
use switchyard_api::client::{WithNamespace, connect};
use switchyard_api::containerd::services as svc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Svc = InterceptedService<Channel, WithNamespace>;

/// The largest reply `yard` takes: containerd's clients' default receive limit (tonic's own is
/// 4 MiB, which a listing of 10,000 containers passes).
const MAX_REPLY: usize = 16 << 20;

/// Clients for the services `yard` uses.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    ns: WithNamespace,
    pub namespace: String,
}

impl Client {
    pub async fn connect(address: &Path, namespace: &str) -> anyhow::Result<Client> {
        let ns = WithNamespace::new(namespace)
            .with_context(|| format!("namespace {namespace:?} cannot be sent as a header"))?;
        let channel = connect(address).await.with_context(|| {
            format!(
                "cannot reach switchyardd at {} (is it running? set --address or SWITCHYARD_ADDRESS)",
                address.display()
            )
        })?;
        Ok(Client {
            channel,
            ns,
            namespace: namespace.to_owned(),
        })
    }

    pub fn containers(&self) -> svc::containers::v1::containers_client::ContainersClient<Svc> {
        svc::containers::v1::containers_client::ContainersClient::with_interceptor(
            self.channel.clone(),
            self.ns.clone(),
        )
        .max_decoding_message_size(MAX_REPLY)
    }

    pub fn tasks(&self) -> svc::tasks::v1::tasks_client::TasksClient<Svc> {
        svc::tasks::v1::tasks_client::TasksClient::with_interceptor(
            self.channel.clone(),
            self.ns.clone(),
        )
        .max_decoding_message_size(MAX_REPLY)
    }

    pub fn events(&self) -> svc::events::v1::events_client::EventsClient<Svc> {
        svc::events::v1::events_client::EventsClient::with_interceptor(
            self.channel.clone(),
            self.ns.clone(),
        )
    }

    /// CRI's runtime service on the same socket (no namespace: CRI has its own).
    pub fn cri_runtime(
        &self,
    ) -> switchyard_api::cri::v1::runtime_service_client::RuntimeServiceClient<Channel> {
        switchyard_api::cri::v1::runtime_service_client::RuntimeServiceClient::new(
            self.channel.clone(),
        )
        .max_decoding_message_size(MAX_REPLY)
    }

    pub fn version(&self) -> svc::version::v1::version_client::VersionClient<Svc> {
        svc::version::v1::version_client::VersionClient::with_interceptor(
            self.channel.clone(),
            self.ns.clone(),
        )
    }

    pub fn images(
        &self,
    ) -> switchyard_api::switchyard::images::v1::images_client::ImagesClient<Svc> {
        switchyard_api::switchyard::images::v1::images_client::ImagesClient::with_interceptor(
            self.channel.clone(),
            self.ns.clone(),
        )
        .max_decoding_message_size(MAX_REPLY)
    }

    pub fn introspection(
        &self,
    ) -> svc::introspection::v1::introspection_client::IntrospectionClient<Svc> {
        svc::introspection::v1::introspection_client::IntrospectionClient::with_interceptor(
            self.channel.clone(),
            self.ns.clone(),
        )
    }
}

/// A gRPC failure as a person should read it: the daemon's message, without tonic's framing.
pub fn rpc(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| {
        if s.message().is_empty() {
            anyhow::anyhow!("{what}: {:?}", s.code())
        } else {
            anyhow::anyhow!("{what}: {}", s.message())
        }
    }
}
