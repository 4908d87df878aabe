//! Issue 19, first part: switchyardd serves CRI on its socket. `Version`, `Status` (its
//! conditions true only when they are, a handler per configured runtime), `RuntimeConfig`,
//! `UpdateRuntimeConfig`, the image service over the image store (in the `k8s.io` namespace,
//! pulled from the loopback registry), and UNIMPLEMENTED naming the method for what is not
//! served yet. Driven by the same CRI client as the containerd tests, and by `yard cri`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::Path;

use switchyard_api::cri::v1 as cri;
use switchyard_tests::cri::Cri;
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
}

/// What is not served yet answers UNIMPLEMENTED naming the method, at once.
#[test]
fn issue19_unserved_rpcs_name_the_method() {
    let Some(d) = daemon(true) else { return };
    let c = Cri::connect(&d.socket);
    let e = c
        .call(
            c.runtime()
                .run_pod_sandbox(cri::RunPodSandboxRequest::default()),
        )
        .expect_err("RunPodSandbox is not served yet");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(
        e.message()
            .contains("/runtime.v1.RuntimeService/RunPodSandbox"),
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
