//! One Wasm task in the worker: its "process" is an instance in the worker process.
//!
//! Start instantiates from the prepared template and runs the guest as a tokio task on the
//! guest runtime; Kill and Pause act on that task (a killed guest's future is dropped, which
//! unwinds the instance; a compute loop reaches an await point at every epoch tick), so one
//! task never disturbs the others in the shim. What the parent must know (the exit, an OOM)
//! goes out through a [`Notify`].

use std::fs::File;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{oneshot, watch};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::cli::{AsyncStdinStream, OutputFile};
use wasmtime_wasi::p2::OutputStream;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;
use yard_shim_kit::{Error, Result};

use crate::config::TaskSettings;
use crate::runtime::{Limits, P1State, P2State, Prepared, Runtime};

/// Where a task reports its exit and OOM stops (to the parent).
pub trait Notify: Send + Sync {
    fn exited(&self, task: &str, status: u32);
    fn oom(&self, task: &str);
}

/// Exit status of a trap (as `wasmtime run` reports one: 128 + SIGABRT).
pub const EXIT_TRAP: u32 = 134;
/// Exit status when the memory limit stopped the guest (as an OOM kill reports it).
pub const EXIT_OOM: u32 = 137;
/// Exit status when the task ran past its timeout (as `timeout(1)` reports it).
pub const EXIT_TIMEOUT: u32 = 124;
/// Exit status when the task's run panicked in the worker (a bug of ours, not the guest's; the
/// panic's message is on the worker's stderr, in the shim's log): 255, as runc's shim reports an
/// exit it could not learn.
pub const EXIT_PANICKED: u32 = 255;

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

