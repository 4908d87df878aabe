//! Runtime conformance: one suite of behaviour every runtime behind switchyardd must show
//! (lifecycle, PID 1, exit codes, signals, exec, stdio, terminals, limits, pause/resume,
//! cleanup, bad input), driven through `yard` and containerd's `ctr`. `conformance_suite!`
//! generates it once per runtime name configured in switchyardd, so the tests read
//! `runc::lifecycle_...`, `native::lifecycle_...`.
//!
//! Each test starts its own switchyardd and uses unique container ids, so tests run in
//! parallel. A test skips (or fails, under `SWITCHYARD_REQUIRE_ALL=1`) when not root, when
//! `ctr` or another program it drives is missing, or when switchyardd reports the runtime's shim
//! as unavailable (`yard info`).
//!
//! `SWITCHYARD_CYCLES` sets how many create/start/wait/delete cycles the leak test runs
//! (default 200).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_tests::*;

/// Deadline for one client command.
const T: Duration = Duration::from_secs(60);
/// How long state may take to settle after a command returned (shim exit, cgroup removal,
/// event delivery).
const SETTLE: Duration = Duration::from_secs(10);

/// A runtime under test: its name in switchyardd's config (what `yard --runtime` takes) and
/// its runtime type (what `ctr --runtime` takes).
struct Runtime {
    name: &'static str,
    runtime_type: &'static str,
    /// The rootfs its tasks run from: busybox, or the Wasm test programs.
    rootfs: &'static Path,
    /// Its processes run in a guest VM: their pids are the guest's, not processes on the host.
    in_guest: bool,
}

fn runtime(name: &'static str) -> Runtime {
    let (runtime_type, rootfs) = match name {
        "runc" => ("io.containerd.runc.v2", busybox_rootfs()),
        "native" => ("io.containerd.yard-native.v1", busybox_rootfs()),
        "vm" => ("io.containerd.yard-vm.v1", busybox_rootfs()),
        "wasm" => (
            "io.containerd.yard-wasm.v1",
            switchyard_tests::wasm::wasm_rootfs(),
        ),
        other => panic!("no runtime type known for {other:?}: add it to runtime()"),
    };
    Runtime {
        name,
        runtime_type,
        rootfs,
        in_guest: name == "vm",
    }
}

impl Runtime {
    /// A command printing `msg`, and its exact output.
    fn echo(&self, msg: &str) -> (Vec<String>, String) {
        if self.name == "wasm" {
            (
                vec![WASM_HELLO.to_owned(), msg.to_owned()],
                format!("hello from wasm\narg[0]={WASM_HELLO}\narg[1]={msg}\n"),
            )
        } else {
            (
                vec!["/bin/echo".to_owned(), msg.to_owned()],
                format!("{msg}\n"),
            )
        }
    }
}

/// Output of the Wasm test program without its `env K=V` lines (yard adds a default PATH).
fn without_wasm_env(out: &str) -> String {
    out.split_inclusive('\n')
        .filter(|l| !l.starts_with("env "))
        .collect()
}

/// The WASI test program (a core module) in the Wasm rootfs.
const WASM_HELLO: &str = "/app/hello.wasm";
/// The same program as a component (`wasi:cli/command`).
const WASM_HELLO_COMPONENT: &str = "/app/hello-c.wasm";

/// Everything about a finished command, for assertion messages (long streams cut).
fn show(out: &Output) -> String {
    let cut = |b: &[u8]| {
        const MAX: usize = 4096;
        if b.len() > MAX {
            format!("{}... ({} bytes)", text(&b[..MAX]), b.len())
        } else {
            text(b)
        }
    };
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        cut(&out.stdout),
        cut(&out.stderr)
    )
}

/// A switchyardd and the runtime under test.
struct Ctx {
    d: Daemon,
    rt: Runtime,
}

