//! The image fixtures (`switchyard_tests::images`) checked by real peer tools, so the image
//! tests and benchmarks start from inputs that other implementations accept: a registry
//! (distribution's `docker-registry`) that takes our pushes, `skopeo` reading them back and
//! reading our archives, and `umoci` unpacking our layouts (whiteouts, hard links, owners).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_tests::images::*;
use switchyard_tests::*;

const T: Duration = Duration::from_secs(120);

/// Runs a peer tool; panics with its output unless it succeeds.
fn ok(program: &str, args: &[&str]) -> Output {
    let out = run_timeout(Command::new(program).args(args), T);
    assert!(out.status.success(), "{program} {args:?}: {}", show(&out));
    out
}

/// Runs a peer tool that must fail.
fn fails(program: &str, args: &[&str]) -> Output {
    let out = run_timeout(Command::new(program).args(args), T);
    assert!(
        !out.status.success(),
        "{program} {args:?} should have failed: {}",
        show(&out)
    );
    out
}

fn json_out(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(out)))
}

fn digests(blobs: &[Blob]) -> Vec<String> {
    blobs.iter().map(|b| b.digest.clone()).collect()
}

fn diff_ids(img: &Image) -> Vec<Value> {
    let cfg: Value = serde_json::from_slice(&img.config.bytes).unwrap();
    cfg["rootfs"]["diff_ids"].as_array().unwrap().clone()
}

