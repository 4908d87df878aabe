//! The kit's engine for microVMs: one VM per sandbox (per shim process), containers created by
//! the guest agent.
//!
//! The first Create of a shim boots the VM with that container's read-only rootfs image as its
//! first disk (`/dev/vda`). Later containers of the sandbox reach the running VM (virtio-mmio has
//! no hotplug) as image files in the sandbox's 9p share, which the agent loop-mounts (QEMU), or
//! as a spare disk the backend gives the image to ([`Vm::attach_disk`], the built-in VMM), which
//! the agent mounts like `/dev/vda` and which is emptied again after the container's removal.
//! Every task
//! call becomes one agent call; stdio is pumped over the same channel with long-poll reads. When
//! the last container is deleted the VM is shut down, so nothing outlives the sandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use yard_agent_protocol as proto;
use yard_shim_kit::bundle::{parse_json, rootfs_dir, unmount_rootfs};
use yard_shim_kit::protos::cgroups_v2::metrics as v2;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::protos::protobuf::{Message as _, MessageField};
use yard_shim_kit::stdio::{self, StdinCloser, StdioSpec};
use yard_shim_kit::{
    Container, CreateRequest, Engine, Error, ExecRequest, Exit, Process, ProcessInfo, Publisher,
    Result, Rootfs,
};

use crate::agent::Agent;
use crate::config::Options;
use crate::hypervisor::{Hypervisor, Vm, VmConfig, VmError};
use crate::image::{Image, ImageCache, ImageFormat};

/// Per-VM runtime state (console log): gone with the VM.
pub const STATE_ROOT: &str = "/run/switchyard/vm";
/// How long a VM may take to power off after the agent's Shutdown before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// After a process exits, how long its output may still take to arrive (a background child
/// that keeps the pipe open would otherwise hold the exit forever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Largest stdio read per agent call.
const READ_CHUNK: u32 = 64 * 1024;

#[derive(Default)]
pub struct VmEngine {
    sandbox: Arc<Slot>,
}

/// The shim's sandbox, once booted; containers keep a handle to release it on delete.
type Slot = Mutex<Option<Arc<Sandbox>>>;

impl VmEngine {
    /// The backend is chosen per sandbox from its options and the host
    /// ([`crate::virt::choose_backend`]).
    pub fn new() -> VmEngine {
        VmEngine::default()
    }
}

/// One VM and what runs in it.
struct Sandbox {
    id: String,
    /// Names the sandbox's directories: its first container's id and this shim's pid, unique
    /// while the shim lives (a later sandbox may reuse a deleted container's id).
    key: String,
    options: Options,
    /// The hypervisor backend's name.
    backend: &'static str,
    /// Later containers' images can reach the VM ([`Hypervisor::shares_files`]).
    shares_files: bool,
    vm: Box<dyn Vm>,
    agent: Agent,
    state_dir: PathBuf,
    share_dir: PathBuf,
    /// Container id → how its image reached the VM.
    containers: std::sync::Mutex<HashMap<String, Attached>>,
    oom: std::sync::Mutex<Option<JoinHandle<()>>>,
    ooms: Arc<OomReporter>,
}

/// How a container's image reached the VM, to undo after its removal.
#[derive(Clone, Debug)]
enum Attached {
    /// The disk the VM booted with.
    BootDisk,
    /// A file in the 9p share.
    Shared(PathBuf),
    /// A disk attached after boot: the guest's device path.
    Disk(String),
}

/// Publishes `/tasks/oom` once per OOM kill the guest counted in a container's cgroup. Two
/// paths ask: the agent's WaitOom stream, and a process's exit with 137, which must not be
/// reported before its OOM (the agent polls memory.events, so the exit can come first, and a
/// delete right after it would lose the OOM with the VM).
struct OomReporter {
    agent: Agent,
    events: Publisher,
    /// Container id → OOM kills already published.
    published: std::sync::Mutex<HashMap<String, u64>>,
}

impl OomReporter {
    async fn report(&self, id: &str) {
        let Ok(stats) = self.agent.stats(id).await else {
            return;
        };
        let new = {
            let mut p = self.published.lock().unwrap_or_else(|p| p.into_inner());
            let seen = p.entry(id.to_owned()).or_insert(0);
            let new = stats.oom_kills > *seen;
            *seen = (*seen).max(stats.oom_kills);
            new
        };
        if new {
            self.events.oom(id).await;
        }
    }
}

