//! Registry hosts in containerd's `hosts.toml` layout (`[images] registry_config_path`, issue
//! 19), end to end through `yard pull`: an image named for a registry that is not there
//! (`registry.k8s.io/pause:3.10`) is pulled from a loopback registry standing in as its
//! mirrors and server, never from the real host; a mirror that is down makes the pull move on;
//! a mirror with only `pull` is never asked to resolve a tag; and a bad `hosts.toml` is an
//! error naming the file, at pull time and at `switchyardd config check`.
//!
//! Every endpoint configured here is on loopback. Names that a fallback could send out are
//! under `.invalid`, which never resolves.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::Path;

use serde_json::json;
use switchyard_tests::images::{
    RecordingProxy, Registry, TarEntry, dead_port, gzip, image, layer_tar,
};
use switchyard_tests::*;

fn write_hosts(dir: &Path, namespace_dir: &str, text: &str) {
    std::fs::create_dir_all(dir.join(namespace_dir)).unwrap();
    std::fs::write(dir.join(namespace_dir).join("hosts.toml"), text).unwrap();
}

/// A one-layer image (no program in it: it is only pulled).
fn small_image() -> switchyard_tests::images::Image {
    let layer = gzip(&layer_tar(&[
        TarEntry::dir("etc", 0o755),
        TarEntry::file("etc/motd", 0o644, "from the mirror\n"),
    ]));
    image(vec![layer], json!({"Cmd": ["/bin/true"]}), "amd64")
}

/// switchyardd reading registry hosts from `hosts`.
fn daemon(hosts: &Path) -> Daemon {
    Daemon::start_with(&format!(
        "[images]\nregistry_config_path = \"{}\"\n",
        hosts.display()
    ))
}

fn count(requests: &[String], needle: &str) -> usize {
    requests.iter().filter(|r| r.contains(needle)).count()
}

