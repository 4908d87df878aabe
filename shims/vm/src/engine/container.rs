//! A container in the sandbox's VM: each task call is one agent call.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use yard_agent_protocol as proto;
use yard_shim_kit::bundle::{parse_json, unmount_rootfs};
use yard_shim_kit::protos::cgroups_v2::metrics as v2;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::protos::protobuf::{Message as _, MessageField};
use yard_shim_kit::{Container, Error, ExecRequest, Process, ProcessInfo, Result};

use super::process::VmProcess;
use super::sandbox::{Sandbox, Slot, release};
use super::spec;
use crate::agent::AgentError;

pub struct VmContainer {
    pub id: String,
    pub namespace: String,
    pub bundle: PathBuf,
    pub sandbox: Arc<Sandbox>,
    pub init: Arc<VmProcess>,
    pub slot: Arc<Slot>,
}

/// containerd's cgroups v2 `Metrics` from the agent's numbers.
fn metrics(s: &proto::StatsResponse) -> Result<Any> {
    let m = v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom_kill: s.oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Any {
        type_url: "io.containerd.cgroups.v2.Metrics".into(),
        value: m
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("encode metrics: {e}")))?,
        ..Default::default()
    })
}

#[async_trait]
impl Container for VmContainer {
    fn init(&self) -> Arc<dyn Process> {
        self.init.clone()
    }

    async fn exec(&self, req: ExecRequest) -> Result<Arc<dyn Process>> {
        let process: oci_spec::runtime::Process = parse_json(&req.spec, "exec process")?;
        spec::check_enforceable(
            &spec::unenforceable_exec(&process),
            &self.sandbox.options,
            "exec process",
            &self.id,
        )?;
        let terminal = process.terminal().unwrap_or(false);
        let p = VmProcess::open(
            &self.id,
            &req.exec_id,
            &req.stdio,
            &self.namespace,
            terminal,
        )?;
        self.sandbox
            .agent
            .exec(proto::ExecProcessRequest {
                container_id: self.id.clone(),
                exec_id: req.exec_id.clone(),
                process: req.spec.clone(),
                stdin: !req.stdio.stdin.is_empty(),
                ..Default::default()
            })
            .await?;
        Ok(p.bind(self.sandbox.agent.clone(), self.sandbox.ooms.clone()))
    }

    async fn kill_all(&self, signal: u32) -> Result<()> {
        Ok(self
            .sandbox
            .agent
            .signal(&self.id, "", signal, true)
            .await?)
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        let pids = self.sandbox.agent.pids(&self.id).await?;
        Ok(pids.into_iter().map(|pid| ProcessInfo { pid }).collect())
    }

    async fn pause(&self) -> Result<()> {
        Ok(self.sandbox.agent.pause(&self.id).await?)
    }

    async fn resume(&self) -> Result<()> {
        Ok(self.sandbox.agent.resume(&self.id).await?)
    }

    async fn update(&self, resources: &Any) -> Result<()> {
        Ok(self
            .sandbox
            .agent
            .update(&self.id, resources.value.clone())
            .await?)
    }

    async fn stats(&self) -> Result<Any> {
        metrics(&self.sandbox.agent.stats(&self.id).await?)
    }

    async fn delete(&self, force: bool) -> Result<()> {
        self.init.never_started();
        if force {
            let _ = self.sandbox.agent.signal(&self.id, "", 9, true).await;
        }
        // Under TCG here the guest's removal was a `yard run --rm`'s whole Delete (24 ms median).
        let removed = if self.sandbox.ends_with(&self.id) {
            Ok(())
        } else {
            self.sandbox.agent.remove(&self.id).await
        };
        self.sandbox.take_back_volumes(&self.id).await;
        if let Some(attached) = self.sandbox.attached(&self.id) {
            self.sandbox
                .detach(&self.id, &attached, removed.is_ok())
                .await;
        }
        unmount_rootfs(&self.bundle);
        release(&self.slot, &self.sandbox, &self.id).await;
        match removed {
            // The VM is gone (crashed, stopped, or torn down): nothing is left to remove.
            Ok(()) | Err(AgentError::Gone { .. } | AgentError::Protocol { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
