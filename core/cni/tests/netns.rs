//! The netns holder on the real kernel: needs root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::os::unix::fs::MetadataExt;

use switchyard_cni::{Netns, NetnsError};

#[test]
fn create_join_and_remove_a_netns() {
    if !common::require_root_and(&["ip", "nsenter"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nsdir = dir.path().join("netns");
    let ns = Netns::create(&nsdir, "pod-a").unwrap();
    let guard = Guard(ns.clone());
    assert!(ns.exists());
    assert!(common::mounted(ns.path()));

    // The caller's thread is still in the host's netns.
    let host_ino = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    let ns_ino = ns.open().unwrap().metadata().unwrap().ino();
    assert_ne!(host_ino, ns_ino);
    // A thread that joined it sees it as its own; the namespace has nothing but loopback.
    let seen = ns
        .run_in(|| std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino())
        .unwrap();
    assert_eq!(seen, ns_ino);
    let (ok, out) = common::run(&[
        "nsenter",
        &format!("--net={}", ns.path().display()),
        "ip",
        "-o",
        "link",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("lo:"), "{out}");
    assert_eq!(
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(),
        host_ino
    );

    // The name is taken.
    assert!(matches!(
        Netns::create(&nsdir, "pod-a"),
        Err(NetnsError::Exists { .. })
    ));

    ns.remove().unwrap();
    assert!(!ns.exists());
    assert!(!ns.path().exists());
    assert!(!common::mounted(ns.path()));
    // Idempotent.
    ns.remove().unwrap();
    assert!(matches!(ns.open(), Err(NetnsError::Io { .. })));
    assert!(matches!(ns.run_in(|| ()), Err(NetnsError::Io { .. })));
    drop(guard);
}

/// Removes the namespace even when an assertion failed.
struct Guard(Netns);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}
