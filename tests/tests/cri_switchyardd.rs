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
    let config: serde_json::Value = serde_json::from_str(&st.info["config"]).expect("json");
    let pod_network = |name: &str| {
        config["runtimes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == name))
            .and_then(|r| r["podNetwork"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(pod_network("vm").contains("virtio-net"), "{config}");
    assert_eq!(pod_network("native"), "the pod's network namespace");

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
        .call(
            c.runtime()
                .checkpoint_container(cri::CheckpointContainerRequest::default()),
        )
        .expect_err("CheckpointContainer is not served yet");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(
        e.message()
            .contains("/runtime.v1.RuntimeService/CheckpointContainer"),
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
/// forwarding off the bridge), and the tests' pause image as `[cri] sandbox_image`.
fn pod_daemon(net_dir: &Path) -> Option<(Daemon, TestNet)> {
    pod_daemon_with(
        net_dir,
        &format!(
            "sandbox_image = \"{}\"\n",
            switchyard_tests::cri::PAUSE_IMAGE
        ),
    )
}

/// [`pod_daemon`] with `cri` (lines of its `[cri]` table) instead of its sandbox image.
fn pod_daemon_with(net_dir: &Path, cri: &str) -> Option<(Daemon, TestNet)> {
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
            "[cri]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n{cri}",
            conf.display(),
        )
    });
    Some((d, net))
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
    run_pod_config(c, pod_config(node, name), handler)
}

/// A pod `name` with its logs under `<node>/pods` and an `app=<name>` label.
fn pod_config(node: &Path, name: &str) -> cri::PodSandboxConfig {
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
    cfg
}

fn run_pod_config(
    c: &Cri,
    cfg: cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
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
    let ns_a = c.pod_netns(&a).expect("pod a's netns");
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
    let ns_b = c.pod_netns(&b).expect("pod b's netns");
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

/// Bad input: an unknown handler, a missing metadata name, a `vm` pod whose VM cannot boot (its
/// kernel is missing: RunPodSandbox boots it) and a CNI config whose plugin fails are CRI errors
/// naming the cause, and leave no namespace, record, veth, task, shim or lease behind.
#[test]
fn issue19_bad_pod_sandboxes_leave_nothing() {
    let net_dir = tempfile::tempdir().expect("tempdir");
    let missing_kernel = net_dir.path().join("no-such-vmlinux");
    let Some((d, net)) = pod_daemon_with(
        net_dir.path(),
        &format!(
            "sandbox_image = \"{}\"\n[runtimes.vmbad]\nruntime_type = \"io.containerd.yard-vm.v1\"\n\
             [runtimes.vmbad.options]\nbackend = \"qemu\"\nkernel = \"{}\"\n",
            switchyard_tests::cri::PAUSE_IMAGE,
            missing_kernel.display()
        ),
    ) else {
        return;
    };
    let c = Cri::connect(&d.socket);
    let e = run_pod(&c, net_dir.path(), "badvm", "vmbad").expect_err("no kernel");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&missing_kernel.display().to_string()),
        "{e:?}"
    );
    let sock = d.socket.display().to_string();
    assert!(
        eventually(std::time::Duration::from_secs(20), || {
            processes_matching(&["containerd-shim-yard-vm-v1", &sock]).is_empty()
        }),
        "vm shims left: {:?}",
        processes_matching(&["containerd-shim-yard-vm-v1", &sock])
    );
    let containers: serde_json::Value =
        serde_json::from_str(&d.yard_ok(&["-n", "k8s.io", "ps", "--json"])).expect("ps --json");
    assert!(
        containers.as_array().is_some_and(Vec::is_empty),
        "containers left: {containers}"
    );
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
    let Some(node) = BusyboxNode::start() else {
        return;
    };
    // Dropped in reverse: the client, the registry, the network, the daemon, the directory.
    let BusyboxNode {
        dir: net_dir,
        daemon: d,
        net,
        _registry,
        reference,
        cri: c,
    } = node;

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

/// switchyardd on a CNI bridge of the test's own, with busybox pulled through CRI PullImage
/// from a loopback registry (fields drop in order: the client, the daemon, the network).
struct BusyboxNode {
    cri: Cri,
    reference: String,
    _registry: Registry,
    daemon: Daemon,
    net: TestNet,
    dir: tempfile::TempDir,
}

impl BusyboxNode {
    fn start() -> Option<BusyboxNode> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (daemon, net) = pod_daemon(dir.path())?;
        if !require_root_and(&["docker-registry"]) {
            return None;
        }
        let cri = Cri::connect(&daemon.socket);
        let (registry, reference) = pull_busybox(&cri);
        Some(BusyboxNode {
            cri,
            reference,
            _registry: registry,
            daemon,
            net,
            dir,
        })
    }
}

/// A loopback registry serving busybox, pulled through CRI PullImage; its reference.
fn pull_busybox(c: &Cri) -> (Registry, String) {
    let reg = Registry::start();
    reg.push(
        "busybox",
        "1",
        &busybox_image(Vec::new(), serde_json::json!({})),
    );
    let reference = reg.reference("busybox", "1");
    c.call(c.images().pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: reference.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }))
    .expect("PullImage");
    (reg, reference)
}