/// `run`'s status, or [`EXIT_PANICKED`] when it panicked. tokio would catch the panic and drop
/// the task's future, its Start answered (the dropped `ready` says it started and ended) and
/// its exit never sent: a task that never exits.
async fn unless_panicked(run: impl Future<Output = Option<u32>>, task: &str) -> Option<u32> {
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(status) => status,
        Err(_) => {
            tracing::error!(task, status = EXIT_PANICKED, "the task's run panicked");
            Some(EXIT_PANICKED)
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

/// The guest's files (owned by the store while it runs). `None` is `/dev/null`, which needs no
/// descriptor: WASI's default streams read nothing and discard what is written, as it does.
/// An idle task then holds one descriptor (its preopened root), which is what lets a worker
/// keep 10,000 of them under a 20,000 `RLIMIT_NOFILE`.
struct Stdio {
    stdin: Option<File>,
    stdout: Option<OutputFile>,
    stderr: Option<OutputFile>,
}

/// What every instance of a task is made from, and where its troubles are reported.
pub struct Guest {
    pub id: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The task's root: a detached `nodev,nosuid,noexec` mount tree from the parent, until
    /// the task's last instance has preopened it (a command's one instance; an HTTP
    /// component's requests need it to the end).
    pub root: Mutex<Option<OwnedFd>>,
    pub readonly: bool,
    pub cwd: String,
    pub settings: TaskSettings,
    pub control: Arc<Control>,
    pub memory_limit: Arc<AtomicU64>,
    pub memory_used: Arc<AtomicU64>,
    /// The task's stderr, for trap messages (and, for HTTP tasks, every request's stderr):
    /// the guest's own stream, shared, not a copy of its descriptor.
    pub stderr: Mutex<Option<OutputFile>>,
    pub stdout: Mutex<Option<OutputFile>>,
}

impl Guest {
    /// A WASI context: args, env, the rootfs preopened as `/`, and the given stdio (none: the
    /// default streams, `/dev/null`'s behaviour). `last`: no instance of the task follows, so
    /// the root's descriptor goes (the preopen holds its own).
    fn builder(
        &self,
        stdin: Option<File>,
        stdout: Option<OutputFile>,
        stderr: Option<OutputFile>,
        last: bool,
    ) -> Result<WasiCtxBuilder> {
        let mut b = self.base(last)?;
        if let Some(stdin) = stdin {
            b.stdin(stdin_stream(stdin));
        }
        if let Some(stdout) = stdout {
            b.stdout(stdout);
        }
        if let Some(stderr) = stderr {
            b.stderr(stderr);
        }
        Ok(b)
    }

    /// Args, env, the root preopened as `/`, and the network the task may use: in a pod,
    /// `wasi:sockets` TCP and UDP to any address (the worker is in the pod's network namespace,
    /// so any address is as the pod sees it) unless the runtime turned them off; outside a pod,
    /// none. No name lookups (the worker has no resolver configuration).
    fn base(&self, last: bool) -> Result<WasiCtxBuilder> {
        let mut b = WasiCtxBuilder::new();
        b.args(&self.args).envs(&self.env);
        let perms = if self.readonly {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        {
            let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
            let fd = root
                .as_ref()
                .ok_or_else(|| Error::Internal("the task's root is gone".into()))?;
            preopen_root(&mut b, fd, perms)?;
            if last {
                *root = None;
            }
        }
        let sockets = self.settings.network.sockets;
        b.allow_tcp(sockets)
            .allow_udp(sockets)
            .allow_ip_name_lookup(false);
        if sockets {
            b.inherit_network();
        }
        if !self.cwd.is_empty() && self.cwd != "/" {
            b.env("PWD", &self.cwd);
        }
        Ok(b)
    }

    /// Sockets one instance may hold at once.
    fn max_sockets(&self) -> usize {
        usize::try_from(self.settings.network.max_sockets).unwrap_or(usize::MAX)
    }

    /// The task's output streams for one more instance (none once the task has ended).
    fn outputs(&self) -> (Option<OutputFile>, Option<OutputFile>) {
        let get =
            |f: &Mutex<Option<OutputFile>>| f.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (get(&self.stdout), get(&self.stderr))
    }

    /// Store data for one HTTP request's instance.
    pub fn p2_state(&self) -> Result<P2State> {
        let (out, err) = self.outputs();
        let mut b = self.builder(None, out, err, false)?;
        Ok(P2State {
            wasi: b.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: crate::http::Hooks::new(&self.settings.network),
            limits: Limits::new(self.memory_limit.clone(), self.memory_used.clone()),
            max_sockets: self.max_sockets(),
        })
    }

    /// Limits, fuel and interruption for a store of this task; `timeout` bounds its run (the
    /// task's, or one HTTP request's).
    pub fn configure<T: 'static>(
        &self,
        store: &mut Store<T>,
        timeout: Option<Duration>,
        limits: impl Fn(&mut T) -> &mut Limits + Send + Sync + 'static,
    ) {
        store.limiter(move |s| limits(s) as &mut dyn wasmtime::ResourceLimiter);
        if let Some(fuel) = self.settings.fuel {
            let _ = store.set_fuel(fuel);
        }
        let control = self.control.clone();
        let deadline = timeout.map(|t| Instant::now() + t);
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
            let _ = f.write(format!("{msg}\n").into());
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

/// Whether `f` is `/dev/null` (the character device 1:3).
fn is_null(f: &File) -> bool {
    use rustix::fs::{FileType, fstat, makedev};
    fstat(f).is_ok_and(|st| {
        FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
            && st.st_rdev == makedev(1, 3)
    })
}

/// Preopen the task's root as `/`. wasmtime-wasi opens a preopen by path, and the worker has
/// no path to the root (its own root is empty), so the root descriptor becomes the working
/// directory for the moment of the open: `.` is the root of the task's detached tree.
fn preopen_root(b: &mut WasiCtxBuilder, root: &OwnedFd, perms: FsPerms) -> Result<()> {
    static CWD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CWD.lock().unwrap_or_else(|p| p.into_inner());
    rustix::process::fchdir(root).map_err(|e| Error::io("enter the task's root")(e.into()))?;
    let r = b
        .preopened_dir(".", "/", perms)
        .map(drop)
        .map_err(|e| Error::Internal(format!("preopen the task's root: {e}")));
    let back = rustix::process::chdir("/");
    r?;
    back.map_err(|e| Error::io("leave the task's root")(e.into()))
}

pub struct WasmProcess {
    me: std::sync::Weak<WasmProcess>,
    runtime: Arc<Runtime>,
    prepared: Prepared,
    guest: Arc<Guest>,
    stdio: Mutex<Option<Stdio>>,
    /// The listener an HTTP component serves on, given at Start.
    listener: Mutex<Option<OwnedFd>>,
    exit: watch::Sender<Option<u32>>,
    started: AtomicBool,
    notify: Arc<dyn Notify>,
}

pub struct TaskParts {
    pub runtime: Arc<Runtime>,
    pub prepared: Prepared,
    pub guest: Guest,
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
    pub notify: Arc<dyn Notify>,
}

impl WasmProcess {
    pub fn new(p: TaskParts) -> Arc<WasmProcess> {
        let output = |f: File| (!is_null(&f)).then(|| OutputFile::new(f));
        let (stdout, stderr) = (output(p.stdout), output(p.stderr));
        let guest = Guest {
            stderr: Mutex::new(stderr.clone()),
            stdout: Mutex::new(stdout.clone()),
            ..p.guest
        };
        Arc::new_cyclic(|me| WasmProcess {
            me: me.clone(),
            runtime: p.runtime,
            prepared: p.prepared,
            guest: Arc::new(guest),
            stdio: Mutex::new(Some(Stdio {
                stdin: (!is_null(&p.stdin)).then_some(p.stdin),
                stdout,
                stderr,
            })),
            listener: Mutex::new(None),
            exit: watch::channel(None).0,
            started: AtomicBool::new(false),
            notify: p.notify,
        })
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
        let run = unless_panicked(run, &self.guest.id);
        let status = tokio::select! {
            biased;
            sig = control.wait_killed() => Some(128 + sig),
            s = run => s,
        };
        let Some(status) = status else { return };
        self.finish(status);
    }

    fn finish(&self, status: u32) {
        // The guest's files are closed by now (its store is gone), and so are these copies,
        // so readers see EOF before the parent hears of the exit.
        *self.guest.stderr.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.guest.stdout.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.exit.send_replace(Some(status)).is_none() {
            self.notify.exited(&self.guest.id, status);
        }
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
                let wasi = match g.builder(stdin, stdout, stderr, true) {
                    Ok(mut b) => b.build_p1(),
                    Err(e) => return fail(ready, e),
                };
                let limits = Limits::new(g.memory_limit.clone(), g.memory_used.clone());
                let refused = limits.refused.clone();
                let mut store = Store::new(&engine, P1State { wasi, limits });
                g.configure(&mut store, g.settings.timeout, |s: &mut P1State| {
                    &mut s.limits
                });
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
                let wasi = match g.builder(stdin, stdout, stderr, true) {
                    Ok(mut b) => b.build(),
                    Err(e) => return fail(ready, e),
                };
                let limits = Limits::new(g.memory_limit.clone(), g.memory_used.clone());
                let refused = limits.refused.clone();
                let state = P2State {
                    wasi,
                    http: WasiHttpCtx::new(),
                    table: ResourceTable::new(),
                    hooks: crate::http::Hooks::new(&g.settings.network),
                    limits,
                    max_sockets: g.max_sockets(),
                };
                let mut store = Store::new(&engine, state);
                g.configure(&mut store, g.settings.timeout, |s: &mut P2State| {
                    &mut s.limits
                });
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
                let fd = self
                    .listener
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let listener = match fd.map(listener) {
                    Some(Ok(l)) => l,
                    Some(Err(e)) => return fail(ready, e),
                    None => {
                        return fail(
                            ready,
                            Error::Internal("no listening socket for a wasi:http task".into()),
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
            self.notify.oom(&g.id);
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

/// The listening socket from the parent, for tokio.
fn listener(fd: OwnedFd) -> Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)
        .map_err(Error::io("make the listener non-blocking"))?;
    tokio::net::TcpListener::from_std(l).map_err(Error::io("register the listener"))
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

impl WasmProcess {
    /// Run the guest; an HTTP component serves on `listener`. Returns once it got going.
    pub async fn start(&self, listener: Option<OwnedFd>) -> Result<()> {
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
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = listener;
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
                Ok(())
            }
            Ok(Err(e)) => Err(e),
        }
    }

    pub fn kill(&self, signal: u32) -> Result<()> {
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
            self.finish(128 + signal);
        }
        Ok(())
    }

    pub fn pause(&self, paused: bool) {
        self.guest.control.set_paused(paused);
    }

    /// A new linear memory limit in bytes (0: none).
    pub fn update(&self, limit: u64) {
        self.guest.memory_limit.store(limit, Ordering::Relaxed);
    }

    /// Linear memory in use and the limit (0: none).
    pub fn stats(&self) -> (u64, u64) {
        (
            self.guest.memory_used.load(Ordering::Relaxed),
            self.guest.memory_limit.load(Ordering::Relaxed),
        )
    }

    /// Stop what still runs (a guest that outlived its Delete is killed) and drop the files.
    pub async fn delete(&self) {
        if self.started.load(Ordering::SeqCst) && !self.exited() {
            let _ = self.kill(9);
            let mut rx = self.exit.subscribe();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        }
        // Never started: drop its files so the client's fifos see EOF.
        drop(self.stdio.lock().unwrap_or_else(|p| p.into_inner()).take());
        drop(
            self.listener
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn buggy() -> Option<u32> {
        panic!("a bug in the worker")
    }

    #[test]
    fn a_run_that_panics_still_ends_the_task() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            assert_eq!(unless_panicked(async { Some(3) }, "t").await, Some(3));
            assert_eq!(unless_panicked(async { None }, "t").await, None);
            assert_eq!(unless_panicked(buggy(), "t").await, Some(EXIT_PANICKED));
        });
    }
}
