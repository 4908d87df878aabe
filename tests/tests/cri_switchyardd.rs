//! Issue 19, first part: switchyardd serves CRI on its socket. `Version`, `Status` (its
//! conditions true only when they are, a handler per configured runtime), `RuntimeConfig`,
//! `UpdateRuntimeConfig`, the image service over the image store (in the `k8s.io` namespace,
//! pulled from the loopback registry), and UNIMPLEMENTED naming the method for what is not
//! served yet. Driven by the same CRI client as the containerd tests, and by `yard cri`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::Path;

use switchyard_api::cri::v1 as cri;
use switchyard_tests::cri::{Cri, TestNet};
use switchyard_tests::images::{Registry, busybox_image};
use switchyard_tests::*;

/// A CNI bridge network config for `Status`; never set up here (no pod runs).
fn write_bridge_conf(dir: &Path) {
    write(
        &dir.join("10-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"crit","plugins":[
            {"type":"bridge","bridge":"yardcrit0","isGateway":true,"ipMasq":false,
             "ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.250.0/24"}]]}},
            {"type":"loopback"}]}"#,
    );
}

/// switchyardd with its CNI conf dir in its own directory (holding a bridge config when
/// `network` is set) and Debian's plugins.
fn daemon(network: bool) -> Option<Daemon> {
    if !require_root_and(&["docker-registry"])
        || !require(
            Path::new("/usr/lib/cni/bridge").is_file(),
            "needs Debian's containernetworking-plugins (/usr/lib/cni)",
        )
    {
        return None;
    }
    Some(Daemon::start_in(|dir| {
        let conf = dir.join("net.d");
        std::fs::create_dir_all(&conf).expect("conf dir");
        if network {
            write_bridge_conf(&conf);
        }
        format!(
            "[cri]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
            conf.display()
        )
    }))
}

fn condition(st: &cri::StatusResponse, kind: &str) -> cri::RuntimeCondition {
    st.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == kind))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} condition: {st:?}"))
}

#[test]
fn issue19_version_status_and_runtime_config() {
    let Some(d) = daemon(true) else { return };
    let c = Cri::connect(&d.socket);
    let v = c.version();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("switchyard", "v1"),
        "{v:?}"
    );

    let st = c
        .call(c.runtime().status(cri::StatusRequest { verbose: true }))
        .expect("Status");
    let runtime = condition(&st, "RuntimeReady");
    assert!(runtime.status, "{runtime:?}");
    let network = condition(&st, "NetworkReady");
    assert!(network.status, "{network:?}");
    let names: Vec<&str> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    for handler in ["", "native", "vm", "wasm", "runc"] {
        assert!(names.contains(&handler), "handler {handler:?} in {names:?}");
    }
    let native = st
        .runtime_handlers
        .iter()
        .find(|h| h.name == "native")
        .and_then(|h| h.features);
    assert!(
        native.is_some_and(|f| f.recursive_read_only_mounts),
        "{native:?}"
    );
    assert!(st.info["config"].contains("cniConfDir"), "{:?}", st.info);

    let rc = c
        .call(c.runtime().runtime_config(cri::RuntimeConfigRequest {}))
        .expect("RuntimeConfig");
    assert_eq!(
        rc.linux.map(|l| l.cgroup_driver),
        Some(cri::CgroupDriver::Cgroupfs as i32)
    );

    let update = |cidr: &str| {
        c.call(
            c.runtime()
                .update_runtime_config(cri::UpdateRuntimeConfigRequest {
                    runtime_config: Some(cri::RuntimeConfig {
                        network_config: Some(cri::NetworkConfig {
                            pod_cidr: cidr.to_owned(),
                        }),
                    }),
                }),
        )
    };
    update("10.88.0.0/16").expect("UpdateRuntimeConfig");
    let e = update("10.88.0.0/99").expect_err("a bad pod CIDR");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("pod_cidr"), "{e:?}");
    let st = c
        .call(c.runtime().status(cri::StatusRequest { verbose: true }))
        .expect("Status");
    assert!(st.info["config"].contains("10.88.0.0/16"), "{:?}", st.info);
}

