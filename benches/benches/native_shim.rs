//! The native shim against containerd's runc shim, in one run:
//! - `ctr run --rm … /bin/true` under containerd 1.6 with `io.containerd.yard-native.v1` vs
//!   `io.containerd.runc.v2` (same containerd, same ctr, interleaved);
//! - the same through switchyardd (end to end: our daemon and our shim), and `yard run --rm
//!   --runtime native` (our client too) against `ctr run --rm` with runc under containerd;
//! - throughput: `THROUGHPUT` runs (default 500), 8 in flight, `yard run --rm` native through
//!   switchyardd vs `ctr run --rm` runc through containerd, with p50/p99 latency under load;
//! - the memory each shim process holds per running container: RSS, PSS, and its private
//!   memory (USS: what one more container's shim adds; the binary's text is shared).
//!
//! Run: `cargo bench -p switchyard-benches --bench native_shim` (root; Debian's containerd,
//! runc; release binaries built). `RUNS=N` sets the sample count, `CONTAINERD=PATH` another
//! containerd.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use switchyard_benches::{
    Stats, containerd_under_test, env_usize, mib, ms, print_text_order, rotated, row, smaps_rollup,
    summary, throughput, time_ctr_run, time_yard_run, version,
};
use switchyard_tests::daemon::rss_kib;
use switchyard_tests::{
    Containerd, Ctr, Daemon, bin, busybox_rootfs, require_root_and, run_timeout, text, unique_id,
};

const NATIVE: &str = "io.containerd.yard-native.v1";
const RUNC: &str = "io.containerd.runc.v2";
/// Runs in flight in the throughput part.
const IN_FLIGHT: usize = 8;

/// `yard run --rm --runtime native --rootfs BUSYBOX -- /bin/true` through `sy`; with `group`,
/// in that group's shim (`io.switchyard.group`), which stays warm between runs.
fn time_yard_native(sy: &Daemon, group: Option<&str>) -> Result<Duration, String> {
    let rootfs = busybox_rootfs().display().to_string();
    let annotation = group.map(|g| format!("io.switchyard.group={g}"));
    let mut args = vec!["--runtime", "native", "--rootfs", &rootfs];
    if let Some(a) = &annotation {
        args.extend(["--annotation", a]);
    }
    args.extend(["--", "/bin/true"]);
    time_yard_run(sy, &args)
}

/// A shim process's memory in KiB, averaged over the shims measured.
struct ShimMemory {
    rss: u64,
    pss: u64,
    /// Pages no other process maps (USS).
    private: u64,
}

