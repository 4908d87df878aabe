//! The Wasm shim (`containerd-shim-yard-wasm-v1`) against the wasmtime CLI, in one run:
//! 1. hello world end to end: `yard run --rm --runtime wasm` through switchyardd vs
//!    `wasmtime run` of the same module, each with a cold precompilation cache (emptied before
//!    every run) and a warm one (plus `wasmtime compile` + `run --allow-precompiled`);
//! 2. a new task in a warm shim: `yard run --rm` into a shim that already runs a task of the
//!    same group (`io.switchyard.group`), with the shim's own `Create` and `Start` request times
//!    taken from its debug log (relayed into switchyardd's log); 2b. the same into a warm shim
//!    with no other task, each run after 250 ms with nothing running (tasks arriving now and
//!    then, which pay the kernel's wait on the worker's cgroup migration);
//! 3. density: `DENSITY` idle tasks (default 10,000) in one shim process, its RSS and PSS per
//!    task, the time to start and to remove them, and that nothing is left afterwards.
//!
//! Run: `cargo bench -p switchyard-benches --bench wasm_shim` (root; release binaries built:
//! `scripts/build --release`, as `scripts/bench` does; the Wasm
//! targets `wasm32-wasip1` and `wasm32-wasip2` for the test programs). The wasmtime CLI is
//! taken from PATH, else `$SWITCHYARD_PEERS/wasmtime/bin/wasmtime` (default
//! /var/cache/switchyard/peers), and installed there with `cargo install` when missing.
//! `WASMTIME=PATH` names another wasmtime CLI (empty: none, the shim's rows only).
//! `WASM_OPTIONS='a = 1; b = 2'` adds shim options (e.g. `worker_uid = 0; worker_gid = 0`, the
//! worker without its user namespace). `RUNS=N` sets the sample count of the timings (default
//! 20), `DENSITY=N` the number of idle tasks (default 10,000; each holds one descriptor in
//! the worker, so the shim's `RLIMIT_NOFILE` must be above it).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use switchyard_benches::{
    Stats, env_usize, mib, ms, parallel, print_text_order, pss_kib, rotated, row, smaps_rollup,
    summary, throughput,
};
use switchyard_tests::daemon::rss_kib;
use switchyard_tests::wasm::wasm_rootfs;
use switchyard_tests::{
    Ctr, Daemon, bin, eventually, is_root, open_fds, require, run_timeout, text, which,
};

const SHIM: &str = "containerd-shim-yard-wasm-v1";
const RUNTIME_TYPE: &str = "io.containerd.yard-wasm.v1";
/// wasmtime-cli versions to try installing, newest first: 48 is the shim's wasmtime (and needs
/// rustc 1.95); 36 is the LTS line for older toolchains.
const WASMTIME_VERSIONS: [&str; 2] = ["48.0.8", "36.0.2"];
/// Parallel `yard` clients for the density run.
const THREADS: usize = 4;
/// Runs in flight in the throughput part.
const IN_FLIGHT: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

fn peers_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/switchyard/peers"))
}

/// Newest modification time of the files under `dir`.
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let t = if e.path().is_dir() {
            newest_mtime(&e.path())
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// The release binaries this bench drives; warns when one is older than its sources.
fn check_binaries() {
    let root = repo_root();
    for (name, sources) in [
        ("switchyardd", &["core/daemon/src", "core/api"][..]),
        ("yard", &["core/cli/src", "core/api"][..]),
        (SHIM, &["shims/wasm/src", "shims/kit/src"][..]),
    ] {
        let p = switchyard_tests::bin_dir().join(name);
        assert!(
            p.is_file(),
            "{} is missing: build the release binaries first: \
             scripts/build --release (as scripts/bench does)",
            p.display()
        );
        let built = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        let src = sources
            .iter()
            .filter_map(|s| newest_mtime(&root.join(s)))
            .max();
        if let (Some(built), Some(src)) = (built, src)
            && src > built
        {
            eprintln!(
                "WARNING: {} is older than its sources ({}); rebuild it for current numbers",
                p.display(),
                sources.join(", ")
            );
        }
    }
}

/// The wasmtime CLI: `$WASMTIME`, PATH, then the peers directory; installed there when
/// missing.
fn wasmtime_cli() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME") {
        // An empty value leaves the peer out (shim rows only).
        return (!p.is_empty()).then(|| p.into());
    }
    if let Some(p) = which("wasmtime") {
        return Some(p);
    }
    let root = peers_dir().join("wasmtime");
    let installed = root.join("bin/wasmtime");
    if installed.is_file() {
        return Some(installed);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for version in WASMTIME_VERSIONS {
        println!(
            ">>> the wasmtime CLI (peer) is missing: installing wasmtime-cli {version} into {} \
             with cargo install; this compiles wasmtime and takes a long while (10-40 min)...",
            root.display()
        );
        let status = Command::new(&cargo)
            .args(["install", "--locked", "--root"])
            .arg(&root)
            .args(["wasmtime-cli", "--version", version])
            .stdin(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() && installed.is_file() => {
                println!(">>> installed {}", installed.display());
                return Some(installed);
            }
            Ok(s) => eprintln!(">>> cargo install wasmtime-cli {version} failed: {s}"),
            Err(e) => eprintln!(">>> cannot run {cargo:?}: {e}"),
        }
    }
    None
}

