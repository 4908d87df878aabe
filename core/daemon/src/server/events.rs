//! `events.v1`: Publish (namespace from the request), Forward (an envelope as is) and
//! Subscribe (server stream, containerd filters).

use std::sync::Arc;

use futures::StreamExt;
use switchyard_api::containerd::services::events::v1 as api;
use switchyard_api::containerd::types::Envelope;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::{Shared, namespace};
use crate::error::{Kind, Simple, status};
use crate::filters::Filter;

pub struct EventsService(pub Arc<Shared>);

#[tonic::async_trait]
impl api::events_server::Events for EventsService {
    async fn publish(&self, req: Request<api::PublishRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let env = Envelope {
            timestamp: None,
            namespace: ns,
            topic: r.topic,
            event: r.event,
        };
        self.0.exchange.forward(env).map_err(status)?;
        Ok(Response::new(()))
    }

    async fn forward(&self, req: Request<api::ForwardRequest>) -> Result<Response<()>, Status> {
        let env = req
            .into_inner()
            .envelope
            .ok_or_else(|| status(Simple::new(Kind::InvalidArgument, "envelope is required")))?;
        self.0.exchange.forward(env).map_err(status)?;
        Ok(Response::new(()))
    }

    async fn subscribe(
        &self,
        req: Request<api::SubscribeRequest>,
    ) -> Result<Response<BoxStream<Envelope>>, Status> {
        let filter = Filter::parse(&req.get_ref().filters).map_err(status)?;
        let stream = self.0.exchange.subscribe(filter).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
