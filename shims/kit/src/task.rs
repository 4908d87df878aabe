//! The task/exec state machine of one shim process (which may hold several tasks of one group),
//! as typed async functions over an [`Engine`]. `service.rs` is only the ttrpc adapter.
//!
//! A process goes `Created → Starting → Running → Stopped`. Its exit is recorded and its
//! `/tasks/exit` queued in one step under the process's lock, so a client that sees the event
//! (or a Wait return) and calls Delete finds it stopped, and `/tasks/delete` always follows
//! `/tasks/exit`. An exit that arrives while Start is still in flight is held until Start has
//! queued `/tasks/start` (containerd's runc shim does the same), so the events stay in order
//! and Start still succeeds with the pid of the process that ran.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::types::mount::Mount;
use tokio::sync::watch;

use crate::bundle;
use crate::engine::{Container, CreateRequest, Engine, ExecRequest, Exit, Process, ProcessInfo};
use crate::error::{Error, Result};
use crate::events::{Event, Publisher, timestamp};
use crate::stdio::StdioSpec;

/// How long Delete of a never-started task waits for its killed init to be reaped.
const KILLED_INIT_GRACE: Duration = Duration::from_secs(5);

/// `Create`, in the kit's terms.
#[derive(Debug, Clone, Default)]
pub struct CreateTask {
    pub id: String,
    pub bundle: PathBuf,
    /// The mounts containerd asks for as the rootfs (empty when the bundle has its own).
    pub rootfs: Vec<Mount>,
    pub stdio: StdioSpec,
    pub options: Option<Any>,
    /// Only echoed in `/tasks/create`; checkpoints are not supported.
    pub checkpoint: String,
}

/// `Exec`, in the kit's terms.
#[derive(Debug, Clone, Default)]
pub struct ExecProcess {
    pub id: String,
    pub exec_id: String,
    pub stdio: StdioSpec,
    /// The OCI process spec as JSON (`None`: the request carried none).
    pub spec: Option<Vec<u8>>,
}

/// What containerd calls a process's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// `State` of a task's init (`exec_id` empty) or of one exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    /// The task id for the init, else the exec id.
    pub id: String,
    pub exec_id: String,
    pub bundle: String,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioSpec,
    pub exit: Option<Exit>,
}

/// What Delete reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub pid: u32,
    pub exit: Exit,
}

/// What Connect reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    pub shim_pid: u32,
    /// The task's init pid; 0 for an id this shim does not know (as containerd's runc shim).
    pub task_pid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    /// Start is in flight; an exit now is held until it has returned.
    Starting,
    Running,
    Stopped,
}

struct ProcInner {
    phase: Phase,
    held_exit: Option<Exit>,
    /// Init only: a Delete of the task is in flight.
    deleting: bool,
}

/// The kit's side of one process: the engine's process plus what containerd sees of it.
struct Proc {
    container_id: String,
    /// Empty for the init.
    exec_id: String,
    process: Arc<dyn Process>,
    stdio: StdioSpec,
    inner: Mutex<ProcInner>,
    exit: watch::Sender<Option<Exit>>,
    events: Publisher,
}

impl Proc {
    fn new(
        container_id: &str,
        exec_id: &str,
        process: Arc<dyn Process>,
        stdio: StdioSpec,
        events: Publisher,
    ) -> Arc<Proc> {
        Arc::new(Proc {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process,
            stdio,
            inner: Mutex::new(ProcInner {
                phase: Phase::Created,
                held_exit: None,
                deleting: false,
            }),
            exit: watch::channel(None).0,
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ProcInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// The id containerd knows this process by in errors and events.
    fn name(&self) -> String {
        if self.exec_id.is_empty() {
            format!("task {:?}", self.container_id)
        } else {
            format!("exec {:?}", self.exec_id)
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// The engine says the process exited.
    fn on_exit(&self, exit: Exit) {
        let mut inner = self.lock();
        if inner.phase == Phase::Starting {
            inner.held_exit = Some(exit);
            return;
        }
        self.stop(&mut inner, exit);
    }

    /// Record the exit and queue `/tasks/exit`, under the lock (see the module doc).
    fn stop(&self, inner: &mut ProcInner, exit: Exit) {
        if inner.phase == Phase::Stopped {
            return;
        }
        inner.phase = Phase::Stopped;
        self.exit.send_replace(Some(exit));
        let id = if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        };
        tracing::debug!(container_id = %self.container_id, id, status = exit.status, "exited");
        self.events.publish(Event::Exit(TaskExit {
            container_id: self.container_id.clone(),
            id: id.clone(),
            pid: self.process.pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }));
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.unwrap_or_else(|| Exit::now(255)),
            // The sender lives as long as `self`.
            Err(_) => Exit::now(255),
        }
    }

    /// Watch the engine's process and record its exit.
    fn monitor(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let exit = me.process.wait().await;
            me.on_exit(exit);
        });
    }
}

/// Leaves `Starting` however Start ends (also when its future is dropped): back to `Created`,
/// or to `Stopped` with an exit that came meanwhile.
struct StartGuard<'a> {
    proc_: &'a Proc,
    armed: bool,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut inner = self.proc_.lock();
        match inner.held_exit.take() {
            Some(exit) => {
                inner.phase = Phase::Running;
                self.proc_.stop(&mut inner, exit);
            }
            None => inner.phase = Phase::Created,
        }
    }
}

