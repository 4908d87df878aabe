//! Runtime mode: `yard-agent runtime --log F [--debug] create|exec ...`, the single-threaded
//! libcontainer front end the agent re-executes for every container create and exec (start and
//! delete need no fork and run in the agent). The mode itself lives in `yard-oci-runtime`,
//! shared with the native shim; this names what is the agent's own. The agent's build has no
//! libseccomp: the runtime refuses a spec with `linux.seccomp` rather than run it unfiltered
//! (`spec.rs` leaves the filter out of the guest's spec; the vm shim decides whether that is
//! allowed).

use std::path::Path;

pub use yard_oci_runtime::{EXIT_FAILED, EXIT_INVALID, MODE, last_error};

/// libcontainer's state directory (one subdirectory per container).
pub const STATE_ROOT: &str = "/run/yard/state";

const OPTIONS: yard_oci_runtime::Options = yard_oci_runtime::Options {
    default_root: STATE_ROOT,
    after_create: Some(loopback_up),
};

/// Entry point; `args` are the arguments after `runtime`. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    yard_oci_runtime::main(args, &OPTIONS)
}

/// A new network namespace has only a loopback interface, and it is down: bring it up, as runc
/// does. Runs in the single-threaded runtime process, so entering the namespace is sound.
fn loopback_up(pid: i32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let theirs = Path::new("/proc").join(pid.to_string()).join("ns/net");
    if std::fs::metadata(&theirs)?.ino() == std::fs::metadata("/proc/self/ns/net")?.ino() {
        return Ok(());
    }
    let ns = std::fs::File::open(&theirs)?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    crate::network::loopback_up()
}
