//! The ttrpc endpoint shims publish events to: `containerd.services.events.ttrpc.v1.Events/
//! Forward`, at the address handed to shims as `TTRPC_ADDRESS`.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use switchyard_api::containerd::services::events::ttrpc::v1::ForwardRequest;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::{MethodHandler, Server, Service, TtrpcContext};

use super::Exchange;
use crate::error::{Classify, chain, ttrpc_code};

const SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";

struct Forward {
    exchange: Exchange,
}

#[async_trait::async_trait]
impl MethodHandler for Forward {
    async fn handler(
        &self,
        _ctx: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let mut res = ttrpc::Response::new();
        let status = match ForwardRequest::decode(req.payload.as_slice()) {
            Err(e) => ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("decode ForwardRequest: {e}"),
            ),
            Ok(ForwardRequest { envelope: None }) => ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                "ForwardRequest has no envelope",
            ),
            Ok(ForwardRequest {
                envelope: Some(env),
            }) => match self.exchange.forward(env) {
                Ok(()) => ttrpc::get_status(ttrpc::Code::OK, ""),
                Err(e) => ttrpc::get_status(ttrpc_code(e.kind()), chain(&e)),
            },
        };
        res.set_status(status);
        Ok(res)
    }
}

/// Binds `path` (mode 0600) and serves Forward until the returned server is dropped.
pub async fn serve(path: &Path, exchange: Exchange) -> std::io::Result<Server> {
    let listener = crate::sock::bind_unix(path)?;
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    methods.insert("Forward".to_owned(), Box::new(Forward { exchange }));
    let services = HashMap::from([(
        SERVICE.to_owned(),
        Service {
            methods,
            streams: HashMap::new(),
        },
    )]);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let mut server = Server::new()
        .add_listener(Listener::new(incoming))
        .register_service(services);
    server
        .start()
        .await
        .map_err(|e| std::io::Error::other(format!("start ttrpc server: {e}")))?;
    Ok(server)
}
