//! The kit's engine for Wasm: reads the bundle, finds the `.wasm` named by `process.args[0]`
//! inside the rootfs, compiles (or loads) it, and wires its stdio.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use tokio::sync::OnceCell;
use yard_shim_kit::bundle::unmount_rootfs;
use yard_shim_kit::stdio::{self, ConsoleCopy, StdinCloser};
use yard_shim_kit::{Container, CreateRequest, Engine, Error, Result, Rootfs};

use crate::config::{Options, TaskSettings};
use crate::runtime::Runtime;
use crate::task::{Control, Guest, TaskParts, WasmContainer, WasmProcess};

#[derive(Default)]
pub struct WasmEngine {
    runtime: OnceCell<Arc<Runtime>>,
    /// The engine being built ahead of the first Create (serve mode), with the options found
    /// in the bundle.
    prewarm: std::sync::Mutex<Option<std::thread::JoinHandle<Result<Runtime>>>>,
}

impl WasmEngine {
    /// For the shim server: start building the wasmtime engine (pooling allocator, linkers,
    /// guest runtime) right away, so it overlaps with containerd connecting and sending
    /// Create. The options come from the bundle's `options.json` (switchyardd writes it; the
    /// server runs in the bundle directory), else the defaults; Create checks they match.
    pub fn prewarmed() -> WasmEngine {
        let options = std::fs::read("options.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<Options>(&b).ok())
            .unwrap_or_default();
        let handle = std::thread::Builder::new()
            .name("wasm-prewarm".into())
            .spawn(move || Runtime::new(options))
            .ok();
        WasmEngine {
            runtime: OnceCell::new(),
            prewarm: std::sync::Mutex::new(handle),
        }
    }
}

#[async_trait]
impl Engine for WasmEngine {
    fn name(&self) -> &'static str {
        "containerd-shim-yard-wasm-v1"
    }

    async fn create(&self, req: CreateRequest) -> Result<Arc<dyn Container>> {
        // The kit has read the spec and mounted the rootfs (and unmounts it).
        self.create_task(&req, &req.spec, false).await
    }

    async fn cleanup(&self, _namespace: &str, _id: &str, bundle: &Path) -> Result<()> {
        // Nothing of a Wasm task outlives its shim but a rootfs mount.
        unmount_rootfs(bundle);
        Ok(())
    }
}

impl WasmEngine {
    async fn runtime(&self, req: &CreateRequest) -> Result<Arc<Runtime>> {
        self.runtime
            .get_or_try_init(|| async {
                let options = Options::from_any(req.options.as_ref())?;
                let prewarm = self
                    .prewarm
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(h) = prewarm {
                    let want = options.clone();
                    // A runtime built with other options is dropped here, off the async
                    // threads (dropping a tokio runtime there panics).
                    let rt = tokio::task::spawn_blocking(move || match h.join() {
                        Ok(Ok(rt)) if rt.options == want => Some(rt),
                        _ => None,
                    })
                    .await;
                    if let Ok(Some(rt)) = rt {
                        return Ok(Arc::new(rt));
                    }
                }
                tracing::info!(?options, "starting the wasmtime engine");
                Runtime::new(options).map(Arc::new)
            })
            .await
            .cloned()
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
        let memory_limit = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        let runtime = self.runtime(req).await?;
        let settings = TaskSettings::new(&runtime.options, &annotations, &env, memory_limit)?;
        let prepared = runtime
            .prepare(&module, format!("process.args[0] {arg0}"))
            .await?;
        tracing::debug!(id = %req.id, kind = prepared.kind(), "prepared");

        let (stdin, stdout, stderr, stdin_closer, console) = if req.stdio.terminal {
            let (master, slave) = open_pty()?;
            let console = ConsoleCopy::start(master, &req.stdio, &req.namespace, &req.id)?;
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
        let guest = Guest {
            id: req.id.clone(),
            args,
            env,
            rootfs,
            readonly: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            cwd,
            memory_limit: Arc::new(AtomicU64::new(settings.memory_limit.unwrap_or(0))),
            memory_used: Arc::new(AtomicU64::new(0)),
            settings,
            control: Arc::new(Control::default()),
            stderr: Default::default(),
            stdout: Default::default(),
        };
        let init = WasmProcess::new(TaskParts {
            runtime,
            prepared,
            guest,
            stdin,
            stdout,
            stderr,
            stdin_closer,
            console,
            events: req.events.clone(),
        })?;
        Ok(Arc::new(WasmContainer {
            init,
            bundle: req.bundle.clone(),
            mounted,
        }))
    }
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
