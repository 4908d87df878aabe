//! Containers and their processes: the agent's state and every operation the host asks for, as
//! typed `async fn`s (`service.rs` only adapts them to ttrpc).
//!
//! Create and exec fork through the runtime helper (`runtime.rs`); start, delete and everything
//! that goes through the cgroup run in the agent. Process exits come from the reaper.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use yard_agent_protocol::{CreateContainerRequest, ExecProcessRequest};

use crate::cgroup::{Cgroup, Stats};
use crate::error::{Error, Result};
use crate::reaper::{self, Reaper, Status};
use crate::stdio::{self, ChildPipes, Fd, Io, Slot};
use crate::storage::{self, Image, Mounter, Rootfs};
use crate::{runtime, spec, volumes};

/// How long one runtime helper (create, exec) may take.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the pty master may take to arrive once the runtime is done.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often WaitOom looks at the containers' `memory.events` (the guest kernel has no
/// inotify).
const OOM_POLL: Duration = Duration::from_millis(200);

/// Guest-wide settings decided at boot.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub debug: bool,
    /// The kernel has cgroup CPU bandwidth control (cpu.max).
    pub cpu_bandwidth: bool,
    /// Starts runtime mode by a fork instead of an exec (see `zygote.rs`).
    pub zygote: Option<Arc<crate::zygote::Zygote>>,
}

pub struct Agent {
    settings: Settings,
    reaper: Arc<Reaper>,
    mounter: Arc<dyn Mounter>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created or removed (not in `containers` yet, or anymore).
    busy: Mutex<HashSet<String>>,
    share_mounted: tokio::sync::Mutex<bool>,
    volumes_mounted: tokio::sync::Mutex<bool>,
    pod_shm_mounted: tokio::sync::Mutex<bool>,
    /// Names console sockets (their paths must fit `sun_path` whatever the ids' length).
    consoles: AtomicU64,
    oom_poll: tokio::sync::Mutex<()>,
}

pub struct Container {
    id: String,
    rootfs: Rootfs,
    cgroup: Cgroup,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    oom_seen: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Starting,
    Running,
}

pub struct Process {
    exec_id: String,
    /// 0 until known.
    pid: AtomicU32,
    state: Mutex<State>,
    exit: Arc<watch::Sender<Option<Status>>>,
    io: Slot,
    terminal: bool,
    /// An exec's pipes (the process's ends) until it starts.
    pending: Mutex<Option<ChildPipes>>,
    /// An exec's `process` JSON (rewritten for the guest).
    spec: Vec<u8>,
    /// CloseStdin came before a terminal exec had its pty.
    stdin_closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Process {
    fn new(exec_id: &str, terminal: bool, spec: Vec<u8>) -> Process {
        Process {
            exec_id: exec_id.to_owned(),
            pid: AtomicU32::new(0),
            state: Mutex::new(State::Created),
            exit: Arc::new(watch::channel(None).0),
            io: Slot::default(),
            terminal,
            pending: Mutex::new(None),
            spec,
            stdin_closed: AtomicBool::new(false),
        }
    }

    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    fn exited(&self) -> Option<Status> {
        *self.exit.borrow()
    }

    /// The host may wait and read before a process starts; make sure no such call waits forever
    /// once the process is gone for good.
    fn abandon(&self) {
        // The process's ends of an exec's pipes that never started: readers see end-of-file.
        lock(&self.pending).take();
        if !self.io.is_set() {
            self.io.set(Io::closed());
        }
        if self.exited().is_none() {
            // Never started, or its exit was not seen before its container went away.
            self.exit.send_replace(Some(255));
        }
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let sig = to_signal(signal)?;
        let pid = self.pid();
        if pid == 0 {
            return Err(Error::FailedPrecondition("process has not started".into()));
        }
        if self.exited().is_some() {
            return Err(Error::NotFound(format!("process {pid} has exited")));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).map_err(|e| {
            if e == nix::errno::Errno::ESRCH {
                Error::NotFound(format!("process {pid} has exited"))
            } else {
                Error::errno(format!("kill {pid}"))(e)
            }
        })
    }

    fn set_io(&self, io: Io) {
        let io = Arc::new(io);
        self.io.set_arc(io.clone());
        if self.stdin_closed.load(Ordering::SeqCst) {
            tokio::spawn(async move { io.close_stdin().await });
        }
    }
}

fn to_signal(signal: i32) -> Result<nix::sys::signal::Signal> {
    nix::sys::signal::Signal::try_from(signal)
        .map_err(|_| Error::InvalidArgument(format!("signal: {signal} is not a signal")))
}

/// Container and exec ids become path components and cgroup names: containerd's identifier
/// rule, the same the shims check before they get here.
fn check_id(field: &'static str, id: &str) -> Result<()> {
    switchyard_base::ident::check(field, id).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// Frees a reserved id when an operation ends, however it ends.
struct Reservation<'a> {
    agent: &'a Agent,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.agent.busy).remove(&self.id);
    }
}

