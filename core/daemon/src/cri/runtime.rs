//! `runtime.v1.RuntimeService`: thin adapters over the pod, container, stats and event code
//! of the sibling modules. What is not served answers UNIMPLEMENTED (tonic's default, named by
//! the server's layer).

use std::sync::Arc;

use switchyard_api::cri::v1 as cri;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::Cri;
use super::sandbox::{Record, SandboxTask, State};
use crate::error::status;
use crate::server::blocking;

#[derive(Clone)]
pub struct RuntimeService(pub Arc<Cri>);

/// The runtime types whose shims are ours: they take pods without a pause image and honour
/// recursive read-only mounts (`rro`, through `mount_setattr`).
fn is_ours(runtime_type: &str) -> bool {
    runtime_type.starts_with("io.containerd.yard-")
}

/// The vm runtime: a pod's VM is its sandbox task.
const VM_RUNTIME_TYPE: &str = "io.containerd.yard-vm.v1";

impl RuntimeService {
    /// One `RuntimeHandler` per configured runtime, the default one also as the empty name
    /// (kubelet's handler for a pod without a RuntimeClass).
    fn handlers(&self) -> Vec<cri::RuntimeHandler> {
        let runtimes = self.0.shared.tasks.runtimes();
        let mut out = Vec::new();
        for s in runtimes.status() {
            let features = cri::RuntimeHandlerFeatures {
                // runc honours `rro` too (1.1 and later), with a kernel that has mount_setattr.
                recursive_read_only_mounts: is_ours(&s.runtime_type)
                    || s.runtime_type == "io.containerd.runc.v2",
                user_namespaces: false,
            };
            if s.is_default {
                out.push(cri::RuntimeHandler {
                    name: String::new(),
                    features: Some(features),
                });
            }
            out.push(cri::RuntimeHandler {
                name: s.name,
                features: Some(features),
            });
        }
        out
    }
}

/// How a pod of a runtime reaches the pod network, for `Status`'s verbose info: a VM's guest
/// through a virtio-net device the vm shim mirrors to the pod's eth0 (docs/networking.md).
fn pod_network(runtime_type: &str) -> &'static str {
    if runtime_type == VM_RUNTIME_TYPE {
        "the pod's eth0, mirrored with tc to the guest's virtio-net device"
    } else {
        "the pod's network namespace"
    }
}

fn condition(kind: &str, result: Result<(), String>, reason: &str) -> cri::RuntimeCondition {
    match result {
        Ok(()) => cri::RuntimeCondition {
            r#type: kind.to_owned(),
            status: true,
            reason: String::new(),
            message: String::new(),
        },
        Err(message) => cri::RuntimeCondition {
            r#type: kind.to_owned(),
            status: false,
            reason: reason.to_owned(),
            message,
        },
    }
}

/// CRI's view of a pod record.
pub(super) fn pod_status(r: &Record) -> cri::PodSandboxStatus {
    let config = r.pod_config();
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: config.metadata.clone(),
        state: pod_state(r.state),
        created_at: r.created_ns,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: r.ip.clone(),
            additional_ips: r
                .additional_ips
                .iter()
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: config
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .and_then(|s| s.namespace_options.clone()),
            }),
        }),
        labels: r.labels.clone().into_iter().collect(),
        annotations: r.annotations.clone().into_iter().collect(),
        runtime_handler: r.handler.clone(),
    }
}

