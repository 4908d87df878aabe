//! Issue 16, the image store's parts, through the store's own API on a real file system:
//! - item 1: an image routed to the wasm runtime may not carry a device node or fifo: refused
//!   while its layer unpacks, and when a layer already unpacked for another image is reused,
//!   each error naming the entry and the layer;
//! - item 4: blobs, ingest files, EROFS images and the store's directories are not readable by
//!   other users (checked as `nobody` with `setpriv`, under a world-readable parent);
//! - item 2's size bound, set through the store's options.
//!
//! Unpacking device nodes needs root: without it each test says so and skips.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use sha2::{Digest, Sha256};
use switchyard_images::snapshot::SnapshotError;
use switchyard_images::unpack::{Limits, UnpackError};
use switchyard_images::{ImageError, ImageStore, Platform, RootfsKind, StoreOptions};
use tar::{EntryType, Header};

fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root (device nodes, chown)");
    false
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn entry(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, name: &str, data: &[u8], dev: (u32, u32)) {
    let mut h = Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(kind);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(data.len() as u64);
    if matches!(kind, EntryType::Char | EntryType::Block) {
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A layer with a module and, if `node`, a character device 1:5 (`/dev/zero`: harmless).
fn layer(node: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    entry(&mut b, EntryType::Directory, "app/", b"", (0, 0));
    entry(
        &mut b,
        EntryType::Regular,
        "app/main.wasm",
        b"\0asm\x01\0\0\0",
        (0, 0),
    );
    if node {
        entry(&mut b, EntryType::Directory, "dev/", b"", (0, 0));
        entry(&mut b, EntryType::Char, "dev/zero", b"", (1, 5));
    }
    b.into_inner().unwrap()
}

/// An OCI layout archive of one image named `name`, with `layers` (uncompressed tars, stored
/// gzip-compressed) and the program `entrypoint`.
fn archive(name: &str, layers: &[Vec<u8>], entrypoint: &str) -> (Vec<u8>, Vec<String>) {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let gz = gzip(tar);
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest(&gz), "size": gz.len(),
        }));
        diff_ids.push(digest(tar));
        blobs.push((digest(&gz), gz));
    }
    let host = Platform::host();
    let config = serde_json::to_vec(&json!({
        "architecture": host.architecture, "os": host.os,
        "config": {"Entrypoint": [entrypoint]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(&manifest), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": name}}],
    }))
    .unwrap();
    let layer_digests = blobs.iter().map(|(d, _)| d.clone()).collect();
    blobs.push((digest(&config), config));
    blobs.push((digest(&manifest), manifest));
    let mut b = tar::Builder::new(Vec::new());
    let mut file = |path: &str, data: &[u8]| entry(&mut b, EntryType::Regular, path, data, (0, 0));
    file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    file("index.json", &index);
    for (d, bytes) in &blobs {
        file(&format!("blobs/sha256/{}", &d[7..]), bytes);
    }
    (b.into_inner().unwrap(), layer_digests)
}

fn store(dir: &Path, opts: StoreOptions) -> ImageStore {
    let db = Arc::new(redb::Database::create(dir.join("meta.redb")).unwrap());
    ImageStore::open_with(&dir.join("images"), db, opts).unwrap()
}

/// The unpack error inside `e`: `(layer, entry)` of a refused node.
fn refused_node(e: &ImageError) -> Option<(String, String)> {
    match e {
        ImageError::Snapshot(SnapshotError::Unpack {
            layer,
            source: UnpackError::Node { entry, .. },
        }) => Some((layer.clone(), entry.clone())),
        _ => None,
    }
}

