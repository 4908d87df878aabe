//! `UpdateContainerResources`, and the resources `ContainerStatus` reports.
//!
//! As containerd does: the new values are checked as CreateContainer checks them (an error
//! names the field under `linux.`), what is set overrides the container's spec's
//! `linux.resources` (what is zero keeps its value), the running task gets the result through
//! Tasks.Update (the shim applies it to the container's cgroup), then the spec in the
//! container's record is updated, so `ContainerStatus.resources` and a restarted daemon see it.

use serde_json::Value;
use switchyard_api::containerd::services::containers::v1 as containers_api;
use switchyard_api::containerd::services::containers::v1::containers_server::Containers as _;
use switchyard_api::containerd::services::tasks::v1 as tasks_api;
use switchyard_api::containerd::services::tasks::v1::tasks_server::Tasks as _;
use switchyard_api::containerd::v1::types::Status as TaskStatus;
use switchyard_api::cri::v1 as cri;
use tonic::Status;

use super::containers::in_ns;
use super::spec::{self, HostFacts};
use super::{Cri, NAMESPACE};
use crate::server::containers::ContainersService;
use crate::server::tasks::TasksService;

/// Lays `new` over `old`: objects merge key by key, anything else replaces.
fn overlay(old: &mut Value, new: Value) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, v) in n {
                overlay(o.entry(k).or_insert(Value::Null), v);
            }
        }
        (o, n) => *o = n,
    }
}

/// CRI's view of an OCI spec's resources (and its process' `oomScoreAdj`).
fn cri_resources(spec: &Value) -> cri::LinuxContainerResources {
    let r = &spec["linux"]["resources"];
    let int = |v: &Value| v.as_i64().unwrap_or(0);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    cri::LinuxContainerResources {
        cpu_period: int(&r["cpu"]["period"]),
        cpu_quota: int(&r["cpu"]["quota"]),
        cpu_shares: int(&r["cpu"]["shares"]),
        memory_limit_in_bytes: int(&r["memory"]["limit"]),
        oom_score_adj: int(&spec["process"]["oomScoreAdj"]),
        cpuset_cpus: text(&r["cpu"]["cpus"]),
        cpuset_mems: text(&r["cpu"]["mems"]),
        hugepage_limits: r["hugepageLimits"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|h| cri::HugepageLimit {
                        page_size: text(&h["pageSize"]),
                        limit: h["limit"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        unified: r["unified"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default(),
        memory_swap_limit_in_bytes: int(&r["memory"]["swap"]),
    }
}

impl Cri {
    /// The container's spec from its containerd record.
    async fn spec_of(&self, id: &str) -> Result<(containers_api::Container, Value), Status> {
        let id = id.to_owned();
        let c = self
            .shared
            .store
            .run(move |s| s.get_container(NAMESPACE, &id))
            .await
            .map_err(crate::error::status)?;
        let spec = c
            .spec
            .as_ref()
            .and_then(|a| serde_json::from_slice(&a.value).ok())
            .ok_or_else(|| Status::internal(format!("container {}: no readable spec", c.id)))?;
        Ok((c, spec))
    }

    /// The resources `ContainerStatus` reports: the spec's.
    pub async fn container_resources(&self, id: &str) -> Option<cri::ContainerResources> {
        let (_, spec) = self.spec_of(id).await.ok()?;
        Some(cri::ContainerResources {
            linux: Some(cri_resources(&spec)),
            windows: None,
        })
    }

    pub async fn update_container_resources(
        &self,
        r: cri::UpdateContainerResourcesRequest,
    ) -> Result<(), Status> {
        let rec = self.containers.find(&r.container_id)?;
        let linux = r
            .linux
            .ok_or_else(|| Status::invalid_argument("linux: missing"))?;
        let mut new = Value::Object(serde_json::Map::new());
        let host = tokio::task::spawn_blocking(HostFacts::read)
            .await
            .map_err(|e| Status::internal(format!("host facts: {e}")))?;
        spec::resources_at("linux", &linux, &host, &mut new).map_err(crate::error::status)?;
        let (mut container, mut spec) = self.spec_of(&rec.id).await?;
        overlay(&mut spec["linux"]["resources"], new);
        let resources = serde_json::to_vec(&spec["linux"]["resources"])
            .map_err(|e| Status::internal(format!("encode the resources: {e}")))?;
        let tasks = TasksService(self.shared.clone());
        // Only a task that runs or may run takes new limits (containerd's rule); an exited
        // one's cgroup is gone and must not be made again.
        let status = tasks
            .get(in_ns(tasks_api::GetRequest {
                container_id: rec.id.clone(),
                exec_id: String::new(),
            }))
            .await
            .ok()
            .and_then(|g| g.into_inner().process)
            .and_then(|p| TaskStatus::try_from(p.status).ok());
        let live = matches!(
            status,
            Some(
                TaskStatus::Created
                    | TaskStatus::Running
                    | TaskStatus::Paused
                    | TaskStatus::Pausing
            )
        );
        let updated = if !live {
            Ok(())
        } else {
            tasks
                .update(in_ns(tasks_api::UpdateTaskRequest {
                    container_id: rec.id.clone(),
                    resources: Some(switchyard_api::typeurl::json_any(
                        switchyard_api::typeurl::OCI_LINUX_RESOURCES,
                        resources,
                    )),
                    annotations: r.annotations,
                }))
                .await
                .map(drop)
        };
        if let Err(e) = updated {
            tracing::warn!(container = %rec.id, error = %e.message(), "UpdateContainerResources");
            return Err(e);
        }
        let bytes = serde_json::to_vec(&spec)
            .map_err(|e| Status::internal(format!("encode the spec: {e}")))?;
        container.spec = Some(switchyard_api::typeurl::json_any(
            switchyard_api::typeurl::OCI_SPEC,
            bytes,
        ));
        ContainersService(self.shared.clone())
            .update(in_ns(containers_api::UpdateContainerRequest {
                container: Some(container),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec".to_owned()],
                }),
            }))
            .await?;
        tracing::info!(container = %rec.id, "container resources updated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn what_is_set_overrides_the_spec() {
        let mut spec = json!({
            "process": {"oomScoreAdj": 5},
            "linux": {"resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "cpu": {"shares": 2, "quota": 1000},
                "memory": {"limit": 100},
            }}
        });
        super::overlay(
            &mut spec["linux"]["resources"],
            json!({"memory": {"limit": 200, "swap": 200}, "cpu": {"shares": 4}}),
        );
        let r = super::cri_resources(&spec);
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.memory_limit_in_bytes),
            (4, 1000, 200)
        );
        assert_eq!((r.memory_swap_limit_in_bytes, r.oom_score_adj), (200, 5));
        assert_eq!(
            spec["linux"]["resources"]["devices"][0]["access"], "rwm",
            "the rest of the spec's resources kept"
        );
    }
}