/// Each container's bundle names its sandbox, so `<shim> delete` after a dead shim finds the
/// sandbox's directories whichever container it is called for.
const SANDBOX_FILE: &str = "vm-sandbox";

fn write_sandbox_key(bundle: &Path, key: &str) {
    if let Err(e) = std::fs::write(bundle.join(SANDBOX_FILE), key) {
        tracing::warn!(bundle = %bundle.display(), error = %e, "cannot record the sandbox");
    }
}

/// Whether the shim that owns sandbox `key` (`<id>-<pid>`) still runs.
fn owner_alive(key: &str) -> bool {
    let Some(pid) = key.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("containerd-shim-yard-vm-v1"))
        .unwrap_or(false)
}

fn state_dir(namespace: &str, sandbox: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(namespace).join(sandbox)
}

fn share_dir(options: &Options, namespace: &str, sandbox: &str) -> PathBuf {
    // Beside the image cache, so images are hard-linked in rather than copied.
    options
        .cache_dir
        .join("share")
        .join(namespace)
        .join(sandbox)
}

fn cache(options: &Options) -> ImageCache {
    ImageCache::new(options.cache_dir.join("images"))
}

#[async_trait]
impl Engine for VmEngine {
    fn name(&self) -> &'static str {
        "containerd-shim-yard-vm-v1"
    }

    /// A single EROFS image file goes to the guest as it is (see [`prebuilt_image`]).
    fn hands_over_rootfs(&self, mounts: &[yard_shim_kit::protos::types::mount::Mount]) -> bool {
        matches!(mounts, [m] if m.type_ == "erofs")
    }

    async fn create(&self, req: CreateRequest) -> Result<Arc<dyn Container>> {
        // The kit has read the spec and mounted a rootfs it did not hand over (and unmounts it).
        let spec = &req.spec;
        if spec.process().is_none() {
            return Err(Error::InvalidArgument(
                "config.json: process: missing".into(),
            ));
        }
        host_binds(spec)?;
        let prebuilt = match &req.rootfs {
            Rootfs::Mounts(mounts) => prebuilt_image(mounts)?,
            Rootfs::Dir(_) => None,
        };
        self.create_container(&req, spec, req.config.clone(), prebuilt)
            .await
    }

    async fn cleanup(&self, namespace: &str, id: &str, bundle: &Path) -> Result<()> {
        // The shim is gone, and with it (PR_SET_PDEATHSIG) its VM; what is left is on disk.
        unmount_rootfs(bundle);
        let options = std::fs::read(bundle.join("options.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Options>(&b).ok())
            .unwrap_or_default();
        let Ok(key) = std::fs::read_to_string(bundle.join(SANDBOX_FILE)) else {
            return Ok(());
        };
        let key = key.trim();
        if key.is_empty() || key.contains('/') || key.starts_with('.') || owner_alive(key) {
            return Ok(());
        }
        tracing::info!(
            container_id = id,
            sandbox = key,
            "removing a dead shim's sandbox files"
        );
        let _ = std::fs::remove_dir_all(state_dir(namespace, key));
        let _ = std::fs::remove_dir_all(share_dir(&options, namespace, key));
        Ok(())
    }

    async fn shutdown(&self) {
        if let Some(sb) = self.sandbox.lock().await.take() {
            sb.stop().await;
        }
    }
}

impl VmEngine {
    async fn create_container(
        &self,
        req: &CreateRequest,
        spec: &Spec,
        spec_bytes: Vec<u8>,
        prebuilt: Option<Image>,
    ) -> Result<Arc<dyn Container>> {
        let rootfs = match prebuilt {
            Some(_) => None,
            None => Some(rootfs_dir(
                &req.bundle,
                spec.root().as_ref().map(|r| r.path().as_path()),
            )?),
        };
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);

        let mut slot = self.sandbox.lock().await;
        if let Some(sb) = slot.as_ref().filter(|sb| sb.vm_gone()) {
            tracing::warn!(sandbox = %sb.id, "the sandbox's VM is gone; booting a new one");
            let sb = sb.clone();
            slot.take();
            sb.stop().await;
        }
        let options = match slot.as_ref() {
            Some(sb) => sb.options.clone(),
            None => Options::from_any(req.options.as_ref())?,
        };
        let image = match (prebuilt, rootfs) {
            (Some(image), _) => image,
            (None, Some(rootfs)) => {
                let images = cache(&options);
                tokio::task::spawn_blocking(move || images.image_for(&rootfs))
                    .await
                    .map_err(|e| Error::Internal(format!("image build task: {e}")))?
                    .map_err(image_error)?
            }
            (None, None) => return Err(Error::Internal("no rootfs".into())),
        };
        // Stdio first: a client that gave bad fifos fails the create before the guest has a
        // container to leak.
        let init = VmProcess::open(&req.id, "", &req.stdio, &req.namespace, terminal)?;
        let (sandbox, storage, attached) = match slot.as_ref() {
            Some(sb) if sb.shares_files => {
                let (storage, file) = sb.share_image(&req.id, &image.path, image.fstype())?;
                (sb.clone(), storage, Attached::Shared(file))
            }
            Some(sb) => {
                let (storage, device) = sb.attach_image(&image.path, image.fstype()).await?;
                (sb.clone(), storage, Attached::Disk(device))
            }
            None => {
                let sb = Sandbox::boot(
                    &req.namespace,
                    &req.id,
                    options,
                    &image.path,
                    req.events.clone(),
                )
                .await?;
                *slot = Some(sb.clone());
                let storage = proto::Storage {
                    block_device: "/dev/vda".into(),
                    fstype: image.fstype().into(),
                    ..Default::default()
                };
                (sb, storage, Attached::BootDisk)
            }
        };
        // Reserved before the lock goes: a concurrent last delete must not stop this VM.
        sandbox
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), attached.clone());
        write_sandbox_key(&req.bundle, &sandbox.key);
        drop(slot);

        let created = sandbox
            .agent
            .create_container(proto::CreateContainerRequest {
                container_id: req.id.clone(),
                spec: spec_bytes,
                storage: MessageField::some(storage),
                stdin: !req.stdio.stdin.is_empty(),
                ..Default::default()
            })
            .await;
        if let Err(e) = created {
            sandbox.detach(&req.id, &attached, true).await;
            release(&self.sandbox, &sandbox, &req.id).await;
            return Err(e);
        }
        let init = init.bind(sandbox.agent.clone(), sandbox.ooms.clone());
        Ok(Arc::new(VmContainer {
            id: req.id.clone(),
            namespace: req.namespace.clone(),
            bundle: req.bundle.clone(),
            sandbox,
            init,
            slot: self.sandbox.clone(),
        }))
    }
}

