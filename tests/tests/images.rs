//! Images end to end: `yard pull` from a real registry (Debian's `docker-registry` on loopback)
//! and `yard image import` of OCI layout and `docker save` tarballs, then `yard run IMAGE` on the
//! native, vm and wasm runtimes; a shared base layer stored once; `yard images` / `yard rmi` and
//! collection; and bad input (a tampered layer, a truncated archive, a layer escaping its root,
//! the wrong platform) refused with nothing left in the store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_tests::images::{
    Registry, TarEntry, busybox_image, docker_save_tar, gzip, image, index, layer_tar,
    layer_with_raw_path, oci_layout_tar, random_layer, wasm_artifact,
};
use switchyard_tests::*;

const T: Duration = Duration::from_secs(120);

fn has_guest() -> bool {
    which("qemu-system-x86_64").is_some() && guest_kernel_and_initrd().is_some()
}

/// switchyardd with the wasm and vm runtimes' caches in its own directory.
fn daemon() -> Option<Daemon> {
    daemon_with("")
}

fn daemon_with(extra: &str) -> Option<Daemon> {
    if !require_root_and(&["docker-registry", "mkfs.erofs"]) {
        return None;
    }
    let g = guest_dir();
    Some(Daemon::start_in(|dir| {
        format!(
            "[runtimes.wasm]\nruntime_type = \"io.containerd.yard-wasm.v1\"\n[runtimes.wasm.options]\ncache_dir = \"{wasm}\"\n\
         [runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n[runtimes.vm.options]\nkernel = \"{k}\"\ninitrd = \"{i}\"\ncache_dir = \"{vm}\"\n",
            wasm = dir.join("wasm-cache").display(),
            vm = dir.join("vm-cache").display(),
            k = g.join("vmlinux").display(),
            i = g.join("initrd.img").display(),
        ) + extra
    }))
}

fn images_root(d: &Daemon) -> PathBuf {
    d.dir.path().join("root").join("images")
}

/// `yard images --json`.
fn listing(d: &Daemon) -> Value {
    serde_json::from_str(&d.yard_ok(&["images", "--json"])).unwrap()
}

/// Nothing in the store: no images, blobs, snapshots, ingests or container roots.
fn assert_store_empty(d: &Daemon, after: &str) {
    let l = listing(d);
    assert_eq!(l["images"].as_array().unwrap().len(), 0, "{after}: {l}");
    assert_eq!(l["usage"]["blobs"], 0, "{after}: blobs left: {l}");
    assert_eq!(l["usage"]["snapshots"], 0, "{after}: snapshots left: {l}");
    let root = images_root(d);
    let ingest = files_under(&root.join("content").join("ingest"));
    assert!(ingest.is_empty(), "{after}: ingest files left: {ingest:?}");
    let scratch: Vec<PathBuf> = files_under(&root.join("snapshots"));
    assert!(
        scratch.is_empty(),
        "{after}: snapshot files left: {scratch:?}"
    );
}

/// busybox plus a layer with `/etc/motd`; runs `cat /etc/motd` by default.
fn app_image(user: &str) -> switchyard_tests::images::Image {
    let motd = gzip(&layer_tar(&[
        TarEntry::dir("etc", 0o755),
        TarEntry::file("etc/motd", 0o644, "hello from layer two\n"),
    ]));
    busybox_image(
        vec![motd],
        json!({
            "Cmd": ["/bin/cat", "/etc/motd"],
            "Env": ["PATH=/bin", "GREETING=hi"],
            "WorkingDir": "/tmp",
            "User": user,
        }),
    )
}

fn hello_wasm() -> Vec<u8> {
    std::fs::read(&switchyard_tests::wasm::fixtures().hello_module).unwrap()
}

