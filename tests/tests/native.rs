//! The native shim (`containerd-shim-yard-native-v1`) on its own terms: under real containerd
//! (Debian's 1.6, and the 1.7 and 2.1 peers fetched by `scripts/peers`) driven by the `ctr` shipped
//! with each; its shim v2 command line (`start`, `delete`) run by hand; and what only this shim
//! does behind switchyardd (tasks grouped into one shim, the runc backend via `BinaryName`).
//!
//! Lifecycle, exec, stdio, terminals, limits, pause, metrics, leaks and bad input through
//! switchyardd are covered for every runtime by `conformance.rs`; nothing here repeats them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_api::client::{REMOVE_HEADER, START_HEADER, WithNamespace, flag, set_flag};
use switchyard_api::containerd::services::tasks::v1 as tasks;
use switchyard_api::containerd::services::tasks::v1::tasks_client::TasksClient;
use switchyard_api::containerd::v1::types::Status;
use switchyard_tests::*;
use tonic::service::interceptor::InterceptedService;

/// Deadline for one client command.
const T: Duration = Duration::from_secs(60);
/// How long state may take to settle after a command returned (shim exit, cgroup removal).
const SETTLE: Duration = Duration::from_secs(5);
const RUNTIME_TYPE: &str = "io.containerd.yard-native.v1";
const SHIM: &str = "containerd-shim-yard-native-v1";
/// Where the shim keeps libcontainer's state (`engine.rs`: `STATE_ROOT/<namespace>/<id>`), and
/// runc's under `runc/` when `BinaryName` selects it.
const STATE_ROOT: &str = "/run/yard-native";

/// The shim binary, which must have been built.
fn shim_bin() -> PathBuf {
    bin(SHIM)
}

/// The socket path a shim server listens on (`-socket unix://PATH` in its command line).
fn socket_of(cmdline: &str) -> Option<PathBuf> {
    let mut words = cmdline.split_whitespace();
    words.find(|w| *w == "-socket")?;
    let addr = words.next()?;
    Some(PathBuf::from(addr.strip_prefix("unix://").unwrap_or(addr)))
}

/// What is left of native task `id` (namespace `default`, cgroup `cgroup`): shim processes,
/// libcontainer state, the shim's work directory, cgroups and mounts.
fn leftovers(id: &str, cgroup: &str) -> Vec<String> {
    let mut left = Vec::new();
    let needle = format!("-id {id} ");
    for (pid, cmd) in processes_matching(&[SHIM, &needle]) {
        left.push(format!("shim process {pid}: {cmd}"));
    }
    left.extend(state_leftovers(id, cgroup));
    left
}

/// Like `leftovers`, without shim processes (a group's shim is named after its first task).
fn state_leftovers(id: &str, cgroup: &str) -> Vec<String> {
    let mut left = Vec::new();
    for dir in [
        format!("{STATE_ROOT}/default/{id}"),
        format!("{STATE_ROOT}/default/.shim/{id}"),
        format!("{STATE_ROOT}/runc/default/{id}"),
        format!("{STATE_ROOT}/runc/default/.shim/{id}"),
    ] {
        if Path::new(&dir).exists() {
            left.push(format!("directory: {dir}"));
        }
    }
    for cg in cgroups_matching(cgroup) {
        left.push(format!("cgroup: {}", cg.display()));
    }
    for m in mounts_matching(id) {
        left.push(format!("mount: {m}"));
    }
    left
}

fn assert_no_leftovers(id: &str, cgroup: &str) {
    let clean = eventually(SETTLE, || leftovers(id, cgroup).is_empty());
    assert!(clean, "left behind by {id}: {:#?}", leftovers(id, cgroup));
}

// ---------------------------------------------------------------------------------------------
// containerd

/// `ctr run -d` of a native task sleeping for a minute.
fn run_detached(ctd: &Containerd, id: &str) -> Output {
    ctd.ctr_run(
        RUNTIME_TYPE,
        busybox_rootfs(),
        &["-d"],
        id,
        &["/bin/sleep", "60"],
    )
}