/// NetworkReady is false, with the reason, when no CNI config is there; the runtime is still
/// ready.
#[test]
fn issue19_network_not_ready_without_a_cni_config() {
    let Some(d) = daemon(false) else { return };
    let c = Cri::connect(&d.socket);
    let st = c
        .call(c.runtime().status(cri::StatusRequest { verbose: false }))
        .expect("Status");
    assert!(condition(&st, "RuntimeReady").status, "{st:?}");
    let network = condition(&st, "NetworkReady");
    assert!(!network.status, "{network:?}");
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(network.message.contains("net.d"), "{network:?}");
    // yard info shows the endpoint, the handlers and the CNI state.
    let out = d.yard_ok(&["info"]);
    assert!(out.contains("CRI: unix://"), "{out}");
    assert!(
        out.contains("NetworkReady: no (NetworkPluginNotReady"),
        "{out}"
    );
    assert!(out.contains("RuntimeReady: yes"), "{out}");
    let info: serde_json::Value = serde_json::from_str(&d.yard_ok(&["info", "--json"])).unwrap();
    let handlers = info["cri"]["handlers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for h in ["", "native", "vm", "wasm", "runc"] {
        assert!(handlers.iter().any(|v| v == h), "{h:?} in {handlers:?}");
    }
}

/// What is not served yet answers UNIMPLEMENTED naming the method, at once.
#[test]
fn issue19_unserved_rpcs_name_the_method() {
    let Some(d) = daemon(true) else { return };
    let c = Cri::connect(&d.socket);
    let e = c
        .container_stats("abc")
        .expect_err("ContainerStats is not served yet");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(
        e.message()
            .contains("/runtime.v1.RuntimeService/ContainerStats"),
        "{e:?}"
    );
    let e = c
        .call(
            c.images()
                .stream_images(cri::StreamImagesRequest::default()),
        )
        .map(drop)
        .expect_err("StreamImages is not served yet");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("StreamImages"), "{e:?}");
}

/// PullImage from the loopback registry, ImageStatus by name and by id, ListImages, the same
/// image in `yard -n k8s.io images`, ImageFsInfo, RemoveImage (twice: idempotent); and
/// `yard cri pull/images/rmi` against switchyardd.
#[test]
fn issue19_images_through_cri() {
    let Some(d) = daemon(true) else { return };
    let reg = Registry::start();
    reg.push(
        "busybox",
        "1",
        &busybox_image(Vec::new(), serde_json::json!({})),
    );
    let reference = reg.reference("busybox", "1");
    let c = Cri::connect(&d.socket);
    let spec = |image: &str| cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    };
    let status = |image: &str| {
        c.call(c.images().image_status(cri::ImageStatusRequest {
            image: Some(spec(image)),
            verbose: true,
        }))
        .expect("ImageStatus")
    };
    assert!(status(&reference).image.is_none(), "not pulled yet");

    let pulled = c
        .call(c.images().pull_image(cri::PullImageRequest {
            image: Some(spec(&reference)),
            ..Default::default()
        }))
        .expect("PullImage");
    assert!(
        pulled.image_ref.starts_with("sha256:"),
        "the image's id: {pulled:?}"
    );
    let st = status(&reference);
    let image = st.image.clone().expect("pulled image");
    assert_eq!(image.id, pulled.image_ref);
    assert_eq!(
        image.repo_tags,
        std::slice::from_ref(&reference),
        "{image:?}"
    );
    assert!(
        image.repo_digests[0].starts_with(&format!("{}@sha256:", reference.trim_end_matches(":1"))),
        "{image:?}"
    );
    assert!(image.size > 0, "{image:?}");
    assert!(st.info["info"].contains(&image.id), "{:?}", st.info);
    // By id and by a short id, as crictl accepts them.
    assert_eq!(
        status(&image.id).image.map(|i| i.id),
        Some(image.id.clone())
    );
    let short = &image.id["sha256:".len().."sha256:".len() + 12];
    assert_eq!(status(short).image.map(|i| i.id), Some(image.id.clone()));

    let listed = c
        .call(c.images().list_images(cri::ListImagesRequest::default()))
        .expect("ListImages")
        .images;
    assert!(listed.iter().any(|i| i.id == image.id), "{listed:?}");
    let yard = d.yard_ok(&["-n", "k8s.io", "images", "-q"]);
    assert!(yard.lines().any(|l| l == reference), "{yard}");

    let fs = c
        .call(c.images().image_fs_info(cri::ImageFsInfoRequest {}))
        .expect("ImageFsInfo");
    let used: u64 = fs
        .image_filesystems
        .iter()
        .filter_map(|f| f.used_bytes.map(|u| u.value))
        .sum();
    assert!(used > 0, "{fs:?}");

    for _ in 0..2 {
        c.call(c.images().remove_image(cri::RemoveImageRequest {
            image: Some(spec(&reference)),
        }))
        .expect("RemoveImage");
    }
    assert!(status(&reference).image.is_none(), "removed");

    // yard cri, as crictl, against switchyardd.
    let yard_cri = |args: &[&str]| {
        let mut all = vec!["cri"];
        all.extend_from_slice(args);
        d.yard_ok(&all)
    };
    let out = yard_cri(&["version"]);
    assert!(out.contains("switchyard"), "{out}");
    yard_cri(&["pull", &reference]);
    let out = yard_cri(&["images"]);
    assert!(out.contains(reference.trim_end_matches(":1")), "{out}");
    yard_cri(&["rmi", &reference]);
    let out = yard_cri(&["images"]);
    assert!(!out.contains(reference.trim_end_matches(":1")), "{out}");
}

