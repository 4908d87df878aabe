//! The hypervisor backend interface: what the shim's engine needs from a VMM, so the QEMU backend
//! ([`crate::qemu`]) and the built-in KVM VMM ([`crate::builtin`]) plug in behind the same two traits
//! (cloud-hypervisor's `hypervisor` crate is shaped the same way), and the factory that picks one
//! for a sandbox ([`Backends`]; tests put a fake VMM there).
//!
//! A backend boots one VM per [`VmConfig`] and hands back a [`Vm`] whose agent stream is already
//! past the agent's [`READY_BANNER`](yard_agent_protocol::READY_BANNER): the caller speaks ttrpc
//! on it right away. What is particular to one backend (QEMU's binary) is that backend's own
//! configuration, not the VM's.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::Options;
use crate::virt::{self, Backend, BackendError};

/// How guest code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator: slow, but runs anywhere (here: under PVM, see [`crate::virt`]).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM to boot.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Names the VM in the VMM's process title and in logs.
    pub id: String,
    /// A per-VM directory the caller creates (and removes after [`Vm::stop`]); the backend writes
    /// `console.log` here.
    pub state_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the backend's base arguments (`console=ttyS0 quiet panic=-1 reboot=t ...`).
    pub kernel_args: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// From spawn to the agent's ready banner.
    pub boot_timeout: Duration,
    /// A raw image attached read-only as the first virtio-blk disk (`/dev/vda` in the guest).
    pub root_disk: Option<PathBuf>,
    /// A host directory exported read-only over virtio-9p with mount tag
    /// [`SHARE_TAG`](yard_agent_protocol::SHARE_TAG), for a backend that
    /// [shares files](Hypervisor::shares_files). `None`: the VM gets no 9p device at all (the
    /// engine asks for one only when later containers may need it).
    pub share_dir: Option<PathBuf>,
    /// A host directory exported read-write over virtio-9p with mount tag
    /// [`VOLUME_TAG`](yard_agent_protocol::VOLUME_TAG): the containers' host mounts
    /// ([`crate::engine::volumes`]). `None`: no such device.
    pub volume_dir: Option<PathBuf>,
    /// The pod's network ([`crate::engine::net`]): a tap the engine made in the pod's network
    /// namespace, given to the guest as a virtio-net device. `None`: no network device.
    pub net: Option<NetDevice>,
}

/// A virtio-net device backed by a tap.
#[derive(Clone, Debug)]
pub struct NetDevice {
    /// `/dev/net/tun` attached to the tap with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (a 12-byte
    /// `virtio_net_hdr_v1` before every frame, `TUNSETVNETHDRSZ`); the device lives while an fd
    /// of it is open, so it goes with the VM. The backend sets the offloads the guest takes
    /// (`TUNSETOFFLOAD`).
    pub tap: Arc<OwnedFd>,
    /// The guest's MAC address: the pod's `eth0`'s, so the pod's neighbours see one address
    /// whether the host or the guest answers.
    pub mac: [u8; 6],
    /// The tap's MTU (the pod's `eth0`'s); the guest's interface gets the same.
    pub mtu: u32,
}

/// How the VMM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    Code(i32),
    Signal(i32),
    /// Somebody else collected it (a shim's subreaper runs `waitpid(-1)`).
    Unknown,
}

impl fmt::Display for VmmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmExit::Code(c) => write!(f, "exit code {c}"),
            VmmExit::Signal(s) => write!(f, "killed by signal {s}"),
            VmmExit::Unknown => f.write_str("exit status unknown"),
        }
    }
}

/// What QMP's `query-status` says about a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU's `RunState` (`running`, `paused`, `shutdown`, `internal-error`, ...).
    pub state: String,
    pub running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BootVmError {
    #[error(
        "guest kernel {} not found: build it with guest/kernel/build.sh and install it with \
         scripts/guest, or set the `kernel` option",
        path.display()
    )]
    KernelMissing { path: PathBuf },
    #[error(
        "guest initrd {} not found: build it with guest/agent/build-initrd.sh and install it \
         with scripts/guest, or set the `initrd` option",
        path.display()
    )]
    InitrdMissing { path: PathBuf },
    #[error("root disk image {} not found", path.display())]
    RootDiskMissing { path: PathBuf },
    #[error("share directory {} not found", path.display())]
    ShareDirMissing { path: PathBuf },
    #[error("QEMU ({}) not found: apt-get install qemu-system-x86", path.display())]
    QemuMissing { path: PathBuf },
    #[error("create the console log {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spawn {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent not ready after {timeout_ms} ms; console tail:\n{console}")]
    Timeout { timeout_ms: u64, console: String },
    #[error("VMM exited during boot ({status}); console tail:\n{console}")]
    ExitedDuringBoot { status: VmmExit, console: String },
    #[error("guest agent sent {got:?} instead of its ready banner")]
    BannerMismatch { got: String },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("start the built-in VMM")]
    Vmm {
        #[source]
        source: yard_vmm::vmm::StartVmError,
    },
}