/// busybox plus a small layer with `/etc/motd`, running `/bin/echo hi`.
fn busybox_echo() -> Image {
    let motd = gzip(&layer_tar(&[
        TarEntry::dir("etc", 0o755),
        TarEntry::file("etc/motd", 0o644, "second layer\n"),
    ]));
    busybox_image(
        vec![motd],
        json!({"Cmd": ["/bin/echo", "hi"], "Env": ["PATH=/bin"], "WorkingDir": "/"}),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn fixtures_are_deterministic_and_well_formed() {
    // Same inputs, same bytes: digests written into a test hold on every run.
    assert_eq!(random_layer(7, 3, 4096), random_layer(7, 3, 4096));
    assert_ne!(random_layer(7, 3, 4096), random_layer(8, 3, 4096));
    assert_eq!(busybox_echo().digest(), busybox_echo().digest());

    // Random data does not compress: the tar.gz is at least the size of its contents.
    let big = random_layer(1, 4, 256 * 1024);
    assert!(big.len() >= 4 * 256 * 1024, "compressed to {}", big.len());
    assert_eq!(
        tar_paths(&big),
        [
            "data/",
            "data/1/",
            "data/1/file-0",
            "data/1/file-1",
            "data/1/file-2",
            "data/1/file-3"
        ]
    );

    // diff_ids are the digests of the uncompressed layers; the manifest names the blobs.
    let img = busybox_echo();
    for (layer, diff_id) in img.layers.iter().zip(diff_ids(&img)) {
        assert_eq!(sha256_digest(&gunzip(&layer.bytes)), diff_id);
        assert_eq!(layer.digest, sha256_digest(&layer.bytes));
    }
    let m: Value = serde_json::from_slice(&img.manifest.bytes).unwrap();
    assert_eq!(m["config"]["digest"], img.config.digest);
    assert_eq!(m["layers"][1]["size"], img.layers[1].bytes.len());

    let base = tar_paths(&busybox_base_layer());
    for p in [
        "bin/busybox",
        "bin/sh",
        "bin/head",
        "etc/passwd",
        "etc/group",
        "tmp/",
        "root/",
    ] {
        assert!(base.iter().any(|e| e == p), "{p} missing from {base:?}");
    }

    assert_eq!(split_repo_tag("busybox:1"), ("busybox", "1"));
    assert_eq!(
        split_repo_tag("127.0.0.1:5000/a/b:x"),
        ("127.0.0.1:5000/a/b", "x")
    );
    assert_eq!(
        split_repo_tag("127.0.0.1:5000/a"),
        ("127.0.0.1:5000/a", "latest")
    );

    // The raw-path layer: the name is exactly what was asked for, and the header checksum is
    // valid (the tar crate checks it while reading; GNU tar lists it without complaint).
    let evil = layer_with_raw_path("../../etc/passwd", b"pwned\n");
    assert_eq!(tar_paths(&evil), ["../../etc/passwd"]);
    let mut a = tar::Archive::new(std::io::Cursor::new(gunzip(&evil)));
    let mut e = a.entries().unwrap().next().unwrap().unwrap();
    let mut data = String::new();
    std::io::Read::read_to_string(&mut e, &mut data).unwrap();
    assert_eq!(data, "pwned\n");
    if require(which("tar").is_some(), "needs GNU tar on PATH") {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("evil.tar.gz");
        std::fs::write(&file, &evil).unwrap();
        let out = ok("tar", &["-tvzf", path(&file)]);
        assert!(
            text(&out.stdout).contains("../../etc/passwd"),
            "{}",
            show(&out)
        );
        // GNU tar says it would strip the `../`, which is the point; it reports no bad
        // header (a wrong checksum makes it skip the entry and exit 2).
        let err = text(&out.stderr);
        assert!(
            !err.contains("Skipping") && !err.contains("does not look"),
            "{}",
            show(&out)
        );
    }
}

#[test]
fn registry_push_is_inspected_by_skopeo() {
    if !require_root_and(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Registry::start();
    let img = busybox_echo();
    reg.push("busybox", "1", &img);
    let src = format!("docker://{}", reg.reference("busybox", "1"));

    let out = ok("skopeo", &["inspect", "--tls-verify=false", &src]);
    let info = json_out(&out);
    assert_eq!(info["Digest"], img.digest(), "{info:#}");
    assert_eq!(info["Layers"], json!(digests(&img.layers)), "{info:#}");
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");

    let cfg = json_out(&ok(
        "skopeo",
        &["inspect", "--tls-verify=false", "--config", &src],
    ));
    assert_eq!(cfg["config"]["Cmd"], json!(["/bin/echo", "hi"]), "{cfg:#}");
    assert_eq!(cfg["rootfs"]["diff_ids"], json!(diff_ids(&img)));

    // The registry serves the manifest bytes we pushed, untouched.
    let (status, body) = reg.get("/v2/busybox/manifests/1");
    assert_eq!(status, 200);
    assert_eq!(body, img.manifest.bytes);

    // Dropping the handle kills and reaps the registry.
    let pid = reg.pid();
    drop(reg);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "registry {pid} still exists (or is an unreaped zombie)"
    );
}

#[test]
fn registry_pull_unpacks_with_umoci() {
    if !require_root_and(&["docker-registry", "skopeo", "umoci", "chroot"]) {
        return;
    }
    let reg = Registry::start();
    reg.push("busybox", "1", &busybox_echo());
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let bundle = dir.path().join("bundle");
    ok(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}", reg.reference("busybox", "1")),
            &format!("oci:{}:busybox", path(&layout)),
        ],
    );
    ok(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:busybox", path(&layout)),
            path(&bundle),
        ],
    );
    let rootfs = bundle.join("rootfs");
    let busybox = std::fs::metadata(rootfs.join("bin/busybox")).unwrap();
    assert_eq!(
        busybox.len(),
        std::fs::metadata(host_busybox()).unwrap().len()
    );
    assert_eq!(busybox.permissions().mode() & 0o777, 0o755);
    for applet in BUSYBOX_APPLETS {
        let l = rootfs.join("bin").join(applet);
        assert_eq!(std::fs::read_link(&l).unwrap(), Path::new("busybox"));
    }
    assert_eq!(
        std::fs::metadata(rootfs.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("root"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    let home = std::fs::metadata(rootfs.join("home/app")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("app:x:1000:1000:"), "{passwd}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "second layer\n"
    );

    // umoci turns the image config into the bundle's process.
    let spec: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        spec["process"]["args"],
        json!(["/bin/echo", "hi"]),
        "{spec:#}"
    );

    // And the rootfs works: busybox runs, its users resolve.
    let out = ok(
        "chroot",
        &[
            path(&rootfs),
            "/bin/sh",
            "-c",
            "echo hi; id -u app; id -G app",
        ],
    );
    assert_eq!(text(&out.stdout), "hi\n1000\n1000\n");
}

#[test]
fn oci_layout_is_listed_and_unpacked_by_umoci() {
    if !require_root_and(&["umoci"]) {
        return;
    }
    let base = busybox_image(vec![], json!({"Cmd": ["/bin/sh"]}));
    // Deletes /etc/group, empties /home, adds a file with a hard link and a symlink, owned
    // by app.
    let changes = gzip(&layer_tar(&[
        TarEntry::whiteout("/etc/group"),
        TarEntry::opaque_whiteout("/home"),
        TarEntry::dir("srv", 0o750).owner(1000, 1000),
        TarEntry::file("srv/hello", 0o640, "hello\n").owner(1000, 1000),
        TarEntry::hardlink("srv/hello-hard", "srv/hello"),
        TarEntry::symlink("srv/hello-sym", "hello"),
    ]));
    let app = busybox_image(
        vec![changes],
        json!({"Entrypoint": ["/bin/cat"], "Cmd": ["/srv/hello"], "User": "1000:1000"}),
    );
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    write_oci_layout(&layout, &[("base", &base), ("app", &app)]);

    let out = ok("umoci", &["ls", "--layout", path(&layout)]);
    let mut tags: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    tags.sort();
    assert_eq!(tags, ["app", "base"], "{}", show(&out));

    let unpack = |tag: &str| {
        let bundle = dir.path().join(format!("bundle-{tag}"));
        ok(
            "umoci",
            &[
                "unpack",
                "--image",
                &format!("{}:{tag}", path(&layout)),
                path(&bundle),
            ],
        );
        bundle
    };
    let b = unpack("base");
    assert!(b.join("rootfs/etc/group").is_file());
    assert!(b.join("rootfs/home/app").is_dir());

    let a = unpack("app");
    let rootfs = a.join("rootfs");
    assert!(!rootfs.join("etc/group").exists(), "whiteout not applied");
    assert!(rootfs.join("etc/passwd").is_file());
    assert_eq!(
        std::fs::read_dir(rootfs.join("home")).unwrap().count(),
        0,
        "opaque whiteout not applied"
    );
    let hello = std::fs::metadata(rootfs.join("srv/hello")).unwrap();
    let hard = std::fs::metadata(rootfs.join("srv/hello-hard")).unwrap();
    assert_eq!(hello.ino(), hard.ino(), "not a hard link");
    assert_eq!(hello.nlink(), 2);
    assert_eq!((hello.uid(), hello.gid()), (1000, 1000));
    assert_eq!(hello.permissions().mode() & 0o777, 0o640);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/hello-sym")).unwrap(),
        "hello\n"
    );
    let spec: Value =
        serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["process"]["args"], json!(["/bin/cat", "/srv/hello"]));
    assert_eq!(spec["process"]["user"]["uid"], 1000);
}