/// A cgroup parent of the test's own, its whole tree killed and removed when dropped.
struct CgroupParent(String);

impl CgroupParent {
    fn new() -> CgroupParent {
        CgroupParent(format!("/{}", unique_id("yardstats")))
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        kill_cgroup_tree(self.0.trim_start_matches('/'));
    }
}

fn value(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map_or(0, |v| v.value)
}

/// ContainerStats of a busybox container that holds ~8 MB and burns CPU: nonzero CPU time, a
/// CPU rate from the second sample, its working set and writable layer; ListContainerStats
/// filters; PodSandboxStats from the pod's cgroup parent with the container in it and eth0's
/// traffic after a ping to the bridge's gateway; ListPodSandboxStats; ListMetricDescriptors
/// names and ListPodSandboxMetrics values of the same.
#[test]
fn issue19_stats_and_metrics_through_switchyardd() {
    let Some(node) = BusyboxNode::start() else {
        return;
    };
    // Dropped in reverse: the client, the registry, the network, the daemon, the directory.
    let BusyboxNode {
        dir: net_dir,
        daemon: _d,
        net,
        _registry,
        reference,
        cri: c,
    } = node;
    let parent = CgroupParent::new();
    let mut cfg = pod_config(net_dir.path(), "stats");
    cfg.linux.get_or_insert_with(Default::default).cgroup_parent = format!("{}/pod", parent.0);
    let pod = run_pod_config(&c, cfg, "native").expect("RunPodSandbox");
    let mut config = switchyard_tests::cri::container_config(
        "burner",
        &reference,
        &[
            "sh",
            "-c",
            "echo written > /layer.txt; x=$(head -c 8000000 /dev/zero | tr '\\0' a); while :; do :; done",
        ],
    );
    config.labels.insert("role".to_owned(), "burner".to_owned());
    let id = c
        .call(c.runtime().create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(config),
            sandbox_config: None,
        }))
        .expect("CreateContainer")
        .container_id;
    c.start_container(&id).expect("StartContainer");

    // CPU time, then a rate from the second sample on; the ~8 MB string in the working set;
    // the file in the writable layer (measured at most every 10 s, so maybe a sample later).
    let mut last = cri::ContainerStats::default();
    let ok = eventually(std::time::Duration::from_secs(40), || {
        last = c.container_stats(&id).expect("ContainerStats");
        let cpu = last.cpu.unwrap_or_default();
        let mem = last.memory.unwrap_or_default();
        let layer = last.writable_layer.clone().unwrap_or_default();
        value(&cpu.usage_core_nano_seconds) > 0
            && value(&cpu.usage_nano_cores) > 0
            && value(&mem.working_set_bytes) > 8_000_000
            && value(&mem.usage_bytes) >= value(&mem.working_set_bytes)
            && value(&layer.inodes_used) >= 2
            && value(&layer.used_bytes) > 0
    });
    assert!(ok, "container stats: {last:?}");
    let attrs = last.attributes.clone().expect("attributes");
    assert_eq!(
        (attrs.id.as_str(), attrs.metadata.map(|m| m.name)),
        (id.as_str(), Some("burner".to_owned()))
    );
    let layer = last.writable_layer.clone().expect("writable layer");
    assert!(value(&layer.inodes_used) >= 2, "{layer:?}");
    assert!(value(&layer.used_bytes) > 0, "{layer:?}");

    let list = |filter: cri::ContainerStatsFilter| {
        c.call(
            c.runtime()
                .list_container_stats(cri::ListContainerStatsRequest {
                    filter: Some(filter),
                }),
        )
        .expect("ListContainerStats")
        .stats
        .into_iter()
        .filter_map(|s| s.attributes.map(|a| a.id))
        .collect::<Vec<_>>()
    };
    assert_eq!(list(Default::default()), vec![id.clone()]);
    assert_eq!(
        list(cri::ContainerStatsFilter {
            id: id[..12].to_owned(),
            ..Default::default()
        }),
        vec![id.clone()]
    );
    assert_eq!(
        list(cri::ContainerStatsFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        }),
        vec![id.clone()]
    );
    let selector = |v: &str| [("role".to_owned(), v.to_owned())].into_iter().collect();
    assert_eq!(
        list(cri::ContainerStatsFilter {
            label_selector: selector("burner"),
            ..Default::default()
        }),
        vec![id.clone()]
    );
    assert!(
        list(cri::ContainerStatsFilter {
            label_selector: selector("other"),
            ..Default::default()
        })
        .is_empty()
    );
    assert!(
        list(cri::ContainerStatsFilter {
            pod_sandbox_id: "0000".to_owned(),
            ..Default::default()
        })
        .is_empty()
    );

    // Traffic on eth0: a ping from the pod to the bridge's gateway (the test network's .1).
    let gateway = net.subnet.replace("0/24", "1");
    let out = c
        .exec_sync(
            &id,
            &["/bin/busybox", "ping", "-c", "2", "-W", "2", &gateway],
            30,
        )
        .expect("ExecSync ping");
    assert_eq!(out.exit_code, 0, "ping {gateway}: {out:?}");

    let mut st = cri::PodSandboxStats::default();
    let ok = eventually(std::time::Duration::from_secs(30), || {
        st = c.pod_stats(&pod).expect("PodSandboxStats");
        let linux = st.linux.clone().unwrap_or_default();
        let cpu = linux.cpu.unwrap_or_default();
        let mem = linux.memory.unwrap_or_default();
        let eth0 = linux
            .network
            .and_then(|n| n.default_interface)
            .unwrap_or_default();
        value(&cpu.usage_core_nano_seconds) > 0
            && value(&cpu.usage_nano_cores) > 0
            && value(&mem.working_set_bytes) > 8_000_000
            && linux.process.is_some_and(|p| value(&p.process_count) >= 1)
            && eth0.name == "eth0"
            && value(&eth0.rx_bytes) > 0
            && value(&eth0.tx_bytes) > 0
    });
    assert!(ok, "pod stats: {st:?}");
    assert_eq!(
        st.attributes.as_ref().map(|a| a.id.as_str()),
        Some(pod.as_str())
    );
    let in_pod: Vec<String> = st
        .linux
        .as_ref()
        .map(|l| {
            l.containers
                .iter()
                .filter_map(|s| s.attributes.as_ref().map(|a| a.id.clone()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(in_pod, vec![id.clone()]);
    let pods = c
        .call(
            c.runtime()
                .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
                    filter: Some(cri::PodSandboxStatsFilter {
                        id: pod.clone(),
                        ..Default::default()
                    }),
                }),
        )
        .expect("ListPodSandboxStats")
        .stats;
    assert_eq!(pods.len(), 1, "{pods:?}");

    let descriptors = c
        .call(
            c.runtime()
                .list_metric_descriptors(cri::ListMetricDescriptorsRequest {}),
        )
        .expect("ListMetricDescriptors")
        .descriptors;
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_usage_bytes",
        "container_memory_rss",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
    ] {
        let desc = descriptors
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no {name}: {descriptors:?}"));
        assert!(!desc.help.is_empty() && desc.label_keys.contains(&"pod".to_owned()));
    }
    let metrics = c
        .call(
            c.runtime()
                .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {}),
        )
        .expect("ListPodSandboxMetrics")
        .pod_metrics;
    let pm = metrics
        .iter()
        .find(|m| m.pod_sandbox_id == pod)
        .unwrap_or_else(|| panic!("no metrics of the pod: {metrics:?}"));
    let find = |ms: &[cri::Metric], name: &str| {
        ms.iter()
            .find(|m| m.name == name)
            .map(|m| value(&m.value))
            .unwrap_or_else(|| panic!("no {name}: {ms:?}"))
    };
    assert!(find(&pm.metrics, "container_network_receive_bytes_total") > 0);
    assert!(find(&pm.metrics, "container_network_transmit_bytes_total") > 0);
    let cm = pm
        .container_metrics
        .iter()
        .find(|m| m.container_id == id)
        .expect("the container's metrics");
    assert!(find(&cm.metrics, "container_cpu_usage_seconds_total") > 0);
    assert!(find(&cm.metrics, "container_memory_working_set_bytes") > 8_000_000);

    c.stop_pod(&pod).expect("StopPodSandbox");
    c.remove_pod(&pod).expect("RemovePodSandbox");
    assert!(
        cgroups_matching(&format!("{}/pod/{id}", parent.0.trim_start_matches('/'))).is_empty(),
        "the container's cgroup is gone"
    );
}

