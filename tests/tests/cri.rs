//! Pods through CRI (issues 18 and 19): real containerd 1.6, 1.7 and 2.1 with the CRI plugin,
//! and switchyardd serving CRI itself, each with a CNI bridge of the test's own, driven with the
//! CRI client of `switchyard_tests::cri`. One scenario list: every scenario runs first with the
//! `runc` handler on containerd (containerd + runc is the oracle), then with Switchyard's shims
//! as handlers, and each of them against switchyardd too (`per_peer!`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::Duration;

use switchyard_api::cri::v1 as cri;
use switchyard_tests::cri::{
    BUSYBOX_IMAGE, CriNode, NOT_WASM_IMAGE, Peer, WASM_HTTP_IMAGE, WASM_SOCKETS_IMAGE,
    container_config, pod_config, read_cri_log, wasm_images,
};

fn node(peer: Peer) -> Option<CriNode> {
    CriNode::require(peer)
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
    // The pod's usage, as kubelet's summary API asks for it (read from the pod's cgroup parent).
    let pod_stats = c.pod_stats(&pod).expect("PodSandboxStats");
    let linux = pod_stats.linux.as_ref();
    let pod_mem = linux
        .and_then(|l| l.memory.as_ref())
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    let pod_cpu = linux
        .and_then(|l| l.cpu.as_ref())
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    assert!(
        pod_mem > 0 && pod_cpu > 0,
        "no pod memory or CPU: {pod_stats:?}"
    );

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

/// A host directory that is its own mount point with shared propagation, so mounts can
/// propagate between it and a container (the host's `/` here is private). Unmounted on drop.
struct SharedDir {
    path: std::path::PathBuf,
}

impl SharedDir {
    fn new(parent: &std::path::Path, name: &str) -> SharedDir {
        let path = parent.join(name);
        std::fs::create_dir_all(&path).unwrap();
        sh(&format!(
            "mount --bind {p} {p} && mount --make-rshared {p}",
            p = path.display()
        ));
        SharedDir { path }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.path)
            .status();
    }
}

fn sh(script: &str) {
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mount(
    container_path: &str,
    host_path: &std::path::Path,
    propagation: cri::MountPropagation,
    readonly: bool,
) -> cri::Mount {
    cri::Mount {
        container_path: container_path.to_owned(),
        host_path: host_path.display().to_string(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    }
}

fn security(
    f: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
) -> Option<cri::LinuxContainerConfig> {
    let mut sc = cri::LinuxContainerSecurityContext::default();
    f(&mut sc);
    Some(cri::LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    })
}

/// A pod with one running container made from `cfg`; returns (pod config, pod id, container id).
fn running(
    node: &CriNode,
    c: &switchyard_tests::cri::Cri,
    handler: &str,
    name: &str,
    cfg: cri::ContainerConfig,
) -> (cri::PodSandboxConfig, String, String) {
    let pod_cfg = pod_config(node, name);
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let id = c.run_container(&pod, &cfg, &pod_cfg);
    (pod_cfg, pod, id)
}

/// Stops and removes the pod; none of its `portmap` rules is left.
fn teardown(c: &switchyard_tests::cri::Cri, pod: &str) {
    c.stop_pod(pod).expect("StopPodSandbox");
    c.remove_pod(pod).expect("RemovePodSandbox");
    let left = switchyard_tests::cri::nat_rules_naming(pod);
    assert!(left.is_empty(), "NAT rules left by pod {pod}: {left:#?}");
}

fn exec_ok(c: &switchyard_tests::cri::Cri, id: &str, script: &str) -> String {
    let out = c
        .exec_sync(id, &["sh", "-c", script], 30)
        .expect("ExecSync");
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    out.stdout
}

/// Mount propagation of each kind, and the rootfs propagation containerd derives from it
/// (`rslave` for HostToContainer, `rshared` for Bidirectional): private mounts see nothing
/// mounted on the host later, host-to-container mounts do, bidirectional mounts made in the
/// container appear on the host.
fn propagation(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let h2c = SharedDir::new(node.dir.path(), "h2c");
    let bidi = SharedDir::new(node.dir.path(), "bidi");
    let private = node.dir.path().join("private");
    std::fs::create_dir_all(&private).unwrap();

    let mut cfg = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    cfg.mounts = vec![
        mount(
            "/mnt/h2c",
            &h2c.path,
            cri::MountPropagation::PropagationHostToContainer,
            false,
        ),
        mount(
            "/mnt/private",
            &private,
            cri::MountPropagation::PropagationPrivate,
            false,
        ),
    ];
    let (_, pod, id) = running(&node, &c, handler, "h2c", cfg);
    sh(&format!(
        "mkdir -p {d}/late && mount -t tmpfs late {d}/late && echo seen > {d}/late/f",
        d = h2c.path.display()
    ));
    sh(&format!(
        "mkdir -p {d}/late && mount -t tmpfs late {d}/late && echo seen > {d}/late/f",
        d = private.display()
    ));
    assert_eq!(
        exec_ok(&c, &id, "cat /mnt/h2c/late/f"),
        "seen\n",
        "host-to-container"
    );
    let out = c
        .exec_sync(&id, &["cat", "/mnt/private/late/f"], 30)
        .expect("ExecSync");
    assert_ne!(
        out.exit_code, 0,
        "a private mount must not see the host's later mount: {out:?}"
    );
    let _ = std::process::Command::new("umount")
        .arg(private.join("late"))
        .status();
    teardown(&c, &pod);

    let mut cfg = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    cfg.mounts = vec![mount(
        "/mnt/bidi",
        &bidi.path,
        cri::MountPropagation::PropagationBidirectional,
        false,
    )];
    cfg.linux = security(|sc| sc.privileged = true);
    let pod_cfg = {
        let mut p = pod_config(&node, "bidi");
        p.linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .privileged = true;
        p
    };
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let id = c.run_container(&pod, &cfg, &pod_cfg);
    exec_ok(
        &c,
        &id,
        "mkdir -p /mnt/bidi/inner && mount -t tmpfs inner /mnt/bidi/inner && echo back > /mnt/bidi/inner/f",
    );
    let seen = std::fs::read_to_string(bidi.path.join("inner/f")).unwrap_or_default();
    assert_eq!(
        seen, "back\n",
        "a bidirectional mount made in the container is on the host"
    );
    teardown(&c, &pod);
}

/// seccomp: RuntimeDefault filters the container and an exec into it alike; a Localhost
/// profile that makes sethostname fail with ENOSYS applies to the container and the exec (with
/// CAP_SYS_ADMIN, so only seccomp can refuse it); its `SCMP_CMP_MASKED_EQ` rule means what runc
/// reads (`value` the mask, `valueTwo` the datum: RuntimeDefault's `clone` rule is one); a
/// profile that does not exist fails CreateContainer naming it.
fn seccomp(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let mut cfg = container_config(
        "main",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "grep ^Seccomp: /proc/self/status; exec sleep 3600",
        ],
    );
    cfg.linux = security(|sc| {
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            ..Default::default()
        })
    });
    let (pod_cfg, pod, id) = running(&node, &c, handler, "seccomp", cfg);
    let log = node
        .pod_log_dir(&pod_cfg.metadata.as_ref().unwrap().uid)
        .join("main.log");
    assert!(switchyard_tests::eventually(
        Duration::from_secs(20),
        || !read_cri_log(&log).is_empty()
    ));
    let first = read_cri_log(&log);
    assert!(
        first[0].1.ends_with("\t2") || first[0].1.ends_with(" 2"),
        "init: {first:?}"
    );
    let exec = exec_ok(&c, &id, "grep ^Seccomp: /proc/self/status");
    assert!(
        exec.trim_end().ends_with('2'),
        "an exec runs under the container's filter: {exec:?}"
    );
    teardown(&c, &pod);

    let profile = node.dir.path().join("no-sethostname.json");
    // `clone` refused when `flags & 0xff == 0` (no exit signal: a thread); a fork sends SIGCHLD.
    // Read the other way round (`flags & 0 == 0xff & 0`) it would refuse every fork.
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
            {"names":["clone"],"action":"SCMP_ACT_ERRNO","errnoRet":1,
             "args":[{"index":0,"value":255,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
    )
    .unwrap();
    let mut cfg = container_config(
        "main",
        BUSYBOX_IMAGE,
        &["sh", "-c", "hostname changed 2>&1; exec sleep 3600"],
    );
    let localhost = cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: profile.display().to_string(),
    };
    let with = localhost.clone();
    cfg.linux = security(move |sc| {
        sc.seccomp = Some(with);
        sc.capabilities = Some(cri::Capability {
            add_capabilities: vec!["SYS_ADMIN".into()],
            ..Default::default()
        });
    });
    let (pod_cfg, pod, id) = running(&node, &c, handler, "localhost", cfg);
    let log = node
        .pod_log_dir(&pod_cfg.metadata.as_ref().unwrap().uid)
        .join("main.log");
    assert!(switchyard_tests::eventually(
        Duration::from_secs(20),
        || !read_cri_log(&log).is_empty()
    ));
    let init = read_cri_log(&log);
    assert!(init[0].1.contains("not implemented"), "init: {init:?}");
    let out = c
        .exec_sync(&id, &["hostname", "changed"], 30)
        .expect("ExecSync");
    assert_ne!(out.exit_code, 0, "{out:?}");
    assert!(
        out.stderr.contains("not implemented") || out.stdout.contains("not implemented"),
        "an exec runs under the container's profile: {out:?}"
    );
    assert_eq!(
        exec_ok(&c, &id, "hostname").trim(),
        "localhost",
        "the hostname never changed"
    );
    assert_eq!(
        exec_ok(&c, &id, "echo forked | cat").trim(),
        "forked",
        "a fork passes the profile's clone rule"
    );

    let mut cfg = container_config("missing", BUSYBOX_IMAGE, &["sleep", "1"]);
    let missing = node.dir.path().join("does-not-exist.json");
    cfg.linux = security(|sc| {
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: missing.display().to_string(),
        })
    });
    let err = c
        .create_container(&pod, &cfg, &pod_cfg)
        .expect_err("a missing profile fails");
    assert!(err.message().contains("does-not-exist.json"), "{err:?}");
    teardown(&c, &pod);
}

