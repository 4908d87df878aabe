//! Shared pieces of the benchmarks: timing and the comparison table.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod plain_qemu;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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

/// `variants` timed variants, `runs` samples each, after 3 warm-up rounds, in rotated order so
/// drift on the machine (page cache, CPU frequency, other load) hits every variant alike:
/// the statistics of each variant's samples.
pub fn rotated(variants: usize, runs: usize, mut run: impl FnMut(usize) -> Duration) -> Vec<Stats> {
    for _ in 0..3 {
        for v in 0..variants {
            run(v);
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants];
    for i in 0..runs {
        for k in 0..variants {
            let v = (i + k) % variants;
            samples[v].push(run(v));
        }
    }
    samples.iter().map(|v| Stats::of(v)).collect()
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

/// Prints whether shim `shim`'s binary (`containerd-shim-yard-SHIM-v1`) was linked with its text
/// order: how many names of `shims/SHIM/hot-symbols.txt` the binary has (fewer than listed: the
/// list is stale, rerun `scripts/hot-symbols`); nothing without the list or `nm`.
pub fn print_text_order(shim: &str) {
    if let Some(line) = text_order(shim) {
        println!("  {line}");
    }
}

fn text_order(shim: &str) -> Option<String> {
    let bin = switchyard_tests::bin(&format!("containerd-shim-yard-{shim}-v1"));
    let list = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shims")
        .join(shim)
        .join("hot-symbols.txt");
    let list = std::fs::read_to_string(list).ok()?;
    let out = std::process::Command::new("nm")
        .arg("--defined-only")
        .arg(&bin)
        .output()
        .ok()?;
    let names: std::collections::HashSet<&str> = std::str::from_utf8(&out.stdout)
        .ok()?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let listed: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    let found = listed.iter().filter(|n| names.contains(*n)).count();
    Some(format!(
        "text order: {found} of the {} functions of shims/{shim}/hot-symbols.txt in the binary{}",
        listed.len(),
        if found < listed.len() {
            " (stale: rerun scripts/hot-symbols)"
        } else {
            ""
        }
    ))
}

/// The fields of `/proc/PID/smaps_rollup` in KiB (empty if the process is gone).
pub fn smaps_rollup(pid: u32) -> std::collections::HashMap<String, u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((
                k.to_owned(),
                v.trim().trim_end_matches("kB").trim().parse().ok()?,
            ))
        })
        .collect()
}

/// Proportional set size of a process in KiB (shared pages split between their users).
pub fn pss_kib(pid: u32) -> Option<u64> {
    smaps_rollup(pid).get("Pss").copied()
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

/// Runs `f(i)` for `i in 0..n` on `threads` threads until one fails; returns the wall time,
/// every success's duration, and the first failure (its index and message).
pub fn parallel(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<Duration, String> + Sync,
) -> (Duration, Vec<Duration>, Option<(usize, String)>) {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let times = Mutex::new(Vec::with_capacity(n));
    let failure = Mutex::new(None::<(usize, String)>);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    match f(i) {
                        Ok(d) => times.lock().unwrap().push(d),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut fl = failure.lock().unwrap();
                            if fl.as_ref().is_none_or(|(j, _)| i < *j) {
                                *fl = Some((i, e));
                            }
                        }
                    }
                }
            });
        }
    });
    (
        t.elapsed(),
        times.into_inner().unwrap(),
        failure.into_inner().unwrap(),
    )
}

/// Throughput under load: `n` runs of `f` with `in_flight` at a time. Prints one line and
/// returns (tasks per second, p50, p99); panics naming the first failure.
pub fn throughput(
    name: &str,
    n: usize,
    in_flight: usize,
    f: impl Fn(usize) -> Result<Duration, String> + Sync,
) -> (f64, Duration, Duration) {
    let (wall, mut times, failure) = parallel(n, in_flight, f);
    if let Some((i, e)) = failure {
        panic!("{name}: run #{i} failed: {e}");
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let per_s = n as f64 / wall.as_secs_f64().max(1e-9);
    println!(
        "  {name:<34} {per_s:>7.1} tasks/s   p50 {:>10}   p99 {:>10}   ({n} runs, {in_flight} in flight, {})",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(wall)
    );
    (per_s, at(0.5), at(0.99))
}

/// One figure of the benchmark summary that `./scripts/bench` prints at the end (and
/// docs/performance.md keeps): appended to the file `$SWITCHYARD_BENCH_SUMMARY` when it is set.
/// `met` is `None` for a figure without a target.
pub fn summary(figure: &str, measured: &str, target: &str, met: Option<bool>) {
    let Some(path) = std::env::var_os("SWITCHYARD_BENCH_SUMMARY") else {
        return;
    };
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "-",
    };
    let line = format!("| {figure} | {measured} | {target} | {verdict} |\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("summary {}: {e}", std::path::Path::new(&path).display());
    }
}

/// The wall time of `yard run --rm ARGS` (its flags, `--`, the command) against `d`, which must
/// succeed.
pub fn time_yard_run(d: &switchyard_tests::Daemon, args: &[&str]) -> Result<Duration, String> {
    let t = Instant::now();
    let out = switchyard_tests::run_timeout(
        d.yard().arg("run").arg("--rm").args(args),
        Duration::from_secs(120),
    );
    let elapsed = t.elapsed();
    if out.status.success() {
        Ok(elapsed)
    } else {
        Err(format!("yard run --rm {}: {}", args.join(" "), show(&out)))
    }
}
