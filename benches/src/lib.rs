//! Shared pieces of the benchmarks: timing and the comparison table.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

pub mod plain_qemu;

use std::time::{Duration, Instant};

use std::path::PathBuf;

pub use switchyard_tests::env_usize;
use switchyard_tests::{Ctr, busybox_rootfs, show, text, unique_id, which};

/// Summary statistics of a set of timings.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: Duration,
    pub p10: Duration,
    pub p90: Duration,
    pub n: usize,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Stats {
            median: at(0.5),
            p10: at(0.1),
            p90: at(0.9),
            n: s.len(),
        }
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints one row of a timing table.
pub fn row(name: &str, s: &Stats) {
    println!(
        "  {name:<34} median {:>10}   p10 {:>10}   p90 {:>10}   (n={})",
        ms(s.median),
        ms(s.p10),
        ms(s.p90),
        s.n
    );
}

/// Proportional set size of a process in KiB (shared pages split between their users).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The wall time of `ctr run --rm --runtime RUNTIME_TYPE --rootfs BUSYBOX ID /bin/true` against
/// `daemon`, which must succeed.
pub fn time_ctr_run(daemon: &impl Ctr, runtime_type: &str) -> Duration {
    let id = unique_id("bench");
    let t = Instant::now();
    let out = daemon.ctr_run(
        runtime_type,
        busybox_rootfs(),
        &["--rm"],
        &id,
        &["/bin/true"],
    );
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "ctr run --runtime {runtime_type} failed: {}",
        show(&out)
    );
    elapsed
}

/// The containerd to compare with: `$CONTAINERD`, else the one on PATH (Debian's).
pub fn containerd_under_test() -> PathBuf {
    std::env::var_os("CONTAINERD")
        .map(PathBuf::from)
        .or_else(|| which("containerd"))
        .expect("containerd (apt-get install containerd, or set CONTAINERD)")
}

/// The version a daemon binary prints (`containerd --version`: its third word), or `?`.
pub fn version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            text(&o.stdout)
                .split_whitespace()
                .nth(2)
                .unwrap_or("?")
                .to_owned()
        })
        .unwrap_or_else(|_| "?".to_owned())
}
