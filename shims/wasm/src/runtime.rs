//! The worker's wasmtime side, shared by every task of a shim: one `Engine` (with a pooling
//! allocator sized from the options), the WASI linkers (with the open guard of `fsguard.rs`),
//! the loaded templates by module digest, the epoch ticker that interrupts running guests, and
//! the multi-threaded tokio runtime guests run on. Compiling happens in the parent
//! (`compile.rs`); the worker only loads what the parent hands it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Config, Engine, InstancePre, Linker, PoolingAllocationConfig};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};
use yard_shim_kit::{Error, Result};

use crate::config::Options;
use crate::ipc::Loaded;

/// How often running guests reach an interruption point (kill, pause, timeout, fair sharing).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Linear memory accounting and the memory limit of one store. `total` and `limit` are shared
/// by every store of a task (an HTTP task has one per request in flight), so `Stats` sees the
/// task's whole use and `Update` can change the limit.
pub struct Limits {
    /// Bytes; 0 means no limit.
    pub limit: Arc<AtomicU64>,
    /// Linear memory this store holds.
    used: u64,
    /// Linear memory the task holds.
    pub total: Arc<AtomicU64>,
    /// The size a refused grow asked for (0: none refused).
    pub refused: Arc<AtomicU64>,
}

impl Limits {
    pub fn new(limit: Arc<AtomicU64>, total: Arc<AtomicU64>) -> Limits {
        Limits {
            limit,
            used: 0,
            total,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        self.total.fetch_sub(self.used, Ordering::Relaxed);
    }
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let want = self.used.saturating_sub(current as u64) + desired as u64;
        let limit = self.limit.load(Ordering::Relaxed);
        if limit > 0 && want > limit {
            self.refused.store(want, Ordering::Relaxed);
            return Ok(false);
        }
        self.total
            .fetch_add(want.saturating_sub(self.used), Ordering::Relaxed);
        self.used = want;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

/// Store data of a core module (WASI preview 1).
pub struct P1State {
    pub wasi: WasiP1Ctx,
    pub limits: Limits,
}

/// Store data of a component (WASI 0.2: `wasi:cli/command` or `wasi:http/proxy`).
pub struct P2State {
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub hooks: crate::http::Hooks,
    pub limits: Limits,
    /// Sockets the instance may hold at once (`netguard.rs`).
    pub max_sockets: usize,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for P2State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// A module or component, compiled and linked, ready to instantiate.
#[derive(Clone)]
pub enum Prepared {
    /// A core module run through its `_start` export.
    Module(InstancePre<P1State>),
    /// A component exporting `wasi:cli/run`.
    Command(CommandPre<P2State>),
    /// A component exporting `wasi:http/incoming-handler`.
    Http(ProxyPre<P2State>),
}

impl Prepared {
    pub fn loaded(&self) -> Loaded {
        match self {
            Prepared::Module(_) => Loaded::Module,
            Prepared::Command(_) => Loaded::Command,
            Prepared::Http(_) => Loaded::Http,
        }
    }
}

pub struct Runtime {
    pub engine: Engine,
    modules: Linker<P1State>,
    components: wasmtime::component::Linker<P2State>,
    prepared: Mutex<HashMap<String, Prepared>>,
    /// Guests run here.
    pub guests: tokio::runtime::Runtime,
    running: Arc<AtomicUsize>,
    ticker: std::thread::Thread,
}

/// Counts a running guest for as long as it lives; the epoch ticker only ticks while any does.
pub struct RunningGuard {
    running: Arc<AtomicUsize>,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Runtime {
    pub fn new(options: Options, workers: usize) -> Result<Runtime> {
        let engine = Engine::new(&engine_config(&options, true))
            .map_err(|e| Error::Internal(format!("wasmtime engine: {e}")))?;
        let mut modules = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut modules, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| Error::Internal(format!("link WASI preview 1: {e}")))?;
        let mut components = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut components)
            .map_err(|e| Error::Internal(format!("link WASI 0.2: {e}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut components)
            .map_err(|e| Error::Internal(format!("link wasi:http: {e}")))?;
        crate::fsguard::add_to_linkers(&mut modules, &mut components)
            .map_err(|e| Error::Internal(format!("link the WASI open guard: {e}")))?;
        crate::netguard::add_to_linker(&mut components)
            .map_err(|e| Error::Internal(format!("link the WASI socket bound: {e}")))?;
        let guests = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("wasm-guest")
            .enable_all()
            .build()
            .map_err(Error::io("start the guest runtime"))?;
        let running = Arc::new(AtomicUsize::new(0));
        let ticker = {
            let engine = engine.clone();
            let running = running.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    loop {
                        if running.load(Ordering::Acquire) == 0 {
                            std::thread::park();
                            continue;
                        }
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(Error::io("start the epoch ticker"))?
                .thread()
                .clone()
        };
        Ok(Runtime {
            engine,
            modules,
            components,
            prepared: Mutex::new(HashMap::new()),
            guests,
            running,
            ticker,
        })
    }

    pub fn running(&self) -> RunningGuard {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.ticker.unpark();
        RunningGuard {
            running: self.running.clone(),
        }
    }

    /// A loaded template, by module digest.
    pub fn prepared(&self, digest: &str) -> Option<Prepared> {
        self.lock().get(digest).cloned()
    }

    /// Load the artifact the parent compiled (or took from its cache) and link it; `what` names
    /// the module in errors (`process.args[0] /app.wasm`). CPU work, for a blocking thread.
    pub fn load(
        &self,
        digest: &str,
        component: bool,
        artifact: &[u8],
        what: &str,
    ) -> Result<Loaded> {
        if let Some(p) = self.prepared(digest) {
            return Ok(p.loaded());
        }
        let prepared = if component {
            let component =
                crate::sys::deserialize_component(&self.engine, artifact).map_err(|e| {
                    Error::Internal(format!("{what}: load the compiled component: {e}"))
                })?;
            let pre = self.components.instantiate_pre(&component).map_err(|e| {
                Error::InvalidArgument(format!("{what}: cannot link the component: {e}"))
            })?;
            match ProxyPre::new(pre.clone()) {
                Ok(p) => Prepared::Http(p),
                Err(_) => Prepared::Command(CommandPre::new(pre).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{what}: the component exports neither wasi:cli/run nor \
                         wasi:http/incoming-handler: {e}"
                    ))
                })?),
            }
        } else {
            let module = crate::sys::deserialize_module(&self.engine, artifact)
                .map_err(|e| Error::Internal(format!("{what}: load the compiled module: {e}")))?;
            if module.get_export("_start").is_none() {
                return Err(Error::InvalidArgument(format!(
                    "{what}: the module exports no _start function (not a WASI command)"
                )));
            }
            let pre = self.modules.instantiate_pre(&module).map_err(|e| {
                Error::InvalidArgument(format!("{what}: cannot link the module: {e}"))
            })?;
            Prepared::Module(pre)
        };
        let loaded = prepared.loaded();
        self.lock().insert(digest.to_owned(), prepared);
        Ok(loaded)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Prepared>> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine configuration from the options. The parent compiles with `pooling` off (it runs
/// nothing); the artifact is the same, since the allocation strategy is not part of what
/// wasmtime checks when loading one (a test below holds that true).
pub fn engine_config(o: &Options, pooling: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    c.consume_fuel(o.fuel > 0);
    if pooling && o.max_instances > 0 {
        let n = o.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_core_instances_per_component(8)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_memory_size(usize::try_from(o.max_memory_mib << 20).unwrap_or(usize::MAX));
        c.allocation_strategy(pool);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_refuses_past_the_limit() {
        use wasmtime::ResourceLimiter as _;
        let total = Arc::new(AtomicU64::new(0));
        let limit = Arc::new(AtomicU64::new(2 << 20));
        let mut l = Limits::new(limit.clone(), total.clone());
        assert!(l.memory_growing(0, 1 << 20, None).unwrap_or(false));
        assert!(l.memory_growing(1 << 20, 2 << 20, None).unwrap_or(false));
        assert!(!l.memory_growing(2 << 20, 3 << 20, None).unwrap_or(true));
        assert_eq!(l.refused.load(Ordering::Relaxed), 3 << 20);
        let mut other = Limits::new(limit.clone(), total.clone());
        assert!(other.memory_growing(0, 1 << 20, None).unwrap_or(false));
        assert_eq!(total.load(Ordering::Relaxed), 3 << 20);
        drop(l);
        assert_eq!(total.load(Ordering::Relaxed), 1 << 20);
        // Raising the limit (Update) lets the next grow through.
        limit.store(0, Ordering::Relaxed);
        assert!(
            other
                .memory_growing(1 << 20, 64 << 20, None)
                .unwrap_or(false)
        );
    }
}