/// Undoes a half-created container when creation fails.
struct CreateGuard<'a> {
    agent: &'a Agent,
    id: String,
    rootfs: Option<Rootfs>,
}

impl CreateGuard<'_> {
    fn disarm(mut self) {
        self.rootfs = None;
    }
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        let Some(rootfs) = self.rootfs.take() else {
            return;
        };
        delete_state(&self.id);
        storage::release(self.agent.mounter.as_ref(), &rootfs);
    }
}

/// libcontainer's delete: kills what is left, removes the cgroup and the state. No fork.
fn delete_state(id: &str) {
    let dir = Path::new(runtime::STATE_ROOT).join(id);
    if !dir.exists() {
        return;
    }
    match libcontainer::container::Container::load(dir.clone()) {
        Ok(mut c) => {
            if let Err(e) = c.delete(true) {
                tracing::warn!(container_id = id, error = %crate::error::chain(&e), "libcontainer delete");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Mounts something once per guest, under `flag`.
async fn ensure(
    flag: &tokio::sync::Mutex<bool>,
    m: Arc<dyn Mounter>,
    mount: fn(&dyn Mounter) -> Result<()>,
) -> Result<()> {
    let mut mounted = flag.lock().await;
    if !*mounted {
        blocking(move || mount(m.as_ref())).await?;
        *mounted = true;
    }
    Ok(())
}

/// Console sockets' directory.
const CONSOLES: &str = "/run/yard/pty";

/// Where the pty master of a terminal process arrives.
struct ConsoleSocket {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl ConsoleSocket {
    fn bind(path: PathBuf) -> Result<ConsoleSocket> {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(Error::io(format!("bind {}", path.display())))?;
        Ok(ConsoleSocket { path, listener })
    }

    /// Accepts the runtime's connection and takes the pty master it sends.
    async fn receive(self) -> std::io::Result<std::os::fd::OwnedFd> {
        let (stream, _) = self.listener.accept().await?;
        loop {
            stream.readable().await?;
            match stream.try_io(tokio::io::Interest::READABLE, || recv_fd(&stream)) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn recv_fd(sock: &tokio::net::UnixStream) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut buf = [0u8; 256];
    let r = rustix::net::recvmsg(
        sock,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg
            && let Some(fd) = fds.next()
        {
            return Ok(fd);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "the console message ({} bytes) carries no descriptor",
            r.bytes
        ),
    ))
}

impl Agent {
    pub fn new(settings: Settings, reaper: Arc<Reaper>, mounter: Arc<dyn Mounter>) -> Agent {
        Agent {
            settings,
            reaper,
            mounter,
            containers: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            share_mounted: tokio::sync::Mutex::new(false),
            volumes_mounted: tokio::sync::Mutex::new(false),
            pod_shm_mounted: tokio::sync::Mutex::new(false),
            consoles: AtomicU64::new(0),
            oom_poll: tokio::sync::Mutex::new(()),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        Ok((c, p))
    }

    fn reserve(&self, id: &str) -> Result<Reservation<'_>> {
        let containers = lock(&self.containers);
        let mut busy = lock(&self.busy);
        if containers.contains_key(id) || busy.contains(id) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        busy.insert(id.to_owned());
        Ok(Reservation {
            agent: self,
            id: id.to_owned(),
        })
    }

    async fn ensure_share(&self) -> Result<()> {
        ensure(
            &self.share_mounted,
            self.mounter.clone(),
            storage::mount_share,
        )
        .await
    }

    /// Mounts what the container's volumes need (each once per guest), checks the copies are
    /// there and makes the pod's directories.
    async fn ensure_volumes(&self, needs: volumes::Needs) -> Result<()> {
        if needs.share {
            ensure(
                &self.volumes_mounted,
                self.mounter.clone(),
                storage::mount_volumes,
            )
            .await?;
        }
        if needs.pod_shm {
            ensure(
                &self.pod_shm_mounted,
                self.mounter.clone(),
                storage::mount_pod_shm,
            )
            .await?;
        }
        if !needs.copies.is_empty() || !needs.pod_dirs.is_empty() {
            blocking(move || needs.prepare()).await?;
        }
        Ok(())
    }

    /// `WriteFile`: a copy of a host file (or its removal), for backends without a shared
    /// filesystem.
    pub async fn write_file(&self, req: yard_agent_protocol::WriteFileRequest) -> Result<()> {
        blocking(move || volumes::write_copy(Path::new(yard_agent_protocol::COPY_DIR), &req)).await
    }

    /// `WriteDir`: a copy of a small host directory.
    pub async fn write_dir(&self, req: yard_agent_protocol::WriteDirRequest) -> Result<()> {
        blocking(move || volumes::write_tree(Path::new(yard_agent_protocol::COPY_DIR), &req)).await
    }

    /// A console socket at a short path: ids are up to 76 bytes each, and
    /// `/run/yard/c/<id>/exec-<exec id>.sock` would not fit a socket address.
    fn console_socket(&self) -> Result<ConsoleSocket> {
        let dir = Path::new(CONSOLES);
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {CONSOLES}")))?;
        let n = self.consoles.fetch_add(1, Ordering::SeqCst);
        ConsoleSocket::bind(dir.join(format!("{n}.sock")))
    }

    pub async fn create(&self, req: CreateContainerRequest) -> Result<()> {
        let id = req.container_id.clone();
        check_id("container_id", &id)?;
        let image = Image::from_request(req.storage.as_ref())?;
        let mut parsed = spec::parse(&req.spec)?;
        let needs = volumes::apply(&mut parsed, &req.volumes)?;
        let _reservation = self.reserve(&id)?;
        if matches!(image.source, storage::Source::SharedFile(_)) {
            self.ensure_share().await?;
        }
        self.ensure_volumes(needs).await?;
        let rootfs = {
            let (m, id, image) = (self.mounter.clone(), id.clone(), image.clone());
            blocking(move || storage::prepare(m.as_ref(), &id, &image)).await?
        };
        let guard = CreateGuard {
            agent: self,
            id: id.clone(),
            rootfs: Some(rootfs.clone()),
        };
        let guest = spec::for_guest(parsed, &id, &rootfs.rootfs, self.settings.cpu_bandwidth)?;
        spec::apply_net_sysctls(&guest.net_sysctls)?;
        let config = rootfs.dir.join("config.json");
        let bytes = serde_json::to_vec(&guest.spec)
            .map_err(|e| Error::Internal(format!("serialise config.json: {e}")))?;
        std::fs::write(&config, bytes).map_err(Error::io(format!("write {}", config.display())))?;

        let pid_file = rootfs.dir.join("init.pid");
        let log = rootfs.dir.join("init.log");
        let bundle = rootfs.dir.display().to_string();
        let mut args = vec![
            "create".to_owned(),
            "--bundle".to_owned(),
            bundle,
            "--pid-file".to_owned(),
            pid_file.display().to_string(),
        ];
        let init = Arc::new(Process::new("", guest.terminal, Vec::new()));
        if guest.terminal {
            let console = self.console_socket()?;
            args.extend([
                "--console-socket".to_owned(),
                console.path.display().to_string(),
            ]);
            args.push(id.clone());
            let master = self.run_with_console(args, console, &log).await?;
            init.set_io(Io::pty(master));
        } else {
            let (io, child) = stdio::pipes(req.stdin)?;
            args.push(id.clone());
            self.run_runtime(args, Some(child), &log).await?;
            init.set_io(io);
        }
        let pid = read_pid(&pid_file)?;
        init.pid.store(pid, Ordering::SeqCst);
        self.reaper.watch(pid, init.exit.clone());
        let cgroup = Cgroup::new(&guest.cgroups_path);
        let container = Arc::new(Container {
            id: id.clone(),
            oom_seen: AtomicU64::new(cgroup.oom_kills()),
            rootfs,
            cgroup,
            init,
            execs: Mutex::new(HashMap::new()),
        });
        lock(&self.containers).insert(id.clone(), container);
        guard.disarm();
        tracing::debug!(container_id = id, pid, "created");
        Ok(())
    }

    /// Runs the runtime helper with a console socket and returns the pty master it sent.
    async fn run_with_console(
        &self,
        args: Vec<String>,
        console: ConsoleSocket,
        log: &Path,
    ) -> Result<Fd> {
        let receiver = tokio::spawn(console.receive());
        if let Err(e) = self.run_runtime(args, None, log).await {
            receiver.abort();
            return Err(e);
        }
        let master = match tokio::time::timeout(CONSOLE_TIMEOUT, receiver).await {
            Ok(Ok(Ok(fd))) => fd,
            Ok(Ok(Err(e))) => return Err(Error::io("receive the pty master")(e)),
            Ok(Err(e)) => return Err(Error::Internal(format!("console receiver: {e}"))),
            Err(_) => {
                return Err(Error::Internal(
                    "the runtime sent no pty master on the console socket".into(),
                ));
            }
        };
        Fd::new(master).map_err(Error::io("pty master"))
    }

    /// Runs `yard-agent runtime ARGS` and waits for it; its errors come back from `log`.
    async fn run_runtime(
        &self,
        args: Vec<String>,
        stdio: Option<ChildPipes>,
        log: &Path,
    ) -> Result<()> {
        let mut full = vec![
            runtime::MODE.to_owned(),
            "--log".to_owned(),
            log.display().to_string(),
        ];
        if self.settings.debug {
            full.push("--debug".to_owned());
        }
        full.extend(args.iter().cloned());
        let stdio = match stdio {
            Some(p) => [p.stdin.map_or_else(|| null(false), Ok)?, p.stdout, p.stderr],
            None => [null(false)?, null(true)?, null(true)?],
        };
        let zygote = match &self.settings.zygote {
            Some(z) => match tokio::time::timeout(RUNTIME_TIMEOUT, z.spawn(&full, &stdio)).await {
                Ok(Ok(started)) => Some(started),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "runtime zygote: executing the agent instead");
                    None
                }
                Err(_) => {
                    // Not asked again: each later request would wait as long.
                    z.forsake();
                    return Err(Error::Internal(format!(
                        "runtime zygote: no process in {}s",
                        RUNTIME_TIMEOUT.as_secs()
                    )));
                }
            },
            None => None,
        };
        // The process's ends of its pipes: the agent must not keep them, or the host would
        // never see end-of-file.
        let (pid, exit) = match zygote {
            Some(started) => {
                drop(stdio);
                (started.pid, RuntimeExit::Zygote(started))
            }
            None => {
                let mut cmd = Command::new("/proc/self/exe");
                let [stdin, stdout, stderr] = stdio;
                cmd.args(&full)
                    .env_clear()
                    .current_dir("/")
                    .stdin(stdin)
                    .stdout(stdout)
                    .stderr(stderr);
                let spawned = self.reaper.spawn(&mut cmd);
                drop(cmd);
                let (pid, exit) = spawned.map_err(Error::io("start the runtime"))?;
                (pid, RuntimeExit::Reaped(exit))
            }
        };
        let what = args.first().cloned().unwrap_or_default();
        let status = match tokio::time::timeout(RUNTIME_TIMEOUT, exit.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(why)) => return Err(Error::Internal(format!("runtime {what}: {why}"))),
            Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(Error::Internal(format!(
                    "runtime {what}: no answer in {}s",
                    RUNTIME_TIMEOUT.as_secs()
                )));
            }
        };
        if status == 0 {
            return Ok(());
        }
        if self.settings.debug {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            tracing::debug!(command = what, status, "runtime log:\n{}", text.trim_end());
        }
        let message = runtime::last_error(log).unwrap_or_else(|| format!("exit status {status}"));
        if status == runtime::EXIT_INVALID as u32 {
            Err(Error::InvalidArgument(format!("{what}: {message}")))
        } else {
            Err(Error::Internal(format!("{what}: {message}")))
        }
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (c, p) = self.process(id, exec_id)?;
        {
            let mut state = lock(&p.state);
            if *state != State::Created {
                return Err(Error::FailedPrecondition(format!(
                    "process {id}/{exec_id} was started already"
                )));
            }
            if !exec_id.is_empty()
                && (c.init.exited().is_some() || c.init_state() != State::Running)
            {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            *state = State::Starting;
        }
        let result = if exec_id.is_empty() {
            self.start_init(&c).await
        } else {
            self.start_exec(&c, &p).await
        };
        match result {
            Ok(pid) => {
                *lock(&p.state) = State::Running;
                tracing::debug!(container_id = id, exec_id, pid, "started");
                Ok(pid)
            }
            Err(e) => {
                if exec_id.is_empty() {
                    *lock(&p.state) = State::Created;
                } else {
                    // A failed exec is gone: the host may create it again.
                    lock(&c.execs).remove(exec_id);
                    p.abandon();
                }
                Err(e)
            }
        }
    }

    async fn start_init(&self, c: &Container) -> Result<u32> {
        let dir = Path::new(runtime::STATE_ROOT).join(&c.id);
        let id = c.id.clone();
        blocking(move || {
            let mut lc = libcontainer::container::Container::load(dir).map_err(|e| {
                Error::NotFound(format!("container {id}: {}", crate::error::chain(&e)))
            })?;
            lc.start()
                .map_err(|e| Error::Internal(format!("start {id}: {}", crate::error::chain(&e))))
        })
        .await?;
        Ok(c.init.pid())
    }

    async fn start_exec(&self, c: &Container, p: &Arc<Process>) -> Result<u32> {
        let base = c.rootfs.dir.join(format!("exec-{}", p.exec_id));
        let spec_path = base.with_extension("json");
        let pid_file = base.with_extension("pid");
        let log = base.with_extension("log");
        std::fs::write(&spec_path, &p.spec)
            .map_err(Error::io(format!("write {}", spec_path.display())))?;
        let mut args = vec![
            "exec".to_owned(),
            "--process".to_owned(),
            spec_path.display().to_string(),
            "--pid-file".to_owned(),
            pid_file.display().to_string(),
        ];
        let result = if p.terminal {
            let console = self.console_socket()?;
            args.extend([
                "--console-socket".to_owned(),
                console.path.display().to_string(),
            ]);
            args.push(c.id.clone());
            match self.run_with_console(args, console, &log).await {
                Ok(master) => {
                    p.set_io(Io::pty(master));
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            let pipes = lock(&p.pending).take();
            args.push(c.id.clone());
            self.run_runtime(args, pipes, &log).await
        };
        let _ = std::fs::remove_file(&spec_path);
        result?;
        let pid = read_pid(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(&log);
        p.pid.store(pid, Ordering::SeqCst);
        self.reaper.watch(pid, p.exit.clone());
        Ok(pid)
    }

    pub async fn exec(&self, req: ExecProcessRequest) -> Result<()> {
        check_id("exec_id", &req.exec_id)?;
        let c = self.container(&req.container_id)?;
        let process = spec::parse_process(&req.process)?;
        let terminal = process.terminal().unwrap_or(false);
        let json = serde_json::to_vec(&process)
            .map_err(|e| Error::Internal(format!("serialise the process: {e}")))?;
        let p = Arc::new(Process::new(&req.exec_id, terminal, json));
        if !terminal {
            let (io, child) = stdio::pipes(req.stdin)?;
            p.set_io(io);
            *lock(&p.pending) = Some(child);
        }
        let mut execs = lock(&c.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} in container {}",
                req.exec_id, req.container_id
            )));
        }
        execs.insert(req.exec_id.clone(), p);
        Ok(())
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let signal = i32::try_from(signal)
            .map_err(|_| Error::InvalidArgument(format!("signal: {signal} is not a signal")))?;
        let (c, p) = self.process(id, exec_id)?;
        if all {
            to_signal(signal)?;
            return c.cgroup.kill_all(signal);
        }
        p.signal(signal)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Status> {
        let (_c, p) = self.process(id, exec_id)?;
        let rx = p.exit.subscribe();
        reaper::wait(rx)
            .await
            .ok_or_else(|| Error::Internal("the process's exit was lost".into()))
    }

    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        len: u32,
        stderr: bool,
    ) -> Result<(Vec<u8>, bool)> {
        let (_c, p) = self.process(id, exec_id)?;
        let io = p.io.get().await;
        let len = if len == 0 { 64 * 1024 } else { len as usize };
        if stderr {
            io.stderr.read(len).await
        } else {
            io.stdout.read(len).await
        }
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let (_c, p) = self.process(id, exec_id)?;
        let io = p.io.get().await;
        io.write_stdin(data).await
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let (_c, p) = self.process(id, exec_id)?;
        p.stdin_closed.store(true, Ordering::SeqCst);
        if let Some(io) = p.io.now() {
            io.close_stdin().await;
        }
        Ok(())
    }

    pub async fn resize(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let (_c, p) = self.process(id, exec_id)?;
        match p.io.now() {
            Some(io) => io.resize(width, height),
            None => Err(Error::FailedPrecondition(
                "the process has not started".into(),
            )),
        }
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.container(id)?.cgroup.pids()
    }

    pub async fn stats(&self, id: &str) -> Result<Stats> {
        self.container(id)?.cgroup.stats()
    }

    pub async fn pause(&self, id: &str, frozen: bool) -> Result<()> {
        let c = self.container(id)?;
        if c.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {id} has stopped"
            )));
        }
        c.cgroup.freeze(frozen).await
    }

    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        self.container(id)?
            .cgroup
            .update(resources, self.settings.cpu_bandwidth)
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let _reservation = {
            let mut busy = lock(&self.busy);
            if !busy.insert(id.to_owned()) {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is being removed"
                )));
            }
            Reservation {
                agent: self,
                id: id.to_owned(),
            }
        };
        // A frozen cgroup would keep its processes from dying.
        let _ = c.cgroup.freeze(false).await;
        if let Err(e) = c.cgroup.kill_all(libc::SIGKILL) {
            tracing::warn!(container_id = id, error = %e, "kill");
        }
        if !c.cgroup.wait_empty(Duration::from_secs(5)).await {
            tracing::warn!(container_id = id, "processes left after SIGKILL");
        }
        // Let the reaper report the last exits before the processes are forgotten.
        for p in c.processes() {
            if p.pid() != 0 && p.exited().is_none() {
                let rx = p.exit.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(1), reaper::wait(rx)).await;
            }
        }
        let (m, rootfs, cid) = (self.mounter.clone(), c.rootfs.clone(), id.to_owned());
        blocking(move || {
            delete_state(&cid);
            storage::release(m.as_ref(), &rootfs);
            Ok(())
        })
        .await?;
        for p in c.processes() {
            if p.pid() != 0 {
                self.reaper.forget(p.pid());
            }
            p.abandon();
        }
        lock(&self.containers).remove(id);
        tracing::debug!(container_id = id, "removed");
        Ok(())
    }

    /// The next container whose `memory.events` counts a new OOM kill.
    pub async fn wait_oom(&self) -> String {
        let _one_poller = self.oom_poll.lock().await;
        loop {
            let containers: Vec<Arc<Container>> =
                lock(&self.containers).values().cloned().collect();
            for c in containers {
                let n = c.cgroup.oom_kills();
                if n > c.oom_seen.load(Ordering::SeqCst) {
                    c.oom_seen.store(n, Ordering::SeqCst);
                    return c.id.clone();
                }
            }
            tokio::time::sleep(OOM_POLL).await;
        }
    }

    /// Kills every container's processes (the guest is about to go away).
    pub fn kill_everything(&self) {
        let containers: Vec<Arc<Container>> = lock(&self.containers).values().cloned().collect();
        for c in containers {
            // cgroup v2 delivers SIGKILL to frozen processes too.
            if let Err(e) = c.cgroup.kill_all(libc::SIGKILL) {
                tracing::warn!(container_id = c.id, error = %e, "kill");
            }
        }
    }
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    fn processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(lock(&self.execs).values().cloned());
        all
    }

    fn init_state(&self) -> State {
        *lock(&self.init.state)
    }
}