/// switchyardd with a CNI bridge network of the test's own ([`TestNet`]: no masquerade, no
/// forwarding off the bridge).
fn pod_daemon(net_dir: &Path) -> Option<(Daemon, TestNet)> {
    if !require_root_and(&["iptables", "ip", "nsenter"])
        || !require(
            Path::new("/usr/lib/cni/bridge").is_file(),
            "needs Debian's containernetworking-plugins (/usr/lib/cni)",
        )
    {
        return None;
    }
    let net = TestNet::new(net_dir);
    let conf = net.conf_dir.clone();
    let d = Daemon::start_in(|_| {
        format!(
            "[cri]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
            conf.display()
        )
    });
    Some((d, net))
}

/// The pod's network namespace, from PodSandboxStatus' verbose info.
fn pod_netns(c: &Cri, pod: &str) -> Option<String> {
    let st = c
        .call(
            c.runtime()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.to_owned(),
                    verbose: true,
                }),
        )
        .expect("PodSandboxStatus");
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).expect("info json");
    info["netns"].as_str().map(str::to_owned)
}

/// `cmd` run in network namespace `netns`.
fn in_netns(netns: &str, cmd: &[&str]) -> std::process::Output {
    run_timeout(
        std::process::Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(cmd),
        std::time::Duration::from_secs(20),
    )
}

fn run_pod(c: &Cri, node: &Path, name: &str, handler: &str) -> Result<String, tonic::Status> {
    let mut cfg = switchyard_api::cri_defaults::pod_config(
        cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: unique_id("uid"),
            namespace: "default".to_owned(),
            attempt: 0,
        },
        name,
        &node.join("pods").display().to_string(),
    );
    cfg.labels.insert("app".to_owned(), name.to_owned());
    c.call(c.runtime().run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(cfg),
        runtime_handler: handler.to_owned(),
    }))
    .map(|r| r.pod_sandbox_id)
}

/// Entries of the daemon's pod network namespace directory.
fn netns_entries(d: &Daemon) -> Vec<String> {
    entries(&d.state_dir().join("netns"))
}

