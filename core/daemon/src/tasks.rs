//! Tasks: the live set of containers' processes, each routed to the shim that runs it.
//!
//! Creating a task resolves the container's runtime to a shim binary, writes the bundle, starts
//! (or joins) the shim and forwards Create; every other call is forwarded to the task's shim.
//! When a shim dies the task is cleaned up the way containerd does it: `<shim> delete`, the
//! bundle removed, `/tasks/exit` and `/tasks/delete` published. After a daemon restart the
//! tasks are found again from their bundles.
//!
//! The manager speaks the shim task API (`containerd.task.v2` messages, whatever version the
//! shim serves: see `runtime::bridge`); translating containerd's client API (`tasks.v1`) to
//! and from it is the gRPC adapter's job (`server::tasks`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use prost_types::Timestamp;
use switchyard_api::containerd::events::{TaskDelete, TaskExit};
use switchyard_api::containerd::task::v2 as shimapi;
use switchyard_api::containerd::v1::types::{ProcessInfo, Status};
use switchyard_api::events::topics;
use switchyard_api::typeurl::to_any;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Classify, Kind};
use crate::events::Exchange;
use crate::failpoints;
use crate::filters::{Adaptor, Filter, FilterError};
use crate::metadata::{Store, StoreError};
use crate::runtime::address::socket_file;
use crate::runtime::bridge::CallError;
use crate::runtime::bundle::{Bundle, BundleError, TaskRecord};
use crate::runtime::log::Follower;
use crate::runtime::options::{
    generic_options_json, is_containerd_runc, is_kit_shim, is_runc, migrates_into_task_cgroup,
    runc_options_json,
};
use crate::runtime::resolve::{ResolveError, Runtimes};
use crate::runtime::shim::{Shim, ShimError, ShimManager};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task {id:?} in namespace {namespace:?}: not found")]
    NotFound { namespace: String, id: String },
    #[error("task {id:?} in namespace {namespace:?}: already exists")]
    AlreadyExists { namespace: String, id: String },
    #[error("container {id:?} has no spec")]
    NoSpec { id: String },
    #[error("task {id:?}")]
    Call {
        id: String,
        #[source]
        source: CallError,
    },
    #[error("task {id:?}: the shim exited and cleanup did not report in time")]
    Lost { id: String },
    #[error("checkpoint is not supported by switchyardd")]
    Checkpoint,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Shim(#[from] ShimError),
    #[error(transparent)]
    Ident(#[from] crate::ident::InvalidIdent),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

impl Classify for TaskError {
    fn kind(&self) -> Kind {
        match self {
            TaskError::NotFound { .. } => Kind::NotFound,
            TaskError::AlreadyExists { .. } => Kind::AlreadyExists,
            TaskError::NoSpec { .. } | TaskError::Ident(_) | TaskError::Filter(_) => {
                Kind::InvalidArgument
            }
            TaskError::Call { source, .. } => source.kind(),
            TaskError::Lost { .. } => Kind::Unavailable,
            TaskError::Checkpoint => Kind::Unimplemented,
            TaskError::Store(e) => e.kind(),
            TaskError::Resolve(e) => e.kind(),
            TaskError::Bundle(e) => e.kind(),
            TaskError::Shim(e) => e.kind(),
        }
    }
}

type Result<T> = std::result::Result<T, TaskError>;
type Key = (String, String);

/// How a task ended when its shim died under it.
#[derive(Debug, Clone)]
struct Exit {
    pid: u32,
    status: u32,
    exited_at: Option<Timestamp>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A live task.
pub struct Task {
    pub namespace: String,
    pub id: String,
    pub record: TaskRecord,
    pub bundle: Bundle,
    pub shim: Arc<Shim>,
    exit: watch::Sender<Option<Exit>>,
    /// The copy of the shim's log, for a task whose bundle the shim was started in (it writes
    /// there for as long as it lives); `None` for a task that joined its group's shim.
    log: Option<Follower>,
    monitor: Mutex<Option<AbortOnDrop>>,
}

impl Drop for Task {
    fn drop(&mut self) {
        // The shim may outlive the task (a group's shim, warm for the group's next task): its
        // log is copied until it exits.
        if let Some(log) = self.log.take() {
            let shim = self.shim.clone();
            log.finish_when(async move { shim.gone().await });
        }
    }
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .field("runtime", &self.record.runtime)
            .finish()
    }
}

/// How long List and Metrics wait for one shim before reporting it unknown.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a restart waits for a reconnected shim to say whether it knows its task; one
/// that does not answer in time is kept (it may only be busy).
const RESTORE_STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// The exit status reported for a task whose real exit nobody can tell any more.
const UNKNOWN_EXIT: u32 = 255;

/// The task registry and router.
pub struct TaskManager {
    shims: ShimManager,
    runtimes: Runtimes,
    store: Store,
    exchange: Exchange,
    state: PathBuf,
    root: PathBuf,
    tasks: RwLock<HashMap<Key, Arc<Task>>>,
    creating: Mutex<HashSet<Key>>,
}

/// Removes a key from the set of tasks being created when dropped.
struct Creating<'a> {
    set: &'a Mutex<HashSet<Key>>,
    key: Key,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

fn now() -> Timestamp {
    Timestamp::from(SystemTime::now())
}

impl TaskManager {
    pub fn new(
        shims: ShimManager,
        runtimes: Runtimes,
        store: Store,
        exchange: Exchange,
        state: PathBuf,
        root: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            shims,
            runtimes,
            store,
            exchange,
            state,
            root,
            tasks: RwLock::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
        })
    }

    pub fn runtimes(&self) -> &Runtimes {
        &self.runtimes
    }

    /// Where task `id`'s bundle is (whether or not it exists).
    pub fn bundle_path(&self, ns: &str, id: &str) -> PathBuf {
        Bundle::locate(&self.state, &self.root, ns, id).path
    }

    pub fn exists(&self, ns: &str, id: &str) -> bool {
        self.read().contains_key(&(ns.to_owned(), id.to_owned()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Key, Arc<Task>>> {
        self.tasks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Key, Arc<Task>>> {
        self.tasks.write().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, ns: &str, id: &str) -> Result<Arc<Task>> {
        self.read()
            .get(&(ns.to_owned(), id.to_owned()))
            .cloned()
            .ok_or_else(|| TaskError::NotFound {
                namespace: ns.to_owned(),
                id: id.to_owned(),
            })
    }

    /// Removes `task` from the registry if it is still the registered one.
    fn unregister(&self, task: &Arc<Task>) -> bool {
        let key = (task.namespace.clone(), task.id.clone());
        let mut tasks = self.write();
        if tasks.get(&key).is_some_and(|t| Arc::ptr_eq(t, task)) {
            tasks.remove(&key);
            // The monitor's job is done; a normal delete must not look like a dead shim.
            drop(tasks);
            task.monitor
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            true
        } else {
            false
        }
    }

    fn register(self: &Arc<Self>, task: Task) -> Arc<Task> {
        let task = Arc::new(task);
        let key = (task.namespace.clone(), task.id.clone());
        self.write().insert(key, task.clone());
        let manager: Weak<Self> = Arc::downgrade(self);
        let weak_task = Arc::downgrade(&task);
        let shim = task.shim.clone();
        let handle = tokio::spawn(async move {
            shim.gone().await;
            if let (Some(m), Some(t)) = (manager.upgrade(), weak_task.upgrade()) {
                m.on_shim_gone(t).await;
            }
        });
        *task.monitor.lock().unwrap_or_else(|e| e.into_inner()) = Some(AbortOnDrop(handle));
        task
    }

    fn new_task(
        &self,
        bundle: Bundle,
        record: TaskRecord,
        shim: Arc<Shim>,
        log: Option<Follower>,
    ) -> Task {
        Task {
            namespace: bundle.namespace.clone(),
            id: bundle.id.clone(),
            record,
            bundle,
            shim,
            exit: watch::channel(None).0,
            log,
            monitor: Mutex::new(None),
        }
    }

    fn call_err<'a>(id: &'a str) -> impl FnOnce(CallError) -> TaskError + 'a {
        move |source| TaskError::Call {
            id: id.to_owned(),
            source,
        }
    }

    // ---- lifecycle ----

    /// Creates task `req.id` from its container's record: resolves the runtime (or uses
    /// `runtime_path`, the shim binary a containerd 2.x client may name), writes the bundle,
    /// starts or joins the shim and sends it `req` with `bundle` filled in. Returns the pid.
    pub async fn create(
        self: &Arc<Self>,
        ns: &str,
        mut req: shimapi::CreateTaskRequest,
        runtime_path: Option<PathBuf>,
    ) -> Result<u32> {
        let id = req.id.clone();
        crate::ident::check("container id", &id)?;
        let key = (ns.to_owned(), id.clone());
        let _creating = {
            let mut set = self.creating.lock().unwrap_or_else(|e| e.into_inner());
            if self.exists(ns, &id) || !set.insert(key.clone()) {
                return Err(TaskError::AlreadyExists {
                    namespace: ns.to_owned(),
                    id,
                });
            }
            Creating {
                set: &self.creating,
                key,
            }
        };
        let (ns_owned, id_owned) = (ns.to_owned(), id.clone());
        // A record labelled REMOVE_LABEL may have been written without fsync (`metadata`): no
        // task is made for a record a crash could still lose. Other tasks wait for no flush.
        let container = self
            .store
            .run(move |s| {
                let c = s.get_container(&ns_owned, &id_owned)?;
                if crate::metadata::removed_with_task(&c) {
                    s.sync()?;
                }
                Ok(c)
            })
            .await?;
        let runtime = container.runtime.clone().unwrap_or_default();
        let mut resolved = self.runtimes.resolve(&runtime.name)?;
        if let Some(path) = runtime_path {
            resolved.binary = path;
        }
        let non_empty =
            |a: &Option<prost_types::Any>| a.as_ref().is_some_and(|a| !a.type_url.is_empty());
        let options = if non_empty(&req.options) {
            req.options.clone()
        } else if non_empty(&runtime.options) {
            runtime.options.clone()
        } else {
            resolved.options.clone()
        };
        let spec = container
            .spec
            .ok_or_else(|| TaskError::NoSpec { id: id.clone() })?;
        // A runc-class runtime's container, and a Wasm task's worker, is migrated into the
        // task's cgroup a few milliseconds from now: start the kernel's wait for that here, off
        // the create path. (Not for a VM: the prewarm holds the kernel's cgroup mutex while it
        // waits, which the VM's own cgroup work on the path would then wait for; its VMM's
        // migration is already off the path.)
        if migrates_into_task_cgroup(&resolved.runtime_type) {
            tokio::task::spawn_blocking(switchyard_base::cgroup::prewarm_migration);
        }
        let bundle = Bundle::locate(&self.state, &self.root, ns, &id);
        let options_json = options.as_ref().and_then(|o| {
            if is_runc(&resolved.runtime_type) {
                runc_options_json(o)
            } else {
                generic_options_json(o)
            }
        });
        bundle.create(&spec.value, !req.rootfs.is_empty(), options_json.as_deref())?;
        failpoints::hit("task.create.bundle-written");
        let record = TaskRecord {
            runtime: resolved.name.clone(),
            runtime_type: resolved.runtime_type.clone(),
            binary: resolved.binary.clone(),
        };
        if let Err(e) = bundle.write_record(&record) {
            let _ = bundle.delete();
            return Err(e.into());
        }
        failpoints::hit("task.create.record-written");
        // containerd's runc shim groups by its own rules: it always gets `start`.
        let group = (!is_containerd_runc(&resolved.runtime_type))
            .then(|| task_group(&spec.value, options_json.as_deref()))
            .flatten();
        let binary = resolved.binary.clone();
        let kit = is_kit_shim(&resolved.runtime_type);
        // A shim started for this task writes its log into this bundle's fifo (and blocks
        // until someone reads it); one joined writes into its first task's.
        let mut log = None;
        req.bundle = bundle.path.to_string_lossy().into_owned();
        req.options = options.clone();
        let mut retried = false;
        let (shim, joined, created) = loop {
            let (shim, joined) = self
                .shim_for(
                    &bundle,
                    &binary,
                    options.as_ref(),
                    group.as_deref(),
                    kit,
                    &mut log,
                )
                .await?;
            failpoints::hit("task.create.shim-started");
            let created = shim.client.create(req.clone()).await;
            if !retried
                && group.is_some()
                && let Err(e) = &created
                && (e.is_disconnected() || e.kind() == Kind::Unavailable)
            {
                // The group's shim (joined, or found by `start`) stopped between its last task
                // and this Create: start another, once.
                tracing::debug!(container_id = %id, joined, error = %e, "the group's shim is exiting; starting a new one");
                self.shims.forget_group_shim(&shim);
                retried = true;
                continue;
            }
            break (shim, joined, created);
        };
        match created {
            Ok(r) => {
                failpoints::hit("task.create.shim-created");
                // A joined shim logs into the bundle it was started in, never this one.
                let log = if joined { None } else { log };
                let task = self.new_task(bundle, record, shim, log);
                self.register(task);
                Ok(r.pid)
            }
            Err(e) => {
                self.abandon(&bundle, &record, &shim, e.is_disconnected())
                    .await;
                Err(TaskError::Call { id, source: e })
            }
        }
    }

    /// Starts or joins the shim of a task whose bundle is written, following the bundle's log
    /// into `log` before a shim starts; on failure removes what the attempt left (a dead
    /// server's socket, the bundle).
    async fn shim_for(
        &self,
        bundle: &Bundle,
        binary: &std::path::Path,
        options: Option<&prost_types::Any>,
        group: Option<&str>,
        kit: bool,
        log: &mut Option<Follower>,
    ) -> Result<(Arc<Shim>, bool)> {
        let starting = || {
            if log.is_none() {
                *log = crate::runtime::log::follow(&bundle.log_fifo(), &bundle.namespace, &bundle.id)
                    .map_err(|e| tracing::warn!(container_id = %bundle.id, error = %e, "cannot follow shim log"))
                    .ok();
            }
        };
        match self
            .shims
            .start_or_join(bundle, binary, options, group, kit, starting)
            .await
        {
            Ok((shim, joined)) => {
                let how = if joined {
                    "joined the group's shim"
                } else {
                    "started shim"
                };
                tracing::info!(namespace = %bundle.namespace, container_id = %bundle.id, shim = %binary.display(), group, address = %shim.address, "{how}");
                Ok((shim, joined))
            }
            Err(e) => {
                // `start` left a server running, or one that died before it could be reached:
                // the binary's cleanup stops what is left and removes a dead server's socket,
                // as containerd runs it after a shim it cannot reach.
                if matches!(
                    e,
                    ShimError::Connect { .. }
                        | ShimError::ServerDown { .. }
                        | ShimError::Address { .. }
                        | ShimError::Bootstrap { .. }
                ) && let Err(err) = self.shims.delete(bundle, binary).await
                {
                    tracing::warn!(container_id = %bundle.id, error = %crate::error::chain(&err), "clean up after a shim that cannot be reached");
                }
                if let Err(err) = bundle.delete() {
                    tracing::warn!(container_id = %bundle.id, error = %crate::error::chain(&err), "remove bundle");
                }
                Err(e.into())
            }
        }
    }

    /// Undoes a half-made task: as containerd does, ask the shim to delete and shut down; then
    /// run `<shim> delete` as well, because a shim whose Create failed half way (or timed
    /// out) can leave runtime state behind (runc's `init`, its cgroup) that only the binary's
    /// cleanup removes.
    async fn abandon(&self, bundle: &Bundle, record: &TaskRecord, shim: &Shim, disconnected: bool) {
        let id = bundle.id.clone();
        // A shim that serves no other task stops now rather than staying warm for its group.
        let shared = || self.read().values().any(|t| t.shim.address == shim.address);
        if !disconnected {
            let _ = shim
                .client
                .delete(shimapi::DeleteRequest {
                    id: id.clone(),
                    exec_id: String::new(),
                })
                .await;
            let _ = shim
                .client
                .shutdown(&id, !shared(), self.shims.settings().shutdown_timeout)
                .await;
        }
        if let Err(e) = self.shims.delete(bundle, &record.binary).await {
            tracing::warn!(container_id = %id, error = %crate::error::chain(&e), "shim delete");
        }
        if let Err(e) = bundle.delete() {
            tracing::warn!(container_id = %id, error = %crate::error::chain(&e), "remove bundle");
        }
        // A shim that serves no other task and ignored Shutdown would be leaked: stop it.
        if let (false, Some(pid)) = (shared(), shim.pid) {
            let wait = tokio::time::timeout(Duration::from_secs(1), shim.gone());
            if wait.await.is_err() {
                tracing::warn!(container_id = %id, pid, "shim ignored Shutdown; killing it");
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// Cleans up after a shim that exited while its task was registered.
    async fn on_shim_gone(self: Arc<Self>, task: Arc<Task>) {
        let key = (task.namespace.clone(), task.id.clone());
        {
            let mut tasks = self.write();
            if !tasks.get(&key).is_some_and(|t| Arc::ptr_eq(t, &task)) {
                return;
            }
            tasks.remove(&key);
        }
        tracing::warn!(namespace = %task.namespace, container_id = %task.id, "shim exited; cleaning up");
        let exit = self.cleanup_dead(&task.bundle, &task.record).await;
        let _ = task.exit.send(Some(exit));
    }

    /// `<shim> delete`, bundle removal and the exit and delete events for a task whose shim
    /// is gone.
    async fn cleanup_dead(&self, bundle: &Bundle, record: &TaskRecord) -> Exit {
        let exit = match self.shims.delete(bundle, &record.binary).await {
            Ok(r) => Exit {
                pid: r.pid,
                status: r.exit_status,
                exited_at: r.exited_at.or_else(|| Some(now())),
            },
            Err(e) => {
                tracing::warn!(container_id = %bundle.id, error = %crate::error::chain(&e), "cleanup after dead shim");
                Exit {
                    pid: 0,
                    status: UNKNOWN_EXIT,
                    exited_at: Some(now()),
                }
            }
        };
        if let Err(e) = bundle.delete() {
            tracing::warn!(container_id = %bundle.id, error = %crate::error::chain(&e), "remove bundle");
        }
        let ns = &bundle.namespace;
        self.exchange.publish(
            ns,
            topics::TASK_EXIT,
            to_any(&TaskExit {
                container_id: bundle.id.clone(),
                id: bundle.id.clone(),
                pid: exit.pid,
                exit_status: exit.status,
                exited_at: exit.exited_at,
            }),
        );
        self.exchange.publish(
            ns,
            topics::TASK_DELETE,
            to_any(&TaskDelete {
                container_id: bundle.id.clone(),
                id: String::new(),
                pid: exit.pid,
                exit_status: exit.status,
                exited_at: exit.exited_at,
            }),
        );
        exit
    }

    async fn await_exit(&self, task: &Task) -> Result<Exit> {
        let mut rx = task.exit.subscribe();
        let wait = self.shims.settings().delete_timeout + Duration::from_secs(5);
        match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => v.clone().ok_or_else(|| TaskError::Lost {
                id: task.id.clone(),
            }),
            _ => Err(TaskError::Lost {
                id: task.id.clone(),
            }),
        }
    }

    pub async fn delete(&self, ns: &str, id: &str) -> Result<shimapi::DeleteResponse> {
        let task = self.get(ns, id)?;
        let req = shimapi::DeleteRequest {
            id: id.to_owned(),
            exec_id: String::new(),
        };
        match task.shim.client.delete(req).await {
            Ok(r) => {
                self.unregister(&task);
                failpoints::hit("task.delete.shim-deleted");
                match task
                    .shim
                    .client
                    .shutdown(id, false, self.shims.settings().shutdown_timeout)
                    .await
                {
                    Ok(true) => {}
                    // No answer: the shim died. One killed after Delete answered (the task is
                    // no longer registered, so its monitor does not clean up) leaves its
                    // socket: the binary's cleanup removes a dead server's socket.
                    Ok(false) if socket_file(&task.shim.address).is_some_and(|p| p.exists()) => {
                        if let Err(e) = self.shims.delete(&task.bundle, &task.record.binary).await {
                            tracing::warn!(container_id = %id, error = %crate::error::chain(&e), "clean up after a shim that died");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(container_id = %id, error = %crate::error::chain(&e), "shim shutdown");
                    }
                }
                failpoints::hit("task.delete.shim-shutdown");
                if let Err(e) = task.bundle.delete() {
                    tracing::warn!(container_id = %id, error = %crate::error::chain(&e), "remove bundle");
                }
                Ok(r)
            }
            Err(e) if e.is_not_found() => {
                // The shim has no such task (it was deleted there, or never created, before
                // a daemon crash): it is gone; finish the cleanup rather than fail forever.
                tracing::warn!(namespace = ns, container_id = %id, "the shim does not know the task; removing it");
                if self.unregister(&task) {
                    self.abandon(&task.bundle, &task.record, &task.shim, false)
                        .await;
                }
                Ok(shimapi::DeleteResponse {
                    pid: 0,
                    exit_status: UNKNOWN_EXIT,
                    exited_at: Some(now()),
                })
            }
            Err(e) if e.is_disconnected() => {
                // The shim is gone; its monitor cleans up (or already has).
                let exit = self.await_exit(&task).await?;
                Ok(shimapi::DeleteResponse {
                    pid: exit.pid,
                    exit_status: exit.status,
                    exited_at: exit.exited_at,
                })
            }
            Err(e) => Err(TaskError::Call {
                id: id.to_owned(),
                source: e,
            }),
        }
    }

    pub async fn delete_process(
        &self,
        ns: &str,
        id: &str,
        exec_id: &str,
    ) -> Result<shimapi::DeleteResponse> {
        let task = self.get(ns, id)?;
        task.shim
            .client
            .delete(shimapi::DeleteRequest {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })
            .await
            .map_err(Self::call_err(id))
    }

    pub async fn start(&self, ns: &str, id: &str, exec_id: &str) -> Result<u32> {
        let task = self.get(ns, id)?;
        let r = task
            .shim
            .client
            .start(shimapi::StartRequest {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })
            .await
            .map_err(Self::call_err(id))?;
        failpoints::hit("task.start.shim-started");
        Ok(r.pid)
    }

    pub async fn wait(&self, ns: &str, id: &str, exec_id: &str) -> Result<shimapi::WaitResponse> {
        let task = self.get(ns, id)?;
        let req = shimapi::WaitRequest {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        match task.shim.client.wait(req).await {
            Ok(r) => Ok(r),
            Err(e) if e.is_disconnected() && exec_id.is_empty() => {
                let exit = self.await_exit(&task).await?;
                Ok(shimapi::WaitResponse {
                    exit_status: exit.status,
                    exited_at: exit.exited_at,
                })
            }
            Err(e) => Err(TaskError::Call {
                id: id.to_owned(),
                source: e,
            }),
        }
    }

    /// The shim's State of a process, with `id` and `exec_id` set to what was asked (a shim's
    /// own idea of them is not trusted to name the task).
    async fn state(
        task: &Task,
        exec_id: &str,
    ) -> std::result::Result<shimapi::StateResponse, CallError> {
        let mut s = task
            .shim
            .client
            .state(shimapi::StateRequest {
                id: task.id.clone(),
                exec_id: exec_id.to_owned(),
            })
            .await?;
        s.id = task.id.clone();
        s.exec_id = exec_id.to_owned();
        Ok(s)
    }

    pub async fn state_of(
        &self,
        ns: &str,
        id: &str,
        exec_id: &str,
    ) -> Result<shimapi::StateResponse> {
        let task = self.get(ns, id)?;
        match Self::state(&task, exec_id).await {
            Ok(p) => Ok(p),
            Err(e) => Err(self.after_call_failed(&task, e).await),
        }
    }

    /// The answer to a call the task's shim failed. A shim that died (its connection closed)
    /// may not have been noticed by its monitor yet: wait for the monitor's cleanup, after
    /// which the task no longer exists (containerd answers a closed shim's State the same
    /// way), so that a client's next step (`yard rm --force` deleting the container) is not
    /// refused for a task that is already gone.
    async fn after_call_failed(&self, task: &Task, e: CallError) -> TaskError {
        if !e.is_disconnected() {
            return Self::call_err(&task.id)(e);
        }
        let not_found = || TaskError::NotFound {
            namespace: task.namespace.clone(),
            id: task.id.clone(),
        };
        let key = (task.namespace.clone(), task.id.clone());
        let registered = self
            .read()
            .get(&key)
            .is_some_and(|t| std::ptr::eq(Arc::as_ptr(t), task));
        if !registered {
            // Deleted meanwhile: nothing will report an exit.
            return not_found();
        }
        match self.await_exit(task).await {
            Ok(_) => not_found(),
            Err(lost) => lost,
        }
    }

    /// Tasks of a namespace; a shim that does not answer in time shows as UNKNOWN.
    pub async fn list(&self, ns: &str) -> Vec<shimapi::StateResponse> {
        let tasks: Vec<Arc<Task>> = self
            .read()
            .values()
            .filter(|t| t.namespace == ns)
            .cloned()
            .collect();
        let states = tasks.iter().map(|t| async move {
            match tokio::time::timeout(LIST_TIMEOUT, Self::state(t, "")).await {
                Ok(Ok(s)) => s,
                _ => shimapi::StateResponse {
                    id: t.id.clone(),
                    status: Status::Unknown as i32,
                    ..Default::default()
                },
            }
        });
        let mut out = futures::future::join_all(states).await;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub async fn kill(&self, ns: &str, req: shimapi::KillRequest) -> Result<()> {
        let task = self.get(ns, &req.id)?;
        match task.shim.client.kill(req).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.after_call_failed(&task, e).await),
        }
    }

    pub async fn exec(&self, ns: &str, req: shimapi::ExecProcessRequest) -> Result<()> {
        crate::ident::check("exec id", &req.exec_id)?;
        let task = self.get(ns, &req.id)?;
        let id = req.id.clone();
        task.shim
            .client
            .exec(req)
            .await
            .map_err(Self::call_err(&id))
    }

    pub async fn resize_pty(&self, ns: &str, req: shimapi::ResizePtyRequest) -> Result<()> {
        let task = self.get(ns, &req.id)?;
        let id = req.id.clone();
        task.shim
            .client
            .resize_pty(req)
            .await
            .map_err(Self::call_err(&id))
    }

    pub async fn close_io(&self, ns: &str, req: shimapi::CloseIoRequest) -> Result<()> {
        let task = self.get(ns, &req.id)?;
        let id = req.id.clone();
        task.shim
            .client
            .close_io(req)
            .await
            .map_err(Self::call_err(&id))
    }

    pub async fn pause(&self, ns: &str, id: &str) -> Result<()> {
        let task = self.get(ns, id)?;
        task.shim
            .client
            .pause(shimapi::PauseRequest { id: id.to_owned() })
            .await
            .map_err(Self::call_err(id))
    }

    pub async fn resume(&self, ns: &str, id: &str) -> Result<()> {
        let task = self.get(ns, id)?;
        task.shim
            .client
            .resume(shimapi::ResumeRequest { id: id.to_owned() })
            .await
            .map_err(Self::call_err(id))
    }

    pub async fn pids(&self, ns: &str, id: &str) -> Result<Vec<ProcessInfo>> {
        let task = self.get(ns, id)?;
        let r = task
            .shim
            .client
            .pids(shimapi::PidsRequest { id: id.to_owned() })
            .await
            .map_err(Self::call_err(id))?;
        Ok(r.processes)
    }

    pub async fn update(&self, ns: &str, req: shimapi::UpdateTaskRequest) -> Result<()> {
        let task = self.get(ns, &req.id)?;
        let id = req.id.clone();
        task.shim
            .client
            .update(req)
            .await
            .map_err(Self::call_err(&id))
    }

    /// Stats of the namespace's tasks that match `filters` (fields: `id`, `runtime`), by task
    /// id; a shim that does not answer in time is left out.
    pub async fn metrics(
        &self,
        ns: &str,
        filters: &[String],
    ) -> Result<Vec<(String, shimapi::StatsResponse)>> {
        let filter = Filter::parse(filters)?;
        let tasks: Vec<Arc<Task>> = self
            .read()
            .values()
            .filter(|t| t.namespace == ns && filter.matches(&TaskFields(t)))
            .cloned()
            .collect();
        let stats = tasks.iter().map(|t| async move {
            let r = tokio::time::timeout(
                LIST_TIMEOUT,
                t.shim
                    .client
                    .stats(shimapi::StatsRequest { id: t.id.clone() }),
            )
            .await;
            match r {
                Ok(Ok(s)) => Some((t.id.clone(), s)),
                _ => None,
            }
        });
        Ok(futures::future::join_all(stats)
            .await
            .into_iter()
            .flatten()
            .collect())
    }

    // ---- restart ----

    /// Finds the tasks a previous daemon left running, reconnecting to their shims and cleaning
    /// up after those that died meanwhile and those their shim does not know (a daemon that
    /// stopped between shim start and shim Create, or between the shim's Delete and its own).
    pub async fn restore(self: &Arc<Self>) {
        let mut unknown = Vec::new();
        for bundle in self.bundles() {
            if let Some(orphan) = self.restore_one(bundle).await {
                unknown.push(orphan);
            }
        }
        // Only now, with every live task registered, can a shim that also serves other tasks
        // be told apart from one that serves none (and may be stopped).
        for Orphan {
            bundle,
            record,
            shim,
            _log,
        } in unknown
        {
            tracing::warn!(namespace = %bundle.namespace, container_id = %bundle.id, "the shim does not know this task; cleaning up");
            self.abandon(&bundle, &record, &shim, false).await;
        }
    }

    /// The bundles under `<state>/tasks`.
    fn bundles(&self) -> Vec<Bundle> {
        let mut out = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(self.state.join("tasks")) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let ns_name = ns.file_name().to_string_lossy().into_owned();
            let Ok(ids) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for entry in ids.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if crate::ident::is_valid(&ns_name) && crate::ident::is_valid(&id) {
                    out.push(Bundle::locate(&self.state, &self.root, &ns_name, &id));
                }
            }
        }
        out
    }

    /// Registers the task of one bundle again, or cleans up after it; returns it when its
    /// shim is alive but does not know it.
    async fn restore_one(self: &Arc<Self>, bundle: Bundle) -> Option<Orphan> {
        let id = bundle.id.clone();
        let record = match bundle.read_record() {
            Ok(r) => r,
            Err(_) => {
                // A create that never finished: clean up with the binary it recorded, if any.
                if let Ok(bin) = std::fs::read_to_string(bundle.path.join("shim-binary-path")) {
                    let _ = self
                        .shims
                        .delete(&bundle, std::path::Path::new(bin.trim()))
                        .await;
                }
                let _ = bundle.delete();
                tracing::info!(namespace = %bundle.namespace, container_id = %id, "removed an unfinished bundle");
                return None;
            }
        };
        let log = crate::runtime::log::follow(&bundle.log_fifo(), &bundle.namespace, &id).ok();
        let shim = match self.shims.load(&bundle).await {
            Ok(shim) => shim,
            Err(e) => {
                tracing::warn!(namespace = %bundle.namespace, container_id = %id, error = %crate::error::chain(&e), "shim is gone; cleaning up");
                drop(log);
                self.cleanup_dead(&bundle, &record).await;
                return None;
            }
        };
        let state = shim.client.state(shimapi::StateRequest {
            id: id.clone(),
            exec_id: String::new(),
        });
        if let Ok(Err(e)) = tokio::time::timeout(RESTORE_STATE_TIMEOUT, state).await
            && e.is_not_found()
        {
            return Some(Orphan {
                bundle,
                record,
                shim,
                _log: log,
            });
        }
        tracing::info!(namespace = %bundle.namespace, container_id = %id, runtime = %record.runtime, "reconnected to shim");
        let task = self.new_task(bundle, record, shim, log);
        self.register(task);
        None
    }
}

/// A bundle whose shim is alive but has no such task.
struct Orphan {
    bundle: Bundle,
    record: TaskRecord,
    shim: Arc<Shim>,
    /// The shim's log stays read until it is cleaned up.
    _log: Option<Follower>,
}

/// Filter fields of a task (Metrics): `id`, `runtime`.
struct TaskFields<'a>(&'a Task);

impl Adaptor for TaskFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.0.id.clone()),
            [f] if f == "runtime" => Some(self.0.record.runtime.clone()),
            _ => None,
        }
    }
}

