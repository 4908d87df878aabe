//! The parent's side of the worker: starting it, the request/reply channel, and the kit's
//! `Container`/`Process` for a task whose guest runs there. The parent keeps what needs
//! privilege or the client (stdio fifos, the terminal, the HTTP listener, mounts, cgroups,
//! events); the worker only runs guests. Nothing the worker sends is trusted: frames are
//! bounded, replies must match a request, events must name a task of this worker, and a worker
//! that breaks the protocol is killed (its tasks end with [`EXIT_WORKER_GONE`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use command_fds::{CommandFdExt, FdMapping};
use tokio::sync::{mpsc, oneshot, watch};
use yard_shim_kit::protos::protobuf::Message as _;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::stdio::{ConsoleCopy, ConsoleSlot, StdinCloser};
use yard_shim_kit::{Container, Error, ExecRequest, Exit, Process, ProcessInfo, Publisher, Result};

use crate::cgroup::Placement;
use crate::config::Options;
use crate::ipc::{self, Answer, FromWorker, Loaded, Request, ToWorker};
use crate::worker::{Init, NETNS_FLAG, USERNS_FLAG, USERNS_READY};

/// Exit status of the tasks of a worker that died (as if killed).
pub const EXIT_WORKER_GONE: u32 = 137;
/// How long a request may wait for its answer (a Delete waits up to 5 s for a guest to stop).
const ANSWER: Duration = Duration::from_secs(30);
/// How long a send may block on a worker that stopped reading.
const SEND: Duration = Duration::from_secs(10);
/// Longest worker log line relayed.
const LOG_LINE: usize = 8 << 10;

enum TaskEvent {
    Exited(u32),
    Oom,
}

struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Answer>>>>,
    tasks: Mutex<HashMap<String, mpsc::Sender<TaskEvent>>>,
    dead: AtomicBool,
}

impl Shared {
    /// The worker is gone (or must go): every waiting request fails, every task ends.
    fn gone(&self, why: &str) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!("wasm worker ended: {why}");
        for (_, tx) in self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = tx.send(Err(Error::Internal(format!(
                "the wasm worker ended: {why}"
            ))));
        }
        for (_, tx) in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = tx.try_send(TaskEvent::Exited(EXIT_WORKER_GONE));
        }
    }
}

/// A pod's network namespace, which a worker serving the pod runs in.
pub struct PodNetns {
    /// The path the task's spec named it by (for messages).
    pub path: PathBuf,
    /// Its identity (device, inode): two paths may name one namespace.
    pub id: (u64, u64),
    fd: OwnedFd,
}

impl PodNetns {
    /// The namespace at `path`, from a task's `linux.namespaces`.
    pub fn open(path: &std::path::Path) -> Result<PodNetns> {
        let (fd, id) = crate::sys::open_netns(path).map_err(|e| {
            Error::InvalidArgument(format!(
                "linux.namespaces: network namespace {}: {e}",
                path.display()
            ))
        })?;
        Ok(PodNetns {
            path: path.to_owned(),
            id,
            fd,
        })
    }
}

impl std::fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

/// A running worker.
pub struct Worker {
    pub pid: u32,
    /// The kit reaper's history before the worker started (its exit and pidfd are asked for
    /// since then, never a reused pid's).
    pub mark: yard_shim_kit::reaper::Mark,
    pub options: Options,
    chan: Mutex<OwnedFd>,
    pidfd: Option<OwnedFd>,
    next: AtomicU64,
    shared: Arc<Shared>,
    /// Artifacts the worker has loaded, by module digest.
    loaded: Mutex<HashMap<String, Loaded>>,
    pub placement: Mutex<Placement>,
    watched: AtomicBool,
    /// The worker's user namespace, to idmap task roots to (none with `worker_uid = 0`).
    userns: Option<OwnedFd>,
    /// The pod's network namespace the worker runs in (none: the shim's, and no sockets).
    pub netns: Option<(PathBuf, (u64, u64))>,
}

