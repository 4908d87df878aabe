//! A `vm` pod on the pod network on the built-in VMM (issue 20), in the nested-KVM harness (the
//! only place here with a hardware-style KVM): switchyardd's CRI runs a `vm` pod on a CNI
//! bridge whose VM's virtio-net device is the built-in VMM's, and busybox `wget` in the
//! harness's own namespace (the node, in the place of a native pod) measures
//!
//! 1. request latency: sequential `GET` of a small page, the pod's busybox `httpd` against the
//!    same `httpd` on the harness's loopback (the native path, same client), mean per request;
//! 2. TCP throughput: a 32 MiB file from each, MB/s and the ratio.
//!
//! The outer VM is QEMU TCG (with emulated SVM), so both rows run emulated and the ratio, not
//! the absolute numbers, is what this says; the design target (a `vm` pod >= 0.8x native) is
//! for hardware KVM. Times come from the harness's `/proc/uptime` (10 ms), over `RUNS` requests
//! (default 100) and `TP_RUNS` files (default 3).
//!
//! Run: `cargo bench -p switchyard-benches --bench nested_pod_net` (root; the harness's
//! prerequisites as for `tests/tests/nested.rs`: `scripts/guest --nested`, Debian's CNI plugins;
//! the binaries it carries are the debug ones, `scripts/build`).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::time::Duration;

use switchyard_benches::env_usize;
use switchyard_tests::nested::{self, POD_IP, switchyard_in_harness};
use switchyard_tests::{is_root, require, require_root_and};

/// The bytes of the throughput file.
const BIG: usize = 32 << 20;

/// The spans (end - start, in seconds) of the lines of `out` that start with `key` and go on
/// with two uptimes.
fn spans(out: &str, key: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(key))
        .filter_map(|rest| {
            let mut w = rest.split_whitespace().map(str::parse::<f64>);
            let (a, b) = (w.next()?.ok()?, w.next()?.ok()?);
            Some(b - a)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !require(is_root(), "needs root")
        || !require_root_and(&["mkfs.erofs"])
        || !nested::require_harness()
        || !nested::require_cni()
    {
        return;
    }
    let runs = env_usize("RUNS", 100).max(1);
    let tp_runs = env_usize("TP_RUNS", 3).max(1);
    let image = switchyard_tests::cri::BUSYBOX_IMAGE;
    let fill =
        format!("mkdir -p /w && echo hello > /w/index.html && head -c {BIG} /dev/zero > /w/big");
    let payload = format!(
        "yard -n k8s.io image import -q /images/busybox.tar >/dev/null || exit 11\n\
         ids=$(yard cri run --pod-name netpod --runtime vm --log-dir /var/log/pods/netpod \
               --name web {image} -- sh -c '{fill} && exec httpd -f -p 8080 -h /w') || exit 12\n\
         POD=$(echo \"$ids\" | head -1)\n\
         sh -c '{fill}' && httpd -p 127.0.0.1:8082 -h /w || exit 13\n\
         i=0; while ! wget -qO /dev/null http://{POD_IP}:8080/index.html 2>/dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done\n\
         for target in vm:{POD_IP}:8080 native:127.0.0.1:8082; do\n\
           name=${{target%%:*}}; addr=${{target#*:}}\n\
           t0=$(cut -d' ' -f1 /proc/uptime); i=0\n\
           while [ $i -lt {runs} ]; do wget -qO /dev/null http://$addr/index.html || exit 14; i=$((i+1)); done\n\
           echo \"latency $name: $t0 $(cut -d' ' -f1 /proc/uptime)\"\n\
           r=0; while [ $r -lt {tp_runs} ]; do\n\
             t0=$(cut -d' ' -f1 /proc/uptime); wget -qO /dev/null http://$addr/big || exit 15\n\
             echo \"big $name: $t0 $(cut -d' ' -f1 /proc/uptime)\"; r=$((r+1))\n\
           done\n\
         done\n\
         yard cri rmp $POD >/dev/null; echo \"rmp: $?\"\n"
    );
    let vm = switchyard_in_harness("backend = \"builtin\"\n", &payload)
        .pod_network()
        .file(
            switchyard_tests::cri::busybox_images(),
            "/images/busybox.tar",
        )
        .memory_mib(1024)
        .payload_timeout(Duration::from_secs(900))
        .timeout(Duration::from_secs(1200))
        .build()
        .unwrap();
    let run = vm.run().unwrap();
    assert_eq!(run.status, 0, "payload failed:\n{}", run.output);
    let out = &run.output;
    println!();
    println!(
        "A vm pod on the built-in VMM in the nested-KVM harness (outer VM: QEMU TCG with SVM): \
         busybox wget in the harness's namespace; {runs} requests, {tp_runs} x {} MiB",
        BIG >> 20
    );
    let mean = |name: &str| {
        spans(out, &format!("latency {name}: "))
            .first()
            .copied()
            .unwrap()
            / runs as f64
    };
    let (vm_lat, native_lat) = (mean("vm"), mean("native"));
    println!(
        "  request, mean: vm pod {:.1} ms, harness loopback {:.1} ms ({:.2}x)",
        vm_lat * 1e3,
        native_lat * 1e3,
        vm_lat / native_lat
    );
    let tp = |name: &str| BIG as f64 / median(spans(out, &format!("big {name}: "))) / 1e6;
    let (vm_tp, native_tp) = (tp("vm"), tp("native"));
    println!(
        "  32 MiB, median: vm pod {vm_tp:.1} MB/s, harness loopback {native_tp:.1} MB/s ({:.2}x; \
         target on hardware KVM >= 0.8x)",
        vm_tp / native_tp
    );
}