impl BootVmError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| BootVmError::Io { what, source }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the VMM has exited")]
    Exited,
    #[error("{what}")]
    Backend {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("this backend has no {0}")]
    Unsupported(&'static str),
    #[error("all {slots} spare disks of the VM are in use")]
    NoFreeDisk { slots: usize },
    #[error("no attached disk {0}")]
    UnknownDisk(String),
}

/// A VMM: boots VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// `qemu` or `builtin`.
    fn name(&self) -> &'static str;

    /// The VM can take files after boot (the QEMU backend's 9p share): later containers of a
    /// sandbox get their images through it. Without it they get them as disks through
    /// [`Vm::attach_disk`].
    fn shares_files(&self) -> bool {
        true
    }

    /// Start the VM and wait for its agent's ready banner. On any error nothing is left running.
    ///
    /// Where the VMM is a child process, it dies with the *thread* that called `boot`
    /// (`PR_SET_PDEATHSIG` fires when the spawning thread exits, not the process): call it from
    /// a thread that lives as long as the VM, such as the shim's main thread running a
    /// current-thread runtime, not from a `spawn_blocking` worker.
    async fn boot(&self, cfg: VmConfig) -> Result<Box<dyn Vm>, BootVmError>;
}

/// A booted VM. Dropping it kills the VMM (SIGKILL) if [`Vm::stop`] was not called.
#[async_trait]
pub trait Vm: Send + Sync {
    /// The VMM process, when the VMM is one.
    fn pid(&self) -> Option<u32>;

    /// The agent's byte stream, positioned right after the ready banner. `Some` once.
    fn take_agent_stream(&mut self) -> Option<tokio::net::UnixStream>;

    /// From spawning the VMM to reading the ready banner.
    fn boot_time(&self) -> Duration;

    fn accel(&self) -> Accel;

    /// The last `max_lines` lines of the guest console (and the VMM's own stderr).
    fn console_tail(&self, max_lines: usize) -> String;

    /// The VMM's view of the VM.
    async fn status(&self) -> Result<VmStatus, VmError>;

    /// Ask the VMM to quit, SIGKILL it after `grace`, and collect it. Idempotent; when it returns
    /// the VMM process is gone.
    async fn stop(&self, grace: Duration);

    /// Resolves when the VMM has exited (a crashed or powered-off guest, or after `stop`).
    async fn exited(&self);

    /// How the VMM ended: `None` while it runs.
    fn exit_status(&self) -> Option<VmmExit>;

    /// Gives the running guest `image` as a read-only disk and returns its device path
    /// (`/dev/vdb`). The built-in backend fills a spare virtio-blk slot and raises a
    /// config-change interrupt; the guest sees the capacity once its driver handled it.
    async fn attach_disk(&self, _image: &Path) -> Result<String, VmError> {
        Err(VmError::Unsupported("disk attach"))
    }

    /// Takes a disk from [`Vm::attach_disk`] away again; the guest must have unmounted it.
    async fn detach_disk(&self, _guest_device: &str) -> Result<(), VmError> {
        Err(VmError::Unsupported("disk detach"))
    }
}

/// Picks and makes the backend for a sandbox: the engine's one seam to the host's VMMs.
#[async_trait]
pub trait Backends: Send + Sync {
    async fn choose(&self, options: &Options) -> Result<Chosen, BackendError>;
}

/// A sandbox's backend and the accelerator its VM runs on ([`VmConfig::accel`]).
pub struct Chosen {
    pub hypervisor: Box<dyn Hypervisor>,
    pub accel: Accel,
}

/// The real backends, chosen by [`virt::choose_backend`] from the options and what
/// [`virt::detect_with`] sees on this host.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostBackends;

#[async_trait]
impl Backends for HostBackends {
    async fn choose(&self, options: &Options) -> Result<Chosen, BackendError> {
        let qemu = options.qemu.clone();
        // Reads files (/proc/cpuinfo, /dev/kvm): off the async threads.
        let host = tokio::task::spawn_blocking(move || virt::detect_with(&qemu))
            .await
            .map_err(|e| BackendError::Detect(e.to_string()))?;
        let backend = virt::choose_backend(options.backend, options.accel, &host)?;
        Ok(Chosen {
            hypervisor: hypervisor_for(backend, options),
            accel: backend.accel(),
        })
    }
}

/// The hypervisor of `backend`, configured from `options`.
pub fn hypervisor_for(backend: Backend, options: &Options) -> Box<dyn Hypervisor> {
    match backend {
        Backend::Builtin => Box::new(crate::builtin::Builtin),
        Backend::Qemu(_) => Box::new(crate::qemu::Qemu::new(&options.qemu)),
    }
}
