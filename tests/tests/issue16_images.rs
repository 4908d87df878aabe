//! Issue 16, the image store's parts through the daemon and `yard`:
//! - item 1: an image for the wasm runtime (a `.wasm` entrypoint) whose layer carries a device
//!   node (1:5, harmless) is refused at import, naming the entry and the layer, and leaves
//!   nothing; the same layer in an image for a native runtime imports;
//! - item 6: `yard pull` from a registry (written here, on loopback) that streams an endless
//!   manifest fails promptly with a clear error, and the daemon's peak memory barely moves.
//!
//! The store's own tests (`core/images/tests/issue16_*.rs`) cover the rest with the library's
//! API; these check what a user of `yard` sees.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_tests::images::{gzip, image, oci_layout_tar};
use switchyard_tests::*;

fn daemon() -> Option<Daemon> {
    if !require_root_and(&["mkfs.erofs"]) {
        return None;
    }
    Some(Daemon::start())
}

/// A layer with a module, and a character device 1:5 (`/dev/zero`) if `node`.
fn layer(node: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |kind: tar::EntryType, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_704_067_200);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(5).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add(tar::EntryType::Regular, "app.wasm", b"\0asm\x01\0\0\0");
    if node {
        add(tar::EntryType::Directory, "dev/", b"");
        add(tar::EntryType::Char, "dev/zero", b"");
    }
    b.into_inner().unwrap()
}

fn listing(d: &Daemon) -> Value {
    let out = d.run_yard(&["images", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn issue16_wasm_images_with_device_nodes_are_refused() {
    let Some(d) = daemon() else { return };
    let dir = tempfile::tempdir().unwrap();
    let with_node = gzip(&layer(true));
    let wasm = image(
        vec![with_node.clone()],
        json!({"Entrypoint": ["/app.wasm"]}),
        "amd64",
    );
    let layer_digest = wasm.layers[0].digest.clone();
    let archive = dir.path().join("wasm.tar");
    std::fs::write(&archive, oci_layout_tar(&[("wasm-dev:1", &wasm)])).unwrap();
    let out = d.run_yard(&["image", "import", "-q", archive.to_str().unwrap()]);
    assert!(!out.status.success(), "imported: {}", show(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("dev/zero") && stderr.contains(&layer_digest) && stderr.contains("wasm"),
        "the error does not name the entry and the layer: {stderr}"
    );
    let l = listing(&d);
    assert_eq!(l["images"].as_array().unwrap().len(), 0, "{l}");
    assert_eq!(l["usage"]["blobs"], 0, "{l}");
    assert_eq!(l["usage"]["snapshots"], 0, "{l}");

    // The same layer in an image for a native runtime is an ordinary image.
    let native = image(vec![with_node], json!({"Entrypoint": ["/bin/sh"]}), "amd64");
    let archive = dir.path().join("native.tar");
    std::fs::write(&archive, oci_layout_tar(&[("native-dev:1", &native)])).unwrap();
    let out = d.run_yard(&["image", "import", "-q", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", show(&out));
}

/// Peak resident memory of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn issue16_an_endless_manifest_does_not_grow_the_daemon() {
    let Some(d) = daemon() else { return };
    // A registry whose every manifest is an endless stream of spaces (stopped after 512 MiB,
    // so that a daemon reading it whole cannot take the machine down in a regression).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let chunk = [b' '; 64 << 10];
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(&chunk);
                framed.extend_from_slice(b"\r\n");
                let mut result = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                      Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                );
                let mut sent = 0;
                while result.is_ok() && sent < 512 << 20 {
                    result = stream.write_all(&framed);
                    sent += chunk.len();
                }
                let _ = stream.write_all(b"0\r\n\r\n");
            });
        }
    });
    let pid = d.pid().unwrap();
    let before = peak_rss_kib(pid);
    let start = Instant::now();
    let reference = format!("127.0.0.1:{port}/endless:latest");
    let out = d.run_yard(&["pull", "-q", &reference]);
    let took = start.elapsed();
    let grew = peak_rss_kib(pid).saturating_sub(before);
    eprintln!("pull took {took:?}; the daemon's peak RSS grew {grew} KiB");
    assert!(!out.status.success(), "pulled: {}", show(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("endless/manifests/latest") && stderr.contains("larger than 4194304 bytes"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(grew < 64 << 10, "the daemon's peak RSS grew {grew} KiB");
}
