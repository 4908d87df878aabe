//! One Wasm task: a container whose init "process" is an instance in this shim process.
//!
//! Start instantiates from the prepared template and runs the guest as a tokio task on the
//! guest runtime; Kill and Pause act on that task (a killed guest's future is dropped, which
//! unwinds the instance; a compute loop reaches an await point at every epoch tick), so one
//! task never disturbs the others in the shim.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::cli::{AsyncStdinStream, OutputFile};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;
use yard_shim_kit::protos::protobuf::Message as _;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::stdio::{ConsoleCopy, StdinCloser};
use yard_shim_kit::{Container, Error, ExecRequest, Exit, Process, ProcessInfo, Publisher, Result};

use crate::config::TaskSettings;
use crate::runtime::{Limits, P1State, P2State, Prepared, Runtime};

/// Exit status of a trap (as `wasmtime run` reports one: 128 + SIGABRT).
pub const EXIT_TRAP: u32 = 134;
/// Exit status when the memory limit stopped the guest (as an OOM kill reports it).
pub const EXIT_OOM: u32 = 137;
/// Exit status when the task ran past its timeout (as `timeout(1)` reports it).
pub const EXIT_TIMEOUT: u32 = 124;

/// Signals whose default action is not to terminate; a Wasm guest has no handlers, so these
/// are ignored and every other signal ends it.
const IGNORED_SIGNALS: [u32; 4] = [17, 18, 23, 28]; // SIGCHLD, SIGCONT, SIGURG, SIGWINCH

/// Kill and pause state shared by the task, its guest's epoch callback and the driver.
pub struct Control {
    kill: watch::Sender<Option<u32>>,
    paused: AtomicBool,
    waker: Mutex<Option<Waker>>,
    timed_out: AtomicBool,
}

impl Default for Control {
    fn default() -> Control {
        Control {
            kill: watch::channel(None).0,
            paused: AtomicBool::new(false),
            waker: Mutex::new(None),
            timed_out: AtomicBool::new(false),
        }
    }
}

impl Control {
    fn killed(&self) -> Option<u32> {
        *self.kill.borrow()
    }

    async fn wait_killed(&self) -> u32 {
        let mut rx = self.kill.subscribe();
        let v = rx.wait_for(Option::is_some).await.map(|v| *v);
        match v {
            Ok(v) => v.unwrap_or(9),
            Err(_) => std::future::pending().await,
        }
    }

    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused && let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// Runs the inner future only while the task is not paused.
struct Pausable<F> {
    inner: Pin<Box<F>>,
    control: Arc<Control>,
}

impl<F: Future> Future for Pausable<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.control.paused.load(Ordering::SeqCst) {
            *self.control.waker.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(cx.waker().clone());
            // Resumed between the check and storing the waker: go on.
            if self.control.paused.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// The guest's files (owned by the store while it runs).
struct Stdio {
    stdin: File,
    stdout: File,
    stderr: File,
}

/// What every instance of a task is made from, and where its troubles are reported.
pub struct Guest {
    pub id: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub rootfs: PathBuf,
    pub readonly: bool,
    pub cwd: String,
    pub settings: TaskSettings,
    pub control: Arc<Control>,
    pub memory_limit: Arc<AtomicU64>,
    pub memory_used: Arc<AtomicU64>,
    /// The task's stderr, for trap messages (and, for HTTP tasks, every request's stderr).
    pub stderr: Mutex<Option<File>>,
    pub stdout: Mutex<Option<File>>,
}

impl Guest {
    /// A WASI context: args, env, the rootfs preopened as `/`, and the given stdio.
    fn builder(&self, stdin: Option<File>, stdout: File, stderr: File) -> Result<WasiCtxBuilder> {
        let mut b = WasiCtxBuilder::new();
        b.args(&self.args).envs(&self.env);
        let perms = if self.readonly {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&self.rootfs, "/", perms).map_err(|e| {
            Error::InvalidArgument(format!("root.path {}: {e}", self.rootfs.display()))
        })?;
        if !self.cwd.is_empty() && self.cwd != "/" {
            b.env("PWD", &self.cwd);
        }
        if let Some(stdin) = stdin {
            b.stdin(stdin_stream(stdin));
        }
        b.stdout(OutputFile::new(stdout))
            .stderr(OutputFile::new(stderr));
        Ok(b)
    }

    fn files(&self) -> Result<(File, File)> {
        let dup = |f: &Mutex<Option<File>>, what: &str| -> Result<File> {
            match &*f.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(f) => f.try_clone().map_err(Error::io(format!("dup {what}"))),
                None => File::options()
                    .write(true)
                    .open("/dev/null")
                    .map_err(Error::io("open /dev/null")),
            }
        };
        Ok((dup(&self.stdout, "stdout")?, dup(&self.stderr, "stderr")?))
    }

