//! Pull + unpack of a multi-layer image from a registry on loopback (Debian's
//! `docker-registry`): `yard pull` (switchyardd fetches the layers in parallel, verifies them and
//! unpacks them into overlayfs snapshots) against `skopeo copy docker://… oci:DIR` followed by
//! `umoci unpack` (Debian's skopeo and umoci), the usual daemonless pair, into the same kind of
//! target on the same disk. Each run starts from an empty store (`yard rmi` collects everything;
//! the skopeo/umoci directories are fresh). Prints wall time and the bytes each leaves on disk.
//!
//! Run: `cargo bench -p switchyard-benches --bench images` (root; docker-registry, skopeo, umoci;
//! release binaries built). `RUNS=N` sets the sample count.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_benches::{Stats, row};
use switchyard_tests::images::{Registry, busybox_image, random_layer};
use switchyard_tests::{Daemon, bin, require_root_and, run_timeout, text};

const T: Duration = Duration::from_secs(300);

fn must(cmd: &mut Command) -> String {
    let out = run_timeout(cmd, T);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `du -sb`-like: bytes of every regular file, hard links once.
fn disk_bytes(dir: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-sb", "--"])
        .arg(dir)
        .output()
        .expect("du");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn yard_pull(d: &Daemon, reference: &str) -> Duration {
    let t = Instant::now();
    must(d.yard().args(["pull", "-q", reference]));
    t.elapsed()
}

fn skopeo_umoci(reference: &str, dir: &Path) -> Duration {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(dir).unwrap();
    let t = Instant::now();
    must(
        Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:img", layout.display())),
    );
    must(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:img", layout.display()))
            .arg(&bundle),
    );
    t.elapsed()
}

fn main() {
    if !require_root_and(&["docker-registry", "skopeo", "umoci"]) {
        return;
    }
    assert!(
        bin("yard").exists(),
        "build the release binaries first: scripts/build --release"
    );
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);

    // busybox + many small files + two large layers + a medium one.
    let image = busybox_image(
        vec![
            random_layer(1, 2000, 1024),
            random_layer(2, 8, 2 << 20),
            random_layer(3, 8, 2 << 20),
            random_layer(4, 200, 16 << 10),
        ],
        json!({"Cmd": ["/bin/true"]}),
    );
    let compressed: u64 = image.layers.iter().map(|l| l.bytes.len() as u64).sum();
    let reg = Registry::start();
    reg.push("bench", "1", &image);
    let reference = reg.reference("bench", "1");
    let d = Daemon::start();

    // Warm-up: page cache, registry, binaries.
    yard_pull(&d, &reference);
    must(d.yard().args(["rmi", &reference]));
    let scratch = tempfile::tempdir().unwrap();
    skopeo_umoci(&reference, &scratch.path().join("warm"));

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut our_bytes = 0;
    let mut their_bytes = 0;
    let images_root = d.dir.path().join("root").join("images");
    for i in 0..runs {
        let dir = scratch.path().join(format!("run{i}"));
        let mut one = |first: bool| {
            if first {
                ours.push(yard_pull(&d, &reference));
                our_bytes = disk_bytes(&images_root);
                must(d.yard().args(["rmi", &reference]));
            } else {
                theirs.push(skopeo_umoci(&reference, &dir));
                their_bytes = disk_bytes(&dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
        };
        // Alternate who goes first so drift hits both alike.
        one(i % 2 == 0);
        one(i % 2 != 0);
    }
    let (a, b) = (Stats::of(&ours), Stats::of(&theirs));
    println!();
    println!(
        "pull + unpack of a {}-layer image ({:.1} MiB compressed) from docker-registry on loopback, {runs} runs each, alternating",
        image.layers.len(),
        compressed as f64 / (1 << 20) as f64
    );
    row(
        "yard pull (switchyardd: fetch x3, verify, overlay snapshots)",
        &a,
    );
    row("skopeo copy docker:// oci: + umoci unpack", &b);
    println!(
        "  ratio yard / skopeo+umoci (median): {:.2}",
        a.median.as_secs_f64() / b.median.as_secs_f64()
    );
    println!(
        "  bytes on disk after one pull: yard {:.1} MiB (content + snapshots), skopeo+umoci {:.1} MiB (layout + bundle)",
        our_bytes as f64 / (1 << 20) as f64,
        their_bytes as f64 / (1 << 20) as f64
    );
}