/// The next event of container `id` (others skipped), within 30 s.
fn next_event(
    rx: &std::sync::mpsc::Receiver<cri::ContainerEventResponse>,
    id: &str,
) -> cri::ContainerEventResponse {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no event of {id}: {e}"));
        if e.container_id == id {
            return e;
        }
    }
}

/// The memory limit of container `id`'s cgroup, read from the host (v1 or v2).
fn memory_limit(id: &str) -> Option<String> {
    cgroups_matching(&format!("k8s.io/{id}"))
        .into_iter()
        .find_map(|dir| {
            std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                .ok()
        })
        .map(|s| s.trim().to_owned())
}

/// GetContainerEvents, subscribed first: create, start, stop and remove give created, started,
/// stopped and deleted in that order with the container's id, its pod's status and the pod's
/// containers; a container that exits by itself gives stopped. UpdateContainerResources sets a
/// memory limit seen in the container's cgroup and in ContainerStatus.resources; a negative
/// value is refused naming the field.
#[test]
fn issue19_container_events_and_update_resources() {
    let Some(node) = BusyboxNode::start() else {
        return;
    };
    // Dropped in reverse: the client, the registry, the network, the daemon, the directory.
    let BusyboxNode {
        dir: net_dir,
        daemon: _d,
        net: _net,
        _registry,
        reference,
        cri: c,
    } = node;
    let pod = run_pod(&c, net_dir.path(), "events", "native").expect("RunPodSandbox");
    let events = c.container_events();
    let create = |name: &str, cmd: &[&str]| {
        c.call(c.runtime().create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(switchyard_tests::cri::container_config(
                name, &reference, cmd,
            )),
            sandbox_config: None,
        }))
        .expect("CreateContainer")
        .container_id
    };
    use cri::ContainerEventType as E;
    let id = create(
        "main",
        &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
    );
    let e = next_event(&events, &id);
    assert_eq!(
        e.container_event_type,
        E::ContainerCreatedEvent as i32,
        "{e:?}"
    );
    assert!(e.created_at > 0, "{e:?}");
    assert_eq!(
        e.pod_sandbox_status.as_ref().map(|p| p.id.as_str()),
        Some(pod.as_str()),
        "{e:?}"
    );
    assert!(e.containers_statuses.iter().any(|s| s.id == id), "{e:?}");
    c.start_container(&id).expect("StartContainer");
    let e = next_event(&events, &id);
    assert_eq!(
        e.container_event_type,
        E::ContainerStartedEvent as i32,
        "{e:?}"
    );

    // A memory limit, in the cgroup and in the status.
    let update = |linux: cri::LinuxContainerResources| {
        c.call(
            c.runtime()
                .update_container_resources(cri::UpdateContainerResourcesRequest {
                    container_id: id.clone(),
                    linux: Some(linux),
                    ..Default::default()
                }),
        )
    };
    update(cri::LinuxContainerResources {
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    })
    .expect("UpdateContainerResources");
    assert_eq!(memory_limit(&id).as_deref(), Some("67108864"));
    let st = c.container_status(&id).expect("ContainerStatus");
    assert_eq!(
        st.resources
            .and_then(|r| r.linux)
            .map(|l| l.memory_limit_in_bytes),
        Some(64 << 20)
    );
    for (field, linux) in [
        (
            "linux.memory_limit_in_bytes",
            cri::LinuxContainerResources {
                memory_limit_in_bytes: -5,
                ..Default::default()
            },
        ),
        (
            "linux.cpu_shares",
            cri::LinuxContainerResources {
                cpu_shares: -1,
                ..Default::default()
            },
        ),
    ] {
        let e = update(linux).expect_err("a negative value");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    assert_eq!(memory_limit(&id).as_deref(), Some("67108864"), "unchanged");

    c.stop_container(&id, 10).expect("StopContainer");
    let e = next_event(&events, &id);
    assert_eq!(
        e.container_event_type,
        E::ContainerStoppedEvent as i32,
        "{e:?}"
    );
    c.remove_container(&id).expect("RemoveContainer");
    let e = next_event(&events, &id);
    assert_eq!(
        e.container_event_type,
        E::ContainerDeletedEvent as i32,
        "{e:?}"
    );
    assert!(e.containers_statuses.iter().all(|s| s.id != id), "{e:?}");

    // One that exits by itself.
    let id2 = create("short", &["sh", "-c", "exit 3"]);
    assert_eq!(
        next_event(&events, &id2).container_event_type,
        E::ContainerCreatedEvent as i32
    );
    c.start_container(&id2).expect("StartContainer");
    let mut kinds = vec![next_event(&events, &id2).container_event_type];
    kinds.push(next_event(&events, &id2).container_event_type);
    assert_eq!(
        kinds,
        vec![
            E::ContainerStartedEvent as i32,
            E::ContainerStoppedEvent as i32
        ]
    );
    let st = c.container_status(&id2).expect("ContainerStatus");
    assert_eq!(st.exit_code, 3, "{st:?}");

    // A running container removed at once: stopped, then deleted, once each (its exit may
    // reach the daemon after the removal).
    let id3 = create("removed", &["sleep", "3600"]);
    c.start_container(&id3).expect("StartContainer");
    c.remove_container(&id3).expect("RemoveContainer");
    let kinds: Vec<i32> = (0..4)
        .map(|_| next_event(&events, &id3).container_event_type)
        .collect();
    assert_eq!(
        kinds,
        vec![
            E::ContainerCreatedEvent as i32,
            E::ContainerStartedEvent as i32,
            E::ContainerStoppedEvent as i32,
            E::ContainerDeletedEvent as i32
        ]
    );
    c.remove_pod(&pod).expect("RemovePodSandbox");
    assert_eq!(
        next_event(&events, &id2).container_event_type,
        E::ContainerDeletedEvent as i32
    );
}

