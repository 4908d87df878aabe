//! The kit's engine for Wasm, in the shim (the privileged parent): reads the bundle, checks
//! what the spec asks against what the runtime can enforce, compiles (or takes from the cache)
//! the `.wasm` named by `process.args[0]` inside the rootfs, opens the task's stdio and hands
//! the task to the worker, the unprivileged process that runs guests (`remote.rs`,
//! `worker.rs`). A container whose entrypoint is not Wasm (a pod's sandbox, a sidecar) goes to
//! [`LINUX`], the native shim's engine (`yard_oci_runtime::engine`), in this same shim.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use tokio::sync::OnceCell;
use yard_shim_kit::bundle::unmount_rootfs;
use yard_shim_kit::protos::types::mount::Mount;
use yard_shim_kit::stdio::{self, StdinCloser};
use yard_shim_kit::{Container, CreateRequest, Engine, Error, Result, Rootfs};

use yard_oci_runtime::engine::{Config as LinuxConfig, LinuxEngine};

use crate::compile::{Compiler, Kind};
use crate::config::{Options, TaskSettings};
use crate::entrypoint::Entrypoint;
use crate::ipc::{GuestSpec, Loaded, ToWorker};
use crate::remote::{PodNetns, RemoteContainer, RemoteParts, RemoteTask, Worker};

/// The Linux containers of a Wasm pod: libcontainer, with this shim's own state directory. The
/// wasm runtime's options are its own, never containerd's runc options.
const LINUX: LinuxEngine = LinuxEngine::new(LinuxConfig {
    name: "containerd-shim-yard-wasm-v1",
    state_root: "/run/yard-wasm",
    runc_options: false,
});

/// Runtime mode (`containerd-shim-yard-wasm-v1 runtime ...`), which [`LINUX`] runs.
pub const RUNTIME_OPTIONS: yard_oci_runtime::Options = yard_oci_runtime::Options {
    default_root: "/run/yard-wasm",
    after_create: None,
};

#[derive(Default)]
pub struct WasmEngine {
    /// The shim's identity, for the worker's command line, and its log filter.
    namespace: String,
    id: String,
    log_filter: String,
    compiler: OnceCell<Arc<Compiler>>,
    worker: tokio::sync::Mutex<Option<Arc<Worker>>>,
    /// The worker and compiler being made ahead of the first Create (serve mode), with the
    /// options found in the bundle.
    prewarm: std::sync::Mutex<Option<Prewarm>>,
}

struct Prewarm {
    worker: Option<Worker>,
    compiler: std::thread::JoinHandle<Result<Compiler>>,
}

impl WasmEngine {
    /// For the shim server: start the worker (which builds its engine) and the compiler right
    /// away, so both overlap with containerd connecting and sending Create. The options come
    /// from the bundle's `options.json` (switchyardd writes it; the server runs in the bundle
    /// directory), else the defaults; Create checks they match.
    pub fn prewarmed(flags: &containerd_shim::Flags) -> WasmEngine {
        crate::idmap::sweep();
        let options = std::fs::read("options.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<Options>(&b).ok())
            .unwrap_or_default();
        // A pod's shim starts in its first container's bundle (the sandbox's): its network
        // namespace is the pod's.
        let netns = Spec::load("config.json")
            .ok()
            .and_then(|s| spec_netns(&s))
            .and_then(|p| PodNetns::open(&p).ok());
        let mut engine = WasmEngine::for_shim(flags);
        let worker = Worker::spawn(
            options.clone(),
            netns,
            &engine.log_filter,
            &flags.namespace,
            &flags.id,
        )
        .map_err(|e| tracing::warn!(error = %e, "prewarm the wasm worker"))
        .ok();
        let compiler = std::thread::Builder::new()
            .name("wasm-prewarm".into())
            .spawn(move || Compiler::new(options))
            .ok();
        if let Some(compiler) = compiler {
            engine.prewarm = std::sync::Mutex::new(Some(Prewarm { worker, compiler }));
        }
        engine
    }

    /// Without a prewarm (`start` and `delete`).
    pub fn for_shim(flags: &containerd_shim::Flags) -> WasmEngine {
        WasmEngine {
            namespace: flags.namespace.clone(),
            id: flags.id.clone(),
            log_filter: if flags.debug {
                "debug,cranelift_codegen=info,cranelift_frontend=info,wasmtime_cranelift=info,\
                 regalloc2=info"
                    .into()
            } else {
                "info".into()
            },
            ..WasmEngine::default()
        }
    }
}

/// containerd's rootfs mount, made `nodev,nosuid` whatever it asked for: a Wasm task's root is
/// never a place for device nodes or setuid files (its worker sees a further-hardened copy).
fn hardened(mounts: &[Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m.options.retain(|o| !matches!(o.as_str(), "dev" | "suid"));
            for o in ["nodev", "nosuid"] {
                if !m.options.iter().any(|x| x == o) {
                    m.options.push(o.to_owned());
                }
            }
            m
        })
        .collect()
}