/// A rootfs that is already a read-only EROFS image file: one mount of type `erofs` whose
/// source is the file (what switchyardd's image store hands the vm runtime, and containerd
/// 2.1's erofs snapshotter's form). The guest mounts it as the container's lower layer, so it is
/// neither mounted on the host nor rebuilt.
fn prebuilt_image(mounts: &[yard_shim_kit::protos::types::mount::Mount]) -> Result<Option<Image>> {
    let [m] = mounts else {
        return Ok(None);
    };
    if m.type_ != "erofs" {
        return Ok(None);
    }
    let path = PathBuf::from(&m.source);
    let meta = std::fs::metadata(&path).ok().filter(|md| md.is_file());
    let Some(meta) = meta.filter(|_| path.is_absolute()) else {
        return Err(Error::InvalidArgument(format!(
            "rootfs: erofs mount source {:?} is not an image file",
            m.source
        )));
    };
    if !ImageFormat::Erofs.has_superblock(&path) {
        return Err(Error::InvalidArgument(format!(
            "rootfs: {} has no EROFS superblock",
            path.display()
        )));
    }
    Ok(Some(Image {
        path,
        digest: String::new(),
        bytes: meta.len(),
        format: ImageFormat::Erofs,
    }))
}

/// Bind mounts name host paths, which the guest cannot see: refused, naming the mount, rather
/// than failing inside the guest. (Sharing them into the guest over 9p is future work.)
fn host_binds(spec: &Spec) -> Result<()> {
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if bind {
            return Err(Error::InvalidArgument(format!(
                "config.json: mounts[{i}]: bind mount of host path {} into {}: the vm runtime \
                 cannot share host paths with the guest yet",
                m.source()
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                m.destination().display()
            )));
        }
    }
    Ok(())
}