/// Restart: a running container survives kill -9 of switchyardd: listed with the same state,
/// its output still reaching the CRI log, ExecSync into it; then it stops and is removed with
/// its pod, leaving no task, shim, fifo, namespace or cgroup.
#[test]
fn issue19_running_containers_survive_a_daemon_restart() {
    let Some(node) = BusyboxNode::start() else {
        return;
    };
    let BusyboxNode {
        dir: net_dir,
        daemon: mut d,
        net: _net,
        _registry,
        reference,
        cri: c,
    } = node;
    let pod_cfg = pod_config(net_dir.path(), "survivor");
    let pod = run_pod_config(&c, pod_cfg.clone(), "native").expect("RunPodSandbox");
    let config = switchyard_tests::cri::container_config(
        "ticker",
        &reference,
        &[
            "sh",
            "-c",
            "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done",
        ],
    );
    let id = c
        .create_container(&pod, &config, &pod_cfg)
        .expect("CreateContainer");
    c.start_container(&id).expect("StartContainer");
    c.wait_container_state(
        &id,
        cri::ContainerState::ContainerRunning,
        std::time::Duration::from_secs(30),
    );
    let log = net_dir.path().join("pods").join("ticker.log");
    let ticks = || switchyard_tests::cri::read_cri_log(&log).len();
    assert!(
        eventually(std::time::Duration::from_secs(20), || ticks() >= 2),
        "{:?}",
        std::fs::read_to_string(&log)
    );
    let before = c.container_status(&id).expect("ContainerStatus");

    drop(c);
    d.restart();
    let c = Cri::connect(&d.socket);
    let after = c
        .container_status(&id)
        .expect("ContainerStatus after the restart");
    assert_eq!(
        (after.state, after.started_at, after.log_path.as_str()),
        (before.state, before.started_at, before.log_path.as_str()),
        "{after:?}"
    );
    assert_eq!(
        c.list_containers(Some(&pod))
            .iter()
            .map(|x| x.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    let seen = ticks();
    assert!(
        eventually(std::time::Duration::from_secs(20), || ticks() > seen + 2),
        "the log goes on after the restart: {seen} lines"
    );
    let out = c.exec_sync(&id, &["hostname"], 30).expect("ExecSync");
    assert_eq!(out.stdout.trim(), "survivor", "{out:?}");

    c.stop_pod(&pod).expect("StopPodSandbox");
    let st = c.container_status(&id).expect("ContainerStatus");
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "{st:?}"
    );
    c.remove_pod(&pod).expect("RemovePodSandbox");
    assert!(c.list_containers(None).is_empty());
    assert!(netns_entries(&d).is_empty(), "{:?}", netns_entries(&d));
    assert!(
        entries(&d.state_dir().join("cri/io")).is_empty(),
        "fifos left"
    );
    let shims = processes_matching(&[
        "containerd-shim-yard-native",
        &d.state_dir().display().to_string(),
    ]);
    assert!(shims.is_empty(), "shims left: {shims:?}");
    let left = cgroups_matching(&format!("k8s.io/{id}"));
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

/// Bad containers: a missing image and a mount with a relative path are CRI errors naming the
/// cause, and leave no container, task, root mount, fifo, shim or cgroup; the pod stays usable.
#[test]
fn issue19_bad_containers_leave_nothing() {
    let Some(node) = BusyboxNode::start() else {
        return;
    };
    let BusyboxNode {
        dir: net_dir,
        daemon: d,
        net: _net,
        _registry,
        reference,
        cri: c,
    } = node;
    let pod_cfg = pod_config(net_dir.path(), "bad");
    let pod = run_pod_config(&c, pod_cfg.clone(), "native").expect("RunPodSandbox");
    let missing = switchyard_tests::cri::container_config(
        "missing",
        "switchyard.local/no-such-image:1",
        &["true"],
    );
    let e = c
        .create_container(&pod, &missing, &pod_cfg)
        .expect_err("a missing image");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("no-such-image"), "{e:?}");

    let mut relative =
        switchyard_tests::cri::container_config("relative", &reference, &["sleep", "60"]);
    relative.mounts = vec![cri::Mount {
        container_path: "data".into(),
        host_path: net_dir.path().display().to_string(),
        ..Default::default()
    }];
    let e = c
        .create_container(&pod, &relative, &pod_cfg)
        .expect_err("a relative container path");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("config.mounts[0].container_path"),
        "{e:?}"
    );

    assert!(c.list_containers(None).is_empty());
    let ps = d.yard_ok(&["-n", "k8s.io", "ps"]);
    assert_eq!(ps.lines().count(), 1, "only the header: {ps}");
    let containers = run_timeout(
        d.ctr().args(["-n", "k8s.io", "containers", "ls", "-q"]),
        std::time::Duration::from_secs(20),
    );
    assert!(
        containers.status.success() && containers.stdout.is_empty(),
        "no containerd container: {}",
        show(&containers)
    );
    assert!(
        entries(&d.state_dir().join("cri/io")).is_empty(),
        "fifos left"
    );
    let mounts = mounts_matching(&d.dir.path().display().to_string());
    assert!(
        mounts
            .iter()
            .all(|m| m.contains("ns/") || m.contains("/shm/")),
        "only the pod's namespaces and /dev/shm are mounted: {mounts:?}"
    );
    let shims = processes_matching(&["containerd-shim-yard", &d.state_dir().display().to_string()]);
    assert!(shims.is_empty(), "shims left: {shims:?}");

    // The pod still takes a good container.
    let good = switchyard_tests::cri::container_config("good", &reference, &["sleep", "60"]);
    let id = c
        .create_container(&pod, &good, &pod_cfg)
        .expect("CreateContainer after the bad ones");
    c.remove_container(&id).expect("RemoveContainer");
    c.stop_pod(&pod).expect("StopPodSandbox");
    c.remove_pod(&pod).expect("RemovePodSandbox");
    assert!(mounts_matching(&d.dir.path().display().to_string()).is_empty());
}

