//! The kit's engine for microVMs: one VM per sandbox (per shim process), containers created by
//! the guest agent.
//!
//! The first Create of a shim boots the VM with that container's read-only rootfs image as its
//! first disk (`/dev/vda`). Later containers of the sandbox reach the running VM (virtio-mmio has
//! no hotplug) as image files in the sandbox's 9p share, which the agent loop-mounts (QEMU, for
//! a group or pod: only then does the VM get a 9p device), or as a spare disk the backend gives
//! the image to ([`Vm::attach_disk`](crate::hypervisor::Vm::attach_disk), the built-in VMM),
//! which the agent mounts like `/dev/vda` and which is emptied again after the container's
//! removal. Every task call becomes one agent call; stdio is pumped over the same channel with
//! long-poll reads. When the last container is deleted the VM is shut down, so nothing outlives
//! the sandbox.
//!
//! | module | |
//! |---|---|
//! | here | Create: the spec's checks, the rootfs image, joining or booting the sandbox |
//! | [`sandbox`] | the VM's lifecycle: boot, later containers' images, teardown, stop |
//! | [`container`] | the task calls of one container |
//! | [`pod`] | a CRI pod's VM, booted at RunPodSandbox before its containers |
//! | [`process`] | one process and its stdio pumps |
//! | [`oom`] | OOM reports from the guest, checked and paced |
//! | [`spec`] | what the vm runtime refuses in a spec, bind mounts, the guest's namespaces |
//! | [`volumes`] | host files and directories shared with the guest (the volume share) |
//! | [`copies`] | without a shared filesystem: host files copied in, emptyDirs in the guest |

pub mod container;
pub mod copies;
pub mod forward;
pub mod net;
pub mod oom;
pub mod pod;
pub mod process;
pub mod sandbox;
pub mod spec;
pub mod volumes;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use yard_agent_protocol as proto;
use yard_shim_kit::bundle::{rootfs_dir, unmount_rootfs};
use yard_shim_kit::protos::protobuf::MessageField;
use yard_shim_kit::{Container, CreateRequest, Engine, Error, Result, Rootfs};

use crate::config::Options;
use crate::hypervisor::{Backends, HostBackends};
use crate::image::{Image, ImageFormat};
use container::VmContainer;
use process::VmProcess;
use sandbox::{Attached, Boot, Dirs, SANDBOX_FILE, Sandbox, Slot, release};
use volumes::{Binder, HostBinder};

pub use sandbox::STATE_ROOT;

pub struct VmEngine {
    sandbox: Arc<Slot>,
    backends: Arc<dyn Backends>,
    dirs: Dirs,
    binder: Arc<dyn Binder>,
    plumber: Arc<dyn net::Plumber>,
}

impl Default for VmEngine {
    fn default() -> Self {
        VmEngine::new()
    }
}

impl VmEngine {
    /// The backend is chosen per sandbox from its options and the host
    /// ([`crate::virt::choose_backend`]).
    pub fn new() -> VmEngine {
        VmEngine::with_backends(Arc::new(HostBackends), STATE_ROOT)
    }

    /// An engine whose sandboxes boot on `backends` and keep their state under `state_root`
    /// (tests use a fake VMM and a temporary directory).
    pub fn with_backends(backends: Arc<dyn Backends>, state_root: impl Into<PathBuf>) -> VmEngine {
        VmEngine {
            sandbox: Arc::default(),
            backends,
            dirs: Dirs {
                state_root: state_root.into(),
            },
            binder: Arc::new(HostBinder),
            plumber: Arc::new(net::HostPlumber),
        }
    }

    /// Pod networks through `plumber` (tests record them instead).
    pub fn with_plumber(mut self, plumber: Arc<dyn net::Plumber>) -> VmEngine {
        self.plumber = plumber;
        self
    }

    /// Host mounts of the volume share through `binder` (tests record them instead).
    pub fn with_binder(mut self, binder: Arc<dyn Binder>) -> VmEngine {
        self.binder = binder;
        self
    }
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
        // The kit has read the spec and mounted a rootfs it did not hand over (and unmounts it
        // when this fails).
        let spec = &req.spec;
        if pod::is_pod_vm(spec) {
            return self.create_pod_vm(&req).await;
        }
        if spec.process().is_none() {
            return Err(Error::InvalidArgument(
                "config.json: process: missing".into(),
            ));
        }
        spec::binds(spec)?;
        let prebuilt = match &req.rootfs {
            Rootfs::Mounts(mounts) => prebuilt_image(mounts)?,
            Rootfs::Dir(_) => None,
        };
        self.create_container(&req, spec, prebuilt).await
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
        if key.is_empty() || key.contains('/') || key.starts_with('.') || sandbox::owner_alive(key)
        {
            return Ok(());
        }
        tracing::info!(
            container_id = id,
            sandbox = key,
            "removing a dead shim's sandbox files"
        );
        volumes::sweep(self.binder.as_ref(), &self.dirs.volume_dir(namespace, key));
        // The VMM joined the cgroup of the container that booted the sandbox (the key starts
        // with its id).
        if sandbox::booted_by(key, id) {
            yard_shim_kit::cgroup::remove_for_bundle(bundle, id);
        }
        let _ = std::fs::remove_dir_all(self.dirs.state_dir(namespace, key));
        let _ = std::fs::remove_dir_all(sandbox::share_dir(&options, namespace, key));
        Ok(())
    }

    async fn shutdown(&self) {
        if let Some(sb) = self.sandbox.lock().await.take() {
            sb.stop().await;
        }
        self.sandbox.stopped().await;
    }
}

