//! CRI containers: made through the daemon's own containerd services, in-process (the image
//! service's Prepare, Containers.Create, Tasks.Create/Start/Kill/Wait/Delete/Exec), so a CRI
//! container is an ordinary containerd container and task in the `k8s.io` namespace (`yard -n
//! k8s.io ps` lists it) and every runtime routes as it does for `yard run`. What CRI adds is
//! kept here: the spec built by [`super::spec`], the container's CRI log (its output fifos
//! copied by [`super::logs`]), and a JSON record per container under `<root>/cri/containers`
//! (name, pod, image, times, log path), read back after a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_api::client::NAMESPACE_HEADER;
use switchyard_api::containerd::services::containers::v1 as containers_api;
use switchyard_api::containerd::services::containers::v1::containers_server::Containers as _;
use switchyard_api::containerd::services::tasks::v1 as tasks_api;
use switchyard_api::containerd::services::tasks::v1::tasks_server::Tasks as _;
use switchyard_api::containerd::v1::types::Status as TaskStatus;
use switchyard_api::cri::v1 as cri;
use switchyard_api::cri_log::Stream;
use switchyard_api::switchyard::images::v1 as images_api;
use switchyard_api::switchyard::images::v1::images_server::Images as _;
use tonic::{Request, Status};

use super::logs::ContainerLog;
use super::sandbox::{self, State};
use super::spec::{self, EtcAccounts, HostFacts, PodFiles, PodNamespaces, SysDevices};
use super::{Cri, NAMESPACE, wasm_port};
use crate::server::{containers::ContainersService, images::ImagesService, tasks::TasksService};
use switchyard_api::cri::v1::image_service_server::ImageService as _;

/// How long a stopped container's output may take to reach its log.
const LOG_DRAIN: Duration = Duration::from_secs(2);

/// How long a task may be seen stopped before the CRI's event watcher has handled its
/// `/tasks/exit`: the event normally follows within milliseconds; past this it was lost (a
/// daemon that could not be reached), and the task's own state is taken as it is.
const EXIT_EVENT_GRACE: Duration = Duration::from_secs(2);
/// Most of an ExecSync's stdout and of its stderr kept (kubelet's limit is 16 MiB in all).
const MAX_EXEC_OUTPUT: usize = 8 << 20;

/// What the daemon keeps of a CRI container beyond its containerd container and task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub pod_id: String,
    pub name: String,
    pub attempt: u32,
    /// The image as the request named it, and the id it resolved to.
    pub image: String,
    pub image_ref: String,
    pub created_ns: i64,
    pub started_ns: i64,
    /// Where the CRI log goes (`<pod log_directory>/<log_path>`); `None` without one.
    pub log_path: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub tty: bool,
    pub stdin: bool,
    /// Stdin is closed when the first attached session's input ends (not with a tty), as
    /// containerd does for `stdin_once` (`kubectl run -i --rm`).
    #[serde(default)]
    pub stdin_once: bool,
    /// The kernel's OOM killer killed a process of the container (a `/tasks/oom` event):
    /// its status' reason is `OOMKilled`, as containerd's.
    #[serde(default)]
    pub oom_killed: bool,
}

/// The containers CRI made, and their logs.
pub struct Containers {
    records_dir: PathBuf,
    pub(super) io_dir: PathBuf,
    pods_dir: PathBuf,
    records: Mutex<HashMap<String, Record>>,
    logs: Mutex<HashMap<String, ContainerLog>>,
    host: HostFacts,
    /// Containers started by this daemon whose `/tasks/exit` the event watcher has not handled
    /// yet. Until it has, a stopped task is shown running, as containerd's CRI does: the events
    /// before the exit (`/tasks/oom`) are then in the status that shows the exit.
    pending_exits: Mutex<std::collections::HashSet<String>>,
    exit_handled: tokio::sync::Notify,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Status + '_ {
    move |e| Status::internal(format!("{}: {e}", path.display()))
}

/// A request to the daemon's own containerd services, in CRI's namespace.
pub(super) fn in_ns<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        NAMESPACE_HEADER,
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    r
}

