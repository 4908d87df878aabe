//! The Linux container engine (feature `engine`): containers through an OCI runtime command
//! line. By default that command is the shim's own binary in runtime mode (libcontainer, this
//! crate's [`crate::main`]); with containerd's runc option `BinaryName` it is that binary (e.g.
//! `runc`), which is also the oracle the conformance suite compares against. Everything that
//! needs no fork (signals, freeze, update, stats, OOM) is done here through the container's
//! cgroup.
//!
//! Two shims use it: the native shim for every container, and the wasm shim for the Linux
//! containers of a Wasm pod (its sandbox and sidecars). The guest agent builds this crate
//! without the feature.

mod cgroups;
mod oom;
mod validate;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use yard_shim_kit::protos::protobuf::Message;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::protos::shim::oci::Options as RuncOptions;
use yard_shim_kit::reaper::{self, Mark};
use yard_shim_kit::stdio::{self, ConsoleCopy, ConsoleSlot, ConsoleSocket, StdinCloser, StdioSpec};
use yard_shim_kit::{
    Container, CreateRequest, Engine, Error, ExecRequest, Exit, Process, ProcessInfo, Result,
    Rootfs,
};

use self::cgroups::Cgroup;
use self::oom::OomWatch;
use self::validate as spec;

/// How long a runtime invocation may take before it is killed.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(60);

/// What differs between the shims that run Linux containers.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// The shim binary's name for logs.
    pub name: &'static str,
    /// Where libcontainer keeps container state, per namespace (like runc's
    /// `/run/containerd/runc`); also the runtime mode's default `--root`.
    pub state_root: &'static str,
    /// Whether containerd's runc options (`BinaryName`, `Root`) are honoured. A shim with
    /// options of its own takes none of runc's.
    pub runc_options: bool,
}

/// The native shim's configuration.
pub const NATIVE: Config = Config {
    name: "containerd-shim-yard-native-v1",
    state_root: "/run/yard-native",
    runc_options: true,
};

/// Linux containers through libcontainer (or runc), as the kit's [`Engine`].
#[derive(Debug, Clone, Copy)]
pub struct LinuxEngine {
    config: Config,
}

impl LinuxEngine {
    pub const fn new(config: Config) -> LinuxEngine {
        LinuxEngine { config }
    }

    /// Whether this engine has (or had, before its shim died) a container `id`: its runtime
    /// state or the shim's work directory for it exists.
    pub fn knows(&self, namespace: &str, id: &str) -> bool {
        match Oci::new(&self.config, namespace, None) {
            Ok(oci) => oci.root.join(id).exists() || work_dir(&oci, id).exists(),
            Err(_) => false,
        }
    }
}

/// An OCI runtime command line: ourselves in runtime mode, or an external binary such as runc.
#[derive(Debug, Clone)]
struct Oci {
    binary: PathBuf,
    prefix: Vec<String>,
    root: PathBuf,
    external: bool,
}