fn read_pid(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path)
        .map_err(Error::io(format!("read the pid file {}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("pid file {}: {text:?}", path.display())))
}

/// Runs blocking work (mounts, libcontainer state) off the reactor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}

/// How a runtime process's end is learnt: the reaper (an exec'd agent, our child) or the
/// zygote's reply.
enum RuntimeExit {
    Reaped(watch::Receiver<Option<Status>>),
    Zygote(crate::zygote::Started),
}

impl RuntimeExit {
    async fn wait(self) -> std::result::Result<u32, &'static str> {
        match self {
            RuntimeExit::Reaped(exit) => reaper::wait(exit).await.ok_or("exit lost"),
            RuntimeExit::Zygote(started) => started
                .wait()
                .await
                .ok_or("ended without an exit code (killed?)"),
        }
    }
}

/// `/dev/null`, for a runtime process's stdin (`write` false) or an output.
fn null(write: bool) -> Result<std::os::fd::OwnedFd> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .map(std::os::fd::OwnedFd::from)
        .map_err(Error::io("open /dev/null"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_path_safe() {
        for good in ["c1", "abc-DEF_1.2"] {
            assert!(check_id("container_id", good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ns:id", &"x".repeat(77)] {
            assert!(
                matches!(check_id("container_id", bad), Err(Error::InvalidArgument(m)) if m.starts_with("invalid container_id ")),
                "{bad}"
            );
        }
    }
}
