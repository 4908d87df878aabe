//! Runtime mode: `containerd-shim-yard-native-v1 runtime [--root R] [--log F] COMMAND ...`, the
//! single-threaded libcontainer front end the shim re-executes for every create and exec. The
//! mode itself lives in `yard-oci-runtime`, shared with the guest agent; this names what is the
//! native shim's own.

pub use yard_oci_runtime::MODE;

/// The shim always passes `--root` (`<state_root>/<namespace>`, `yard_oci_runtime::engine`);
/// this is runc's layout for a caller that does not.
const OPTIONS: yard_oci_runtime::Options = yard_oci_runtime::Options {
    default_root: yard_oci_runtime::engine::NATIVE.state_root,
    after_create: None,
};

/// Entry point; `args` are the arguments after `runtime`. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    yard_oci_runtime::main(args, &OPTIONS)
}