#[test]
fn issue16_device_nodes_are_refused_in_images_for_wasm() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), StoreOptions::default());
    let with_node = layer(true);

    // An image whose program is a module is for the wasm runtime: its device node is refused
    // while the layer unpacks, and nothing of it is recorded.
    let (wasm, layers) = archive(
        "wasm-app:1",
        std::slice::from_ref(&with_node),
        "/app/main.wasm",
    );
    let e = s.import("default", &wasm[..], None, &|_| {}).unwrap_err();
    let message = switchyard_base::chain(&e);
    assert_eq!(
        refused_node(&e),
        Some((layers[0].clone(), "dev/zero".to_owned())),
        "{message}"
    );
    assert!(
        message.contains("dev/zero") && message.contains(&layers[0]),
        "{message}"
    );
    assert!(s.records(None).unwrap().is_empty());
    assert!(
        s.snapshots().chains().unwrap().is_empty(),
        "the refused layer left a snapshot"
    );

    // The same layer in an image for a native runtime is fine...
    let (native, _) = archive("native-app:1", std::slice::from_ref(&with_node), "/bin/sh");
    s.import("default", &native[..], None, &|_| {}).unwrap();
    assert!(!s.is_wasm("default", "native-app:1").unwrap());
    // ...but the wasm image reusing its unpacked layer is still refused...
    let e = s.import("default", &wasm[..], None, &|_| {}).unwrap_err();
    assert_eq!(
        refused_node(&e),
        Some((layers[0].clone(), "dev/zero".to_owned())),
        "{}",
        switchyard_base::chain(&e)
    );
    // ...and so is a root of the native image handed to the wasm runtime.
    let e = s
        .prepare_for("default", "native-app:1", "c1", RootfsKind::Mounts, true)
        .unwrap_err();
    assert!(refused_node(&e).is_some(), "{}", switchyard_base::chain(&e));
    s.prepare("default", "native-app:1", "c2", RootfsKind::Mounts)
        .unwrap();

    // A snapshot committed before nodes were recorded is searched instead.
    let (snapshots_root, _) = (s.snapshots().root().to_owned(), ());
    let mut markers = 0;
    for d in std::fs::read_dir(snapshots_root.join("snapshots")).unwrap() {
        let marker = d.unwrap().path().join("nodes");
        if marker.exists() {
            std::fs::remove_file(marker).unwrap();
            markers += 1;
        }
    }
    assert_eq!(markers, 1);
    let e = s
        .prepare_for("default", "native-app:1", "c3", RootfsKind::Mounts, true)
        .unwrap_err();
    assert_eq!(
        refused_node(&e),
        Some((layers[0].clone(), "dev/zero".to_owned())),
        "{}",
        switchyard_base::chain(&e)
    );

    // A wasm image without nodes goes through.
    let (clean, _) = archive("wasm-clean:1", &[layer(false)], "/app/main.wasm");
    s.import("default", &clean[..], None, &|_| {}).unwrap();
    assert!(s.is_wasm("default", "wasm-clean:1").unwrap());
    let p = s
        .prepare("default", "wasm-clean:1", "c4", RootfsKind::Mounts)
        .unwrap();
    assert!(p.run.wasm);
}

#[test]
fn issue16_the_store_is_not_readable_by_other_users() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The store's parent is world-readable (as /var/lib is): only the store's own modes stop
    // other users.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = store(dir.path(), StoreOptions::default());
    let (image, layers) = archive("app:1", &[layer(false)], "/bin/sh");
    s.import("default", &image[..], None, &|_| {}).unwrap();
    // An abandoned ingest file stays for a resume.
    let mut ingest = s.content().ingest(Some(&digest(b"partial")), None).unwrap();
    ingest.write_all(b"part").unwrap();
    drop(ingest);
    let erofs = if Command::new("mkfs.erofs").arg("--help").output().is_ok() {
        let p = s
            .prepare("default", "app:1", "vm1", RootfsKind::Erofs)
            .unwrap();
        Some(p.mounts[0].source.clone())
    } else {
        eprintln!("mkfs.erofs missing: EROFS images not checked");
        None
    };
    let root = dir.path().join("images");
    let blob = s.content().path(&layers[0]).unwrap();
    let mut paths = vec![root.clone(), blob.clone()];
    for sub in [
        "content",
        "content/blobs",
        "content/blobs/sha256",
        "content/ingest",
    ] {
        paths.push(root.join(sub));
    }
    for sub in ["", "snapshots", "active", "erofs", "tmp"] {
        paths.push(s.snapshots().root().join(sub));
    }
    paths.extend(
        std::fs::read_dir(root.join("content/ingest"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    paths.extend(erofs.iter().map(Into::into));
    let mut open = Vec::new();
    for p in &paths {
        let mode = std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            open.push(format!("{} {mode:o}", p.display()));
        }
    }
    assert!(open.is_empty(), "readable by others: {open:#?}");
    // And as another user: nothing to read or list.
    for (what, args) in [
        (
            "read a blob",
            vec!["cat".to_owned(), blob.display().to_string()],
        ),
        (
            "list the blobs",
            vec![
                "ls".to_owned(),
                root.join("content/blobs/sha256").display().to_string(),
            ],
        ),
        (
            "list the snapshots",
            vec!["ls".to_owned(), s.snapshots().root().display().to_string()],
        ),
    ]
    .into_iter()
    .chain(
        erofs
            .iter()
            .map(|e| ("read the EROFS image", vec!["cat".to_owned(), e.clone()])),
    ) {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(&args)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "nobody could {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn issue16_the_layer_size_bound_comes_from_the_store_options() {
    if !is_root() {
        return;
    }
    // 8 MiB of zeros: gzip makes about 8 KiB of it.
    let mut b = tar::Builder::new(Vec::new());
    entry(
        &mut b,
        EntryType::Regular,
        "zeros",
        &vec![0u8; 8 << 20],
        (0, 0),
    );
    let tar = b.into_inner().unwrap();
    let (image, layers) = archive("zeros:1", &[tar], "/bin/sh");
    let dir = tempfile::tempdir().unwrap();
    let tight = StoreOptions {
        limits: Limits {
            max_ratio: 16,
            max_bytes: u64::MAX,
        },
        ..StoreOptions::default()
    };
    let s = store(dir.path(), tight);
    let e = s.import("default", &image[..], None, &|_| {}).unwrap_err();
    assert!(
        matches!(&e, ImageError::Snapshot(SnapshotError::Unpack { layer, source: UnpackError::TooLarge { .. } }) if *layer == layers[0]),
        "{}",
        switchyard_base::chain(&e)
    );
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), StoreOptions::default());
    s.import("default", &image[..], None, &|_| {}).unwrap();
}