/// A container is gone: when it was the last, the VM goes too.
async fn release(slot: &Slot, sandbox: &Arc<Sandbox>, id: &str) {
    let mut slot = slot.lock().await;
    let empty = {
        let mut c = sandbox.containers.lock().unwrap_or_else(|p| p.into_inner());
        c.remove(id);
        c.is_empty()
    };
    let ours = slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, sandbox));
    if empty && ours {
        slot.take();
        drop(slot);
        sandbox.stop().await;
    }
}

impl Sandbox {
    async fn boot(
        namespace: &str,
        id: &str,
        options: Options,
        image: &Path,
        events: Publisher,
    ) -> Result<Arc<Sandbox>> {
        let virt = {
            let qemu = options.qemu.clone();
            tokio::task::spawn_blocking(move || crate::virt::detect_with(&qemu))
                .await
                .map_err(|e| Error::Internal(format!("detect virtualization: {e}")))?
        };
        let backend = crate::virt::choose_backend(options.backend, options.accel, &virt)
            .map_err(|e| Error::InvalidArgument(format!("options: {e}")))?;
        let accel = backend.accel();
        let hypervisor: Box<dyn Hypervisor> = match backend {
            crate::virt::Backend::Builtin => Box::new(crate::builtin::Builtin),
            crate::virt::Backend::Qemu(_) => Box::new(crate::qemu::Qemu),
        };
        let key = format!("{id}-{}", std::process::id());
        let state_dir = state_dir(namespace, &key);
        let share_dir = share_dir(&options, namespace, &key);
        for d in [&state_dir, &share_dir] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(Error::io(format!("create {}", d.display())))?;
        }
        let mut kernel_args = options.kernel_args.clone();
        if options.debug {
            kernel_args.push(format!("{}=1", proto::CMDLINE_DEBUG));
        }
        let cfg = VmConfig {
            id: format!("{namespace}-{id}"),
            state_dir: state_dir.clone(),
            qemu: options.qemu.clone(),
            kernel: options.kernel.clone(),
            initrd: options.initrd.clone(),
            kernel_args,
            vcpus: options.vcpus,
            memory_mib: options.memory_mib,
            accel,
            boot_timeout: options.boot_timeout(),
            root_disk: Some(image.to_path_buf()),
            share_dir: Some(share_dir.clone()),
        };
        let booted = hypervisor.boot(cfg).await;
        let mut vm = match booted {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&state_dir);
                let _ = std::fs::remove_dir_all(&share_dir);
                return Err(boot_error(e));
            }
        };
        let Some(stream) = vm.take_agent_stream() else {
            vm.stop(STOP_GRACE).await;
            return Err(Error::Internal("VM booted without an agent stream".into()));
        };
        let agent = Agent::new(stream);
        match agent.hello().await {
            Ok(h) => tracing::info!(
                sandbox = id,
                hypervisor = hypervisor.name(),
                accel = %vm.accel(),
                boot_ms = vm.boot_time().as_millis() as u64,
                kernel = %h.kernel_release,
                vcpus = h.vcpus,
                memory_mib = h.memory_bytes >> 20,
                "VM ready"
            ),
            Err(e) => {
                vm.stop(STOP_GRACE).await;
                let _ = std::fs::remove_dir_all(&state_dir);
                let _ = std::fs::remove_dir_all(&share_dir);
                return Err(e);
            }
        }
        let ooms = Arc::new(OomReporter {
            agent: agent.clone(),
            events,
            published: std::sync::Mutex::new(HashMap::new()),
        });
        let oom = {
            let (agent, ooms) = (agent.clone(), ooms.clone());
            tokio::spawn(async move {
                while let Ok(id) = agent.wait_oom().await {
                    ooms.report(&id).await;
                }
            })
        };
        Ok(Arc::new(Sandbox {
            id: id.to_owned(),
            key,
            options,
            backend: hypervisor.name(),
            shares_files: hypervisor.shares_files(),
            vm,
            agent,
            state_dir,
            share_dir,
            containers: std::sync::Mutex::new(HashMap::new()),
            oom: std::sync::Mutex::new(Some(oom)),
            ooms,
        }))
    }

    /// Put a later container's image into the share, as `<container>.<fstype>`.
    fn share_image(
        &self,
        id: &str,
        image: &Path,
        fstype: &str,
    ) -> Result<(proto::Storage, PathBuf)> {
        let name = format!("{id}.{fstype}");
        let dest = self.share_dir.join(&name);
        let _ = std::fs::remove_file(&dest);
        if std::fs::hard_link(image, &dest).is_err() {
            std::fs::copy(image, &dest).map_err(Error::io(format!(
                "copy {} into the sandbox share",
                image.display()
            )))?;
        }
        let storage = proto::Storage {
            shared_file: name,
            fstype: fstype.into(),
            ..Default::default()
        };
        Ok((storage, dest))
    }

    /// Give a later container's image to the VM as a disk (a backend without a share).
    async fn attach_image(&self, image: &Path, fstype: &str) -> Result<(proto::Storage, String)> {
        let device = self.vm.attach_disk(image).await.map_err(|e| match e {
            VmError::NoFreeDisk { slots } => Error::FailedPrecondition(format!(
                "sandbox {} runs on the {} backend, whose VM takes later containers' images on \
                 {slots} spare disks, all in use: at most {} containers run in it at once (use \
                 backend = \"qemu\" for larger groups and pods)",
                self.id,
                self.backend,
                slots + 1
            )),
            VmError::Unsupported(_) => Error::FailedPrecondition(format!(
                "sandbox {} runs on the {} backend, which cannot give a running VM another \
                 image: it runs one container (use backend = \"qemu\" for groups and pods)",
                self.id, self.backend
            )),
            e => Error::Internal(format!(
                "give the image to the VM: {}",
                yard_shim_kit::error::chain(&e)
            )),
        })?;
        let storage = proto::Storage {
            block_device: device.clone(),
            fstype: fstype.into(),
            ..Default::default()
        };
        Ok((storage, device))
    }

    /// Undo how a container's image reached the VM. A disk is detached only once the agent
    /// removed the container (`removed`): until then its filesystem may still be mounted.
    async fn detach(&self, id: &str, attached: &Attached, removed: bool) {
        match attached {
            Attached::BootDisk => {}
            Attached::Shared(file) => {
                let _ = std::fs::remove_file(file);
            }
            Attached::Disk(device) if removed => {
                if let Err(e) = self.vm.detach_disk(device).await {
                    tracing::warn!(container_id = id, device, error = %yard_shim_kit::error::chain(&e), "detach the container's disk");
                }
            }
            Attached::Disk(device) => tracing::warn!(
                container_id = id,
                device,
                "the agent did not remove the container: its disk stays attached"
            ),
        }
    }

    /// Shut the guest down (the agent kills what runs and reboots, so QEMU exits), kill the
    /// VMM if it does not go, and remove the sandbox's files.
    async fn stop(&self) {
        if let Some(h) = self.oom.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
        let asked = tokio::time::timeout(Duration::from_secs(2), self.agent.shutdown()).await;
        if !matches!(asked, Ok(Ok(()))) {
            tracing::warn!(sandbox = %self.id, "agent did not take Shutdown; stopping the VM");
        }
        self.vm.stop(STOP_GRACE).await;
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.share_dir);
        tracing::info!(sandbox = %self.id, "VM stopped");
    }
}