/// A foreign runtime (runc) gets a pause container from `[cri] sandbox_image` (the tests'
/// one-file image, imported): a containerd container and task with the pod's id, labelled a
/// sandbox, not listed by ListContainers; StopPodSandbox stops it, RemovePodSandbox removes it.
/// A pod of our own runtime has none. A sandbox image that is not there fails RunPodSandbox
/// naming the setting, and leaves nothing.
#[test]
fn issue19_pause_container_for_a_foreign_runtime() {
    let net_dir = tempfile::tempdir().expect("tempdir");
    let Some((d, _net)) = pod_daemon(net_dir.path()) else {
        return;
    };
    if !require_root_and(&["runc", "containerd-shim-runc-v2"]) {
        return;
    }
    let c = Cri::connect(&d.socket);
    let tasks = || {
        let out = run_timeout(
            d.ctr().args(["-n", "k8s.io", "tasks", "ls"]),
            std::time::Duration::from_secs(20),
        );
        assert!(out.status.success(), "{}", show(&out));
        text(&out.stdout)
    };
    // Without the image: an error naming the setting, nothing left.
    let e = run_pod(&c, net_dir.path(), "nopause", "runc").expect_err("no sandbox image");
    assert!(e.message().contains("sandbox_image"), "{e:?}");
    assert!(c.list_pods().is_empty());
    assert!(netns_entries(&d).is_empty(), "{:?}", netns_entries(&d));

    let archive = switchyard_tests::cri::test_images().display().to_string();
    d.yard_ok(&["-n", "k8s.io", "image", "import", &archive]);
    let pod_cfg = pod_config(net_dir.path(), "withpause");
    let pod = run_pod_config(&c, pod_cfg.clone(), "runc").expect("RunPodSandbox");
    let line = tasks()
        .lines()
        .find(|l| l.starts_with(&pod))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no pause task {pod}: {}", tasks()));
    assert!(line.contains("RUNNING"), "{line}");
    let info = run_timeout(
        d.ctr().args(["-n", "k8s.io", "containers", "info", &pod]),
        std::time::Duration::from_secs(20),
    );
    assert!(
        text(&info.stdout).contains("\"io.cri-containerd.kind\": \"sandbox\""),
        "{}",
        show(&info)
    );
    let cfg = switchyard_tests::cri::container_config(
        "main",
        switchyard_tests::cri::BUSYBOX_IMAGE,
        &["sleep", "3600"],
    );
    let id = c
        .create_container(&pod, &cfg, &pod_cfg)
        .expect("CreateContainer");
    c.start_container(&id).expect("StartContainer");
    let listed: Vec<String> = c.list_containers(None).into_iter().map(|x| x.id).collect();
    assert_eq!(listed, std::slice::from_ref(&id));
    c.stop_pod(&pod).expect("StopPodSandbox");
    assert!(
        tasks()
            .lines()
            .all(|l| !l.starts_with(&pod) || l.contains("STOPPED")),
        "{}",
        tasks()
    );
    c.remove_pod(&pod).expect("RemovePodSandbox");
    let left = run_timeout(
        d.ctr().args(["-n", "k8s.io", "containers", "ls", "-q"]),
        std::time::Duration::from_secs(20),
    );
    assert!(text(&left.stdout).trim().is_empty(), "{}", show(&left));
    let left = cgroups_matching(&format!("k8s.io/{pod}"));
    assert!(left.is_empty(), "cgroups left: {left:?}");

    // Our own runtime: no pause container.
    let pod = run_pod(&c, net_dir.path(), "ours", "native").expect("RunPodSandbox");
    assert!(!tasks().contains(&pod), "{}", tasks());
    c.remove_pod(&pod).expect("RemovePodSandbox");
}

