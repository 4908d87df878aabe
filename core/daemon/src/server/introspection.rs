//! `version.v1` and `introspection.v1`: the daemon's version and identity, and the configured
//! runtimes as plugins (type `io.switchyard.runtime.v1`), each with its shim binary or the
//! reason it cannot run. `yard info` and `ctr plugins ls` read these.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_api::containerd::services::introspection::v1 as api;
use switchyard_api::containerd::services::version::v1 as version;
use switchyard_api::google::rpc::Status as RpcStatus;
use tonic::{Request, Response, Status};

use super::Shared;
use crate::filters::{Adaptor, Filter};

/// The plugin type under which runtimes are listed.
pub const RUNTIME_PLUGIN_TYPE: &str = "io.switchyard.runtime.v1";

pub struct VersionService;

#[tonic::async_trait]
impl version::version_server::Version for VersionService {
    async fn version(&self, _: Request<()>) -> Result<Response<version::VersionResponse>, Status> {
        Ok(Response::new(version::VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: option_env!("SWITCHYARD_REVISION").unwrap_or("").to_owned(),
        }))
    }
}

pub struct IntrospectionService(pub Arc<Shared>);

struct PluginFields<'a>(&'a api::Plugin);

impl Adaptor for PluginFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "type" => Some(self.0.r#type.clone()),
            [f] if f == "id" => Some(self.0.id.clone()),
            _ => None,
        }
    }
}

#[tonic::async_trait]
impl api::introspection_server::Introspection for IntrospectionService {
    async fn plugins(
        &self,
        req: Request<api::PluginsRequest>,
    ) -> Result<Response<api::PluginsResponse>, Status> {
        let filter = Filter::parse(&req.get_ref().filters).map_err(crate::error::status)?;
        let plugins = self
            .0
            .tasks
            .runtimes()
            .status()
            .into_iter()
            .map(|rt| {
                let mut exports = HashMap::from([
                    ("runtime_type".to_owned(), rt.runtime_type.clone()),
                    ("default".to_owned(), rt.is_default.to_string()),
                ]);
                let init_err = match &rt.binary {
                    Ok(path) => {
                        exports.insert("binary".to_owned(), path.display().to_string());
                        None
                    }
                    Err(reason) => Some(RpcStatus {
                        code: tonic::Code::FailedPrecondition as i32,
                        message: reason.clone(),
                        details: vec![],
                    }),
                };
                api::Plugin {
                    r#type: RUNTIME_PLUGIN_TYPE.to_owned(),
                    id: rt.name,
                    requires: vec![],
                    platforms: vec![],
                    exports,
                    capabilities: vec![],
                    init_err,
                }
            })
            .filter(|p| filter.matches(&PluginFields(p)))
            .collect();
        Ok(Response::new(api::PluginsResponse { plugins }))
    }

    async fn server(&self, _: Request<()>) -> Result<Response<api::ServerResponse>, Status> {
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .and_then(|l| {
                let s = l.to_string_lossy().into_owned();
                s.trim_start_matches("pid:[")
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        Ok(Response::new(api::ServerResponse {
            uuid: self.0.uuid.clone(),
            pid: u64::from(std::process::id()),
            pidns,
            deprecations: vec![],
        }))
    }

    async fn plugin_info(
        &self,
        req: Request<api::PluginInfoRequest>,
    ) -> Result<Response<api::PluginInfoResponse>, Status> {
        Err(Status::unimplemented(format!(
            "plugin info for {:?}: not implemented by switchyardd",
            req.get_ref().r#type
        )))
    }
}
