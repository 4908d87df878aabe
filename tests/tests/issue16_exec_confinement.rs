//! Issue 16 item 9: a process started by exec in a `native` container is confined exactly as the
//! container's init (seccomp filter, capabilities, no_new_privs, cgroup, namespaces), as runc
//! does it; and the native shim's runtime mode where issue 18 found it behind runc: rootfs
//! propagation `rshared`/`rslave`/`rprivate`, and the runtime's real error reported; and issue
//! 19's: a seccomp profile applied as runc applies it (`noNewPrivileges: false`, a masked
//! comparison), and a filter the kernel refuses named with the reason.
//!
//! Each scenario runs under real containerd with runc first (the oracle: the assertions are
//! runc's behaviour) and then with the native shim; the exec scenario also runs through
//! switchyardd with `yard exec`, and once against the runtime mode directly, with an exec
//! process that names no capabilities (which a client may send; the runtime must fill them in
//! from the container, not leave root's full set).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_tests::*;

const T: Duration = Duration::from_secs(60);
const NATIVE: &str = "io.containerd.yard-native.v1";
const RUNC: &str = "io.containerd.runc.v2";
const SHIM: &str = "containerd-shim-yard-native-v1";

fn ok(what: &str, out: Output) -> Output {
    assert!(out.status.success(), "{what}: {}", show(&out));
    out
}

/// A seccomp profile that allows everything but `sethostname`, which fails with ENOSYS: not the
/// EPERM a missing capability gives, so the error says the filter is there.
fn profile() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    })
}

/// `ctr oci spec`, made to run `args` in the busybox rootfs with cgroup `/default/ID`.
fn spec(ctr: &mut Command, id: &str, args: &[&str]) -> Value {
    let out = ok("ctr oci spec", run_timeout(ctr.args(["oci", "spec"]), T));
    let mut spec: Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["process"]["args"] = json!(args);
    spec["process"]["env"] = json!(["PATH=/bin"]);
    spec["root"]["path"] = json!(busybox_rootfs());
    spec["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
    spec
}

/// The lines of `/proc/PID/status` that make up a process's confinement.
fn confinement(status: &str) -> BTreeMap<String, String> {
    const KEYS: &[&str] = &[
        "Seccomp",
        "Seccomp_filters",
        "NoNewPrivs",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
    ];
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| KEYS.contains(k))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// `ls -l /proc/X/ns` as name → namespace.
fn namespaces(ls: &str) -> BTreeMap<String, String> {
    ls.lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            Some((
                left.split_whitespace().last()?.to_owned(),
                target.to_owned(),
            ))
        })
        .collect()
}

/// What an exec saw against its container's init, from inside the exec: the cgroup and
/// namespaces of the exec's process and of PID 1.
const SELF_AND_INIT: &str = "cat /proc/self/cgroup; echo ===; cat /proc/1/cgroup; echo ===; \
     ls -l /proc/self/ns; echo ===; ls -l /proc/1/ns";

fn check_self_and_init(what: &str, out: &str) {
    let parts: Vec<&str> = out.split("===\n").collect();
    assert_eq!(parts.len(), 4, "{what}: {out}");
    assert!(!parts[1].trim().is_empty(), "{what}: no cgroup: {out}");
    assert_eq!(parts[0], parts[1], "{what}: the exec is in another cgroup");
    let (mine, init) = (namespaces(parts[2]), namespaces(parts[3]));
    assert!(init.len() >= 6, "{what}: {out}");
    assert_eq!(mine, init, "{what}: the exec is in other namespaces");
}

/// The checks on an exec'd process: the same confinement as init (Seccomp 2, so a filter), and
/// the filter's refusal of `sethostname`.
fn check_exec(what: &str, init_status: &str, exec_status: &str, hostname: &Output) {
    let init = confinement(init_status);
    assert_eq!(
        init.get("Seccomp").map(String::as_str),
        Some("2"),
        "{what}: init has no filter: {init:?}"
    );
    assert_eq!(
        confinement(exec_status),
        init,
        "{what}: the exec's confinement differs from init's"
    );
    assert!(
        !hostname.status.success() && text(&hostname.stderr).contains("Function not implemented"),
        "{what}: sethostname was not refused by the filter: {}",
        show(hostname)
    );
}

