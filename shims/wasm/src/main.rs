//! `containerd-shim-yard-wasm-v1`: Switchyard's Wasm shim. WASI preview 1 modules and WASI 0.2
//! components (commands and `wasi:http` edge functions) run on wasmtime, many tasks per shim
//! process, each an instance rather than a process.

mod cache;
mod config;
mod engine;
mod http;
mod runtime;
mod sys;
mod task;

/// Part of every cache key (wasmtime also checks its own version in the artifact header).
pub const WASMTIME_VERSION: &str = "wasmtime-48";

fn main() {
    yard_shim_kit::run(env!("CARGO_PKG_VERSION"), |flags| {
        if flags.socket.is_empty() {
            engine::WasmEngine::default()
        } else {
            engine::WasmEngine::prewarmed()
        }
    })
}