    /// Store data for one HTTP request's instance.
    pub fn p2_state(&self) -> Result<P2State> {
        let (out, err) = self.files()?;
        Ok(P2State {
            wasi: self.builder(None, out, err)?.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: crate::http::Hooks,
            limits: Limits::new(self.memory_limit.clone(), self.memory_used.clone()),
        })
    }

    /// Limits, fuel and interruption for a store of this task.
    pub fn configure<T: 'static>(
        &self,
        store: &mut Store<T>,
        limits: impl Fn(&mut T) -> &mut Limits + Send + Sync + 'static,
    ) {
        store.limiter(move |s| limits(s) as &mut dyn wasmtime::ResourceLimiter);
        if let Some(fuel) = self.settings.fuel {
            let _ = store.set_fuel(fuel);
        }
        let control = self.control.clone();
        let deadline = self.settings.timeout.map(|t| Instant::now() + t);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if control.killed().is_some() {
                return Ok(UpdateDeadline::Interrupt);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                control.timed_out.store(true, Ordering::SeqCst);
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Yield(1))
        });
    }

    /// Tell the task's stderr and the shim log.
    pub fn report(&self, msg: &str) {
        tracing::warn!(id = %self.id, "{msg}");
        if let Some(f) = &mut *self.stderr.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = writeln!(f, "{msg}");
        }
    }
}

/// The guest's stdin: a pipe is read asynchronously; anything else (`/dev/null`, a terminal)
/// through tokio's blocking pool.
fn stdin_stream(f: File) -> AsyncStdinStream {
    use std::os::unix::fs::FileTypeExt;
    let is_fifo = f
        .metadata()
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if is_fifo
        && let Ok(dup) = f.try_clone()
        && let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_file(dup)
    {
        return AsyncStdinStream::new(pipe);
    }
    AsyncStdinStream::new(tokio::fs::File::from_std(f))
}

pub struct WasmProcess {
    me: std::sync::Weak<WasmProcess>,
    runtime: Arc<Runtime>,
    prepared: Prepared,
    guest: Arc<Guest>,
    stdio: Mutex<Option<Stdio>>,
    stdin_closer: StdinCloser,
    console: Mutex<Option<ConsoleCopy>>,
    exit: watch::Sender<Option<Exit>>,
    started: AtomicBool,
    events: Publisher,
}

pub struct TaskParts {
    pub runtime: Arc<Runtime>,
    pub prepared: Prepared,
    pub guest: Guest,
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
    pub stdin_closer: StdinCloser,
    pub console: Option<ConsoleCopy>,
    pub events: Publisher,
}