/// A container with a terminal (CRI ids are 64 hex characters, so every path derived from them
/// is long).
fn tty(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let mut cfg = container_config("main", BUSYBOX_IMAGE, &["sh", "-c", "tty; exec sleep 3600"]);
    cfg.tty = true;
    let (pod_cfg, pod, id) = running(&node, &c, handler, "tty", cfg);
    assert_eq!(id.len(), 64, "{id}");
    let log = node
        .pod_log_dir(&pod_cfg.metadata.as_ref().unwrap().uid)
        .join("main.log");
    assert!(switchyard_tests::eventually(
        Duration::from_secs(20),
        || !read_cri_log(&log).is_empty()
    ));
    let lines = read_cri_log(&log);
    assert!(lines[0].1.trim_end().starts_with("/dev/pts/"), "{lines:?}");
    teardown(&c, &pod);
}

/// `kubectl exec -it` the CRI way: Exec returns a URL of containerd's streaming server; a
/// WebSocket session there runs a shell with a terminal of the asked size and stdin, and the
/// exit code comes back; the same without a terminal keeps stdout and stderr apart.
fn exec_streaming(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let cfg = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let (_, pod, id) = running(&node, &c, handler, "stream", cfg);
    let url = c.exec_url(&id, &["sh"], true, true).expect("Exec");
    // The size and stdin travel apart (a resize call, the stdin fifo), as they do for kubectl:
    // the shell waits for the terminal to have a size (it starts with none) before printing it.
    // busybox's `stty size` exits 0 on a terminal without a size (it prints only an error), so
    // the shell waits for its output, not its status.
    let input = b"until s=$(stty size 2>/dev/null) && [ -n \"$s\" ]; do sleep 0.05; done; \
        echo \"$s\"; tty; exit 7\n";
    let out = c.stream_exec(&url, input, Some((91, 37)));
    assert_eq!(out.exit_code, 7, "{out:?}");
    assert!(out.stdout.contains("37 91"), "terminal size: {out:?}");
    assert!(out.stdout.contains("/dev/pts/"), "a terminal: {out:?}");

    // WebSocket v4 cannot half-close stdin (v5 can; containerd 1.6 does not speak it), so the
    // command reads one line rather than to EOF.
    let url = c
        .exec_url(
            &id,
            &[
                "sh",
                "-c",
                "read line; echo got $line; echo err >&2; exit 4",
            ],
            false,
            true,
        )
        .expect("Exec");
    let out = c.stream_exec(&url, b"hello\n", None);
    assert_eq!(out.stdout, "got hello\n", "{out:?}");
    assert_eq!(out.exit_code, 4, "{out:?}");
    assert_eq!(out.stderr, "err\n", "{out:?}");
    teardown(&c, &pod);
}

