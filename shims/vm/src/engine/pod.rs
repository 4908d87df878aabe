//! A pod's VM booted before its containers: the sandbox task of a CRI pod.
//!
//! switchyardd runs no pause image for a `vm` pod. At RunPodSandbox it creates a task whose
//! spec is marked as the pod's sandbox (`io.kubernetes.cri.container-type: sandbox`) and has no
//! `process`: nothing runs in the guest for it, the VM itself is the sandbox. Create boots the
//! VM without a boot disk, sized from the pod's `linux.resources` (the sum of its containers'
//! limits, which kubelet gives) on top of the runtime's `vcpus` and `memory_mib`, as Kata sizes
//! its VMs; every container of the pod then reaches it as a later container (the 9p share or a
//! spare disk). The task's process is the VM: its pid is the VMM's (the shim's, for the built-in
//! VMM), killing it powers the guest off, and it exits when the VM does. Deleting it releases the
//! VM like any container's delete, so the VM stops with the last of the pod's tasks.
//!
//! A pause container (what containerd's CRI sends, with a `process`) is an ordinary container
//! and still boots the VM with its image, as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::{Container, Error, ExecRequest, Exit, Process, ProcessInfo, Result};

use super::sandbox::{Sandbox, Slot, release};
use crate::config::Options;

/// CRI's annotation naming what a container is to its pod.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Whether `spec` asks for a pod's VM with nothing in it: a sandbox without a process.
pub fn is_pod_vm(spec: &Spec) -> bool {
    spec.process().is_none() && is_sandbox(spec)
}

/// Largest guest a pod's resources may ask for: the VMM's limit on vCPUs, and memory that fits
/// the guest's physical address space below the MMIO hole with room to spare.
const MAX_VCPUS: u64 = 64;
const MAX_MEMORY_MIB: u64 = 256 * 1024;

/// containerd's annotations on a pod's sandbox spec (`internal/cri/annotations`): the sum of
/// its containers' CPU quota and period and memory limit, as kubelet gives them.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Whether `spec` is a pod's sandbox: the pod's VM ([`is_pod_vm`]) or its pause container.
pub fn is_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
}

/// The pod's VM size: the runtime's base (`vcpus`, `memory_mib`: the guest kernel and agent)
/// plus what the pod's containers may use, as Kata sizes a pod's VM: a CPU quota rounded up to
/// whole vCPUs, a memory limit rounded up to MiB. Both come from containerd's sandbox
/// annotations where the spec has them (containerd's CRI and switchyardd's set them), else from
/// `linux.resources`. A pod without limits gets the base.
pub fn size(options: &Options, spec: &Spec) -> Result<(u32, u32)> {
    let annotation = |key: &str| -> Result<Option<i64>> {
        let Some(v) = spec.annotations().as_ref().and_then(|a| a.get(key)) else {
            return Ok(None);
        };
        v.trim().parse::<i64>().map(Some).map_err(|_| {
            Error::InvalidArgument(format!(
                "config.json: annotations[{key:?}]: {v:?} is not a number"
            ))
        })
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let quota = match annotation(SANDBOX_CPU_QUOTA)? {
        Some(q) => Some(q),
        None => cpu.and_then(|c| c.quota()),
    };
    let period = match annotation(SANDBOX_CPU_PERIOD)? {
        Some(p) => Some(p),
        None => cpu.and_then(|c| c.period()).map(|p| p as i64),
    };
    let extra_vcpus = match (quota.filter(|q| *q > 0), period.filter(|p| *p > 0)) {
        (Some(quota), Some(period)) => (quota as u64).div_ceil(period as u64),
        _ => 0,
    };
    let limit = match annotation(SANDBOX_MEMORY)? {
        Some(m) => Some(m),
        None => resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit()),
    };
    let extra_mib = limit
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20))
        .unwrap_or(0);
    let vcpus = u64::from(options.vcpus) + extra_vcpus;
    let memory = u64::from(options.memory_mib) + extra_mib;
    if vcpus > MAX_VCPUS {
        return Err(Error::InvalidArgument(format!(
            "config.json: the pod's CPU quota needs {vcpus} vCPUs with the runtime's {} (at \
             most {MAX_VCPUS})",
            options.vcpus
        )));
    }
    if memory > MAX_MEMORY_MIB {
        return Err(Error::InvalidArgument(format!(
            "config.json: the pod's memory limit needs a {memory} MiB VM with the runtime's {} \
             MiB (at most {MAX_MEMORY_MIB})",
            options.memory_mib
        )));
    }
    Ok((vcpus as u32, memory as u32))
}

/// The pod's sandbox task: the VM.
pub struct PodVm {
    pub id: String,
    pub sandbox: Arc<Sandbox>,
    pub slot: Arc<Slot>,
    pub process: Arc<VmAsProcess>,
}

/// The sandbox task's process: the VM.
pub struct VmAsProcess {
    sandbox: Arc<Sandbox>,
    /// The signal that powered the guest off (0: it stopped by itself).
    killed_by: AtomicU32,
}