#[test]
fn pulled_images_run_on_native_vm_and_wasm() {
    let Some(d) = daemon() else { return };
    let reg = Registry::start();
    reg.push("app", "1", &app_image(""));
    reg.push("app", "user", &app_image("app"));
    reg.push("hello", "1", &wasm_artifact(&hello_wasm(), "hello.wasm"));
    let app = reg.reference("app", "1");

    let out = d.yard_ok(&["pull", "-q", &app]);
    assert!(out.starts_with(&app), "{out}");
    d.yard_ok(&["pull", "-q", &reg.reference("app", "user")]);
    d.yard_ok(&["pull", "-q", &reg.reference("hello", "1")]);

    // The image's Cmd, Env, WorkingDir and User make the process.
    let out = d.yard_ok(&["run", "--rm", "--runtime", "native", &app]);
    assert_eq!(out, "hello from layer two\n");
    let out = d.yard_ok(&[
        "run",
        "--rm",
        "--runtime",
        "native",
        "-e",
        "EXTRA=1",
        &app,
        "--",
        "/bin/sh",
        "-c",
        "echo $GREETING $EXTRA; pwd; id -u",
    ]);
    assert_eq!(out, "hi 1\n/tmp\n0\n");
    let out = d.yard_ok(&[
        "run",
        "--rm",
        &reg.reference("app", "user"),
        "--",
        "/bin/id",
        "-u",
    ]);
    assert_eq!(
        out, "1000\n",
        "User app resolves through the image's /etc/passwd"
    );

    // A container's writes stay in its own layer.
    d.yard_ok(&[
        "run",
        "--rm",
        &app,
        "--",
        "/bin/sh",
        "-c",
        "echo changed > /etc/motd; cat /etc/motd",
    ]);
    assert_eq!(d.yard_ok(&["run", "--rm", &app]), "hello from layer two\n");

    // The Wasm artifact picks the wasm runtime by itself and runs its module.
    let out = d.yard_ok(&["run", "--rm", &reg.reference("hello", "1"), "--", "a1"]);
    assert!(out.contains("hello from wasm"), "{out}");
    assert!(out.contains("a1"), "{out}");

    if require(
        has_guest(),
        "no guest kernel/initrd or QEMU: vm part skipped",
    ) {
        let out = d.yard_ok(&["run", "--rm", "--runtime", "vm", &app]);
        assert_eq!(out, "hello from layer two\n");
        let erofs = files_under(&images_root(&d).join("snapshots").join("erofs"));
        let images: Vec<&PathBuf> = erofs
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "erofs"))
            .collect();
        assert_eq!(images.len(), 1, "one EROFS image per chain: {erofs:?}");
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(images[0]).unwrap());
        let out = d.yard_ok(&[
            "run",
            "--rm",
            "--runtime",
            "vm",
            &app,
            "--",
            "/bin/sh",
            "-c",
            "uname -r; cat /etc/motd",
        ]);
        assert!(out.ends_with("hello from layer two\n"), "{out}");
        let ino2 = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(images[0]).unwrap());
        assert_eq!(ino, ino2, "the second vm run reuses the chain's image");
    }

    // Nothing of the runs is left: no container roots, no mounts.
    let active = files_under(&images_root(&d).join("snapshots").join("active"));
    assert!(active.is_empty(), "container roots left: {active:?}");
    assert!(mounts_matching(&d.dir.path().display().to_string()).is_empty());

    let l = listing(&d);
    let names: Vec<&str> = l["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{l}");
    let wasm = l["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"].as_str().unwrap().contains("hello"))
        .unwrap();
    assert_eq!(wasm["wasm"], true);
    let table = d.yard_ok(&["images"]);
    assert!(table.contains("NAME") && table.contains(&app), "{table}");

    // containerd's ctr sees the same images (images.v1 List, Delete).
    let out = run_timeout(d.ctr().args(["-n", "default", "image", "ls", "-q"]), T);
    assert!(out.status.success(), "{}", show(&out));
    let listed = text(&out.stdout);
    for n in &names {
        assert!(
            listed.lines().any(|l| l == *n),
            "ctr image ls lacks {n}: {listed}"
        );
    }
    let user = reg.reference("app", "user");
    let out = run_timeout(d.ctr().args(["-n", "default", "image", "rm", &user]), T);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(listing(&d)["images"].as_array().unwrap().len(), 2);

    // Removing every image collects every blob and snapshot.
    let names: Vec<String> = names
        .iter()
        .filter(|n| **n != user)
        .map(|s| s.to_string())
        .collect();
    let mut args = vec!["rmi"];
    args.extend(names.iter().map(String::as_str));
    d.yard_ok(&args);
    assert_store_empty(&d, "rmi of every image");
    let e = d.yard_fails(&["run", "--rm", &app]);
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn imported_archives_run() {
    let Some(d) = daemon() else { return };
    let dir = tempfile::tempdir().unwrap();
    let oci = dir.path().join("oci.tar");
    std::fs::write(&oci, oci_layout_tar(&[("1", &app_image(""))])).unwrap();
    let out = d.yard_ok(&[
        "image",
        "import",
        "-q",
        "--name",
        "imported/oci",
        oci.to_str().unwrap(),
    ]);
    assert!(out.contains("docker.io/imported/oci:1"), "{out}");
    assert_eq!(
        d.yard_ok(&["run", "--rm", "imported/oci:1"]),
        "hello from layer two\n"
    );

    let saved = dir.path().join("saved.tar");
    let img = app_image("");
    std::fs::write(&saved, docker_save_tar(&[("saved/app:2", &img)])).unwrap();
    let out = d.yard_ok(&["image", "import", "-q", saved.to_str().unwrap()]);
    assert!(out.contains("docker.io/saved/app:2"), "{out}");
    assert_eq!(
        d.yard_ok(&["run", "--rm", "saved/app:2", "--", "/bin/cat", "/etc/motd"]),
        "hello from layer two\n"
    );

    // Gzipped, from stdin.
    let gz = dir.path().join("oci.tar.gz");
    std::fs::write(&gz, gzip(&oci_layout_tar(&[("3", &app_image(""))]))).unwrap();
    let out = run_timeout(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(r#""$0" image import -q --name imported/gz - < "$1""#)
            .arg(bin("yard"))
            .arg(&gz)
            .env("SWITCHYARD_ADDRESS", &d.socket),
        T,
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        d.yard_ok(&["run", "--rm", "imported/gz:3"]),
        "hello from layer two\n"
    );
}

#[test]
fn a_shared_base_layer_is_stored_once() {
    let Some(d) = daemon() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = busybox_image(
        vec![random_layer(1, 4, 64 << 10)],
        json!({"Cmd": ["/bin/true"]}),
    );
    let b = busybox_image(
        vec![random_layer(2, 4, 64 << 10)],
        json!({"Cmd": ["/bin/true"]}),
    );
    let f = dir.path().join("two.tar");
    std::fs::write(&f, oci_layout_tar(&[("a", &a), ("b", &b)])).unwrap();
    d.yard_ok(&[
        "image",
        "import",
        "-q",
        "--name",
        "shared",
        f.to_str().unwrap(),
    ]);

    let l = listing(&d);
    let images = l["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{l}");
    let sum_of_images: u64 = images.iter().map(|i| i["size"].as_u64().unwrap()).sum();
    let stored = l["usage"]["blob_bytes"].as_u64().unwrap();
    let base = a.layers[0].bytes.len() as u64;
    assert_eq!(
        a.layers[0].digest, b.layers[0].digest,
        "the fixtures share a base"
    );
    eprintln!(
        "image a {} B + image b {} B = {sum_of_images} B; content store holds {stored} B in {} blobs (base layer {base} B once); {} snapshots, {} B unpacked",
        images[0]["size"],
        images[1]["size"],
        l["usage"]["blobs"],
        l["usage"]["snapshots"],
        l["usage"]["snapshot_bytes"]
    );
    assert_eq!(
        stored,
        sum_of_images - base,
        "the base layer is stored once"
    );
    // 2 manifests + 2 configs + 3 layers; 3 snapshots (base, a, b).
    assert_eq!(l["usage"]["blobs"], 7, "{l}");
    assert_eq!(l["usage"]["snapshots"], 3, "{l}");

    // Removing one image keeps the base its sibling still uses.
    d.yard_ok(&["rmi", "shared:a"]);
    let l = listing(&d);
    assert_eq!(l["usage"]["blobs"], 4, "{l}");
    assert_eq!(l["usage"]["snapshots"], 2, "{l}");
    d.yard_ok(&["run", "--rm", "shared:b"]);
    d.yard_ok(&["rmi", "shared:b"]);
    assert_store_empty(&d, "rmi of both");
}

#[test]
fn bad_images_are_refused_and_leave_nothing() {
    let Some(d) = daemon() else { return };
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();

    // A layer whose bytes no longer match its digest.
    let tampered = busybox_image(
        vec![random_layer(7, 2, 32 << 10)],
        json!({"Cmd": ["/bin/true"]}),
    );
    reg.push("tampered", "1", &tampered);
    reg.tamper_blob(&tampered.layers[1].digest);
    let e = d.yard_fails(&["pull", "-q", &reg.reference("tampered", "1")]);
    assert!(
        e.contains(&tampered.layers[1].digest) && e.contains("hashes to"),
        "the error names the layer and the mismatch: {e}"
    );
    assert_store_empty(&d, "tampered layer");

    // A truncated archive.
    let whole = oci_layout_tar(&[("1", &app_image(""))]);
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() * 2 / 3]).unwrap();
    let e = d.yard_fails(&["image", "import", "--name", "cut", cut.to_str().unwrap()]);
    assert!(
        e.contains("truncated") || e.contains("lacks"),
        "the error says what is wrong: {e}"
    );
    assert_store_empty(&d, "truncated archive");

    // A layer entry escaping the root.
    let outside = PathBuf::from("/etc/passwd");
    let before = std::fs::read(&outside).unwrap();
    let evil = busybox_image(
        vec![layer_with_raw_path(
            "../../etc/passwd",
            b"evil::0:0::/:/bin/sh\n",
        )],
        json!({"Cmd": ["/bin/true"]}),
    );
    let f = dir.path().join("evil.tar");
    std::fs::write(&f, oci_layout_tar(&[("1", &evil)])).unwrap();
    let e = d.yard_fails(&["image", "import", "--name", "evil", f.to_str().unwrap()]);
    assert!(
        e.contains("../../etc/passwd"),
        "the error names the entry: {e}"
    );
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        before,
        "host /etc/passwd untouched"
    );
    assert_store_empty(&d, "escaping layer");

    // The wrong platform: an arm64-only index, and a single arm64 manifest.
    let arm = image(
        vec![random_layer(9, 1, 1024)],
        json!({"Cmd": ["/bin/true"]}),
        "arm64",
    );
    reg.push_index("multi", "1", &index(&[(&arm, "linux", "arm64")]), &[&arm]);
    let e = d.yard_fails(&["pull", "-q", &reg.reference("multi", "1")]);
    assert!(
        e.contains("linux/amd64") && e.contains("linux/arm64"),
        "the error names the wanted and the available platforms: {e}"
    );
    assert_store_empty(&d, "index without the platform");
    reg.push("armonly", "1", &arm);
    let e = d.yard_fails(&["pull", "-q", &reg.reference("armonly", "1")]);
    assert!(
        e.contains("linux/arm64") && e.contains("linux/amd64"),
        "{e}"
    );
    assert_store_empty(&d, "manifest for another platform");
    // ...which the right --platform accepts (the bytes are fine, only the platform differs).
    d.yard_ok(&[
        "pull",
        "-q",
        "--platform",
        "linux/arm64",
        &reg.reference("multi", "1"),
    ]);
    let l = listing(&d);
    assert_eq!(l["images"][0]["platform"], "linux/arm64", "{l}");

    // An image that is not there, and a bad reference.
    let e = d.yard_fails(&["pull", "-q", &reg.reference("missing", "1")]);
    assert!(e.contains("manifest unknown"), "the registry's answer: {e}");
    let e = d.yard_fails(&["pull", "-q", "UPPER/Case::bad"]);
    assert!(e.contains("image reference \"UPPER/Case::bad\""), "{e}");
}

