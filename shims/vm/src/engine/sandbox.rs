//! The sandbox: one VM, its agent, and the containers in it. It boots with the first container
//! (whose image is the boot disk), takes later containers' images through the backend's share
//! or spare disks, and stops when its last container is deleted. If the guest agent breaks the
//! protocol the VM is torn down at once ([`Sandbox::boot`]'s watchdog): every call in flight
//! then fails and every process reads as killed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use yard_agent_protocol as proto;
use yard_shim_kit::{Error, Publisher, Result};

use super::copies::Copies;
use super::net::{Plumber, PodNet};
use super::oom::OomReporter;
use super::volumes::{Binder, Volumes};
use crate::agent::{Agent, bounded};
use crate::config::Options;
use crate::hypervisor::{Backends, BootVmError, Vm, VmConfig, VmError};
use crate::image::ImageCache;

/// Per-VM runtime state (console log): gone with the VM.
pub const STATE_ROOT: &str = "/run/switchyard/vm";
/// How long a VM may take to power off after the agent's Shutdown before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long the agent may take to answer Shutdown.
const SHUTDOWN_ASK: Duration = Duration::from_secs(2);

/// The shim's sandbox, once booted; containers keep a handle to release it on delete. The VM
/// of a single container stops in the background once that container is deleted ([`release`]):
/// the engine's shutdown waits for it ([`Slot::stopped`]) before the shim exits.
#[derive(Default)]
pub struct Slot {
    current: Mutex<Option<Arc<Sandbox>>>,
    stopping: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Slot {
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, Option<Arc<Sandbox>>> {
        self.current.lock().await
    }

    /// Stops `sandbox` on a task of its own.
    fn stop_later(&self, sandbox: Arc<Sandbox>) {
        let stop = tokio::spawn(async move { sandbox.stop().await });
        let mut stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        stopping.retain(|h| !h.is_finished());
        stopping.push(stop);
    }

    /// Resolves once every VM stopped in the background is gone.
    pub async fn stopped(&self) {
        let stops = std::mem::take(&mut *self.stopping.lock().unwrap_or_else(|p| p.into_inner()));
        for stop in stops {
            let _ = stop.await;
        }
    }
}

/// Where a sandbox keeps its files on the host.
#[derive(Clone, Debug)]
pub struct Dirs {
    /// Per-VM state (console log, vsock socket): [`STATE_ROOT`] unless a test says otherwise.
    pub state_root: PathBuf,
}

impl Dirs {
    pub fn state_dir(&self, namespace: &str, key: &str) -> PathBuf {
        self.state_root.join(namespace).join(key)
    }

    /// The volume share ([`super::volumes`]): beside the state directory, not in it, so the
    /// state's recursive removal can never reach a bound volume.
    pub fn volume_dir(&self, namespace: &str, key: &str) -> PathBuf {
        self.state_root.join(namespace).join(format!("{key}.vol"))
    }
}

/// The 9p share of a sandbox: beside the image cache, so images are hard-linked in rather than
/// copied.
pub fn share_dir(options: &Options, namespace: &str, key: &str) -> PathBuf {
    options.cache_dir.join("share").join(namespace).join(key)
}

pub fn cache(options: &Options) -> ImageCache {
    ImageCache::new(options.cache_dir.join("images"))
}

/// Each container's bundle names its sandbox, so `<shim> delete` after a dead shim finds the
/// sandbox's directories whichever container it is called for.
pub const SANDBOX_FILE: &str = "vm-sandbox";

/// Whether the shim that owns sandbox `key` (`<id>-<pid>`, [`sandbox_key`]) still runs.
pub fn owner_alive(key: &str) -> bool {
    let Some(pid) = key.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("containerd-shim-yard-vm-v1"))
        .unwrap_or(false)
}

/// How a container's image reached the VM, to undo after its removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The disk the VM booted with.
    BootDisk,
    /// No image: a pod's VM itself ([`super::pod`]).
    Nothing,
    /// A file in the 9p share.
    Shared(PathBuf),
    /// A disk attached after boot: the guest's device path.
    Disk(String),
}

/// How later containers' images reach the running VM (virtio-mmio has no hotplug, so what a VM
/// can take is fixed at boot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Later {
    /// Files in this 9p share (QEMU, for a group or pod).
    Share(PathBuf),
    /// Spare disks ([`Vm::attach_disk`], the built-in backend).
    Disks,
    /// Nothing: the sandbox runs one container (QEMU outside a group: no 9p device).
    Nothing,
}

