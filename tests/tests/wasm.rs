//! The Wasm shim (`containerd-shim-yard-wasm-v1`) on its own terms: under real containerd
//! (Debian's 1.6, and the 1.7 and 2.1 peers when fetched) driven by its `ctr`; edge functions
//! (`wasi:http` components) answering on loopback; many tasks in one shim, where a kill, a trap
//! or a malformed module touches only its own task; the precompilation cache, including a
//! damaged entry; the timeout option.
//!
//! Lifecycle, stdio, terminals, exit codes, signals, limits, pause, leaks and bad input through
//! switchyardd are covered by `conformance.rs` (`wasm::`); nothing here repeats them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use switchyard_tests::wasm::{in_cgroup_of, wasm_rootfs, worker_of};
use switchyard_tests::*;

const T: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(10);
const RUNTIME_TYPE: &str = "io.containerd.yard-wasm.v1";
const SHIM: &str = "containerd-shim-yard-wasm-v1";
const HELLO: &str = "/app/hello.wasm";
const HELLO_COMPONENT: &str = "/app/hello-c.wasm";
const HTTP: &str = "/app/http.wasm";

/// switchyardd with the wasm runtime's cache in the daemon's temp dir.
fn daemon(programs: &[&str]) -> Option<(Daemon, PathBuf)> {
    daemon_with(programs, "")
}

/// The same with more `[runtimes.wasm.options]` TOML.
fn daemon_with(programs: &[&str], options: &str) -> Option<(Daemon, PathBuf)> {
    daemon_limited(programs, options, None)
}

/// The same, started with the `RLIMIT_NOFILE` `nofile` when given.
fn daemon_limited(
    programs: &[&str],
    options: &str,
    nofile: Option<Nofile>,
) -> Option<(Daemon, PathBuf)> {
    let mut needed = vec!["ctr"];
    needed.extend_from_slice(programs);
    if !require_root_and(&needed) {
        return None;
    }
    let config = |dir: &Path| {
        format!(
            "[runtimes.wasm]\nruntime_type = \"{RUNTIME_TYPE}\"\n[runtimes.wasm.options]\ncache_dir = \"{}\"\n{options}\n",
            dir.join("wasm-cache").display()
        )
    };
    let d = match nofile {
        Some(limit) => Daemon::start_with_nofile(limit, config),
        None => Daemon::start_in(config),
    };
    let cache = d.dir.path().join("wasm-cache");
    Some((d, cache))
}

/// `yard run -d --name ID` of a task that sleeps for ten minutes, which must start.
fn run_idle(d: &Daemon, id: &str) {
    let out = yard_run(d, &["-d", "--name", id], &[HELLO, "--sleep", "600000"]);
    assert!(out.status.success(), "{id}: {}", show(&out));
}

/// `yard rm --force` of `ids`, ten per call, which must succeed.
fn remove_all(d: &Daemon, ids: &[String]) {
    for chunk in ids.chunks(10) {
        let mut args = vec!["rm", "--force"];
        args.extend(chunk.iter().map(String::as_str));
        let out = d.run_yard(&args);
        assert!(out.status.success(), "{}", show(&out));
    }
}

fn yard_run(d: &Daemon, extra: &[&str], cmd: &[&str]) -> Output {
    let extra: Vec<&str> = ["--runtime", "wasm"].iter().chain(extra).copied().collect();
    d.yard_run(wasm_rootfs(), &extra, cmd)
}

/// Shim servers of this daemon.
fn shims(d: &Daemon) -> Vec<u32> {
    d.shim_servers(SHIM).into_iter().map(|(p, _)| p).collect()
}