/// Start `n` detached sleepers with `runtime`, measure each shim, stop them.
fn shim_memory(ctd: &Containerd, runtime: &str, shim_name: &str, n: usize) -> ShimMemory {
    let ids: Vec<String> = (0..n).map(|_| unique_id("mem")).collect();
    for id in &ids {
        let out = run_timeout(
            ctd.ctr()
                .args(["run", "-d", "--runtime", runtime, "--rootfs"])
                .arg(busybox_rootfs())
                .args([id.as_str(), "/bin/sleep", "60"]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    std::thread::sleep(Duration::from_millis(500));
    let shims: Vec<u32> = ctd
        .shim_processes(shim_name)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), n, "one shim per container expected");
    let rss: u64 = shims.iter().filter_map(|p| rss_kib(*p)).sum::<u64>() / n as u64;
    let rollups: Vec<_> = shims.iter().map(|p| smaps_rollup(*p)).collect();
    let field = |k: &str| rollups.iter().filter_map(|r| r.get(k)).sum::<u64>() / n as u64;
    let pss = field("Pss");
    let private = field("Private_Clean") + field("Private_Dirty");
    for id in &ids {
        let _ = run_timeout(
            ctd.ctr().args(["task", "kill", "-s", "KILL", id]),
            Duration::from_secs(10),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    for id in &ids {
        let _ = run_timeout(ctd.ctr().args(["task", "rm", id]), Duration::from_secs(10));
        let _ = run_timeout(ctd.ctr().args(["c", "rm", id]), Duration::from_secs(10));
    }
    ShimMemory { rss, pss, private }
}

fn main() {
    if !require_root_and(&["ctr", "containerd", "runc", "containerd-shim-runc-v2"]) {
        return;
    }
    assert!(
        bin("containerd-shim-yard-native-v1").exists(),
        "build the release binaries first: scripts/build --release"
    );
    let containerd_bin = containerd_under_test();
    let runs = env_usize("RUNS", 30);
    busybox_rootfs();

    let ctd = Containerd::start(&containerd_bin);
    let sy = Daemon::start();
    let variants = 6;
    let run = |v: usize| match v {
        0 => time_ctr_run(&ctd, NATIVE),
        1 => time_ctr_run(&ctd, RUNC),
        2 => time_ctr_run(&sy, NATIVE),
        3 => time_ctr_run(&sy, RUNC),
        4 => time_yard_native(&sy, None).unwrap_or_else(|e| panic!("{e}")),
        _ => time_yard_native(&sy, Some("warm")).unwrap_or_else(|e| panic!("{e}")),
    };
    let s = rotated(variants, runs, run);
    let ctd_version = version(&containerd_bin);
    println!();
    println!("ctr run --rm --runtime RUNTIME --rootfs busybox ID /bin/true, and yard run --rm");
    println!("(same ctr; rotated order, {runs} runs each after 3 warm-ups)");
    row(
        &format!("containerd {ctd_version} + yard-native shim"),
        &s[0],
    );
    row(&format!("containerd {ctd_version} + runc shim (Go)"), &s[1]);
    row("switchyardd + yard-native shim", &s[2]);
    row("switchyardd + runc shim (Go)", &s[3]);
    row("yard run --rm --runtime native", &s[4]);
    row("  the same, a group's warm shim", &s[5]);
    let ratio = |a: &Stats, b: &Stats| a.median.as_secs_f64() / b.median.as_secs_f64();
    let r = ratio(&s[0], &s[1]);
    println!(
        "  ratio native / runc shim under containerd (median): {r:.2}   target <= 0.50: {}",
        if r <= 0.5 { "met" } else { "NOT met" }
    );
    summary(
        &format!("native: ctr run, our shim / runc shim, containerd {ctd_version}"),
        &format!("{r:.2} ({} / {})", ms(s[0].median), ms(s[1].median)),
        "<= 0.50",
        Some(r <= 0.5),
    );
    println!(
        "  ratio switchyardd+native / containerd+runc (median): {:.2}",
        ratio(&s[2], &s[1])
    );
    let r = ratio(&s[4], &s[1]);
    println!(
        "  ratio yard run native / ctr run + containerd + runc (median): {r:.2}   target <= 0.25: {}",
        if r <= 0.25 { "met" } else { "NOT met" }
    );
    summary(
        &format!("native: yard run --rm / ctr run --rm runc on containerd {ctd_version}"),
        &format!("{r:.2} ({} / {})", ms(s[4].median), ms(s[1].median)),
        "<= 0.25",
        Some(r <= 0.25),
    );
    let r = ratio(&s[5], &s[1]);
    println!(
        "  ratio yard run native in a group's warm shim / ctr run + containerd + runc: {r:.2}"
    );
    summary(
        "native: yard run --rm in a group's warm shim / ctr run --rm runc",
        &format!("{r:.2} ({} / {})", ms(s[5].median), ms(s[1].median)),
        "<= 0.25",
        Some(r <= 0.25),
    );

    let n = env_usize("THROUGHPUT", 500);
    println!();
    println!("throughput: {n} runs of /bin/true, {IN_FLIGHT} in flight");
    let (yard_s, yard_p50, yard_p99) = throughput("yard run --rm native", n, IN_FLIGHT, |_| {
        time_yard_native(&sy, None)
    });
    let (ctd_s, _, _) = throughput(
        &format!("ctr run --rm runc, containerd {ctd_version}"),
        n,
        IN_FLIGHT,
        |_| Ok(time_ctr_run(&ctd, RUNC)),
    );
    println!(
        "  ratio tasks/s yard native / containerd + runc: {:.2}",
        yard_s / ctd_s
    );
    summary(
        &format!("native throughput, {IN_FLIGHT} in flight (vs containerd + runc)"),
        &format!(
            "{yard_s:.1}/s vs {ctd_s:.1}/s ({:.2}x); p50 {} p99 {}",
            yard_s / ctd_s,
            ms(yard_p50),
            ms(yard_p99)
        ),
        "-",
        None,
    );

    let n = 5;
    let ours = shim_memory(&ctd, NATIVE, "containerd-shim-yard-native-v1", n);
    let runc = shim_memory(&ctd, RUNC, "containerd-shim-runc-v2", n);
    println!();
    println!("shim memory per running container ({n} sleepers each, one shim per container)");
    println!(
        "  yard-native shim          RSS {:>9}   PSS {:>9}   private {:>9}   target RSS <= 4 MiB: {}",
        mib(ours.rss),
        mib(ours.pss),
        mib(ours.private),
        if ours.rss <= 4 * 1024 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  runc shim (Go)            RSS {:>9}   PSS {:>9}   private {:>9}",
        mib(runc.rss),
        mib(runc.pss),
        mib(runc.private)
    );
    print_text_order("native");
    summary(
        "native shim memory, one idle container (runc shim)",
        &format!(
            "RSS {} PSS {} (runc: RSS {} PSS {})",
            mib(ours.rss),
            mib(ours.pss),
            mib(runc.rss),
            mib(runc.pss)
        ),
        "RSS <= 4 MiB",
        Some(ours.rss <= 4 * 1024),
    );
    summary(
        "native shim private memory (USS) per container (runc shim)",
        &format!("{} (runc: {})", mib(ours.private), mib(runc.private)),
        "-",
        None,
    );
}
