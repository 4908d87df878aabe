//! `containerd-shim-yard-vm-v1`: Switchyard's microVM shim. Each sandbox (a task, or the tasks
//! of one group or pod) runs in its own VM; the guest agent runs the containers. See
//! `docs/vm.md`.
//!
//! Besides containerd's shim command line it has one mode of its own:
//! `containerd-shim-yard-vm-v1 info [OPTIONS_JSON]` prints, as JSON, what the runtime would use
//! on this host (backend, accelerator, virtualization facts, guest files); `yard info` shows it.

use std::io::Write;

use containerd_shim_yard_vm_v1::{config::Options, engine::VmEngine, info};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("info") {
        let options = match args.get(2) {
            None => Ok(Options::default()),
            Some(json) => {
                serde_json::from_str::<Options>(json).map_err(|e| format!("options: {e}"))
            }
        };
        let report = match options {
            Ok(o) => info::report(&o),
            Err(e) => serde_json::json!({ "error": e }),
        };
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{report}");
        std::process::exit(0);
    }
    yard_shim_kit::run(env!("CARGO_PKG_VERSION"), |_| VmEngine::new())
}
