//! Issue 16's chaos test: under a steady load of runs, `kill -9` random shims, the daemon
//! (restarted on the same directories) and, on the vm runtime, QEMU; afterwards every task has
//! ended with an exit event or is still running and reachable, the daemon's metadata agrees
//! with what the shims report, `yard rm --force` removes everything, and nothing is leaked.
//!
//! The load: three loops of `yard run --rm` (native, wasm, and both in turn), each run printing
//! a token of its own, and a pool of detached long-running tasks on native, wasm (some of both
//! sharing a group shim) and vm. Runs failing while something is being killed are expected
//! (they are counted and a few printed); a run that exits 0 must have printed its token. The
//! chaos: `SWITCHYARD_CHAOS_ROUNDS` rounds (default 3), each killing, in an order drawn from a
//! seeded RNG, a random shim server, the daemon and a random QEMU. The seed is printed;
//! `SWITCHYARD_CHAOS_SEED=N` replays it.
//!
//! After each kill, with a deadline and never a fixed sleep: the killed process is gone; the
//! pool's tasks that it served have their `/tasks/exit` event (`yard events`, re-subscribed
//! after each daemon restart) and no longer run; after a daemon restart the pool's tasks are
//! running again and reachable (`yard exec` on native and vm, the shim's own State on wasm,
//! where Exec is refused); the daemon answers; and both loads make progress again. The pool is
//! topped up after each kill.
//!
//! At the end: every task `yard ps` lists is running and reachable, created, or stopped (never
//! unknown); each one's status and pid are what its shim answers to State (asked directly over
//! ttrpc on the socket its bundle names); every shim server and every bundle belongs to a
//! listed task; `ctr task ls` agrees; `yard rm --force` removes every container (a running
//! task's exit event comes); and the accounting of `switchyard_tests::accounting` is back to
//! where it was before the first task (the before/after table is printed always).
//!
//! Every command runs with a deadline (the kit's `run_timeout`): a daemon or shim that hangs
//! fails the test rather than stalling it. Wall time on a 2-core machine: about a minute.
//!
//! Needs root; the vm part needs QEMU and the guest (`scripts/guest`). Skips with a printed
//! reason otherwise (fails under `SWITCHYARD_REQUIRE_ALL=1`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_tests::accounting::{
    Bounds, Scope, bundle_address, settle, shim_state, socket_flag,
};
use switchyard_tests::wasm::wasm_rootfs;
use switchyard_tests::*;

const WASM_HELLO: &str = "/app/hello.wasm";
/// How long the consequences of a kill may take (a dead shim noticed and cleaned up, a VM
/// booted for the pool, a restarted daemon's restore).
const SETTLE: Duration = Duration::from_secs(60);
/// How long `yard ps` may take: the daemon must never hang.
const ANSWER: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The seeded RNG (splitmix64): the same seed, the same chaos.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn seed() -> u64 {
    std::env::var("SWITCHYARD_CHAOS_SEED")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("SWITCHYARD_CHAOS_SEED must be a number")
        })
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_secs() ^ u64::from(t.subsec_nanos()) ^ u64::from(std::process::id())
        })
}

// ---------------------------------------------------------------------------------------------
// Runtimes and the commands they run

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

    fn from_name(name: &str) -> Option<Rt> {
        [Rt::Native, Rt::Wasm, Rt::Vm]
            .into_iter()
            .find(|r| r.name() == name)
    }

    fn rootfs(self) -> &'static Path {
        match self {
            Rt::Wasm => wasm_rootfs(),
            Rt::Native | Rt::Vm => busybox_rootfs(),
        }
    }

    /// A command printing `token`, and its exact output (the Wasm program's `env` lines
    /// removed, see [`without_env`]).
    fn echo(self, token: &str) -> (Vec<String>, String) {
        match self {
            Rt::Native | Rt::Vm => (vec!["/bin/echo".into(), token.into()], format!("{token}\n")),
            Rt::Wasm => (
                vec![WASM_HELLO.into(), token.into()],
                format!("hello from wasm\narg[0]={WASM_HELLO}\narg[1]={token}\n"),
            ),
        }
    }

    /// A command that runs until killed.
    fn sleeper(self) -> Vec<String> {
        let words: &[&str] = match self {
            Rt::Wasm => &[WASM_HELLO, "--sleep", "3600000"],
            Rt::Native | Rt::Vm => &["/bin/sleep", "100000"],
        };
        words.iter().map(|w| (*w).to_owned()).collect()
    }
}