/// kubelet's default masked and read-only paths (`DefaultProcMount`), which it sends with every
/// container: containerd's CRI applies what it is sent, not defaults of its own.
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A read-only rootfs and a read-only host mount refuse writes; masked paths read empty (those
/// this host has: its kernel has no `/proc/kcore`) and read-only paths are read-only mounts.
fn readonly_and_masked(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let host = node.dir.path().join("ro-src");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("f"), "host file\n").unwrap();
    let mut cfg = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    cfg.mounts = vec![mount(
        "/mnt/ro",
        &host,
        cri::MountPropagation::PropagationPrivate,
        true,
    )];
    cfg.linux = security(|sc| {
        sc.readonly_rootfs = true;
        sc.masked_paths = MASKED.iter().map(|p| (*p).to_owned()).collect();
        sc.readonly_paths = READONLY.iter().map(|p| (*p).to_owned()).collect();
    });
    let (_, pod, id) = running(&node, &c, handler, "readonly", cfg);
    assert_eq!(exec_ok(&c, &id, "cat /mnt/ro/f"), "host file\n");
    for (what, script) in [
        ("read-only rootfs", "touch /new-file"),
        ("read-only mount", "echo x > /mnt/ro/f"),
    ] {
        let out = c
            .exec_sync(&id, &["sh", "-c", script], 30)
            .expect("ExecSync");
        assert_ne!(out.exit_code, 0, "{what}: {out:?}");
    }
    assert_eq!(
        exec_ok(&c, &id, "wc -c < /proc/timer_list").trim(),
        "0",
        "masked /proc/timer_list"
    );
    assert_eq!(
        exec_ok(&c, &id, "ls /sys/firmware | wc -l").trim(),
        "0",
        "masked /sys/firmware"
    );
    let sys = exec_ok(&c, &id, "grep ' /proc/sys ' /proc/self/mounts");
    assert!(
        sys.split_whitespace()
            .nth(3)
            .is_some_and(|o| o.split(',').any(|f| f == "ro")),
        "/proc/sys read-only: {sys:?}"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("f")).unwrap(),
        "host file\n"
    );
    teardown(&c, &pod);
}

/// A pod's two containers share its network, IPC (with `/dev/shm`) and UTS namespaces and see
/// its hostname; `security_context` takes effect, checked from inside: `run_as_user` and a
/// read-only rootfs in one container, dropped capabilities (gone from the bounding set, and
/// `chown` refused to root) in the other.
fn shared_namespaces_and_security(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let pod_cfg = pod_config(&node, "sharedns");
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let mut first = container_config("first", BUSYBOX_IMAGE, &["sleep", "3600"]);
    first.linux = security(|sc| {
        sc.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["CHOWN".into(), "NET_RAW".into()],
            ..Default::default()
        });
    });
    let mut second = container_config("second", BUSYBOX_IMAGE, &["sleep", "3600"]);
    second.linux = security(|sc| {
        sc.run_as_user = Some(cri::Int64Value { value: 1000 });
        sc.readonly_rootfs = true;
    });
    let mut ids = Vec::new();
    for cfg in [&first, &second] {
        let id = c.run_container(&pod, cfg, &pod_cfg);
        ids.push(id);
    }
    let namespaces = "readlink /proc/self/ns/net /proc/self/ns/ipc /proc/self/ns/uts; hostname";
    let (a, b) = (
        exec_ok(&c, &ids[0], namespaces),
        exec_ok(&c, &ids[1], namespaces),
    );
    assert_eq!(a, b, "the containers' namespaces and hostname");
    assert_eq!(a.lines().last(), Some("sharedns"), "{a}");
    let host = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    assert!(
        !a.contains(&host.display().to_string()),
        "a pod IPC namespace, not the host's ({}): {a}",
        host.display()
    );
    exec_ok(&c, &ids[0], "echo shared > /dev/shm/marker");
    assert_eq!(exec_ok(&c, &ids[1], "cat /dev/shm/marker"), "shared\n");

    // run_as_user and the read-only root, in the second.
    assert_eq!(exec_ok(&c, &ids[1], "id -u").trim(), "1000");
    let root = exec_ok(&c, &ids[1], "grep -m1 ' / ' /proc/self/mounts");
    assert!(
        root.split_whitespace()
            .nth(3)
            .is_some_and(|o| o.split(',').any(|f| f == "ro")),
        "a read-only root: {root}"
    );
    // Dropped capabilities, in the first (root): CHOWN is bit 0, NET_RAW bit 13, KILL (5)
    // stays, as in the default set.
    let bounding = exec_ok(
        &c,
        &ids[0],
        "sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status",
    );
    let bits = u64::from_str_radix(bounding.trim(), 16).expect("CapBnd");
    assert_eq!(
        bits & (1 << 0 | 1 << 13),
        0,
        "CHOWN and NET_RAW dropped: {bounding}"
    );
    assert_ne!(bits & (1 << 5), 0, "KILL kept: {bounding}");
    let out = c
        .exec_sync(&ids[0], &["sh", "-c", "touch /owned && chown 1 /owned"], 30)
        .expect("ExecSync");
    assert_ne!(out.exit_code, 0, "chown without CAP_CHOWN: {out:?}");
    teardown(&c, &pod);
}

/// `shareProcessNamespace`: a pod-wide PID namespace whose init is the pause process; one
/// container sees the other's processes.
fn shared_pid_namespace(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let mut pod_cfg = pod_config(&node, "sharedpid");
    if let Some(ns) = pod_cfg
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.pid = cri::NamespaceMode::Pod as i32;
    }
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let pod_pid = |mut cfg: cri::ContainerConfig| {
        cfg.linux = security(|sc| {
            sc.namespace_options = Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            });
        });
        cfg
    };
    let mut ids = Vec::new();
    for (name, cmd) in [("first", "sleep 3601"), ("second", "sleep 3602")] {
        let cfg = pod_pid(container_config(
            name,
            BUSYBOX_IMAGE,
            &["sh", "-c", &format!("exec {cmd}")],
        ));
        let id = c.run_container(&pod, &cfg, &pod_cfg);
        ids.push(id);
    }
    assert_eq!(
        exec_ok(&c, &ids[1], "tr '\\0' ' ' < /proc/1/cmdline").trim(),
        "/pause",
        "the pod's init"
    );
    let seen = exec_ok(&c, &ids[1], "cat /proc/[0-9]*/cmdline | tr '\\0' ' '");
    assert!(
        seen.contains("sleep 3601"),
        "the first container's process, seen from the second: {seen}"
    );
    c.list_containers(Some(&pod)).iter().for_each(|x| {
        assert!(
            ids.contains(&x.id),
            "only the pod's containers are listed: {x:?}"
        )
    });
    teardown(&c, &pod);
}