impl Oci {
    fn new(config: &Config, namespace: &str, options: Option<&Any>) -> Result<Oci> {
        let opts = match options {
            Some(any)
                if config.runc_options && any.type_url.ends_with("containerd.runc.v1.Options") =>
            {
                Some(RuncOptions::parse_from_bytes(&any.value).map_err(|e| {
                    Error::InvalidArgument(format!("options: not a runc Options message: {e}"))
                })?)
            }
            _ => None,
        };
        let binary_name = opts
            .as_ref()
            .map(|o| o.binary_name.clone())
            .unwrap_or_default();
        let root = opts
            .as_ref()
            .map(|o| o.root.clone())
            .filter(|r| !r.is_empty());
        if binary_name.is_empty() {
            let exe = std::env::current_exe().map_err(Error::io("find the shim's own binary"))?;
            Ok(Oci {
                binary: exe,
                prefix: vec![crate::MODE.to_owned()],
                root: PathBuf::from(root.unwrap_or_else(|| config.state_root.to_owned()))
                    .join(namespace),
                external: false,
            })
        } else {
            let binary = which(&binary_name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "options.BinaryName: {binary_name:?} not found on PATH"
                ))
            })?;
            Ok(Oci {
                binary,
                prefix: Vec::new(),
                root: PathBuf::from(root.unwrap_or_else(|| format!("{}/runc", config.state_root)))
                    .join(namespace),
                external: true,
            })
        }
    }

    fn name(&self) -> String {
        if self.external {
            self.binary.display().to_string()
        } else {
            "libcontainer".to_owned()
        }
    }

    /// Start a created container. With libcontainer this needs no fork: it only signals the
    /// waiting init over its notify socket, so it runs in the shim (on a blocking thread).
    async fn start(&self, id: &str, log: &Path) -> Result<()> {
        if self.external {
            return self.run(&["start", id], None, log).await;
        }
        let dir = self.root.join(id);
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut c = libcontainer::container::Container::load(dir)
                .map_err(|e| Error::NotFound(format!("container {id}: {e}")))?;
            c.start()
                .map_err(|e| Error::Internal(format!("libcontainer start {id}: {e}")))
        })
        .await
        .map_err(|e| Error::Internal(format!("start: {e}")))?
    }

    /// Delete a container's runtime state and cgroup (in the shim for libcontainer: no fork).
    async fn delete(&self, id: &str, force: bool, log: &Path) -> Result<()> {
        if self.external {
            let mut args = vec!["delete"];
            if force {
                args.push("--force");
            }
            args.push(id);
            return self.run(&args, None, log).await;
        }
        let dir = self.root.join(id);
        if !dir.exists() {
            return Ok(());
        }
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut c = match libcontainer::container::Container::load(dir) {
                Ok(c) => c,
                Err(_) => return Ok(()),
            };
            c.delete(force)
                .map_err(|e| Error::Internal(format!("libcontainer delete {id}: {e}")))
        })
        .await
        .map_err(|e| Error::Internal(format!("delete: {e}")))?
    }

    /// Run one runtime command with the given stdio; its errors come back from the log file.
    async fn run(
        &self,
        args: &[&str],
        stdio: Option<(File, File, File)>,
        log: &Path,
    ) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.prefix)
            .arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(log);
        if self.external {
            cmd.args(["--log-format", "json"]);
        }
        cmd.args(args);
        // The runtime's children become the container's processes, which start with the
        // umask runc gives them, not the shim's.
        yard_shim_kit::sys::child_umask(&mut cmd, yard_shim_kit::sys::WORKLOAD_UMASK);
        match stdio {
            Some((i, o, e)) => cmd.stdin(i).stdout(o).stderr(e),
            None => cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        };
        let reaper = reaper::global();
        let since = reaper.mark();
        let child = cmd
            .spawn()
            .map_err(Error::io(format!("run {}", self.binary.display())))?;
        drop(cmd);
        let pid = child.id();
        // The reaper owns waitpid; the std handle is only dropped.
        drop(child);
        let pidfd = reaper.pidfd(pid, since);
        let exit = match tokio::time::timeout(RUNTIME_TIMEOUT, reaper.wait(pid, since)).await {
            Ok(exit) => exit,
            Err(_) => {
                if let Some(fd) = &pidfd {
                    let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
                }
                return Err(Error::Internal(format!(
                    "{} {} did not finish in {}s",
                    self.name(),
                    args.first().copied().unwrap_or(""),
                    RUNTIME_TIMEOUT.as_secs()
                )));
            }
        };
        if exit.status == 0 {
            return Ok(());
        }
        // Our runtime mode's log and runc's (`--log-format json`) end with the same record.
        let message =
            crate::last_error(log).unwrap_or_else(|| format!("exit status {}", exit.status));
        let what = format!("{} {}", self.name(), args.first().copied().unwrap_or(""));
        if !self.external && exit.status == crate::EXIT_INVALID as u32 {
            Err(Error::InvalidArgument(format!("{what}: {message}")))
        } else {
            Err(Error::Internal(format!("{what}: {message}")))
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Per-container files of the shim (pid files, runtime logs, exec specs).
fn work_dir(oci: &Oci, id: &str) -> PathBuf {
    oci.root.join(".shim").join(id)
}

fn read_pid(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path)
        .map_err(Error::io(format!("read pid file {}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("pid file {}: {text:?}", path.display())))
}

struct Stdio3 {
    files: Option<(File, File, File)>,
    stdin_closer: StdinCloser,
    console: Option<ConsoleSocket>,
}

/// The stdio of a process: files, or for a terminal a console socket the runtime sends the pty
/// master to. The socket's path does not depend on the namespace or ids, which may be long
/// enough to overflow a socket address.
fn open_stdio(spec: &StdioSpec, ns: &str, id: &str) -> Result<Stdio3> {
    if spec.terminal {
        Ok(Stdio3 {
            files: None,
            stdin_closer: StdinCloser::default(),
            console: Some(ConsoleSocket::new()?),
        })
    } else {
        let o = stdio::open(spec, ns, id)?;
        Ok(Stdio3 {
            files: Some((o.stdin, o.stdout, o.stderr)),
            stdin_closer: o.stdin_closer,
            console: None,
        })
    }
}

/// Run a runtime command that may send a pty master on `console`; returns the console copy.
async fn run_with_console(
    oci: &Oci,
    args: &[&str],
    io: Stdio3,
    log: &Path,
    spec: &StdioSpec,
    ns: &str,
    id: &str,
) -> Result<Option<ConsoleCopy>> {
    let Some(console) = io.console else {
        oci.run(args, io.files, log).await?;
        return Ok(None);
    };
    let mut full: Vec<&str> = args.to_vec();
    let path = console.path.display().to_string();
    // The console socket flag goes before the container id (the last argument).
    let id_arg = full.pop().unwrap_or_default();
    full.extend(["--console-socket", &path, id_arg]);
    let receiver = tokio::task::spawn_blocking(move || {
        let fd = console.receive(Duration::from_secs(30));
        (fd, console)
    });
    let run = oci.run(&full, None, log).await;
    if let Err(e) = run {
        receiver.abort();
        return Err(e);
    }
    let (fd, _console) = receiver
        .await
        .map_err(|e| Error::Internal(format!("console receiver: {e}")))?;
    Ok(Some(ConsoleCopy::start(fd?, spec, ns, id)?))
}

#[async_trait]
impl Engine for LinuxEngine {
    fn name(&self) -> &'static str {
        self.config.name
    }

    async fn create(&self, req: CreateRequest) -> Result<Arc<dyn Container>> {
        let oci = Arc::new(Oci::new(
            &self.config,
            &req.namespace,
            req.options.as_ref(),
        )?);
        create_container(&oci, &req).await
    }

    /// A container's init joins its cgroup as it is created.
    fn migrates_into_task_cgroup(&self) -> bool {
        true
    }

    /// A group's shim (the `group` option, `io.switchyard.group`) stays warm for the group's
    /// next task.
    fn idle_exit(&self) -> Option<std::time::Duration> {
        Some(yard_shim_kit::engine::GROUP_IDLE_EXIT)
    }

    async fn cleanup(&self, namespace: &str, id: &str, bundle: &Path) -> Result<()> {
        let options = read_bundle_options(bundle);
        let oci = Oci::new(&self.config, namespace, options.as_ref())
            .or_else(|_| Oci::new(&self.config, namespace, None))?;
        let work = work_dir(&oci, id);
        if !oci.external && !oci.root.join(id).exists() && !work.exists() {
            // Nothing of the container is left: its shim deleted it (containerd 1.6 runs
            // `delete` after every shim's exit, before its task's Delete returns), or never
            // began to create it (the work directory is made before the runtime runs, and
            // libcontainer removes the cgroup before the state).
            return Ok(());
        }
        // libcontainer's delete --force kills what is left, removes the cgroup and the state.
        let log = work.join("delete.log");
        if oci.external {
            let _ = std::fs::create_dir_all(&work);
        }
        let r = oci.delete(id, true, &log).await;
        let _ = std::fs::remove_dir_all(&work);
        if !oci.external {
            // A shim killed in the middle of `runtime create` leaves a container its runtime
            // cannot delete (no state yet, or "creating" with no pid, which it takes for
            // stopped): whatever is in the container's cgroup goes, then the cgroup and state.
            let bundle = bundle.to_owned();
            let state = oci.root.join(id);
            let (namespace, id) = (namespace.to_owned(), id.to_owned());
            let swept = tokio::task::spawn_blocking(move || {
                sweep_half_created(&bundle, &namespace, &id, &state)
            })
            .await;
            if r.is_err() && matches!(swept, Ok(true)) {
                return Ok(());
            }
        }
        r
    }
}

/// What `cleanup` does after the runtime's delete: kill what is left in the container's cgroup
/// (read from the bundle's `config.json`), wait up to 5 s for it to empty, remove it, and remove
/// the runtime's state directory. True when nothing of the container is left.
fn sweep_half_created(bundle: &Path, namespace: &str, id: &str, state: &Path) -> bool {
    let Ok((spec, _)) = yard_shim_kit::bundle::read_spec(bundle) else {
        return false;
    };
    let cgroup = Cgroup::new(spec::cgroup_path(&spec, namespace, id), id);
    if let Ok(pids) = cgroup.pids() {
        if !pids.is_empty() {
            tracing::info!(id, ?pids, "killing what a half-created container left");
            let _ = cgroup.kill_all(9); // SIGKILL
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cgroup.pids().is_ok_and(|p| !p.is_empty()) {
            if std::time::Instant::now() > deadline {
                tracing::warn!(id, "the container's cgroup did not empty within 5 s");
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Err(e) = cgroup.remove() {
            tracing::warn!(id, "remove the container's cgroup: {e}");
            return false;
        }
    }
    match std::fs::remove_dir_all(state) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// containerd passes the runtime options to `delete` only through the bundle (runc shims write
/// `options.json`); we read it when present.
fn read_bundle_options(bundle: &Path) -> Option<Any> {
    let text = std::fs::read(bundle.join("options.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let binary_name = v
        .get("binary_name")
        .or_else(|| v.get("BinaryName"))?
        .as_str()?;
    let opts = RuncOptions {
        binary_name: binary_name.to_owned(),
        ..Default::default()
    };
    Some(Any {
        type_url: "containerd.runc.v1.Options".to_owned(),
        value: opts.write_to_bytes().ok()?,
        ..Default::default()
    })
}

async fn create_container(oci: &Arc<Oci>, req: &CreateRequest) -> Result<Arc<dyn Container>> {
    let spec = &req.spec;
    // The kit mounts the rootfs; this engine never asks for the mounts themselves.
    if let Rootfs::Mounts(_) = &req.rootfs {
        return Err(Error::Internal(
            "rootfs: mounts handed over unmounted".into(),
        ));
    }
    spec::validate(spec, &req.bundle)?;
    yard_shim_kit::cgroup::prewarm_migration();
    let cgroup = Cgroup::new(spec::cgroup_path(spec, &req.namespace, &req.id), &req.id);
    if spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .is_none()
    {
        ensure_cgroup_path(&req.bundle, &req.config, &req.namespace, &req.id)?;
    }
    if spec
        .process()
        .as_ref()
        .map(|p| p.terminal().unwrap_or(false))
        != Some(req.stdio.terminal)
    {
        return Err(Error::InvalidArgument(format!(
            "terminal: the request says {} but config.json process.terminal says {}",
            req.stdio.terminal, !req.stdio.terminal
        )));
    }
    let work = work_dir(oci, &req.id);
    std::fs::create_dir_all(&work).map_err(Error::io(format!("create {}", work.display())))?;
    let pid_file = work.join("init.pid");
    let log = work.join("create.log");
    let _ = std::fs::remove_file(&log);
    let io = open_stdio(&req.stdio, &req.namespace, &req.id)?;
    let stdin_closer = io.stdin_closer.clone();
    let bundle = req.bundle.display().to_string();
    let pid_arg = pid_file.display().to_string();
    let args = [
        "create",
        "--bundle",
        &bundle,
        "--pid-file",
        &pid_arg,
        &req.id,
    ];
    // Before the runtime runs: the init it creates is a child of this shim only after that.
    let since = reaper::global().mark();
    let console =
        match run_with_console(oci, &args, io, &log, &req.stdio, &req.namespace, &req.id).await {
            Ok(c) => c,
            Err(e) => {
                let _ = oci.delete(&req.id, true, &work.join("delete.log")).await;
                let _ = std::fs::remove_dir_all(&work);
                stdio::release_stdin_fifo(&req.stdio.stdin);
                return Err(e);
            }
        };
    let pid = read_pid(&pid_file)?;
    let pidfd = reaper::global().pidfd(pid, since);
    let oom = match cgroup.watch_oom(req.events.clone()) {
        Ok(w) => Some(Arc::new(w)),
        Err(e) => {
            tracing::warn!(id = req.id, error = %e, "no OOM notification for this container");
            None
        }
    };
    let init = Arc::new(LinuxProcess {
        container_id: req.id.clone(),
        exec_id: None,
        oci: oci.clone(),
        work: work.clone(),
        namespace: req.namespace.clone(),
        pid: AtomicU32::new(pid),
        started: Mutex::new(Started { since, pidfd }),
        stdio: req.stdio.clone(),
        console: ConsoleSlot::new(console),
        stdin_closer: Mutex::new(stdin_closer),
        spec: Vec::new(),
        oom: oom.clone(),
    });
    Ok(Arc::new(LinuxContainer {
        id: req.id.clone(),
        oci: oci.clone(),
        work,
        cgroup,
        init,
        oom,
    }))
}

/// libcontainer needs a cgroup path; containerd's clients always set one, other callers may not.
/// The bundle's `config.json` (as the kit read it) is rewritten with one, keeping every field.
fn ensure_cgroup_path(bundle: &Path, config: &[u8], namespace: &str, id: &str) -> Result<()> {
    let path = bundle.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
    v["linux"]["cgroupsPath"] = serde_json::Value::String(format!("/yard-native/{namespace}/{id}"));
    let out = serde_json::to_vec(&v).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&path, out).map_err(Error::io(format!("write {}", path.display())))
}

struct LinuxContainer {
    id: String,
    oci: Arc<Oci>,
    work: PathBuf,
    cgroup: Cgroup,
    init: Arc<LinuxProcess>,
    oom: Option<Arc<OomWatch>>,
}

#[async_trait]
impl Container for LinuxContainer {
    fn init(&self) -> Arc<dyn Process> {
        self.init.clone()
    }

    async fn exec(&self, req: ExecRequest) -> Result<Arc<dyn Process>> {
        yard_shim_kit::ident::check("exec_id", &req.exec_id)?;
        let process: oci_spec::runtime::Process = spec::parse(&req.spec, "exec process spec")?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(Error::InvalidArgument(
                "exec process spec: args: must not be empty".into(),
            ));
        }
        if process.terminal().unwrap_or(false) != req.stdio.terminal {
            return Err(Error::InvalidArgument(
                "exec: terminal in the request and in the process spec disagree".into(),
            ));
        }
        Ok(Arc::new(LinuxProcess {
            container_id: self.id.clone(),
            exec_id: Some(req.exec_id.clone()),
            oci: self.oci.clone(),
            work: self.work.clone(),
            namespace: self.init.namespace.clone(),
            pid: AtomicU32::new(0),
            started: Mutex::new(Started::default()),
            stdio: req.stdio.clone(),
            console: ConsoleSlot::default(),
            stdin_closer: Mutex::new(StdinCloser::default()),
            spec: req.spec.clone(),
            oom: None,
        }))
    }

    async fn kill_all(&self, signal: u32) -> Result<()> {
        self.cgroup.kill_all(signal)
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(self
            .cgroup
            .pids()?
            .into_iter()
            .map(|pid| ProcessInfo { pid })
            .collect())
    }

    async fn pause(&self) -> Result<()> {
        self.cgroup.freeze(true)
    }

    async fn resume(&self) -> Result<()> {
        self.cgroup.freeze(false)
    }

    async fn update(&self, resources: &Any) -> Result<()> {
        self.cgroup.update(&resources.value)
    }

    async fn stats(&self) -> Result<Any> {
        self.cgroup.stats()
    }

    async fn delete(&self, force: bool) -> Result<()> {
        if let Some(oom) = &self.oom {
            oom.stop();
        }
        let log = self.work.join("delete.log");
        let r = match self.oci.delete(&self.id, force, &log).await {
            Err(_) if !force => self.oci.delete(&self.id, true, &log).await,
            other => other,
        };
        let _ = std::fs::remove_dir_all(&self.work);
        r
    }
}

/// What identifies a started process beyond its pid: the reaper's mark from before it existed
/// (only exits after it are its own) and a pidfd to signal it by (`None` once it was reaped
/// before the pidfd could be opened).
#[derive(Default)]
struct Started {
    since: Mark,
    pidfd: Option<OwnedFd>,
}

struct LinuxProcess {
    container_id: String,
    exec_id: Option<String>,
    oci: Arc<Oci>,
    work: PathBuf,
    namespace: String,
    pid: AtomicU32,
    started: Mutex<Started>,
    stdio: StdioSpec,
    console: ConsoleSlot,
    stdin_closer: Mutex<StdinCloser>,
    /// The process spec JSON of an exec.
    spec: Vec<u8>,
    /// The init's: its exit publishes the container's OOM kills first.
    oom: Option<Arc<OomWatch>>,
}

#[async_trait]
impl Process for LinuxProcess {
    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    async fn start(&self) -> Result<u32> {
        let Some(exec_id) = &self.exec_id else {
            let log = self.work.join("start.log");
            self.oci.start(&self.container_id, &log).await?;
            return Ok(self.pid());
        };
        let spec_path = self.work.join(format!("{exec_id}.json"));
        let pid_file = self.work.join(format!("{exec_id}.pid"));
        let log = self.work.join(format!("{exec_id}.log"));
        std::fs::write(&spec_path, &self.spec)
            .map_err(Error::io(format!("write {}", spec_path.display())))?;
        let io = open_stdio(&self.stdio, &self.namespace, &self.container_id)?;
        *self.stdin_closer.lock().unwrap_or_else(|p| p.into_inner()) = io.stdin_closer.clone();
        let spec_arg = spec_path.display().to_string();
        let pid_arg = pid_file.display().to_string();
        let args = [
            "exec",
            "--process",
            &spec_arg,
            "--detach",
            "--pid-file",
            &pid_arg,
            &self.container_id,
        ];
        let since = reaper::global().mark();
        let r = run_with_console(
            &self.oci,
            &args,
            io,
            &log,
            &self.stdio,
            &self.namespace,
            &self.container_id,
        )
        .await;
        let _ = std::fs::remove_file(&spec_path);
        let console = match r {
            Ok(c) => c,
            Err(e) => {
                stdio::release_stdin_fifo(&self.stdio.stdin);
                return Err(e);
            }
        };
        self.console.set(console);
        let pid = read_pid(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(&log);
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Started {
            since,
            pidfd: reaper::global().pidfd(pid, since),
        };
        self.pid.store(pid, Ordering::SeqCst);
        Ok(pid)
    }

    async fn wait(&self) -> Exit {
        let since = self.started.lock().unwrap_or_else(|p| p.into_inner()).since;
        let exit = reaper::global().wait(self.pid(), since).await;
        if let Some(oom) = &self.oom {
            oom.settle();
        }
        self.console.drain_at_exit().await;
        exit
    }

    /// By pidfd, never by pid: the pid may belong to another process once this one is reaped.
    async fn kill(&self, signal: u32) -> Result<()> {
        let pid = self.pid();
        if pid == 0 {
            return Err(Error::FailedPrecondition("process has not started".into()));
        }
        let sig = cgroups::to_signal(signal)?;
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let finished = || Error::NotFound(format!("process {pid} already finished"));
        let fd = started.pidfd.as_ref().ok_or_else(finished)?;
        rustix::process::pidfd_send_signal(fd, sig).map_err(|e| {
            if e == rustix::io::Errno::SRCH {
                finished()
            } else {
                Error::Internal(format!("kill {pid}: {e}"))
            }
        })
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        self.console
            .resize(width, height)
            .unwrap_or_else(|| Err(Error::FailedPrecondition("process has no terminal".into())))
    }

    async fn close_stdin(&self) -> Result<()> {
        self.stdin_closer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close();
        self.console.close_stdin();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue18_a_terminal_gets_a_console_socket_whatever_the_ids() {
        if !rustix::process::geteuid().is_root() {
            let reason = "needs root (console sockets live under /run)";
            assert!(
                std::env::var_os("SWITCHYARD_REQUIRE_ALL").is_none_or(|v| v != "1"),
                "{reason}"
            );
            eprintln!("skipped: {reason}");
            return;
        }
        let namespace = "n".repeat(64);
        let id = "i".repeat(64);
        // Where the socket used to go: too long for a socket address with these ids.
        let oci = Oci {
            binary: PathBuf::from("/bin/true"),
            prefix: Vec::new(),
            root: PathBuf::from(NATIVE.state_root).join(&namespace),
            external: false,
        };
        let old = work_dir(&oci, &id).join("pty-123456-123456789/pty.sock");
        assert!(old.as_os_str().len() > yard_shim_kit::perms::SOCKET_PATH_MAX);

        let spec = StdioSpec {
            terminal: true,
            ..Default::default()
        };
        let io = open_stdio(&spec, &namespace, &id).unwrap_or_else(|e| panic!("{e}"));
        let console = io.console.unwrap_or_else(|| panic!("no console socket"));
        let path = console.path.clone();
        assert!(
            path.as_os_str().len() <= yard_shim_kit::perms::SOCKET_PATH_MAX,
            "{}",
            path.display()
        );
        std::os::unix::net::UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        drop(console);
        assert!(!path.exists(), "console socket left behind");
    }
}
