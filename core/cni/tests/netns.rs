//! The netns holder on the real kernel: needs root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::os::unix::fs::MetadataExt;

use switchyard_cni::netns::Kind;
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

/// Issue 19: the containers of a pod talk to each other on `127.0.0.1` (a sidecar to a Wasm
/// function's listener). With `lo` down, a connection there left by the default route and hung;
/// a new namespace has it up, as containerd's pods have.
#[test]
fn issue19_a_new_netns_has_loopback_up() {
    if !common::require_root_and(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create(&dir.path().join("netns"), "pod-lo").unwrap();
    let _guard = Guard(ns.clone());
    let echoed = ns
        .run_in(|| -> std::io::Result<Vec<u8>> {
            use std::io::{Read, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let mut client = std::net::TcpStream::connect(listener.local_addr()?)?;
            let (mut server, _) = listener.accept()?;
            client.write_all(b"ping")?;
            let mut got = [0u8; 4];
            server.read_exact(&mut got)?;
            Ok(got.to_vec())
        })
        .unwrap();
    assert_eq!(echoed.unwrap(), b"ping");
}

/// A pod's IPC and UTS namespaces held the same way: new ones (not the host's), the UTS one
/// with the pod's hostname, while the host's hostname is untouched; a bad hostname is refused
/// before anything is made.
#[test]
fn ipc_and_uts_namespaces_with_a_hostname() {
    if !common::require_root_and(&["nsenter", "hostname"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let ipc = Netns::create_kind(&dir.path().join("ipc"), "pod-a", Kind::Ipc).unwrap();
    let _ipc_guard = Guard(ipc.clone());
    let uts = Netns::create_kind(
        &dir.path().join("uts"),
        "pod-a",
        Kind::Uts {
            hostname: "pod-a-host",
        },
    )
    .unwrap();
    let _uts_guard = Guard(uts.clone());
    for (ns, kind) in [(&ipc, "ipc"), (&uts, "uts")] {
        assert!(ns.exists(), "{kind}");
        let host = std::fs::metadata(format!("/proc/thread-self/ns/{kind}"))
            .unwrap()
            .ino();
        assert_ne!(std::fs::metadata(ns.path()).unwrap().ino(), host, "{kind}");
    }
    let (ok, out) = common::run(&[
        "nsenter",
        &format!("--uts={}", uts.path().display()),
        "hostname",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "pod-a-host");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );

    let long = "h".repeat(65);
    for bad in ["", long.as_str()] {
        let e = Netns::create_kind(&dir.path().join("uts"), "bad", Kind::Uts { hostname: bad });
        assert!(matches!(e, Err(NetnsError::InvalidHostname(_))), "{e:?}");
    }
    assert!(!dir.path().join("uts/bad").exists());
    ipc.remove().unwrap();
    uts.remove().unwrap();
    assert!(!ipc.path().exists() && !uts.path().exists());
}

/// Removes the namespace even when an assertion failed.
struct Guard(Netns);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}