/// Two pods on the CNI bridge: one serves HTTP (busybox `httpd`), the other reaches it by pod
/// IP; the server's `portmap` host port on 127.0.0.1 reaches it from the host.
fn pod_network(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let port = switchyard_tests::cri::host_port();
    let mut server_cfg = pod_config(&node, "server");
    server_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: i32::from(port),
        host_ip: "127.0.0.1".into(),
    }];
    let server = c
        .run_pod(&server_cfg, handler)
        .expect("RunPodSandbox server");
    let httpd = container_config(
        "httpd",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo hello from $(hostname) > /tmp/www/index.html && \
             exec httpd -f -p 8080 -h /tmp/www",
        ],
    );
    let id = c
        .create_container(&server, &httpd, &server_cfg)
        .expect("CreateContainer httpd");
    c.start_container(&id).expect("StartContainer httpd");
    let ip = c
        .pod_status(&server)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(node.net.contains(&ip), "{ip} in {}", node.net.subnet);

    let client_cfg = pod_config(&node, "client");
    let client = c
        .run_pod(&client_cfg, handler)
        .expect("RunPodSandbox client");
    let sleeper = container_config("client", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let cid = c.run_container(&client, &sleeper, &client_cfg);
    let url = format!("http://{ip}:8080/");
    let mut last = None;
    let served = switchyard_tests::eventually(Duration::from_secs(30), || {
        let out = c.exec_sync(&cid, &["wget", "-qO-", &url], 10);
        let ok = matches!(&out, Ok(o) if o.stdout == "hello from server\n");
        last = Some(out);
        ok
    });
    assert!(served, "pod to pod by IP: {last:?}");

    let mut response = String::new();
    let from_host = switchyard_tests::eventually(Duration::from_secs(30), || {
        response = http_get_loopback(port).unwrap_or_else(|e| e.to_string());
        response.contains("hello from server")
    });
    assert!(from_host, "host port {port} to the pod: {response}");
    teardown(&c, &client);
    teardown(&c, &server);
}

/// Issue 20: a `vm` pod on the pod network. Its VM serves busybox `httpd`, reached by pod IP
/// from a `native` pod on the same bridge and from the host through a `portmap` host port; from
/// inside the VM, `wget` reaches the native pod's server by IP and by a name the pod's
/// `/etc/hosts` gives it (kubelet's way: a hosts file mounted in).
fn vm_pod_network(peer: Peer, _handler: &str) {
    let Some(mut node) = node(peer) else { return };
    let mut c = node.client();
    let serve = |who: &str| {
        format!(
            "mkdir -p /tmp/www && echo hello from {who} > /tmp/www/index.html && \
             exec httpd -f -p 8080 -h /tmp/www"
        )
    };
    // The native pod first: the VM's hosts file names it.
    let native_cfg = pod_config(&node, "native-peer");
    let native = c
        .run_pod(&native_cfg, "native")
        .expect("RunPodSandbox native");
    let native_httpd = container_config("httpd", BUSYBOX_IMAGE, &["sh", "-c", &serve("native")]);
    let native_id = c.run_container(&native, &native_httpd, &native_cfg);
    let native_ip = c
        .pod_status(&native)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(node.net.contains(&native_ip), "{native_ip}");

    let port = switchyard_tests::cri::host_port();
    let mut vm_cfg = pod_config(&node, "vm-web");
    vm_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: i32::from(port),
        host_ip: "127.0.0.1".into(),
    }];
    let vm = c.run_pod(&vm_cfg, "vm").expect("RunPodSandbox vm");
    let hosts = node.dir.path().join("vm-hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{native_ip} native-peer.test native-peer\n"),
    )
    .unwrap();
    let mut vm_httpd = container_config("httpd", BUSYBOX_IMAGE, &["sh", "-c", &serve("the-vm")]);
    vm_httpd.mounts = vec![mount(
        "/etc/hosts",
        &hosts,
        cri::MountPropagation::PropagationPrivate,
        true,
    )];
    let vm_id = c.run_container(&vm, &vm_httpd, &vm_cfg);
    let vm_ip = c
        .pod_status(&vm)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(node.net.contains(&vm_ip), "{vm_ip} in {}", node.net.subnet);

    // The guest holds the pod's address itself (the guest kernel's local addresses).
    let addr = c.exec_sync(&vm_id, &["cat", "/proc/net/fib_trie"], 10);
    assert!(
        matches!(&addr, Ok(o) if o.stdout.contains(&format!("|-- {vm_ip}\n"))),
        "the guest's addresses: {addr:?}"
    );

    let fetch = |c: &switchyard_tests::cri::Cri, from: &str, url: &str, want: &str| {
        let mut last = None;
        let ok = switchyard_tests::eventually(Duration::from_secs(30), || {
            let out = c.exec_sync(from, &["wget", "-qO-", url], 10);
            let ok = matches!(&out, Ok(o) if o.stdout == want);
            last = Some(out);
            ok
        });
        assert!(ok, "{url} from {from}: {last:?}");
    };
    let to_vm = format!("http://{vm_ip}:8080/");
    fetch(&c, &native_id, &to_vm, "hello from the-vm\n");
    fetch(
        &c,
        &vm_id,
        &format!("http://{native_ip}:8080/"),
        "hello from native\n",
    );
    fetch(
        &c,
        &vm_id,
        "http://native-peer.test:8080/",
        "hello from native\n",
    );
    if peer == Peer::Switchyardd {
        // A crashed and restarted daemon leaves the pods' networking to the shims holding it.
        drop(c);
        node.restart_switchyardd();
        c = node.client();
        fetch(&c, &native_id, &to_vm, "hello from the-vm\n");
    }

    let mut response = String::new();
    let from_host = switchyard_tests::eventually(Duration::from_secs(30), || {
        response = http_get_loopback(port).unwrap_or_else(|e| e.to_string());
        response.contains("hello from the-vm")
    });
    assert!(from_host, "host port {port} to the vm pod: {response}");
    teardown(&c, &vm);
    teardown(&c, &native);
    assert_no_pod_processes(&node);
}

/// A native pod serving on the pod network: busybox `httpd` on 8080 (`hello from native`, and
/// `/cgi-bin/peer` answering `peer <the client's address>`) and a TCP server on 7000 that
/// writes `tcp hello from native` to every connection. Its id and pod IP.
fn native_peer(node: &CriNode, c: &switchyard_tests::cri::Cri) -> (String, String) {
    let cfg = pod_config(node, "native-peer");
    let pod = c.run_pod(&cfg, "native").expect("RunPodSandbox native");
    let script = "mkdir -p /tmp/www/cgi-bin && echo hello from native > /tmp/www/index.html && \
                  printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho peer $REMOTE_ADDR\\n' \
                  > /tmp/www/cgi-bin/peer && chmod +x /tmp/www/cgi-bin/peer && \
                  httpd -p 8080 -h /tmp/www && \
                  while true; do echo tcp hello from native | nc -l -p 7000; done";
    let server = container_config("servers", BUSYBOX_IMAGE, &["sh", "-c", script]);
    c.run_container(&pod, &server, &cfg);
    let ip = c
        .pod_status(&pod)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(node.net.contains(&ip), "{ip} in {}", node.net.subnet);
    (pod, ip)
}