/// Under real containerd: a WASI module and a component print their args and env, read a
/// file from the rootfs and exit with the chosen code; a detached task is listed, measured
/// and killed through `ctr task`.
fn under_containerd(binary: &Path) {
    let c = Containerd::start(binary);
    for (prog, code) in [(HELLO, 7), (HELLO_COMPONENT, 1)] {
        let id = unique_id("ctd");
        let out = c.ctr_run(
            RUNTIME_TYPE,
            wasm_rootfs(),
            &["--rm", "--env", "GREETING=hi"],
            &id,
            &[prog, "one", "--read", "/hello.txt", "--exit", "7"],
        );
        // A component's wasi:cli/exit carries only success or failure.
        assert_eq!(out.status.code(), Some(code), "{prog}: {}", show(&out));
        let stdout = text(&out.stdout);
        for want in [
            "hello from wasm\n".to_owned(),
            format!("arg[0]={prog}\n"),
            "arg[1]=one\n".to_owned(),
            "env GREETING=hi\n".to_owned(),
            "read /hello.txt: file contents\n".to_owned(),
        ] {
            assert!(
                stdout.contains(&want),
                "{prog}: no {want:?}: {}",
                show(&out)
            );
        }
    }
    let id = unique_id("ctd-d");
    let out = c.ctr_run(
        RUNTIME_TYPE,
        wasm_rootfs(),
        &["-d"],
        &id,
        &[HELLO, "--sleep", "60000"],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(c.ctr_task(&id).map(|t| t.1).as_deref(), Some("RUNNING"));
    let out = c.ctr_output(&["task", "metrics", &id]);
    assert!(out.status.success(), "ctr task metrics: {}", show(&out));
    assert!(
        text(&out.stdout).contains("memory.usage_in_bytes"),
        "{}",
        show(&out)
    );
    c.ctr_kill_and_remove(&id, SETTLE);

    // The runtime's `group` option given the containerd way (`ctr --runtime-config-path`, as
    // CRI's ConfigPath sets it): `start` is handed it on stdin, and the tasks share one shim.
    let config = c.dir.path().join("wasm-options.toml");
    std::fs::write(&config, "group = \"fns\"\n").unwrap();
    let config = config.display().to_string();
    let ids: Vec<String> = (0..3).map(|_| unique_id("ctd-g")).collect();
    for id in &ids {
        let out = c.ctr_run(
            RUNTIME_TYPE,
            wasm_rootfs(),
            &["-d", "--runtime-config-path", &config],
            id,
            &[HELLO, "--sleep", "60000"],
        );
        assert!(out.status.success(), "{}", show(&out));
    }
    let servers = c.shim_servers(SHIM);
    assert_eq!(
        servers.len(),
        1,
        "tasks of the group option in several shims: {servers:#?}"
    );
    for id in &ids {
        c.ctr_kill_and_remove(id, SETTLE);
    }
    assert!(
        eventually(SETTLE, || c.shim_processes(SHIM).is_empty()),
        "shims left: {:?}\n{}",
        c.shim_processes(SHIM),
        c.log_text()
    );
}

#[test]
fn containerd_16() {
    if !require_root_and(&["containerd", "ctr"]) {
        return;
    }
    under_containerd(&which("containerd").unwrap());
}

#[test]
fn containerd_17_and_21() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    for name in ["containerd-1.7", "containerd-2.1"] {
        if let Some(bin) = require_peer_containerd(name) {
            under_containerd(&bin);
        }
    }
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = text(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Chunked: keep the data lines only.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, l)| l)
            .collect()
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