#[test]
fn docker_save_tar_is_read_by_skopeo() {
    if !require_root_and(&["skopeo", "umoci"]) {
        return;
    }
    let img = busybox_echo();
    let other = busybox_image(vec![random_layer(3, 2, 1000)], json!({"Cmd": ["/bin/ls"]}));
    let tar = docker_save_tar(&[
        ("busybox:1", &img),
        ("busybox:latest", &img),
        ("other:2", &other),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("save.tar");
    std::fs::write(&file, &tar).unwrap();

    // One manifest.json entry per image; the shared base layer is one directory.
    let paths = tar_paths(&tar);
    let layer_tars = paths.iter().filter(|p| p.ends_with("/layer.tar")).count();
    assert_eq!(layer_tars, 3, "{paths:?}");
    // Each layer.tar is uncompressed, so its digest is a diff_id (skopeo would also take a
    // gzipped one, so check the bytes here).
    let all_diff_ids: Vec<Value> = diff_ids(&img).into_iter().chain(diff_ids(&other)).collect();
    let mut archive = tar::Archive::new(tar.as_slice());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if !e.path_bytes().ends_with(b"/layer.tar") {
            continue;
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        assert!(!bytes.starts_with(&[0x1f, 0x8b]), "gzipped layer.tar");
        assert!(all_diff_ids.contains(&json!(sha256_digest(&bytes))));
    }

    for (name, image) in [
        ("busybox:1", &img),
        ("busybox:latest", &img),
        ("other:2", &other),
    ] {
        let src = format!("docker-archive:{}:{name}", path(&file));
        let info = json_out(&ok("skopeo", &["inspect", &src]));
        // docker-archive layers are the uncompressed tars, so skopeo reports the diff_ids.
        assert_eq!(info["Layers"], json!(diff_ids(image)), "{name}: {info:#}");
        assert_eq!(info["Architecture"], "amd64");
        let cfg = json_out(&ok("skopeo", &["inspect", "--config", &src]));
        assert_eq!(
            cfg["config"],
            serde_json::from_slice::<Value>(&image.config.bytes).unwrap()["config"]
        );
    }

    // And the layers hold what they should: copy out and unpack.
    let layout = dir.path().join("oci");
    ok(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            &format!("docker-archive:{}:other:2", path(&file)),
            &format!("oci:{}:other", path(&layout)),
        ],
    );
    let bundle = dir.path().join("bundle");
    ok(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:other", path(&layout)),
            path(&bundle),
        ],
    );
    assert_eq!(
        std::fs::metadata(bundle.join("rootfs/data/3/file-1"))
            .unwrap()
            .len(),
        1000
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());
}

