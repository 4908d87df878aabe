//! Issue 16's soak and leak accounting: many short `yard run --rm` through one switchyardd, then
//! everything the daemon and its shims hold must be back where it started.
//!
//! CI mode (the default): 2,000 runs split between `native` and `wasm`, plus 100 on `vm`, mixed
//! and 4 at a time. `SWITCHYARD_SOAK_LONG=1` (outside CI) makes it 10,000 runs plus 500 on
//! `vm`; `SWITCHYARD_SOAK_RUNS` and `SWITCHYARD_SOAK_VM_RUNS` set the counts directly.
//!
//! Half of the native and wasm runs join a long-lived group shim (`io.switchyard.group`, kept
//! alive by a sleeping "sentinel" task of each runtime), so a shim process that serves
//! thousands of tasks in turn is measured as well as thousands of shims that come and go. Every
//! run prints a token of its own (its container id) and must exit 0 with exactly that output.
//!
//! After a warm-up of a few runs of each kind (lazy caches: the compiled Wasm module, the vm
//! runtime's rootfs image, the daemon's connections), a snapshot of the scope is taken
//! (`switchyard_tests::accounting`): the daemon's fds, threads and RSS; the shims' processes,
//! fds and threads; QEMU and task processes; zombies; mounts; cgroups; network namespaces;
//! sockets; the runtime directories' files. After the soak the counts must come back (the
//! daemon's RSS within 16 MiB of the snapshot); the before/after table is printed either way.
//! Then the sentinels are removed and everything the tasks used must be gone.
//!
//! Wall time on a 2-core machine (debug binaries, the vm runtime on QEMU TCG): about 4.5 minutes
//! in CI mode, most of it the runs themselves (about 8 a second).
//!
//! Needs root; the vm part needs QEMU and the guest (`scripts/guest`), the wasm part the Wasm
//! fixtures' targets. Skips with a printed reason otherwise (fails under
//! `SWITCHYARD_REQUIRE_ALL=1`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchyard_tests::accounting::{Bounds, Scope, Snapshot, settle};
use switchyard_tests::wasm::wasm_rootfs;
use switchyard_tests::*;

const CONCURRENCY: usize = 4;
/// How far the daemon's RSS may grow over the soak, after the warm-up.
const RSS_SLACK_MIB: u64 = 16;
/// How long the scope may take to settle after the last run (shims exiting, idle threads
/// ending, cgroups removed).
const SETTLE: Duration = Duration::from_secs(60);
const WASM_HELLO: &str = "/app/hello.wasm";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rt {
    Native,
    Wasm,
    Vm,
}

impl Rt {
    fn name(self) -> &'static str {
        match self {
            Rt::Native => "native",
            Rt::Wasm => "wasm",
            Rt::Vm => "vm",
        }
    }
}

/// One `yard run --rm`: its runtime, its shim group (if it joins one) and its id, which is
/// also the token it prints.
struct Job {
    rt: Rt,
    group: Option<String>,
    id: String,
}

/// The command, and what it must print.
fn program(rt: Rt, token: &str) -> (Vec<String>, String) {
    match rt {
        Rt::Native | Rt::Vm => (vec!["/bin/echo".into(), token.into()], format!("{token}\n")),
        Rt::Wasm => (
            vec![WASM_HELLO.into(), token.into()],
            format!("hello from wasm\narg[0]={WASM_HELLO}\narg[1]={token}\n"),
        ),
    }
}

/// The Wasm program's output without its `env K=V` lines (yard adds a default PATH).
fn without_env(out: &str) -> String {
    out.split_inclusive('\n')
        .filter(|l| !l.starts_with("env "))
        .collect()
}

fn rootfs(rt: Rt) -> &'static Path {
    match rt {
        Rt::Wasm => wasm_rootfs(),
        Rt::Native | Rt::Vm => busybox_rootfs(),
    }
}

