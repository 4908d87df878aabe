//! `yard-pause`: the process a pod sandbox container runs, as Kubernetes' `pause` does. It holds
//! the pod's namespaces open, reaps the zombies that end up with it as their init (containers that
//! share its PID namespace), and exits 0 on SIGTERM or SIGINT.
//!
//! Built statically (musl) into a one-file image, so a node needs no registry for its pods'
//! sandboxes. Everything happens in `sigwait`: no handler runs, so nothing here needs `unsafe`.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

fn main() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).is_err() {
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(_) => std::process::exit(0),
            Err(_) => std::process::exit(1),
        }
    }
}

/// Reaps every child that has exited (signals coalesce: one SIGCHLD may stand for many).
fn reap() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}