impl WasmProcess {
    pub fn new(p: TaskParts) -> Result<Arc<WasmProcess>> {
        let guest = Guest {
            stderr: Mutex::new(Some(p.stderr.try_clone().map_err(Error::io("dup stderr"))?)),
            stdout: Mutex::new(Some(p.stdout.try_clone().map_err(Error::io("dup stdout"))?)),
            ..p.guest
        };
        Ok(Arc::new_cyclic(|me| WasmProcess {
            me: me.clone(),
            runtime: p.runtime,
            prepared: p.prepared,
            guest: Arc::new(guest),
            stdio: Mutex::new(Some(Stdio {
                stdin: p.stdin,
                stdout: p.stdout,
                stderr: p.stderr,
            })),
            stdin_closer: p.stdin_closer,
            console: Mutex::new(p.console),
            exit: watch::channel(None).0,
            started: AtomicBool::new(false),
            events: p.events,
        }))
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Run the guest to its end; `ready` learns whether it got going.
    async fn drive(self: Arc<Self>, stdio: Stdio, ready: oneshot::Sender<Result<()>>) {
        let _running = self.runtime.running();
        let control = self.guest.control.clone();
        let run = Pausable {
            inner: Box::pin(self.clone().run(stdio, ready)),
            control: control.clone(),
        };
        let status = tokio::select! {
            biased;
            sig = control.wait_killed() => Some(128 + sig),
            s = run => s,
        };
        let Some(status) = status else { return };
        self.finish(status).await;
    }

    async fn finish(&self, status: u32) {
        // The guest's files are closed by now (its store is gone), so readers see EOF; with a
        // terminal, let the copy drain first.
        *self.guest.stderr.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.guest.stdout.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let console = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = console {
            c.drain(Duration::from_secs(2)).await;
        }
        self.stdin_closer.close_now();
        self.exit.send_replace(Some(Exit::now(status)));
    }

    /// Instantiate and run; `None` when it never started (the error went to `ready`).
    async fn run(self: Arc<Self>, stdio: Stdio, ready: oneshot::Sender<Result<()>>) -> Option<u32> {
        let g = &self.guest;
        let Stdio {
            stdin,
            stdout,
            stderr,
        } = stdio;
        let engine = self.runtime.engine.clone();
        let result = match &self.prepared {
            Prepared::Module(pre) => {
                let wasi = match g.builder(Some(stdin), stdout, stderr) {
                    Ok(mut b) => b.build_p1(),
                    Err(e) => return fail(ready, e),
                };
                let limits = Limits::new(g.memory_limit.clone(), g.memory_used.clone());
                let refused = limits.refused.clone();
                let mut store = Store::new(&engine, P1State { wasi, limits });
                g.configure(&mut store, |s: &mut P1State| &mut s.limits);
                let instance = match pre.instantiate_async(&mut store).await {
                    Ok(i) => i,
                    Err(e) => return fail(ready, instantiate_error(e)),
                };
                let start = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                    Ok(f) => f,
                    Err(e) => return fail(ready, Error::InvalidArgument(format!("_start: {e}"))),
                };
                let _ = ready.send(Ok(()));
                let r = start.call_async(&mut store, ()).await;
                (r.map(|()| 0), refused)
            }
            Prepared::Command(pre) => {
                let wasi = match g.builder(Some(stdin), stdout, stderr) {
                    Ok(mut b) => b.build(),
                    Err(e) => return fail(ready, e),
                };
                let limits = Limits::new(g.memory_limit.clone(), g.memory_used.clone());
                let refused = limits.refused.clone();
                let state = P2State {
                    wasi,
                    http: WasiHttpCtx::new(),
                    table: ResourceTable::new(),
                    hooks: crate::http::Hooks,
                    limits,
                };
                let mut store = Store::new(&engine, state);
                g.configure(&mut store, |s: &mut P2State| &mut s.limits);
                let command = match pre.instantiate_async(&mut store).await {
                    Ok(c) => c,
                    Err(e) => return fail(ready, instantiate_error(e)),
                };
                let _ = ready.send(Ok(()));
                let r = command.wasi_cli_run().call_run(&mut store).await;
                (r.map(|r| u32::from(r.is_err())), refused)
            }
            Prepared::Http(pre) => {
                drop((stdin, stdout, stderr));
                let listener = match tokio::net::TcpListener::bind(&g.settings.http_listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        return fail(
                            ready,
                            Error::FailedPrecondition(format!(
                                "http listen address {}: {e}",
                                g.settings.http_listen
                            )),
                        );
                    }
                };
                tracing::info!(id = %g.id, addr = %g.settings.http_listen, "serving wasi:http");
                let _ = ready.send(Ok(()));
                let status = crate::http::serve(listener, pre.clone(), self.guest.clone()).await;
                return Some(status);
            }
        };
        let (r, refused) = result;
        Some(match r {
            Ok(status) => status,
            Err(e) => self.classify(&e, refused.load(Ordering::Relaxed)).await,
        })
    }

    /// Exit status and report for a guest that ended with an error.
    async fn classify(&self, e: &wasmtime::Error, refused: u64) -> u32 {
        let g = &self.guest;
        if let Some(exit) = e.downcast_ref::<I32Exit>() {
            return exit.0.to_le_bytes()[0].into();
        }
        if let Some(sig) = g.control.killed() {
            return 128 + sig;
        }
        if g.control.timed_out.load(Ordering::SeqCst) {
            let ms = g
                .settings
                .timeout
                .map(|t| t.as_millis())
                .unwrap_or_default();
            g.report(&format!("wasm: killed after the task's timeout of {ms} ms"));
            return EXIT_TIMEOUT;
        }
        if refused > 0 {
            let limit = g.memory_limit.load(Ordering::Relaxed);
            g.report(&format!(
                "wasm: out of memory: the memory limit is {limit} bytes and the module asked \
                 for {refused} bytes of linear memory; it then stopped with: {e}"
            ));
            self.events.oom(&g.id).await;
            return EXIT_OOM;
        }
        if matches!(
            e.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::OutOfFuel)
        ) {
            g.report("wasm: out of fuel");
            return EXIT_TRAP;
        }
        g.report(&format!("wasm trap: {e:?}"));
        EXIT_TRAP
    }
}

fn fail(ready: oneshot::Sender<Result<()>>, e: Error) -> Option<u32> {
    let _ = ready.send(Err(e));
    None
}

