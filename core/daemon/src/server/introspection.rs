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

/// The vm shim reports what it would use on this host (`<shim> info OPTIONS_JSON`).
const VM_RUNTIME_TYPE: &str = "io.containerd.yard-vm.v1";

/// The shim's `info` JSON object, flattened to strings for the plugin's exports (`vm.accel`,
/// `vm.virtualization.kvm_pvm`, ...). A shim that cannot say gives `vm.error`.
async fn vm_report(binary: &std::path::Path, options_json: &str) -> Vec<(String, String)> {
    let run = tokio::process::Command::new(binary)
        .arg("info")
        .arg(options_json)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(std::time::Duration::from_secs(5), run).await {
        Ok(Ok(o)) if o.status.success() => o.stdout,
        Ok(Ok(o)) => {
            return vec![(
                "error".into(),
                format!("{} info: {}", binary.display(), o.status),
            )];
        }
        Ok(Err(e)) => return vec![("error".into(), format!("{} info: {e}", binary.display()))],
        Err(_) => {
            return vec![(
                "error".into(),
                format!("{} info: timed out", binary.display()),
            )];
        }
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&out) else {
        return vec![(
            "error".into(),
            format!("{} info: not JSON", binary.display()),
        )];
    };
    let mut fields = Vec::new();
    flatten("", &value, &mut fields);
    fields
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::Null => {}
        serde_json::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

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
        let mut reports = HashMap::new();
        let statuses = self.0.tasks.runtimes().status();
        for rt in &statuses {
            if let (true, Ok(binary)) = (rt.runtime_type == VM_RUNTIME_TYPE, &rt.binary) {
                reports.insert(rt.name.clone(), vm_report(binary, &rt.options_json).await);
            }
        }
        let plugins = statuses
            .into_iter()
            .map(|rt| {
                let mut exports = HashMap::from([
                    ("runtime_type".to_owned(), rt.runtime_type.clone()),
                    ("default".to_owned(), rt.is_default.to_string()),
                ]);
                for (k, v) in reports.remove(&rt.name).unwrap_or_default() {
                    exports.insert(format!("vm.{k}"), v);
                }
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