/// Runs the `sockets` guest with `args` in `pod` until it exits: its exit code and CRI log.
fn sockets_guest(
    node: &CriNode,
    c: &switchyard_tests::cri::Cri,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    name: &str,
    args: &[&str],
) -> (i32, Vec<(String, String)>) {
    let mut command = vec!["/sockets.wasm"];
    command.extend_from_slice(args);
    let id = c
        .create_container(
            pod,
            &container_config(name, WASM_SOCKETS_IMAGE, &command),
            pod_cfg,
        )
        .expect("CreateContainer (sockets guest)");
    c.start_container(&id)
        .expect("StartContainer (sockets guest)");
    let st = c.wait_container_state(
        &id,
        cri::ContainerState::ContainerExited,
        Duration::from_secs(60),
    );
    let log = node
        .pod_log_dir(&pod_cfg.metadata.as_ref().unwrap().uid)
        .join(format!("{name}.log"));
    // The log copier may still be writing the last lines.
    switchyard_tests::eventually(Duration::from_secs(10), || !read_cri_log(&log).is_empty());
    (st.exit_code, read_cri_log(&log))
}

/// Issue 20: a `wasm` pod on the pod network. Its `wasi:http` function is reached by pod IP
/// from a `native` pod and from the host through a `portmap` host port on 127.0.0.1; under
/// switchyardd on the pod's declared container port (9090: the pod's one TCP port mapping),
/// under containerd on the default 8080 (containerd's CRI tells a runtime no ports). From the
/// Wasm pod, a guest's `wasi:sockets` TCP connection and the function's outgoing `wasi:http`
/// request reach the native pod by IP, from the pod's network namespace.
fn wasm_pod_network(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    node.import(wasm_images());
    let c = node.client();
    let (native, native_ip) = native_peer(&node, &c);

    let port_in_pod: u16 = if peer == Peer::Switchyardd {
        9090
    } else {
        8080
    };
    let host_port = switchyard_tests::cri::host_port();
    let mut pod_cfg = pod_config(&node, "edge");
    pod_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: i32::from(port_in_pod),
        host_port: i32::from(host_port),
        host_ip: "127.0.0.1".into(),
    }];
    let pod = c.run_pod(&pod_cfg, "wasm").expect("RunPodSandbox on wasm");
    let pod_ip = c
        .pod_status(&pod)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(node.net.contains(&pod_ip), "{pod_ip}");
    let func = c
        .create_container(
            &pod,
            &container_config("func", WASM_HTTP_IMAGE, &[]),
            &pod_cfg,
        )
        .expect("CreateContainer (wasm)");
    c.start_container(&func).expect("StartContainer (wasm)");

    let client_cfg = pod_config(&node, "client");
    let client = c
        .run_pod(&client_cfg, "native")
        .expect("RunPodSandbox client");
    let cid = c.run_container(
        &client,
        &container_config("client", BUSYBOX_IMAGE, &["sleep", "3600"]),
        &client_cfg,
    );
    let fetch = |url: &str, want: &str| {
        let mut last = None;
        let ok = switchyard_tests::eventually(Duration::from_secs(30), || {
            let out = c.exec_sync(&cid, &["wget", "-qO-", url], 15);
            let ok = matches!(&out, Ok(o) if o.stdout == want);
            last = Some(out);
            ok
        });
        assert!(ok, "{url} from the native pod: {last:?}");
    };
    fetch(
        &format!("http://{pod_ip}:{port_in_pod}/by-pod-ip"),
        "hello from wasm http: GET /by-pod-ip\n",
    );
    let mut response = String::new();
    let from_host = switchyard_tests::eventually(Duration::from_secs(30), || {
        response = http_get_loopback(host_port).unwrap_or_else(|e| e.to_string());
        response.contains("hello from wasm http: GET /")
    });
    assert!(
        from_host,
        "host port {host_port} to the wasm pod: {response}"
    );

    // Outgoing wasi:http from the function reaches the native pod, and comes from the Wasm
    // pod's address (its network namespace), not the host's side of the bridge.
    fetch(
        &format!("http://{pod_ip}:{port_in_pod}/fetch?{native_ip}:8080/"),
        "fetched 200: hello from native\n",
    );
    let url = format!("http://{pod_ip}:{port_in_pod}/fetch?{native_ip}:8080/cgi-bin/peer");
    let peer = c
        .exec_sync(&cid, &["wget", "-qO-", &url], 15)
        .expect("ExecSync");
    // httpd gives an IPv4 client as `[::ffff:IP]` on a dual-stack socket.
    let seen = peer
        .stdout
        .strip_prefix("fetched 200: peer ")
        .map(|a| a.trim_end().trim_matches(['[', ']']))
        .map(|a| a.strip_prefix("::ffff:").unwrap_or(a));
    assert_eq!(seen, Some(pod_ip.as_str()), "{url}: {peer:?}");

    // wasi:sockets from a guest in the Wasm pod: to the native pod by IP, and to a sidecar on
    // the pod's own loopback (only there if the guest's socket is in the pod's namespace).
    let addr = format!("{native_ip}:7000");
    let (code, log) = sockets_guest(&node, &c, &pod, &pod_cfg, "socks", &["--read", &addr]);
    let want = (
        "stdout".to_owned(),
        format!("read from {addr}: tcp hello from native"),
    );
    assert!(code == 0 && log.contains(&want), "exit {code}: {log:?}");
    let sidecar = c.run_container(
        &pod,
        &container_config(
            "sidecar",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "exec nc -ll -p 7001 -e echo tcp hello from the pod",
            ],
        ),
        &pod_cfg,
    );
    assert!(
        switchyard_tests::eventually(Duration::from_secs(20), || {
            c.exec_sync(&sidecar, &["sh", "-c", "netstat -ltn"], 10)
                .is_ok_and(|o| o.stdout.contains(":7001 "))
        }),
        "the sidecar does not listen on 7001"
    );
    let (code, log) = sockets_guest(
        &node,
        &c,
        &pod,
        &pod_cfg,
        "loopback",
        &["--read", "127.0.0.1:7001"],
    );
    let want = (
        "stdout".to_owned(),
        "read from 127.0.0.1:7001: tcp hello from the pod".to_owned(),
    );
    assert!(code == 0 && log.contains(&want), "exit {code}: {log:?}");
    // UDP too (busybox has no UDP server: the guest talks to itself on the pod's loopback).
    let (code, log) = sockets_guest(&node, &c, &pod, &pod_cfg, "udp", &["--udp-loop", "ping"]);
    let want = ("stdout".to_owned(), "udp got: ping".to_owned());
    assert!(code == 0 && log.contains(&want), "exit {code}: {log:?}");

    teardown(&c, &client);
    teardown(&c, &pod);
    teardown(&c, &native);
    assert_no_pod_processes(&node);
}