impl Worker {
    /// Start a worker for `options` (no async runtime needed: the server prewarms one before
    /// its runtime exists), in the pod's network namespace `netns` if given (where its guests
    /// may make sockets as the options allow), else in the shim's (where they may make none).
    /// `log_filter` is the shim's log filter; `namespace` and `id` name the shim in the
    /// worker's command line.
    pub fn spawn(
        options: Options,
        netns: Option<PodNetns>,
        log_filter: &str,
        namespace: &str,
        id: &str,
    ) -> Result<Worker> {
        let (parent, child) = ipc::pair(SEND).map_err(Error::io("wasm worker channel"))?;
        let (log_r, log_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| Error::io("wasm worker log pipe")(e.into()))?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0(env!("CARGO_PKG_NAME"))
            .args(["worker", "-namespace", namespace, "-id", id])
            .args(options.user_namespace().then_some(USERNS_FLAG))
            .args(netns.is_some().then_some(NETNS_FLAG))
            .env("SWITCHYARD_SHIM_LOG", log_filter)
            // The worker mounts its empty root over its working directory (in its own mount
            // namespace): an existing directory that is not `/` (the server runs in `/`); the
            // worker refuses `/`.
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_w));
        let mut fds = vec![FdMapping {
            parent_fd: child,
            child_fd: crate::sys::CHANNEL_FD,
        }];
        let network = netns.is_some() && options.network();
        let netns = match netns {
            Some(n) => {
                fds.push(FdMapping {
                    parent_fd: n.fd,
                    child_fd: crate::sys::NETNS_FD,
                });
                Some((n.path, n.id))
            }
            None => None,
        };
        cmd.fd_mappings(fds)
            .map_err(|e| Error::Internal(format!("wasm worker channel: {e}")))?;
        // The kit's reaper collects the worker; its exit is asked for in `watch`.
        let mark = yard_shim_kit::reaper::global().mark();
        #[allow(clippy::zombie_processes)]
        let spawned = cmd.spawn().map_err(Error::io("start the wasm worker"))?;
        drop(cmd);
        let pid = spawned.id();
        let pidfd = yard_shim_kit::reaper::global().pidfd(pid, mark);
        let userns = if options.user_namespace() {
            match map_user_namespace(&parent, pid, pidfd.as_ref(), &options) {
                Ok(ns) => Some(ns),
                Err(e) => {
                    if let Some(fd) = &pidfd {
                        let _ =
                            rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        ipc::send_json(
            parent.as_fd(),
            &Init {
                options: options.clone(),
                threads,
                network,
            },
            &[],
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let reader = parent
            .try_clone()
            .map_err(Error::io("dup the wasm worker channel"))?;
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wasm-worker-rx".into())
                .spawn(move || read(reader, &shared))
                .map_err(Error::io("start the wasm worker reader"))?;
        }
        std::thread::Builder::new()
            .name("wasm-worker-log".into())
            .spawn(move || relay_log(log_r, pid))
            .map_err(Error::io("start the wasm worker log"))?;
        tracing::debug!(pid, ?netns, network, "wasm worker started");
        Ok(Worker {
            pid,
            mark,
            options,
            chan: Mutex::new(parent),
            pidfd,
            next: AtomicU64::new(1),
            shared,
            loaded: Mutex::new(HashMap::new()),
            placement: Mutex::new(Placement::default()),
            watched: AtomicBool::new(false),
            userns,
            netns,
        })
    }

    /// The worker's user namespace, which a task's root must be idmapped to (`None` when the
    /// worker runs without one).
    pub fn userns(&self) -> Option<BorrowedFd<'_>> {
        self.userns.as_ref().map(AsFd::as_fd)
    }

    /// Place the worker again once `after` has passed (a task whose cgroup it moves into then,
    /// `cgroup::ACCOUNT_AFTER`), on a blocking thread: the move can wait out an RCU grace period.
    pub fn place_after(self: &Arc<Self>, after: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let placed = tokio::task::spawn_blocking(move || {
                let w = me.upgrade().filter(|w| w.alive())?;
                let mut p = w.placement.lock().unwrap_or_else(|p| p.into_inner());
                Some(p.place(w.pid))
            })
            .await;
            if let Ok(Some(Err(e))) = placed {
                tracing::warn!(error = %e, "wasm worker cgroup: its task's CPU stays the shim's");
            }
        });
    }

    /// Learn of the worker's end from the kit's reaper (once; needs the async runtime).
    pub fn watch(self: &Arc<Self>) {
        if self.watched.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::downgrade(self);
        let shared = self.shared.clone();
        let (pid, mark) = (self.pid, self.mark);
        tokio::spawn(async move {
            let exit = yard_shim_kit::reaper::global().wait(pid, mark).await;
            shared.gone(&format!("pid {pid} exited with status {}", exit.status));
            if let Some(w) = me.upgrade() {
                w.placement
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
        });
    }

    pub fn alive(&self) -> bool {
        !self.shared.dead.load(Ordering::SeqCst)
    }

    /// Kill the worker (it broke the protocol or stopped answering).
    pub fn kill(&self, why: &str) {
        if let Some(fd) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
        self.shared.gone(why);
    }

    /// Close the channel: the worker exits when it reads the end.
    pub fn close(&self) {
        let chan = self.chan.lock().unwrap_or_else(|p| p.into_inner());
        let _ = rustix::net::shutdown(&*chan, rustix::net::Shutdown::Both);
    }

    pub fn loaded(&self, digest: &str) -> Option<Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .copied()
    }

    /// Hand the worker an artifact (in a memfd) to load under `digest`.
    pub async fn load(
        &self,
        digest: &str,
        component: bool,
        artifact: &[u8],
        what: &str,
    ) -> Result<Loaded> {
        use std::io::Write;
        let memfd = rustix::fs::memfd_create("wasm-artifact", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| Error::io("memfd for the artifact")(e.into()))?;
        let mut file = std::fs::File::from(memfd);
        file.write_all(artifact)
            .map_err(Error::io("write the artifact"))?;
        let msg = ToWorker::Load {
            digest: digest.to_owned(),
            component,
            what: what.to_owned(),
        };
        match self.call(msg, &[file.as_fd()]).await? {
            Answer::Loaded(l) => {
                self.loaded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(digest.to_owned(), l);
                Ok(l)
            }
            other => Err(self.protocol(&other)),
        }
    }

    /// One request and its answer.
    pub async fn call(&self, msg: ToWorker, fds: &[BorrowedFd<'_>]) -> Result<Answer> {
        if !self.alive() {
            return Err(Error::FailedPrecondition(
                "the wasm worker has ended".into(),
            ));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let sent = {
            let chan = self.chan.lock().unwrap_or_else(|p| p.into_inner());
            ipc::send_json(chan.as_fd(), &Request { id, msg }, fds)
        };
        if let Err(e) = sent {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            self.kill(&e.to_string());
            return Err(Error::Internal(e.to_string()));
        }
        match tokio::time::timeout(ANSWER, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Internal("the wasm worker ended".into())),
            Err(_) => {
                self.kill("no answer within 30 s");
                Err(Error::Internal(
                    "the wasm worker did not answer within 30 s".into(),
                ))
            }
        }
    }

    fn protocol(&self, a: &Answer) -> Error {
        let why = format!("unexpected answer {a:?}");
        self.kill(&why);
        Error::Internal(format!("wasm worker: {why}"))
    }

    fn register(&self, task: &str) -> mpsc::Receiver<TaskEvent> {
        // Exit and OOM come once each; a worker sending more is only dropped.
        let (tx, rx) = mpsc::channel(4);
        if self.alive() {
            self.shared
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(task.to_owned(), tx);
        } else {
            let _ = tx.try_send(TaskEvent::Exited(EXIT_WORKER_GONE));
        }
        rx
    }

    fn forget(&self, task: &str) {
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task);
    }

    pub fn task_count(&self) -> usize {
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.close();
    }
}