/// What booting a sandbox needs.
pub struct Boot<'a> {
    pub namespace: &'a str,
    /// The first container's id: names the sandbox.
    pub id: &'a str,
    pub options: Options,
    /// The first container's image: the VM's boot disk. `None` for a pod's VM booted before
    /// its containers ([`super::pod`]): they all come as later containers.
    pub image: Option<&'a Path>,
    pub events: Publisher,
    /// Other containers may join (a group or pod).
    pub grouped: bool,
    pub dirs: &'a Dirs,
    /// The first container's first bind mount of a host path, described: the VM needs a
    /// volume share where the backend has one.
    pub host_bind: Option<String>,
    /// The first container's first bind mount that only a shared filesystem can carry (a host
    /// directory that is not an emptyDir, [`super::copies::needs_shared_fs`]), described.
    pub needs_shared_fs: Option<String>,
    pub binder: Arc<dyn Binder>,
    pub plumber: Arc<dyn Plumber>,
    /// The first container's `linux.cgroupsPath` (a usable cgroupfs path): the VMM process
    /// joins it, so the VM's host usage is accounted to the sandbox (CRI's PodSandboxStats
    /// reads the pod's cgroup parent).
    pub cgroup: Option<PathBuf>,
    /// The pod's network namespace (the first container's spec names it by path): the VM gets
    /// a virtio-net device mirrored to its `eth0` ([`super::net`]). `None`: no network device.
    pub netns: Option<PathBuf>,
    /// The first container's hostname: the guest's, when it has a pod network.
    pub hostname: Option<String>,
}

/// One VM and what runs in it.
pub struct Sandbox {
    pub id: String,
    /// Names the sandbox's directories: its first container's id and this shim's pid, unique
    /// while the shim lives (a later sandbox may reuse a deleted container's id).
    pub key: String,
    pub options: Options,
    /// The hypervisor backend's name.
    pub backend: &'static str,
    pub later: Later,
    /// The volume share, where the backend shares files and the sandbox may need it.
    pub volumes: Option<Volumes>,
    /// Copies of host files and the pod's directories, where the backend shares no files.
    pub copies: Option<Arc<Copies>>,
    vm: Arc<dyn Vm>,
    pub agent: Agent,
    state_dir: PathBuf,
    /// Container id → how its image reached the VM.
    containers: std::sync::Mutex<HashMap<String, Attached>>,
    /// The OOM watch, the teardown watchdog and the copies' refresher.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    pub ooms: Arc<OomReporter>,
    /// The host cgroup the VMM process was moved into, removed when the VM stops.
    host_cgroup: Option<PathBuf>,
    /// The pod network's tap and redirects, undone when the VM stops.
    net: std::sync::Mutex<Option<Arc<PodNet>>>,
    plumber: Arc<dyn Plumber>,
    /// Booted for a group or a pod: other containers may come, and the pod's teardown (its
    /// network namespace) follows the VM's, so its last Delete waits for the VM to stop.
    grouped: bool,
}

fn boot_error(e: BootVmError) -> Error {
    use BootVmError as B;
    // The whole chain: "start the built-in VMM: <why>".
    let msg = yard_shim_kit::error::chain(&e);
    match e {
        B::KernelMissing { .. } | B::InitrdMissing { .. } | B::QemuMissing { .. } => {
            Error::FailedPrecondition(msg)
        }
        _ => Error::Internal(msg),
    }
}

/// How much of the first container's id names the sandbox's directories: the rest of a
/// 64-character CRI id would push the built-in VMM's vsock socket
/// (`<state root>/<namespace>/<key>/vsock.sock`) past the 108 bytes of `sun_path`.
const KEY_ID_CHARS: usize = 24;

/// `<id, cut to KEY_ID_CHARS>-<shim pid>`: unique while the shim lives, since a shim runs one
/// sandbox at a time and removes its directories before it boots another.
fn sandbox_key(id: &str, pid: u32) -> String {
    let short: String = id.chars().take(KEY_ID_CHARS).collect();
    format!("{short}-{pid}")
}

/// Whether the sandbox named `key` was booted by container `id`.
pub fn booted_by(key: &str, id: &str) -> bool {
    key.rsplit_once('-')
        .is_some_and(|(short, _)| short == id.chars().take(KEY_ID_CHARS).collect::<String>())
}