/// Issue 20: the guests' network is the runtime's to switch off and bounded. On `wasm-nonet`
/// (options `sockets = false`, `outgoing_http = false`) the same guest's TCP connection and
/// UDP socket and the function's outgoing request fail with a clear error; on `wasm-few-sockets`
/// (`max_sockets = 2`) a guest holds two connections and the third is refused.
fn wasm_pod_network_off_and_bounded(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    node.import(wasm_images());
    let c = node.client();
    let (native, native_ip) = native_peer(&node, &c);
    let addr = format!("{native_ip}:7000");

    let off_cfg = pod_config(&node, "nonet");
    let off = c
        .run_pod(&off_cfg, "wasm-nonet")
        .expect("RunPodSandbox on wasm-nonet");
    let (code, log) = sockets_guest(&node, &c, &off, &off_cfg, "socks", &["--read", &addr]);
    let said = format!("{log:?}");
    assert!(
        code != 0
            && said.contains(&format!("--read {addr} failed:"))
            && said.contains("PermissionDenied"),
        "exit {code}: {log:?}"
    );
    let (code, log) = sockets_guest(&node, &c, &off, &off_cfg, "udp", &["--udp-loop", "ping"]);
    let said = format!("{log:?}");
    assert!(
        code != 0
            && said.contains("--udp-loop 127.0.0.1:0 failed:")
            && said.contains("PermissionDenied"),
        "exit {code}: {log:?}"
    );
    // The function's outgoing request is refused too; its server still serves.
    c.run_container(
        &off,
        &container_config("func", WASM_HTTP_IMAGE, &[]),
        &off_cfg,
    );
    let sidecar = c.run_container(
        &off,
        &container_config("sidecar", BUSYBOX_IMAGE, &["sleep", "3600"]),
        &off_cfg,
    );
    let url = format!("http://127.0.0.1:8080/fetch?{native_ip}:8080/");
    let mut last = None;
    let refused = switchyard_tests::eventually(Duration::from_secs(30), || {
        let out = c.exec_sync(&sidecar, &["wget", "-qO-", &url], 15);
        let ok = matches!(&out, Ok(o) if o.stdout.starts_with("fetch failed:")
            && o.stdout.contains("HttpRequestDenied"));
        last = Some(out);
        ok
    });
    assert!(refused, "{url} in the wasm-nonet pod: {last:?}");
    teardown(&c, &off);

    let few_cfg = pod_config(&node, "few");
    let few = c
        .run_pod(&few_cfg, "wasm-few-sockets")
        .expect("RunPodSandbox on wasm-few-sockets");
    // httpd takes many connections at once (nc one at a time).
    let httpd = format!("{native_ip}:8080");
    let (code, log) = sockets_guest(&node, &c, &few, &few_cfg, "hold", &["--hold", "5", &httpd]);
    let out: Vec<&str> = log
        .iter()
        .filter(|(s, _)| s == "stdout")
        .map(|(_, l)| l.as_str())
        .collect();
    assert!(
        code == 0
            && out.first() == Some(&"held 1")
            && out.get(1) == Some(&"held 2")
            && out
                .get(2)
                .is_some_and(|l| l.starts_with("hold failed after 2:")),
        "exit {code}: {log:?}"
    );
    teardown(&c, &few);
    teardown(&c, &native);
    assert_no_pod_processes(&node);
}

/// Issue 20, bad input: a second `wasi:http` function of a pod on a port the first one holds
/// fails StartContainer naming the address and the pod's network namespace, and the pod goes
/// away leaving nothing.
fn bad_input_wasm_port_in_use(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    node.import(wasm_images());
    let c = node.client();
    let pod_cfg = pod_config(&node, "busyport");
    let pod = c.run_pod(&pod_cfg, "wasm").expect("RunPodSandbox on wasm");
    c.run_container(
        &pod,
        &container_config("first", WASM_HTTP_IMAGE, &[]),
        &pod_cfg,
    );
    let err = c
        .create_container(
            &pod,
            &container_config("second", WASM_HTTP_IMAGE, &[]),
            &pod_cfg,
        )
        .and_then(|id| c.start_container(&id))
        .expect_err("a port the pod's first function holds");
    let m = err.message();
    assert!(
        m.contains("0.0.0.0:8080") && m.contains("network namespace") && m.contains("in use"),
        "{err:?}"
    );
    teardown(&c, &pod);
    assert_no_pod_processes(&node);
}

/// `GET /` from `127.0.0.1:port`, the whole response (the server closes the connection).
fn http_get_loopback(port: u16) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.take(64 << 10).read_to_string(&mut out)?;
    Ok(out)
}

/// A container over its memory limit is killed, and ContainerStatus says OOMKilled.
fn oom_killed(peer: Peer, handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let pod_cfg = pod_config(&node, "oom");
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let mut cfg = container_config(
        "main",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = c
        .create_container(&pod, &cfg, &pod_cfg)
        .expect("CreateContainer");
    c.start_container(&id).expect("StartContainer");
    let st = c.wait_container_state(
        &id,
        cri::ContainerState::ContainerExited,
        Duration::from_secs(60),
    );
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:?}"
    );
    teardown(&c, &pod);
}

/// Bad input through CRI: an unknown handler fails RunPodSandbox naming it, and leaves no pod.
fn bad_handler(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let err = c
        .run_pod(&pod_config(&node, "bad"), "no-such-handler")
        .expect_err("unknown handler");
    assert!(err.message().contains("no-such-handler"), "{err:?}");
    assert!(c.list_pods().is_empty(), "{:?}", c.list_pods());
}

/// Issue 18: a `wasm` pod with a `wasi:http` function and a busybox sidecar (an ordinary Linux
/// container in the Wasm pod): the sidecar reaches the function on localhost inside the pod,
/// and a `native` pod reaches it by the pod's IP.
fn wasm_pod_http_and_sidecar(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    node.import(wasm_images());
    let c = node.client();
    let pod_cfg = pod_config(&node, "edge");
    let pod = c.run_pod(&pod_cfg, "wasm").expect("RunPodSandbox on wasm");
    let pod_ip = c
        .pod_status(&pod)
        .expect("PodSandboxStatus")
        .network
        .unwrap_or_default()
        .ip;
    assert!(node.net.contains(&pod_ip), "{pod_ip}");
    let func = c
        .create_container(
            &pod,
            &container_config("func", WASM_HTTP_IMAGE, &[]),
            &pod_cfg,
        )
        .expect("CreateContainer (wasm)");
    c.start_container(&func).expect("StartContainer (wasm)");
    let sidecar = c
        .create_container(
            &pod,
            &container_config("sidecar", BUSYBOX_IMAGE, &["sleep", "3600"]),
            &pod_cfg,
        )
        .expect("CreateContainer (sidecar)");
    c.start_container(&sidecar)
        .expect("StartContainer (sidecar)");
    c.wait_container_state(
        &sidecar,
        cri::ContainerState::ContainerRunning,
        Duration::from_secs(30),
    );
    let get = |id: &str, url: &str| -> String {
        let mut last = None;
        // The listener comes up asynchronously after StartContainer.
        switchyard_tests::eventually(Duration::from_secs(20), || {
            let out = c
                .exec_sync(id, &["wget", "-qO-", url], 10)
                .expect("ExecSync");
            let ok = out.exit_code == 0;
            last = Some(out);
            ok
        });
        last.map(|o| o.stdout).unwrap_or_default()
    };
    let body = get(&sidecar, "http://127.0.0.1:8080/edge?x=1");
    assert_eq!(
        body, "hello from wasm http: GET /edge?x=1\n",
        "sidecar → localhost:8080"
    );

    let other_cfg = pod_config(&node, "client");
    let other = c
        .run_pod(&other_cfg, "native")
        .expect("RunPodSandbox on native");
    let client = c
        .create_container(
            &other,
            &container_config("client", BUSYBOX_IMAGE, &["sleep", "3600"]),
            &other_cfg,
        )
        .expect("CreateContainer");
    c.start_container(&client).expect("StartContainer");
    c.wait_container_state(
        &client,
        cri::ContainerState::ContainerRunning,
        Duration::from_secs(30),
    );
    let body = get(&client, &format!("http://{pod_ip}:8080/from-another-pod"));
    assert_eq!(
        body, "hello from wasm http: GET /from-another-pod\n",
        "native pod → pod IP"
    );
    teardown(&c, &other);
    teardown(&c, &pod);
    assert_no_pod_processes(&node);
}