impl Containers {
    pub fn open(root: &Path, state: &Path) -> std::io::Result<Containers> {
        let records_dir = root.join("cri").join("containers");
        std::fs::create_dir_all(&records_dir)?;
        let io_dir = state.join("cri").join("io");
        let mut records = HashMap::new();
        let mut logs = HashMap::new();
        for entry in std::fs::read_dir(&records_dir)?.flatten() {
            let path = entry.path();
            match super::read_record::<Record>(&path) {
                Ok(r) => {
                    // The shim still holds the fifos' write ends: keep copying them.
                    if let Some(log) = &r.log_path {
                        let streams = output_fifos(&io_dir.join(&r.id), r.tty);
                        let stdin = io_dir.join(&r.id).join("stdin");
                        let stdin = (r.stdin && stdin.exists()).then_some(stdin.as_path());
                        if streams.iter().all(|(_, p)| p.exists()) {
                            match ContainerLog::start(log, &streams, stdin) {
                                Ok(l) => {
                                    logs.insert(r.id.clone(), l);
                                }
                                Err(e) => {
                                    tracing::warn!(container = %r.id, error = %e, "container log not resumed")
                                }
                            }
                        }
                    }
                    records.insert(r.id.clone(), r);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "container record skipped");
                }
            }
        }
        Ok(Containers {
            records_dir,
            io_dir,
            pods_dir: state.join("cri").join("pods"),
            records: Mutex::new(records),
            logs: Mutex::new(logs),
            host: HostFacts::read(),
            pending_exits: Mutex::default(),
            exit_handled: tokio::sync::Notify::new(),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, r: &Record) -> Result<(), Status> {
        let path = self.records_dir.join(format!("{}.json", r.id));
        let bytes = serde_json::to_vec(r).map_err(|e| Status::internal(e.to_string()))?;
        crate::runtime::bundle::write_atomic(&path, &bytes).map_err(io(&path))
    }

    /// The container `id` names: its id or an unambiguous prefix.
    pub fn find(&self, id: &str) -> Result<Record, Status> {
        super::by_id_or_prefix(&self.records(), id)
            .ok_or_else(|| Status::not_found(format!("container {id} not found")))
    }

    pub fn list(&self) -> Vec<Record> {
        let mut all: Vec<Record> = self.records().values().cloned().collect();
        all.sort_by_key(|r| r.created_ns);
        all
    }

    pub fn of_pod(&self, pod: &str) -> Vec<Record> {
        self.list()
            .into_iter()
            .filter(|r| r.pod_id == pod)
            .collect()
    }

    /// Runs `f` on container `id`'s log copier (for Attach), if it has one.
    pub(super) fn with_log<T>(&self, id: &str, f: impl FnOnce(&ContainerLog) -> T) -> Option<T> {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(f)
    }

    fn take_log(&self, id: &str) -> Option<ContainerLog> {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    fn pending_exits(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.pending_exits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Container `id` is being started: its exit is to come through the event watcher.
    pub fn expect_exit(&self, id: &str) {
        self.pending_exits().insert(id.to_owned());
    }

    /// The event watcher handled container `id`'s exit (or it will not come).
    pub fn exit_handled(&self, id: &str) {
        if self.pending_exits().remove(id) {
            self.exit_handled.notify_waiters();
        }
    }

    fn exit_pending(&self, id: &str) -> bool {
        self.pending_exits().contains(id)
    }

    /// Waits until container `id`'s exit was handled, for at most `within`.
    async fn wait_exit_handled(&self, id: &str, within: Duration) {
        let handled = async {
            loop {
                let notified = self.exit_handled.notified();
                if !self.exit_pending(id) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(within, handled).await.is_err() {
            self.exit_handled(id);
        }
    }

    /// Marks container `id` as OOM-killed (a `/tasks/oom` event); another id is not CRI's.
    pub fn mark_oom(&self, id: &str) {
        let Some(mut r) = self.records().get(id).cloned() else {
            return;
        };
        r.oom_killed = true;
        if let Err(e) = self.save(&r) {
            tracing::warn!(container = %id, error = %e.message(), "OOM not recorded");
        }
        self.records().insert(r.id.clone(), r);
    }

    pub fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let r = self.find(id)?;
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let log = logs.get(&r.id).ok_or_else(|| {
            Status::failed_precondition(format!("container {} has no running log", r.id))
        })?;
        log.reopen()
            .map_err(|e| Status::internal(format!("reopen the log: {e}")))
    }

    /// The pod's `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname`, written once per pod
    /// under `<state>/cri/pods/<pod>` (containerd's sandbox files).
    fn pod_files(
        &self,
        pod: &sandbox::Record,
        config: &cri::PodSandboxConfig,
    ) -> Result<PathBuf, Status> {
        let dir = self.pods_dir.join(&pod.id);
        if dir.join("hostname").exists() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let hostname = if config.hostname.is_empty() {
            self.host.hostname.clone()
        } else {
            config.hostname.clone()
        };
        let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| {
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_owned()
        });
        if !pod.ip.is_empty() {
            hosts.push_str(&format!("{}\t{hostname}\n", pod.ip));
        }
        let resolv = match &config.dns_config {
            Some(d) if !d.servers.is_empty() || !d.searches.is_empty() || !d.options.is_empty() => {
                let mut s = String::new();
                if !d.searches.is_empty() {
                    s.push_str(&format!("search {}\n", d.searches.join(" ")));
                }
                for server in &d.servers {
                    s.push_str(&format!("nameserver {server}\n"));
                }
                if !d.options.is_empty() {
                    s.push_str(&format!("options {}\n", d.options.join(" ")));
                }
                s
            }
            _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        for (name, text) in [
            ("hosts", hosts),
            ("resolv.conf", resolv),
            ("hostname", format!("{hostname}\n")),
        ] {
            let path = dir.join(name);
            crate::runtime::bundle::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
            // Containers read these as whatever user they run as.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .map_err(io(&path))?;
        }
        Ok(dir)
    }

    /// Removes the pod's files (RemovePodSandbox).
    pub fn remove_pod_files(&self, pod: &str) {
        let _ = std::fs::remove_dir_all(self.pods_dir.join(pod));
    }
}

/// The output fifos of a container (`stdout`, and `stderr` unless it has a terminal).
fn output_fifos(dir: &Path, tty: bool) -> Vec<(Stream, PathBuf)> {
    let mut v = vec![(Stream::Stdout, dir.join("stdout"))];
    if !tty {
        v.push((Stream::Stderr, dir.join("stderr")));
    }
    v
}

pub(super) fn mkfifo(path: &Path) -> Result<(), Status> {
    nix::unistd::mkfifo(
        path,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .map_err(|e| Status::internal(format!("create fifo {}: {e}", path.display())))
}

/// What CreateContainer made so far, undone on failure.
/// `Ok` also for an object that is already gone (deletes are idempotent).
fn gone_is_ok<T>(r: Result<T, Status>) -> Result<(), Status> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The pause container's CRI config: the image's `/pause`, read-only root, no capabilities, no
/// new privileges, the pod's network and IPC, a PID namespace of its own.
fn pause_config(image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "POD".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                readonly_rootfs: true,
                no_new_privs: true,
                capabilities: Some(cri::Capability {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// containerd's CRI labels on a containerd container over `labels`: its kind (`sandbox` for a
/// pod's sandbox task, else `container`) and its pod. Never the label of a container removed
/// with its task (`metadata::REMOVE_LABEL`): kubelet removes CRI containers, and a pod's labels
/// (which anyone who may make a pod sets) must not make the daemon remove one at its start.
fn cri_labels(
    mut labels: HashMap<String, String>,
    sandbox: bool,
    pod: &str,
) -> HashMap<String, String> {
    labels.remove(crate::metadata::REMOVE_LABEL);
    let kind = if sandbox { "sandbox" } else { "container" };
    labels.insert("io.cri-containerd.kind".into(), kind.into());
    labels.insert("io.kubernetes.cri.sandbox-id".into(), pod.to_owned());
    labels
}

#[derive(Default)]
struct Undo {
    io_dir: Option<PathBuf>,
    prepared: bool,
    container: bool,
    task: bool,
}

impl Cri {
    pub async fn create_container(
        self: &Arc<Self>,
        r: cri::CreateContainerRequest,
    ) -> Result<String, Status> {
        let pod = self
            .sandboxes
            .get(&r.pod_sandbox_id)
            .map_err(crate::error::status)?;
        if pod.state != State::Ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config: missing"))?;
        let meta = config
            .metadata
            .clone()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| Status::invalid_argument("config.metadata.name: empty"))?;
        let image_spec = config.image.clone().unwrap_or_default().image;
        if image_spec.is_empty() {
            return Err(Status::invalid_argument("config.image.image: empty"));
        }
        let sandbox_config = r.sandbox_config.clone().unwrap_or_else(|| pod.pod_config());
        // The image, by name or id, in CRI's namespace.
        let images = self.images_list().await?;
        let image = super::images::find(images.clone(), &image_spec).ok_or_else(|| {
            Status::not_found(format!(
                "config.image.image {image_spec:?}: no such image (pull it first)"
            ))
        })?;
        let image_name = image
            .repo_tags
            .first()
            .cloned()
            .or_else(|| image.repo_digests.first().cloned())
            .unwrap_or_default();
        let runtime = if pod.handler.is_empty() {
            self.shared.tasks.runtimes().default_name().to_owned()
        } else {
            pod.handler.clone()
        };
        let id = super::new_id();
        let mut undo = Undo::default();
        let result = self
            .create_steps(
                &id,
                &pod,
                &config,
                &sandbox_config,
                &meta,
                &image,
                &image_name,
                &runtime,
                false,
                &mut undo,
            )
            .await;
        match result {
            Ok(_) => {
                tracing::info!(container = %id, pod = %pod.id, name = %meta.name, "CRI container created");
                self.container_event(super::events::Kind::ContainerCreatedEvent, &id, &pod.id)
                    .await;
                Ok(id)
            }
            Err(e) => {
                self.undo_create(&id, undo).await;
                Err(e)
            }
        }
    }

    async fn images_list(&self) -> Result<Vec<cri::Image>, Status> {
        let store = self.shared.images.clone();
        crate::server::blocking(move || {
            store
                .list(NAMESPACE)
                .map(super::images::images)
                .map_err(crate::error::status)
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_steps(
        self: &Arc<Self>,
        id: &str,
        pod: &sandbox::Record,
        config: &cri::ContainerConfig,
        sandbox_config: &cri::PodSandboxConfig,
        meta: &cri::ContainerMetadata,
        image: &cri::Image,
        image_name: &str,
        runtime: &str,
        pause: bool,
        undo: &mut Undo,
    ) -> Result<Record, Status> {
        // The root, as `yard run` makes it: the image service's Prepare.
        let prepared = ImagesService(self.shared.clone())
            .prepare(in_ns(images_api::PrepareRequest {
                image: image_name.to_owned(),
                key: id.to_owned(),
                rootfs: String::new(),
                runtime: runtime.to_owned(),
            }))
            .await?
            .into_inner();
        undo.prepared = true;
        let run = switchyard_images::RunConfig {
            entrypoint: prepared.entrypoint.clone(),
            cmd: prepared.cmd.clone(),
            env: prepared.env.clone(),
            working_dir: prepared.working_dir.clone(),
            user: format!("{}:{}", prepared.uid, prepared.gid),
            wasm: prepared.wasm,
        };
        let accounts = {
            let (store, name) = (self.shared.images.clone(), image_name.to_owned());
            crate::server::blocking(move || {
                let read = |p: &str| {
                    store
                        .image_file(NAMESPACE, &name, Path::new(p))
                        .map(|b| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned())
                        .map_err(crate::error::status)
                };
                Ok(EtcAccounts::parse(
                    &read("etc/passwd")?,
                    &read("etc/group")?,
                ))
            })
            .await?
        };
        let files = self.containers.pod_files(pod, sandbox_config)?;
        // A pod-wide PID namespace is the pause container's, where the pod has one.
        let pod_pid = if pause || pod.task != sandbox::SandboxTask::Pause {
            None
        } else {
            self.pause_pid(&pod.id)
                .await
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/pid")))
        };
        let (hosts, resolv, hostname) = (
            files.join("hosts"),
            files.join("resolv.conf"),
            files.join("hostname"),
        );
        let mut spec = spec::container_spec(&spec::SpecInput {
            id,
            config,
            sandbox_id: &pod.id,
            sandbox: sandbox_config,
            image_name,
            image: &run,
            accounts: &accounts,
            devices: &SysDevices,
            namespaces: PodNamespaces {
                network: pod.netns.as_deref(),
                ipc: pod.ipc.as_deref(),
                uts: pod.uts.as_deref(),
                pid: pod_pid.as_deref(),
                target_pid: None,
            },
            pod_files: PodFiles {
                hosts: Some(&hosts),
                resolv_conf: Some(&resolv),
                hostname: Some(&hostname),
                shm: pod.shm.as_deref(),
            },
            seccomp_profile_root: Path::new("/"),
            host: &self.containers.host,
            pause,
        })
        .map_err(crate::error::status)?;
        // A Wasm container listens on the pod's one declared port (wasm_port.rs).
        let wasm = self
            .shared
            .tasks
            .runtimes()
            .resolve(runtime)
            .is_ok_and(|r| r.runtime_type == wasm_port::WASM_RUNTIME_TYPE);
        if wasm
            && !pause
            && let Some(listen) =
                wasm_port::listen_annotation(sandbox_config, spec.annotations().as_ref())
        {
            let mut a = spec.annotations().clone().unwrap_or_default();
            a.insert(wasm_port::HTTP_LISTEN.to_owned(), listen);
            spec.set_annotations(Some(a));
        }
        let spec_json = serde_json::to_vec(&spec)
            .map_err(|e| Status::internal(format!("encode the spec: {e}")))?;

        // The containerd container.
        let labels = cri_labels(config.labels.clone(), pause, &pod.id);
        ContainersService(self.shared.clone())
            .create(in_ns(containers_api::CreateContainerRequest {
                container: Some(containers_api::Container {
                    id: id.to_owned(),
                    labels,
                    image: image_name.to_owned(),
                    runtime: Some(containers_api::container::Runtime {
                        name: runtime.to_owned(),
                        options: None,
                    }),
                    spec: Some(switchyard_api::typeurl::json_any(
                        switchyard_api::typeurl::OCI_SPEC,
                        spec_json,
                    )),
                    snapshotter: prepared.snapshotter.clone(),
                    snapshot_key: if prepared.snapshotter.is_empty() {
                        String::new()
                    } else {
                        id.to_owned()
                    },
                    ..Default::default()
                }),
            }))
            .await?;
        undo.container = true;

        if pause {
            // The pause process prints nothing and reads nothing: no stdio, log or record.
            TasksService(self.shared.clone())
                .create(in_ns(tasks_api::CreateTaskRequest {
                    container_id: id.to_owned(),
                    rootfs: prepared.mounts.clone(),
                    ..Default::default()
                }))
                .await?;
            undo.task = true;
            return Ok(Record {
                id: id.to_owned(),
                pod_id: pod.id.clone(),
                name: meta.name.clone(),
                attempt: 0,
                image: image_name.to_owned(),
                image_ref: image.id.clone(),
                created_ns: super::now_nanos(),
                started_ns: 0,
                log_path: None,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                tty: false,
                stdin: false,
                stdin_once: false,
                oom_killed: false,
            });
        }
        // Stdio: fifos the shim writes and the log copier reads.
        let io_dir = self.containers.io_dir.join(id);
        std::fs::create_dir_all(&io_dir).map_err(io(&io_dir))?;
        undo.io_dir = Some(io_dir.clone());
        let streams = output_fifos(&io_dir, config.tty);
        for (_, p) in &streams {
            mkfifo(p)?;
        }
        let stdin_fifo = if config.stdin {
            let p = io_dir.join("stdin");
            mkfifo(&p)?;
            Some(p)
        } else {
            None
        };
        let stdin = stdin_fifo
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let log_path = (!sandbox_config.log_directory.is_empty() && !config.log_path.is_empty())
            .then(|| Path::new(&sandbox_config.log_directory).join(&config.log_path));
        let log = match &log_path {
            Some(p) => ContainerLog::start(p, &streams, stdin_fifo.as_deref()).map_err(io(p))?,
            // No log file: the output is still read (and dropped) so the process never blocks.
            None => ContainerLog::start(
                &io_dir.join("discarded.log"),
                &streams,
                stdin_fifo.as_deref(),
            )
            .map_err(io(&io_dir))?,
        };
        self.containers
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), log);
        let stderr = streams
            .get(1)
            .map(|(_, p)| p.display().to_string())
            .unwrap_or_default();
        TasksService(self.shared.clone())
            .create(in_ns(tasks_api::CreateTaskRequest {
                container_id: id.to_owned(),
                rootfs: prepared.mounts.clone(),
                stdin,
                stdout: streams[0].1.display().to_string(),
                stderr,
                terminal: config.tty,
                ..Default::default()
            }))
            .await?;
        undo.task = true;
        let record = Record {
            id: id.to_owned(),
            pod_id: pod.id.clone(),
            name: meta.name.clone(),
            attempt: meta.attempt,
            image: config.image.clone().unwrap_or_default().image,
            image_ref: image.id.clone(),
            created_ns: super::now_nanos(),
            started_ns: 0,
            log_path,
            labels: config.labels.clone().into_iter().collect(),
            annotations: config.annotations.clone().into_iter().collect(),
            tty: config.tty,
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            oom_killed: false,
        };
        self.containers.save(&record)?;
        self.containers
            .records()
            .insert(id.to_owned(), record.clone());
        Ok(record)
    }

    async fn undo_create(&self, id: &str, undo: Undo) {
        if undo.task {
            let _ = TasksService(self.shared.clone())
                .delete(in_ns(tasks_api::DeleteTaskRequest {
                    container_id: id.to_owned(),
                }))
                .await;
        }
        if let Some(log) = self.containers.take_log(id) {
            log.stop(Duration::ZERO);
        }
        if let Some(dir) = undo.io_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if undo.container {
            // Deletes the root the image service made too.
            let _ = ContainersService(self.shared.clone())
                .delete(in_ns(containers_api::DeleteContainerRequest {
                    id: id.to_owned(),
                }))
                .await;
        } else if undo.prepared {
            let _ = ImagesService(self.shared.clone())
                .release(in_ns(images_api::ReleaseRequest { key: id.to_owned() }))
                .await;
        }
    }

    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        let mut r = self.containers.find(id)?;
        let _events = self.events.hold(&r.id).await;
        self.containers.expect_exit(&r.id);
        let started = TasksService(self.shared.clone())
            .start(in_ns(tasks_api::StartRequest {
                container_id: r.id.clone(),
                exec_id: String::new(),
            }))
            .await;
        if let Err(e) = started {
            self.containers.exit_handled(&r.id);
            return Err(e);
        }
        r.started_ns = super::now_nanos();
        self.containers.save(&r)?;
        let (id, pod) = (r.id.clone(), r.pod_id.clone());
        self.containers.records().insert(r.id.clone(), r);
        self.container_event(super::events::Kind::ContainerStartedEvent, &id, &pod)
            .await;
        Ok(())
    }

    /// The task's process as containerd reports it; `None` when it has no task.
    pub(super) async fn process(
        &self,
        id: &str,
    ) -> Option<switchyard_api::containerd::v1::types::Process> {
        TasksService(self.shared.clone())
            .get(in_ns(tasks_api::GetRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .ok()
            .and_then(|r| r.into_inner().process)
    }

    pub async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, Status> {
        let r = self.containers.find(id)?;
        // Asked before the record is read: a handled exit's OOM is in it.
        let pending = self.containers.exit_pending(&r.id);
        let r = self.containers.find(&r.id)?;
        let p = self.process(&r.id).await;
        let mut status = p
            .as_ref()
            .and_then(|p| TaskStatus::try_from(p.status).ok())
            .unwrap_or(TaskStatus::Unknown);
        let exited_ns = p.as_ref().and_then(|p| p.exited_at.as_ref()).map(|t| {
            t.seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(i64::from(t.nanos))
        });
        if pending && status == TaskStatus::Stopped {
            // No exit time (or one from a clock ahead of this host's): the state as it is.
            let grace = i64::try_from(EXIT_EVENT_GRACE.as_nanos()).unwrap_or(i64::MAX);
            let recent = exited_ns
                .is_some_and(|at| (0..grace).contains(&super::now_nanos().saturating_sub(at)));
            if recent {
                status = TaskStatus::Running;
            } else {
                tracing::warn!(container = %r.id, "no exit event for a stopped task");
                self.containers.exit_handled(&r.id);
            }
        }
        let state = match status {
            TaskStatus::Created => cri::ContainerState::ContainerCreated,
            TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing => {
                cri::ContainerState::ContainerRunning
            }
            TaskStatus::Stopped => cri::ContainerState::ContainerExited,
            TaskStatus::Unknown => cri::ContainerState::ContainerUnknown,
        };
        let (exit_code, finished_at) = match (&p, state) {
            (Some(p), cri::ContainerState::ContainerExited) => (
                i32::try_from(p.exit_status).unwrap_or(i32::MAX),
                exited_ns.unwrap_or(0),
            ),
            _ => (0, 0),
        };
        // containerd's: an OOM kill is the reason whatever the state.
        let reason = match state {
            _ if r.oom_killed => "OOMKilled",
            cri::ContainerState::ContainerExited if exit_code == 0 => "Completed",
            cri::ContainerState::ContainerExited => "Error",
            _ => "",
        };
        Ok(cri::ContainerStatus {
            id: r.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: r.name.clone(),
                attempt: r.attempt,
            }),
            state: state as i32,
            created_at: r.created_ns,
            started_at: r.started_ns,
            finished_at,
            exit_code,
            image: Some(cri::ImageSpec {
                image: r.image.clone(),
                ..Default::default()
            }),
            image_ref: r.image_ref.clone(),
            reason: reason.to_owned(),
            labels: r.labels.clone().into_iter().collect(),
            annotations: r.annotations.clone().into_iter().collect(),
            log_path: r
                .log_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    /// SIGTERM, then SIGKILL after `timeout` seconds (0: at once); a container that is not
    /// running is already stopped (a created one's process goes with its task at removal).
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), Status> {
        let r = self.containers.find(id)?;
        self.stop_task(&r.id, timeout).await?;
        // Stopped means the status says so once this returns.
        self.containers
            .wait_exit_handled(&r.id, EXIT_EVENT_GRACE)
            .await;
        self.stopped_event(&r.id, &r.pod_id).await;
        Ok(())
    }

    /// [`Cri::stop_container`] of a task by its full id (a CRI container's or a pause's).
    async fn stop_task(&self, id: &str, timeout: i64) -> Result<(), Status> {
        let running = matches!(
            self.process(id)
                .await
                .and_then(|p| TaskStatus::try_from(p.status).ok()),
            Some(TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing)
        );
        if !running {
            return Ok(());
        }
        let tasks = TasksService(self.shared.clone());
        let kill = |signal: u32| {
            tasks.kill(in_ns(tasks_api::KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal,
                all: false,
            }))
        };
        let wait = || {
            tasks.wait(in_ns(tasks_api::WaitRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
        };
        if timeout > 0 {
            let _ = kill(nix::sys::signal::Signal::SIGTERM as u32).await;
            let grace = Duration::from_secs(u64::try_from(timeout).unwrap_or(0));
            if tokio::time::timeout(grace, wait()).await.is_ok() {
                return Ok(());
            }
        }
        let _ = kill(nix::sys::signal::Signal::SIGKILL as u32).await;
        tokio::time::timeout(Duration::from_secs(30), wait())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("container {id} did not stop")))?
            .map(drop)
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        let r = match self.containers.find(id) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        self.stop_task(&r.id, 0).await?;
        self.stopped_event(&r.id, &r.pod_id).await;
        self.delete_task(&r.id).await?;
        if let Some(log) = self.containers.take_log(&r.id) {
            tokio::task::spawn_blocking(move || log.stop(LOG_DRAIN))
                .await
                .ok();
        }
        self.delete_container(&r.id).await?;
        let _ = std::fs::remove_dir_all(self.containers.io_dir.join(&r.id));
        let path = self.containers.records_dir.join(format!("{}.json", r.id));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        self.containers.records().remove(&r.id);
        self.containers.exit_handled(&r.id);
        self.container_event(super::events::Kind::ContainerDeletedEvent, &r.id, &r.pod_id)
            .await;
        Ok(())
    }

    /// Deletes the task `id`; one that is not there is already deleted.
    async fn delete_task(&self, id: &str) -> Result<(), Status> {
        gone_is_ok(
            TasksService(self.shared.clone())
                .delete(in_ns(tasks_api::DeleteTaskRequest {
                    container_id: id.to_owned(),
                }))
                .await,
        )
    }

    /// Deletes the containerd container `id` and the root the image service made for it.
    async fn delete_container(&self, id: &str) -> Result<(), Status> {
        gone_is_ok(
            ContainersService(self.shared.clone())
                .delete(in_ns(containers_api::DeleteContainerRequest {
                    id: id.to_owned(),
                }))
                .await,
        )
    }

    /// The pid of the pod's pause process, where it has a running one.
    pub async fn pause_pid(&self, pod: &str) -> Option<u32> {
        self.process(pod)
            .await
            .filter(|p| p.status == TaskStatus::Running as i32 && p.pid > 0)
            .map(|p| p.pid)
    }

    /// Starts the pod's pause container (its id is the pod's, as in containerd) from
    /// `[cri] sandbox_image`, built (the default: `pause_image.rs`) or pulled first when the
    /// store lacks it. It joins the pod's
    /// namespaces and is the init of a new PID namespace, which containers of a pod-wide PID
    /// namespace join. Whatever fails undoes what came before it.
    pub async fn run_pause(
        self: &Arc<Self>,
        pod: &sandbox::Record,
        runtime: &str,
    ) -> Result<(), Status> {
        let image_spec = self.config.sandbox_image.clone();
        super::pause_image::ensure(self).await?;
        let image = match super::images::find(self.images_list().await?, &image_spec) {
            Some(i) => i,
            None => {
                super::ImageService(self.clone())
                    .pull_image(Request::new(cri::PullImageRequest {
                        image: Some(cri::ImageSpec {
                            image: image_spec.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }))
                    .await
                    .map_err(|e| {
                        Status::new(
                            e.code(),
                            format!("[cri] sandbox_image {image_spec:?}: {}", e.message()),
                        )
                    })?;
                super::images::find(self.images_list().await?, &image_spec).ok_or_else(|| {
                    Status::not_found(format!("[cri] sandbox_image {image_spec:?}: not found"))
                })?
            }
        };
        let image_name = image
            .repo_tags
            .first()
            .cloned()
            .or_else(|| image.repo_digests.first().cloned())
            .unwrap_or_default();
        let sandbox_config = pod.pod_config();
        let config = pause_config(&image_spec);
        let meta = config.metadata.clone().unwrap_or_default();
        let mut undo = Undo::default();
        let made = self
            .create_steps(
                &pod.id,
                pod,
                &config,
                &sandbox_config,
                &meta,
                &image,
                &image_name,
                runtime,
                true,
                &mut undo,
            )
            .await;
        let started = match made {
            Ok(_) => self.start_task(&pod.id).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            self.undo_create(&pod.id, undo).await;
            return Err(e);
        }
        tracing::info!(pod = %pod.id, image = %image_name, "pause container started");
        Ok(())
    }

    /// Boots a `vm` pod's VM: a task with the pod's id and no process, which the vm shim boots
    /// the VM for, sized from the pod's resources; the pod's containers then run in it (their
    /// shim is the pod's). Whatever fails undoes what came before it.
    pub async fn run_pod_vm(
        self: &Arc<Self>,
        pod: &sandbox::Record,
        runtime: &str,
    ) -> Result<(), Status> {
        let spec = spec::pod_vm_spec(
            &pod.id,
            &pod.pod_config(),
            pod.netns.as_deref(),
            &self.containers.host,
        )
        .map_err(crate::error::status)?;
        let spec_json = serde_json::to_vec(&spec)
            .map_err(|e| Status::internal(format!("encode the spec: {e}")))?;
        let labels = cri_labels(HashMap::new(), true, &pod.id);
        ContainersService(self.shared.clone())
            .create(in_ns(containers_api::CreateContainerRequest {
                container: Some(containers_api::Container {
                    id: pod.id.clone(),
                    labels,
                    runtime: Some(containers_api::container::Runtime {
                        name: runtime.to_owned(),
                        options: None,
                    }),
                    spec: Some(switchyard_api::typeurl::json_any(
                        switchyard_api::typeurl::OCI_SPEC,
                        spec_json,
                    )),
                    ..Default::default()
                }),
            }))
            .await?;
        let started = match TasksService(self.shared.clone())
            .create(in_ns(tasks_api::CreateTaskRequest {
                container_id: pod.id.clone(),
                ..Default::default()
            }))
            .await
        {
            Ok(_) => self.start_task(&pod.id).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            let _ = self.remove_pod_task(&pod.id, false).await;
            return Err(e);
        }
        tracing::info!(pod = %pod.id, "pod VM booted");
        Ok(())
    }

    /// Starts task `id`'s init.
    async fn start_task(&self, id: &str) -> Result<(), Status> {
        TasksService(self.shared.clone())
            .start(in_ns(tasks_api::StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map(drop)
    }

    /// Stops and removes the pod's sandbox task (its pause container or VM), if it has one;
    /// idempotent.
    pub async fn remove_pod_task(&self, pod: &str, stop_only: bool) -> Result<(), Status> {
        self.stop_task(pod, 0).await?;
        if stop_only {
            return Ok(());
        }
        self.delete_task(pod).await?;
        self.delete_container(pod).await
    }

    /// Runs `cmd` in the container, waits up to `timeout` seconds (0: no limit) and returns
    /// its output (each stream capped) and exit code.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, Status> {
        let r = self.containers.find(id)?;
        if cmd.is_empty() {
            return Err(Status::invalid_argument("cmd: empty"));
        }
        let exec_id = format!("sync-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.containers.io_dir.join(format!("{}-{exec_id}", r.id));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let result = self.exec_sync_in(&r, &exec_id, &dir, cmd, timeout).await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn exec_sync_in(
        &self,
        r: &Record,
        exec_id: &str,
        dir: &Path,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, Status> {
        let (out, err) = (dir.join("stdout"), dir.join("stderr"));
        mkfifo(&out)?;
        mkfifo(&err)?;
        let readers = [out.clone(), err.clone()].map(|p| {
            std::thread::spawn(move || -> Vec<u8> {
                use std::io::Read as _;
                let mut buf = Vec::new();
                if let Ok(f) = std::fs::File::open(&p) {
                    let _ = f.take(MAX_EXEC_OUTPUT as u64).read_to_end(&mut buf);
                }
                buf
            })
        });
        let tasks = TasksService(self.shared.clone());
        let unblock = || {
            // Readers waiting on fifos nobody opened.
            use std::os::unix::fs::OpenOptionsExt as _;
            for p in [&out, &err] {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(p);
            }
        };
        // The process: the container's, with the command.
        let process = match self.exec_process(r, &cmd, false).await {
            Ok(p) => p,
            Err(e) => {
                unblock();
                return Err(e);
            }
        };
        if let Err(e) = tasks
            .exec(in_ns(tasks_api::ExecProcessRequest {
                container_id: r.id.clone(),
                exec_id: exec_id.to_owned(),
                stdout: out.display().to_string(),
                stderr: err.display().to_string(),
                spec: Some(process),
                ..Default::default()
            }))
            .await
        {
            unblock();
            return Err(e);
        }
        let waited = async {
            tasks
                .start(in_ns(tasks_api::StartRequest {
                    container_id: r.id.clone(),
                    exec_id: exec_id.to_owned(),
                }))
                .await?;
            tasks
                .wait(in_ns(tasks_api::WaitRequest {
                    container_id: r.id.clone(),
                    exec_id: exec_id.to_owned(),
                }))
                .await
        };
        let limit = u64::try_from(timeout)
            .ok()
            .filter(|t| *t > 0)
            .map(Duration::from_secs);
        let exit = match limit {
            Some(l) => match tokio::time::timeout(l, waited).await {
                Ok(w) => w,
                Err(_) => {
                    let _ = tasks
                        .kill(in_ns(tasks_api::KillRequest {
                            container_id: r.id.clone(),
                            exec_id: exec_id.to_owned(),
                            signal: nix::sys::signal::Signal::SIGKILL as u32,
                            all: false,
                        }))
                        .await;
                    let _ = tasks
                        .delete_process(in_ns(tasks_api::DeleteProcessRequest {
                            container_id: r.id.clone(),
                            exec_id: exec_id.to_owned(),
                        }))
                        .await;
                    return Err(Status::deadline_exceeded(format!(
                        "command {cmd:?} timed out after {timeout}s"
                    )));
                }
            },
            None => waited.await,
        };
        // The exec'd process is the shim's to forget whether it ran or not.
        let delete = tasks.delete_process(in_ns(tasks_api::DeleteProcessRequest {
            container_id: r.id.clone(),
            exec_id: exec_id.to_owned(),
        }));
        let exit = match exit {
            Ok(w) => w.into_inner(),
            Err(e) => {
                let _ = delete.await;
                unblock();
                return Err(e);
            }
        };
        let _ = delete.await;
        let [o, e] = readers;
        let (stdout, stderr) = tokio::task::spawn_blocking(move || {
            (o.join().unwrap_or_default(), e.join().unwrap_or_default())
        })
        .await
        .map_err(|e| Status::internal(format!("exec output: {e}")))?;
        Ok(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: i32::try_from(exit.exit_status).unwrap_or(i32::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_label_never_makes_a_cri_container_removed_with_its_task() {
        let given: HashMap<String, String> = [
            (crate::metadata::REMOVE_LABEL.to_owned(), "true".to_owned()),
            ("app".to_owned(), "web".to_owned()),
        ]
        .into();
        for sandbox in [true, false] {
            let labels = cri_labels(given.clone(), sandbox, "pod1");
            assert!(
                !labels.contains_key(crate::metadata::REMOVE_LABEL),
                "{labels:?}"
            );
            assert_eq!(labels["app"], "web");
            assert_eq!(labels["io.kubernetes.cri.sandbox-id"], "pod1");
        }
    }
}