#[test]
fn the_copy_snapshotter_runs_images_without_overlayfs() {
    let Some(d) = daemon_with("[images]\nsnapshotter = \"copy\"\n") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The second layer deletes a file of the first (a whiteout) and makes a directory opaque.
    let top = gzip(&layer_tar(&[
        TarEntry::dir("etc", 0o755),
        TarEntry::file("etc/motd", 0o644, "hello from layer two\n"),
        TarEntry::whiteout("etc/group"),
        TarEntry::dir("home", 0o755),
        TarEntry::opaque_whiteout("home"),
    ]));
    let img = busybox_image(vec![top], json!({"Cmd": ["/bin/cat", "/etc/motd"]}));
    let f = dir.path().join("img.tar");
    std::fs::write(&f, oci_layout_tar(&[("1", &img)])).unwrap();
    d.yard_ok(&[
        "image",
        "import",
        "-q",
        "--name",
        "copied",
        f.to_str().unwrap(),
    ]);
    let l = listing(&d);
    assert_eq!(l["usage"]["snapshotter"], "copy", "{l}");
    let out = d.yard_ok(&[
            "run",
            "--rm",
            "copied:1",
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/motd; test -e /etc/group || echo no-group; ls -A /home | wc -l; echo x > /etc/motd",
        ],
    );
    assert_eq!(out, "hello from layer two\nno-group\n0\n");
    assert_eq!(
        d.yard_ok(&["run", "--rm", "copied:1"]),
        "hello from layer two\n"
    );
    let active = files_under(&images_root(&d).join("snapshots").join("active"));
    assert!(active.is_empty(), "container roots left: {active:?}");
    d.yard_ok(&["rmi", "copied:1"]);
    assert_store_empty(&d, "rmi with the copy snapshotter");
}

