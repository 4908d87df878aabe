//! `containerd-shim-yard-native-v1`: Switchyard's runc-class shim.
//!
//! Two modes in one binary: the shim (containerd's `start` / `delete` / serve, via the kit), and
//! runtime mode (`runtime ...`), the single-threaded libcontainer front end the shim re-executes
//! for every create and exec. Runtime mode is dispatched before anything starts a thread.

mod runtime;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(runtime::MODE) {
        std::process::exit(runtime::main(&args[2..]));
    }
    yard_shim_kit::run(env!("CARGO_PKG_VERSION"), |_| {
        yard_oci_runtime::engine::LinuxEngine::new(yard_oci_runtime::engine::NATIVE)
    })
}
