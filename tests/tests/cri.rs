//! Pods through containerd's CRI (issue 18): real containerd 1.6, 1.7 and 2.1 with the CRI
//! plugin, a CNI bridge of the test's own, driven with the CRI client of `switchyard_tests::cri`.
//! Every scenario runs first with the `runc` handler (containerd + runc is the oracle), then
//! with Switchyard's shims as handlers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::Duration;

use switchyard_api::cri::v1 as cri;
use switchyard_tests::cri::{
    BUSYBOX_IMAGE, CriNode, Peer, container_config, pod_config, read_cri_log,
};

fn node(peer: Peer) -> Option<CriNode> {
    if !switchyard_tests::require_root_and(&["iptables", "ip"]) {
        return None;
    }
    if !switchyard_tests::require(
        peer.binary().is_some(),
        &format!("{} is not installed (scripts/peers)", peer.name()),
    ) {
        return None;
    }
    Some(CriNode::start(peer))
}

/// RunPodSandbox → a busybox container created, started, listed, inspected, logging, ExecSync,
/// stats → StopContainer → RemoveContainer → StopPodSandbox → RemovePodSandbox.
fn pod_lifecycle(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let v = c.version();
    assert_eq!(v.runtime_api_version, "v1", "{v:?}");

    let pod_cfg = pod_config(&node, "lifecycle");
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let st = c.pod_status(&pod).expect("PodSandboxStatus");
    assert_eq!(
        st.state,
        cri::PodSandboxState::SandboxReady as i32,
        "{st:?}"
    );
    let ip = st
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        node.net.contains(&ip),
        "pod ip {ip:?} not in {}",
        node.net.subnet
    );
    assert!(c.list_pods().iter().any(|p| p.id == pod));

    let cfg = container_config(
        "main",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "echo hello from the pod; echo to stderr >&2; exec sleep 3600",
        ],
    );
    let id = c
        .create_container(&pod, &cfg, &pod_cfg)
        .expect("CreateContainer");
    let st = c.container_status(&id).expect("ContainerStatus");
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerCreated as i32,
        "{st:?}"
    );
    c.start_container(&id).expect("StartContainer");
    let st = c.wait_container_state(
        &id,
        cri::ContainerState::ContainerRunning,
        Duration::from_secs(30),
    );
    assert!(st.started_at > 0, "{st:?}");
    let listed = c.list_containers(Some(&pod));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id);

    // Logs in the CRI format at the path kubelet gave.
    let log = node
        .pod_log_dir(&pod_cfg.metadata.as_ref().unwrap().uid)
        .join("main.log");
    assert!(
        switchyard_tests::eventually(Duration::from_secs(20), || read_cri_log(&log).len() >= 2),
        "log {}: {:?}",
        log.display(),
        std::fs::read_to_string(&log)
    );
    let lines = read_cri_log(&log);
    assert!(
        lines.contains(&("stdout".into(), "hello from the pod".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "to stderr".into())),
        "{lines:?}"
    );

    let out = c
        .exec_sync(&id, &["sh", "-c", "echo exec $((6*7)); exit 3"], 30)
        .expect("ExecSync");
    assert_eq!(
        (out.stdout.as_str(), out.exit_code),
        ("exec 42\n", 3),
        "{out:?}"
    );
    let out = c.exec_sync(&id, &["hostname"], 30).expect("ExecSync");
    assert_eq!(out.stdout.trim(), "lifecycle", "{out:?}");

    let stats = c.container_stats(&id).expect("ContainerStats");
    let mem = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(mem > 0, "no memory working set: {stats:?}");

    c.stop_container(&id, 5).expect("StopContainer");
    let st = c.container_status(&id).expect("ContainerStatus");
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "{st:?}"
    );
    c.remove_container(&id).expect("RemoveContainer");
    assert!(c.container_status(&id).is_err(), "the container is gone");
    c.stop_pod(&pod).expect("StopPodSandbox");
    c.stop_pod(&pod).expect("StopPodSandbox is idempotent");
    c.remove_pod(&pod).expect("RemovePodSandbox");
    assert!(!c.list_pods().iter().any(|p| p.id == pod));
}

macro_rules! per_peer {
    ($scenario:ident, $handler:literal) => {
        mod $scenario {
            #[test]
            fn containerd_1_6() {
                super::$scenario(switchyard_tests::cri::Peer::V1_6, $handler);
            }
            #[test]
            fn containerd_1_7() {
                super::$scenario(switchyard_tests::cri::Peer::V1_7, $handler);
            }
            #[test]
            fn containerd_2_1() {
                super::$scenario(switchyard_tests::cri::Peer::V2_1, $handler);
            }
        }
    };
}

mod runc {
    use super::*;
    per_peer!(pod_lifecycle, "runc");
}

mod native {
    use super::*;
    per_peer!(pod_lifecycle, "native");
}