/// RunPodSandbox gives each pod its own network namespace on the CNI bridge with an IP from
/// the network's range; two pods reach each other by pod IP; ListPodSandbox filters by label
/// and state; the pods survive a kill -9 and restart of switchyardd; StopPodSandbox runs CNI
/// DEL (the veth and the IP lease go) and removes the namespace; RemovePodSandbox forgets the
/// pod, and again succeeds.
#[test]
fn issue19_pod_sandboxes_on_the_cni_bridge() {
    let net_dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, net)) = pod_daemon(net_dir.path()) else {
        return;
    };
    let c = Cri::connect(&d.socket);
    let a = run_pod(&c, net_dir.path(), "pod-a", "native").expect("RunPodSandbox a");
    let b = run_pod(&c, net_dir.path(), "pod-b", "").expect("RunPodSandbox b (default handler)");
    let status = |c: &Cri, id: &str| {
        c.call(
            c.runtime()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.to_owned(),
                    verbose: false,
                }),
        )
        .map(|r| r.status.expect("status"))
    };
    let sa = status(&c, &a).expect("status a");
    let sb = status(&c, &b).expect("status b");
    assert_eq!(
        sa.state,
        cri::PodSandboxState::SandboxReady as i32,
        "{sa:?}"
    );
    assert_eq!(sa.runtime_handler, "native");
    let ip =
        |s: &cri::PodSandboxStatus| s.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
    let (ip_a, ip_b) = (ip(&sa), ip(&sb));
    assert!(
        net.contains(&ip_a) && net.contains(&ip_b) && ip_a != ip_b,
        "{ip_a} {ip_b} in {}",
        net.subnet
    );

    // Inside the pod's namespace: eth0 holds the pod IP, and the other pod answers.
    let ns_a = pod_netns(&c, &a).expect("pod a's netns");
    assert_eq!(
        netns_entries(&d).len(),
        2,
        "{ns_a}: {:?}",
        netns_entries(&d)
    );
    let out = in_netns(&ns_a, &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(
        text(&out.stdout).contains(&format!("{ip_a}/")),
        "{}",
        show(&out)
    );
    let busybox = switchyard_tests::images::host_busybox();
    let busybox = busybox.to_str().expect("path");
    let out = in_netns(&ns_a, &[busybox, "ping", "-c", "1", "-W", "5", &ip_b]);
    assert!(out.status.success(), "pod a pings pod b: {}", show(&out));

    // Filters.
    let list = |c: &Cri, filter: cri::PodSandboxFilter| {
        c.call(c.runtime().list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(filter),
        }))
        .expect("ListPodSandbox")
        .items
        .into_iter()
        .map(|p| p.id)
        .collect::<Vec<_>>()
    };
    let by_label = cri::PodSandboxFilter {
        label_selector: [("app".to_owned(), "pod-b".to_owned())].into(),
        ..Default::default()
    };
    assert_eq!(list(&c, by_label.clone()), std::slice::from_ref(&b));
    assert_eq!(
        list(
            &c,
            cri::PodSandboxFilter {
                id: a[..12].to_owned(),
                ..Default::default()
            }
        ),
        std::slice::from_ref(&a)
    );

    // kill -9 and restart: the same pods, still ready, their namespaces intact.
    d.restart();
    let c = Cri::connect(&d.socket);
    let sa = status(&c, &a).expect("pod a after the restart");
    assert_eq!(
        sa.state,
        cri::PodSandboxState::SandboxReady as i32,
        "{sa:?}"
    );
    assert_eq!(ip(&sa), ip_a);
    let out = in_netns(&ns_a, &[busybox, "ping", "-c", "1", "-W", "5", &ip_b]);
    assert!(out.status.success(), "after the restart: {}", show(&out));

    // As after a reboot, pod b's namespace is gone while the daemon is down: b comes back not
    // ready (a is still ready), and Stop and Remove still clean up after it (below).
    let ns_b = pod_netns(&c, &b).expect("pod b's netns");
    d.kill9();
    nix::mount::umount2(ns_b.as_str(), nix::mount::MntFlags::MNT_DETACH).expect("umount b's netns");
    std::fs::remove_file(&ns_b).expect("remove b's netns");
    d.restart();
    let c = Cri::connect(&d.socket);
    let sb = status(&c, &b).expect("pod b after the reboot-like restart");
    assert_eq!(
        sb.state,
        cri::PodSandboxState::SandboxNotready as i32,
        "{sb:?}"
    );
    let sa = status(&c, &a).expect("pod a after the second restart");
    assert_eq!(
        sa.state,
        cri::PodSandboxState::SandboxReady as i32,
        "{sa:?}"
    );

    // Stop: CNI DEL and the namespace removed; the pod is listed as not ready.
    c.call(c.runtime().stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: a.clone(),
    }))
    .expect("StopPodSandbox");
    c.call(c.runtime().stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: a.clone(),
    }))
    .expect("StopPodSandbox again");
    let sa = status(&c, &a).expect("stopped pod a");
    assert_eq!(
        sa.state,
        cri::PodSandboxState::SandboxNotready as i32,
        "{sa:?}"
    );
    assert!(!Path::new(&ns_a).exists(), "netns {ns_a} left after stop");
    let not_ready = cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue {
            state: cri::PodSandboxState::SandboxNotready as i32,
        }),
        ..Default::default()
    };
    let mut stopped = list(&c, not_ready);
    stopped.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(stopped, want);
    let leases = net_dir.path().join("ipam");
    let leased = |ip: &str| files_under(&leases).iter().any(|p| p.ends_with(ip));
    assert!(
        !leased(&ip_a) && leased(&ip_b),
        "pod a's lease released, b's kept: {:?}",
        files_under(&leases)
    );

    for id in [&a, &b, &a] {
        c.call(
            c.runtime()
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }),
        )
        .expect("RemovePodSandbox");
    }
    assert!(list(&c, cri::PodSandboxFilter::default()).is_empty());
    assert!(netns_entries(&d).is_empty(), "{:?}", netns_entries(&d));
    assert!(!leased(&ip_b), "{:?}", files_under(&leases));
    let e = status(&c, &a).expect_err("a removed pod");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // yard cri, as crictl: runp, pods, inspectp, stopp, rmp.
    let logs = net_dir.path().join("yard-pods");
    let pod = d.yard_ok(&[
        "cri",
        "runp",
        "--pod-name",
        "yardpod",
        "-r",
        "native",
        "--log-dir",
        logs.to_str().unwrap(),
    ]);
    let pod = pod.trim().to_owned();
    assert_eq!(pod.len(), 64, "{pod}");
    let pods = d.yard_ok(&["cri", "pods", "-q"]);
    assert_eq!(pods.trim(), pod);
    let inspect = d.yard_ok(&["cri", "inspectp", &pod]);
    assert!(
        inspect.contains("yardpod")
            && inspect.contains(&net.subnet.trim_end_matches("0/24").to_owned()),
        "{inspect}"
    );
    d.yard_ok(&["cri", "stopp", &pod]);
    d.yard_ok(&["cri", "rmp", &pod]);
    assert!(d.yard_ok(&["cri", "pods", "-q"]).trim().is_empty());
    assert!(netns_entries(&d).is_empty(), "{:?}", netns_entries(&d));
}