fn image_error(e: crate::image::ImageError) -> Error {
    use crate::image::ImageError as I;
    let msg = format!("rootfs image: {e}");
    match e {
        I::RootfsMissing { .. } | I::NotADirectory { .. } => Error::InvalidArgument(msg),
        I::NoTool { .. } => Error::FailedPrecondition(msg),
        _ => Error::Internal(msg),
    }
}

fn boot_error(e: crate::hypervisor::BootVmError) -> Error {
    use crate::hypervisor::BootVmError as B;
    let msg = e.to_string();
    match e {
        B::KernelMissing { .. } | B::InitrdMissing { .. } | B::QemuMissing { .. } => {
            Error::FailedPrecondition(msg)
        }
        _ => Error::Internal(msg),
    }
}

struct VmContainer {
    id: String,
    namespace: String,
    bundle: PathBuf,
    sandbox: Arc<Sandbox>,
    init: Arc<VmProcess>,
    slot: Arc<Slot>,
}

#[async_trait]
impl Container for VmContainer {
    fn init(&self) -> Arc<dyn Process> {
        self.init.clone()
    }

    async fn exec(&self, req: ExecRequest) -> Result<Arc<dyn Process>> {
        let process: oci_spec::runtime::Process = parse_json(&req.spec, "exec process")?;
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
        self.sandbox.agent.signal(&self.id, "", signal, true).await
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        let pids = self.sandbox.agent.pids(&self.id).await?;
        Ok(pids.into_iter().map(|pid| ProcessInfo { pid }).collect())
    }