#[test]
fn oci_layout_tar_is_read_by_skopeo() {
    if !require_root_and(&["skopeo"]) {
        return;
    }
    let one = busybox_echo();
    let two = busybox_image(vec![random_layer(9, 1, 100)], json!({"Cmd": ["/bin/true"]}));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.tar");
    std::fs::write(&file, oci_layout_tar(&[("1", &one), ("two", &two)])).unwrap();

    for (tag, image) in [("1", &one), ("two", &two)] {
        let src = format!("oci-archive:{}:{tag}", path(&file));
        let info = json_out(&ok("skopeo", &["inspect", &src]));
        assert_eq!(info["Digest"], image.digest(), "{tag}: {info:#}");
        assert_eq!(info["Layers"], json!(digests(&image.layers)));
        let raw = ok("skopeo", &["inspect", "--raw", &src]);
        assert_eq!(raw.stdout, image.manifest.bytes);
    }
    let missing = fails(
        "skopeo",
        &["inspect", &format!("oci-archive:{}:nope", path(&file))],
    );
    assert!(text(&missing.stderr).contains("nope"), "{}", show(&missing));
}

#[test]
fn registry_index_is_served_raw_and_resolved_by_arch() {
    if !require_root_and(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Registry::start();
    let amd = busybox_echo();
    let arm = image(
        vec![random_layer(64, 1, 64)],
        json!({"Cmd": ["/bin/true"]}),
        "arm64",
    );
    let idx = index(&[(&amd, "linux", "amd64"), (&arm, "linux", "arm64")]);
    reg.push_index("multi", "1", &idx, &[&amd, &arm]);
    let src = format!("docker://{}", reg.reference("multi", "1"));

    let raw = ok("skopeo", &["inspect", "--tls-verify=false", "--raw", &src]);
    assert_eq!(raw.stdout, idx.bytes, "{}", show(&raw));
    let parsed: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(parsed["mediaType"], OCI_INDEX);

    for (arch, image) in [("amd64", &amd), ("arm64", &arm)] {
        let info = json_out(&ok(
            "skopeo",
            &[
                "--override-arch",
                arch,
                "inspect",
                "--tls-verify=false",
                &src,
            ],
        ));
        // skopeo reports the index's digest and the chosen platform's contents.
        assert_eq!(info["Digest"], idx.digest, "{info:#}");
        assert_eq!(info["Architecture"], arch, "{info:#}");
        assert_eq!(info["Layers"], json!(digests(&image.layers)), "{info:#}");
    }
    // Each platform's manifest is also there by its digest.
    let (status, body) = reg.get(&format!("/v2/multi/manifests/{}", arm.digest()));
    assert_eq!(status, 200);
    assert_eq!(body, arm.manifest.bytes);
}

#[test]
fn tampered_blob_fails_skopeo_copy() {
    if !require_root_and(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Registry::start();
    let img = busybox_echo();
    reg.push("busybox", "1", &img);
    let dir = tempfile::tempdir().unwrap();
    let copy = |to: &str| {
        let args = [
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}", reg.reference("busybox", "1")),
            &format!("oci:{}:busybox", path(&dir.path().join(to))),
        ];
        run_timeout(Command::new("skopeo").args(args), T)
    };
    let before = copy("good");
    assert!(before.status.success(), "{}", show(&before));

    let target = &img.layers[1];
    reg.tamper_blob(&target.digest);
    // The registry still serves it, at the same length, with different bytes.
    let (status, body) = reg.get(&format!("/v2/busybox/blobs/{}", target.digest));
    assert_eq!(status, 200);
    assert_eq!(body.len(), target.bytes.len());
    assert_ne!(body, target.bytes);

    let after = copy("bad");
    assert!(!after.status.success(), "copy of a tampered blob succeeded");
    let err = text(&after.stderr).to_lowercase();
    assert!(
        err.contains("digest did not match") && err.contains(&target.digest),
        "{}",
        show(&after)
    );
}

#[test]
fn wasm_artifact_is_pushed_and_served_raw() {
    if !require_root_and(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Registry::start();
    // The smallest valid core module: magic and version.
    let module = b"\0asm\x01\0\0\0";
    let art = wasm_artifact(module, "hello.wasm");
    reg.push("wasm/hello", "1", &art);
    let src = format!("docker://{}", reg.reference("wasm/hello", "1"));

    let raw = ok("skopeo", &["inspect", "--tls-verify=false", "--raw", &src]);
    assert_eq!(raw.stdout, art.manifest.bytes, "{}", show(&raw));
    let m: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(m["config"]["mediaType"], WASM_CONFIG);
    assert_eq!(m["layers"][0]["mediaType"], WASM_LAYER);
    assert_eq!(m["layers"][0]["annotations"][TITLE], "hello.wasm");

    // Only the raw forms: skopeo 1.9's plain `inspect` refuses an artifact ("unsupported
    // image-specific operation on artifact with type application/vnd.wasm.config.v0+json").
    let cfg = ok(
        "skopeo",
        &["inspect", "--tls-verify=false", "--raw", "--config", &src],
    );
    assert_eq!(cfg.stdout, art.config.bytes, "{}", show(&cfg));
    let (status, body) = reg.get(&format!("/v2/wasm/hello/blobs/{}", art.layers[0].digest));
    assert_eq!(status, 200);
    assert_eq!(body, module);

    // skopeo copies the artifact verbatim between OCI transports.
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    ok(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            &src,
            &format!("oci:{}:hello", path(&layout)),
        ],
    );
    let hex = art.layers[0].hex();
    assert_eq!(
        std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap(),
        module
    );
}

#[test]
fn registry_with_auth_requires_credentials() {
    if !require_root_and(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Registry::start_with_auth("tester", "s3cret pass");
    let img = busybox_echo();
    reg.push("private", "1", &img);
    let src = format!("docker://{}", reg.reference("private", "1"));

    let anon = fails(
        "skopeo",
        &["inspect", "--tls-verify=false", "--no-creds", &src],
    );
    assert!(
        text(&anon.stderr).to_lowercase().contains("unauthorized"),
        "{}",
        show(&anon)
    );
    fails(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "tester:wrong",
            &src,
        ],
    );
    let info = json_out(&ok(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "tester:s3cret pass",
            &src,
        ],
    ));
    assert_eq!(info["Digest"], img.digest());
}