fn without_env(out: &str) -> String {
    out.split_inclusive('\n')
        .filter(|l| !l.starts_with("env "))
        .collect()
}

/// `yard` pointed at the daemon's socket (which a restart keeps).
fn yard(socket: &Path) -> Command {
    let mut c = Command::new(bin("yard"));
    c.env("SWITCHYARD_ADDRESS", socket);
    c
}

/// `yard run` of `cmd` on `rt`, with `extra` flags, within the kit's client deadline.
fn yard_run(socket: &Path, rt: Rt, extra: &[&str], cmd: &[String]) -> Output {
    let mut c = yard(socket);
    c.args(["run", "--runtime", rt.name()])
        .args(extra)
        .arg("--rootfs")
        .arg(rt.rootfs())
        .arg("--")
        .args(cmd);
    run_timeout(&mut c, CLIENT_DEADLINE)
}

// ---------------------------------------------------------------------------------------------
// The load

#[derive(Default)]
struct Load {
    stop: AtomicBool,
    /// Successful runs: native, wasm.
    ok: [AtomicUsize; 2],
    failed: [AtomicUsize; 2],
    /// Runs that exited 0 without printing their token: never acceptable.
    wrong: Mutex<Vec<String>>,
    /// The first few failures, for the report.
    sample: Mutex<Vec<String>>,
}

fn slot(rt: Rt) -> usize {
    usize::from(rt == Rt::Wasm)
}