/// Clears the init's `deleting` mark when a Delete fails or is dropped.
struct DeleteGuard<'a>(&'a Proc);

impl Drop for DeleteGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().deleting = false;
    }
}

/// The rootfs the kit mounted for a task: unmounted on drop unless kept.
struct RootfsMount(Option<PathBuf>);

impl RootfsMount {
    fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for RootfsMount {
    fn drop(&mut self) {
        if let Some(target) = self.0.take() {
            bundle::unmount(&target);
        }
    }
}

struct Task {
    id: String,
    bundle: String,
    container: Arc<dyn Container>,
    init: Arc<Proc>,
    execs: Mutex<Execs>,
    paused: AtomicBool,
    /// What the kit mounted as the rootfs.
    mounted: Option<PathBuf>,
}

#[derive(Default)]
struct Execs {
    live: HashMap<String, Arc<Proc>>,
    /// Ids whose Exec is in flight.
    adding: HashSet<String>,
}

impl Task {
    fn execs(&self) -> MutexGuard<'_, Execs> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().live.get(exec_id).cloned().ok_or_else(|| {
            Error::NotFound(format!("exec {exec_id:?} not found in task {:?}", self.id))
        })
    }
}

#[derive(Default)]
struct Tasks {
    live: HashMap<String, Arc<Task>>,
    /// Ids whose Create is in flight.
    creating: HashSet<String>,
    /// A server that lingers after its last task (see [`TaskService::with_idle_exit`]) exits
    /// at this time unless a Create comes first.
    idle_until: Option<tokio::time::Instant>,
    /// The server is stopping: a Create now would be lost with it, so it is refused.
    closed: bool,
}

/// Removes an id from `creating` however Create ends.
struct Reservation<'a, E: Engine> {
    svc: &'a TaskService<E>,
    id: &'a str,
}

impl<E: Engine> Drop for Reservation<'_, E> {
    fn drop(&mut self) {
        self.svc.tasks().creating.remove(self.id);
    }
}

/// The tasks of one shim process.
pub struct TaskService<E: Engine> {
    engine: Arc<E>,
    namespace: String,
    events: Publisher,
    tasks: Mutex<Tasks>,
    shutdown: watch::Sender<bool>,
    /// Whether a Create has reached this server (see [`TaskService::unclaimed_for`]).
    claimed: AtomicBool,
    /// How long the server lingers after its last task; `None`: it stops at Shutdown.
    idle_exit: Option<Duration>,
    /// Wakes [`TaskService::idle_exit`] when a Shutdown starts the linger.
    idle_armed: tokio::sync::Notify,
}

impl<E: Engine> TaskService<E> {
    pub fn new(engine: Arc<E>, namespace: &str, events: Publisher) -> Self {
        TaskService {
            engine,
            namespace: namespace.to_owned(),
            events,
            tasks: Mutex::new(Tasks::default()),
            shutdown: watch::channel(false).0,
            claimed: AtomicBool::new(false),
            idle_exit: None,
            idle_armed: tokio::sync::Notify::new(),
        }
    }

    /// A server that stays up for `linger` after its last task instead of stopping at
    /// Shutdown (a group's shim kept warm for the group's next task), then stops by itself.
    pub fn with_idle_exit(mut self, linger: Duration) -> Self {
        self.idle_exit = Some(linger);
        self
    }