    async fn pause(&self) -> Result<()> {
        self.sandbox.agent.pause(&self.id).await
    }

    async fn resume(&self) -> Result<()> {
        self.sandbox.agent.resume(&self.id).await
    }

    async fn update(&self, resources: &Any) -> Result<()> {
        self.sandbox
            .agent
            .update(&self.id, resources.value.clone())
            .await
    }

    async fn stats(&self) -> Result<Any> {
        let s = self.sandbox.agent.stats(&self.id).await?;
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

    async fn delete(&self, force: bool) -> Result<()> {
        self.init.never_started();
        if force {
            let _ = self.sandbox.agent.signal(&self.id, "", 9, true).await;
        }
        let removed = self.sandbox.agent.remove(&self.id).await;
        let attached = self
            .sandbox
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.id)
            .cloned();
        if let Some(attached) = attached {
            self.sandbox
                .detach(&self.id, &attached, removed.is_ok())
                .await;
        }
        unmount_rootfs(&self.bundle);
        release(&self.slot, &self.sandbox, &self.id).await;
        match removed {
            // The VM is gone already (crashed, or stopped): nothing is left to remove.
            Err(Error::Internal(_)) if self.sandbox.vm_gone() => Ok(()),
            other => other,
        }
    }
}

impl Sandbox {
    fn vm_gone(&self) -> bool {
        // Not /proc/PID: the kit's subreaper collects QEMU, and its pid can be reused.
        self.vm.exit_status().is_some()
    }
}

/// A process in the guest, and the pumps that carry its stdio.
struct VmProcess {
    agent: Agent,
    ooms: Arc<OomReporter>,
    container_id: String,
    exec_id: String,
    pid: AtomicU32,
    terminal: bool,
    stdin_closer: StdinCloser,
    exit: watch::Sender<Option<Exit>>,
    pumps: std::sync::Mutex<Option<Pumps>>,
}

struct Pumps {
    stdin: Option<tokio::fs::File>,
    stdout: tokio::fs::File,
    stderr: tokio::fs::File,
}

/// A process whose stdio is open but which no agent knows yet.
struct Unbound(Box<dyn FnOnce(Agent, Arc<OomReporter>) -> Arc<VmProcess> + Send>);

impl Unbound {
    fn bind(self, agent: Agent, ooms: Arc<OomReporter>) -> Arc<VmProcess> {
        (self.0)(agent, ooms)
    }
}

impl VmProcess {
    /// Open the process's stdio (containerd's fifos or files).
    fn open(
        container_id: &str,
        exec_id: &str,
        spec: &StdioSpec,
        namespace: &str,
        terminal: bool,
    ) -> Result<Unbound> {
        let name = if exec_id.is_empty() {
            container_id.to_owned()
        } else {
            format!("{container_id}-{exec_id}")
        };
        let opened = stdio::open(spec, namespace, &name)?;
        let has_stdin = !spec.stdin.is_empty();
        let (container_id, exec_id) = (container_id.to_owned(), exec_id.to_owned());
        Ok(Unbound(Box::new(move |agent, ooms| {
            Arc::new(VmProcess {
                agent,
                ooms,
                container_id,
                exec_id,
                pid: AtomicU32::new(0),
                terminal,
                stdin_closer: opened.stdin_closer,
                exit: watch::channel(None).0,
                pumps: std::sync::Mutex::new(Some(Pumps {
                    stdin: has_stdin.then(|| tokio::fs::File::from_std(opened.stdin)),
                    stdout: tokio::fs::File::from_std(opened.stdout),
                    stderr: tokio::fs::File::from_std(opened.stderr),
                })),
            })
        })))
    }