/// Issue 18: a `vm` pod: every container in the one VM, an emptyDir shared by two containers,
/// hostPath read-write and read-only, a configmap-style file that changes on the host and is
/// seen changed in the guest, `/dev/shm` usable, the pod's hostname, `/etc/hosts` and
/// `/etc/resolv.conf` visible.
fn vm_pod_volumes(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let base = node.dir.path().join("volumes");
    let (empty, rw, ro) = (base.join("empty"), base.join("rw"), base.join("ro"));
    for d in [&empty, &rw, &ro] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(ro.join("given"), "from the host\n").unwrap();
    let config = base.join("config-key");
    std::fs::write(&config, "version 1\n").unwrap();

    let mut pod_cfg = pod_config(&node, "vmpod");
    pod_cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["svc.test".into()],
        options: vec!["ndots:5".into()],
    });
    let pod = c.run_pod(&pod_cfg, "vm").expect("RunPodSandbox on vm");
    let mut main = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let private = cri::MountPropagation::PropagationPrivate;
    main.mounts = vec![
        mount("/data", &empty, private, false),
        mount("/rw", &rw, private, false),
        mount("/ro", &ro, private, true),
        mount("/etc/config/key", &config, private, true),
    ];
    let mut side = container_config("side", BUSYBOX_IMAGE, &["sleep", "3600"]);
    side.mounts = vec![mount("/data", &empty, private, false)];
    let mut ids = Vec::new();
    for cfg in [&main, &side] {
        let id = c.run_container(&pod, cfg, &pod_cfg);
        ids.push(id);
    }
    let (m, s) = (&ids[0], &ids[1]);
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest_kernel = exec_ok(&c, m, "uname -r");
    assert_ne!(
        guest_kernel.trim(),
        host_kernel.trim(),
        "the container runs in the VM"
    );
    assert_eq!(
        exec_ok(&c, s, "cat /proc/sys/kernel/random/boot_id"),
        exec_ok(&c, m, "cat /proc/sys/kernel/random/boot_id"),
        "one VM per pod"
    );

    exec_ok(&c, m, "echo shared > /data/f");
    assert_eq!(
        exec_ok(&c, s, "cat /data/f"),
        "shared\n",
        "emptyDir between containers"
    );
    exec_ok(&c, m, "echo from the guest > /rw/out");
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "from the guest\n",
        "hostPath rw"
    );
    assert_eq!(exec_ok(&c, m, "cat /ro/given"), "from the host\n");
    let out = c
        .exec_sync(m, &["sh", "-c", "echo x > /ro/new"], 30)
        .expect("ExecSync");
    assert_ne!(out.exit_code, 0, "hostPath ro: {out:?}");
    assert!(!ro.join("new").exists());

    assert_eq!(exec_ok(&c, m, "cat /etc/config/key"), "version 1\n");
    std::fs::write(&config, "version 2\n").unwrap();
    assert!(
        switchyard_tests::eventually(Duration::from_secs(20), || {
            c.exec_sync(m, &["cat", "/etc/config/key"], 10)
                .map(|o| o.stdout)
                .unwrap_or_default()
                == "version 2\n"
        }),
        "the configmap-style file is kept current in the guest"
    );

    assert_eq!(
        exec_ok(&c, m, "echo shm > /dev/shm/f && cat /dev/shm/f"),
        "shm\n"
    );
    assert_eq!(exec_ok(&c, m, "hostname").trim(), "vmpod");
    let resolv = exec_ok(&c, m, "cat /etc/resolv.conf");
    assert!(
        resolv.contains("nameserver 10.96.0.10") && resolv.contains("svc.test"),
        "{resolv}"
    );
    let hosts = exec_ok(&c, m, "cat /etc/hosts");
    assert!(hosts.contains("localhost"), "{hosts}");
    teardown(&c, &pod);
    assert_no_pod_processes(&node);
}

/// Issue 19: a vm pod's VM boots at RunPodSandbox, before any container, sized from the pod's
/// resources (kubelet's sum of its containers' limits) on top of the runtime's base, as Kata
/// sizes it: one vCPU more for a quota of one CPU, 256 MiB more for a 256 MiB limit. The pod's
/// container runs in that VM (no second one), and nothing is left after the pod. containerd
/// boots the VM for the pause container and hands the size in its sandbox annotations;
/// switchyardd boots it for a sandbox task without a process.
fn vm_pod_sized_from_its_resources(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let mut pod_cfg = pod_config(&node, "sized");
    pod_cfg.linux.get_or_insert_with(Default::default).resources =
        Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 100_000,
            memory_limit_in_bytes: 256 << 20,
            ..Default::default()
        });
    let vms = || {
        switchyard_tests::processes_matching(&[
            "qemu-system",
            &node.dir.path().display().to_string(),
        ])
    };
    let pod = c.run_pod(&pod_cfg, "vm").expect("RunPodSandbox");
    let booted = vms();
    assert_eq!(booted.len(), 1, "one VM once the pod runs: {booted:?}");
    let cmd = &booted[0].1;
    // The test's vm options give the default base: 1 vCPU and 256 MiB.
    assert!(
        cmd.contains("-smp 2 ") && cmd.contains("-m 512M"),
        "sized for the pod: {cmd}"
    );
    let id = c.run_container(
        &pod,
        &container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]),
        &pod_cfg,
    );
    let cpus = exec_ok(&c, &id, "grep -c ^processor /proc/cpuinfo");
    assert_eq!(cpus.trim(), "2", "the container sees the pod's vCPUs");
    let mem_kib: u64 = exec_ok(
        &c,
        &id,
        "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
    )
    .trim()
    .parse()
    .expect("MemTotal");
    assert!(
        mem_kib > 256 * 1024,
        "more than the base 256 MiB: {mem_kib} kB"
    );
    let now = vms();
    assert_eq!(
        now.iter().map(|v| v.0).collect::<Vec<_>>(),
        booted.iter().map(|v| v.0).collect::<Vec<_>>(),
        "the container runs in the pod's VM"
    );
    c.stop_container(&id, 0).expect("StopContainer");
    c.remove_container(&id).expect("RemoveContainer");
    assert_eq!(vms().len(), 1, "the pod's VM outlives its last container");
    teardown(&c, &pod);
    assert_no_pod_processes(&node);
}