    fn tasks(&self) -> MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn task(&self, id: &str) -> Result<Arc<Task>> {
        self.tasks()
            .live
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id:?} not found")))
    }

    fn reserve<'a>(&'a self, id: &'a str) -> Result<Reservation<'a, E>> {
        self.claimed.store(true, Ordering::Release);
        let mut tasks = self.tasks();
        if tasks.closed {
            return Err(Error::Unavailable(format!(
                "task {id:?}: this shim is exiting; start another"
            )));
        }
        if tasks.live.contains_key(id) || !tasks.creating.insert(id.to_owned()) {
            return Err(Error::AlreadyExists(format!("task {id:?} already exists")));
        }
        tasks.idle_until = None;
        Ok(Reservation { svc: self, id })
    }

    /// Create a task: read and parse `config.json`, mount the rootfs (unless the engine takes
    /// the mounts as they are), let the engine create the container. Returns the init's pid.
    pub async fn create(&self, req: CreateTask) -> Result<u32> {
        crate::ident::check("id", &req.id)?;
        let _reservation = self.reserve(&req.id)?;
        let (spec, config) = bundle::read_spec(&req.bundle)?;
        let (rootfs, mount, mounted) =
            if !req.rootfs.is_empty() && self.engine.hands_over_rootfs(&req.rootfs) {
                (
                    crate::Rootfs::Mounts(req.rootfs.clone()),
                    RootfsMount(None),
                    Vec::new(),
                )
            } else {
                let mounts = self.engine.rootfs_mounts(req.rootfs.clone());
                let mount = RootfsMount(bundle::mount_rootfs(&req.bundle, &mounts)?);
                let root = spec.root().as_ref().map(|r| r.path().as_path());
                let dir = bundle::rootfs_dir(&req.bundle, root)?;
                (crate::Rootfs::Dir(dir), mount, mounts)
            };
        let container = self
            .engine
            .create(CreateRequest {
                namespace: self.namespace.clone(),
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                spec: Box::new(spec),
                config,
                rootfs,
                mounted,
                stdio: req.stdio.clone(),
                options: req.options.clone(),
                events: self.events.clone(),
            })
            .await?;
        let init = Proc::new(
            &req.id,
            "",
            container.init(),
            req.stdio.clone(),
            self.events.clone(),
        );
        let pid = init.process.pid();
        let task = Arc::new(Task {
            id: req.id.clone(),
            bundle: req.bundle.display().to_string(),
            container,
            init: init.clone(),
            execs: Mutex::default(),
            paused: AtomicBool::new(false),
            mounted: mount.keep(),
        });
        {
            let mut tasks = self.tasks();
            tasks.live.insert(req.id.clone(), task);
            // Queued before the init is watched: `/tasks/create` comes before its exit.
            self.events.publish(Event::Create(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.display().to_string(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdio.stdin.clone(),
                    stdout: req.stdio.stdout.clone(),
                    stderr: req.stdio.stderr.clone(),
                    terminal: req.stdio.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }));
        }
        init.monitor();
        Ok(pid)
    }

    /// Start the init (`exec_id` empty) or an exec. Returns its pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let task = self.task(id)?;
        let p = task.process(exec_id)?;
        {
            let mut inner = p.lock();
            if inner.deleting {
                return Err(Error::FailedPrecondition(format!(
                    "{} is being deleted",
                    p.name()
                )));
            }
            if inner.phase != Phase::Created {
                return Err(Error::FailedPrecondition(format!(
                    "{} is {:?}, not created",
                    p.name(),
                    inner.phase
                )));
            }
            inner.phase = Phase::Starting;
        }
        let mut guard = StartGuard {
            proc_: &p,
            armed: true,
        };
        let pid = p.process.start().await?;
        guard.armed = false;
        {
            let mut inner = p.lock();
            self.events.publish(if exec_id.is_empty() {
                Event::Start(TaskStart {
                    container_id: id.to_owned(),
                    pid,
                    ..Default::default()
                })
            } else {
                Event::ExecStarted(TaskExecStarted {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                })
            });
            inner.phase = Phase::Running;
            if let Some(exit) = inner.held_exit.take() {
                p.stop(&mut inner, exit);
            }
        }
        // An exec's process has no pid to wait for before it starts; the init is watched
        // from Create.
        if !exec_id.is_empty() {
            p.monitor();
        }
        Ok(pid)
    }

    /// Delete the task (`exec_id` empty: the container, its rootfs mount, the task record) or
    /// one exec's record. The process must not be running.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        let task = self.task(id)?;
        if !exec_id.is_empty() {
            return self.delete_exec(&task, exec_id);
        }
        let init = task.init.clone();
        let phase = {
            let mut inner = init.lock();
            if inner.deleting {
                return Err(Error::FailedPrecondition(format!(
                    "task {id:?} is being deleted"
                )));
            }
            if matches!(inner.phase, Phase::Running | Phase::Starting) {
                return Err(Error::FailedPrecondition(format!(
                    "task {id:?} is running: kill it before deleting"
                )));
            }
            inner.deleting = true;
            inner.phase
        };
        let _deleting = DeleteGuard(&init);
        let deleted = match phase {
            // Never started: containerd deletes such tasks; kill the waiting init.
            Phase::Created => {
                let r = task.container.delete(true).await;
                let _ = tokio::time::timeout(KILLED_INIT_GRACE, init.wait()).await;
                r
            }
            _ => task.container.delete(false).await,
        };
        if let Some(target) = &task.mounted {
            bundle::unmount(target);
        }
        deleted?;
        self.tasks().live.remove(id);
        let exit = init.exited().unwrap_or_else(|| Exit::now(255));
        let pid = init.process.pid();
        self.events.publish(Event::Delete(TaskDelete {
            container_id: id.to_owned(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            id: id.to_owned(),
            ..Default::default()
        }));
        crate::stdio::release_stdin_fifo(&init.stdio.stdin);
        Ok(Deleted { pid, exit })
    }

    fn delete_exec(&self, task: &Task, exec_id: &str) -> Result<Deleted> {
        let p = {
            let mut execs = task.execs();
            let p = execs.live.get(exec_id).cloned().ok_or_else(|| {
                Error::NotFound(format!("exec {exec_id:?} not found in task {:?}", task.id))
            })?;
            if matches!(p.phase(), Phase::Running | Phase::Starting) {
                return Err(Error::FailedPrecondition(format!(
                    "exec {exec_id:?} is running: kill it before deleting"
                )));
            }
            execs.live.remove(exec_id);
            p
        };
        crate::stdio::release_stdin_fifo(&p.stdio.stdin);
        Ok(Deleted {
            pid: p.process.pid(),
            exit: p.exited().unwrap_or_else(|| Exit::now(255)),
        })
    }

    /// Add a process to a task's container; it runs on Start.
    pub async fn exec(&self, req: ExecProcess) -> Result<()> {
        let task = self.task(&req.id)?;
        crate::ident::check("exec_id", &req.exec_id)?;
        if task.init.phase() == Phase::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "task {:?} has exited",
                req.id
            )));
        }
        let spec = req
            .spec
            .ok_or_else(|| Error::InvalidArgument("spec: the process spec is missing".into()))?;
        {
            let mut execs = task.execs();
            if execs.live.contains_key(&req.exec_id) || !execs.adding.insert(req.exec_id.clone()) {
                return Err(Error::AlreadyExists(format!(
                    "exec {:?} already exists in task {:?}",
                    req.exec_id, req.id
                )));
            }
        }
        let process = task
            .container
            .exec(ExecRequest {
                exec_id: req.exec_id.clone(),
                stdio: req.stdio.clone(),
                spec,
            })
            .await;
        let mut execs = task.execs();
        execs.adding.remove(&req.exec_id);
        let p = Proc::new(
            &req.id,
            &req.exec_id,
            process?,
            req.stdio,
            self.events.clone(),
        );
        execs.live.insert(req.exec_id.clone(), p);
        self.events.publish(Event::ExecAdded(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(())
    }

    /// Signal the init or an exec; with `all` (init only), every process of the container.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let task = self.task(id)?;
        if all && exec_id.is_empty() {
            return task.container.kill_all(signal).await;
        }
        let p = task.process(exec_id)?;
        match p.phase() {
            Phase::Stopped => Err(Error::NotFound(format!("{} already finished", p.name()))),
            Phase::Created if !exec_id.is_empty() => Err(Error::FailedPrecondition(format!(
                "{} has not started",
                p.name()
            ))),
            _ => p.process.kill(signal).await,
        }
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessState> {
        let task = self.task(id)?;
        let p = task.process(exec_id)?;
        let status = match p.phase() {
            Phase::Created | Phase::Starting => Status::Created,
            Phase::Running if task.paused.load(Ordering::SeqCst) => Status::Paused,
            Phase::Running => Status::Running,
            Phase::Stopped => Status::Stopped,
        };
        Ok(ProcessState {
            id: if exec_id.is_empty() { id } else { exec_id }.to_owned(),
            exec_id: exec_id.to_owned(),
            bundle: task.bundle.clone(),
            pid: p.process.pid(),
            status,
            stdio: p.stdio.clone(),
            exit: p.exited(),
        })
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.set_paused(id, true).await
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.set_paused(id, false).await
    }

    async fn set_paused(&self, id: &str, pause: bool) -> Result<()> {
        let task = self.task(id)?;
        if task.init.phase() != Phase::Running {
            return Err(Error::FailedPrecondition(format!(
                "task {id:?} is not running"
            )));
        }
        if pause {
            task.container.pause().await?;
        } else {
            task.container.resume().await?;
        }
        task.paused.store(pause, Ordering::SeqCst);
        let container_id = id.to_owned();
        self.events.publish(if pause {
            Event::Paused(TaskPaused {
                container_id,
                ..Default::default()
            })
        } else {
            Event::Resumed(TaskResumed {
                container_id,
                ..Default::default()
            })
        });
        Ok(())
    }

    /// The exit of the init or an exec, once there is one.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let p = self.task(id)?.process(exec_id)?;
        Ok(p.wait().await)
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        self.task(id)?.container.pids().await
    }

    pub async fn stats(&self, id: &str) -> Result<Any> {
        self.task(id)?.container.stats().await
    }

    pub async fn update(&self, id: &str, resources: Option<&Any>) -> Result<()> {
        let task = self.task(id)?;
        let resources =
            resources.ok_or_else(|| Error::InvalidArgument("resources: missing".into()))?;
        task.container.update(resources).await
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let p = self.task(id)?.process(exec_id)?;
        p.process.resize_pty(width, height).await
    }

    pub async fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<()> {
        let p = self.task(id)?.process(exec_id)?;
        if stdin {
            p.process.close_stdin().await?;
        }
        Ok(())
    }

    pub fn connect(&self, id: &str) -> Connected {
        Connected {
            shim_pid: std::process::id(),
            task_pid: self.task(id).map(|t| t.init.process.pid()).unwrap_or(0),
        }
    }

    /// Shutdown: the server stops once no task is left, or at once with `now`. Returns whether
    /// it will stop.
    /// A server with an idle exit lingers instead when nothing is left (and stops by itself in
    /// [`TaskService::idle_exit`]).
    pub fn shutdown(&self, now: bool) -> bool {
        let mut tasks = self.tasks();
        let remaining = tasks.live.len() + tasks.creating.len();
        if remaining > 0 && !now {
            return false;
        }
        if let (Some(linger), false) = (self.idle_exit, now) {
            tracing::info!(
                ?linger,
                "shutdown: no task left; staying warm for the group"
            );
            tasks.idle_until = Some(tokio::time::Instant::now() + linger);
            self.idle_armed.notify_one();
        } else {
            tracing::info!(remaining, "shutdown");
            tasks.closed = true;
            self.shutdown.send_replace(true);
        }
        true
    }

    /// Stops the server once it has lingered its idle time after a Shutdown with no Create
    /// since; never returns for a server without an idle exit. A daemon that went away
    /// without sending Shutdown leaves a server with tasks: that one waits for its tasks.
    pub async fn idle_exit(&self) {
        if self.idle_exit.is_none() {
            return std::future::pending().await;
        }
        loop {
            let deadline = self.tasks().idle_until;
            match deadline {
                None => self.idle_armed.notified().await,
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    let mut tasks = self.tasks();
                    let expired = tasks
                        .idle_until
                        .is_some_and(|at| at <= tokio::time::Instant::now());
                    if !expired {
                        continue;
                    }
                    if tasks.live.is_empty() && tasks.creating.is_empty() {
                        tasks.closed = true;
                        drop(tasks);
                        tracing::info!("no task for the idle time: exiting");
                        self.shutdown.send_replace(true);
                        return;
                    }
                    tasks.idle_until = None;
                }
            }
        }
    }

    /// Whether Shutdown has asked the server to stop.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves after `wait` if no Create has reached this server by then, else never. A server
    /// that `start` spawned for a caller that died before its Create (a daemon killed
    /// mid-start: found by the chaos test) is known to nobody, and nobody would ever send it
    /// Shutdown.
    pub async fn unclaimed_for(&self, wait: Duration) {
        tokio::time::sleep(wait).await;
        if self.claimed.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once Shutdown has asked the server to stop.
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
#[path = "task_tests.rs"]
mod tests;