impl Ctx {
    /// Checks the prerequisites (root, ctr, `programs`, the runtime's shim as switchyardd
    /// sees it) and starts a daemon; `None` means skip.
    fn start(name: &'static str, programs: &[&str]) -> Option<Ctx> {
        let rt = runtime(name);
        let mut needed = vec!["ctr"];
        if name == "runc" {
            needed.push("runc");
        }
        needed.extend_from_slice(programs);
        if !require_root_and(&needed) {
            return None;
        }
        let d = Daemon::start();
        let out = run_timeout(d.yard().args(["info", "--json"]), T);
        assert!(out.status.success(), "yard info: {}", show(&out));
        let info: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("yard info --json: {e}: {}", show(&out)));
        let row = info["runtimes"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == name))
            .unwrap_or_else(|| panic!("runtime {name:?} is not configured in switchyardd: {info}"))
            .clone();
        assert_eq!(row["runtime_type"], rt.runtime_type, "{row}");
        if !require(
            row["error"].is_null(),
            &format!("runtime {name}: shim not available: {}", row["error"]),
        ) {
            return None;
        }
        if rt.in_guest {
            // The vm runtime's own report: QEMU, the guest kernel and initramfs (scripts/guest).
            let vm = &row["vm"];
            let missing: Vec<String> = ["kernel", "initrd", "qemu"]
                .iter()
                .filter(|k| {
                    vm[**k]
                        .as_str()
                        .is_none_or(|v| v.contains("missing") || v.contains("not found"))
                })
                .map(|k| format!("{k}: {}", vm[*k]))
                .collect();
            if !require(
                missing.is_empty(),
                &format!("runtime {name}: {}", missing.join(", ")),
            ) {
                return None;
            }
        }
        Some(Ctx { d, rt })
    }

    fn sock(&self) -> String {
        self.d.socket.display().to_string()
    }

    fn yard(&self, args: &[&str]) -> Output {
        run_timeout(self.d.yard().args(args), T)
    }

    fn ctr(&self, args: &[&str]) -> Output {
        run_timeout(self.d.ctr().args(args), T)
    }

    /// `yard run --runtime R EXTRA --rootfs ROOTFS -- CMD`
    fn yard_run_cmd(&self, extra: &[&str], cmd: &[&str]) -> Command {
        let mut c = self.d.yard();
        c.args(["run", "--runtime", self.rt.name])
            .args(extra)
            .arg("--rootfs")
            .arg(self.rt.rootfs)
            .arg("--")
            .args(cmd);
        c
    }

    fn yard_run(&self, extra: &[&str], cmd: &[&str]) -> Output {
        run_timeout(&mut self.yard_run_cmd(extra, cmd), T)
    }

    /// `ctr run --runtime TYPE EXTRA --rootfs ROOTFS ID CMD`
    fn ctr_run(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
        let mut c = self.d.ctr();
        c.args(["run", "--runtime", self.rt.runtime_type])
            .args(extra)
            .arg("--rootfs")
            .arg(self.rt.rootfs)
            .arg(id)
            .args(cmd);
        run_timeout(&mut c, T)
    }

    /// Starts a detached task; returns its pid as `yard ps` reports it.
    fn detach(&self, id: &str, cmd: &[&str]) -> u32 {
        let out = self.yard_run(&["-d", "--name", id], cmd);
        assert!(out.status.success(), "yard run -d: {}", show(&out));
        assert_eq!(text(&out.stdout).trim(), id, "yard run -d prints the id");
        let row = self
            .ps_row(id)
            .unwrap_or_else(|| panic!("{id} not in yard ps after yard run -d"));
        assert_eq!(row["status"], "running", "{row}");
        assert_eq!(row["runtime"], self.rt.name, "{row}");
        let pid = row["pid"].as_u64().unwrap_or(0) as u32;
        assert!(pid > 0, "no pid for a running task: {row}");
        pid
    }

    /// `yard ps --json`'s row for `id`.
    fn ps_row(&self, id: &str) -> Option<Value> {
        let out = self.yard(&["ps", "--json"]);
        assert!(out.status.success(), "yard ps: {}", show(&out));
        let rows: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("yard ps --json: {e}: {}", show(&out)));
        rows.as_array()
            .unwrap_or_else(|| panic!("yard ps --json is not a list: {rows}"))
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
    }

    /// `ctr task ls`'s (pid, STATUS) for `id`.
    fn ctr_task(&self, id: &str) -> Option<(u32, String)> {
        let out = self.ctr(&["task", "ls"]);
        assert!(out.status.success(), "ctr task ls: {}", show(&out));
        text(&out.stdout).lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols[..] {
                [task, pid, status] if task == id => {
                    Some((pid.parse().unwrap_or(0), status.to_owned()))
                }
                _ => None,
            }
        })
    }

    fn ctr_containers(&self) -> Vec<String> {
        let out = self.ctr(&["containers", "ls", "-q"]);
        assert!(out.status.success(), "ctr containers ls: {}", show(&out));
        text(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// Command lines (space-separated, as /proc shows them) of the task's processes that
    /// contain `needle`: on the host, or through an exec in the guest for a VM.
    fn processes(&self, id: &str, needle: &str) -> Vec<String> {
        if !self.rt.in_guest {
            return processes_matching(&[needle])
                .into_iter()
                .map(|(_, c)| c)
                .collect();
        }
        let list = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done";
        let out = self.yard(&["exec", id, "--", "/bin/sh", "-c", list]);
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains(needle) && !l.contains("/proc/[0-9]"))
            .map(str::to_owned)
            .collect()
    }

    fn rm_force(&self, id: &str) {
        let out = self.yard(&["rm", "--force", id]);
        assert!(out.status.success(), "yard rm --force {id}: {}", show(&out));
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.d.state_dir().join("tasks/default").join(id)
    }

    fn work_dir(&self, id: &str) -> PathBuf {
        self.d.dir.path().join("root/tasks/default").join(id)
    }

    /// What is left of task `id` once it is gone: shim processes, the given task processes
    /// (pid and command line when it ran), mounts, cgroups, bundle, work dir, listings.
    fn leftovers(&self, id: &str, procs: &[(u32, String)]) -> Vec<String> {
        let mut left = Vec::new();
        let shim_needle = format!("-id {id} ");
        for (pid, cmd) in processes_matching(&[&shim_needle]) {
            left.push(format!("shim process {pid}: {cmd}"));
        }
        for (pid, cmd) in procs {
            if !self.rt.in_guest && cmdline(*pid).as_deref() == Some(cmd.as_str()) {
                left.push(format!("task process {pid}: {cmd}"));
            }
        }
        // A VM is named after its sandbox's first container.
        for (pid, cmd) in processes_matching(&["qemu-system-x86_64", &format!("-{id}")]) {
            left.push(format!("VM process {pid}: {cmd}"));
        }
        for m in mounts_matching(id) {
            left.push(format!("mount: {m}"));
        }
        for cg in cgroups_matching(&format!("switchyard/default/{id}")) {
            left.push(format!("cgroup: {}", cg.display()));
        }
        for p in [self.bundle(id), self.work_dir(id)] {
            if p.exists() {
                left.push(format!("directory: {}", p.display()));
            }
        }
        left
    }

    /// Asserts that nothing of task `id` is left (waiting for it to settle) and that neither
    /// client lists it.
    fn assert_clean(&self, id: &str, procs: &[(u32, String)]) {
        let clean = eventually(SETTLE, || self.leftovers(id, procs).is_empty());
        assert!(
            clean,
            "left behind by {id}: {:#?}",
            self.leftovers(id, procs)
        );
        assert_eq!(self.ctr_task(id), None, "ctr task ls still lists {id}");
        assert!(
            !self.ctr_containers().iter().any(|c| c == id),
            "ctr containers ls still lists {id}"
        );
        assert_eq!(self.ps_row(id), None, "yard ps still lists {id}");
    }
}

impl Drop for Ctx {
    /// After a failure, removes what the test left running, so that stopping the daemon (which
    /// kills its shims) does not orphan containers, cgroups and fifos on the host.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let quick = Duration::from_secs(15);
        let Some(out) = try_run(self.d.ctr().args(["containers", "ls", "-q"]), quick) else {
            return;
        };
        for id in text(&out.stdout).lines() {
            let _ = try_run(self.d.yard().args(["rm", "--force", id]), quick);
        }
    }
}

/// Runs a command to completion within `timeout`, output discarded; never panics (for use
/// while unwinding).
fn try_run(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !eventually(timeout, || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    child.wait_with_output().ok()
}

/// A process's command line, NULs as spaces, if it exists.
fn cmdline(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
}

/// Runs `cmd` with `input` on its stdin (written by a thread, so a task that writes before
/// reading cannot deadlock) and its output read as it comes (unlike `run_timeout`, which
/// suits only output that fits a pipe), killing it after `T`.
fn run_with_stdin(cmd: &mut Command, input: Vec<u8>) -> Output {
    run_piped(cmd, Some(input))
}

/// Like `run_with_stdin`; `None` keeps stdin open and silent until the command exits, as a
/// user at a terminal who types nothing.
fn run_piped(cmd: &mut Command, input: Option<Vec<u8>>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let (writer, held) = match input {
        Some(input) => (
            Some(std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            })),
            None,
        ),
        None => (None, Some(stdin)),
    };
    let done = Arc::new(AtomicBool::new(false));
    let pid = child.id();
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + T;
            while !done.load(Ordering::SeqCst) {
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    drop(held);
    assert!(
        !watchdog.join().unwrap(),
        "{cmd:?} did not finish within {T:?}: {}",
        show(&out)
    );
    if let Some(w) = writer {
        w.join().unwrap();
    }
    out
}

/// Waits for a spawned child up to `timeout`, killing it after.
fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Output {
    let finished = eventually(timeout, || child.try_wait().ok().flatten().is_some());
    if !finished {
        let _ = child.kill();
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut stderr);
    }
    let status = child.wait().unwrap();
    let out = Output {
        status,
        stdout,
        stderr,
    };
    assert!(
        finished,
        "did not finish within {timeout:?}: {}",
        show(&out)
    );
    out
}