fn pod_state(s: State) -> i32 {
    match s {
        State::Ready => cri::PodSandboxState::SandboxReady as i32,
        State::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn matches_labels(
    labels: &std::collections::BTreeMap<String, String>,
    selector: &std::collections::HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[tonic::async_trait]
impl cri::runtime_service_server::RuntimeService for RuntimeService {
    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let container_id = self.0.create_container(req.into_inner()).await?;
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        self.0
            .start_container(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let r = req.into_inner();
        self.0.stop_container(&r.container_id, r.timeout).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        self.0
            .remove_container(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = req.into_inner();
        let mut status = self.0.container_status(&r.container_id).await?;
        status.resources = self.0.container_resources(&status.id).await;
        let mut info = std::collections::HashMap::new();
        if r.verbose {
            let rec = self.0.containers.find(&r.container_id)?;
            let v = serde_json::json!({
                "id": rec.id,
                "sandboxID": rec.pod_id,
                "imageRef": rec.image_ref,
                "logPath": rec.log_path,
            });
            info.insert("info".to_owned(), v.to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        }))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let mut containers = Vec::new();
        for r in self.0.containers.list() {
            if (!filter.id.is_empty() && !r.id.starts_with(&filter.id))
                || (!filter.pod_sandbox_id.is_empty()
                    && !r.pod_id.starts_with(&filter.pod_sandbox_id))
                || !matches_labels(&r.labels, &filter.label_selector)
            {
                continue;
            }
            let Ok(st) = self.0.container_status(&r.id).await else {
                continue;
            };
            if filter.state.as_ref().is_some_and(|s| s.state != st.state) {
                continue;
            }
            containers.push(cri::Container {
                id: st.id,
                pod_sandbox_id: r.pod_id.clone(),
                metadata: st.metadata,
                image: st.image,
                image_ref: st.image_ref,
                state: st.state,
                created_at: st.created_at,
                labels: st.labels,
                annotations: st.annotations,
                ..Default::default()
            });
        }
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.0.exec_sync(&r.container_id, r.cmd, r.timeout).await?,
        ))
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let url = self.0.streams()?.exec(&self.0, req.into_inner()).await?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let url = self.0.streams()?.attach(&self.0, req.into_inner()).await?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let url = self.0.streams()?.port_forward(&self.0, req.into_inner())?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.0
            .containers
            .reopen_log(&req.into_inner().container_id)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        self.0.update_container_resources(req.into_inner()).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let stats = self
            .0
            .container_stats(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        Ok(Response::new(cri::ListContainerStatsResponse {
            stats: self.0.list_container_stats(filter).await?,
        }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let stats = self.0.pod_stats(&req.into_inner().pod_sandbox_id).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        Ok(Response::new(cri::ListPodSandboxStatsResponse {
            stats: self.0.list_pod_stats(filter).await?,
        }))
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: super::stats::descriptors(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics: self.0.pod_metrics().await?,
        }))
    }

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<BoxStream<cri::ContainerEventResponse>>, Status> {
        Ok(Response::new(self.0.events.subscribe()))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let r = req.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config: missing"))?;
        let handlers = self.0.shared.tasks.runtimes().status();
        if !r.runtime_handler.is_empty() && !handlers.iter().any(|h| h.name == r.runtime_handler) {
            return Err(status(super::sandbox::SandboxError::UnknownHandler {
                handler: r.runtime_handler,
                known: handlers
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }));
        }
        let runtime = if r.runtime_handler.is_empty() {
            self.0.shared.tasks.runtimes().default_name().to_owned()
        } else {
            r.runtime_handler.clone()
        };
        let runtime_type = handlers
            .iter()
            .find(|h| h.name == runtime)
            .map(|h| h.runtime_type.clone())
            .unwrap_or_default();
        let pod_pid = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.pid == cri::NamespaceMode::Pod as i32);
        // A foreign runtime gets the pause container it expects (a real Kata boots its VM for
        // it); so does a pod-wide PID namespace, which needs a process as its init. A `vm` pod's
        // VM is its sandbox, booted now (its guest has its own PID namespace).
        let task = if runtime_type == VM_RUNTIME_TYPE {
            SandboxTask::Vm
        } else if !is_ours(&runtime_type) || pod_pid {
            SandboxTask::Pause
        } else {
            SandboxTask::None
        };
        let cri = self.0.clone();
        let handler = r.runtime_handler;
        let record = blocking(move || {
            cri.sandboxes.run(&config, &handler, task).map_err(|e| {
                tracing::warn!(error = %crate::error::chain(&e), "RunPodSandbox failed");
                status(e)
            })
        })
        .await?;
        let started = match task {
            SandboxTask::None => Ok(()),
            SandboxTask::Pause => self.0.run_pause(&record, &runtime).await,
            SandboxTask::Vm => self.0.run_pod_vm(&record, &runtime).await,
        };
        if let Err(e) = started {
            tracing::warn!(pod = %record.id, error = %e.message(), "RunPodSandbox: the pod's sandbox task failed");
            let _ = self.0.remove_pod_task(&record.id, false).await;
            self.0.containers.remove_pod_files(&record.id);
            let cri = self.0.clone();
            let id = record.id.clone();
            let _ = blocking(move || cri.sandboxes.remove(&id).map_err(status)).await;
            return Err(e);
        }
        tracing::info!(pod = %record.id, name = %record.name, ip = %record.ip, "pod sandbox ready");
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: record.id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        let pod = self.0.sandboxes.get(&id).map_err(status)?;
        for c in self.0.containers.of_pod(&pod.id) {
            self.0.stop_container(&c.id, 0).await?;
        }
        self.0.remove_pod_task(&pod.id, true).await?;
        let cri = self.0.clone();
        blocking(move || cri.sandboxes.stop(&id).map(drop).map_err(status)).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        if let Ok(pod) = self.0.sandboxes.get(&id) {
            for c in self.0.containers.of_pod(&pod.id) {
                self.0.remove_container(&c.id).await?;
            }
            self.0.remove_pod_task(&pod.id, false).await?;
            self.0.containers.remove_pod_files(&pod.id);
        }
        let cri = self.0.clone();
        let pod = id.clone();
        blocking(move || cri.sandboxes.remove(&id).map_err(status)).await?;
        self.0.stats.forget(&super::stats::pod_key(&pod));
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let r = req.into_inner();
        let record = self.0.sandboxes.get(&r.pod_sandbox_id).map_err(status)?;
        let mut info = std::collections::HashMap::new();
        if r.verbose {
            let v = serde_json::json!({
                "id": record.id,
                "handler": record.handler,
                "netns": record.netns,
                "network": record.network.as_ref().map(|n| &n.origin),
                "ip": record.ip,
            });
            info.insert("info".to_owned(), v.to_string());
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(pod_status(&record)),
            info,
            containers_statuses: Vec::new(),
            timestamp: super::now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let items = self
            .0
            .sandboxes
            .list()
            .into_iter()
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == pod_state(r.state))
            })
            .filter(|r| matches_labels(&r.labels, &filter.label_selector))
            .map(|r| {
                let st = pod_status(&r);
                cri::PodSandbox {
                    id: st.id,
                    metadata: st.metadata,
                    state: st.state,
                    created_at: st.created_at,
                    labels: st.labels,
                    annotations: st.annotations,
                    runtime_handler: st.runtime_handler,
                }
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn version(
        &self,
        _req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".to_owned(),
            runtime_name: super::RUNTIME_NAME.to_owned(),
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            runtime_api_version: super::API_VERSION.to_owned(),
        }))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = req.into_inner().verbose;
        let cri = self.0.clone();
        let network = tokio::task::spawn_blocking(move || cri.network_ready())
            .await
            .unwrap_or_else(|e| Err(format!("check the CNI config: {e}")));
        // The runtime is ready when at least one runtime's shim can be started.
        let runtimes = self.0.shared.tasks.runtimes().status();
        let runtime = if runtimes.iter().any(|s| s.binary.is_ok()) {
            Ok(())
        } else {
            Err(runtimes
                .iter()
                .filter_map(|s| s.binary.as_ref().err().cloned())
                .collect::<Vec<_>>()
                .join("; "))
        };
        let mut info = std::collections::HashMap::new();
        if verbose {
            let config = serde_json::json!({
                "cniConfDir": self.0.config.cni_conf_dir,
                "cniBinDirs": self.0.config.cni_bin_dirs,
                "podCIDR": *self.0.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()),
                "runtimes": runtimes.iter().map(|s| serde_json::json!({
                    "name": s.name,
                    "runtimeType": s.runtime_type,
                    "default": s.is_default,
                    "podNetwork": pod_network(&s.runtime_type),
                    "binary": match &s.binary {
                        Ok(p) => p.display().to_string(),
                        Err(e) => format!("missing: {e}"),
                    },
                })).collect::<Vec<_>>(),
            });
            info.insert("config".to_owned(), config.to_string());
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![
                    condition("RuntimeReady", runtime, "NoRuntimeShim"),
                    condition("NetworkReady", network, "NetworkPluginNotReady"),
                ],
            }),
            info,
            runtime_handlers: self.handlers(),
            features: Some(cri::RuntimeFeatures::default()),
        }))
    }

    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        // Shims are given cgroupfs paths (`linux.cgroupsPath` = /parent/id).
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        if !cidr.is_empty() {
            for part in cidr.split(',') {
                if !is_cidr(part.trim()) {
                    return Err(Status::invalid_argument(format!(
                        "runtime_config.network_config.pod_cidr {part:?}: not a CIDR"
                    )));
                }
            }
            tracing::info!(pod_cidr = %cidr, "pod CIDR from kubelet");
            *self.0.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()) = cidr;
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }
}

/// `ADDRESS/PREFIX`, IPv4 or IPv6.
fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_cidrs() {
        for ok in ["10.88.0.0/16", "fd00::/64", "0.0.0.0/0"] {
            assert!(super::is_cidr(ok), "{ok}");
        }
        for bad in [
            "10.88.0.0",
            "10.88.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(!super::is_cidr(bad), "{bad}");
        }
    }
}