/// The group a task's shim serves, by the rule the shim kit's `start` applies
/// ([`switchyard_base::group`]): a grouping annotation of the spec, else the runtime's `group`
/// option (`options_json`, the table the bundle's `options.json` holds).
fn task_group(spec: &[u8], options_json: Option<&[u8]>) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    let annotations = serde_json::from_slice::<Annotated>(spec)
        .map(|a| a.annotations)
        .unwrap_or_default();
    switchyard_base::group::group_of(
        |k| annotations.get(k).map(String::as_str),
        || {
            let options: serde_json::Value = serde_json::from_slice(options_json?).ok()?;
            options.get("group")?.as_str().map(str::to_owned)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::task_group;

    #[test]
    fn a_task_group_is_read_as_the_shim_kit_reads_it() {
        let spec = br#"{"ociVersion":"1.0.2","annotations":{"io.switchyard.group":"edge"}}"#;
        assert_eq!(task_group(spec, None).as_deref(), Some("edge"));
        let pod =
            br#"{"annotations":{"io.kubernetes.cri.sandbox-id":"p1","io.switchyard.group":"x"}}"#;
        assert_eq!(
            task_group(pod, Some(br#"{"group":"fns"}"#)).as_deref(),
            Some("p1")
        );
        let plain = br#"{"ociVersion":"1.0.2"}"#;
        assert_eq!(
            task_group(plain, Some(br#"{"group":"fns"}"#)).as_deref(),
            Some("fns")
        );
        assert_eq!(task_group(plain, Some(br#"{"cache_dir":"/x"}"#)), None);
        assert_eq!(task_group(plain, None), None);
        let empty = br#"{"annotations":{"io.switchyard.group":""}}"#;
        assert_eq!(task_group(empty, Some(br#"{"group":"fns"}"#)), None);
    }
}