/// Bad input: an unknown handler, a missing metadata name and a CNI config whose plugin fails
/// are CRI errors naming the cause, and leave no namespace, record, veth or lease behind.
#[test]
fn issue19_bad_pod_sandboxes_leave_nothing() {
    let net_dir = tempfile::tempdir().expect("tempdir");
    let Some((d, net)) = pod_daemon(net_dir.path()) else {
        return;
    };
    let c = Cri::connect(&d.socket);
    let e = run_pod(&c, net_dir.path(), "bad", "kata-nope").expect_err("unknown handler");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("kata-nope") && e.message().contains("native"),
        "{e:?}"
    );

    let e = c
        .call(c.runtime().run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    uid: "u".into(),
                    namespace: "n".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        }))
        .expect_err("no name");
    assert!(e.message().contains("config.metadata.name"), "{e:?}");

    // A network whose IPAM range is outside its subnet: the bridge plugin fails after
    // creating the bridge side; everything it made is undone.
    let conf = net.conf_dir.join("10-yardtest.conflist");
    let good = std::fs::read_to_string(&conf).expect("conf");
    let mut bad: serde_json::Value = serde_json::from_str(&good).expect("json");
    bad["plugins"][0]["ipam"]["ranges"][0][0]["rangeStart"] = "10.250.250.10".into();
    write(&conf, &bad.to_string());
    let e = run_pod(&c, net_dir.path(), "badnet", "native").expect_err("a failing plugin");
    assert!(
        e.message().contains("bridge") && e.message().contains("RangeStart"),
        "{e:?}"
    );

    assert!(
        c.call(
            c.runtime()
                .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        )
        .expect("ListPodSandbox")
        .items
        .is_empty()
    );
    assert!(netns_entries(&d).is_empty(), "{:?}", netns_entries(&d));
    assert!(files_under(&d.dir.path().join("root/cri/sandboxes")).is_empty());
    let veths = text(
        &run_timeout(
            std::process::Command::new("ip").args(["-o", "link", "show", "master", &net.bridge]),
            std::time::Duration::from_secs(10),
        )
        .stdout,
    );
    assert!(
        veths.trim().is_empty(),
        "veths left on {}: {veths}",
        net.bridge
    );
}