/// An HTTP component served by a task answers curl on loopback, its environment reaches each
/// request's instance, 1,000 sequential requests all succeed, and killing the task closes the
/// port.
#[test]
fn http_component_serves_requests() {
    let Some((d, _cache)) = daemon(&["curl"]) else {
        return;
    };
    let port = free_port();
    let id = unique_id("http");
    let listen = format!("io.switchyard.wasm.http-listen=127.0.0.1:{port}");
    let out = yard_run(
        &d,
        &[
            "-d",
            "--name",
            &id,
            "--annotation",
            &listen,
            "-e",
            "GREETING=hi",
        ],
        &[HTTP],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "nothing listens on {port}: {}",
        d.log_text()
    );
    let out = run_timeout(
        Command::new("curl").args(["-sS", "-i", &format!("http://127.0.0.1:{port}/a/b?c=d")]),
        T,
    );
    assert!(out.status.success(), "curl: {}", show(&out));
    let resp = text(&out.stdout);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("hello from wasm http: GET /a/b?c=d"),
        "{resp}"
    );
    let (code, body) = get(port, "/env").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("GREETING=hi"), "{body}");

    let started = Instant::now();
    let mut failures = Vec::new();
    for i in 0..1000 {
        match get(port, &format!("/req/{i}")) {
            Ok((200, body)) if body.contains(&format!("GET /req/{i}")) => {}
            other => failures.push(format!("request {i}: {other:?}")),
        }
    }
    eprintln!("1000 sequential requests in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let out = d.run_yard(&["rm", "--force", &id]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || TcpStream::connect(("127.0.0.1", port)).is_err()),
        "port {port} still open after the task was removed"
    );
    assert!(eventually(SETTLE, || shims(&d).is_empty()), "shim left");
}