/// Map the user namespace a worker started with [`USERNS_FLAG`] has entered: its uid and gid 0
/// become the unprivileged `worker_uid`/`worker_gid`. Returns the namespace, to idmap task
/// roots to. Waits at most [`SEND`] for the worker to say it is in the namespace.
fn map_user_namespace(
    chan: &OwnedFd,
    pid: u32,
    pidfd: Option<&OwnedFd>,
    options: &Options,
) -> Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    let what = "the wasm worker's user namespace";
    set_socket_timeout(chan, Timeout::Recv, Some(SEND)).map_err(|e| Error::io(what)(e.into()))?;
    match ipc::recv(chan.as_fd(), USERNS_READY.len()) {
        Ok(Some(f)) if f.body == USERNS_READY && f.fds.is_empty() && !f.truncated => {}
        Ok(_) => {
            return Err(Error::Internal(format!(
                "{what}: the worker did not enter it"
            )));
        }
        Err(e) => return Err(Error::Internal(format!("{what}: {e}"))),
    }
    set_socket_timeout(chan, Timeout::Recv, None).map_err(|e| Error::io(what)(e.into()))?;
    // Everything through one descriptor of the worker's /proc directory, checked below to be
    // the worker's (not a reused pid's).
    let proc = rustix::fs::open(
        format!("/proc/{pid}"),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(what)(e.into()))?;
    for (file, id) in [
        ("uid_map", options.worker_uid),
        ("gid_map", options.worker_gid),
    ] {
        let map = rustix::fs::openat(&proc, file, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::io(format!("{what}: open {file}"))(e.into()))?;
        rustix::io::write(&map, format!("0 {id} 1\n").as_bytes())
            .map_err(|e| Error::io(format!("{what}: write {file} (0 {id} 1)"))(e.into()))?;
    }
    let ns = rustix::fs::openat(
        &proc,
        "ns/user",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("{what}: open ns/user"))(e.into()))?;
    // A pidfd turns readable when its process exits: still alive now, so alive when `proc` was
    // opened, so `proc` was the worker's.
    if let Some(fd) = pidfd {
        let mut poll = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        let exited = rustix::event::poll(&mut poll, Some(&rustix::event::Timespec::default()))
            .map_err(|e| Error::io(what)(e.into()))?;
        if exited > 0 {
            return Err(Error::Internal(format!("{what}: the worker exited")));
        }
    }
    Ok(ns)
}