/// The spec `ctr oci spec` prints, made to run `args` in the busybox rootfs under the cgroup
/// ctr itself would give container `id`.
fn spec(ctd: &Containerd, id: &str, args: &[&str]) -> Value {
    let out = ctd.ctr_ok(&["oci", "spec"]);
    let mut spec: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctr oci spec: {e}: {}", show(&out)));
    spec["process"]["args"] = json!(args);
    spec["root"]["path"] = json!(busybox_rootfs());
    spec["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
    spec
}

/// The host's hostname: ctr sets none without `--hostname` (which 1.6 lacks), so the container's
/// new UTS namespace starts with a copy of the host's.
fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// One containerd line, end to end with its own ctr: run --rm (PID 1, hostname, cgroup, exit
/// code), a detached task with exec, pause/resume, metrics, ps, kill -9, rm; then nothing left.
fn native_under(binary: &Path, name: &str) {
    let ctd = Containerd::start(binary);
    let started = Instant::now();

    // Foreground, removed on exit.
    let id = unique_id("nat");
    let out = ctd.ctr_run(
        RUNTIME_TYPE,
        busybox_rootfs(),
        &["--rm"],
        &id,
        &[
            "/bin/sh",
            "-c",
            "echo $$; hostname; cat /proc/self/cgroup; exit 3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "[{name}] ctr run: {}",
        show(&out)
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"1"),
        "[{name}] not PID 1: {}",
        show(&out)
    );
    let hostname = lines.get(1).copied().unwrap_or_default();
    assert!(
        hostname == host_hostname(),
        "[{name}] hostname {hostname:?}: {}",
        show(&out)
    );
    let cgroup_suffix = format!(":/default/{id}");
    assert!(
        lines[2.min(lines.len())..]
            .iter()
            .any(|l| l.ends_with(&cgroup_suffix)),
        "[{name}] no cgroup line ending in {cgroup_suffix}: {}",
        show(&out)
    );
    assert!(
        !ctd.ctr_containers().contains(&id),
        "[{name}] ctr run --rm left container {id}"
    );
    assert_no_leftovers(&id, &format!("default/{id}"));

    // Detached, with an exec, pause/resume, metrics, ps, kill -9, rm.
    let id = unique_id("natd");
    let out = run_detached(&ctd, &id);
    assert!(out.status.success(), "[{name}] ctr run -d: {}", show(&out));
    let (pid, status) = ctd
        .ctr_task(&id)
        .unwrap_or_else(|| panic!("[{name}] {id} not in ctr task ls after run -d"));
    assert_eq!(status, "RUNNING", "[{name}]");
    assert!(pid > 0 && alive(pid), "[{name}] pid {pid}");
    let shims = ctd.shim_processes(SHIM);
    assert_eq!(shims.len(), 1, "[{name}] shim processes: {shims:?}");
    assert_eq!(
        ppid(pid),
        Some(shims[0].0),
        "[{name}] task is not the shim's child"
    );
    let shim_socket =
        socket_of(&shims[0].1).unwrap_or_else(|| panic!("[{name}] no -socket in {:?}", shims[0].1));
    assert!(shim_socket.exists(), "[{name}] {}", shim_socket.display());

    let out = ctd.ctr_output(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "/bin/sh",
        "-c",
        "echo hi; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "[{name}] exec: {}", show(&out));
    assert_eq!(text(&out.stdout), "hi\n", "[{name}] exec: {}", show(&out));

    ctd.ctr_ok(&["task", "pause", &id]);
    assert_eq!(
        ctd.ctr_task(&id),
        Some((pid, "PAUSED".to_owned())),
        "[{name}]"
    );
    ctd.ctr_ok(&["task", "resume", &id]);
    assert_eq!(
        ctd.ctr_task(&id),
        Some((pid, "RUNNING".to_owned())),
        "[{name}]"
    );

    let out = ctd.ctr_ok(&["task", "metrics", &id]);
    let metrics = text(&out.stdout);
    assert!(
        metrics.lines().any(|l| {
            let mut cols = l.split_whitespace();
            cols.next().is_some_and(|k| k.starts_with("memory.usage"))
                && cols
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v > 0)
        }),
        "[{name}] no memory usage in ctr task metrics: {}",
        show(&out)
    );

    let out = ctd.ctr_ok(&["task", "ps", &id]);
    let pids: Vec<u32> = text(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(pids, vec![pid], "[{name}] ctr task ps: {}", show(&out));

    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    ctd.wait_ctr_status(&id, "STOPPED", Duration::from_secs(10));
    let out = ctd.ctr_output(&["task", "rm", &id]);
    assert!(out.status.success(), "[{name}] ctr task rm: {}", show(&out));
    assert!(
        text(&out.stderr).contains("exit with non-zero exit code 137"),
        "[{name}] ctr task rm does not report exit code 137: {}",
        show(&out)
    );
    ctd.ctr_ok(&["containers", "rm", &id]);
    assert_eq!(ctd.ctr_task(&id), None, "[{name}]");
    assert!(!ctd.ctr_containers().contains(&id), "[{name}]");

    let gone = eventually(SETTLE, || ctd.shim_processes(SHIM).is_empty());
    assert!(gone, "[{name}] shims left: {:?}", ctd.shim_processes(SHIM));
    assert!(!alive(pid), "[{name}] task {pid} survives");
    assert!(
        !shim_socket.exists(),
        "[{name}] the shim left its socket {}",
        shim_socket.display()
    );
    assert_no_leftovers(&id, &format!("default/{id}"));
    eprintln!("[{name}] done in {:?}", started.elapsed());
}

#[test]
fn native_under_containerd_1_6() {
    if !require_root_and(&["containerd", "ctr"]) {
        return;
    }
    native_under(&which("containerd").unwrap(), "containerd-1.6");
}

#[test]
fn native_under_containerd_1_7() {
    if !require_root_and(&[]) {
        return;
    }
    let Some(bin) = require_peer_containerd("containerd-1.7") else {
        return;
    };
    native_under(&bin, "containerd-1.7");
}

#[test]
fn native_under_containerd_2_1() {
    if !require_root_and(&[]) {
        return;
    }
    let Some(bin) = require_peer_containerd("containerd-2.1") else {
        return;
    };
    native_under(&bin, "containerd-2.1");
}

#[test]
fn native_kill_9_exit_code_and_event() {
    if !require_root_and(&["containerd", "ctr"]) {
        return;
    }
    let ctd = Containerd::start(&which("containerd").unwrap());
    let events = CtrEvents::watch(&ctd);

    // SIGKILL: /tasks/exit with 137.
    let id = unique_id("k9");
    let out = run_detached(&ctd, &id);
    assert!(out.status.success(), "ctr run -d: {}", show(&out));
    let (pid, _) = ctd.ctr_task(&id).expect("task listed");
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    let exits = events.wait_for("/tasks/exit", &id);
    assert_eq!(exits.len(), 1, "exit events for {id}: {}", events.text());
    assert_eq!(exits[0]["exit_status"], 137, "{}", exits[0]);
    assert_eq!(exits[0]["pid"], pid, "{}", exits[0]);
    assert_eq!(exits[0]["id"], id.as_str(), "{}", exits[0]);
    ctd.wait_ctr_status(&id, "STOPPED", Duration::from_secs(10));
    ctd.ctr_ok(&["task", "rm", &id]);
    let deletes = events.wait_for("/tasks/delete", &id);
    assert_eq!(deletes.len(), 1, "{}", events.text());
    assert_eq!(deletes[0]["exit_status"], 137, "{}", deletes[0]);
    ctd.ctr_ok(&["containers", "rm", &id]);
    assert_no_leftovers(&id, &format!("default/{id}"));

    // Out of memory: /tasks/oom, and the task dies with 137. One process grows until it is
    // killed: with more than one (a pipeline), the kernel may kill two before the first is
    // gone (2 runs in 40 here), and each kill is an event of its own.
    let id = unique_id("oom");
    let out = ctd.ctr_run(
        RUNTIME_TYPE,
        busybox_rootfs(),
        &["--rm", "--memory-limit", "33554432"],
        &id,
        &["/bin/sh", "-c", "x=a; while :; do x=$x$x; done"],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "ctr run (oom): {}",
        show(&out)
    );
    let ooms = events.wait_for("/tasks/oom", &id);
    // One kill, one event (as runc's shim does), however often the cgroup hit its limit.
    assert_eq!(
        ooms.len(),
        1,
        "expected exactly one /tasks/oom for {id}: {}",
        events.text()
    );
    let exits = events.wait_for("/tasks/exit", &id);
    assert_eq!(exits.len(), 1, "{}", events.text());
    assert_eq!(exits[0]["exit_status"], 137, "{}", exits[0]);
    // The kill is told before the exit it caused (CRI's `OOMKilled` depends on it).
    let order = events.topics(&id);
    let at = |t: &str| order.iter().position(|x| x == t);
    assert!(
        at("/tasks/oom") < at("/tasks/exit"),
        "/tasks/oom after /tasks/exit: {order:?}"
    );
    eprintln!("{} /tasks/oom event(s) for {id}", ooms.len());
    assert_no_leftovers(&id, &format!("default/{id}"));
}

#[test]
fn native_bad_input_under_containerd() {
    if !require_root_and(&["containerd", "ctr"]) {
        return;
    }
    let ctd = Containerd::start(&which("containerd").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let args = ["/bin/sh", "-c", "echo good; exit 5"];

    type Breaker = fn(&mut Value) -> Vec<String>;
    let cases: [(&str, Breaker); 4] = [
        ("bogus namespace", |s| {
            let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
            ns.push(json!({"type": "bogus"}));
            vec![
                format!("linux.namespaces[{}]", ns.len() - 1),
                "bogus".into(),
                "invalid argument".into(),
            ]
        }),
        ("missing bind source", |s| {
            let mounts = s["mounts"].as_array_mut().unwrap();
            mounts.push(json!({
                "destination": "/x",
                "type": "bind",
                "source": "/nonexistent/bind-source",
                "options": ["rbind"],
            }));
            vec![
                format!("mounts[{}].source", mounts.len() - 1),
                "/nonexistent/bind-source".into(),
                "invalid argument".into(),
            ]
        }),
        ("missing root.path", |s| {
            s["root"]["path"] = json!("/nonexistent/rootfs-dir");
            vec![
                "root.path".into(),
                "/nonexistent/rootfs-dir".into(),
                "invalid argument".into(),
            ]
        }),
        ("unknown mount type", |s| {
            let mounts = s["mounts"].as_array_mut().unwrap();
            mounts.push(json!({"destination": "/x", "type": "nosuchfs", "source": "none"}));
            vec![
                format!("mounts[{}].type", mounts.len() - 1),
                "nosuchfs".into(),
                "invalid argument".into(),
            ]
        }),
    ];

    for (what, breaker) in cases {
        let id = unique_id("bad");
        let mut spec = spec(&ctd, &id, &args);
        let expect = breaker(&mut spec);
        let file = dir.path().join(format!("{id}.json"));
        write(&file, &spec.to_string());
        let file = file.display().to_string();
        let out = ctd.ctr_output(&["run", "--runtime", RUNTIME_TYPE, "--config", &file, &id]);
        assert!(!out.status.success(), "{what}: accepted: {}", show(&out));
        let err = text(&out.stderr);
        for e in &expect {
            assert!(
                err.contains(e.as_str()),
                "{what}: {e:?} not in: {}",
                show(&out)
            );
        }
        assert!(!err.contains("panicked"), "{what}: {}", show(&out));
        assert_no_leftovers(&id, &format!("default/{id}"));
        assert_eq!(ctd.ctr_task(&id), None, "{what}: task left in containerd");
        // ctr run without --rm keeps the container record after a failed start; it must be
        // removable (no task holds it).
        ctd.ctr_ok(&["containers", "rm", &id]);
        assert!(
            !ctd.ctr_containers().contains(&id),
            "{what}: container listed"
        );
        assert!(
            ctd.shim_processes(SHIM).is_empty(),
            "{what}: {:?}",
            ctd.shim_processes(SHIM)
        );
    }

    // containerd and the shim still run a good container.
    let id = unique_id("good");
    let spec = spec(&ctd, &id, &args);
    let file = dir.path().join(format!("{id}.json"));
    write(&file, &spec.to_string());
    let file = file.display().to_string();
    let out = ctd.ctr_output(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME_TYPE,
        "--config",
        &file,
        &id,
    ]);
    assert_eq!(out.status.code(), Some(5), "good spec: {}", show(&out));
    assert_eq!(text(&out.stdout), "good\n", "{}", show(&out));
    assert!(!ctd.ctr_containers().contains(&id));
    assert_no_leftovers(&id, &format!("default/{id}"));
}

// ---------------------------------------------------------------------------------------------
// switchyardd

/// Starts a detached native task; returns its pid.
fn detach(d: &Daemon, runtime: &str, id: &str, extra: &[&str]) -> u32 {
    let mut args = vec!["-d", "--runtime", runtime, "--name", id];
    args.extend_from_slice(extra);
    let out = d.yard_run(busybox_rootfs(), &args, &["/bin/sleep", "60"]);
    assert!(out.status.success(), "yard run -d {id}: {}", show(&out));
    let row = d
        .ps_row(id)
        .unwrap_or_else(|| panic!("{id} not in yard ps"));
    assert_eq!(row["status"], "running", "{row}");
    let pid = row["pid"].as_u64().unwrap_or(0) as u32;
    assert!(pid > 0 && alive(pid), "{row}");
    pid
}

#[test]
fn native_shim_grouping() {
    if !require_root_and(&[]) {
        return;
    }
    shim_bin();
    let d = Daemon::start();
    let group = format!("io.switchyard.group={}", unique_id("grp"));
    let (a, b, c) = (unique_id("ga"), unique_id("gb"), unique_id("solo"));

    let pa = detach(&d, "native", &a, &["--annotation", &group]);
    let pb = detach(&d, "native", &b, &["--annotation", &group]);
    let shims = d.shim_servers(SHIM);
    assert_eq!(
        shims.len(),
        1,
        "one shim should serve the group: {shims:#?}"
    );
    let group_shim = shims[0].0;
    let group_socket = socket_of(&shims[0].1).unwrap();
    assert_eq!(ppid(pa), Some(group_shim), "{a} is not the group shim's");
    assert_eq!(ppid(pb), Some(group_shim), "{b} is not the group shim's");

    // A task without the annotation gets its own shim.
    let pc = detach(&d, "native", &c, &[]);
    let shims = d.shim_servers(SHIM);
    assert_eq!(shims.len(), 2, "{shims:#?}");
    let solo_shim = ppid(pc).unwrap();
    assert_ne!(solo_shim, group_shim);
    assert!(shims.iter().any(|(p, _)| *p == solo_shim), "{shims:#?}");
    // switchyardd started both servers itself, without `<shim> start` (whose server would
    // have been reparented away from the daemon when `start` exited).
    for shim in [group_shim, solo_shim] {
        assert_eq!(
            ppid(shim),
            d.pid(),
            "shim server {shim} is not switchyardd's child"
        );
    }

    // Removing one task of the group keeps the shim for the other.
    d.rm_force(&a);
    assert_eq!(d.ps_row(&a), None, "{a} still listed");
    let row = d.ps_row(&b).unwrap_or_else(|| panic!("{b} gone with {a}"));
    assert_eq!(row["status"], "running", "{row}");
    assert!(
        alive(pb) && alive(group_shim),
        "the group shim or {b} died with {a}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(group_shim), "the group shim exited with a task left");
    assert_eq!(ppid(pb), Some(group_shim));
    // The shim started in the first task's bundle, which has gone with it: a new task of the
    // group still joins it (its runtime process once failed "failed to get cwd").
    let e = unique_id("ge");
    let pe = detach(&d, "native", &e, &["--annotation", &group]);
    assert_eq!(ppid(pe), Some(group_shim), "{e} is not the group shim's");
    d.rm_force(&e);
    let clean = eventually(SETTLE, || {
        state_leftovers(&a, &format!("switchyard/default/{a}")).is_empty()
    });
    assert!(
        clean,
        "left behind by {a}: {:#?}",
        state_leftovers(&a, &format!("switchyard/default/{a}"))
    );

    // After the last task of the group the shim stays warm for the group's next task
    // (GROUP_IDLE_EXIT, 3 s), then exits by itself.
    d.rm_force(&b);
    let gone = eventually(SETTLE, || !alive(group_shim));
    assert!(gone, "group shim {group_shim} outlived its idle time");
    assert!(
        !group_socket.exists(),
        "the group shim left its socket {}",
        group_socket.display()
    );
    assert_no_leftovers(&a, &format!("switchyard/default/{a}"));
    assert_no_leftovers(&b, &format!("switchyard/default/{b}"));
    assert!(alive(solo_shim) && alive(pc), "{c} or its shim died");
    let row = d.ps_row(&c).unwrap();
    assert_eq!(row["status"], "running", "{row}");

    d.rm_force(&c);
    assert!(eventually(SETTLE, || d.shim_servers(SHIM).is_empty()));
    assert_no_leftovers(&c, &format!("switchyard/default/{c}"));
}

/// A process whose spec sets no `HOME` gets runc's (its uid's home in the image's
/// `/etc/passwd`, else `/`), and the container's init loads no NSS module the image names.
/// libcontainer's own lookup, glibc's `getpwuid_r` in the init, would load the image's
/// `libnss_*.so.2` into the init before its exec: image code there. Here that module is a fifo
/// the test watches for a reader.
#[test]
fn native_home_is_runcs_and_no_nss_module_of_the_image_is_loaded() {
    if !require_root_and(&["runc", "mkfifo"]) {
        return;
    }
    let rootfs = tempfile::tempdir().unwrap();
    busybox_tree(rootfs.path());
    write(
        &rootfs.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000:U:/home/u:/bin/sh\n",
    );
    write(
        &rootfs.path().join("etc/nsswitch.conf"),
        "passwd: evil files\n",
    );
    let lib = rootfs.path().join("lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib).unwrap();
    let module = lib.join("libnss_evil.so.2");
    let out = run_timeout(Command::new("mkfifo").arg(&module), T);
    assert!(out.status.success(), "mkfifo: {}", show(&out));
    let out = run_timeout(Command::new("ctr").args(["oci", "spec"]), T);
    assert!(out.status.success(), "ctr oci spec: {}", show(&out));
    let base: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        base["process"]["env"].is_null(),
        "ctr's spec sets an environment: {base}"
    );
    let d = Daemon::start();
    let configs = tempfile::tempdir().unwrap();
    // ctr 1.6 has no --user: the whole spec, with its process's uid, from a file.
    let config = |id: &str, uid: u32, args: &[&str]| {
        let mut spec = base.clone();
        spec["process"]["args"] = json!(args);
        spec["process"]["user"] = json!({"uid": uid, "gid": uid});
        spec["root"] = json!({"path": rootfs.path()});
        spec["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
        let path = configs.path().join(format!("{id}.json"));
        write(&path, &spec.to_string());
        path.display().to_string()
    };
    let echo_home = ["/bin/sh", "-c", "echo \"$HOME\""];
    // A file bind-mounted over the image's /etc/passwd (a volume, say) is the one that counts.
    let users = configs.path().join("users");
    write(&users, "root:x:0:0:root:/from-a-mount:/bin/sh\n");
    for runtime in [RUNTIME_TYPE, "io.containerd.runc.v2"] {
        for (uid, home) in [(0, "/root"), (1000, "/home/u"), (4321, "/")] {
            let id = unique_id("home");
            let spec = config(&id, uid, &echo_home);
            let args = ["run", "--runtime", runtime, "--rm", "--config", &spec, &id];
            let out = ctr_watching(&d, &args, &module);
            assert_eq!(
                text(&out.stdout),
                format!("{home}\n"),
                "{runtime}, uid {uid}"
            );
        }
        let id = unique_id("home-mount");
        let spec = config(&id, 0, &echo_home);
        let mut with_mount: Value =
            serde_json::from_str(&std::fs::read_to_string(&spec).unwrap()).unwrap();
        with_mount["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/etc/passwd",
            "type": "bind",
            "source": users,
            "options": ["rbind", "ro"],
        }));
        write(Path::new(&spec), &with_mount.to_string());
        let args = ["run", "--runtime", runtime, "--rm", "--config", &spec, &id];
        let out = ctr_watching(&d, &args, &module);
        assert_eq!(text(&out.stdout), "/from-a-mount\n", "{runtime}, mount");
        // An exec's process (ctr copies the container's, without HOME) gets the same.
        let id = unique_id("home-exec");
        let spec = config(&id, 1000, &["/bin/sleep", "600"]);
        d.ctr_ok(&["run", "--runtime", runtime, "-d", "--config", &spec, &id]);
        let mut args = vec!["task", "exec", "--exec-id", "e1", &id];
        args.extend(echo_home);
        let out = ctr_watching(&d, &args, &module);
        assert_eq!(text(&out.stdout), "/home/u\n", "{runtime}, exec");
        d.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
        d.wait_ctr_status(&id, "STOPPED", SETTLE);
        d.ctr_ok(&["task", "rm", &id]);
        d.ctr_ok(&["containers", "rm", &id]);
    }
}

/// `ctr ARGS` on `d`, which must succeed, while watching that nothing opens the fifo `module`
/// (opening a fifo to write without blocking succeeds only while it has a reader; what the
/// reader then reads is no library, so a loader gives up on it).
fn ctr_watching(d: &Daemon, args: &[&str], module: &Path) -> Output {
    let mut opened = false;
    let out = std::thread::scope(|s| {
        let run = s.spawn(|| d.ctr_output(args));
        eventually(CLIENT_DEADLINE, || {
            if let Ok(mut w) = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(module)
            {
                opened = true;
                let _ = w.write_all(b"not a library");
            }
            run.is_finished()
        });
        run.join().unwrap()
    });
    assert!(
        !opened,
        "ctr {args:?}: the container opened the image's NSS module"
    );
    assert!(out.status.success(), "ctr {args:?}: {}", show(&out));
    out
}

#[test]
fn native_binary_name_runc_option() {
    if !require_root_and(&["runc"]) {
        return;
    }
    shim_bin();
    // runc-class options, containerd's key spelling (core/daemon/src/runtime/options.rs).
    let d = Daemon::start_with(
        "[runtimes.native-runc]\nruntime_type = \"io.containerd.yard-native.v1\"\n\
         [runtimes.native-runc.options]\nBinaryName = \"runc\"\n",
    );

    let id = unique_id("nrr");
    let out = d.yard_run(
        busybox_rootfs(),
        &["--rm", "--runtime", "native-runc", "--name", &id],
        &["/bin/sh", "-c", "echo $$; exit 6"],
    );
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    assert_eq!(text(&out.stdout), "1\n", "{}", show(&out));
    assert_no_leftovers(&id, &format!("switchyard/default/{id}"));

    // Detached: runc's state (not libcontainer's) under the runc root the shim gives it.
    let id = unique_id("nrd");
    let pid = detach(&d, "native-runc", &id, &[]);
    let runc_root = format!("{STATE_ROOT}/runc/default");
    let state = Path::new(&runc_root).join(&id).join("state.json");
    let state_text =
        std::fs::read_to_string(&state).unwrap_or_else(|e| panic!("{}: {e}", state.display()));
    assert!(
        state_text.contains("\"init_process_pid\""),
        "not runc's state.json: {state_text}"
    );
    assert!(
        !Path::new(&format!("{STATE_ROOT}/default/{id}")).exists(),
        "libcontainer state exists for a runc-backed task"
    );
    let out = run_timeout(
        Command::new("runc").args(["--root", &runc_root, "state", &id]),
        T,
    );
    assert!(out.status.success(), "runc state: {}", show(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["pid"], pid, "{st}");
    let shims = d.shim_servers(SHIM);
    assert_eq!(shims.len(), 1, "{shims:#?}");
    assert_eq!(ppid(pid), Some(shims[0].0), "task is not the shim's child");

    d.rm_force(&id);
    assert_eq!(d.ps_row(&id), None);
    assert!(!alive(pid), "task {pid} survives yard rm --force");
    assert!(eventually(SETTLE, || d.shim_servers(SHIM).is_empty()));
    assert_no_leftovers(&id, &format!("switchyard/default/{id}"));
}

// ---------------------------------------------------------------------------------------------
// The shim's own command line

#[test]
fn native_shim_delete_action_is_fast_and_idempotent() {
    use prost::Message;
    use switchyard_api::containerd::task::v2::DeleteResponse;
    let shim = shim_bin();
    let cwd = tempfile::tempdir().unwrap();
    for round in 1..=2 {
        let started = Instant::now();
        let out = run_timeout(
            Command::new(&shim)
                .current_dir(cwd.path())
                .args(["-namespace", "default", "-id", "NOPE", "-address", "/tmp/x"])
                .arg("delete"),
            Duration::from_secs(10),
        );
        let took = started.elapsed();
        assert!(out.status.success(), "round {round}: {}", show(&out));
        assert!(
            took < Duration::from_secs(1),
            "round {round}: took {took:?}"
        );
        assert!(!out.stdout.is_empty(), "round {round}: empty stdout");
        let resp = DeleteResponse::decode(out.stdout.as_slice())
            .unwrap_or_else(|e| panic!("round {round}: not a DeleteResponse: {e}: {out:?}"));
        assert_eq!(resp.exit_status, 137, "round {round}: {resp:?}");
        assert!(resp.exited_at.is_some(), "round {round}: {resp:?}");
        let err = text(&out.stderr);
        assert!(
            !err.lines().any(|l| l.contains("WARN")),
            "round {round}: warnings: {err}"
        );
        eprintln!("delete round {round}: {took:?}");
    }
    let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
    assert!(left.is_empty(), "delete wrote into its cwd: {left:?}");
}

/// `<shim> delete` after a shim died in the middle of a create: the shim's work directory for
/// the container exists, libcontainer's state does not yet, and the container's cgroup holds a
/// process. `delete` must kill it and remove the work directory and the cgroup, even though a
/// container with neither state nor work directory (its shim deleted it) needs nothing.
#[test]
fn native_delete_sweeps_a_container_whose_shim_died_creating_it() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let id = unique_id("halfmade");
    let cgroup = format!("yard-test/{id}");
    let bundle = tempfile::tempdir().unwrap();
    let spec = Command::new("ctr").args(["oci", "spec"]).output().unwrap();
    assert!(spec.status.success(), "ctr oci spec: {}", show(&spec));
    let mut spec: Value = serde_json::from_slice(&spec.stdout).unwrap();
    spec["linux"]["cgroupsPath"] = json!(format!("/{cgroup}"));
    std::fs::write(bundle.path().join("config.json"), spec.to_string()).unwrap();
    // The process the half-made container left, in a cgroup of every hierarchy.
    let mut orphan = Command::new("sleep").arg("600").spawn().unwrap();
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = std::iter::once(root.to_owned())
        .chain(std::fs::read_dir(root).unwrap().flatten().map(|e| e.path()))
        .filter(|d| d.join("cgroup.procs").exists())
        // A hybrid host's named and v2 hierarchies are not libcontainer's on cgroup v1.
        .filter(|d| !d.ends_with("systemd") && !d.ends_with("unified"))
        .collect();
    for h in &hierarchies {
        let mut dir = h.clone();
        for part in cgroup.split('/') {
            let parent = dir.clone();
            dir.push(part);
            let _ = std::fs::create_dir(&dir);
            // A new v1 cpuset has no cpus or memory nodes, and takes no process until given some.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if std::fs::read_to_string(dir.join(f)).is_ok_and(|v| v.trim().is_empty()) {
                    let v = std::fs::read_to_string(parent.join(f)).unwrap();
                    std::fs::write(dir.join(f), v.trim()).unwrap();
                }
            }
        }
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, orphan.id().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
    }
    let work = PathBuf::from(format!("{STATE_ROOT}/default/.shim/{id}"));
    std::fs::create_dir_all(&work).unwrap();

    let out = run_timeout(
        Command::new(shim_bin())
            .args(["-namespace", "default", "-id", &id, "-address", "/tmp/x"])
            .arg("-bundle")
            .arg(bundle.path())
            .arg("delete"),
        Duration::from_secs(30),
    );
    let ended = eventually(SETTLE, || orphan.try_wait().is_ok_and(|s| s.is_some()));
    let left = state_leftovers(&id, &cgroup);
    if !ended {
        let _ = orphan.kill();
        let _ = orphan.wait();
    }
    kill_cgroup_tree("yard-test");
    let _ = std::fs::remove_dir_all(&work);
    assert!(out.status.success(), "{}", show(&out));
    assert!(ended, "the half-made container's process still runs");
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// Kills a shim server started by hand, and removes its socket.
struct ServerGuard {
    id: String,
    socket: Option<PathBuf>,
}

impl ServerGuard {
    fn servers(&self) -> Vec<(u32, String)> {
        processes_matching(&[SHIM, &format!("-id {} ", self.id), "-socket"])
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        for (pid, _) in self.servers() {
            sigkill(pid);
        }
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

#[test]
fn native_start_prints_only_the_address() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let shim = shim_bin();
    let bundle = tempfile::tempdir().unwrap();
    let id = unique_id("start");
    let out = run_timeout(Command::new("ctr").args(["oci", "spec"]), T);
    assert!(out.status.success(), "ctr oci spec: {}", show(&out));
    let mut spec: Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["process"]["args"] = json!(["/bin/true"]);
    spec["root"]["path"] = json!(busybox_rootfs());
    spec["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
    write(&bundle.path().join("config.json"), &spec.to_string());
    let address_arg = format!("/tmp/{id}.sock");
    let mut guard = ServerGuard {
        id: id.clone(),
        socket: None,
    };

    let start = |max: Option<&str>| {
        let mut c = Command::new(&shim);
        c.current_dir(bundle.path())
            .args([
                "-namespace",
                "default",
                "-id",
                &id,
                "-address",
                &address_arg,
            ])
            .arg("start")
            .env_remove("TTRPC_ADDRESS")
            .env_remove("MAX_SHIM_VERSION");
        if let Some(v) = max {
            c.env("MAX_SHIM_VERSION", v);
        }
        let started = Instant::now();
        let out = run_timeout(&mut c, Duration::from_secs(20));
        eprintln!("start (MAX_SHIM_VERSION={max:?}): {:?}", started.elapsed());
        out
    };

    let out = start(None);
    assert!(out.status.success(), "start: {}", show(&out));
    let address = text(&out.stdout);
    let hex = address
        .strip_prefix("unix:///run/containerd/s/")
        .unwrap_or_else(|| panic!("start printed more or other than the address: {address:?}"));
    assert!(
        hex.len() == 64
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_uppercase()),
        "start printed more or other than the address: {address:?}"
    );
    let socket = PathBuf::from(address.trim_start_matches("unix://"));
    guard.socket = Some(socket.clone());
    let file = std::fs::read_to_string(bundle.path().join("address")).unwrap();
    assert_eq!(file, address, "the bundle's address file");
    let servers = guard.servers();
    assert_eq!(servers.len(), 1, "{servers:#?}");
    assert!(
        servers[0].1.contains(&format!("-socket {address}")),
        "{servers:#?}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "nothing listens on {}",
        socket.display()
    );
    // `start` bound the socket and handed it to the server as descriptor 3 (as containerd's Go
    // shims do), so it did not wait for the server to come up.
    let inode = listening_socket_inode(&socket).expect("the listening socket");
    assert_eq!(
        fd_target(servers[0].0, 3),
        Some(format!("socket:[{inode}]")),
        "the server's descriptor 3 is not the socket start bound"
    );

    // containerd 2.x and switchyardd offer task v3: the JSON bootstrap, same server.
    let out = start(Some("3"));
    assert!(out.status.success(), "start v3: {}", show(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("start v3 did not print JSON only: {e}: {}", show(&out)));
    assert_eq!(
        v,
        json!({"version": 3, "address": address, "protocol": "ttrpc"}),
        "{}",
        show(&out)
    );
    let file = std::fs::read_to_string(bundle.path().join("address")).unwrap();
    assert_eq!(
        file, address,
        "the bundle's address file after the second start"
    );
    let one = eventually(SETTLE, || guard.servers().len() == 1);
    assert!(one, "servers for {id}: {:#?}", guard.servers());

    // Nobody sent Create: the server ends on its own (`UNCLAIMED_EXIT`, 10 s) and takes its
    // socket with it. A caller killed mid-start left such servers behind (the chaos test).
    let server = guard.servers()[0].0;
    assert!(
        eventually(Duration::from_secs(30), || !alive(server)),
        "a shim server no Create reached is still there"
    );
    assert!(!socket.exists(), "{} left", socket.display());
    drop(guard);
}

/// The task's status through the task API (`tasks.v1` Get).
async fn task_status(
    t: &mut TasksClient<InterceptedService<tonic::transport::Channel, WithNamespace>>,
    id: &str,
) -> i32 {
    let r = t
        .get(tasks::GetRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("get {id}: {e}"));
    r.into_inner().process.map(|p| p.status).unwrap_or_default()
}

/// `switchyard-start` on Tasks.Create: switchyardd starts the task in the same call and says so
/// in the answer's metadata; `switchyard-remove-container` on Tasks.Delete removes the container
/// too, and says so. Without them a task is only created and only the task is deleted, as
/// containerd's API has it.
#[test]
fn the_start_and_remove_headers_start_and_remove() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let d = Daemon::start_with("");
    let rootfs = busybox_rootfs().display().to_string();
    let (started, created) = (unique_id("hdr"), unique_id("nohdr"));
    for id in [&started, &created] {
        d.ctr_ok(&[
            "containers",
            "create",
            "--runtime",
            RUNTIME_TYPE,
            "--rootfs",
            &rootfs,
            id,
            "/bin/sleep",
            "60",
        ]);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = switchyard_api::client::connect(&d.socket).await.unwrap();
        let ns = WithNamespace::new("default").unwrap();
        let mut t = TasksClient::with_interceptor(channel, ns);
        let mut req = tonic::Request::new(tasks::CreateTaskRequest {
            container_id: started.clone(),
            ..Default::default()
        });
        set_flag(req.metadata_mut(), START_HEADER);
        let r = t.create(req).await.expect("create with the header");
        assert!(
            flag(r.metadata(), START_HEADER),
            "the answer does not say the task was started: {:?}",
            r.metadata()
        );
        assert!(r.get_ref().pid > 0, "{:?}", r.get_ref());
        assert_eq!(
            task_status(&mut t, &started).await,
            Status::Running as i32,
            "a task created with the header is not running"
        );

        let r = t
            .create(tasks::CreateTaskRequest {
                container_id: created.clone(),
                ..Default::default()
            })
            .await
            .expect("create without the header");
        assert!(
            r.metadata().get(START_HEADER).is_none(),
            "{:?}",
            r.metadata()
        );
        assert_eq!(
            task_status(&mut t, &created).await,
            Status::Created as i32,
            "a task created without the header was started"
        );
        for id in [&started, &created] {
            t.kill(tasks::KillRequest {
                container_id: id.clone(),
                signal: 9,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("kill {id}: {e}"));
            t.wait(tasks::WaitRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("wait {id}: {e}"));
        }
        let mut req = tonic::Request::new(tasks::DeleteTaskRequest {
            container_id: started.clone(),
        });
        set_flag(req.metadata_mut(), REMOVE_HEADER);
        let r = t.delete(req).await.expect("delete with the header");
        assert!(
            flag(r.metadata(), REMOVE_HEADER),
            "the answer does not say the container was removed: {:?}",
            r.metadata()
        );
        assert_eq!(r.get_ref().exit_status, 137, "{:?}", r.get_ref());
        let r = t
            .delete(tasks::DeleteTaskRequest {
                container_id: created.clone(),
            })
            .await
            .expect("delete without the header");
        assert!(
            r.metadata().get(REMOVE_HEADER).is_none(),
            "{:?}",
            r.metadata()
        );
    });
    let listed = text(&d.ctr_ok(&["containers", "ls", "-q"]).stdout);
    let listed: Vec<&str> = listed.lines().collect();
    assert!(
        !listed.contains(&started.as_str()),
        "a container whose task was deleted with the header is still there: {listed:?}"
    );
    assert!(
        listed.contains(&created.as_str()),
        "a container whose task was deleted without the header is gone: {listed:?}"
    );
    d.ctr_ok(&["containers", "rm", &created]);
}

/// `yard run --rm` against containerd, which ignores `switchyard-start` and
/// `switchyard-remove-container`: yard sees no such header in the answers and starts the task
/// and removes the container itself.
#[test]
fn yard_run_starts_the_task_itself_against_containerd() {
    if !require_root_and(&["containerd", "ctr"]) {
        return;
    }
    let ctd = Containerd::start(&which("containerd").unwrap());
    let out = run_timeout(
        Command::new(bin("yard"))
            .arg("--address")
            .arg(&ctd.socket)
            .args(["run", "--rm", "--runtime", RUNTIME_TYPE, "--rootfs"])
            .arg(busybox_rootfs())
            .args(["--", "/bin/echo", "started by yard"]),
        T,
    );
    assert!(out.status.success(), "yard run: {}", show(&out));
    assert_eq!(
        text(&out.stdout).trim(),
        "started by yard",
        "{}",
        show(&out)
    );
    // `--rm` removed the container too (with its own Containers.Delete here).
    let listed = text(&ctd.ctr_ok(&["containers", "ls", "-q"]).stdout);
    assert!(listed.trim().is_empty(), "containers left: {listed}");
}