/// One load loop: `yard run --rm` of `rts` in turn until told to stop.
fn load_loop(
    socket: PathBuf,
    scope: Arc<Scope>,
    load: Arc<Load>,
    name: usize,
    rts: Vec<Rt>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0usize;
        while !load.stop.load(Ordering::SeqCst) {
            let rt = rts[n % rts.len()];
            let id = format!("{}-l{name}-{n}", scope.prefix);
            n += 1;
            scope.note(&id);
            let (cmd, want) = rt.echo(&id);
            let out = yard_run(&socket, rt, &["--rm", "--name", &id], &cmd);
            let mut got = text(&out.stdout);
            if rt == Rt::Wasm {
                got = without_env(&got);
            }
            if out.status.success() {
                if got == want {
                    load.ok[slot(rt)].fetch_add(1, Ordering::SeqCst);
                } else {
                    load.wrong.lock().unwrap().push(format!(
                        "{} {id}: exit 0 but stdout {got:?} (want {want:?}): {}",
                        rt.name(),
                        show(&out)
                    ));
                }
            } else {
                load.failed[slot(rt)].fetch_add(1, Ordering::SeqCst);
                let mut sample = load.sample.lock().unwrap();
                if sample.len() < 8 {
                    sample.push(format!(
                        "{} {id}: {}: {}",
                        rt.name(),
                        out.status,
                        text(&out.stderr).trim()
                    ));
                }
                drop(sample);
                // While the daemon is down, wait for it rather than spin.
                eventually(SETTLE, || {
                    std::os::unix::net::UnixStream::connect(&socket).is_ok()
                });
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The pool of long-running tasks

struct Tracked {
    id: String,
    rt: Rt,
    /// Running, as far as the test knows: nothing it did has ended it.
    alive: bool,
}

struct Chaos {
    d: Daemon,
    scope: Arc<Scope>,
    /// Event collectors, one per daemon incarnation (a stopped one keeps what it saw).
    events: Vec<Events>,
    pool: Vec<Tracked>,
    next: usize,
    vm: bool,
    rng: Rng,
}

impl Chaos {
    fn ps(&self) -> Vec<Value> {
        let out = run_timeout(self.d.yard().args(["ps", "--json"]), ANSWER);
        assert!(out.status.success(), "yard ps: {}", show(&out));
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Array(rows)) => rows,
            other => panic!("yard ps --json: {other:?}: {}", show(&out)),
        }
    }

    fn status(&self, id: &str) -> Option<String> {
        self.ps()
            .into_iter()
            .find(|r| r["id"] == id)
            .and_then(|r| r["status"].as_str().map(str::to_owned))
    }

    fn exit_seen(&self, id: &str) -> bool {
        self.events.iter().any(|e| {
            e.find(|v| v["topic"] == "/tasks/exit" && v["event"]["container_id"] == id)
                .is_some()
        })
    }

    /// Starts a detached long-running task on `rt` (every other one in the runtime's group).
    fn spawn(&mut self, rt: Rt) {
        let id = format!("{}-p{}", self.scope.prefix, self.next);
        let group = format!("{}-g{}", self.scope.prefix, rt.name());
        let grouped = rt != Rt::Vm && self.next.is_multiple_of(2);
        self.next += 1;
        self.scope.note(&id);
        self.scope.note(&group);
        let annotation = format!("io.switchyard.group={group}");
        let mut extra = vec!["-d", "--name", &id];
        if grouped {
            extra.extend(["--annotation", &annotation]);
        }
        let out = yard_run(&self.d.socket, rt, &extra, &rt.sleeper());
        assert!(
            out.status.success(),
            "starting {} task {id} for the pool: {}",
            rt.name(),
            show(&out)
        );
        self.pool.push(Tracked {
            id,
            rt,
            alive: true,
        });
    }

    /// Keeps `want` live tasks of each runtime in the pool.
    fn top_up(&mut self) {
        let want = [
            (Rt::Native, 2),
            (Rt::Wasm, 2),
            (Rt::Vm, usize::from(self.vm)),
        ];
        for (rt, n) in want {
            while self.pool.iter().filter(|t| t.alive && t.rt == rt).count() < n {
                self.spawn(rt);
            }
        }
        let ids: Vec<String> = self
            .pool
            .iter()
            .filter(|t| t.alive)
            .map(|t| t.id.clone())
            .collect();
        for id in ids {
            self.reachable(&id);
        }
    }

    /// The task is running (`yard ps`) and answers: an exec prints its token (native, vm),
    /// or its shim says it runs (wasm, which refuses Exec).
    fn reachable(&self, id: &str) {
        let running = eventually(SETTLE, || self.status(id).as_deref() == Some("running"));
        assert!(
            running,
            "{id} should be running: {:?}",
            self.ps().into_iter().find(|r| r["id"] == id)
        );
        let row = self.ps().into_iter().find(|r| r["id"] == id).unwrap();
        let rt = Rt::from_name(row["runtime"].as_str().unwrap_or_default());
        match rt {
            Some(Rt::Native | Rt::Vm) => {
                let token = unique_id("exec");
                let out = run_timeout(
                    self.d.yard().args(["exec", id, "--", "/bin/echo", &token]),
                    CLIENT_DEADLINE,
                );
                assert!(
                    out.status.success() && text(&out.stdout) == format!("{token}\n"),
                    "yard exec in {id}: {}",
                    show(&out)
                );
            }
            _ => {
                let address = bundle_address(&self.d, "default", id)
                    .unwrap_or_else(|| panic!("{id} has no shim address in its bundle"));
                let st = shim_state(&address, id, ANSWER)
                    .unwrap_or_else(|e| panic!("{id}'s shim does not answer: {e}"));
                assert_eq!(st.status, "running", "{id}'s shim: {st:?}");
            }
        }
    }

    /// Waits for the exit of pool task `id` (its event, and `yard ps` no longer running it).
    fn ended(&mut self, id: &str, why: &str) {
        let ok = eventually(SETTLE, || {
            self.exit_seen(id) && self.status(id).as_deref() != Some("running")
        });
        assert!(
            ok,
            "{id} did not end with an exit event after {why} (exit event seen: {}; yard ps: {:?})",
            self.exit_seen(id),
            self.ps().into_iter().find(|r| r["id"] == id)
        );
        if let Some(t) = self.pool.iter_mut().find(|t| t.id == id) {
            t.alive = false;
        }
    }

    fn kill_shim(&mut self) -> String {
        // A load run's shim may exit between the choice and the kill: choose again.
        let mut chosen = None;
        for _ in 0..5 {
            let shims = self
                .d
                .shim_processes("containerd-shim-yard-")
                .into_iter()
                .filter(|(_, cmd)| cmd.contains(" -socket "))
                .collect::<Vec<_>>();
            if shims.is_empty() {
                return "no shim to kill".to_owned();
            }
            let (pid, cmd) = shims[self.rng.below(shims.len())].clone();
            let socket = socket_flag(&cmd).unwrap_or_default();
            let served: Vec<String> = self
                .pool
                .iter()
                .filter(|t| t.alive)
                .filter(|t| bundle_address(&self.d, "default", &t.id).as_deref() == Some(&socket))
                .map(|t| t.id.clone())
                .collect();
            if kill_exact(pid, &cmd) {
                chosen = Some((pid, cmd, served));
                break;
            }
        }
        let Some((pid, cmd, served)) = chosen else {
            return "every shim chosen exited before the kill".to_owned();
        };
        assert!(
            eventually(SETTLE, || !alive(pid)),
            "shim {pid} outlived kill -9"
        );
        for id in &served {
            self.ended(id, &format!("its shim {pid} was killed"));
            assert!(
                eventually(SETTLE, || qemus(id).is_empty()),
                "QEMU of {id} outlived its shim: {:?}",
                qemus(id)
            );
        }
        let binary = cmd.split(' ').next().unwrap_or_default();
        format!(
            "killed shim {pid} ({}) serving {served:?}",
            binary.rsplit('/').next().unwrap_or(binary)
        )
    }

    fn kill_daemon(&mut self) -> String {
        let old = self.d.pid().unwrap();
        for e in &mut self.events {
            e.stop();
        }
        let t = Instant::now();
        self.d.restart();
        let up = t.elapsed();
        // The daemon must answer, and a new subscription see its events.
        self.ps();
        self.events.push(Events::watch_all(&self.d));
        let alive: Vec<String> = self
            .pool
            .iter()
            .filter(|t| t.alive)
            .map(|t| t.id.clone())
            .collect();
        for id in &alive {
            self.reachable(id);
        }
        format!(
            "killed the daemon {old}, restarted as {} (listening after {up:.1?}); {} pool tasks running and reachable",
            self.d.pid().unwrap(),
            alive.len()
        )
    }

    fn kill_qemu(&mut self) -> String {
        let vms: Vec<(String, u32, String)> = self
            .pool
            .iter()
            .filter(|t| t.alive && t.rt == Rt::Vm)
            .flat_map(|t| {
                qemus(&t.id)
                    .into_iter()
                    .map(|(pid, cmd)| (t.id.clone(), pid, cmd))
            })
            .collect();
        if vms.is_empty() {
            return "no QEMU to kill".to_owned();
        }
        let (id, pid, cmd) = vms[self.rng.below(vms.len())].clone();
        if !kill_exact(pid, &cmd) {
            return format!("QEMU {pid} exited before the kill");
        }
        assert!(
            eventually(SETTLE, || !alive(pid)),
            "QEMU {pid} outlived kill -9"
        );
        self.ended(&id, &format!("its QEMU {pid} was killed"));
        format!("killed QEMU {pid} of {id}")
    }
}

/// QEMU processes whose command line names `id` (a sandbox's first container).
fn qemus(id: &str) -> Vec<(u32, String)> {
    processes_matching(&["qemu-system", id])
}

/// The process's start time (`/proc/PID/stat` field 22), which tells it from a later process
/// that reuses its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// SIGKILL to `pid` if it is still the process whose command line is `cmd`; whether it was.
fn kill_exact(pid: u32, cmd: &str) -> bool {
    let before = start_time(pid);
    if before.is_none() || cmdline(pid).as_deref() != Some(cmd) || start_time(pid) != before {
        return false;
    }
    sigkill(pid);
    true
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Shim,
    Daemon,
    Qemu,
}

/// Waits until both loads have had a successful run since `since`.
fn progress(load: &Load, since: [usize; 2], after: &str) {
    let ok = eventually(SETTLE, || {
        (0..2).all(|i| load.ok[i].load(Ordering::SeqCst) > since[i])
    });
    assert!(
        ok,
        "the load made no progress after {after}: native {} -> {}, wasm {} -> {} ok runs; failures: {:#?}",
        since[0],
        load.ok[0].load(Ordering::SeqCst),
        since[1],
        load.ok[1].load(Ordering::SeqCst),
        load.sample.lock().unwrap().clone()
    );
}

fn counts(load: &Load) -> [usize; 2] {
    [0, 1].map(|i| load.ok[i].load(Ordering::SeqCst))
}

#[test]
fn chaos_kills_leave_tasks_ended_or_reachable_and_nothing_leaked() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let vm = require_guest();
    wasm_rootfs();
    let wall = Instant::now();
    let seed = seed();
    eprintln!("chaos: seed {seed} (SWITCHYARD_CHAOS_SEED={seed} replays it)");
    let rounds = env_usize("SWITCHYARD_CHAOS_ROUNDS", 3);

    let d = Daemon::start_in(|dir| {
        format!(
            "[runtimes.wasm]\nruntime_type = \"io.containerd.yard-wasm.v1\"\n[runtimes.wasm.options]\ncache_dir = \"{}\"\n\
             [runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n[runtimes.vm.options]\nkernel = \"{}\"\ninitrd = \"{}\"\ncache_dir = \"{}\"\n",
            dir.join("wasm-cache").display(),
            guest_dir().join("vmlinux").display(),
            guest_dir().join("initrd.img").display(),
            dir.join("vm-cache").display()
        )
    });
    let prefix = unique_id("chaos");
    let scope = Arc::new(Scope::new(&d, &prefix));
    // Warm-up (the compiled module, the vm's rootfs image), then the snapshot nothing may
    // exceed at the end.
    let mut rts = vec![Rt::Native, Rt::Wasm];
    if vm {
        rts.push(Rt::Vm);
    }
    for (i, rt) in rts.iter().enumerate() {
        let id = format!("{prefix}-w{i}");
        scope.note(&id);
        let (cmd, want) = rt.echo(&id);
        let out = yard_run(&d.socket, *rt, &["--rm", "--name", &id], &cmd);
        let mut got = text(&out.stdout);
        if *rt == Rt::Wasm {
            got = without_env(&got);
        }
        assert!(
            out.status.success() && got == want,
            "warm-up: {}",
            show(&out)
        );
    }
    assert!(
        eventually(SETTLE, || scope.snapshot(d.pid().unwrap()).shims.is_empty()),
        "the warm-up's shims did not exit: {:?}",
        scope.snapshot(d.pid().unwrap()).shims
    );
    let before = scope.snapshot(d.pid().unwrap());

    let events = vec![Events::watch_all(&d)];
    let mut c = Chaos {
        d,
        scope: scope.clone(),
        events,
        pool: Vec::new(),
        next: 0,
        vm,
        rng: Rng(seed),
    };
    c.top_up();

    let load = Arc::new(Load::default());
    let loops: Vec<JoinHandle<()>> = [vec![Rt::Native], vec![Rt::Wasm], vec![Rt::Wasm, Rt::Native]]
        .into_iter()
        .enumerate()
        .map(|(i, rts)| load_loop(c.d.socket.clone(), scope.clone(), load.clone(), i, rts))
        .collect();
    progress(&load, [0, 0], "the start");

    let mut schedule = Vec::new();
    for _ in 0..rounds {
        let mut round = vec![Action::Shim, Action::Daemon];
        if vm {
            round.push(Action::Qemu);
        }
        c.rng.shuffle(&mut round);
        schedule.extend(round);
    }
    eprintln!("chaos: schedule {schedule:?}");
    let chaos_started = Instant::now();
    for (i, action) in schedule.iter().enumerate() {
        if loops.iter().any(JoinHandle::is_finished) {
            load.stop.store(true, Ordering::SeqCst);
            for h in loops {
                if let Err(p) = h.join() {
                    std::panic::resume_unwind(p);
                }
            }
            panic!("a load loop ended early");
        }
        let t = Instant::now();
        let what = match action {
            Action::Shim => c.kill_shim(),
            Action::Daemon => c.kill_daemon(),
            Action::Qemu => c.kill_qemu(),
        };
        let since = counts(&load);
        c.top_up();
        progress(&load, since, &what);
        eprintln!(
            "chaos {}/{}: {what}; recovered in {:.1?}",
            i + 1,
            schedule.len(),
            t.elapsed()
        );
    }
    let chaos_time = chaos_started.elapsed();

    load.stop.store(true, Ordering::SeqCst);
    for h in loops {
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    }
    let ok = counts(&load);
    let failed = [0, 1].map(|i| load.failed[i].load(Ordering::SeqCst));
    let sample = load.sample.lock().unwrap().clone();
    eprintln!(
        "chaos: {} actions in {chaos_time:.1?}; load runs ok/failed: native {}/{}, wasm {}/{}; failures seen (first {}):\n  {}",
        schedule.len(),
        ok[0],
        failed[0],
        ok[1],
        failed[1],
        sample.len(),
        sample.join("\n  ")
    );
    let wrong = load.wrong.lock().unwrap().clone();
    assert!(
        wrong.is_empty(),
        "runs that exited 0 without their output: {wrong:#?}"
    );

    // Every pool task is where the test left it.
    for t in &c.pool {
        if t.alive {
            c.reachable(&t.id);
        } else {
            assert!(c.exit_seen(&t.id), "{}: no exit event", t.id);
        }
    }
    check_agreement(&c);

    // `yard rm --force` removes everything; running tasks end with an exit event.
    let rows = c.ps();
    let running: Vec<String> = rows
        .iter()
        .filter(|r| r["status"] == "running")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    for r in &rows {
        c.d.rm_force(r["id"].as_str().unwrap());
    }
    // Checked together at the end, so that one run shows every problem.
    let mut problems = Vec::new();
    for id in &running {
        if !eventually(SETTLE, || c.exit_seen(id)) {
            problems.push(format!(
                "{id} was running and was removed by yard rm --force without a /tasks/exit event"
            ));
        }
    }
    assert_eq!(c.ps(), Vec::<Value>::new());
    assert_eq!(c.d.ctr_containers(), Vec::<String>::new());

    let pid = c.d.pid().unwrap();
    let bounds = Bounds {
        // A restarted daemon is a new process: it may not hold more than the first did after
        // its warm-up, give or take what the load keeps warm.
        daemon_fds: Some(8),
        daemon_threads: Some(4),
        daemon_rss_kib: Some(16 * 1024),
        shim_fds: Some(0),
        shim_threads: Some(0),
    };
    let after = settle(&scope, pid, &before, &bounds, SETTLE);
    eprintln!(
        "chaos: before the first task and after the last was removed:\n{}",
        after.table()
    );
    problems.extend(after.failures());
    assert!(
        problems.is_empty(),
        "after the chaos:\n{}",
        problems.join("\n")
    );
    eprintln!("chaos: wall time {:.1?}", wall.elapsed());
}