#[test]
fn a_partial_layer_download_is_resumed() {
    let Some(d) = daemon() else { return };
    let reg = Registry::start();
    let img = busybox_image(
        vec![random_layer(11, 4, 256 << 10)],
        json!({"Cmd": ["/bin/true"]}),
    );
    reg.push("resume", "1", &img);
    let layer = &img.layers[1];
    let ingest = images_root(&d).join("content").join("ingest");
    std::fs::create_dir_all(&ingest).unwrap();
    let partial = ingest.join(layer.digest.strip_prefix("sha256:").unwrap());
    let half = layer.bytes.len() / 2;

    // A partial file whose bytes are wrong: if the pull resumes from it (a range request for
    // the rest), the whole cannot verify; a pull that started over would succeed.
    let mut wrong = layer.bytes[..half].to_vec();
    wrong[0] ^= 0xff;
    std::fs::write(&partial, &wrong).unwrap();
    let e = d.yard_fails(&["pull", "-q", &reg.reference("resume", "1")]);
    assert!(
        e.contains("hashes to"),
        "the resumed bytes failed verification: {e}"
    );
    assert_store_empty(&d, "a resumed download that failed verification");

    // The right first half: the pull resumes and the layer verifies.
    std::fs::write(&partial, &layer.bytes[..half]).unwrap();
    d.yard_ok(&["pull", "-q", &reg.reference("resume", "1")]);
    assert!(!partial.exists(), "the ingest became a blob");
    let blob = images_root(&d)
        .join("content/blobs/sha256")
        .join(layer.digest.strip_prefix("sha256:").unwrap());
    assert_eq!(std::fs::read(blob).unwrap(), layer.bytes);
}