fn instantiate_error(e: wasmtime::Error) -> Error {
    let msg = format!("{e:#}");
    if msg.contains("limit") && msg.contains("reached") {
        Error::FailedPrecondition(format!(
            "instantiate: {msg} (raise the runtime option max_instances)"
        ))
    } else {
        Error::Internal(format!("instantiate: {msg}"))
    }
}

#[async_trait]
impl Process for WasmProcess {
    fn pid(&self) -> u32 {
        if self.started.load(Ordering::SeqCst) {
            std::process::id()
        } else {
            0
        }
    }

    async fn start(&self) -> Result<u32> {
        if let Some(sig) = self.guest.control.killed() {
            return Err(Error::FailedPrecondition(format!(
                "task was killed (signal {sig}) before it started"
            )));
        }
        let stdio = self
            .stdio
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::FailedPrecondition("task already started".into()))?;
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Error::Internal("task is being dropped".into()))?;
        let (tx, rx) = oneshot::channel();
        self.runtime.guests.spawn(me.drive(stdio, tx));
        match rx.await {
            // Killed before it got going: it has started and ended.
            Ok(Ok(())) | Err(_) => {
                self.started.store(true, Ordering::SeqCst);
                Ok(std::process::id())
            }
            Ok(Err(e)) => Err(e),
        }
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
        if signal == 0 || IGNORED_SIGNALS.contains(&signal) {
            return Ok(());
        }
        let first = self.guest.control.kill.send_if_modified(|k| {
            if k.is_none() {
                *k = Some(signal);
                true
            } else {
                false
            }
        });
        // Killed before Start: there is no guest to stop, so it ends here.
        if first && !self.started.load(Ordering::SeqCst) {
            let stdio = self.stdio.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(stdio);
            self.finish(128 + signal).await;
        }
        Ok(())
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        match &*self.console.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(c) => c.resize(width, height),
            None => Ok(()),
        }
    }

    async fn close_stdin(&self) -> Result<()> {
        self.stdin_closer.close();
        if let Some(c) = &*self.console.lock().unwrap_or_else(|p| p.into_inner()) {
            c.close_stdin();
        }
        Ok(())
    }
}

pub struct WasmContainer {
    pub init: Arc<WasmProcess>,
    pub bundle: PathBuf,
    pub mounted: bool,
}

#[async_trait]
impl Container for WasmContainer {
    fn init(&self) -> Arc<dyn Process> {
        self.init.clone()
    }

    async fn exec(&self, _req: ExecRequest) -> Result<Arc<dyn Process>> {
        Err(Error::Unimplemented(
            "Exec is not supported by the Wasm runtime: a Wasm task is one instance with no \
             process to join; start another task instead"
                .into(),
        ))
    }

    async fn kill_all(&self, signal: u32) -> Result<()> {
        match self.init.kill(signal).await {
            Err(Error::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        Ok(
            if self.init.started.load(Ordering::SeqCst) && !self.init.exited() {
                vec![ProcessInfo {
                    pid: std::process::id(),
                }]
            } else {
                Vec::new()
            },
        )
    }

    async fn pause(&self) -> Result<()> {
        self.init.guest.control.set_paused(true);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.init.guest.control.set_paused(false);
        Ok(())
    }

    async fn update(&self, resources: &Any) -> Result<()> {
        let r: oci_spec::runtime::LinuxResources =
            yard_shim_kit::bundle::parse_json(&resources.value, "resources")?;
        if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
            let bytes = if limit < 0 { 0 } else { limit.unsigned_abs() };
            self.init.guest.memory_limit.store(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Any> {
        use yard_shim_kit::protos::cgroups::metrics as v1;
        use yard_shim_kit::protos::protobuf::MessageField;
        let used = self.init.guest.memory_used.load(Ordering::Relaxed);
        let limit = match self.init.guest.memory_limit.load(Ordering::Relaxed) {
            0 => u64::MAX,
            l => l,
        };
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
                current: u64::from(!self.init.exited() && self.init.started.load(Ordering::SeqCst)),
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
        if self.init.started.load(Ordering::SeqCst) && !self.init.exited() {
            if !force {
                return Err(Error::FailedPrecondition(
                    "task is running: kill it first".into(),
                ));
            }
            let _ = self.init.kill(9).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), self.init.wait()).await;
        }
        // Never started: drop its files so the client's fifos see EOF.
        drop(
            self.init
                .stdio
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        self.init.stdin_closer.close_now();
        if self.mounted {
            yard_shim_kit::bundle::unmount_rootfs(&self.bundle);
        }
        Ok(())
    }
}