/// Many tasks in one shim (grouped by annotation): a spinning task is killed promptly, a
/// trap and a malformed module fail only themselves, and the others keep running; removing
/// the last task ends the shim.
#[test]
fn tasks_in_one_shim_are_isolated() {
    let Some((d, _cache)) = daemon(&[]) else {
        return;
    };
    let group = ["--annotation", "io.switchyard.group=iso"];
    let ev = Events::watch_all(&d);
    let sleeper = unique_id("sleeper");
    let spinner = unique_id("spinner");
    for (id, cmd) in [
        (&sleeper, vec![HELLO, "--sleep", "600000"]),
        (&spinner, vec![HELLO, "--loop"]),
    ] {
        let mut extra = vec!["-d", "--name", id.as_str()];
        extra.extend(group);
        let out = yard_run(&d, &extra, &cmd);
        assert!(out.status.success(), "{}", show(&out));
    }
    let one = shims(&d);
    assert_eq!(one.len(), 1, "grouped tasks are not in one shim: {one:?}");
    let pid = |id: &str| d.ps_row(id).and_then(|r| r["pid"].as_u64());
    assert_eq!(pid(&sleeper), Some(u64::from(one[0])));
    assert_eq!(pid(&spinner), Some(u64::from(one[0])));

    // A trap and a malformed module in the same shim.
    let mut extra = vec!["--rm"];
    extra.extend(group);
    let out = yard_run(&d, &extra, &[HELLO, "--trap"]);
    assert_eq!(out.status.code(), Some(134), "{}", show(&out));
    let out = yard_run(&d, &extra, &["/app/bad.wasm"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("/app/bad.wasm: invalid module"),
        "{}",
        show(&out)
    );
    assert_eq!(shims(&d), one, "the shim changed");

    // Kill the spinner: its exit comes promptly (an epoch tick is 10 ms; the 100 ms figure is
    // measured by the benchmark, this only guards against a kill that waits for something).
    let t = Instant::now();
    let out = d.run_yard(&["kill", "-s", "KILL", &spinner]);
    assert!(out.status.success(), "{}", show(&out));
    let (at, exit) = ev.wait_timed("/tasks/exit", &spinner, "any payload", |_| true);
    let latency = at.saturating_duration_since(t);
    eprintln!("kill of a spinning task: exit event after {latency:?} (including yard startup)");
    assert_eq!(exit["event"]["exit_status"], 137, "{exit}");
    assert!(latency < Duration::from_secs(2), "kill took {latency:?}");

    assert_eq!(d.status(&sleeper).as_deref(), Some("running"));
    let out = d.run_yard(&["rm", &spinner]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(shims(&d), one, "the shim went away with tasks left");
    let out = d.run_yard(&["rm", "--force", &sleeper]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || shims(&d).is_empty()),
        "shim left after the last task"
    );
}

/// The first run compiles and caches; a damaged cache entry is discarded and rebuilt, never
/// loaded; the timeout annotation stops a task that runs too long.
#[test]
fn cache_and_timeout() {
    let Some((d, cache)) = daemon(&[]) else {
        return;
    };
    let entries = || -> Vec<PathBuf> {
        std::fs::read_dir(&cache)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(entries().is_empty());
    let out = yard_run(&d, &["--rm"], &[HELLO, "first"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let e = entries();
    assert_eq!(e.len(), 1, "one artifact after the first run: {e:?}");
    let good = std::fs::read(&e[0]).unwrap();

    // Damage the artifact's code (not its header): the checksum catches it.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&e[0], &bad).unwrap();
    let out = yard_run(&d, &["--rm"], &[HELLO, "second"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stdout).contains("arg[1]=second"),
        "{}",
        show(&out)
    );
    assert!(
        d.log_text().contains("discarding a damaged cache entry"),
        "the damaged entry was not noticed"
    );
    assert_eq!(
        std::fs::read(&e[0]).unwrap(),
        good,
        "the entry was not rebuilt"
    );

    // Truncated to nothing useful: the same.
    std::fs::write(&e[0], b"yard").unwrap();
    let out = yard_run(&d, &["--rm"], &[HELLO, "third"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(std::fs::read(&e[0]).unwrap(), good);

    let out = yard_run(
        &d,
        &["--rm", "--annotation", "io.switchyard.wasm.timeout-ms=300"],
        &[HELLO, "--loop"],
    );
    assert_eq!(out.status.code(), Some(124), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("timeout of 300 ms"),
        "{}",
        show(&out)
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// A group's shim is joined without `<shim> start` (switchyardd knows the group), stays warm
/// for the group's next task after its last one, and exits by itself when none comes.
#[test]
fn a_group_shim_is_joined_stays_warm_and_exits_when_idle() {
    let Some((d, _cache)) = daemon_with(&[], "group = \"warm\"") else {
        return;
    };
    let keep = unique_id("keep");
    let out = yard_run(&d, &["-d", "--name", &keep], &[HELLO, "--sleep", "600000"]);
    assert!(out.status.success(), "{}", show(&out));
    let first = shims(&d);
    assert_eq!(first.len(), 1, "{first:?}");
    let joined = |id: &str| {
        d.log_text()
            .lines()
            .any(|l| l.contains("joined the group's shim") && l.contains(id))
    };
    assert!(!joined(&keep), "the first task joined a shim");
    let id = unique_id("join");
    let out = yard_run(&d, &["--rm", "--name", &id], &[HELLO]);
    assert!(
        out.status.success() && text(&out.stdout).contains("hello from wasm"),
        "{}",
        show(&out)
    );
    assert!(
        joined(&id),
        "the second task did not join:\n{}",
        d.log_text()
    );
    assert_eq!(shims(&d), first, "the second task got a shim of its own");
    assert!(
        !d.log_text().contains("the group's shim is exiting"),
        "{}",
        d.log_text()
    );

    // The last task goes: the shim stays warm for a while and the next task joins it (when
    // this machine takes less than the idle time to run it), then it exits by itself.
    let out = d.run_yard(&["rm", "--force", &keep]);
    assert!(out.status.success(), "{}", show(&out));
    let removed = Instant::now();
    let id = unique_id("warm");
    let out = yard_run(&d, &["--rm", "--name", &id], &[HELLO]);
    assert!(out.status.success(), "{}", show(&out));
    if removed.elapsed() < Duration::from_secs(1) {
        assert!(joined(&id), "not joined while warm:\n{}", d.log_text());
        assert_eq!(shims(&d), first, "not the same shim while warm");
    } else {
        eprintln!(
            "warm rejoin not checked: the run took {:?}",
            removed.elapsed()
        );
    }
    assert!(
        eventually(SETTLE, || shims(&d).is_empty()),
        "an idle group shim did not exit: {:?}",
        shims(&d)
    );
    // Its log reached switchyardd's to the last line, though the task whose bundle it was
    // started in (and logs into) was removed long before.
    assert!(
        eventually(SETTLE, || d
            .log_text()
            .contains("no task for the idle time: exiting")),
        "the group shim's last log line is missing:\n{}",
        d.log_text()
    );
    // The group's next task gets a new shim (not the connection to the one that exited).
    let id = unique_id("again");
    let out = yard_run(&d, &["--rm", "--name", &id], &[HELLO]);
    assert!(
        out.status.success() && text(&out.stdout).contains("hello from wasm"),
        "after the idle exit: {}",
        show(&out)
    );
}

/// The runtime option `group`: every task of the runtime shares one shim without annotations.
#[test]
fn group_option_shares_one_shim() {
    let Some((d, _cache)) = daemon_with(&[], "group = \"edge\"") else {
        return;
    };
    let ids = [unique_id("g1"), unique_id("g2"), unique_id("g3")];
    for id in &ids {
        run_idle(&d, id);
    }
    let s = shims(&d);
    assert_eq!(
        s.len(),
        1,
        "tasks of a grouped runtime in {} shims: {s:?}",
        s.len()
    );
    remove_all(&d, &ids);
    assert!(eventually(SETTLE, || shims(&d).is_empty()), "shim left");
}

/// An idle task without stdio (`yard run -d`) holds one descriptor in its group's worker, its
/// preopened root: `/dev/null` needs none (WASI's own streams read nothing and discard), and
/// the root's own descriptor goes once the preopen has one. So a worker under this machine's
/// 20,000 `RLIMIT_NOFILE` holds 10,000 idle tasks. The shim holds none for them.
#[test]
fn an_idle_task_without_stdio_holds_one_descriptor() {
    let Some((d, _cache)) = daemon_with(&[], "group = \"fds\"") else {
        return;
    };
    const MORE: usize = 8;
    let ids: Vec<String> = (0..=MORE).map(|i| unique_id(&format!("fd{i}"))).collect();
    run_idle(&d, &ids[0]);
    let shim = shims(&d);
    assert_eq!(shim.len(), 1, "{shim:?}");
    let worker = worker_of(&ids[0]).expect("the group's worker");
    // The first task's CPU is accounted to its cgroup a moment after it starts
    // (`ACCOUNT_AFTER`): the shim's count is taken once the worker is there.
    assert!(
        eventually(SETTLE, || in_cgroup_of(worker, &ids[0])),
        "the worker is not in the first task's cgroup"
    );
    let (shim_fds, worker_fds) = (open_fds(shim[0]), open_fds(worker));
    for id in &ids[1..] {
        run_idle(&d, id);
    }
    assert_eq!(shims(&d), shim, "the group's shim changed");
    for id in &ids {
        assert_eq!(d.status(id).as_deref(), Some("running"), "{id}");
    }
    let (shim_now, worker_now) = (open_fds(shim[0]), open_fds(worker));
    eprintln!(
        "{MORE} more idle tasks: worker descriptors {worker_fds} -> {worker_now}, shim \
         {shim_fds} -> {shim_now}"
    );
    assert!(
        worker_now <= worker_fds + MORE,
        "the worker holds more than one descriptor per idle task: {worker_fds} with one task, \
         {worker_now} with {}",
        MORE + 1
    );
    assert!(
        shim_now <= shim_fds,
        "the shim holds descriptors per idle task: {shim_fds} with one task, {shim_now} with {}",
        MORE + 1
    );
    remove_all(&d, &ids);
    assert!(eventually(SETTLE, || shims(&d).is_empty()), "shim left");
}

/// A group's worker raises its soft descriptor limit to the hard one, as the Go runtime does
/// for containerd's shims: with the daemon started at a soft limit of 128 (its shims get that
/// back from it), one worker still holds 150 idle tasks, one descriptor each.
#[test]
fn a_worker_holds_more_tasks_than_the_soft_limit_it_inherited() {
    const SOFT: u64 = 128;
    const TASKS: usize = 150;
    let hard = nofile_limit(std::process::id()).map(|(_, h)| h);
    if !require(
        hard.is_some_and(|h| h > 2 * TASKS as u64),
        &format!(
            "needs a hard RLIMIT_NOFILE above {} (have {hard:?})",
            2 * TASKS
        ),
    ) {
        return;
    }
    let Some((d, _cache)) = daemon_limited(
        &["prlimit"],
        "group = \"nofile\"",
        Some(Nofile {
            soft: SOFT,
            hard: None,
        }),
    ) else {
        return;
    };
    let ids: Vec<String> = (0..TASKS).map(|i| unique_id(&format!("nf{i}"))).collect();
    for id in &ids {
        run_idle(&d, id);
    }
    let worker = worker_of(&ids[0]).expect("the group's worker");
    eprintln!(
        "worker {worker}: RLIMIT_NOFILE {:?}; {} descriptors open",
        nofile_limit(worker),
        open_fds(worker)
    );
    assert_eq!(
        nofile_limit(worker).map(|(soft, _)| soft),
        hard,
        "the worker's soft limit is not its hard limit"
    );
    assert!(
        open_fds(worker) > SOFT as usize,
        "the worker holds {} descriptors, no more than the inherited soft limit {SOFT}",
        open_fds(worker)
    );
    remove_all(&d, &ids);
    assert!(eventually(SETTLE, || shims(&d).is_empty()), "shim left");
}

/// A worker that has no room for a Create's descriptors (its hard `RLIMIT_NOFILE` reached)
/// fails that Create with an error naming the limit and keeps its group's other tasks; once
/// one is removed, the next task starts in the same worker.
#[test]
fn a_worker_at_its_descriptor_limit_fails_one_create_and_keeps_its_tasks() {
    const LIMIT: u64 = 64;
    let Some((d, _cache)) = daemon_limited(
        &["prlimit"],
        "group = \"full\"",
        Some(Nofile {
            soft: LIMIT,
            hard: Some(LIMIT),
        }),
    ) else {
        return;
    };
    let mut ids: Vec<String> = Vec::new();
    let refused = loop {
        assert!(
            ids.len() < LIMIT as usize,
            "{} idle tasks started in a worker limited to {LIMIT} descriptors",
            ids.len()
        );
        let id = unique_id(&format!("full{}", ids.len()));
        let out = yard_run(&d, &["-d", "--name", &id], &[HELLO, "--sleep", "600000"]);
        if !out.status.success() {
            break show(&out);
        }
        ids.push(id);
    };
    eprintln!("task {} refused: {refused}", ids.len() + 1);
    assert!(
        refused.contains("open-file limit"),
        "the refusal does not name the limit: {refused}"
    );
    assert!(ids.len() > 10, "only {} tasks started", ids.len());
    let worker = worker_of(&ids[0]).expect("the group's worker");
    let shim = shims(&d);
    eprintln!(
        "descriptors open (of {LIMIT}): worker {}, shim {:?}, daemon {:?}",
        open_fds(worker),
        shim.iter().map(|p| open_fds(*p)).collect::<Vec<_>>(),
        d.pid().map(open_fds)
    );
    let out = run_timeout(d.yard().args(["ps", "--json"]), CLIENT_DEADLINE);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("yard ps --json");
    let running = |id: &str| {
        rows.as_array()
            .into_iter()
            .flatten()
            .any(|r| r["id"] == id && r["status"] == "running")
    };
    let stopped: Vec<&String> = ids.iter().filter(|id| !running(id)).collect();
    assert!(stopped.is_empty(), "tasks of the group ended: {stopped:?}");

    let gone = ids.pop().expect("a task");
    remove_all(&d, &[gone]);
    let next = unique_id("full-next");
    run_idle(&d, &next);
    assert_eq!(
        worker_of(&ids[0]),
        Some(worker),
        "the group's worker changed"
    );
    ids.push(next);
    remove_all(&d, &ids);
    assert!(eventually(SETTLE, || shims(&d).is_empty()), "shim left");
}