/// `yard events --json` for one container, collected by a thread so tests can wait for an
/// event while the task runs.
struct Events {
    _child: KillOnDrop,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Events {
    /// Subscribes to the events of container `id` and returns once the subscription is live:
    /// a probe event (published the way a shim's -publish-binary does) has come through.
    fn watch(d: &Daemon, id: &str) -> Events {
        let probe = format!("probe-{id}");
        let mut child = d
            .yard()
            .args([
                "events",
                "--json",
                &format!("event.container_id=={id}"),
                &format!("event.container_id=={probe}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn yard events");
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        seen.lock().unwrap().push(v);
                    }
                }
            });
        }
        let ev = Events {
            _child: KillOnDrop(child),
            seen,
        };
        let deadline = Instant::now() + SETTLE;
        loop {
            publish_probe(d, &probe);
            if eventually(Duration::from_millis(250), || {
                ev.find(|v| v["event"]["container_id"] == probe.as_str())
                    .is_some()
            }) {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "yard events never delivered a probe event: {}",
                ev.dump()
            );
        }
    }

    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.seen.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// Waits for the event `topic` of container `id` that `pred` accepts.
    fn wait_for(&self, topic: &str, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let m = |v: &Value| v["topic"] == topic && v["event"]["container_id"] == id && pred(v);
        if eventually(SETTLE, || self.find(m).is_some()) {
            return self.find(m).unwrap();
        }
        panic!(
            "no {topic} event for {id} with {what}; events seen:\n{}",
            self.dump()
        );
    }

    fn dump(&self) -> String {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Publishes a `/tasks/oom` for `container_id` through `switchyardd publish` (the shims'
/// -publish-binary path); used only to learn that a subscription is live.
fn publish_probe(d: &Daemon, container_id: &str) {
    use prost::Message;
    let any = switchyard_api::typeurl::to_any(&switchyard_api::containerd::events::TaskOom {
        container_id: container_id.into(),
    });
    let mut p = Command::new(bin("switchyardd"))
        .arg("--address")
        .arg(&d.socket)
        .args(["publish", "--topic", "/tasks/oom", "--namespace", "default"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyardd publish");
    p.stdin
        .take()
        .unwrap()
        .write_all(&any.encode_to_vec())
        .unwrap();
    let out = wait_child(&mut p, T);
    assert!(out.status.success(), "switchyardd publish: {}", show(&out));
}

/// Sockets anywhere under `dir`.
fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_socket() {
                found.push(e.path());
            }
        }
    }
    found
}

/// Entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// cgroups under `switchyard/default/` (in every hierarchy) whose name starts with `prefix`.
fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join("switchyard/default")];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        dirs.push(e.path().join("switchyard/default"));
    }
    dirs.iter()
        .flat_map(|d| {
            entries(d)
                .into_iter()
                .filter(|n| n.starts_with(prefix))
                .map(move |n| d.join(n))
        })
        .collect()
}

/// Children of `parent` that are zombies.
fn zombie_children(parent: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (f.next(), f.next()) else {
            continue;
        };
        if state == "Z" && ppid.parse::<u32>().ok() == Some(parent) {
            out.push(stat.trim().to_owned());
        }
    }
    out
}

fn open_fds(pid: u32) -> usize {
    entries(Path::new(&format!("/proc/{pid}/fd"))).len()
}

// ---------------------------------------------------------------------------------------------
// The tests, each a function of the runtime name; `conformance_suite!` wraps them.