#[async_trait]
impl Engine for WasmEngine {
    fn name(&self) -> &'static str {
        "containerd-shim-yard-wasm-v1"
    }

    fn rootfs_mounts(&self, mounts: Vec<Mount>) -> Vec<Mount> {
        hardened(&mounts)
    }

    async fn create(&self, req: CreateRequest) -> Result<Arc<dyn Container>> {
        // The kit has read the spec and mounted the rootfs (and unmounts it).
        let Rootfs::Dir(rootfs) = &req.rootfs else {
            return Err(Error::Internal(
                "rootfs: mounts handed over unmounted".into(),
            ));
        };
        let process = req
            .spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("config.json: process: missing".into()))?;
        let kind = {
            let (rootfs, process) = (rootfs.clone(), process.clone());
            tokio::task::spawn_blocking(move || crate::entrypoint::classify(&rootfs, &process))
                .await
                .map_err(|e| Error::Internal(format!("classify the entrypoint: {e}")))??
        };
        match kind {
            Entrypoint::Wasm => self.create_task(&req, &req.spec, false).await,
            Entrypoint::Linux => {
                tracing::info!(id = %req.id, "not Wasm: a Linux container");
                LINUX
                    .create(CreateRequest {
                        options: None,
                        ..req
                    })
                    .await
            }
        }
    }

    async fn cleanup(&self, namespace: &str, id: &str, bundle: &Path) -> Result<()> {
        if LINUX.knows(namespace, id) {
            return LINUX.cleanup(namespace, id, bundle).await;
        }
        // What outlives a shim: a rootfs mount, and the cgroup its worker was in (the worker
        // died with the shim).
        unmount_rootfs(bundle);
        yard_shim_kit::cgroup::remove_for_bundle(bundle, id);
        Ok(())
    }

    /// The task's worker (a new one, or a group's warm one) joins the task's cgroup.
    fn migrates_into_task_cgroup(&self) -> bool {
        true
    }

    /// A group's shim keeps its worker and compiled modules for the group's next task.
    fn idle_exit(&self) -> Option<std::time::Duration> {
        Some(yard_shim_kit::engine::GROUP_IDLE_EXIT)
    }

    async fn shutdown(&self) {
        let worker = self.worker.lock().await.take();
        if let Some(w) = worker {
            w.close();
            let gone = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                yard_shim_kit::reaper::global().wait(w.pid, w.mark),
            )
            .await;
            if gone.is_err() {
                w.kill("it did not end within 5 s of the shim's shutdown");
            }
            w.placement
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }
}