fn init_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

/// `ctr task ls`'s pid for `id`.
fn task_pid(ctr: &mut Command, id: &str) -> u32 {
    let out = ok("ctr task ls", run_timeout(ctr.args(["task", "ls"]), T));
    text(&out.stdout)
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols[1].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{id} not in ctr task ls: {}", show(&out)))
}

/// One exec scenario under containerd, for `runtime`, with `no_new_privs` set or not in the
/// container (the two orders in which the filter and the capabilities are applied).
fn exec_under_containerd(c: &Containerd, runtime: &str, no_new_privs: bool) {
    let what = format!("{runtime}, noNewPrivileges {no_new_privs}");
    let dir = tempfile::tempdir().unwrap();
    let id = unique_id("conf");
    let mut s = spec(&mut c.ctr(), &id, &["sleep", "60"]);
    s["linux"]["seccomp"] = profile();
    s["process"]["noNewPrivileges"] = json!(no_new_privs);
    let file = dir.path().join("spec.json");
    write(&file, &s.to_string());
    let file = file.display().to_string();
    let ctr = |args: &[&str]| run_timeout(c.ctr().args(args), T);
    ok(
        &what,
        ctr(&["run", "-d", "--runtime", runtime, "--config", &file, &id]),
    );
    let pid = task_pid(&mut c.ctr(), &id);
    let status = ok(
        &what,
        ctr(&[
            "task",
            "exec",
            "--exec-id",
            "status",
            &id,
            "cat",
            "/proc/self/status",
        ]),
    );
    let hostname = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "hostname",
        &id,
        "hostname",
        "yard-denied",
    ]);
    let views = ok(
        &what,
        ctr(&[
            "task",
            "exec",
            "--exec-id",
            "views",
            &id,
            "sh",
            "-c",
            SELF_AND_INIT,
        ]),
    );
    let init = init_status(pid);
    ctr(&["task", "kill", "-s", "KILL", &id]);
    eventually(T, || {
        ctr(&["task", "ls"])
            .stdout
            .split(|b| *b == b'\n')
            .all(|l| !text(l).contains("RUNNING") || !text(l).contains(&id))
    });
    ctr(&["task", "rm", "-f", &id]);
    ctr(&["containers", "rm", &id]);
    check_exec(&what, &init, &text(&status.stdout), &hostname);
    check_self_and_init(&what, &text(&views.stdout));
}

#[test]
fn issue16_exec_keeps_the_containers_confinement_under_containerd() {
    if !require_root_and(&["containerd", "ctr", "runc", "containerd-shim-runc-v2"]) {
        return;
    }
    bin(SHIM);
    let c = Containerd::start(&which("containerd").unwrap());
    for runtime in [RUNC, NATIVE] {
        for no_new_privs in [true, false] {
            exec_under_containerd(&c, runtime, no_new_privs);
        }
    }
}

#[test]
fn issue16_yard_exec_keeps_the_containers_confinement() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    bin(SHIM);
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let id = unique_id("yconf");
    let mut s = spec(&mut Command::new("ctr"), &id, &["sleep", "60"]);
    s["linux"]["seccomp"] = profile();
    s["process"]["noNewPrivileges"] = json!(false);
    let file = dir.path().join("spec.json");
    write(&file, &s.to_string());
    let file = file.display().to_string();
    ok(
        "ctr run against switchyardd",
        run_timeout(
            d.ctr()
                .args(["run", "-d", "--runtime", NATIVE, "--config", &file, &id]),
            T,
        ),
    );
    let yard = |args: &[&str]| run_timeout(d.yard().args(args), T);
    let pid = task_pid(&mut d.ctr(), &id);
    let status = ok(
        "yard exec",
        yard(&["exec", &id, "--", "cat", "/proc/self/status"]),
    );
    let hostname = yard(&["exec", &id, "--", "hostname", "yard-denied"]);
    let views = ok(
        "yard exec",
        yard(&["exec", &id, "--", "sh", "-c", SELF_AND_INIT]),
    );
    let init = init_status(pid);
    ok("yard rm", yard(&["rm", "--force", &id]));
    check_exec("yard exec", &init, &text(&status.stdout), &hostname);
    check_self_and_init("yard exec", &text(&views.stdout));
}

