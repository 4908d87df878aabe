//! `ctr run --rm … /bin/true` with containerd's runc shim, through switchyardd and through
//! containerd itself, interleaved in one run; plus each daemon's idle RSS.
//!
//! Run: `cargo bench -p switchyard-benches --bench ctr_run` (root; Debian's containerd and
//! runc). `CONTAINERD=/path/to/containerd` compares another containerd; `RUNS=N` sets the
//! sample count.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use switchyard_benches::{
    Stats, containerd_under_test, env_usize, mib, row, time_ctr_run, version,
};
use switchyard_tests::daemon::rss_kib;
use switchyard_tests::{Containerd, Daemon, busybox_rootfs, require_root_and};

const RUNC: &str = "io.containerd.runc.v2";

fn main() {
    if !require_root_and(&["ctr", "containerd", "runc", "containerd-shim-runc-v2"]) {
        return;
    }
    let containerd_bin = containerd_under_test();
    let runs = env_usize("RUNS", 30);
    busybox_rootfs();

    let ctd = Containerd::start(&containerd_bin);
    let sy = Daemon::start();
    // Let both settle, then read idle RSS before any task ran.
    std::thread::sleep(Duration::from_secs(1));
    let rss_ctd_cold = rss_kib(ctd.pid().unwrap()).unwrap_or(0);
    let rss_sy_cold = rss_kib(sy.pid().unwrap()).unwrap_or(0);

    for _ in 0..3 {
        time_ctr_run(&ctd, RUNC);
        time_ctr_run(&sy, RUNC);
    }
    let mut t_ctd = Vec::with_capacity(runs);
    let mut t_sy = Vec::with_capacity(runs);
    for i in 0..runs {
        // Alternate who goes first so drift (page cache, CPU frequency) hits both alike.
        if i % 2 == 0 {
            t_ctd.push(time_ctr_run(&ctd, RUNC));
            t_sy.push(time_ctr_run(&sy, RUNC));
        } else {
            t_sy.push(time_ctr_run(&sy, RUNC));
            t_ctd.push(time_ctr_run(&ctd, RUNC));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_ctd = rss_kib(ctd.pid().unwrap()).unwrap_or(0);
    let rss_sy = rss_kib(sy.pid().unwrap()).unwrap_or(0);

    let s_ctd = Stats::of(&t_ctd);
    let s_sy = Stats::of(&t_sy);
    println!();
    println!("ctr run --rm --runtime io.containerd.runc.v2 --rootfs busybox ID /bin/true");
    println!("(same ctr, same runc shim; interleaved, {runs} runs each after 3 warm-ups)");
    row(&format!("containerd {}", version(&containerd_bin)), &s_ctd);
    row("switchyardd", &s_sy);
    let ratio = s_sy.median.as_secs_f64() / s_ctd.median.as_secs_f64();
    println!(
        "  ratio switchyardd / containerd (median): {ratio:.2}   target <= 1.00: {}",
        if ratio <= 1.0 { "met" } else { "NOT met" }
    );
    println!();
    println!(
        "daemon RSS (idle)                     after start      after {} runs",
        runs + 3
    );
    println!(
        "  containerd {:<26} {:>10}      {:>10}",
        version(&containerd_bin),
        mib(rss_ctd_cold),
        mib(rss_ctd)
    );
    println!(
        "  switchyardd {:<25} {:>10}      {:>10}   target <= 15 MiB: {}",
        "",
        mib(rss_sy_cold),
        mib(rss_sy),
        if rss_sy <= 15 * 1024 {
            "met"
        } else {
            "NOT met"
        }
    );
}