impl VmEngine {
    /// Boots a pod's VM with no container in it yet ([`pod`]).
    async fn create_pod_vm(&self, req: &CreateRequest) -> Result<Arc<dyn Container>> {
        let spec = &req.spec;
        let mut slot = self.sandbox.lock().await;
        drop_dead(&mut slot).await;
        if let Some(sb) = slot.as_ref() {
            return Err(Error::FailedPrecondition(format!(
                "config.json: a pod sandbox: this shim already runs sandbox {} (a pod's tasks \
                 share its shim: io.kubernetes.cri.sandbox-id)",
                sb.id
            )));
        }
        let mut options = Options::from_any(req.options.as_ref())?;
        (options.vcpus, options.memory_mib) = pod::size(&options, spec)?;
        let sandbox = Sandbox::boot(
            self.backends.as_ref(),
            Boot {
                namespace: &req.namespace,
                id: &req.id,
                options,
                image: None,
                events: req.events.clone(),
                grouped: true,
                dirs: &self.dirs,
                host_bind: None,
                needs_shared_fs: None,
                binder: self.binder.clone(),
                plumber: self.plumber.clone(),
                cgroup: vmm_cgroup(spec),
                netns: net::pod_netns(spec),
                hostname: spec.hostname().clone(),
            },
        )
        .await?;
        sandbox.reserve(&req.id, Attached::Nothing);
        sandbox.record_in(&req.bundle);
        *slot = Some(sandbox.clone());
        Ok(Arc::new(pod::PodVm {
            id: req.id.clone(),
            process: pod::VmAsProcess::new(sandbox.clone()),
            sandbox,
            slot: self.sandbox.clone(),
        }))
    }

    async fn create_container(
        &self,
        req: &CreateRequest,
        spec: &Spec,
        prebuilt: Option<Image>,
    ) -> Result<Arc<dyn Container>> {
        let binds = spec::binds(spec)?;
        let mut guest_spec = spec.clone();
        spec::guest_namespaces(&mut guest_spec);
        let spec_bytes = serde_json::to_vec(&guest_spec)
            .map_err(|e| Error::Internal(format!("encode config.json for the guest: {e}")))?;
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
        drop_dead(&mut slot).await;
        let options = match slot.as_ref() {
            Some(sb) => sb.options.clone(),
            None => {
                let mut options = Options::from_any(req.options.as_ref())?;
                // A pod's pause container (containerd's CRI) boots the pod's VM: sized for
                // the pod.
                if pod::is_sandbox(spec) {
                    (options.vcpus, options.memory_mib) = pod::size(&options, spec)?;
                }
                options
            }
        };
        spec::check_enforceable(&spec::unenforceable(spec), &options, "config.json", &req.id)?;
        let image = match (prebuilt, rootfs) {
            (Some(image), _) => image,
            (None, Some(rootfs)) => {
                let images = sandbox::cache(&options);
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
            Some(sb) => {
                let (storage, attached) =
                    sb.give_image(&req.id, &image.path, image.fstype()).await?;
                (sb.clone(), storage, attached)
            }
            None => {
                let grouped = spec::grouped(spec, &options);
                let host_bind = binds
                    .iter()
                    .find(|b| matches!(b.source, spec::BindSource::Host { .. }))
                    .map(spec::Bind::describe);
                let needs_shared_fs = copies::needs_shared_fs(&binds);
                let sb = Sandbox::boot(
                    self.backends.as_ref(),
                    Boot {
                        namespace: &req.namespace,
                        id: &req.id,
                        options,
                        image: Some(&image.path),
                        events: req.events.clone(),
                        grouped,
                        dirs: &self.dirs,
                        host_bind,
                        needs_shared_fs,
                        binder: self.binder.clone(),
                        plumber: self.plumber.clone(),
                        cgroup: vmm_cgroup(spec),
                        netns: net::pod_netns(spec),
                        hostname: spec.hostname().clone(),
                    },
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
        sandbox.reserve(&req.id, attached.clone());
        sandbox.record_in(&req.bundle);
        drop(slot);

        let volumes = sandbox.give_volumes(&req.id, &binds).await;
        let created = match volumes {
            Ok(volumes) => sandbox
                .agent
                .create_container(proto::CreateContainerRequest {
                    container_id: req.id.clone(),
                    spec: spec_bytes,
                    storage: MessageField::some(storage),
                    stdin: !req.stdio.stdin.is_empty(),
                    volumes,
                    ..Default::default()
                })
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = created {
            sandbox.take_back_volumes(&req.id).await;
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

/// Takes a sandbox whose VM has ended (or whose agent broke the protocol) out of the slot and
/// stops it: the next Create boots a new one.
async fn drop_dead(slot: &mut Option<Arc<Sandbox>>) {
    if let Some(sb) = slot.take_if(|sb| sb.unusable()) {
        tracing::warn!(sandbox = %sb.id, "the sandbox's VM is gone; booting a new one");
        sb.stop().await;
    }
}

/// The host cgroup the VMM joins: the booting task's `linux.cgroupsPath`, where usable.
fn vmm_cgroup(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()
        .and_then(|l| yard_shim_kit::cgroup::usable(l.cgroups_path().as_deref()))
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

fn image_error(e: crate::image::ImageError) -> Error {
    use crate::image::ImageError as I;
    let msg = format!("rootfs image: {e}");
    match e {
        I::RootfsMissing { .. } | I::NotADirectory { .. } => Error::InvalidArgument(msg),
        I::NoTool { .. } => Error::FailedPrecondition(msg),
        _ => Error::Internal(msg),
    }
}