/// Undoes a pod network's redirects off the async threads; the tap goes with the last fd of it
/// (the VMM's has gone with the VM, ours with `net`).
async fn detach(plumber: Arc<dyn Plumber>, net: Arc<PodNet>) {
    let _ = tokio::task::spawn_blocking(move || plumber.detach(&net)).await;
}

/// Removes `dirs` off the async threads (a share may hold copied images).
async fn remove_dirs(dirs: Vec<PathBuf>) {
    let _ = tokio::task::spawn_blocking(move || {
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    })
    .await;
}

impl Sandbox {
    pub async fn boot(backends: &dyn Backends, b: Boot<'_>) -> Result<Arc<Sandbox>> {
        let chosen = backends
            .choose(&b.options)
            .await
            .map_err(|e| Error::InvalidArgument(format!("options: {e}")))?;
        let hypervisor = chosen.hypervisor;
        if let Some(what) = b
            .needs_shared_fs
            .as_ref()
            .filter(|_| !hypervisor.shares_files())
        {
            return Err(super::copies::no_shared_fs(what, hypervisor.name()));
        }
        let key = sandbox_key(b.id, std::process::id());
        let state_dir = b.dirs.state_dir(b.namespace, &key);
        let later = if !hypervisor.shares_files() {
            Later::Disks
        } else if b.grouped {
            Later::Share(share_dir(&b.options, b.namespace, &key))
        } else {
            Later::Nothing
        };
        let mut dirs = vec![state_dir.clone()];
        if let Later::Share(share) = &later {
            dirs.push(share.clone());
        }
        for d in &dirs {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(Error::io(format!("create {}", d.display())))?;
        }
        let volumes = (hypervisor.shares_files() && (b.grouped || b.host_bind.is_some()))
            .then(|| Volumes::new(b.dirs.volume_dir(b.namespace, &key), b.binder.clone()));
        if let Some(v) = &volumes {
            super::volumes::sweep(b.binder.as_ref(), &v.dir);
            if let Err(e) = std::fs::create_dir_all(&v.dir) {
                remove_dirs(dirs).await;
                return Err(Error::io(format!("create {}", v.dir.display()))(e));
            }
        }
        // The pod network: a tap in the pod's namespace, mirrored to its eth0.
        let net = match b.netns.clone() {
            Some(netns) => {
                let (hostname, plumber) = (b.hostname.clone(), b.plumber.clone());
                let attached =
                    tokio::task::spawn_blocking(move || plumber.attach(&netns, hostname))
                        .await
                        .map_err(|e| Error::Internal(format!("pod network task: {e}")))
                        .and_then(|r| r);
                match attached {
                    Ok(n) => n.map(Arc::new),
                    Err(e) => {
                        if let Some(v) = volumes {
                            v.remove().await;
                        }
                        remove_dirs(dirs).await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        // Every way out below that fails removes the directories made above and the pod
        // network's plumbing.
        let plumber = b.plumber.clone();
        let fail = |volumes: Option<Volumes>, dirs: Vec<PathBuf>, net: Option<Arc<PodNet>>| async move {
            if let Some(n) = net {
                detach(plumber, n).await;
            }
            if let Some(v) = volumes {
                v.remove().await;
            }
            remove_dirs(dirs).await;
        };
        let mut kernel_args = b.options.kernel_args.clone();
        if b.options.debug {
            kernel_args.push(format!("{}=1", proto::CMDLINE_DEBUG));
        }
        let cfg = VmConfig {
            id: format!("{}-{}", b.namespace, b.id),
            state_dir: state_dir.clone(),
            kernel: b.options.kernel.clone(),
            initrd: b.options.initrd.clone(),
            kernel_args,
            vcpus: b.options.vcpus,
            memory_mib: b.options.memory_mib,
            accel: chosen.accel,
            boot_timeout: b.options.boot_timeout(),
            root_disk: b.image.map(Path::to_path_buf),
            share_dir: match &later {
                Later::Share(dir) => Some(dir.clone()),
                Later::Disks | Later::Nothing => None,
            },
            volume_dir: volumes.as_ref().map(|v| v.dir.clone()),
            net: net.as_ref().map(|n| n.device.clone()),
        };
        let mut vm = match hypervisor.boot(cfg).await {
            Ok(vm) => vm,
            Err(e) => {
                fail(volumes, dirs, net.clone()).await;
                return Err(boot_error(e));
            }
        };
        let Some(stream) = vm.take_agent_stream() else {
            vm.stop(STOP_GRACE).await;
            fail(volumes, dirs, net.clone()).await;
            return Err(Error::Internal("VM booted without an agent stream".into()));
        };
        // The VMM joins its cgroup (a blocking walk over the hierarchies) while the agent
        // answers Hello: neither waits for the other.
        let join = match (b.cgroup.clone(), vm.pid()) {
            (Some(path), Some(pid)) => {
                let id = b.id.to_owned();
                Some(tokio::task::spawn_blocking(move || {
                    yard_shim_kit::cgroup::join(&path, &id, pid, "the VMM").map(|_| path)
                }))
            }
            (Some(path), None) => {
                tracing::debug!(
                    cgroup = %path.display(),
                    "the built-in VMM runs in the shim: the shim's cgroup accounts it"
                );
                None
            }
            (None, _) => None,
        };
        let vm: Arc<dyn Vm> = Arc::from(vm);
        let agent = Agent::new(stream);
        let hello = agent.hello().await;
        let joined = match join {
            Some(task) => Some(
                task.await
                    .map_err(|e| Error::Internal(format!("cgroup join task: {e}")))
                    .and_then(|r| r),
            ),
            None => None,
        };
        let host_cgroup = match joined {
            Some(Ok(path)) => Some(path),
            Some(Err(e)) => {
                vm.stop(STOP_GRACE).await;
                if let Some(path) = &b.cgroup {
                    yard_shim_kit::cgroup::remove(path, b.id);
                }
                fail(volumes, dirs, net.clone()).await;
                return Err(e);
            }
            None => None,
        };
        match hello {
            Ok(h) => tracing::info!(
                sandbox = b.id,
                hypervisor = hypervisor.name(),
                accel = %vm.accel(),
                boot_ms = vm.boot_time().as_millis() as u64,
                kernel = %bounded(&h.kernel_release),
                vcpus = h.vcpus,
                memory_mib = h.memory_bytes >> 20,
                "VM ready"
            ),
            Err(e) => {
                vm.stop(STOP_GRACE).await;
                if let Some(path) = &host_cgroup {
                    yard_shim_kit::cgroup::remove(path, b.id);
                }
                fail(volumes, dirs, net.clone()).await;
                return Err(e.into());
            }
        }
        if let Some(n) = &net
            && let Err(e) = agent.configure_network(&n.config).await
        {
            vm.stop(STOP_GRACE).await;
            if let Some(path) = &host_cgroup {
                yard_shim_kit::cgroup::remove(path, b.id);
            }
            fail(volumes, dirs, net.clone()).await;
            return Err(Error::FailedPrecondition(format!(
                "configure the guest's network from {}: {}",
                n.netns.display(),
                yard_shim_kit::error::chain(&e)
            )));
        }
        let ooms = Arc::new(OomReporter::new(agent.clone(), b.events));
        let watch = tokio::spawn({
            let ooms = ooms.clone();
            async move { ooms.watch().await }
        });
        let copies = (!hypervisor.shares_files())
            .then(|| Arc::new(Copies::new(agent.clone(), hypervisor.name())));
        let mut tasks = vec![watch];
        if let Some(c) = &copies {
            let c = c.clone();
            tasks.push(tokio::spawn(async move { c.keep_current().await }));
        }
        match super::forward::listen(&state_dir) {
            Ok(listener) => {
                tasks.push(tokio::spawn(super::forward::serve(listener, agent.clone())))
            }
            Err(e) => tracing::warn!(
                sandbox = b.id,
                error = %e,
                "port forwarding into this VM is off: cannot bind its socket"
            ),
        }
        let watchdog = tokio::spawn({
            let (health, vm, id) = (agent.health().clone(), vm.clone(), b.id.to_owned());
            async move {
                let what = health.broken().await;
                tracing::error!(
                    sandbox = %id,
                    violation = %what,
                    "tearing the sandbox down: its guest agent broke the protocol"
                );
                vm.stop(Duration::ZERO).await;
            }
        });
        Ok(Arc::new(Sandbox {
            id: b.id.to_owned(),
            key,
            options: b.options,
            backend: hypervisor.name(),
            later,
            volumes,
            copies,
            vm,
            agent,
            state_dir,
            containers: std::sync::Mutex::new(HashMap::new()),
            tasks: std::sync::Mutex::new({
                tasks.push(watchdog);
                tasks
            }),
            ooms,
            host_cgroup,
            net: std::sync::Mutex::new(net),
            plumber: b.plumber,
            grouped: b.grouped,
        }))
    }

    /// Names the sandbox in a container's bundle: its key ([`SANDBOX_FILE`]) and its port
    /// forwarding socket ([`FORWARD_FILE`](super::forward::FORWARD_FILE)).
    pub fn record_in(&self, bundle: &Path) {
        let socket = self.state_dir.join(super::forward::SOCKET);
        let files = [
            (SANDBOX_FILE, self.key.as_bytes()),
            (
                super::forward::FORWARD_FILE,
                socket.as_os_str().as_encoded_bytes(),
            ),
        ];
        for (name, content) in files {
            if let Err(e) = std::fs::write(bundle.join(name), content) {
                tracing::warn!(bundle = %bundle.display(), file = name, error = %e, "cannot record the sandbox");
            }
        }
    }

    /// The VMM process, when the VMM is one (QEMU; the built-in VMM runs in the shim).
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vm.pid()
    }

    /// Resolves when the VM has ended.
    pub async fn exited(&self) {
        self.vm.exited().await;
    }

    /// Asks the guest to power off (the agent kills what runs in it) and stops the VMM if it
    /// does not go. The sandbox's files stay until [`Sandbox::stop`].
    pub async fn power_off(&self) {
        if self.vm.exit_status().is_some() {
            return;
        }
        let asked = tokio::time::timeout(SHUTDOWN_ASK, self.agent.shutdown()).await;
        if !matches!(asked, Ok(Ok(()))) {
            tracing::warn!(sandbox = %self.id, "agent did not take Shutdown; stopping the VM");
        }
        self.vm.stop(STOP_GRACE).await;
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attached>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `id` in: a concurrent last delete must not stop the VM from now on.
    pub fn reserve(&self, id: &str, attached: Attached) {
        self.containers().insert(id.to_owned(), attached);
        self.ooms.add(id);
    }

    /// Whether deleting container `id` ends this VM, so that the guest need not remove the
    /// container first: a VM of its own (no group or pod) that holds only `id` and shares no
    /// volume with the host. The VM is powered off after the Delete (its agent syncs the
    /// guest's filesystems first), which undoes all the guest's removal would: the container's
    /// processes, mounts, cgroup and runtime state are the guest's alone.
    pub fn ends_with(&self, id: &str) -> bool {
        !self.grouped && self.volumes.is_none() && {
            let c = self.containers();
            c.len() == 1 && c.contains_key(id)
        }
    }

    pub fn attached(&self, id: &str) -> Option<Attached> {
        self.containers().get(id).cloned()
    }

    /// The VM has ended, or its agent can no longer be trusted: a new container needs a new
    /// sandbox.
    pub fn unusable(&self) -> bool {
        // Not /proc/PID: the kit's subreaper collects QEMU, and its pid can be reused.
        self.vm.exit_status().is_some() || self.agent.health().violation().is_some()
    }

    /// Gives a later container's image to the running VM.
    pub async fn give_image(
        &self,
        id: &str,
        image: &Path,
        fstype: &str,
    ) -> Result<(proto::Storage, Attached)> {
        match &self.later {
            Later::Share(dir) => self.share_image(dir, id, image, fstype).await,
            Later::Disks => self.attach_image(image, fstype).await,
            Later::Nothing => Err(Error::FailedPrecondition(format!(
                "sandbox {} was booted for one container (no group annotation or `group` \
                 option), so its VM has no share for another container's image: give the \
                 tasks a group (annotation io.switchyard.group) to run them in one VM",
                self.id
            ))),
        }
    }

    /// Puts a later container's image into the share, as `<container>.<fstype>`: a hard link,
    /// or a copy of the whole image where the cache is on another filesystem, made off the
    /// async threads so a large image does not hold up other calls.
    async fn share_image(
        &self,
        dir: &Path,
        id: &str,
        image: &Path,
        fstype: &str,
    ) -> Result<(proto::Storage, Attached)> {
        let name = format!("{id}.{fstype}");
        let dest = dir.join(&name);
        let (from, to) = (image.to_owned(), dest.clone());
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&to);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(Error::io(format!(
                    "copy {} into the sandbox share",
                    from.display()
                )))?;
            }
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::Internal(format!("share the image: {e}")))??;
        let storage = proto::Storage {
            shared_file: name,
            fstype: fstype.into(),
            ..Default::default()
        };
        Ok((storage, Attached::Shared(dest)))
    }

    /// Gives a later container's image to the VM as a disk.
    async fn attach_image(&self, image: &Path, fstype: &str) -> Result<(proto::Storage, Attached)> {
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
        Ok((storage, Attached::Disk(device)))
    }

    /// Gives container `id`'s host sources to the guest: bound into the volume share, or
    /// copied ([`Copies`]) where the backend shares no files. The agent's volume list.
    pub async fn give_volumes(
        &self,
        id: &str,
        binds: &[super::spec::Bind],
    ) -> Result<Vec<proto::Volume>> {
        let host = binds
            .iter()
            .find(|b| matches!(b.source, super::spec::BindSource::Host { .. }));
        match (&self.volumes, &self.copies, host) {
            (Some(v), _, _) => v.give(id, binds).await,
            (None, Some(c), _) => c.give(id, binds).await,
            (None, None, None) => Ok(binds.iter().map(super::spec::Bind::volume).collect()),
            (None, None, Some(b)) => Err(Error::FailedPrecondition(format!(
                "config.json: {}: sandbox {} was booted without a volume share (its first \
                 container had no host mounts and no group): give the tasks a group \
                 (annotation io.switchyard.group)",
                b.describe(),
                self.id
            ))),
        }
    }

    /// Unbinds container `id`'s volumes, or removes its copies.
    pub async fn take_back_volumes(&self, id: &str) {
        if let Some(v) = &self.volumes {
            v.take_back(id).await;
        }
        if let Some(c) = &self.copies {
            c.take_back(id).await;
        }
    }

    /// Undoes how a container's image reached the VM. A disk is detached only once the agent
    /// removed the container (`removed`): until then its filesystem may still be mounted.
    pub async fn detach(&self, id: &str, attached: &Attached, removed: bool) {
        match attached {
            Attached::BootDisk | Attached::Nothing => {}
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

    /// Shuts the guest down (the agent kills what runs and powers off, so the VMM exits), stops
    /// the VMM if it does not go, and removes the sandbox's files.
    pub async fn stop(&self) {
        for h in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
        self.power_off().await;
        // Idempotent: after a power-off that the VMM did not finish.
        self.vm.stop(STOP_GRACE).await;
        if let Some(path) = &self.host_cgroup {
            yard_shim_kit::cgroup::remove(path, &self.id);
        }
        let net = self.net.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(n) = net {
            detach(self.plumber.clone(), n).await;
        }
        if let Some(v) = &self.volumes {
            v.remove().await;
        }
        let mut dirs = vec![self.state_dir.clone()];
        if let Later::Share(dir) = &self.later {
            dirs.push(dir.clone());
        }
        remove_dirs(dirs).await;
        tracing::info!(sandbox = %self.id, "VM stopped");
    }
}

/// A container is gone: when it was the last, the VM goes too.
pub async fn release(slots: &Slot, sandbox: &Arc<Sandbox>, id: &str) {
    let mut slot = slots.lock().await;
    sandbox.ooms.remove(id);
    let empty = {
        let mut c = sandbox.containers();
        c.remove(id);
        c.is_empty()
    };
    let ours = slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, sandbox));
    if empty && ours {
        slot.take();
        drop(slot);
        if sandbox.grouped {
            sandbox.stop().await;
        } else {
            // The container is gone from the guest: its caller need not wait for the VM's
            // power-off (~40 ms under TCG here), only the shim's exit does.
            slots.stop_later(sandbox.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18: whatever the ids' length, the built-in VMM's vsock socket under the default
    /// state root fits a socket address (namespaces up to 40 bytes, as CRI's `k8s.io`).
    #[test]
    fn issue18_socket_paths_fit_whatever_the_ids_length() {
        let dirs = Dirs {
            state_root: STATE_ROOT.into(),
        };
        let id = "f".repeat(76);
        let key = sandbox_key(&id, 4_194_304);
        let sock = dirs.state_dir(&"n".repeat(40), &key).join("vsock.sock");
        assert!(sock.as_os_str().len() <= 107, "{}", sock.display());
        assert!(owner_alive(&key) || key.ends_with("-4194304"));
        assert_eq!(sandbox_key("c1", 7), "c1-7");
    }
}