/// yard and ctr run a task to completion; a detached task is listed by both clients with a
/// real pid, is refused removal while running, and `yard rm --force` removes it completely.
fn lifecycle_run_detach_ps_rm(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let out = c.yard_run(&["--rm"], &["/bin/echo", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "hello\n", "{}", show(&out));

    let cid = unique_id("lc-ctr");
    let out = c.ctr_run(&cid, &["--rm"], &["/bin/echo", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "hello\n", "{}", show(&out));
    c.assert_clean(&cid, &[]);

    let id = unique_id("lc");
    let pid = c.detach(&id, &["/bin/sleep", "30"]);
    let (ctr_pid, status) = c
        .ctr_task(&id)
        .unwrap_or_else(|| panic!("ctr task ls does not list {id}"));
    assert_eq!(status, "RUNNING");
    assert_eq!(ctr_pid, pid, "yard ps and ctr task ls disagree on the pid");
    // The pid is the task's process, seen from the host (from the guest, for a VM: its own
    // `ps` lists it under that pid, and one QEMU process runs the sandbox).
    let cmd = cmdline(pid).unwrap_or_default();
    if c.rt.in_guest {
        // In the container's PID namespace the task is PID 1; `pid` is the guest's.
        let out = c.yard(&["exec", &id, "--", "/bin/cat", "/proc/1/cmdline"]);
        assert_eq!(
            text(&out.stdout),
            "/bin/sleep\u{0}30\u{0}",
            "{}",
            show(&out)
        );
        let vms = processes_matching(&["qemu-system-x86_64", &format!("-{id}")]);
        assert_eq!(vms.len(), 1, "{vms:?}");
    } else {
        assert_eq!(cmd, "/bin/sleep 30 ", "pid {pid} is not the task");
    }
    assert!(c.bundle(&id).is_dir(), "no bundle for a running task");

    let out = c.yard(&["rm", &id]);
    assert!(
        !out.status.success(),
        "rm of a running task: {}",
        show(&out)
    );
    assert!(text(&out.stderr).contains("running"), "{}", show(&out));
    assert_eq!(c.ctr_task(&id).map(|t| t.1), Some("RUNNING".to_owned()));

    c.rm_force(&id);
    c.assert_clean(&id, &[(pid, cmd)]);
}

/// The task's process is PID 1 of its own PID namespace, has the requested hostname,
/// environment and working directory, and lives in the cgroup yard asked for
/// (`/switchyard/<namespace>/<id>`).
fn process_pid1_hostname_env_cgroup(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("p1");
    let out = c.yard_run(
        &[
            "--rm",
            "--name",
            &id,
            "--hostname",
            "myhost",
            "-e",
            "FOO=bar baz",
            "--cwd",
            "/etc",
        ],
        &[
            "/bin/sh",
            "-c",
            "echo $$; hostname; echo \"$FOO\"; pwd; cat /proc/self/cgroup",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() > 4, "{}", show(&out));
    assert_eq!(lines[0], "1", "not PID 1: {}", show(&out));
    assert_eq!(lines[1], "myhost", "hostname: {}", show(&out));
    assert_eq!(lines[2], "bar baz", "environment: {}", show(&out));
    assert_eq!(lines[3], "/etc", "working directory: {}", show(&out));

    // /proc/self/cgroup: "hierarchy:controllers:path". On cgroup v1 the controllers that limits
    // and pause rely on must hold the task; on a v2-only host the unified line must.
    let want = format!("/switchyard/default/{id}");
    let cg: Vec<(&str, &str)> = lines[4..]
        .iter()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            Some((controllers, path))
        })
        .collect();
    let v1 = cg.iter().any(|(ctl, _)| !ctl.is_empty());
    let required: Vec<&str> = if v1 {
        vec!["memory", "pids", "freezer"]
    } else {
        vec![""]
    };
    for ctl in required {
        let line = cg
            .iter()
            .find(|(c, _)| c.split(',').any(|x| x == ctl))
            .unwrap_or_else(|| panic!("no cgroup line for {ctl:?}: {}", show(&out)));
        assert_eq!(line.1, want, "cgroup for {ctl:?}: {}", show(&out));
    }
    c.assert_clean(&id, &[]);
}

/// The task's exit code is the client's, through yard and ctr.
fn exit_codes(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let out = c.yard_run(&["--rm"], &["/bin/sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let out = c.yard_run(&["--rm"], &["/bin/sh", "-c", "exit 255"]);
    assert_eq!(out.status.code(), Some(255), "{}", show(&out));
    let id = unique_id("ex");
    let out = c.ctr_run(&id, &["--rm"], &["/bin/sh", "-c", "exit 42"]);
    assert_eq!(out.status.code(), Some(42), "{}", show(&out));
    c.assert_clean(&id, &[]);
}

/// SIGTERM kills a process that has no handler (exit 143) unless it is the container's init,
/// which the PID namespace protects; SIGKILL kills init (exit 137). Exit statuses come with
/// the `/tasks/exit` events.
fn signals_term_and_kill(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("sig");
    let ev = Events::watch(&c.d, &id);
    let pid = c.detach(&id, &["/bin/sleep", "60"]);
    let init = (pid, cmdline(pid).unwrap_or_default());

    // A shell that traps nothing, as an exec'd (non-init) process: SIGTERM ends it with 143.
    let marker = format!("not-reached-{id}");
    let script = format!("sleep 60 </dev/null >/dev/null 2>&1; echo {marker}");
    let mut exec = KillOnDrop(
        c.d.yard()
            .args(["exec", "--exec-id", "term-sh", &id, "--", "/bin/sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Started, and past the runtime's own setup: the shell runs (its exact command line; the
    // `yard exec` above also contains the marker).
    ev.wait_for("/tasks/exec-started", &id, "exec_id term-sh", |v| {
        v["event"]["exec_id"] == "term-sh"
    });
    let sh = format!("/bin/sh -c {script} ");
    assert!(
        eventually(SETTLE, || c.processes(&id, &marker).contains(&sh)),
        "the exec'd shell never ran: {:?}",
        c.processes(&id, &marker)
    );
    let out = c.yard(&["kill", "-s", "TERM", "--exec-id", "term-sh", &id]);
    assert!(out.status.success(), "yard kill --exec-id: {}", show(&out));
    let out = wait_child(&mut exec.0, SETTLE);
    assert_eq!(out.status.code(), Some(143), "yard exec: {}", show(&out));
    assert!(!text(&out.stdout).contains(&marker), "{}", show(&out));
    ev.wait_for("/tasks/exit", &id, "id term-sh, exit_status 143", |v| {
        v["event"]["id"] == "term-sh" && v["event"]["exit_status"] == 143
    });

    // init has no SIGTERM handler: the kernel drops the signal and the task keeps running.
    let out = c.yard(&["kill", "-s", "TERM", &id]);
    assert!(out.status.success(), "yard kill -s TERM: {}", show(&out));
    // A negative needs a little time to show.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.ctr_task(&id).map(|t| t.1),
        Some("RUNNING".to_owned()),
        "init without a SIGTERM handler was killed by SIGTERM; events:\n{}",
        ev.dump()
    );
    assert!(
        ev.find(|v| v["topic"] == "/tasks/exit" && v["event"]["id"] == id.as_str())
            .is_none(),
        "{}",
        ev.dump()
    );

    let out = c.yard(&["kill", "-s", "KILL", &id]);
    assert!(out.status.success(), "yard kill -s KILL: {}", show(&out));
    let exit = ev.wait_for("/tasks/exit", &id, "exit_status 137", |v| {
        v["event"]["id"] == id.as_str()
    });
    assert_eq!(exit["event"]["exit_status"], 137, "{exit}");
    assert_eq!(exit["event"]["pid"], pid, "{exit}");
    assert!(
        eventually(SETTLE, || c.ctr_task(&id).map(|t| t.1)
            == Some("STOPPED".to_owned())),
        "task not STOPPED after SIGKILL: {:?}",
        c.ctr_task(&id)
    );
    assert_eq!(
        c.ps_row(&id).map(|r| r["status"].clone()),
        Some("stopped".into())
    );

    let out = c.yard(&["rm", &id]);
    assert!(out.status.success(), "yard rm: {}", show(&out));
    ev.wait_for("/tasks/delete", &id, "exit_status 137", |v| {
        v["event"]["exit_status"] == 137
    });
    c.assert_clean(&id, &[init]);
}

/// Processes exec'd into a running task: output, exit code, environment, working directory,
/// stdin, the task's PID namespace; through yard and ctr; the task keeps running.
fn exec_in_running_task(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("exec");
    let pid = c.detach(&id, &["/bin/sleep", "60"]);
    let init = (pid, cmdline(pid).unwrap_or_default());

    let out = c.yard(&["exec", &id, "--", "/bin/sh", "-c", "echo in-exec; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    assert_eq!(text(&out.stdout), "in-exec\n", "{}", show(&out));

    let out = c.yard(&[
        "exec",
        "-e",
        "FOO=bar",
        "--cwd",
        "/etc",
        &id,
        "--",
        "/bin/sh",
        "-c",
        "echo $FOO; pwd; tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", show(&out));
    assert_eq!(lines[0], "bar", "exec environment: {}", show(&out));
    assert_eq!(lines[1], "/etc", "exec working directory: {}", show(&out));
    assert_eq!(
        lines[2].trim_end(),
        "/bin/sleep 60",
        "exec is not in the task's PID namespace: {}",
        show(&out)
    );
    assert_ne!(lines[3], "1", "exec'd process is PID 1: {}", show(&out));

    let out = run_with_stdin(
        c.d.yard().args(["exec", "-i", &id, "--", "/bin/cat"]),
        b"piped into exec\n".to_vec(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "piped into exec\n", "{}", show(&out));

    let out = c.ctr(&["task", "exec", "--exec-id", "x", &id, "/bin/echo", "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "hi\n", "{}", show(&out));
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "y",
        &id,
        "/bin/sh",
        "-c",
        "exit 9",
    ]);
    assert_eq!(out.status.code(), Some(9), "{}", show(&out));

    assert_eq!(c.ctr_task(&id), Some((pid, "RUNNING".to_owned())));
    c.rm_force(&id);
    c.assert_clean(&id, &[init]);
}

/// stdio through fifos: stdin reaches the task and its EOF ends `cat`; stdout and stderr stay
/// apart; output is complete when the task exits, even a large one.
fn stdio_fifos(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let out = run_with_stdin(
        &mut c.yard_run_cmd(&["-i", "--rm"], &["/bin/cat"]),
        b"abc\n".to_vec(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "abc\n", "{}", show(&out));

    let big = vec![b'z'; 1 << 20];
    let out = run_with_stdin(
        &mut c.yard_run_cmd(&["-i", "--rm"], &["/bin/sh", "-c", "wc -c"]),
        big,
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout).trim(), "1048576", "{}", show(&out));

    // (Read while it runs: a pipe holds far less than that.)
    let out = run_with_stdin(
        &mut c.yard_run_cmd(&["--rm"], &["/bin/sh", "-c", "head -c 1048576 /dev/zero"]),
        Vec::new(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(out.stdout.len(), 1 << 20, "stdout truncated at exit");
    assert!(out.stdout.iter().all(|b| *b == 0), "stdout corrupted");

    let out = c.yard_run(&["--rm"], &["/bin/sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "out\n", "{}", show(&out));
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out));

    let id = unique_id("io");
    let out = c.ctr_run(&id, &["--rm"], &["/bin/sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "out\n", "{}", show(&out));
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out));
    c.assert_clean(&id, &[]);
}

/// A task with a terminal: stdin and stdout are a pty, through yard (which needs no local
/// terminal) and ctr (which does, so it runs under `script`).
fn tty(name: &'static str) {
    let Some(c) = Ctx::start(name, &["script"]) else {
        return;
    };
    let cmd = "tty; test -t 0 && echo in-isatty; test -t 1 && echo out-isatty; exit 5";
    let id = unique_id("tty");
    // stdin stays open: with a terminal, containerd's runc shim tears the console down when
    // the task's stdin closes, losing output not yet copied (yard closes it on EOF).
    let out = run_piped(
        &mut c.yard_run_cmd(&["-t", "--rm", "--name", &id], &["/bin/sh", "-c", cmd]),
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("/dev/pts/")),
        "{}",
        show(&out)
    );
    assert!(lines.contains(&"in-isatty"), "{}", show(&out));
    assert!(lines.contains(&"out-isatty"), "{}", show(&out));
    c.assert_clean(&id, &[]);

    let cid = unique_id("tty-ctr");
    let ctr = format!(
        "ctr --address {} run -t --rm --runtime {} --rootfs {} {cid} /bin/sh -c '{cmd}'",
        c.sock(),
        c.rt.runtime_type,
        busybox_rootfs().display()
    );
    // script forwards EOF on its stdin to the terminal; keep it open (see above).
    let out = run_piped(
        Command::new("script").args(["-qec", &ctr, "/dev/null"]),
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{ctr}: {}", show(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{ctr}: {}", show(&out));
    assert!(stdout.contains("in-isatty"), "{ctr}: {}", show(&out));
    assert!(stdout.contains("out-isatty"), "{ctr}: {}", show(&out));
    c.assert_clean(&cid, &[]);
}

/// `--memory`: a task that outgrows it is OOM-killed (137) and `/tasks/oom` is published.
fn limits_memory_oom(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("oom");
    let ev = Events::watch(&c.d, &id);
    let out = c.yard_run(
        &["--rm", "--name", &id, "--memory", "32m"],
        &[
            "/bin/sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    assert_eq!(out.status.code(), Some(137), "{}", show(&out));
    assert!(!text(&out.stdout).contains("survived"), "{}", show(&out));
    ev.wait_for("/tasks/oom", &id, "any payload", |_| true);
    ev.wait_for("/tasks/exit", &id, "exit_status 137", |v| {
        v["event"]["exit_status"] == 137
    });
    c.assert_clean(&id, &[]);
}

/// `--pids-limit`: forks beyond the limit fail; without the limit the same loop succeeds.
fn limits_pids(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let fork_loop = [
        "/bin/sh",
        "-c",
        "for i in $(seq 100); do sleep 5 & done; echo spawned",
    ];
    let id = unique_id("pids");
    let out = c.yard_run(&["--rm", "--name", &id, "--pids-limit", "20"], &fork_loop);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(!text(&out.stdout).contains("spawned"), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("can't fork") || err.contains("Resource temporarily unavailable"),
        "{}",
        show(&out)
    );
    c.assert_clean(&id, &[]);

    let id = unique_id("pids-ok");
    let out = c.yard_run(&["--rm", "--name", &id], &fork_loop);
    assert_eq!(
        out.status.code(),
        Some(0),
        "control without a limit: {}",
        show(&out)
    );
    assert_eq!(text(&out.stdout), "spawned\n", "{}", show(&out));
    c.assert_clean(&id, &[]);
}

/// `--read-only`: the rootfs refuses writes, the spec's own mounts (/dev/shm) do not; without
/// the flag the rootfs is writable.
fn limits_read_only_rootfs(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("ro");
    let file = format!("/{id}");
    let out = c.yard_run(
        &["--rm", "--name", &id, "--read-only"],
        &[
            "/bin/sh",
            "-c",
            &format!("touch /dev/shm/ok && echo shm-ok; touch {file}"),
        ],
    );
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "shm-ok\n", "{}", show(&out));
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        show(&out)
    );
    let host = busybox_rootfs().join(&id);
    assert!(!host.exists(), "{} was written", host.display());
    c.assert_clean(&id, &[]);

    let id2 = unique_id("rw");
    let out = c.yard_run(
        &["--rm", "--name", &id2],
        &["/bin/sh", "-c", &format!("touch /tmp/{id2}")],
    );
    let host = busybox_rootfs().join("tmp").join(&id2);
    // A VM's rootfs is a read-only image under a writable overlay in the guest: the write
    // succeeds there and never reaches the host's folder.
    let written = host.exists();
    let _ = std::fs::remove_file(&host);
    assert_eq!(
        out.status.code(),
        Some(0),
        "control without --read-only: {}",
        show(&out)
    );
    if c.rt.in_guest {
        assert!(
            !written,
            "{} written through the guest's overlay",
            host.display()
        );
    } else {
        assert!(written, "{} not written by the task", host.display());
    }
    c.assert_clean(&id2, &[]);
}

/// Pause freezes every process of the task (it stops making progress) and both clients show
/// it paused; resume brings it back; metrics report memory and pids.
fn pause_resume_metrics(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("pause");
    let ticks = busybox_rootfs().join("tmp").join(format!("{id}.ticks"));
    // A VM's rootfs changes stay in the guest: read them there (an exec cannot run while the
    // task is paused, so the paused check below is the host-side runtimes' only).
    let size = || {
        if c.rt.in_guest {
            let out = c.yard(&[
                "exec",
                &id,
                "--",
                "/bin/sh",
                "-c",
                &format!("wc -c < /tmp/{id}.ticks"),
            ]);
            text(&out.stdout).trim().parse().unwrap_or(0)
        } else {
            std::fs::metadata(&ticks).map(|m| m.len()).unwrap_or(0)
        }
    };
    let pid = c.detach(
        &id,
        &[
            "/bin/sh",
            "-c",
            &format!("while true; do echo x >> /tmp/{id}.ticks; sleep 0.02; done"),
        ],
    );
    let init = (pid, cmdline(pid).unwrap_or_default());
    assert!(eventually(SETTLE, || size() > 0), "the task never ticked");

    let out = c.ctr(&["task", "pause", &id]);
    assert!(out.status.success(), "ctr task pause: {}", show(&out));
    assert_eq!(c.ctr_task(&id), Some((pid, "PAUSED".to_owned())));
    assert_eq!(
        c.ps_row(&id).map(|r| r["status"].clone()),
        Some("paused".into())
    );
    let frozen_at = if c.rt.in_guest {
        0
    } else {
        let frozen_at = size();
        // A negative needs a little time to show: a running task ticks every 20 ms.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(size(), frozen_at, "the task kept running while paused");
        frozen_at
    };

    let out = c.ctr(&["task", "resume", &id]);
    assert!(out.status.success(), "ctr task resume: {}", show(&out));
    assert_eq!(c.ctr_task(&id), Some((pid, "RUNNING".to_owned())));
    assert!(
        eventually(SETTLE, || size() > frozen_at),
        "the task did not run again after resume"
    );

    let out = c.ctr(&["task", "metrics", &id]);
    assert!(out.status.success(), "ctr task metrics: {}", show(&out));
    let stdout = text(&out.stdout);
    let value = |metric: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(metric)).then(|| f.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {metric} in ctr task metrics: {}", show(&out)))
    };
    // cgroup v1 names it memory.usage_in_bytes, v2 memory.usage.
    let mem = if stdout.contains("memory.usage_in_bytes") {
        value("memory.usage_in_bytes")
    } else {
        value("memory.usage")
    };
    assert!(mem > 0, "memory usage 0: {}", show(&out));
    assert!(value("pids.current") >= 1, "{}", show(&out));

    c.rm_force(&id);
    let _ = std::fs::remove_file(&ticks);
    c.assert_clean(&id, &[init]);
}

/// Many create/start/wait/delete cycles, alternating yard and ctr, leave nothing behind: no
/// shim processes, mounts, cgroups, sockets, bundles, work dirs, fifos, zombies, daemon fds.
fn leaks_after_cycles(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let cycles: usize = std::env::var("SWITCHYARD_CYCLES")
        .ok()
        .map(|v| v.parse().expect("SWITCHYARD_CYCLES must be a number"))
        // A VM boots per cycle (about 2 s under TCG): fewer cycles, the same checks.
        .unwrap_or(if c.rt.in_guest { 10 } else { 200 });
    let prefix = unique_id("leak");
    let daemon = c.d.pid().unwrap();
    let run = |i: usize| {
        let id = format!("{prefix}-{i}");
        let msg = format!("cycle {i}");
        let (cmd, want) = c.rt.echo(&msg);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = if i.is_multiple_of(2) {
            c.yard_run(&["--rm", "--name", &id], &cmd)
        } else {
            c.ctr_run(&id, &["--rm"], &cmd)
        };
        assert_eq!(out.status.code(), Some(0), "cycle {i}: {}", show(&out));
        assert_eq!(
            without_wasm_env(&text(&out.stdout)),
            want,
            "cycle {i}: {}",
            show(&out)
        );
    };
    // Warm up (connections, lazily opened files) before counting the daemon's fds.
    let warmup = 4.min(cycles);
    for i in 0..warmup {
        run(i);
    }
    let fds_before = open_fds(daemon);
    let started = Instant::now();
    for i in warmup..cycles {
        run(i);
    }
    eprintln!(
        "{name}: {} cycles in {:?}",
        cycles - warmup,
        started.elapsed()
    );

    let sock = format!(" -address {} ", c.sock());
    let state = c.d.state_dir();
    let fifo_dir = Path::new("/run/switchyard/fifo");
    let leftovers = || {
        let mut left: Vec<String> = Vec::new();
        left.extend(
            processes_matching(&[&sock])
                .into_iter()
                .map(|(p, cmd)| format!("shim {p}: {cmd}")),
        );
        left.extend(
            mounts_matching(&prefix)
                .into_iter()
                .map(|m| format!("mount: {m}")),
        );
        left.extend(
            mounts_matching(&state.display().to_string())
                .into_iter()
                .map(|m| format!("mount: {m}")),
        );
        left.extend(
            cgroups_with_prefix(&prefix)
                .into_iter()
                .map(|p| format!("cgroup: {}", p.display())),
        );
        left.extend(
            sockets_under(&state)
                .into_iter()
                .map(|p| format!("socket: {}", p.display())),
        );
        let tasks = state.join("tasks/default");
        left.extend(entries(&tasks).into_iter().map(|e| format!("bundle: {e}")));
        let work = c.d.dir.path().join("root/tasks/default");
        left.extend(entries(&work).into_iter().map(|e| format!("work dir: {e}")));
        left.extend(
            entries(fifo_dir)
                .into_iter()
                .filter(|e| e.starts_with(&prefix))
                .map(|e| format!("fifo dir: {e}")),
        );
        left.extend(
            zombie_children(daemon)
                .into_iter()
                .map(|z| format!("zombie: {z}")),
        );
        left
    };
    assert!(
        eventually(SETTLE, || leftovers().is_empty()),
        "left after {cycles} cycles: {:#?}",
        leftovers()
    );
    let fds_after = open_fds(daemon);
    assert!(
        fds_after <= fds_before + 16,
        "switchyardd's open fds grew from {fds_before} to {fds_after} over {} cycles",
        cycles - warmup
    );
    assert_eq!(c.ctr_containers(), Vec::<String>::new());
    let out = c.ctr(&["task", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "", "{}", show(&out));
    let out = c.yard(&["ps", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]", "{}", show(&out));
}

/// Bad input fails with errors that name the problem, leaves nothing behind, and the daemon
/// and the runtime keep serving.
fn bad_input(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    // A missing rootfs: yard checks it itself; the daemon checks it for ctr.
    let missing = format!("/nonexistent/{}", unique_id("rootfs"));
    let out = c.yard(&[
        "run",
        "--runtime",
        c.rt.name,
        "--rm",
        "--rootfs",
        &missing,
        "--",
        "/bin/true",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stderr).contains(&missing), "{}", show(&out));
    let id = unique_id("nr");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        c.rt.runtime_type,
        "--rootfs",
        &missing,
        &id,
        "/bin/true",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stderr).contains(&missing), "{}", show(&out));
    c.assert_clean(&id, &[]);

    // A command that does not exist in the rootfs.
    let id = unique_id("noexe");
    let out = c.yard_run(&["--rm", "--name", &id], &["/bin/no-such-program"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("/bin/no-such-program"),
        "{}",
        show(&out)
    );
    c.assert_clean(&id, &[]);

    // A spec with a namespace type that does not exist (ctr run --config takes a whole spec).
    let id = unique_id("badns");
    let out = c.ctr(&["oci", "spec"]);
    assert!(out.status.success(), "ctr oci spec: {}", show(&out));
    let mut spec: Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["root"] = serde_json::json!({ "path": busybox_rootfs(), "readonly": false });
    spec["process"]["args"] = serde_json::json!(["/bin/echo", "spec-ran"]);
    spec["process"]["terminal"] = false.into();
    spec["hostname"] = id.clone().into();
    spec["linux"]["cgroupsPath"] = format!("/switchyard/default/{id}").into();
    let good = c.d.dir.path().join("good.json");
    write(&good, &spec.to_string());
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "type": "bogus" }));
    let bad = c.d.dir.path().join("bad.json");
    write(&bad, &spec.to_string());

    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        c.rt.runtime_type,
        "--config",
        &bad.display().to_string(),
        &id,
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(!text(&out.stdout).contains("spec-ran"), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("bogus"),
        "error does not name the namespace: {}",
        show(&out)
    );
    // ctr removes its container; whether or not it did, the task must be gone.
    let _ = c.ctr(&["containers", "rm", &id]);
    c.assert_clean(&id, &[]);

    // The same spec without the bogus namespace runs: the runtime is fine.
    let id = unique_id("goodspec");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        c.rt.runtime_type,
        "--config",
        &good.display().to_string(),
        &id,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "spec-ran\n", "{}", show(&out));
    let _ = c.ctr(&["containers", "rm", &id]);

    let out = c.yard(&["info"]);
    assert!(
        out.status.success(),
        "daemon stopped serving: {}",
        show(&out)
    );
    let out = c.yard_run(&["--rm"], &["/bin/echo", "still-serving"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(text(&out.stdout), "still-serving\n", "{}", show(&out));
}

/// Wasm: a detached task is listed by both clients with the shim's pid (a Wasm task is an
/// instance inside the shim, not a process), refuses a plain `rm` while running, and leaves
/// nothing behind after `rm --force`.
fn wasm_lifecycle(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let out = c.yard_run(&["--rm"], &[WASM_HELLO, "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stdout).starts_with(&format!(
            "hello from wasm\narg[0]={WASM_HELLO}\narg[1]=hi\n"
        )),
        "{}",
        show(&out)
    );
    let cid = unique_id("lc-ctr");
    let out = c.ctr_run(&cid, &["--rm"], &[WASM_HELLO_COMPONENT, "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stdout).contains("arg[1]=hi\n"), "{}", show(&out));
    c.assert_clean(&cid, &[]);

    let id = unique_id("lc");
    let pid = c.detach(&id, &[WASM_HELLO, "--sleep", "60000"]);
    assert_eq!(c.ctr_task(&id), Some((pid, "RUNNING".to_owned())));
    let cmd = cmdline(pid).unwrap_or_default();
    assert!(
        cmd.contains("containerd-shim-yard-wasm-v1") && cmd.contains(&id),
        "pid {pid} is not the task's shim: {cmd}"
    );
    let out = c.yard(&["rm", &id]);
    assert!(
        !out.status.success(),
        "rm of a running task: {}",
        show(&out)
    );
    assert!(text(&out.stderr).contains("running"), "{}", show(&out));
    c.rm_force(&id);
    c.assert_clean(&id, &[(pid, cmd)]);
}

/// Wasm exit codes: `proc_exit` through yard and ctr; a component's `wasi:cli/exit` carries
/// only success or failure (0 or 1); a trap is 134 with the trap in stderr.
fn wasm_exit_codes(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    for code in ["3", "125", "0"] {
        let out = c.yard_run(&["--rm"], &[WASM_HELLO, "--exit", code]);
        assert_eq!(out.status.code(), code.parse().ok(), "{}", show(&out));
    }
    // WASI preview 1 reserves statuses from 126 up: proc_exit(255) is an error, not an exit.
    let out = c.yard_run(&["--rm"], &[WASM_HELLO, "--exit", "255"]);
    assert_eq!(out.status.code(), Some(134), "{}", show(&out));
    assert!(text(&out.stderr).contains("exit status"), "{}", show(&out));
    let id = unique_id("ex");
    let out = c.ctr_run(&id, &["--rm"], &[WASM_HELLO, "--exit", "42"]);
    assert_eq!(out.status.code(), Some(42), "{}", show(&out));
    c.assert_clean(&id, &[]);
    let out = c.yard_run(&["--rm"], &[WASM_HELLO_COMPONENT, "--exit", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = c.yard_run(&["--rm"], &[WASM_HELLO_COMPONENT, "--exit", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let out = c.yard_run(&["--rm"], &[WASM_HELLO, "--trap"]);
    assert_eq!(out.status.code(), Some(134), "{}", show(&out));
    assert!(text(&out.stderr).contains("wasm trap"), "{}", show(&out));
    assert!(text(&out.stderr).contains("unreachable"), "{}", show(&out));
}

/// Wasm signals: a guest has no handlers, so SIGTERM ends it (143) and SIGKILL too (137),
/// whether it sleeps in a host call or spins in a loop; SIGWINCH is ignored.
fn wasm_signals(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    for (sig, args, status) in [
        ("TERM", [WASM_HELLO, "--sleep", "60000"], 143),
        ("KILL", [WASM_HELLO, "--loop", ""], 137),
    ] {
        let id = unique_id("sig");
        let ev = Events::watch(&c.d, &id);
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        c.detach(&id, &args);
        let out = c.yard(&["kill", "-s", "WINCH", &id]);
        assert!(out.status.success(), "yard kill -s WINCH: {}", show(&out));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(c.ctr_task(&id).map(|t| t.1), Some("RUNNING".to_owned()));
        let out = c.yard(&["kill", "-s", sig, &id]);
        assert!(out.status.success(), "yard kill -s {sig}: {}", show(&out));
        ev.wait_for("/tasks/exit", &id, &format!("exit_status {status}"), |v| {
            v["event"]["exit_status"] == status
        });
        let out = c.yard(&["rm", &id]);
        assert!(out.status.success(), "yard rm: {}", show(&out));
        c.assert_clean(&id, &[]);
    }
}

/// Wasm has no processes to exec into: Exec fails with a clear Unimplemented and the task
/// keeps running.
fn wasm_exec_unimplemented(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("exec");
    c.detach(&id, &[WASM_HELLO, "--sleep", "60000"]);
    let out = c.yard(&["exec", &id, "--", WASM_HELLO]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("Exec is not supported by the Wasm runtime"),
        "{}",
        show(&out)
    );
    assert_eq!(c.ctr_task(&id).map(|t| t.1), Some("RUNNING".to_owned()));
    c.rm_force(&id);
    c.assert_clean(&id, &[]);
}

/// Wasm stdio over fifos: stdin in, a megabyte through, stdout and stderr apart, via yard and
/// ctr.
fn wasm_stdio_fifos(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let head = format!("hello from wasm\narg[0]={WASM_HELLO}\narg[1]=--stdin\n");
    let out = run_with_stdin(
        &mut c.yard_run_cmd(&["-i", "--rm"], &[WASM_HELLO, "--stdin"]),
        b"abc\n".to_vec(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        without_wasm_env(&text(&out.stdout)),
        format!("{head}abc\n"),
        "{}",
        show(&out)
    );

    let big = vec![b'z'; 1 << 20];
    let out = run_with_stdin(
        &mut c.yard_run_cmd(&["-i", "--rm"], &[WASM_HELLO, "--stdin"]),
        big,
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let got = without_wasm_env(&text(&out.stdout));
    assert_eq!(got.len(), head.len() + (1 << 20), "{}", show(&out));

    let out = c.yard_run(&["--rm"], &[WASM_HELLO, "--stderr", "err"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        !text(&out.stdout).lines().any(|l| l == "err"),
        "{}",
        show(&out)
    );
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out));

    let id = unique_id("io");
    let out = c.ctr_run(&id, &["--rm"], &[WASM_HELLO_COMPONENT, "--stderr", "err"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stdout).starts_with("hello from wasm\n"),
        "{}",
        show(&out)
    );
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out));
    c.assert_clean(&id, &[]);
}

/// A Wasm task with a terminal: its output goes through a pty (newlines become CRLF).
fn wasm_tty(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("tty");
    let out = run_piped(
        &mut c.yard_run_cmd(&["-t", "--rm", "--name", &id], &[WASM_HELLO, "--exit", "5"]),
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    assert!(
        text(&out.stdout).contains("hello from wasm\r\n"),
        "{}",
        show(&out)
    );
    c.assert_clean(&id, &[]);
}

/// `--memory` caps a Wasm task's linear memory: growing past it stops the task with 137, a
/// clear message and `/tasks/oom`; under the limit the same program finishes.
fn wasm_limits_memory_oom(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("oom");
    let ev = Events::watch(&c.d, &id);
    let out = c.yard_run(
        &["--rm", "--name", &id, "--memory", "32m"],
        &[WASM_HELLO, "--alloc-mb", "100"],
    );
    assert_eq!(out.status.code(), Some(137), "{}", show(&out));
    assert!(!text(&out.stdout).contains("alloc done"), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("memory limit is 33554432 bytes"),
        "{}",
        show(&out)
    );
    ev.wait_for("/tasks/oom", &id, "any payload", |_| true);
    ev.wait_for("/tasks/exit", &id, "exit_status 137", |v| {
        v["event"]["exit_status"] == 137
    });
    c.assert_clean(&id, &[]);
    let out = c.yard_run(
        &["--rm", "--memory", "64m"],
        &[WASM_HELLO, "--alloc-mb", "40"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stdout).contains("alloc done"), "{}", show(&out));
}

/// `--read-only`: the preopened rootfs refuses writes; without it the write lands.
fn wasm_limits_read_only_rootfs(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("ro");
    let file = format!("/data/{id}");
    let host = c.rt.rootfs.join(file.trim_start_matches('/'));
    let out = c.yard_run(
        &["--rm", "--name", &id, "--read-only"],
        &[WASM_HELLO, "--write", &file, "x"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out.stderr).contains("write"), "{}", show(&out));
    assert!(!host.exists(), "{} was written", host.display());
    c.assert_clean(&id, &[]);
    let out = c.yard_run(&["--rm"], &[WASM_HELLO, "--write", &file, "x"]);
    let written = std::fs::read_to_string(&host).ok();
    let _ = std::fs::remove_file(&host);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        written.as_deref(),
        Some("x"),
        "not written without --read-only"
    );
}

/// Pause stops a Wasm task making progress (both clients show it paused), resume brings it
/// back; metrics report its linear memory.
fn wasm_pause_resume_metrics(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    let id = unique_id("pause");
    let ticks = c.rt.rootfs.join("data").join(format!("{id}.ticks"));
    let size = || std::fs::metadata(&ticks).map(|m| m.len()).unwrap_or(0);
    let guest_path = format!("/data/{id}.ticks");
    let pid = c.detach(&id, &[WASM_HELLO, "--tick", &guest_path, "20"]);
    assert!(eventually(SETTLE, || size() > 0), "the task never ticked");
    let out = c.ctr(&["task", "pause", &id]);
    assert!(out.status.success(), "ctr task pause: {}", show(&out));
    assert_eq!(c.ctr_task(&id), Some((pid, "PAUSED".to_owned())));
    assert_eq!(
        c.ps_row(&id).map(|r| r["status"].clone()),
        Some("paused".into())
    );
    // One tick may be in flight when the pause lands.
    std::thread::sleep(Duration::from_millis(100));
    let frozen_at = size();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(size(), frozen_at, "the task kept running while paused");
    let out = c.ctr(&["task", "resume", &id]);
    assert!(out.status.success(), "ctr task resume: {}", show(&out));
    assert!(
        eventually(SETTLE, || size() > frozen_at),
        "the task did not run again after resume"
    );
    let out = c.ctr(&["task", "metrics", &id]);
    assert!(out.status.success(), "ctr task metrics: {}", show(&out));
    let stdout = text(&out.stdout);
    let mem: u64 = stdout
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("memory.usage_in_bytes")).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no memory.usage_in_bytes: {}", show(&out)));
    assert!(mem >= 65536, "linear memory not reported: {}", show(&out));
    c.rm_force(&id);
    let _ = std::fs::remove_file(&ticks);
    c.assert_clean(&id, &[]);
}

/// Bad Wasm input fails Create with an error naming the file, leaves nothing behind, and the
/// runtime keeps serving.
fn wasm_bad_input(name: &'static str) {
    let Some(c) = Ctx::start(name, &[]) else {
        return;
    };
    for (arg0, want) in [
        (
            "/app/bad.wasm",
            "process.args[0] /app/bad.wasm: invalid module",
        ),
        (
            "/hello.txt",
            "process.args[0] /hello.txt: not a WebAssembly binary",
        ),
        (
            "/app/missing.wasm",
            "process.args[0] /app/missing.wasm: not found in the rootfs",
        ),
        ("/app", "process.args[0] /app: not a file"),
    ] {
        let id = unique_id("bad");
        let out = c.yard_run(&["--rm", "--name", &id], &[arg0]);
        assert_ne!(out.status.code(), Some(0), "{}", show(&out));
        assert!(
            text(&out.stderr).contains(want),
            "want {want:?}: {}",
            show(&out)
        );
        c.assert_clean(&id, &[]);
    }
    let id = unique_id("bad-ann");
    let out = c.yard_run(
        &[
            "--rm",
            "--name",
            &id,
            "--annotation",
            "io.switchyard.wasm.timeout-ms=soon",
        ],
        &[WASM_HELLO],
    );
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("annotations.io.switchyard.wasm.timeout-ms"),
        "{}",
        show(&out)
    );
    c.assert_clean(&id, &[]);
    let out = c.yard_run(&["--rm"], &[WASM_HELLO, "still-serving"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stdout).contains("arg[1]=still-serving"),
        "{}",
        show(&out)
    );
}

/// The suite for one runtime name; invoke inside a module named after it.
macro_rules! conformance_suite {
    ($rt:literal) => {
        #[test]
        fn lifecycle_run_detach_ps_rm() {
            super::lifecycle_run_detach_ps_rm($rt);
        }
        #[test]
        fn process_pid1_hostname_env_cgroup() {
            super::process_pid1_hostname_env_cgroup($rt);
        }
        #[test]
        fn exit_codes() {
            super::exit_codes($rt);
        }
        #[test]
        fn signals_term_and_kill() {
            super::signals_term_and_kill($rt);
        }
        #[test]
        fn exec_in_running_task() {
            super::exec_in_running_task($rt);
        }
        #[test]
        fn stdio_fifos() {
            super::stdio_fifos($rt);
        }
        #[test]
        fn tty() {
            super::tty($rt);
        }
        #[test]
        fn limits_memory_oom() {
            super::limits_memory_oom($rt);
        }
        #[test]
        fn limits_pids() {
            super::limits_pids($rt);
        }
        #[test]
        fn limits_read_only_rootfs() {
            super::limits_read_only_rootfs($rt);
        }
        #[test]
        fn pause_resume_metrics() {
            super::pause_resume_metrics($rt);
        }
        #[test]
        fn leaks_after_cycles() {
            super::leaks_after_cycles($rt);
        }
        #[test]
        fn bad_input() {
            super::bad_input($rt);
        }
    };
}

mod runc {
    conformance_suite!("runc");
}

mod native {
    conformance_suite!("native");
}

/// The microVM runtime: every scenario, each container inside a guest (QEMU; TCG here).
mod vm {
    conformance_suite!("vm");
}

/// Wasm: the scenarios that apply to an instance rather than a process tree (no PID 1,
/// hostname, cgroup or pids limit inside a guest; Exec is refused).
mod wasm {
    #[test]
    fn lifecycle_run_detach_ps_rm() {
        super::wasm_lifecycle("wasm");
    }
    #[test]
    fn exit_codes() {
        super::wasm_exit_codes("wasm");
    }
    #[test]
    fn signals_term_and_kill() {
        super::wasm_signals("wasm");
    }
    #[test]
    fn exec_is_unimplemented() {
        super::wasm_exec_unimplemented("wasm");
    }
    #[test]
    fn stdio_fifos() {
        super::wasm_stdio_fifos("wasm");
    }
    #[test]
    fn tty() {
        super::wasm_tty("wasm");
    }
    #[test]
    fn limits_memory_oom() {
        super::wasm_limits_memory_oom("wasm");
    }
    #[test]
    fn limits_read_only_rootfs() {
        super::wasm_limits_read_only_rootfs("wasm");
    }
    #[test]
    fn pause_resume_metrics() {
        super::wasm_pause_resume_metrics("wasm");
    }
    #[test]
    fn leaks_after_cycles() {
        super::leaks_after_cycles("wasm");
    }
    #[test]
    fn bad_input() {
        super::wasm_bad_input("wasm");
    }
}