impl WasmEngine {
    fn take_prewarm(&self) -> Option<Prewarm> {
        self.prewarm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    async fn compiler(&self, options: &Options) -> Result<Arc<Compiler>> {
        self.compiler
            .get_or_try_init(|| async {
                let prewarm = self.take_prewarm();
                if let Some(p) = prewarm {
                    // Hand the prewarmed worker over, if it was made with these options.
                    if let Some(w) = p.worker
                        && w.options == *options
                    {
                        *self.worker.lock().await = Some(Arc::new(w));
                    }
                    let c = tokio::task::spawn_blocking(move || p.compiler.join())
                        .await
                        .ok()
                        .and_then(|r| r.ok());
                    if let Some(Ok(c)) = c
                        && c.options() == options
                    {
                        return Ok(Arc::new(c));
                    }
                }
                let options = options.clone();
                tokio::task::spawn_blocking(move || Compiler::new(options))
                    .await
                    .map_err(|e| Error::Internal(format!("compiler: {e}")))?
                    .map(Arc::new)
            })
            .await
            .cloned()
    }

    /// The shim's worker, started (again) if there is none or it has ended. A task in a pod
    /// (`netns`) needs the worker that runs in that pod's network namespace; one that runs
    /// elsewhere is replaced while it has no tasks, and refused otherwise: one shim's guests
    /// share one network (a task outside a pod has none, so any worker does).
    async fn worker(&self, options: &Options, netns: Option<&Path>) -> Result<Arc<Worker>> {
        let netns = netns.map(PodNetns::open).transpose()?;
        let mut w = self.worker.lock().await;
        if let Some(cur) = &*w
            && cur.alive()
        {
            if cur.options != *options {
                return Err(Error::FailedPrecondition(
                    "options: this shim's wasm worker runs with other runtime options".into(),
                ));
            }
            let same = match (&netns, &cur.netns) {
                (None, _) => true,
                (Some(want), Some((_, id))) => want.id == *id,
                (Some(_), None) => false,
            };
            if same {
                cur.watch();
                return Ok(cur.clone());
            }
            if cur.task_count() > 0 {
                let serves = match &cur.netns {
                    Some((p, _)) => format!("the network namespace {}", p.display()),
                    None => "the shim's network namespace".into(),
                };
                let want = netns
                    .as_ref()
                    .map(|n| n.path.display().to_string())
                    .unwrap_or_default();
                return Err(Error::FailedPrecondition(format!(
                    "linux.namespaces: network namespace {want}: this shim's wasm worker serves \
                     {serves} (one shim serves one pod's network)"
                )));
            }
            tracing::debug!(?netns, "wasm worker: into the pod's network namespace");
            cur.close();
        }
        let fresh = Arc::new(Worker::spawn(
            options.clone(),
            netns,
            &self.log_filter,
            &self.namespace,
            &self.id,
        )?);
        fresh.watch();
        *w = Some(fresh.clone());
        Ok(fresh)
    }

    /// The detached tree the worker gets as a task's root, idmapped to the worker's user
    /// namespace if it has one: the tree itself, or, for the overlay the kit mounted (which
    /// cannot be idmapped), its layers (`idmap.rs`).
    fn task_root(
        &self,
        req: &CreateRequest,
        rootfs: &Path,
        readonly: bool,
        worker: &Worker,
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        match (worker.userns(), req.mounted.as_slice()) {
            (Some(ns), [m]) if m.type_ == "overlay" && rootfs == req.bundle.join("rootfs") => {
                let o = &worker.options;
                crate::idmap::remount_overlay(rootfs, m, ns, (o.worker_uid, o.worker_gid))?;
                crate::sys::detached_tree(rootfs, readonly, None)
            }
            (ns, _) => crate::sys::detached_tree(rootfs, readonly, ns),
        }
    }

    async fn create_task(
        &self,
        req: &CreateRequest,
        spec: &Spec,
        mounted: bool,
    ) -> Result<Arc<dyn Container>> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("config.json: process: missing".into()))?;
        let args = process.args().clone().unwrap_or_default();
        let Some(arg0) = args.first() else {
            return Err(Error::InvalidArgument(
                "config.json: process.args: empty (args[0] names the .wasm file to run)".into(),
            ));
        };
        let Rootfs::Dir(rootfs) = req.rootfs.clone() else {
            return Err(Error::Internal(
                "rootfs: mounts handed over unmounted".into(),
            ));
        };
        let readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let cwd = process.cwd().to_string_lossy().into_owned();
        let module = module_path(&rootfs, &cwd, arg0)?;
        let env: Vec<(String, String)> = process
            .env()
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (kv.clone(), String::new()),
            })
            .collect();
        let annotations: HashMap<String, String> = spec.annotations().clone().unwrap_or_default();
        let linux = spec.linux().as_ref();
        let resources = linux.and_then(|l| l.resources().as_ref());
        let memory_limit = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        let cgroup = linux.and_then(|l| l.cgroups_path().clone());
        let cpu = resources.and_then(|r| r.cpu().clone());
        let options = Options::from_any(req.options.as_ref())?;
        // In a pod (CRI names the sandbox's network namespace), the listener and the guests'
        // network are the pod's.
        let netns = spec_netns(spec);
        let settings = TaskSettings::new(&options, &annotations, memory_limit, netns.is_some())?;
        let compiler = self.compiler(&options).await?;
        let worker = self.worker(&options, netns.as_deref()).await?;

        let what = format!("process.args[0] {arg0}");
        let src = {
            let (c, m, w) = (compiler.clone(), module.clone(), what.clone());
            tokio::task::spawn_blocking(move || c.read(&m, &w))
                .await
                .map_err(|e| Error::Internal(format!("read task: {e}")))??
        };
        let digest = src.digest.clone();
        let loaded = match worker.loaded(&digest) {
            Some(l) => l,
            None => self.load(&compiler, &worker, src, &what).await?,
        };
        tracing::debug!(id = %req.id, kind = ?loaded, "prepared");
        let home = worker
            .placement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .home(cgroup.as_deref());
        crate::policy::check(spec, &options, home)?;

        let root = self
            .task_root(req, &rootfs, readonly, &worker)
            .map_err(|e| {
                let idmap = if worker.userns().is_some() {
                    " (idmapped to the worker's user namespace: the filesystem may not support \
                 idmapped mounts; the runtime options worker_uid = 0 and worker_gid = 0 run the \
                 worker without one)"
                } else {
                    ""
                };
                Error::Internal(format!(
                    "root.path {}: cannot make the task's root{idmap}: {e}",
                    rootfs.display()
                ))
            })?;
        let (stdin, stdout, stderr, stdin_closer, console) = if req.stdio.terminal {
            let (master, slave) = open_pty()?;
            let console = yard_shim_kit::stdio::ConsoleCopy::start(
                master,
                &req.stdio,
                &req.namespace,
                &req.id,
            )?;
            let dup = |f: &File| f.try_clone().map_err(Error::io("dup pty"));
            (
                dup(&slave)?,
                dup(&slave)?,
                slave,
                StdinCloser::default(),
                Some(console),
            )
        } else {
            let o = stdio::open(&req.stdio, &req.namespace, &req.id)?;
            (o.stdin, o.stdout, o.stderr, o.stdin_closer, None)
        };
        let task = RemoteTask::new(
            RemoteParts {
                id: req.id.clone(),
                worker: worker.clone(),
                loaded,
                listen: settings.http_listen,
                netns,
                bundle: req.bundle.clone(),
                mounted,
                stdin_closer,
                console,
            },
            req.events.clone(),
        );
        let msg = ToWorker::Create {
            task: req.id.clone(),
            digest,
            guest: Box::new(GuestSpec {
                args,
                env,
                cwd,
                readonly,
                settings,
            }),
        };
        let created = worker
            .call(
                msg,
                &[root.as_fd(), stdin.as_fd(), stdout.as_fd(), stderr.as_fd()],
            )
            .await;
        // The worker holds its own copies now (or failed): the parent's go, so the client sees
        // EOF when the guest's end.
        drop((root, stdin, stdout, stderr));
        if let Err(e) = created {
            task.abandon();
            return Err(e);
        }
        let (deferred, placed) = {
            let mut p = worker.placement.lock().unwrap_or_else(|p| p.into_inner());
            let deferred = p.add(&req.id, cgroup.as_deref(), cpu);
            (deferred, p.place(worker.pid))
        };
        let container = Arc::new(RemoteContainer { task });
        if let Err(e) = placed {
            let _ = container.delete(true).await;
            return Err(e);
        }
        if deferred {
            worker.place_after(crate::cgroup::ACCOUNT_AFTER);
        }
        Ok(container)
    }

    /// Compile (or take from the cache) and hand to the worker; an artifact the worker cannot
    /// load (a cache entry from another engine) is dropped and compiled afresh once.
    async fn load(
        &self,
        compiler: &Arc<Compiler>,
        worker: &Worker,
        src: crate::compile::Source,
        what: &str,
    ) -> Result<Loaded> {
        let src = Arc::new(src);
        for attempt in 0..2 {
            let artifact = {
                let (c, s, w) = (compiler.clone(), src.clone(), what.to_owned());
                tokio::task::spawn_blocking(move || c.artifact(&s, &w))
                    .await
                    .map_err(|e| Error::Internal(format!("compile task: {e}")))??
            };
            match worker
                .load(&src.digest, src.kind == Kind::Component, &artifact, what)
                .await
            {
                Err(Error::Internal(e)) if attempt == 0 => {
                    tracing::warn!(error = %e, "stale cache entry");
                    compiler.discard(&src);
                }
                r => return r,
            }
        }
        Err(Error::Internal(format!(
            "{what}: cannot load the compiled code"
        )))
    }
}