#[test]
fn issue19_an_air_gapped_pull_is_served_by_mirrors_and_never_the_real_host() {
    if !require_root_and(&["docker-registry"]) {
        return;
    }
    let reg = Registry::start();
    let img = small_image();
    reg.push("pause", "3.10", &img);
    // Two ways into the same loopback registry, each recording what it was asked.
    let pull_only = RecordingProxy::start(&reg.host());
    let server = RecordingProxy::start(&reg.host());
    let down = dead_port();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        "registry.k8s.io",
        &format!(
            "server = \"http://{server}\"\n\n\
             [host.\"http://127.0.0.1:{down}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://{pull_only}\"]\n  capabilities = [\"pull\"]\n",
            server = server.host(),
            pull_only = pull_only.host(),
        ),
    );
    let d = daemon(hosts.path());

    let out = d.yard_ok(&["pull", "-q", "registry.k8s.io/pause:3.10"]);
    assert!(
        out.starts_with("registry.k8s.io/pause:3.10 "),
        "the image keeps its name: {out}"
    );
    let images = d.yard_ok(&["images", "-q"]);
    assert!(images.contains("registry.k8s.io/pause:3.10"), "{images}");

    // The tag was resolved by the server: the down mirror was tried first and the pull-only
    // mirror skipped.
    let at_server = server.requests();
    let at_mirror = pull_only.requests();
    assert_eq!(
        count(&at_server, "/v2/pause/manifests/3.10?ns=registry.k8s.io"),
        1,
        "server: {at_server:?}"
    );
    assert_eq!(
        count(&at_mirror, "/manifests/3.10"),
        0,
        "a pull-only mirror must not resolve a tag: {at_mirror:?}"
    );
    // Content by digest came from the pull-only mirror (the first live host that may pull),
    // with the registry's name as containerd's `ns` parameter.
    for blob in [&img.config, &img.layers[0]] {
        assert_eq!(
            count(
                &at_mirror,
                &format!("/v2/pause/blobs/{}?ns=registry.k8s.io", blob.digest)
            ),
            1,
            "mirror: {at_mirror:?}"
        );
    }
    assert_eq!(count(&at_server, "/blobs/"), 0, "server: {at_server:?}");
    let log = d.log_text();
    assert!(
        log.contains(&format!("127.0.0.1:{down}")) && log.contains("trying the next host"),
        "the down mirror is logged as skipped:\n{log}"
    );

    // CRI's PullImage goes through the same hosts: kubelet's pause image comes from the
    // mirrors too (into the k8s.io namespace).
    let cri = switchyard_tests::cri::Cri::connect(&d.socket);
    let pulled = cri
        .call(
            cri.images()
                .pull_image(switchyard_api::cri::v1::PullImageRequest {
                    image: Some(switchyard_api::cri::v1::ImageSpec {
                        image: "registry.k8s.io/pause:3.10".to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
        )
        .expect("CRI PullImage through the mirrors");
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    let resolved = |r: &[String]| count(r, "/v2/pause/manifests/3.10?ns=registry.k8s.io");
    assert!(
        resolved(&server.requests()) > resolved(&at_server),
        "the CRI pull resolved the tag at the configured server: {:?}",
        server.requests()
    );
}

#[test]
fn issue19_without_a_host_that_may_resolve_only_digests_pull() {
    if !require_root_and(&["docker-registry"]) {
        return;
    }
    let reg = Registry::start();
    let img = small_image();
    reg.push("busybox", "1", &img);
    let mirror = RecordingProxy::start(&reg.host());
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        "mirror-test.invalid",
        &format!(
            "server = \"http://{}\"\ncapabilities = [\"pull\"]\n",
            mirror.host()
        ),
    );
    let d = daemon(hosts.path());

    let e = d.yard_fails(&["pull", "-q", "mirror-test.invalid/busybox:1"]);
    assert!(
        e.contains("no configured host of mirror-test.invalid may resolve a tag"),
        "{e}"
    );
    assert!(mirror.requests().is_empty(), "{:?}", mirror.requests());

    let by_digest = format!("mirror-test.invalid/busybox@{}", img.digest());
    d.yard_ok(&["pull", "-q", &by_digest]);
    assert_eq!(
        count(
            &mirror.requests(),
            &format!(
                "/v2/busybox/manifests/{}?ns=mirror-test.invalid",
                img.digest()
            )
        ),
        1,
        "{:?}",
        mirror.requests()
    );
}

#[test]
fn issue19_with_every_mirror_down_and_no_server_the_pull_falls_back_and_fails() {
    if !require_root_and(&[]) {
        return;
    }
    let hosts = tempfile::tempdir().unwrap();
    let down = dead_port();
    // The registry itself: a loopback listener that only counts connections and closes them,
    // so the fallback reaches nothing (and needs no name lookup).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let registry = listener.local_addr().unwrap().port();
    let dialed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = dialed.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    // No `server`: as containerd, the registry itself comes after the mirrors.
    write_hosts(
        hosts.path(),
        &format!("127.0.0.1_{registry}_"),
        &format!("[host.\"http://127.0.0.1:{down}\"]\n"),
    );
    let d = daemon(hosts.path());
    let e = d.yard_fails(&["pull", "-q", &format!("127.0.0.1:{registry}/busybox:1")]);
    // The mirror was tried first and moved on from; then the registry itself was dialed.
    assert!(e.contains("busybox"), "{e}");
    let log = d.log_text();
    assert!(
        log.contains(&format!("http://127.0.0.1:{down}/v2"))
            && log.contains("trying the next host"),
        "{log}"
    );
    assert!(
        dialed.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the registry itself was not tried after the mirror: {e}"
    );
}

#[test]
fn issue19_a_bad_hosts_toml_is_an_error_naming_the_file() {
    if !require_root_and(&[]) {
        return;
    }
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        "bad.invalid",
        "server = \"http://127.0.0.1:1\"\ncapabilities = [\"fetch\"]\n",
    );
    let file = hosts.path().join("bad.invalid").join("hosts.toml");
    let d = daemon(hosts.path());
    let e = d.yard_fails(&["pull", "-q", "bad.invalid/busybox:1"]);
    assert!(
        e.contains(&format!("{}:2: capabilities", file.display())) && e.contains("fetch"),
        "{e}"
    );

    // `switchyardd config check` reads the same directory and refuses it the same way.
    let out = std::process::Command::new(bin("switchyardd"))
        .arg("--config")
        .arg(&d.config)
        .args(["config", "check"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");

    std::fs::remove_dir_all(hosts.path().join("bad.invalid")).unwrap();
    write_hosts(
        hosts.path(),
        "_default",
        "server = \"http://127.0.0.1:1\"\n",
    );
    let out = std::process::Command::new(bin("switchyardd"))
        .arg("--config")
        .arg(&d.config)
        .args(["config", "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("registry hosts") && stdout.contains("_default"),
        "{stdout}"
    );
}

#[test]
fn issue19_tls_endpoints_trust_the_configured_ca_or_skip_verification() {
    if !require_root_and(&["docker-registry", "openssl"]) {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(certs.path());
    let reg = Registry::start();
    reg.push("app", "1", &small_image());
    let tls = reg.serve_tls(&cert, &key);
    let hosts = tempfile::tempdir().unwrap();
    let ns_dir = hosts.path().join("tls-test.invalid");
    std::fs::create_dir_all(&ns_dir).unwrap();
    std::fs::copy(&ca, ns_dir.join("mirror-ca.pem")).unwrap();
    let d = daemon(hosts.path());
    let name = "tls-test.invalid/app:1";

    // Not trusted: the system roots do not know the test CA.
    write_hosts(
        hosts.path(),
        "tls-test.invalid",
        &format!("server = \"https://{}\"\n", tls.host()),
    );
    let e = d.yard_fails(&["pull", "-q", name]);
    assert!(e.contains(&tls.host()), "{e}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // The CA, relative to the hosts.toml.
    write_hosts(
        hosts.path(),
        "tls-test.invalid",
        &format!(
            "server = \"https://{}\"\nca = \"mirror-ca.pem\"\n",
            tls.host()
        ),
    );
    d.yard_ok(&["pull", "-q", name]);
    d.yard_ok(&["rmi", name]);

    // Or no verification at all.
    write_hosts(
        hosts.path(),
        "tls-test.invalid",
        &format!("server = \"https://{}\"\nskip_verify = true\n", tls.host()),
    );
    d.yard_ok(&["pull", "-q", name]);
}