/// What only switchyardd shows of a native container (the lifecycle itself, logs and ExecSync
/// are `pod_lifecycle` in `cri.rs`, run against switchyardd too): a busybox pulled with
/// PullImage from the loopback registry, the pod's IP on its eth0, the container as a
/// containerd task in `k8s.io`, a command that cannot run, StopContainer's SIGTERM (its trap's
/// exit code), RemoveContainer twice; RemovePodSandbox removes what is left, and nothing
/// stays: task, container record, fifos, netns, cgroups.
#[test]
fn issue19_a_native_container_through_switchyardd() {
    let net_dir = tempfile::tempdir().expect("tempdir");
    let Some((d, net)) = pod_daemon(net_dir.path()) else {
        return;
    };
    if !require_root_and(&["docker-registry"]) {
        return;
    }
    let reg = Registry::start();
    reg.push(
        "busybox",
        "1",
        &busybox_image(Vec::new(), serde_json::json!({})),
    );
    let reference = reg.reference("busybox", "1");
    let c = Cri::connect(&d.socket);
    c.call(c.images().pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: reference.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }))
    .expect("PullImage");

    let pod = run_pod(&c, net_dir.path(), "web", "native").expect("RunPodSandbox");
    let pod_cfg = c
        .call(
            c.runtime()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                }),
        )
        .expect("status")
        .status
        .expect("status");
    let pod_ip = pod_cfg.network.map(|n| n.ip).unwrap_or_default();
    let log_dir = net_dir.path().join("pods");
    let mut sandbox_config = switchyard_api::cri_defaults::pod_config(
        pod_cfg.metadata.clone().expect("metadata"),
        "web",
        &log_dir.display().to_string(),
    );
    sandbox_config
        .labels
        .insert("app".to_owned(), "web".to_owned());
    let config = switchyard_tests::cri::container_config(
        "main",
        &reference,
        &["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 1; done"],
    );
    let id = c
        .call(c.runtime().create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        }))
        .expect("CreateContainer")
        .container_id;
    c.start_container(&id).expect("StartContainer");
    c.wait_container_state(
        &id,
        cri::ContainerState::ContainerRunning,
        std::time::Duration::from_secs(30),
    );
    let out = c
        .exec_sync(
            &id,
            &["/bin/busybox", "ip", "-4", "-o", "addr", "show", "eth0"],
            30,
        )
        .expect("ExecSync");
    assert!(
        out.stdout.contains(&format!("{pod_ip}/")),
        "the pod's network: {out:?}"
    );
    let ps = d.yard_ok(&["-n", "k8s.io", "ps"]);
    assert!(ps.contains(&id[..12]), "{ps}");
    // A command that cannot run is an error or a failed exit, and the container still takes
    // the next one.
    match c.exec_sync(&id, &["/no/such/program"], 30) {
        Ok(out) => assert_ne!(out.exit_code, 0, "{out:?}"),
        Err(e) => assert!(e.message().contains("no/such/program"), "{e:?}"),
    }
    let out = c
        .exec_sync(&id, &["echo", "still here"], 30)
        .expect("ExecSync after a failed one");
    assert_eq!(out.stdout, "still here\n", "{out:?}");

    c.stop_container(&id, 10).expect("StopContainer");
    let st = c.container_status(&id).expect("ContainerStatus");
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "{st:?}"
    );
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (7, "Error"),
        "the TERM trap ran: {st:?}"
    );
    c.remove_container(&id).expect("RemoveContainer");
    assert!(c.container_status(&id).is_err(), "the container is gone");
    c.remove_container(&id).expect("RemoveContainer again");
    let ps = d.yard_ok(&["-n", "k8s.io", "ps"]);
    assert!(!ps.contains(&id[..12]), "{ps}");

    // A second container, left for RemovePodSandbox to remove.
    let config = switchyard_tests::cri::container_config("sleeper", &reference, &["sleep", "3600"]);
    let id2 = c
        .call(c.runtime().create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(config),
            sandbox_config: None,
        }))
        .expect("CreateContainer")
        .container_id;
    c.start_container(&id2).expect("StartContainer");
    c.stop_pod(&pod).expect("StopPodSandbox");
    let st = c.container_status(&id2).expect("ContainerStatus");
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "{st:?}"
    );
    c.remove_pod(&pod).expect("RemovePodSandbox");
    assert!(c.list_containers(None).is_empty());
    let ps = d.yard_ok(&["-n", "k8s.io", "ps"]);
    assert!(!ps.contains(&id2[..12]), "{ps}");
    assert!(netns_entries(&d).is_empty(), "{:?}", netns_entries(&d));
    assert!(
        entries(&d.state_dir().join("cri/io")).is_empty(),
        "fifos left"
    );
    for c in [&id, &id2] {
        let left = cgroups_matching(&format!("k8s.io/{c}"));
        assert!(left.is_empty(), "cgroups left: {left:?}");
    }
    let _ = net;
}