/// The network namespace a spec names (a pod's: CRI names the sandbox's).
fn spec_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
        .and_then(|n| n.path().clone())
}

/// The host path of `arg0` inside `rootfs`: absolute, or relative to the process's cwd;
/// `..` stops at the root and symlinks may not lead out of it.
fn module_path(rootfs: &Path, cwd: &str, arg0: &str) -> Result<PathBuf> {
    let what = format!("process.args[0] {arg0}");
    let inside = if arg0.starts_with('/') {
        PathBuf::from(arg0)
    } else {
        Path::new(if cwd.is_empty() { "/" } else { cwd }).join(arg0)
    };
    let mut clean = PathBuf::new();
    for c in inside.components() {
        match c {
            Component::Normal(x) => clean.push(x),
            Component::ParentDir => {
                clean.pop();
            }
            _ => {}
        }
    }
    let host = rootfs.join(&clean);
    let canon = host
        .canonicalize()
        .map_err(|e| Error::InvalidArgument(format!("{what}: not found in the rootfs ({e})")))?;
    let root = rootfs
        .canonicalize()
        .map_err(Error::io(format!("resolve {}", rootfs.display())))?;
    if !canon.starts_with(&root) {
        return Err(Error::InvalidArgument(format!(
            "{what}: resolves outside the rootfs"
        )));
    }
    if !canon.is_file() {
        return Err(Error::InvalidArgument(format!("{what}: not a file")));
    }
    Ok(canon)
}