/// The default `[cri] sandbox_image` is built by switchyardd from `[cri] pause_binary`. A
/// binary that is missing, or dynamically linked (the workspace build's glibc `yard-pause`,
/// which cannot run in an image holding nothing else), fails a runc pod's RunPodSandbox with
/// FAILED_PRECONDITION naming both settings, and leaves no pod, namespace, image, blob, container
/// or task. Once the file is the static `yard-pause`, the same daemon builds the image (once,
/// for two pods) and runs the pods' pause containers from it.
#[test]
fn issue19_default_sandbox_image_and_a_bad_pause_binary() {
    let net_dir = tempfile::tempdir().expect("tempdir");
    let binary = net_dir.path().join("yard-pause");
    let Some((d, _net)) = pod_daemon_with(
        net_dir.path(),
        &format!("pause_binary = \"{}\"\n", binary.display()),
    ) else {
        return;
    };
    if !require_root_and(&["runc", "containerd-shim-runc-v2"]) {
        return;
    }
    let c = Cri::connect(&d.socket);
    let blobs = d.dir.path().join("root/images/content/blobs/sha256");
    let left = |what: &str| {
        assert!(c.list_pods().is_empty(), "{what}: pods left");
        assert!(
            netns_entries(&d).is_empty(),
            "{what}: {:?}",
            netns_entries(&d)
        );
        assert_eq!(
            d.yard_ok(&["-n", "k8s.io", "images", "-q"]).trim(),
            "",
            "{what}"
        );
        assert!(
            entries(&blobs).is_empty(),
            "{what}: blobs {:?}",
            entries(&blobs)
        );
        let out = run_timeout(
            d.ctr().args(["-n", "k8s.io", "containers", "ls", "-q"]),
            std::time::Duration::from_secs(20),
        );
        assert_eq!(text(&out.stdout).trim(), "", "{what}: {}", show(&out));
    };
    let refused = |what: &str, reason: &str| {
        let e = run_pod(&c, net_dir.path(), "bad", "runc").expect_err(what);
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{what}: {e:?}");
        let m = e.message();
        assert!(
            m.contains("[cri] sandbox_image \"switchyard.local/pause:3.10\"")
                && m.contains(&format!("[cri] pause_binary {}", binary.display()))
                && m.contains(reason),
            "{what}: {m}"
        );
        left(what);
    };
    refused("missing", "missing");
    std::fs::copy(bin("yard-pause"), &binary).expect("copy the glibc yard-pause");
    refused("dynamic", "dynamically linked");

    std::fs::copy(switchyard_tests::cri::pause_binary(), &binary).expect("copy yard-pause");
    let pods: Vec<String> = ["one", "two"]
        .map(|name| run_pod(&c, net_dir.path(), name, "runc").expect("RunPodSandbox"))
        .to_vec();
    let images = d.yard_ok(&["-n", "k8s.io", "images"]);
    assert!(images.contains("switchyard.local/pause:3.10"), "{images}");
    assert_eq!(
        d.log_text()
            .matches("built the default sandbox image")
            .count(),
        1,
        "built once for two pods"
    );
    let tasks = run_timeout(
        d.ctr().args(["-n", "k8s.io", "tasks", "ls"]),
        std::time::Duration::from_secs(20),
    );
    for pod in &pods {
        let line = text(&tasks.stdout)
            .lines()
            .find(|l| l.starts_with(pod.as_str()))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no pause task {pod}: {}", show(&tasks)));
        assert!(line.contains("RUNNING"), "{line}");
        c.remove_pod(pod).expect("RemovePodSandbox");
    }
    assert!(c.list_pods().is_empty());
}