/// Runs a command with the bench's timeout; returns its wall time and output (`run_timeout`
/// notices the exit the moment it happens, so the time is exact).
fn timed(cmd: &mut Command) -> (Duration, Output) {
    let t = Instant::now();
    let out = run_timeout(cmd, TIMEOUT);
    (t.elapsed(), out)
}

/// Runs a command that must succeed and print `hello from wasm`; returns its wall time.
fn hello(mut cmd: Command) -> Duration {
    let (d, out) = timed(&mut cmd);
    assert!(
        out.status.success() && text(&out.stdout).contains("hello from wasm"),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    d
}

/// `yard run --rm [--annotation io.switchyard.group=G] --runtime wasm --rootfs R -- CMD`
fn yard_run(d: &Daemon, flags: &[&str], group: Option<&str>, command: &[&str]) -> Command {
    let mut c = d.yard();
    c.arg("run").args(flags);
    if let Some(g) = group {
        c.arg("--annotation")
            .arg(format!("io.switchyard.group={g}"));
    }
    c.args(["--runtime", "wasm", "--rootfs"])
        .arg(wasm_rootfs())
        .arg("--")
        .args(command);
    c
}

/// Shim server processes of daemon `d` (the server has `-socket`; `start`/`delete` do not).
fn shims(d: &Daemon) -> Vec<u32> {
    d.shim_servers(SHIM)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Every shim process of daemon `d`: servers and `start`/`delete` invocations.
fn any_shims(d: &Daemon) -> usize {
    d.shim_processes(SHIM).len()
}

fn empty_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
}

fn runtime_toml(cache_dir: &Path, extra_options: &str) -> String {
    format!(
        "[runtimes.wasm]\nruntime_type = \"{RUNTIME_TYPE}\"\n[runtimes.wasm.options]\n\
         cache_dir = \"{}\"\n{extra_options}",
        cache_dir.display()
    )
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn us_row(name: &str, v: &[u64]) {
    if v.is_empty() {
        println!("  {name:<34} (no samples in the log)");
        return;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    println!(
        "  {name:<34} median {:>7} us   p10 {:>7} us   p90 {:>7} us   (n={})",
        at(0.5),
        at(0.1),
        at(0.9),
        s.len()
    );
}

/// The median as `Stats` and `us_row` take it (index `round((n - 1) / 2)`).
fn median_u64(v: &[u64]) -> Option<u64> {
    let mut s = v.to_vec();
    s.sort_unstable();
    let i = ((s.len().max(1) - 1) as f64 * 0.5).round() as usize;
    s.get(i).copied()
}

/// `(method, µs)` of the shim's `request` debug lines (kit's `call`: `request method="Create"
/// us=1234 ok=true`), as relayed into switchyardd's log, in `log`.
fn shim_requests(log: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(at) = line.find("request method=") else {
            continue;
        };
        let rest = &line[at + "request method=".len()..];
        let method: String = rest
            .trim_start_matches('"')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let us = rest
            .split_whitespace()
            .find_map(|f| f.strip_prefix("us="))
            .and_then(|v| v.trim_matches('"').parse().ok());
        if let Some(us) = us {
            out.push((method, us));
        }
    }
    out
}

/// `yard ps --json` rows whose id starts with `prefix`: (total, running).
fn ps_count(d: &Daemon, prefix: &str) -> (usize, usize) {
    // Not `run_timeout`: it reads the pipes only after the exit, and 1000 rows overflow them.
    let out = d
        .yard()
        .args(["ps", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run yard ps");
    assert!(out.status.success(), "yard ps: {}", text(&out.stderr));
    let json = text(&out.stdout);
    let id = format!("\"id\": \"{prefix}");
    let rows: Vec<&str> = json.split('}').filter(|r| r.contains(&id)).collect();
    let running = rows
        .iter()
        .filter(|r| r.contains("\"status\": \"running\""))
        .count();
    (rows.len(), running)
}

/// One mapping of /proc/PID/smaps: its header line and its fields in kB.
struct Mapping {
    header: String,
    kb: HashMap<String, u64>,
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            maps.push(Mapping {
                header: line.to_owned(),
                kb: HashMap::new(),
            });
        } else if let (Some(m), Some((k, v))) = (maps.last_mut(), line.split_once(':'))
            && let Ok(n) = v.trim().trim_end_matches("kB").trim().parse()
        {
            m.kb.insert(k.to_owned(), n);
        }
    }
    maps
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// A short description of a mapping: its size, permissions and name.
fn describe(m: &Mapping) -> String {
    let f: Vec<&str> = m.header.split_whitespace().collect();
    let name = f.get(5).copied().unwrap_or("[anon]");
    format!(
        "{} {} {name}",
        mib(m.kb.get("Size").copied().unwrap_or(0)),
        f[1]
    )
}

/// Prints where the shim's memory is: the rollup, the mappings that grew most between
/// `before` (one task) and `after` (N tasks), and the largest mappings now.
fn memory_breakdown(pid: u32, before: &[Mapping], after: &[Mapping], n: usize) {
    let r = smaps_rollup(pid);
    let g = |k: &str| mib(r.get(k).copied().unwrap_or(0));
    println!(
        "  smaps_rollup: Rss {}  Pss {}  Pss_Anon {}  Pss_File {}  Anonymous {}  \
         Private_Dirty {}  Shared_Clean {}",
        g("Rss"),
        g("Pss"),
        g("Pss_Anon"),
        g("Pss_File"),
        g("Anonymous"),
        g("Private_Dirty"),
        g("Shared_Clean")
    );
    println!(
        "  threads {}  open fds {}  VmSize {}",
        status_field(pid, "Threads:"),
        open_fds(pid),
        status_field(pid, "VmSize:")
    );
    let key = |m: &Mapping| m.header.split_whitespace().next().unwrap_or("").to_owned();
    let old: HashMap<String, u64> = before
        .iter()
        .map(|m| (key(m), m.kb.get("Rss").copied().unwrap_or(0)))
        .collect();
    let (new_maps, new_kb) = after
        .iter()
        .filter(|m| !old.contains_key(&key(m)))
        .fold((0, 0), |(c, kb), m| {
            (c + 1, kb + m.kb.get("Rss").copied().unwrap_or(0))
        });
    println!(
        "  mappings: {} with 1 task, {} with {n} ({new_maps} new ones holding {} RSS)",
        before.len(),
        after.len(),
        mib(new_kb)
    );
    // Per-task memory lives in many small mappings of one kind (fiber stacks, linear memory
    // slots, their copy-on-write images): sum the growth by size, permissions and name.
    let mut kinds: HashMap<(String, u64, String), (usize, i64)> = HashMap::new();
    for m in after {
        let now = m.kb.get("Rss").copied().unwrap_or(0) as i64;
        let delta = now - old.get(&key(m)).copied().unwrap_or(0) as i64;
        if delta == 0 {
            continue;
        }
        let f: Vec<&str> = m.header.split_whitespace().collect();
        let name = f.get(5).copied().unwrap_or("[anon]").to_owned();
        let size = m.kb.get("Size").copied().unwrap_or(0);
        let e = kinds.entry((f[1].to_owned(), size, name)).or_default();
        e.0 += 1;
        e.1 += delta;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by_key(|(_, (_, d))| -d);
    let tasks = (n.max(2) - 1) as f64;
    println!("  RSS growth from 1 to {n} tasks by kind of mapping (count x size perms name):");
    for ((perms, size, name), (count, d)) in kinds.iter().take(8) {
        println!(
            "    {:>+7} KiB = {:>5.1} KiB/task   {count:>5} x {size:>7} KiB {perms} {name}",
            d,
            *d as f64 / tasks
        );
    }
    let mut largest: Vec<&Mapping> = after.iter().collect();
    largest.sort_by_key(|m| std::cmp::Reverse(m.kb.get("Rss").copied().unwrap_or(0)));
    println!("  largest mappings by RSS with {n} tasks:");
    for m in largest.iter().take(5) {
        println!(
            "    {:>9} KiB RSS  {}",
            m.kb.get("Rss").copied().unwrap_or(0),
            describe(m)
        );
    }
}

struct Part1 {
    yard_cold: Stats,
    yard_warm: Stats,
}

fn part1(d: &Daemon, work: &Path, cache: &Path, wasmtime: Option<&Path>, runs: usize) -> Part1 {
    let module = wasm_rootfs().join("app/hello.wasm");
    let cwasm = work.join("hello.cwasm");
    if let Some(w) = wasmtime {
        let out = run_timeout(
            Command::new(w)
                .arg("compile")
                .arg(&module)
                .arg("-o")
                .arg(&cwasm),
            TIMEOUT,
        );
        assert!(
            out.status.success(),
            "wasmtime compile: {}",
            text(&out.stderr)
        );
    }
    let names = [
        "yard run, cold cache",
        "yard run, warm cache",
        "wasmtime run -C cache=n (cold)",
        "wasmtime run -C cache=y (warm)",
        "wasmtime run precompiled .cwasm",
    ];
    let variants = if wasmtime.is_some() { 5 } else { 2 };
    let run = |v: usize| -> Duration {
        let wt = || Command::new(wasmtime.unwrap());
        match v {
            0 => {
                empty_dir(cache);
                hello(yard_run(d, &["--rm"], None, &["/app/hello.wasm"]))
            }
            1 => hello(yard_run(d, &["--rm"], None, &["/app/hello.wasm"])),
            2 => {
                let mut c = wt();
                c.args(["run", "-C", "cache=n"]).arg(&module);
                hello(c)
            }
            3 => {
                let mut c = wt();
                c.args(["run", "-C", "cache=y"]).arg(&module);
                hello(c)
            }
            _ => {
                let mut c = wt();
                c.args(["run", "--allow-precompiled"]).arg(&cwasm);
                hello(c)
            }
        }
    };
    // Warm-ups: every variant (this primes the shim's and wasmtime's caches as well).
    // A cold run refills the cache it emptied, so a warm run always finds its cache filled.
    let s = rotated(variants, runs, run);
    println!();
    println!(
        "1. hello world end to end: `yard run --rm --runtime wasm --rootfs R -- /app/hello.wasm`"
    );
    println!("   vs `wasmtime run hello.wasm` (rotated order, {runs} runs each after 3 warm-ups)");
    for (name, st) in names.iter().zip(&s) {
        row(name, st);
    }
    if variants == 5 {
        println!(
            "  ratio yard / wasmtime, cold cache (median):              {:.2}",
            ratio(s[0].median, s[2].median)
        );
        println!(
            "  ratio yard warm / wasmtime -C cache=y (median):          {:.2}",
            ratio(s[1].median, s[3].median)
        );
        println!(
            "  ratio yard warm / wasmtime precompiled (median):         {:.2}",
            ratio(s[1].median, s[4].median)
        );
        println!(
            "  overhead yard warm - wasmtime precompiled (median):      {}",
            ms(s[1].median.saturating_sub(s[4].median))
        );
    } else {
        println!("  (no wasmtime CLI: the peer rows are missing)");
    }
    let ok = s[1].median <= Duration::from_millis(15);
    println!(
        "  target warm end to end <= 15 ms: {} (median {})",
        verdict(ok),
        ms(s[1].median)
    );
    summary(
        "wasm: cold yard run --rm (empty cache, new shim)",
        &format!(
            "{}{}",
            ms(s[0].median),
            s.get(2).map_or(String::new(), |w| format!(
                " (wasmtime run cold {}, warm {})",
                ms(w.median),
                ms(s[3].median)
            ))
        ),
        "-",
        None,
    );
    Part1 {
        yard_cold: s[0],
        yard_warm: s[1],
    }
}

/// 1b. The warm path: `yard run --rm` into a group's warm shim (`io.switchyard.group`, the shim
/// kept by a first run and joined without `<shim> start`) vs a warm cache in a new shim per
/// task, vs `wasmtime run` of the precompiled module; then throughput with 8 in flight.
fn part1b(d: &Daemon, work: &Path, wasmtime: Option<&Path>, runs: usize) -> Stats {
    let cwasm = work.join("hello.cwasm");
    let group = Some("warm");
    let mut names = vec![
        "yard run, warm group shim",
        "yard run, new shim, warm cache",
    ];
    if wasmtime.is_some() {
        names.push("wasmtime run precompiled .cwasm");
    }
    let run = |v: usize| -> Duration {
        match v {
            0 => hello(yard_run(d, &["--rm"], group, &["/app/hello.wasm"])),
            1 => hello(yard_run(d, &["--rm"], None, &["/app/hello.wasm"])),
            _ => {
                let mut c = Command::new(wasmtime.unwrap());
                c.args(["run", "--allow-precompiled"]).arg(&cwasm);
                hello(c)
            }
        }
    };
    let s = rotated(names.len(), runs, run);
    println!();
    println!("1b. the warm path (rotated order, {runs} runs each after 3 warm-ups)");
    for (name, st) in names.iter().zip(&s) {
        row(name, st);
    }
    let ok = s[0].median <= Duration::from_millis(10);
    println!(
        "  target warm task <= 10 ms: {} (median {})",
        verdict(ok),
        ms(s[0].median)
    );
    summary(
        "wasm: warm yard run --rm (group's warm shim)",
        &format!(
            "{} (new shim per task: {}{})",
            ms(s[0].median),
            ms(s[1].median),
            s.get(2).map_or(String::new(), |w| format!(
                "; wasmtime precompiled {}",
                ms(w.median)
            ))
        ),
        "<= 10 ms",
        Some(ok),
    );

    let n = env_usize("THROUGHPUT", 500);
    println!();
    println!("throughput: {n} runs of hello.wasm, {IN_FLIGHT} in flight");
    let one = |g: Option<&'static str>| {
        move |_: usize| -> Result<Duration, String> {
            let (t, out) = timed(&mut yard_run(d, &["--rm"], g, &["/app/hello.wasm"]));
            if out.status.success() {
                Ok(t)
            } else {
                Err(format!("{}", out.status))
            }
        }
    };
    let (g_s, g50, g99) = throughput("yard run --rm, one group", n, IN_FLIGHT, one(group));
    let (u_s, u50, u99) = throughput("yard run --rm, a shim per task", n, IN_FLIGHT, one(None));
    summary(
        &format!("wasm throughput, {IN_FLIGHT} in flight"),
        &format!(
            "group {g_s:.1}/s (p50 {} p99 {}); shim per task {u_s:.1}/s (p50 {} p99 {})",
            ms(g50),
            ms(g99),
            ms(u50),
            ms(u99)
        ),
        "-",
        None,
    );
    s[0]
}

/// The bench's scratch directory (removed at the end).
fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-wasm-bench-{}", std::process::id()));
    empty_dir(&d);
    d
}

struct Part2 {
    start_us: Option<u64>,
    e2e: Stats,
    one_shim: bool,
}

fn part2(cache: &Path, extra: &str, runs: usize) -> Part2 {
    let d = Daemon::start_with(&format!(
        "{}[shim]\ndebug = true\n",
        runtime_toml(cache, extra)
    ));
    let keeper = hello_detached(&d, "bench", "keeper", 600_000);
    assert!(keeper.is_ok(), "{}", keeper.unwrap_err());
    // Two more sleepers of the group: they must land in the keeper's shim.
    for id in ["extra-1", "extra-2"] {
        hello_detached(&d, "bench", id, 600_000).unwrap();
    }
    let shims_with_3 = shims(&d).len();
    let out = run_timeout(
        d.yard().args(["rm", "--force", "extra-1", "extra-2"]),
        TIMEOUT,
    );
    assert!(out.status.success(), "yard rm: {}", text(&out.stderr));
    // Warm-ups (the shim compiles nothing more: it holds the module in memory).
    for _ in 0..3 {
        hello(yard_run(&d, &["--rm"], Some("bench"), &["/app/hello.wasm"]));
    }
    let from = d.log_text().len();
    let mut e2e = Vec::new();
    let mut max_shims = 0;
    for _ in 0..runs {
        e2e.push(hello(yard_run(
            &d,
            &["--rm"],
            Some("bench"),
            &["/app/hello.wasm"],
        )));
        max_shims = max_shims.max(shims(&d).len());
    }
    // The relay is asynchronous: wait for the last Start line.
    let mut reqs = Vec::new();
    eventually(Duration::from_secs(10), || {
        reqs = shim_requests(&d.log_text()[from..]);
        reqs.iter().filter(|(m, _)| m == "Start").count() >= runs
            && reqs.iter().filter(|(m, _)| m == "Delete").count() >= runs
    });
    let of = |name: &str| -> Vec<u64> {
        reqs.iter()
            .filter(|(m, _)| m == name)
            .map(|(_, us)| *us)
            .collect()
    };
    let (create, start, delete) = (of("Create"), of("Start"), of("Delete"));
    let e2e = Stats::of(&e2e);
    let one_shim = shims_with_3 == 1 && max_shims == 1;
    println!();
    println!(
        "2. a new task in a warm shim: `yard run --rm --annotation io.switchyard.group=bench …`"
    );
    println!(
        "   ({runs} runs after 3 warm-ups, next to a long-lived task of the group; shim \
         processes: {shims_with_3} with 3 tasks of the group, at most {max_shims} during the runs)"
    );
    us_row("shim Create request", &create);
    us_row("shim Start request", &start);
    us_row("shim Delete request", &delete);
    row("yard run --rm, end to end", &e2e);
    let start_us = median_u64(&start);
    let ok = start_us.is_some_and(|us| us <= 1000) && one_shim;
    println!(
        "  target Start in a warm shim <= 1 ms: {} (median {} us{})",
        verdict(ok),
        start_us.map_or("-".to_owned(), |u| u.to_string()),
        if one_shim {
            ""
        } else {
            "; tasks did NOT share one shim"
        }
    );
    if create.is_empty() {
        let log = d.log_text();
        let sample: Vec<&str> = log[from..]
            .lines()
            .filter(|l| l.contains("request"))
            .take(3)
            .collect();
        println!("  (no request lines parsed; log sample: {sample:?})");
    }
    idle_arrivals(&d, runs);
    let _ = run_timeout(d.yard().args(["rm", "--force", "keeper"]), TIMEOUT);
    let gone = eventually(Duration::from_secs(10), || shims(&d).is_empty());
    if !gone {
        println!("  WARNING: the bench shim is still there after removing its last task");
    }
    Part2 {
        start_us,
        e2e,
        one_shim,
    }
}

/// How long the host is left idle before each run of [`idle_arrivals`]: longer than the two
/// RCU grace periods after which the kernel's cgroup migration lock goes back to its read-fast
/// mode, shorter than a warm group shim's 3 s linger.
const IDLE_PAUSE: Duration = Duration::from_millis(250);

/// 2b. The warm path as tasks arriving now and then meet it: each run into a group's warm shim
/// that has no other task, after [`IDLE_PAUSE`] with nothing running. A worker's move into a
/// task's cgroup then waits for an RCU grace period (the first migration after a quiet
/// spell), which back-to-back runs, and runs next to a long-lived task, do not pay; a task
/// without CPU limits, as here, is placed only once it has run 25 ms (`shims/wasm/src/
/// cgroup.rs`), so a short one should not pay it either. This row shows whether it does.
fn idle_arrivals(d: &Daemon, runs: usize) {
    let group = Some("idle");
    for _ in 0..3 {
        hello(yard_run(d, &["--rm"], group, &["/app/hello.wasm"]));
    }
    let from = d.log_text().len();
    let mut e2e = Vec::new();
    for _ in 0..runs {
        // The scenario measured, not a wait for a condition.
        std::thread::sleep(IDLE_PAUSE);
        e2e.push(hello(yard_run(d, &["--rm"], group, &["/app/hello.wasm"])));
    }
    let mut reqs = Vec::new();
    eventually(Duration::from_secs(10), || {
        reqs = shim_requests(&d.log_text()[from..]);
        reqs.iter().filter(|(m, _)| m == "Delete").count() >= runs
    });
    let create: Vec<u64> = reqs
        .iter()
        .filter(|(m, _)| m == "Create")
        .map(|(_, us)| *us)
        .collect();
    let e2e = Stats::of(&e2e);
    println!();
    println!(
        "2b. a new task in a warm shim with no other task, after {} idle before each run",
        ms(IDLE_PAUSE)
    );
    us_row("shim Create request", &create);
    row("yard run --rm, end to end", &e2e);
    summary(
        &format!(
            "wasm: warm yard run --rm after {} idle (alone in its group's shim)",
            ms(IDLE_PAUSE)
        ),
        &format!(
            "{} (shim Create {} us)",
            ms(e2e.median),
            median_u64(&create).map_or("-".to_owned(), |u| u.to_string())
        ),
        "-",
        None,
    );
}

/// `yard run -d` a sleeper named `id` in `group`.
fn hello_detached(d: &Daemon, group: &str, id: &str, sleep_ms: u64) -> Result<Duration, String> {
    let sleep = sleep_ms.to_string();
    let mut c = yard_run(
        d,
        &["-d", "--name", id],
        Some(group),
        &["/app/hello.wasm", "--sleep", &sleep],
    );
    let (t, out) = timed(&mut c);
    if out.status.success() {
        Ok(t)
    } else {
        Err(format!(
            "yard run -d --name {id} ({}): {}{}",
            out.status,
            text(&out.stderr).trim(),
            text(&out.stdout).trim()
        ))
    }
}

/// RSS and PSS (KiB) of a process and its direct children (the shim and its worker).
fn with_children(pid: u32) -> (u64, u64) {
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    std::iter::once(pid)
        .chain(children)
        .map(|p| (rss_kib(p).unwrap_or(0), pss_kib(p).unwrap_or(0)))
        .fold((0, 0), |(r, s), (a, b)| (r + a, s + b))
}

struct Part3 {
    running: usize,
    per_task_kib: Option<u64>,
    clean: bool,
}

/// One idle task alone in a group's shim of daemon `d`, whose options are the defaults (a pool
/// of 1,000 slots; the density run's daemon has one slot per task, which its worker pays for
/// up front): the shim's RSS with its worker's, and alone, in KiB. The task is removed again.
fn one_idle(d: &Daemon) -> Option<(u64, u64)> {
    let id = "idle-one";
    hello_detached(d, id, id, 3_600_000).ok()?;
    let pid = d
        .ps_row(id)
        .and_then(|r| r["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok());
    let measured = pid.map(|pid| {
        std::thread::sleep(Duration::from_millis(500));
        (with_children(pid).0, rss_kib(pid).unwrap_or(0))
    });
    let _ = d.yard().args(["rm", "--force", id]).output();
    measured
}

/// `idle`: [`one_idle`] on a daemon with the default pool, for the target's row.
fn part3(d: &Daemon, n: usize, idle: Option<(u64, u64)>) -> Part3 {
    let ids: Vec<String> = (0..n).map(|i| format!("dense-{i:05}")).collect();
    hello_detached(d, "dense", &ids[0], 3_600_000).unwrap();
    let pid = eventually(Duration::from_secs(10), || shims(d).len() == 1)
        .then(|| shims(d)[0])
        .expect("one shim for the dense group");
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, pss1) = (rss_kib(pid).unwrap_or(0), pss_kib(pid).unwrap_or(0));
    let maps1 = smaps(pid);

    // Started in stages, the shim and its worker measured at each: the memory curve.
    let (g_rss1, g_pss1) = with_children(pid);
    let mut curve = vec![(1, rss1, pss1, g_rss1, g_pss1)];
    let mut wall = Duration::ZERO;
    let mut times = Vec::new();
    let mut failure = None;
    let mut started = 1;
    for stage in [100, 1000, 10_000, n] {
        let stage = stage.min(n);
        if stage <= started || failure.is_some() {
            continue;
        }
        let from = started;
        let (w, t, f) = parallel(stage - from, THREADS, |i| {
            hello_detached(d, "dense", &ids[from + i], 3_600_000)
        });
        wall += w;
        started += t.len();
        times.extend(t);
        failure = f.map(|(i, e)| (from + i - 1, e));
        std::thread::sleep(Duration::from_millis(1000));
        let (g_rss, g_pss) = with_children(pid);
        curve.push((
            started,
            rss_kib(pid).unwrap_or(0),
            pss_kib(pid).unwrap_or(0),
            g_rss,
            g_pss,
        ));
    }
    let shim_pids = shims(d);
    let (listed, running) = ps_count(d, "dense-");
    let alive = rss_kib(pid).is_some();
    let (rss_n, pss_n) = (rss_kib(pid).unwrap_or(0), pss_kib(pid).unwrap_or(0));
    let maps_n = smaps(pid);

    println!();
    println!(
        "3. density: idle tasks (`/app/hello.wasm --sleep 3600000`) in one shim \
         (io.switchyard.group=dense), started by {THREADS} parallel `yard run -d`"
    );
    println!(
        "  started {started} of {n}: the first alone, then {} more in {} wall ({:.0} tasks/s)",
        started - 1,
        ms(wall),
        (started - 1) as f64 / wall.as_secs_f64().max(1e-9)
    );
    if !times.is_empty() {
        row("yard run -d (under 4-way load)", &Stats::of(&times));
    }
    if let Some((i, e)) = &failure {
        println!("  FAILED at task #{} ({}): {e}", i + 2, ids[i + 1]);
    }
    println!(
        "  yard ps: {listed} dense containers, {running} running; shim processes for the group: \
         {} (pid {pid}{})",
        shim_pids.len(),
        if alive { "" } else { ", GONE" }
    );
    println!(
        "  shim with 1 task:    RSS {:>10}   PSS {:>10}",
        mib(rss1),
        mib(pss1)
    );
    println!(
        "  shim with {running:>4} tasks: RSS {:>10}   PSS {:>10}",
        mib(rss_n),
        mib(pss_n)
    );
    let per_task =
        (running > 1 && alive).then(|| rss_n.saturating_sub(rss1) / (running as u64 - 1));
    if let Some(per) = per_task {
        let pss_per = pss_n.saturating_sub(pss1) / (running as u64 - 1);
        println!(
            "  per task (delta from 1 to {running}, / {}): RSS {:.0} KiB   PSS {:.0} KiB;   \
             total / tasks: RSS {:.0} KiB",
            running - 1,
            per as f64,
            pss_per as f64,
            rss_n as f64 / running as f64
        );
    }
    println!("  memory curve (shim alone; shim + its worker, where the instances live):");
    for (tasks, rss, pss, g_rss, g_pss) in &curve {
        println!(
            "    {tasks:>6} tasks: shim RSS {:>10} PSS {:>10}   shim + worker RSS {:>10} PSS {:>10}",
            mib(*rss),
            mib(*pss),
            mib(*g_rss),
            mib(*g_pss)
        );
    }
    let (last_tasks, _, _, last_g_rss, _) = *curve.last().unwrap();
    let per_task_g =
        (last_tasks > 1).then(|| last_g_rss.saturating_sub(g_rss1) / (last_tasks as u64 - 1));
    let (one, one_shim) = idle.unwrap_or((g_rss1, rss1));
    println!(
        "  one idle task with the default pool of 1,000 slots: shim + worker RSS {}, shim {}",
        idle.map_or("-".to_owned(), |(g, _)| mib(g)),
        idle.map_or("-".to_owned(), |(_, s)| mib(s))
    );
    print_text_order("wasm");
    summary(
        "wasm group shim, one idle task (shim + worker)",
        &format!(
            "RSS {} (shim alone {}; {}with the density run's pool of {n} slots: {})",
            mib(one),
            mib(one_shim),
            if idle.is_some() { "default pool; " } else { "" },
            mib(g_rss1)
        ),
        "RSS <= 10 MiB",
        Some(one <= 10 * 1024),
    );
    summary(
        &format!("wasm group shim, per added idle task up to {last_tasks}"),
        &per_task_g.map_or("-".to_owned(), |k| format!("{k} KiB RSS (shim + worker)")),
        "<= 64 KiB",
        per_task_g.map(|k| k <= 64),
    );
    if alive {
        memory_breakdown(pid, &maps1, &maps_n, running.max(2));
    }
    let ok = running >= 1000 && per_task.is_some_and(|k| k <= 2048);
    println!(
        "  target >= 1000 concurrent tasks at <= 2 MiB each: {} ({running} running, {} per task)",
        verdict(ok),
        per_task.map_or("-".to_owned(), |k| format!("{k} KiB"))
    );

    // Remove them all, a few ids per `yard rm --force`, on parallel threads.
    let batches: Vec<&[String]> = ids[..started].chunks(10).collect();
    let (rm_wall, _, rm_fail) = parallel(batches.len(), THREADS, |b| {
        let (t, out) = timed(d.yard().args(["rm", "--force"]).args(batches[b]));
        if out.status.success() {
            Ok(t)
        } else {
            Err(format!("yard rm --force: {}", text(&out.stderr).trim()))
        }
    });
    let no_shim = eventually(Duration::from_secs(30), || any_shims(d) == 0);
    let (left, _) = ps_count(d, "dense-");
    let clean = rm_fail.is_none() && no_shim && left == 0;
    println!(
        "  removed {started} with `yard rm --force` (10 ids per call, {THREADS} threads) in {}; \
         containers left {left}, shim processes left {}: {}",
        ms(rm_wall),
        any_shims(d),
        if clean { "clean" } else { "NOT clean" }
    );
    if let Some((_, e)) = rm_fail {
        println!("  rm failure: {e}");
    }
    Part3 {
        running,
        per_task_kib: per_task,
        clean,
    }
}

fn main() {
    if !require(
        is_root(),
        "needs root (the shim mounts and creates cgroups)",
    ) {
        return;
    }
    check_binaries();
    let runs = env_usize("RUNS", 20).max(1);
    let density = env_usize("DENSITY", 10_000).max(2);
    let wasmtime = wasmtime_cli();
    if wasmtime.is_none() {
        require(false, "the wasmtime CLI could not be found or installed");
    }
    let rootfs = wasm_rootfs();
    let module = rootfs.join("app/hello.wasm");
    let version = wasmtime.as_ref().map_or("(missing)".to_owned(), |w| {
        text(&run_timeout(Command::new(w).arg("--version"), TIMEOUT).stdout)
            .trim()
            .to_owned()
    });
    println!();
    println!(
        "Wasm shim: switchyardd + {SHIM} ({}) vs the wasmtime CLI ({version}, {})",
        bin(SHIM).display(),
        wasmtime
            .as_ref()
            .map_or("-".to_owned(), |w| w.display().to_string())
    );
    println!(
        "hello.wasm: {} KiB wasm32-wasip1 core module; {} cores; RUNS={runs} DENSITY={density}",
        std::fs::metadata(&module).map_or(0, |m| m.len() / 1024),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let work = work_dir();
    let cache = work.join("shim-cache");
    empty_dir(&cache);
    let mut extra = String::new();
    if let Ok(options) = std::env::var("WASM_OPTIONS") {
        println!("extra [runtimes.wasm.options]: {options}");
        extra.push_str(&options.replace(';', "\n"));
        extra.push('\n');
    }
    let t0 = Instant::now();
    let d = Daemon::start_with(&runtime_toml(&cache, &extra));
    let p1 = part1(&d, &work, &cache, wasmtime.as_deref(), runs);
    let warm = part1b(&d, &work, wasmtime.as_deref(), runs);
    let p2 = part2(&cache, &extra, runs);
    let idle = one_idle(&d);
    drop(d);
    // The density run gets a daemon of its own: more pool slots than the default 1000 make
    // every new shim's worker reserve them, which parts 1 and 2 must not pay.
    let slots = if density > 1000 {
        format!("max_instances = {density}\n")
    } else {
        String::new()
    };
    let d = Daemon::start_with(&runtime_toml(&cache, &format!("{extra}{slots}")));
    let p3 = part3(&d, density, idle);
    drop(d);

    println!();
    println!("targets");
    println!(
        "  warm task <= 10 ms:                              {:<8} (group's warm shim, median {}; \
         new shim, warm cache {}; cold {})",
        verdict(warm.median <= Duration::from_millis(10)),
        ms(warm.median),
        ms(p1.yard_warm.median),
        ms(p1.yard_cold.median)
    );
    println!(
        "  Start in a warm shim <= 1 ms:                    {:<8} (median {} us; end to end {}{})",
        verdict(p2.one_shim && p2.start_us.is_some_and(|u| u <= 1000)),
        p2.start_us.map_or("-".to_owned(), |u| u.to_string()),
        ms(p2.e2e.median),
        if p2.one_shim { "" } else { "; not one shim" }
    );
    println!(
        "  >= 1000 concurrent tasks at <= 2 MiB each:       {:<8} ({} running, {} per task)",
        verdict(p3.running >= 1000 && p3.per_task_kib.is_some_and(|k| k <= 2048)),
        p3.running,
        p3.per_task_kib
            .map_or("-".to_owned(), |k| format!("{k} KiB RSS"))
    );
    println!(
        "  all removed, no shim left:                       {}",
        if p3.clean { "yes" } else { "NO" }
    );
    println!();
    println!("notes");
    println!(
        "  - runwasi's published numbers (NOT measured here): one shim ~16 MB plus a zygote \
         ~4 MB per container; `ctr run --rm` of a hello world 83-144 ms."
    );
    println!(
        "  - cold = the shim's cache_dir emptied before each run (and a new shim process per \
         task, so no in-memory module either); wasmtime cold = `-C cache=n`, warm = `-C cache=y` \
         (default cache dir) after priming, or `wasmtime compile` + `run --allow-precompiled`."
    );
    println!(
        "  - part 2 runs with `[shim] debug = true` (request timing lines in the log); the \
         request times are measured inside the shim, the end to end time by this process."
    );
    println!("  - whole bench: {}", ms(t0.elapsed()));
    let _ = std::fs::remove_dir_all(&work);
}