/// The reader thread: answers to their requests, events to their tasks.
fn read(chan: OwnedFd, shared: &Shared) {
    loop {
        let frame = match ipc::recv(chan.as_fd(), ipc::MAX_EVENT) {
            Ok(Some(f)) => f,
            Ok(None) => return shared.gone("end of its channel"),
            Err(e) => return shared.gone(&e.to_string()),
        };
        if !frame.fds.is_empty() || frame.truncated {
            return shared.gone("it sent file descriptors");
        }
        let msg: FromWorker = match serde_json::from_slice(&frame.body) {
            Ok(m) => m,
            Err(e) => return shared.gone(&format!("malformed message: {e}")),
        };
        match msg {
            FromWorker::Reply { id, result } => {
                let tx = shared
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                match tx {
                    Some(tx) => {
                        let _ = tx.send(result.map_err(Error::from));
                    }
                    None => return shared.gone(&format!("an answer to no request ({id})")),
                }
            }
            FromWorker::Exited { task, status } => {
                send_event(shared, &task, TaskEvent::Exited(status))
            }
            FromWorker::Oom { task } => send_event(shared, &task, TaskEvent::Oom),
        }
    }
}

fn send_event(shared: &Shared, task: &str, ev: TaskEvent) {
    if let Some(tx) = shared
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(task)
    {
        let _ = tx.try_send(ev);
    }
}

/// Relay the worker's log lines into the shim's log.
fn relay_log(pipe: OwnedFd, pid: u32) {
    let mut r = BufReader::new(std::fs::File::from(pipe));
    let mut line = Vec::new();
    loop {
        line.clear();
        match r
            .by_ref()
            .take(LOG_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if !text.is_empty() {
                    tracing::info!(worker = pid, "{text}");
                }
            }
        }
    }
}

/// What the parent keeps of a task.
pub struct RemoteParts {
    pub id: String,
    pub worker: Arc<Worker>,
    pub loaded: Loaded,
    pub listen: SocketAddr,
    /// The pod's network namespace, where the listener is bound (`None`: the shim's).
    pub netns: Option<PathBuf>,
    pub bundle: PathBuf,
    pub mounted: bool,
    pub stdin_closer: StdinCloser,
    pub console: Option<ConsoleCopy>,
}

