//! The test kit shared by the integration tests, the benchmarks and the shims' and the guest
//! agent's own tests: prerequisite gates that skip with a printed reason ([`gate`]), commands run
//! with a deadline and shown on failure ([`process`]), what a task leaves on the host
//! ([`host`]), a busybox rootfs ([`rootfs`]), switchyardd and containerd on private sockets with
//! their clients `yard` and `ctr` ([`daemon`]), and event collectors ([`events`]); image
//! fixtures ([`images`]), commands on a pseudo-terminal ([`pty`]), loopback ports ([`net`]), the Wasm test programs ([`wasm`]) and the nested-KVM harness
//! ([`nested`]).
//!
//! Everything of the first six, and [`net`]'s helpers, is re-exported here, so `use switchyard_tests::*;` is all a test
//! needs.
//!
//! Set `SWITCHYARD_REQUIRE_ALL=1` (CI does) to turn every skip into a failure, so a missing
//! prerequisite cannot pass silently.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::PathBuf;

pub mod accounting;
pub mod cri;
pub mod daemon;
pub mod events;
pub mod gate;
pub mod host;
pub mod images;
pub mod nested;
pub mod net;
pub mod process;
pub mod pty;
pub mod rootfs;
pub mod wasm;

pub use daemon::{
    CLIENT_DEADLINE, Containerd, Ctr, Daemon, Nofile, peer_containerd, require_peer_containerd,
    rss_kib,
};
pub use events::{CtrEvents, Events, Lines};
pub use gate::{
    cpu_has_hardware_virtualization, guest_dir, guest_kernel_and_initrd, is_root, kvm_is_pvm,
    require, require_guest, require_root_and, which,
};
pub use host::{
    alive, cgroups_matching, cgroups_with_prefix, cmdline, entries, fd_target, files_under,
    kill_cgroup_tree, listening_socket_inode, mount_points_under, mounts_matching, nofile_limit,
    open_fds, ppid, processes_matching, reaped, sigkill, sockets_under, zombie_children,
};
pub use net::{free_port, http_get, test_certificates};
pub use process::{
    KillOnDrop, eventually, run_piped, run_timeout, run_with_stdin, show, text, try_run, wait_child,
};
pub use rootfs::{busybox_binary, busybox_rootfs, busybox_tree, write};

/// The cargo target directory holding the workspace binaries (the one this test runs from).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A workspace binary, which must have been built (`scripts/build`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (scripts/build)",
        p.display()
    );
    p
}

/// A fresh id that no other test (or earlier run) uses.
pub fn unique_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A count from the environment (`RUNS`, `SWITCHYARD_VM_RUNS`, ...), or `default` when unset or
/// not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}