/// `yard run --rm` of one job; `Err` describes what went wrong.
fn run(d: &Daemon, job: &Job) -> Result<(), String> {
    let mut extra = vec!["--runtime", job.rt.name(), "--rm", "--name", &job.id];
    let annotation = job
        .group
        .as_ref()
        .map(|g| format!("io.switchyard.group={g}"));
    if let Some(a) = &annotation {
        extra.extend(["--annotation", a]);
    }
    let (cmd, want) = program(job.rt, &job.id);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = d.yard_run(rootfs(job.rt), &extra, &cmd);
    let mut got = text(&out.stdout);
    if job.rt == Rt::Wasm {
        got = without_env(&got);
    }
    if out.status.code() == Some(0) && got == want {
        Ok(())
    } else {
        Err(format!(
            "{} run {} (group {:?}): want exit 0 and {want:?}, got {got:?}: {}",
            job.rt.name(),
            job.id,
            job.group,
            show(&out)
        ))
    }
}

/// Runs `jobs` `CONCURRENCY` at a time; stops at the first failure and returns the failures.
fn run_all(d: &Daemon, scope: &Scope, jobs: &[Job], label: &str) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    let report_every = (jobs.len() / 8).max(1);
    std::thread::scope(|s| {
        for _ in 0..CONCURRENCY {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    scope.note(&job.id);
                    if let Err(e) = run(d, job) {
                        failures.lock().unwrap().push(e);
                        stop.store(true, Ordering::SeqCst);
                    }
                    let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if n.is_multiple_of(report_every) {
                        eprintln!(
                            "{label}: {n}/{} runs in {:.1?}",
                            jobs.len(),
                            started.elapsed()
                        );
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

/// `count` jobs alternating native and wasm (every other pair in a group), with `vm` runs
/// spread evenly among them.
fn jobs(prefix: &str, tag: &str, count: usize, vm: usize, groups: &[String; 2]) -> Vec<Job> {
    let mut out = Vec::with_capacity(count + vm);
    let every = count.checked_div(vm).unwrap_or(usize::MAX).max(1);
    let mut vms = 0;
    for i in 0..count {
        if vms < vm && i % every == 0 {
            out.push(Job {
                rt: Rt::Vm,
                group: None,
                id: format!("{prefix}-{tag}v{vms}"),
            });
            vms += 1;
        }
        let (rt, g) = if i.is_multiple_of(2) {
            (Rt::Native, &groups[0])
        } else {
            (Rt::Wasm, &groups[1])
        };
        let grouped = (i / 2) % 2 == 1;
        out.push(Job {
            rt,
            group: grouped.then(|| g.clone()),
            id: format!("{prefix}-{tag}{i}"),
        });
    }
    while vms < vm {
        out.push(Job {
            rt: Rt::Vm,
            group: None,
            id: format!("{prefix}-{tag}v{vms}"),
        });
        vms += 1;
    }
    out
}

/// A daemon whose wasm and vm runtimes keep their caches in its own directory.
fn daemon() -> Daemon {
    Daemon::start_in(|dir| {
        format!(
            "[runtimes.wasm]\nruntime_type = \"io.containerd.yard-wasm.v1\"\n[runtimes.wasm.options]\ncache_dir = \"{}\"\n\
             [runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n[runtimes.vm.options]\nkernel = \"{}\"\ninitrd = \"{}\"\ncache_dir = \"{}\"\n",
            dir.join("wasm-cache").display(),
            guest_dir().join("vmlinux").display(),
            guest_dir().join("initrd.img").display(),
            dir.join("vm-cache").display()
        )
    })
}

/// Starts a sentinel: a detached task that sleeps in `group`, keeping the group's shim alive.
fn sentinel(d: &Daemon, scope: &Scope, rt: Rt, id: &str, group: &str) {
    scope.note(id);
    let annotation = format!("io.switchyard.group={group}");
    let cmd: &[&str] = match rt {
        Rt::Wasm => &[WASM_HELLO, "--sleep", "3600000"],
        Rt::Native | Rt::Vm => &["/bin/sleep", "100000"],
    };
    let out = d.yard_run(
        rootfs(rt),
        &[
            "--runtime",
            rt.name(),
            "-d",
            "--name",
            id,
            "--annotation",
            &annotation,
        ],
        cmd,
    );
    assert!(out.status.success(), "sentinel {id}: {}", show(&out));
    assert!(
        eventually(Duration::from_secs(30), || d.status(id).as_deref()
            == Some("running")),
        "sentinel {id} is not running: {:?}",
        d.ps_row(id)
    );
}

/// Waits until only the sentinels' shims are left (the warm-up's have exited).
fn quiet(d: &Daemon, scope: &Scope, pid: u32) -> Snapshot {
    let servers = |shim: &str| d.shim_servers(shim).len();
    let settled = eventually(SETTLE, || {
        servers("containerd-shim-yard-native-v1") == 1
            && servers("containerd-shim-yard-wasm-v1") == 1
            && servers("containerd-shim-yard-vm-v1") == 0
            && scope.snapshot(pid).qemus.is_empty()
    });
    let snap = scope.snapshot(pid);
    assert!(settled, "the warm-up's shims did not exit: {snap:#?}");
    snap
}

#[test]
fn soak_runs_leave_nothing_behind() {
    if !require_root_and(&[]) {
        return;
    }
    let long = std::env::var_os("SWITCHYARD_SOAK_LONG").is_some_and(|v| v == "1");
    let runs = env_usize("SWITCHYARD_SOAK_RUNS", if long { 10_000 } else { 2_000 });
    let vm_wanted = env_usize("SWITCHYARD_SOAK_VM_RUNS", if long { 500 } else { 100 });
    let vm_runs = if vm_wanted > 0 && require_guest() {
        vm_wanted
    } else {
        0
    };
    // Build the Wasm fixtures before anything is timed.
    wasm_rootfs();
    let wall = Instant::now();

    let d = daemon();
    let pid = d.pid().unwrap();
    let prefix = unique_id("soak");
    let scope = Scope::new(&d, &prefix);
    let pristine = scope.snapshot(pid);

    let groups = [format!("{prefix}-gn"), format!("{prefix}-gw")];
    for g in &groups {
        scope.note(g);
    }
    sentinel(&d, &scope, Rt::Native, &format!("{prefix}-sn"), &groups[0]);
    sentinel(&d, &scope, Rt::Wasm, &format!("{prefix}-sw"), &groups[1]);

    // Warm-up: a few runs of each kind (grouped and not), then the snapshot.
    let warmup = jobs(&prefix, "w", 12, usize::from(vm_runs > 0) * 3, &groups);
    let failures = run_all(&d, &scope, &warmup, "warm-up");
    assert!(failures.is_empty(), "warm-up: {failures:#?}");
    let before = quiet(&d, &scope, pid);

    let soak = jobs(&prefix, "r", runs, vm_runs, &groups);
    let started = Instant::now();
    let failures = run_all(&d, &scope, &soak, "soak");
    let soak_time = started.elapsed();
    eprintln!(
        "soak: {} runs ({runs} native/wasm, {vm_runs} vm) in {soak_time:.1?}, {:.1} runs/s",
        soak.len(),
        soak.len() as f64 / soak_time.as_secs_f64()
    );

    // The table is printed whatever happened, a failed run included.
    let settling = Instant::now();
    let after = settle(&scope, pid, &before, &Bounds::exact(RSS_SLACK_MIB), SETTLE);
    eprintln!(
        "soak: before (after warm-up, sentinels running) and after {} runs (settled in {:.1?}):\n{}",
        soak.len(),
        settling.elapsed(),
        after.table()
    );
    assert!(
        failures.is_empty(),
        "a run failed (the first stops the soak): {failures:#?}"
    );
    let leaks = after.failures();

    // The sentinels go; then nothing of any task may be left.
    for id in [format!("{prefix}-sn"), format!("{prefix}-sw")] {
        d.rm_force(&id);
    }
    let empty = settle(&scope, pid, &pristine, &Bounds::host_only(), SETTLE);
    eprintln!(
        "soak: before the first task and after the last was removed:\n{}",
        empty.table()
    );
    assert!(
        leaks.is_empty(),
        "left after {} runs:\n{}",
        soak.len(),
        leaks.join("\n")
    );
    assert!(
        empty.is_ok(),
        "left after every task was removed:\n{}",
        empty.failures().join("\n")
    );
    assert_eq!(d.ps(), Vec::<serde_json::Value>::new());
    eprintln!("soak: wall time {:.1?}", wall.elapsed());
}