/// A task whose guest runs in the worker.
pub struct RemoteTask {
    pub id: String,
    pub worker: Arc<Worker>,
    pub loaded: Loaded,
    pub listen: SocketAddr,
    pub netns: Option<PathBuf>,
    pub bundle: PathBuf,
    pub mounted: bool,
    pub stdin_closer: StdinCloser,
    pub console: ConsoleSlot,
    exit: watch::Sender<Option<Exit>>,
    started: AtomicBool,
}

impl RemoteTask {
    /// The parent's half of a task, registered for the worker's events before the worker
    /// creates it; `events` publishes its OOM.
    pub fn new(p: RemoteParts, events: Publisher) -> Arc<RemoteTask> {
        let rx = p.worker.register(&p.id);
        let task = Arc::new(RemoteTask {
            id: p.id,
            worker: p.worker,
            loaded: p.loaded,
            listen: p.listen,
            netns: p.netns,
            bundle: p.bundle,
            mounted: p.mounted,
            stdin_closer: p.stdin_closer,
            console: ConsoleSlot::new(p.console),
            exit: watch::channel(None).0,
            started: AtomicBool::new(false),
        });
        tokio::spawn(task.clone().events(rx, events));
        task
    }

    async fn events(self: Arc<Self>, mut rx: mpsc::Receiver<TaskEvent>, events: Publisher) {
        let mut oom_told = false;
        while let Some(ev) = rx.recv().await {
            match ev {
                TaskEvent::Oom if !oom_told => {
                    oom_told = true;
                    events.oom(&self.id);
                }
                TaskEvent::Oom => {}
                TaskEvent::Exited(status) => {
                    self.finish(status).await;
                    return;
                }
            }
        }
    }

    /// The guest's output is closed (the worker closed its copies before telling); with a
    /// terminal, let the copy drain, then the exit stands.
    async fn finish(&self, status: u32) {
        self.console.drain_at_exit().await;
        self.stdin_closer.close_now();
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(Exit::now(status));
                true
            } else {
                false
            }
        });
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Create failed: stop listening for this task's events.
    pub fn abandon(&self) {
        self.worker.forget(&self.id);
    }

    async fn call(&self, msg: ToWorker) -> Result<Answer> {
        self.worker.call(msg, &[]).await
    }
}

#[async_trait]
impl Process for RemoteTask {
    fn pid(&self) -> u32 {
        if self.started.load(Ordering::SeqCst) {
            std::process::id()
        } else {
            0
        }
    }

    async fn start(&self) -> Result<u32> {
        // The parent binds: the address was checked at Create, and the worker may not make
        // sockets.
        let listener = match self.loaded {
            Loaded::Http => Some(OwnedFd::from(
                crate::sys::listen_in(self.netns.as_deref(), self.listen).map_err(|e| {
                    let netns = match &self.netns {
                        Some(p) => format!(" in the network namespace {}", p.display()),
                        None => String::new(),
                    };
                    Error::FailedPrecondition(format!(
                        "http listen address {}{netns}: {e}",
                        self.listen
                    ))
                })?,
            )),
            _ => None,
        };
        let fds: Vec<BorrowedFd<'_>> = listener.iter().map(AsFd::as_fd).collect();
        self.worker
            .call(
                ToWorker::Start {
                    task: self.id.clone(),
                },
                &fds,
            )
            .await?;
        self.started.store(true, Ordering::SeqCst);
        Ok(std::process::id())
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        let v = rx.wait_for(Option::is_some).await.map(|v| *v);
        match v {
            Ok(v) => v.unwrap_or_else(|| Exit::now(255)),
            Err(_) => std::future::pending().await,
        }
    }

    async fn kill(&self, signal: u32) -> Result<()> {
        if self.exited() {
            return Err(Error::NotFound("process already finished".into()));
        }
        self.call(ToWorker::Kill {
            task: self.id.clone(),
            signal,
        })
        .await
        .map(drop)
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        self.console.resize(width, height).unwrap_or(Ok(()))
    }

    async fn close_stdin(&self) -> Result<()> {
        self.stdin_closer.close();
        self.console.close_stdin();
        Ok(())
    }
}

/// The kit's container for a Wasm task.
pub struct RemoteContainer {
    pub task: Arc<RemoteTask>,
}

#[async_trait]
impl Container for RemoteContainer {
    fn init(&self) -> Arc<dyn Process> {
        self.task.clone()
    }