/// Runs the native shim's runtime mode to completion with stdio on /dev/null (the container's
/// processes keep whatever they are given, so no pipe may be used), or `stdout` for an exec.
fn runtime(root: &Path, log: &Path, args: &[&str], stdout: Option<&Path>) -> Output {
    let mut cmd = Command::new(bin(SHIM));
    cmd.arg("runtime")
        .arg("--root")
        .arg(root)
        .arg("--log")
        .arg(log)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    match stdout {
        Some(p) => cmd.stdout(std::fs::File::create(p).unwrap()),
        None => cmd.stdout(Stdio::null()),
    };
    let mut child = cmd.spawn().unwrap();
    assert!(
        eventually(T, || child.try_wait().unwrap().is_some()),
        "runtime {args:?} did not finish"
    );
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: Vec::new(),
        stderr: std::fs::read(log).unwrap_or_default(),
    }
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn issue16_an_exec_naming_no_capabilities_gets_the_containers() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    bin(SHIM);
    let dir = tempfile::tempdir().unwrap();
    let (root, bundle) = (dir.path().join("state"), dir.path().join("bundle"));
    std::fs::create_dir_all(&bundle).unwrap();
    let id = unique_id("rtconf");
    let mut s = spec(&mut Command::new("ctr"), &id, &["sleep", "60"]);
    s["linux"]["cgroupsPath"] = json!(format!("/yard-test/{id}"));
    s["linux"]["seccomp"] = profile();
    write(&bundle.join("config.json"), &s.to_string());
    let log = dir.path().join("log");
    let p = |p: &Path| p.display().to_string();
    let (init_pid, exec_pid) = (dir.path().join("init.pid"), dir.path().join("exec.pid"));
    let out = runtime(
        &root,
        &log,
        &[
            "create",
            "--bundle",
            &p(&bundle),
            "--pid-file",
            &p(&init_pid),
            &id,
        ],
        None,
    );
    assert!(out.status.success(), "create: {}", show(&out));
    let out = runtime(&root, &log, &["start", &id], None);
    assert!(out.status.success(), "start: {}", show(&out));
    let init = read_pid(&init_pid);

    // What `runc exec --process` accepts and a client may send: no capabilities, no
    // noNewPrivileges.
    let process = dir.path().join("process.json");
    write(
        &process,
        &json!({"args": ["cat", "/proc/self/status"], "cwd": "/", "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0}})
        .to_string(),
    );
    let status_file = dir.path().join("exec.out");
    let out = runtime(
        &root,
        &log,
        &[
            "exec",
            "--process",
            &p(&process),
            "--detach",
            "--pid-file",
            &p(&exec_pid),
            &id,
        ],
        Some(&status_file),
    );
    assert!(out.status.success(), "exec: {}", show(&out));
    let pid = read_pid(&exec_pid);
    assert!(
        eventually(T, || !alive(pid)),
        "the exec'd cat did not finish"
    );
    let exec_status = std::fs::read_to_string(&status_file).unwrap();
    let init_status = init_status(init);
    let out = runtime(&root, &log, &["delete", "--force", &id], None);
    assert!(out.status.success(), "delete: {}", show(&out));
    let init_c = confinement(&init_status);
    assert_eq!(init_c.get("Seccomp").map(String::as_str), Some("2"));
    assert_eq!(init_c.get("NoNewPrivs").map(String::as_str), Some("1"));
    assert_eq!(
        confinement(&exec_status),
        init_c,
        "the exec's confinement differs from init's"
    );
    assert!(!root.join(&id).exists(), "state left behind");
    assert!(cgroups_matching(&format!("yard-test/{id}")).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Issue 18 items in the runtime mode.

/// The propagation of the container's `/` as its mountinfo line says: shared, master (a slave)
/// or private.
fn root_propagation(mountinfo: &str) -> String {
    let line = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no / in {mountinfo}"));
    let optional: Vec<&str> = line
        .split_whitespace()
        .skip(6)
        .take_while(|f| *f != "-")
        .map(|f| f.split(':').next().unwrap_or(f))
        .collect();
    if optional.is_empty() {
        "private".into()
    } else {
        optional.join(",")
    }
}

#[test]
fn issue18_rootfs_propagation_as_runc_applies_it() {
    if !require_root_and(&["containerd", "ctr", "runc", "containerd-shim-runc-v2"]) {
        return;
    }
    bin(SHIM);
    let c = Containerd::start(&which("containerd").unwrap());
    let dir = tempfile::tempdir().unwrap();
    for value in [
        "rprivate", "private", "rslave", "slave", "rshared", "shared",
    ] {
        let mut seen = Vec::new();
        for runtime in [RUNC, NATIVE] {
            let id = unique_id("prop");
            let mut s = spec(&mut c.ctr(), &id, &["cat", "/proc/self/mountinfo"]);
            s["linux"]["rootfsPropagation"] = json!(value);
            let file = dir.path().join(format!("{id}.json"));
            write(&file, &s.to_string());
            let file = file.display().to_string();
            let out = run_timeout(
                c.ctr()
                    .args(["run", "--rm", "--runtime", runtime, "--config", &file, &id]),
                T,
            );
            assert!(
                out.status.success(),
                "rootfsPropagation {value} on {runtime}: {}",
                show(&out)
            );
            seen.push(root_propagation(&text(&out.stdout)));
        }
        if value.ends_with("shared") {
            // runc makes the root's parent mount private before it binds the root there (the
            // root comes out private where that parent is `/`, as here); libcontainer applies
            // the propagation to the root again after pivot_root, as the spec reads.
            assert_eq!(seen[1], "shared", "rootfsPropagation {value} on native");
        } else {
            assert_eq!(seen[0], seen[1], "rootfsPropagation {value}: runc, native");
        }
    }
}

#[test]
fn issue18_the_runtimes_real_error_is_reported() {
    if !require_root_and(&["containerd", "ctr"]) {
        return;
    }
    bin(SHIM);
    let c = Containerd::start(&which("containerd").unwrap());
    let dir = tempfile::tempdir().unwrap();
    /// What is wrong, how to break a good spec that way, what the error must name.
    type Case = (&'static str, fn(&mut Value), &'static [&'static str]);
    let cases: [Case; 3] = [
        (
            "an unknown rootfs propagation",
            |s| s["linux"]["rootfsPropagation"] = json!("sideways"),
            &["linux.rootfsPropagation", "sideways"],
        ),
        (
            // The mount fails in the container's init, which tells its parent only "failed to
            // prepare rootfs"; the cause is in its log line.
            "a tmpfs the kernel refuses",
            |s| {
                s["mounts"].as_array_mut().unwrap().push(json!({
                    "destination": "/refused", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nr_inodes=not-a-number"]
                }))
            },
            &["/refused", "EINVAL"],
        ),
        (
            // Issue 19: libseccomp reports the kernel's refusal as ECANCELED, without a reason.
            "a seccomp filter too long for the kernel",
            |s| {
                let calls: Vec<Value> = (0..300)
                    .map(|v| {
                        let args: Vec<Value> = (0..6)
                            .map(|i| json!({"index": i, "value": v + i, "op": "SCMP_CMP_EQ"}))
                            .collect();
                        json!({"names": ["mmap"], "action": "SCMP_ACT_ERRNO", "args": args})
                    })
                    .collect();
                s["linux"]["seccomp"] =
                    json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": calls});
            },
            &["linux.seccomp", "BPF instructions", "4096"],
        ),
    ];
    for (what, breaker, expect) in cases {
        let id = unique_id("err");
        let mut s = spec(&mut c.ctr(), &id, &["true"]);
        breaker(&mut s);
        let file = dir.path().join(format!("{id}.json"));
        write(&file, &s.to_string());
        let file = file.display().to_string();
        let out = run_timeout(
            c.ctr()
                .args(["run", "--rm", "--runtime", NATIVE, "--config", &file, &id]),
            T,
        );
        assert!(!out.status.success(), "{what}: accepted: {}", show(&out));
        for e in expect {
            assert!(
                text(&out.stderr).contains(e),
                "{what}: {e:?} not in the error: {}",
                show(&out)
            );
        }
        let _ = run_timeout(c.ctr().args(["containers", "rm", &id]), T);
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 19 in the runtime mode.

#[test]
fn issue19_a_seccomp_profile_applies_as_runc_applies_it() {
    if !require_root_and(&["ctr", "runc"]) {
        return;
    }
    bin(SHIM);
    let dir = tempfile::tempdir().unwrap();
    let id = unique_id("sc19");
    let script = "echo forked | cat; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status";
    let mut s = spec(&mut Command::new("ctr"), &id, &["sh", "-c", script]);
    s["linux"]["cgroupsPath"] = json!(format!("/yard-test/{id}"));
    // Written out (containerd never hands `false` on; switchyardd's CRI did): runc reads it as
    // absent, and the container has no CAP_SYS_ADMIN to load the filter with otherwise.
    s["process"]["noNewPrivileges"] = json!(false);
    let caps = s["process"]["capabilities"]["bounding"].to_string();
    assert!(!caps.contains("CAP_SYS_ADMIN"), "{caps}");
    // `clone` refused when `flags & 0xff == 0` (no exit signal: a thread); a fork sends
    // SIGCHLD, unless the runtime reads `valueTwo` as the mask.
    let mut profile = profile();
    profile["syscalls"].as_array_mut().unwrap().push(json!({
        "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
        "args": [{"index": 0, "value": 255, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    }));
    s["linux"]["seccomp"] = profile;
    let p = |p: &Path| p.display().to_string();

    let bundle = dir.path().join("runc");
    write(&bundle.join("config.json"), &s.to_string());
    let out = run_timeout(
        Command::new("runc").args([
            "--root",
            &p(&dir.path().join("runc-state")),
            "run",
            "--bundle",
            &p(&bundle),
            &id,
        ]),
        T,
    );
    let runc = text(&out.stdout);
    assert!(out.status.success(), "runc: {}", show(&out));
    assert_eq!(
        runc.split_whitespace().collect::<Vec<_>>(),
        ["forked", "NoNewPrivs:", "0", "Seccomp:", "2"],
        "runc, the oracle"
    );

    let (root, bundle) = (dir.path().join("state"), dir.path().join("native"));
    write(&bundle.join("config.json"), &s.to_string());
    let (log, pid_file) = (dir.path().join("log"), dir.path().join("init.pid"));
    let stdout = dir.path().join("init.out");
    let args = [
        "create",
        "--bundle",
        &p(&bundle),
        "--pid-file",
        &p(&pid_file),
        &id,
    ];
    let out = runtime(&root, &log, &args, Some(&stdout));
    assert!(out.status.success(), "create: {}", show(&out));
    let out = runtime(&root, &log, &["start", &id], None);
    assert!(out.status.success(), "start: {}", show(&out));
    let pid = read_pid(&pid_file);
    assert!(
        eventually(T, || !alive(pid)),
        "the container did not finish"
    );
    let out = runtime(&root, &log, &["delete", "--force", &id], None);
    assert!(out.status.success(), "delete: {}", show(&out));
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        runc,
        "native vs runc"
    );
    assert!(cgroups_matching(&format!("yard-test/{id}")).is_empty());
}
