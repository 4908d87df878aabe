//! The small runtime trait a shim implements; the kit turns it into the containerd task service.
//!
//! The kit owns everything containerd sees: task and exec bookkeeping, status, exit codes and
//! times, `Wait`, events, `Connect`, `Shutdown`, and the steps every engine would repeat at
//! Create (read and parse the bundle's `config.json`, mount the rootfs containerd asks for, undo
//! that mount on Delete). An engine only does the work: create a container from the parsed spec
//! and its rootfs, start it, run extra processes in it, signal, pause, report stats, and say
//! when a process has exited.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::types::mount::Mount;
use oci_spec::runtime::Spec;

use crate::error::Result;
use crate::events::Publisher;
use crate::stdio::StdioSpec;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + N when killed by signal N (as a shell reports it).
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn now(status: u32) -> Exit {
        Exit {
            status,
            at: SystemTime::now(),
        }
    }
}

/// The container's root filesystem, as the kit hands it to an engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Rootfs {
    /// A directory on the host: the spec's `root.path` (relative to the bundle, or absolute),
    /// which exists. When containerd asked for rootfs mounts the kit has mounted them there, and
    /// unmounts them after the container's `delete` (or a failed `create`).
    Dir(PathBuf),
    /// The rootfs mounts exactly as containerd sent them, unmounted: the engine asked for them
    /// with [`Engine::hands_over_rootfs`] (the vm engine gives an EROFS image to its guest).
    Mounts(Vec<Mount>),
}

/// Everything `Create` tells a shim, in the kit's own terms.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    /// The bundle's `config.json`, parsed once by the kit (oci-spec 0.10): a bad field is an
    /// InvalidArgument naming it before any engine runs.
    pub spec: Box<Spec>,
    /// `config.json` as read, for an engine that passes the spec on unchanged (the vm engine's
    /// guest) or must rewrite it for an OCI runtime without losing fields oci-spec ignores.
    pub config: Vec<u8>,
    pub rootfs: Rootfs,
    /// With [`Rootfs::Dir`]: the mounts the kit mounted there (after
    /// [`Engine::rootfs_mounts`]), for an engine that must rebuild one; empty otherwise.
    pub mounted: Vec<Mount>,
    pub stdio: StdioSpec,
    /// The runtime options `Any` (containerd's runc `Options` or a shim's own).
    pub options: Option<Any>,
    /// Where an engine publishes its own events (OOM).
    pub events: Publisher,
}

/// An extra process to run in a container (`Exec`).
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub exec_id: String,
    pub stdio: StdioSpec,
    /// The OCI process spec, as JSON.
    pub spec: Vec<u8>,
}

/// One process the shim knows about (for `Pids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
}

/// A process (a container's init, or one started by `Exec`).
#[async_trait]
pub trait Process: Send + Sync {
    /// The host pid, once there is one (0 for engines without host processes).
    fn pid(&self) -> u32;
    /// Start it. Returns the pid.
    async fn start(&self) -> Result<u32>;
    /// Resolves once, when the process has exited and its output has been delivered.
    async fn wait(&self) -> Exit;
    async fn kill(&self, signal: u32) -> Result<()>;
    async fn resize_pty(&self, width: u32, height: u32) -> Result<()>;
    /// Close the process's stdin (the client has no more input).
    async fn close_stdin(&self) -> Result<()>;
}

/// A container: its init process plus whatever the container as a whole supports.
#[async_trait]
pub trait Container: Send + Sync {
    fn init(&self) -> Arc<dyn Process>;
    /// Prepare an extra process; it runs on `start`.
    async fn exec(&self, req: ExecRequest) -> Result<Arc<dyn Process>>;
    /// Signal every process in the container.
    async fn kill_all(&self, signal: u32) -> Result<()>;
    async fn pids(&self) -> Result<Vec<ProcessInfo>>;
    async fn pause(&self) -> Result<()>;
    async fn resume(&self) -> Result<()>;
    /// Apply new resources (an OCI `LinuxResources` as JSON in an `Any`).
    async fn update(&self, resources: &Any) -> Result<()>;
    /// Metrics as an `Any` (containerd's cgroups v1/v2 `Metrics`).
    async fn stats(&self) -> Result<Any>;
    /// Remove what the container holds (runtime state, cgroup, its own mounts). Called after its
    /// init has exited, or with `force` to kill what is left first. The kit unmounts the rootfs
    /// it mounted afterwards.
    async fn delete(&self, force: bool) -> Result<()>;
}

/// How long the group shims of Switchyard's runtimes stay warm after their last task
/// ([`Engine::idle_exit`]): a `yard run --rm` of the group within this time joins the warm
/// shim instead of starting one (docs/performance.md).
pub const GROUP_IDLE_EXIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A shim's engine: makes containers, and cleans up after a dead shim.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The shim binary's name for logs (`containerd-shim-yard-native-v1`).
    fn name(&self) -> &'static str;
    /// Create the container; its init process exists but has not started.
    async fn create(&self, req: CreateRequest) -> Result<Arc<dyn Container>>;
    /// Whether the engine takes these rootfs mounts as they are ([`Rootfs::Mounts`]) instead of
    /// the kit mounting them on the host ([`Rootfs::Dir`]). Asked once per Create.
    fn hands_over_rootfs(&self, mounts: &[Mount]) -> bool {
        let _ = mounts;
        false
    }
    /// The rootfs mounts as the kit mounts them on the host (the wasm engine adds
    /// `nodev,nosuid`). Asked once per Create that the engine did not take over.
    fn rootfs_mounts(&self, mounts: Vec<Mount>) -> Vec<Mount> {
        mounts
    }
    /// `<shim> delete`: clean up a container whose shim is gone (kill, remove state). The kit
    /// unmounts the bundle's rootfs afterwards.
    async fn cleanup(&self, namespace: &str, id: &str, bundle: &std::path::Path) -> Result<()>;
    /// Tasks with the same group share one shim process. `None`: one shim per task.
    /// The default groups by the `io.kubernetes.cri.sandbox-id` or `io.switchyard.group`
    /// annotation of the bundle's `config.json`, as containerd's runc shim groups pods, else by
    /// the runtime's `group` option (`options` is what `start` was handed on stdin).
    fn group(
        &self,
        bundle: &std::path::Path,
        options: Option<&crate::bundle::RuntimeOptions>,
    ) -> Option<String> {
        crate::start::group_from_bundle(bundle, options)
    }
    /// How long a server that serves a group stays up after its last task (Shutdown with
    /// nothing left), so the group's next task finds it warm and skips a process start; it
    /// exits once this passes without a new Create. `None` (the default): it exits at once.
    fn idle_exit(&self) -> Option<std::time::Duration> {
        None
    }
    /// Whether a Create migrates a process into the task's cgroup (a runc-class container, a
    /// Wasm task's worker). `start` then begins the kernel's wait for the first migration
    /// ([`crate::cgroup::prewarm_migration_in_child`]), which passes while the server starts
    /// and containerd sends Create. A VM's shim says no: its own cgroup work would wait for it.
    fn migrates_into_task_cgroup(&self) -> bool {
        false
    }
    /// The server is about to exit (`Shutdown` after the last task): release what the engine
    /// holds for the whole process (the vm shim's VM).
    async fn shutdown(&self) {}
}