impl VmAsProcess {
    pub fn new(sandbox: Arc<Sandbox>) -> Arc<VmAsProcess> {
        Arc::new(VmAsProcess {
            sandbox,
            killed_by: AtomicU32::new(0),
        })
    }
}

#[async_trait]
impl Process for VmAsProcess {
    fn pid(&self) -> u32 {
        // The built-in VMM runs in the shim: the shim is the VM's process.
        self.sandbox.vmm_pid().unwrap_or_else(std::process::id)
    }

    async fn start(&self) -> Result<u32> {
        Ok(self.pid())
    }

    async fn wait(&self) -> Exit {
        self.sandbox.exited().await;
        match self.killed_by.load(Ordering::Acquire) {
            0 => Exit::now(0),
            signal => Exit::now(128 + signal),
        }
    }

    async fn kill(&self, signal: u32) -> Result<()> {
        if signal == 0 {
            return Ok(());
        }
        let _ = self
            .killed_by
            .compare_exchange(0, signal, Ordering::AcqRel, Ordering::Acquire);
        self.sandbox.power_off().await;
        Ok(())
    }

    async fn resize_pty(&self, _width: u32, _height: u32) -> Result<()> {
        Err(no_process("resize"))
    }

    async fn close_stdin(&self) -> Result<()> {
        Ok(())
    }
}

fn no_process(what: &str) -> Error {
    Error::FailedPrecondition(format!(
        "{what}: a vm pod's sandbox task is its VM and runs no process; use one of its containers"
    ))
}

#[async_trait]
impl Container for PodVm {
    fn init(&self) -> Arc<dyn Process> {
        self.process.clone()
    }

    async fn exec(&self, _req: ExecRequest) -> Result<Arc<dyn Process>> {
        Err(no_process("exec"))
    }

    async fn kill_all(&self, signal: u32) -> Result<()> {
        self.process.kill(signal).await
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(vec![ProcessInfo {
            pid: self.process.pid(),
        }])
    }

    async fn pause(&self) -> Result<()> {
        Err(no_process("pause"))
    }

    async fn resume(&self) -> Result<()> {
        Err(no_process("resume"))
    }

    async fn update(&self, _resources: &Any) -> Result<()> {
        Err(Error::FailedPrecondition(
            "update: a vm pod's VM is sized when it boots; update its containers".into(),
        ))
    }

    async fn stats(&self) -> Result<Any> {
        Err(no_process("stats"))
    }

    async fn delete(&self, force: bool) -> Result<()> {
        if force {
            self.process.kill(9).await?;
        }
        release(&self.slot, &self.sandbox, &self.id).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Spec {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_pod_vm_is_sized_from_the_pods_limits_on_the_runtimes_base() {
        let o = Options {
            vcpus: 1,
            memory_mib: 256,
            ..Options::default()
        };
        let bare = spec(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        assert_eq!(size(&o, &bare).ok(), Some((1, 256)));
        let limited = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"resources":{
                "cpu":{"quota":150000,"period":100000},"memory":{"limit":134217729}}}}"#,
        );
        // 1.5 CPUs round up to 2 vCPUs; 128 MiB + 1 byte rounds up to 129 MiB.
        assert_eq!(size(&o, &limited).ok(), Some((3, 256 + 129)));
        let huge = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"resources":{
                "cpu":{"quota":10000000,"period":100000}}}}"#,
        );
        let e = size(&o, &huge)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("CPU quota") && e.contains("101"), "{e}");
        let huge = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"resources":{
                "memory":{"limit":9223372036854771712}}}}"#,
        );
        let e = size(&o, &huge)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("memory limit"), "{e}");

        // containerd's sandbox annotations (its pause container's spec) win.
        let annotated = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"annotations":{
                "io.kubernetes.cri.sandbox-cpu-quota":"200000",
                "io.kubernetes.cri.sandbox-cpu-period":"100000",
                "io.kubernetes.cri.sandbox-memory":"67108864"},
                "linux":{"resources":{"memory":{"limit":134217728}}}}"#,
        );
        assert_eq!(size(&o, &annotated).ok(), Some((3, 256 + 64)));
        let bad = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"annotations":{
                "io.kubernetes.cri.sandbox-memory":"lots"}}"#,
        );
        let e = size(&o, &bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("io.kubernetes.cri.sandbox-memory") && e.contains("lots"),
            "{e}"
        );
    }

    #[test]
    fn only_a_sandbox_without_a_process_is_a_pod_vm() {
        let pod = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "annotations":{"io.kubernetes.cri.container-type":"sandbox"}}"#,
        );
        assert!(is_pod_vm(&pod));
        let pause = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/pause"],
                "cwd":"/","user":{"uid":0,"gid":0}},
                "annotations":{"io.kubernetes.cri.container-type":"sandbox"}}"#,
        );
        assert!(!is_pod_vm(&pause));
        let bare = spec(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        assert!(!is_pod_vm(&bare));
    }
}
