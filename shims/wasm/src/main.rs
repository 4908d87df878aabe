//! `containerd-shim-yard-wasm-v1`: Switchyard's Wasm shim. WASI preview 1 modules and WASI 0.2
//! components (commands and `wasi:http` edge functions) run on wasmtime, many tasks per shim,
//! each an instance rather than a process, in one unprivileged worker process per shim. The
//! Linux containers of a Wasm pod (its sandbox, sidecars) run beside them through libcontainer,
//! as the native shim runs containers (`entrypoint.rs` decides which is which).

mod cache;
mod cgroup;
mod compile;
mod config;
mod engine;
mod entrypoint;
mod fsguard;
mod http;
mod idmap;
mod ipc;
mod netguard;
mod outgoing;
mod policy;
mod remote;
mod runtime;
mod sandbox;
mod sys;
mod task;
mod worker;

/// Part of every cache key (wasmtime also checks its own version in the artifact header).
pub const WASMTIME_VERSION: &str = "wasmtime-48";

fn main() {
    // The worker must confine itself before any thread exists: its mode comes first.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        worker::main(&args[2..]);
    }
    // So must runtime mode (libcontainer, for the Linux containers of a Wasm pod).
    if args.get(1).map(String::as_str) == Some(yard_oci_runtime::MODE) {
        std::process::exit(yard_oci_runtime::main(&args[2..], &engine::RUNTIME_OPTIONS));
    }
    yard_shim_kit::run(env!("CARGO_PKG_VERSION"), |flags| {
        if flags.socket.is_empty() {
            engine::WasmEngine::for_shim(flags)
        } else {
            engine::WasmEngine::prewarmed(flags)
        }
    })
}