/// The daemon's metadata agrees with the shims: each listed task's shim answers State with the
/// same status and pid; no task is unknown (a shim that does not answer); every shim server
/// serves a listed task; every bundle belongs to one; `ctr task ls` lists the same.
fn check_agreement(c: &Chaos) {
    let rows = c.ps();
    let mut addresses = Vec::new();
    let mut report = Vec::new();
    for r in &rows {
        let id = r["id"].as_str().unwrap();
        let status = r["status"].as_str().unwrap_or_default();
        report.push(format!("{id}: {status}"));
        if status == "no task" {
            continue;
        }
        assert_ne!(status, "unknown", "{id}: the daemon cannot reach its shim");
        let address = bundle_address(&c.d, "default", id)
            .unwrap_or_else(|| panic!("{id} ({status}) has no shim address in its bundle"));
        let st = shim_state(&address, id, ANSWER)
            .unwrap_or_else(|e| panic!("{id} ({status}): its shim does not answer: {e}"));
        assert_eq!(
            (st.status.as_str(), u64::from(st.pid)),
            (status, r["pid"].as_u64().unwrap_or(0)),
            "{id}: yard ps says {r}, the shim {st:?}"
        );
        if status == "running" {
            c.reachable(id);
        }
        addresses.push(address);
    }
    eprintln!("chaos: tasks at the end:\n  {}", report.join("\n  "));
    for (pid, cmd) in c.d.shim_processes("containerd-shim-yard-") {
        if let Some(socket) = socket_flag(&cmd) {
            assert!(
                addresses.contains(&socket),
                "shim {pid} serves no task the daemon lists: {cmd}\n{rows:#?}"
            );
        }
    }
    let listed: Vec<&str> = rows
        .iter()
        .filter(|r| r["status"] != "no task")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for b in entries(&c.d.state_dir().join("tasks/default")) {
        assert!(
            listed.contains(&b.as_str()),
            "bundle {b} belongs to no listed task: {rows:#?}"
        );
    }
    let mut ctr: Vec<String> = text(&c.d.ctr_ok(&["task", "ls", "-q"]).stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    ctr.sort();
    let mut ours: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
    ours.sort();
    assert_eq!(ctr, ours, "ctr task ls and yard ps disagree");
}
