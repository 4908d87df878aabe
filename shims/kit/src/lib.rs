//! What every Switchyard shim shares: the shim v2 command line (`start`, `delete`, serve), the
//! containerd task service (a ttrpc adapter over the task state machine, which drives a small
//! [`Engine`] trait), event publishing through an [`EventSink`], the bundle's spec and rootfs,
//! stdio (fifos, `file://`, `binary://`, terminals), exit reaping, and one error type with one
//! mapping to ttrpc codes.
//!
//! A shim's `main` checks for its own extra modes first (the native shim's runtime mode must run
//! before any thread exists), then calls [`run`].

pub mod bundle;
pub mod cgroup;
pub mod engine;
pub mod error;
pub mod events;
pub mod ident;
pub mod perms;
pub mod reaper;
pub mod service;
pub mod start;
pub mod stdio;
pub mod sys;
pub mod task;

use std::io::Write;
use std::sync::Arc;

pub use containerd_shim_protos as protos;
pub use engine::{
    Container, CreateRequest, Engine, ExecRequest, Exit, Process, ProcessInfo, Rootfs,
};
pub use error::{Error, Result};
pub use events::{Event, EventSink, Publisher};

/// Run the shim: parse containerd's flags and do what the action asks. Never returns.
pub fn run<E: Engine>(version: &str, make_engine: impl FnOnce(&containerd_shim::Flags) -> E) -> ! {
    // Before anything is created: sockets, state, logs and images are the shim's alone.
    sys::restrict_umask();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => fail(&format!("command line: {e}")),
    };
    if flags.version {
        let name = args
            .first()
            .and_then(|a| std::path::Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(std::io::stdout(), "{name}\n  Version: {version}");
        std::process::exit(0);
    }
    match flags.action.as_str() {
        "start" => {
            init_logging(&flags, Log::Stderr);
            let engine = make_engine(&flags);
            if engine.migrates_into_task_cgroup() {
                cgroup::prewarm_migration_in_child();
            }
            match start::start(&engine, &flags) {
                Ok(address) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(address.as_bytes());
                    let _ = out.flush();
                    std::process::exit(0)
                }
                Err(e) => fail(&format!("start: {e}")),
            }
        }
        "delete" => {
            init_logging(&flags, Log::Stderr);
            let engine = make_engine(&flags);
            let rt = runtime();
            let r = rt.block_on(async {
                reaper::start().map_err(Error::io("become subreaper"))?;
                start::delete(&engine, &flags).await
            });
            match r {
                Ok(bytes) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&bytes);
                    let _ = out.flush();
                    std::process::exit(0)
                }
                Err(e) => fail(&format!("delete: {e}")),
            }
        }
        "" if !flags.socket.is_empty() => {
            // First, while no file has been opened: descriptor 3 is `start`'s socket or none.
            let inherited = sys::inherited_listener(&start::server_socket(&flags));
            init_logging(&flags, Log::Fifo);
            install_panic_hook();
            let engine = Arc::new(make_engine(&flags));
            let rt = runtime();
            let r = rt.block_on(async {
                reaper::start().map_err(Error::io("become subreaper"))?;
                start::serve(engine, &flags, inherited).await
            });
            match r {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    tracing::error!(error = %e, "shim server failed");
                    std::process::exit(1)
                }
            }
        }
        other => fail(&format!(
            "unknown action {other:?}: expected start or delete (or -socket to serve)"
        )),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&format!("tokio runtime: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "{msg}");
    std::process::exit(1)
}

enum Log {
    Stderr,
    /// containerd's `log` fifo in the bundle directory (the server's working directory).
    Fifo,
}

fn init_logging(flags: &containerd_shim::Flags, to: Log) {
    // libcgroups warns about every controller the host lacks; only its errors matter here.
    let level = if flags.debug {
        // The compiler crates under wasmtime log every pass at debug: thousands of lines per
        // module, drowning the shim's own.
        "debug,cranelift_codegen=info,cranelift_frontend=info,wasmtime_cranelift=info,regalloc2=info"
    } else {
        "info,libcgroups=error,libcontainer=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let log = match to {
        Log::Stderr => None,
        // Non-blocking open: a fifo without a reader must not hang the shim.
        Log::Fifo => std::fs::OpenOptions::new()
            .read(false)
            .write(true)
            .custom_flags_nonblock()
            .open("log")
            .ok(),
    };
    let _ = match log {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "shim panicked");
    }));
}