    async fn exec(&self, _req: ExecRequest) -> Result<Arc<dyn Process>> {
        Err(Error::Unimplemented(
            "Exec is not supported by the Wasm runtime: a Wasm task is one instance with no \
             process to join; start another task instead"
                .into(),
        ))
    }

    async fn kill_all(&self, signal: u32) -> Result<()> {
        match self.task.kill(signal).await {
            Err(Error::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(
            if self.task.started.load(Ordering::SeqCst) && !self.task.exited() {
                vec![ProcessInfo {
                    pid: std::process::id(),
                }]
            } else {
                Vec::new()
            },
        )
    }

    async fn pause(&self) -> Result<()> {
        self.task
            .call(ToWorker::Pause {
                task: self.task.id.clone(),
            })
            .await
            .map(drop)
    }

    async fn resume(&self) -> Result<()> {
        self.task
            .call(ToWorker::Resume {
                task: self.task.id.clone(),
            })
            .await
            .map(drop)
    }

    async fn update(&self, resources: &Any) -> Result<()> {
        let r: oci_spec::runtime::LinuxResources =
            yard_shim_kit::bundle::parse_json(&resources.value, "resources")?;
        if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
            let memory_limit = if limit < 0 { 0 } else { limit.unsigned_abs() };
            self.task
                .call(ToWorker::Update {
                    task: self.task.id.clone(),
                    memory_limit,
                })
                .await?;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Any> {
        use yard_shim_kit::protos::cgroups::metrics as v1;
        use yard_shim_kit::protos::protobuf::MessageField;
        let (used, limit) = match self
            .task
            .call(ToWorker::Stats {
                task: self.task.id.clone(),
            })
            .await?
        {
            Answer::Stats { used, limit } => (used, limit),
            other => return Err(self.task.worker.protocol(&other)),
        };
        let limit = if limit == 0 { u64::MAX } else { limit };
        let running = !self.task.exited() && self.task.started.load(Ordering::SeqCst);
        let m = v1::Metrics {
            memory: MessageField::some(v1::MemoryStat {
                usage: MessageField::some(v1::MemoryEntry {
                    usage: used,
                    limit,
                    ..Default::default()
                }),
                rss: used,
                ..Default::default()
            }),
            pids: MessageField::some(v1::PidsStat {
                current: u64::from(running),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(Any {
            type_url: "io.containerd.cgroups.v1.Metrics".to_owned(),
            value: m
                .write_to_bytes()
                .map_err(|e| Error::Internal(format!("encode metrics: {e}")))?,
            ..Default::default()
        })
    }

    async fn delete(&self, force: bool) -> Result<()> {
        let t = &self.task;
        if t.started.load(Ordering::SeqCst) && !t.exited() && !force {
            return Err(Error::FailedPrecondition(
                "task is running: kill it first".into(),
            ));
        }
        // The worker kills a guest still running and waits for it (bounded); a worker that is
        // gone has nothing left to delete.
        match t.call(ToWorker::Delete { task: t.id.clone() }).await {
            Ok(_) | Err(Error::FailedPrecondition(_)) | Err(Error::NotFound(_)) => {}
            Err(e) => tracing::warn!(id = %t.id, error = %e, "wasm worker delete"),
        }
        // The exit the worker sent before its answer may still be on its way.
        if t.started.load(Ordering::SeqCst) && !t.exited() {
            let _ = tokio::time::timeout(Duration::from_secs(3), t.wait()).await;
            if !t.exited() {
                t.finish(128 + 9).await;
            }
        }
        t.stdin_closer.close_now();
        t.worker.forget(&t.id);
        {
            let mut placement = t.worker.placement.lock().unwrap_or_else(|p| p.into_inner());
            placement.remove(&t.id);
            if t.worker.alive()
                && let Err(e) = placement.place(t.worker.pid)
            {
                tracing::warn!(error = %e, "wasm worker cgroup");
            }
        }
        if t.mounted {
            yard_shim_kit::bundle::unmount_rootfs(&t.bundle);
        }
        tracing::debug!(id = %t.id, left = t.worker.task_count(), "wasm task deleted");
        Ok(())
    }
}