/// A pty pair for a terminal task: the kit copies between the master and the client's fifos,
/// the guest gets the slave as its stdio.
fn open_pty() -> Result<(std::os::fd::OwnedFd, File)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let io = |what: &'static str| move |e: rustix::io::Errno| Error::io(what)(e.into());
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(io("open a pty"))?;
    grantpt(&master).map_err(io("grantpt"))?;
    unlockpt(&master).map_err(io("unlockpt"))?;
    let name = ptsname(&master, Vec::new()).map_err(io("ptsname"))?;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
    let slave = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    Ok((master, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_stay_in_the_rootfs() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        std::fs::create_dir_all(root.join("app")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(root.join("app/hello.wasm"), b"x").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("/etc/passwd", root.join("escape.wasm"))
            .unwrap_or_else(|e| panic!("{e}"));
        let ok = |cwd: &str, a: &str| module_path(root, cwd, a).map_err(|e| e.to_string());
        assert!(ok("/", "/app/hello.wasm").is_ok());
        assert!(ok("/app", "hello.wasm").is_ok());
        assert!(ok("/", "/../../app/hello.wasm").is_ok());
        let e = ok("/", "/escape.wasm").err().unwrap_or_default();
        assert!(e.contains("outside the rootfs"), "{e}");
        let e = ok("/", "/missing.wasm").err().unwrap_or_default();
        assert!(
            e.starts_with("process.args[0] /missing.wasm: not found"),
            "{e}"
        );
        let e = ok("/", "/app").err().unwrap_or_default();
        assert!(e.ends_with("not a file"), "{e}");
    }
}