    /// A process deleted without ever starting: its waiters learn it is gone.
    fn never_started(&self) {
        if self.pid() == 0 && self.exit.borrow().is_none() {
            self.stdin_closer.close_now();
            let _ = self.exit.send(Some(Exit::now(128 + 9)));
        }
    }

    /// Copy one output stream from the guest until its end.
    fn pump_out(&self, mut to: tokio::fs::File, stderr: bool) -> JoinHandle<()> {
        let agent = self.agent.clone();
        let (c, e) = (self.container_id.clone(), self.exec_id.clone());
        tokio::spawn(async move {
            while let Ok(Some(data)) = agent.read(&c, &e, stderr, READ_CHUNK).await {
                if to.write_all(&data).await.is_err() {
                    break;
                }
            }
            let _ = to.flush().await;
        })
    }

    fn pump_in(&self, mut from: tokio::fs::File) -> JoinHandle<()> {
        let agent = self.agent.clone();
        let (c, e) = (self.container_id.clone(), self.exec_id.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if agent.write_stdin(&c, &e, buf[..n].to_vec()).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = agent.close_stdin(&c, &e).await;
        })
    }
}

#[async_trait]
impl Process for VmProcess {
    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    async fn start(&self) -> Result<u32> {
        let Some(pumps) = self.pumps.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(Error::FailedPrecondition(format!(
                "process {:?} of {} was already started",
                self.exec_id, self.container_id
            )));
        };
        // Output pumps first: they long-poll, so nothing the process prints early is missed.
        let mut outputs = vec![self.pump_out(pumps.stdout, false)];
        if !self.terminal {
            outputs.push(self.pump_out(pumps.stderr, true));
        }
        let stdin = pumps.stdin.map(|f| self.pump_in(f));
        let pid = match self.agent.start(&self.container_id, &self.exec_id).await {
            Ok(pid) => pid,
            Err(e) => {
                for h in &outputs {
                    h.abort();
                }
                if let Some(h) = stdin {
                    h.abort();
                }
                return Err(e);
            }
        };
        self.pid.store(pid, Ordering::SeqCst);
        let agent = self.agent.clone();
        let (c, e) = (self.container_id.clone(), self.exec_id.clone());
        let exit = self.exit.clone();
        let closer = self.stdin_closer.clone();
        let ooms = self.ooms.clone();
        tokio::spawn(async move {
            let status = match agent.wait(&c, &e).await {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(container = %c, exec = %e, error = %err, "lost the process with its VM");
                    128 + 9
                }
            };
            let at = std::time::SystemTime::now();
            if status == 128 + 9 {
                ooms.report(&c).await;
            }
            let aborts: Vec<_> = outputs.iter().map(JoinHandle::abort_handle).collect();
            let drain = async {
                for h in outputs {
                    let _ = h.await;
                }
            };
            if tokio::time::timeout(OUTPUT_DRAIN, drain).await.is_err() {
                tracing::warn!(container = %c, exec = %e, "output still open after exit; cut off");
                for a in aborts {
                    a.abort();
                }
            }
            if let Some(h) = stdin {
                h.abort();
            }
            closer.close_now();
            let _ = exit.send(Some(Exit { status, at }));
        });
        Ok(pid)
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::now(128 + 9);
            }
        }
    }

    async fn kill(&self, signal: u32) -> Result<()> {
        self.agent
            .signal(&self.container_id, &self.exec_id, signal, false)
            .await
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        self.agent
            .resize(&self.container_id, &self.exec_id, width, height)
            .await
    }

    async fn close_stdin(&self) -> Result<()> {
        // The pipe's end of file ends the stdin pump, which closes the guest's stdin.
        self.stdin_closer.close();
        Ok(())
    }
}