/// Issue 18: bad input on the vm handler fails with an error naming the cause and leaves
/// nothing: a mount the vm runtime cannot honour (bidirectional propagation into the host).
fn bad_input_vm(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    let c = node.client();
    let shared = SharedDir::new(node.dir.path(), "bidi");
    let pod_cfg = pod_config(&node, "badvm");
    let pod = c.run_pod(&pod_cfg, "vm").expect("RunPodSandbox on vm");
    let mut cfg = container_config("bidi", BUSYBOX_IMAGE, &["sleep", "3600"]);
    cfg.mounts = vec![mount(
        "/mnt",
        &shared.path,
        cri::MountPropagation::PropagationBidirectional,
        false,
    )];
    let err = c
        .create_container(&pod, &cfg, &pod_cfg)
        .and_then(|id| c.start_container(&id))
        .expect_err("a bidirectional mount cannot reach the host from a VM");
    assert!(
        err.message().contains("propagation") || err.message().contains("rshared"),
        "{err:?}"
    );
    teardown(&c, &pod);
    assert_no_pod_processes(&node);
}

/// Issue 18: bad input on the wasm handler fails with an error naming the cause and leaves
/// nothing: a neither-Wasm-nor-ELF entrypoint.
fn bad_input_wasm(peer: Peer, _handler: &str) {
    let Some(node) = node(peer) else { return };
    node.import(wasm_images());
    let c = node.client();
    let pod_cfg = pod_config(&node, "badwasm");
    let pod = c.run_pod(&pod_cfg, "wasm").expect("RunPodSandbox on wasm");
    let err = c
        .create_container(
            &pod,
            &container_config("app", NOT_WASM_IMAGE, &[]),
            &pod_cfg,
        )
        .and_then(|id| c.start_container(&id))
        .expect_err("a shell script is neither Wasm nor ELF");
    assert!(err.message().contains("app.wasm"), "{err:?}");
    teardown(&c, &pod);
    assert_no_pod_processes(&node);
}

/// After every pod is removed: no shim or VM of this node's containerd is left, and nothing is
/// mounted under its directories.
fn assert_no_pod_processes(node: &CriNode) {
    let sock = node.socket.display().to_string();
    assert!(
        switchyard_tests::eventually(Duration::from_secs(20), || {
            switchyard_tests::processes_matching(&["-address", &sock]).is_empty()
        }),
        "shims left: {:?}",
        switchyard_tests::processes_matching(&["-address", &sock])
    );
    let qemu = switchyard_tests::processes_matching(&[
        "qemu-system",
        &node.dir.path().display().to_string(),
    ]);
    assert!(qemu.is_empty(), "VMs left: {qemu:?}");
}

/// One test per peer for a scenario on a handler: containerd 1.6, 1.7 and 2.1, then
/// switchyardd. A scenario not made to pass yet is listed with `pending = "why"` (its containerd
/// tests) and `switchyardd_pending = "why"` (its switchyardd test, which can be pending while
/// containerd passes): it is compiled and runs with `cargo test -- --ignored`, and drops the
/// marker the day it passes.
macro_rules! per_peer {
    (
        $scenario:ident, $handler:literal
        $(, pending = $why:literal)?
        $(, switchyardd_pending = $sy_why:literal)? $(,)?
    ) => {
        mod $scenario {
            #[test]
            $(#[ignore = $why])?
            fn containerd_1_6() {
                super::$scenario(switchyard_tests::cri::Peer::V1_6, $handler);
            }
            #[test]
            $(#[ignore = $why])?
            fn containerd_1_7() {
                super::$scenario(switchyard_tests::cri::Peer::V1_7, $handler);
            }
            #[test]
            $(#[ignore = $why])?
            fn containerd_2_1() {
                super::$scenario(switchyard_tests::cri::Peer::V2_1, $handler);
            }
            #[test]
            $(#[ignore = $sy_why])?
            fn switchyardd() {
                super::$scenario(switchyard_tests::cri::Peer::Switchyardd, $handler);
            }
        }
    };
}

mod runc {
    use super::*;
    per_peer!(pod_lifecycle, "runc");
    per_peer!(propagation, "runc");
    per_peer!(seccomp, "runc");
    per_peer!(tty, "runc");
    per_peer!(readonly_and_masked, "runc");
    per_peer!(shared_namespaces_and_security, "runc");
    per_peer!(pod_network, "runc");
    per_peer!(shared_pid_namespace, "runc");
    per_peer!(oom_killed, "runc");
    per_peer!(bad_handler, "runc");
    per_peer!(exec_streaming, "runc");
}

mod native {
    use super::*;
    per_peer!(pod_lifecycle, "native");
    per_peer!(propagation, "native");
    per_peer!(seccomp, "native");
    per_peer!(tty, "native");
    per_peer!(readonly_and_masked, "native");
    per_peer!(shared_namespaces_and_security, "native");
    per_peer!(pod_network, "native");
    per_peer!(shared_pid_namespace, "native");
    per_peer!(oom_killed, "native");
    per_peer!(exec_streaming, "native");
}

mod vm {
    use super::*;
    per_peer!(pod_lifecycle, "vm");
    per_peer!(exec_streaming, "vm");
    per_peer!(vm_pod_volumes, "vm");
    per_peer!(vm_pod_sized_from_its_resources, "vm");
    per_peer!(bad_input_vm, "vm");
    per_peer!(vm_pod_network, "vm");
}

mod wasm {
    use super::*;
    // The pod's containers here are busybox: Linux containers in a Wasm pod (sidecars).
    per_peer!(pod_lifecycle, "wasm");
    per_peer!(wasm_pod_http_and_sidecar, "wasm");
    per_peer!(bad_input_wasm, "wasm");
    per_peer!(wasm_pod_network, "wasm");
    per_peer!(wasm_pod_network_off_and_bounded, "wasm");
    per_peer!(bad_input_wasm_port_in_use, "wasm");
}
