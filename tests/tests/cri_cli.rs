//! `yard cri`, the crictl-like CRI client (issue 18), against real containerd 1.6, 1.7 and 2.1
//! with the CRI plugin and the `runc` handler (the oracle): a pod and a container made, listed,
//! inspected, exec'd into, logged, measured, stopped and removed; a bad handler refused with
//! the handler named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::process::Output;
use std::time::Duration;

use switchyard_tests::cri::{BUSYBOX_IMAGE, CriNode, Peer};
use switchyard_tests::{eventually, run_timeout, show, text};

const T: Duration = Duration::from_secs(120);

fn yard(node: &CriNode, args: &[&str]) -> Output {
    run_timeout(node.yard_cri().args(args), T)
}

#[track_caller]
fn yard_ok(node: &CriNode, args: &[&str]) -> String {
    let out = yard(node, args);
    assert!(
        out.status.success(),
        "yard cri {args:?}: {}\n{}",
        show(&out),
        node.log_text()
    );
    text(&out.stdout)
}

fn lifecycle(peer: Peer) {
    let Some(node) = CriNode::require(peer) else {
        return;
    };
    let version = yard_ok(&node, &["version"]);
    assert!(version.contains("RuntimeName:  containerd"), "{version}");
    assert!(version.contains("RuntimeApiVersion:  v1"), "{version}");
    let status = yard_ok(&node, &["status"]);
    assert!(status.contains("RuntimeReady true"), "{status}");

    let log_dir = node.pod_log_dir("cli");
    let log_dir = log_dir.to_str().unwrap();
    let ids = yard_ok(
        &node,
        &[
            "run",
            "--pod-name",
            "clipod",
            "--runtime",
            "runc",
            "--log-dir",
            log_dir,
            "--name",
            "app",
            "-e",
            "GREETING=hi",
            BUSYBOX_IMAGE,
            "--",
            "sh",
            "-c",
            "echo $GREETING from app; echo oops >&2; exec sleep 3600",
        ],
    );
    let ids: Vec<&str> = ids.lines().collect();
    let [pod, ctr] = ids[..] else {
        panic!("yard cri run printed {ids:?}, not a pod id and a container id")
    };

    let pods = yard_ok(&node, &["pods"]);
    assert!(
        pods.contains("clipod") && pods.contains("READY") && pods.contains("runc"),
        "{pods}"
    );
    assert_eq!(yard_ok(&node, &["pods", "-q"]).trim(), pod);
    let inspectp = yard_ok(&node, &["inspectp", pod]);
    assert!(inspectp.contains("state: SANDBOX_READY"), "{inspectp}");
    let ip = inspectp
        .lines()
        .find_map(|l| l.strip_prefix("ip: "))
        .unwrap_or_default();
    assert!(node.net.contains(ip), "pod ip {ip:?}: {inspectp}");

    let ps = yard_ok(&node, &["ps"]);
    assert!(
        ps.contains("app") && ps.contains("CONTAINER_RUNNING"),
        "{ps}"
    );
    assert_eq!(yard_ok(&node, &["ps", "-q", "--pod", pod]).trim(), ctr);
    let inspect = yard_ok(&node, &["inspect", ctr]);
    assert!(inspect.contains("state: CONTAINER_RUNNING"), "{inspect}");

    let out = yard(
        &node,
        &[
            "exec",
            ctr,
            "--",
            "sh",
            "-c",
            "echo in; echo err >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(text(&out.stdout), "in\n");
    assert_eq!(text(&out.stderr), "err\n");

    let mut logs = None;
    let logged = eventually(Duration::from_secs(20), || {
        let out = yard(&node, &["logs", ctr]);
        let ok = text(&out.stdout) == "hi from app\n" && text(&out.stderr) == "oops\n";
        logs = Some(out);
        ok
    });
    assert!(logged, "logs: {}", show(&logs.unwrap()));

    let stats = yard_ok(&node, &["stats", ctr]);
    let row = stats
        .lines()
        .find(|l| l.contains("app"))
        .unwrap_or_default();
    let memory: u64 = row
        .split_whitespace()
        .last()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(memory > 0, "no memory use in {stats}");

    let images = yard_ok(&node, &["images"]);
    assert!(images.contains(BUSYBOX_IMAGE), "{images}");

    yard_ok(&node, &["stop", "-t", "1", ctr]);
    let inspect = yard_ok(&node, &["inspect", ctr]);
    assert!(inspect.contains("state: CONTAINER_EXITED"), "{inspect}");
    assert!(yard_ok(&node, &["ps", "-q"]).trim().is_empty());
    assert_eq!(yard_ok(&node, &["ps", "-a", "-q"]).trim(), ctr);
    yard_ok(&node, &["rm", ctr]);
    yard_ok(&node, &["stopp", pod]);
    yard_ok(&node, &["rmp", pod]);
    assert!(yard_ok(&node, &["pods", "-q"]).trim().is_empty());

    // A handler the runtime does not have: refused, naming it, and nothing made.
    let out = yard(
        &node,
        &["runp", "--runtime", "no-such-handler", "--log-dir", log_dir],
    );
    assert!(!out.status.success(), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: RunPodSandbox: ") && err.contains("no-such-handler"),
        "{err}"
    );
    assert!(yard_ok(&node, &["pods", "-q"]).trim().is_empty());

    // A bad flag value is the CLI's own error, before any call.
    let out = yard(&node, &["create", "x", "-v", "/a", BUSYBOX_IMAGE]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--mount \"/a\": not HOST:CONTAINER[:ro]"),
        "{}",
        show(&out)
    );
}

#[test]
fn containerd_1_6() {
    lifecycle(Peer::V1_6);
}

#[test]
fn containerd_1_7() {
    lifecycle(Peer::V1_7);
}

#[test]
fn containerd_2_1() {
    lifecycle(Peer::V2_1);
}
