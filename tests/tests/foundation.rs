//! Issue 2: switchyardd routes tasks to shims it did not write (containerd's runc shim), for
//! clients it did not write (containerd's ctr) as well as `yard`; survives a crash; refuses
//! bad input clearly.

use std::process::Command;
use std::time::Duration;

use switchyard_tests::*;

const T: Duration = Duration::from_secs(60);

fn ctr_run(d: &Daemon, id: &str, args: &[&str]) -> std::process::Output {
    d.ctr_run(
        "io.containerd.runc.v2",
        busybox_rootfs(),
        &["--rm"],
        id,
        args,
    )
}

fn yard_run(d: &Daemon, extra: &[&str], args: &[&str]) -> std::process::Output {
    d.yard_run(busybox_rootfs(), extra, args)
}

fn runc_ready() -> bool {
    require_root_and(&["ctr", "runc", "containerd-shim-runc-v2"])
}

#[test]
fn issue2_ctr_run_through_switchyardd() {
    if !runc_ready() {
        return;
    }
    let d = Daemon::start();
    let out = ctr_run(&d, &unique_id("hello"), &["/bin/echo", "hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");

    let out = ctr_run(&d, &unique_id("exit3"), &["/bin/sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));

    // Nothing is left: no container, no task, no bundle.
    let out = run_timeout(d.ctr().args(["containers", "ls", "-q"]), T);
    assert_eq!(text(&out.stdout).trim(), "");
    let tasks = d.state_dir().join("tasks/default");
    assert!(std::fs::read_dir(&tasks).map(|r| r.count()).unwrap_or(0) == 0);
}

#[test]
fn issue2_yard_run_through_switchyardd() {
    if !runc_ready() {
        return;
    }
    let d = Daemon::start();
    let out = yard_run(&d, &["--runtime", "runc", "--rm"], &["/bin/echo", "hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");

    let out = yard_run(
        &d,
        &["--runtime", "runc", "--rm"],
        &["/bin/sh", "-c", "echo oops >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stderr), "oops\n");

    // stdin reaches the task with -i, and the file in the rootfs is readable.
    let out = run_with_stdin(
        &mut d.yard_run_cmd(
            busybox_rootfs(),
            &["-i", "--runtime", "runc", "--rm"],
            &["/bin/sh", "-c", "cat; cat /etc/hello.txt"],
        ),
        b"from stdin\n".to_vec(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from stdin\nhello from the rootfs\n");

    let rows = d.ps();
    assert!(rows.is_empty(), "{rows:?}");
}

#[test]
fn issue2_events_show_the_task_lifecycle() {
    if !runc_ready() {
        return;
    }
    let d = Daemon::start();
    let mut ctr_events = CtrEvents::watch(&d);
    let mut yard_events = Events::watch(&d, &["topic~=/tasks/"]);
    let id = unique_id("ev");
    let out = ctr_run(&d, &id, &["/bin/true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    yard_events.wait_for("/tasks/delete", &id, "any payload", |_| true);
    ctr_events.wait_for("/tasks/delete", &id);
    ctr_events.stop();
    yard_events.stop();
    let ctr_out = ctr_events.text();
    let yard_out = yard_events.dump();
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            ctr_out
                .lines()
                .any(|l| l.contains(topic) && l.contains(&id)),
            "ctr events lacks {topic} for {id}:\n{ctr_out}"
        );
        let found = yard_out.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["topic"] == topic && v["event"]["container_id"] == id.as_str()
        });
        assert!(found, "yard events lacks {topic} for {id}:\n{yard_out}");
    }
    // The filter kept container events out of yard's stream.
    assert!(!yard_out.contains("/containers/"), "{yard_out}");
    assert!(ctr_out.contains("/containers/create"), "{ctr_out}");
}

#[test]
fn issue2_legacy_publish_binary_reaches_subscribers() {
    if !require(is_root(), "needs root") {
        return;
    }
    use switchyard_api::containerd::events::TaskOom;
    let d = Daemon::start();
    let mut sub = Lines::spawn(d.yard().args(["events", "--json"]));
    // What a shim does with -publish-binary: `<binary> --address A publish --topic T
    // --namespace N` with the event on stdin. Published until the subscriber sees it: a fresh
    // subscription may not be live yet (a fixed sleep is not enough on a loaded machine).
    let any = switchyard_api::typeurl::to_any(&TaskOom {
        container_id: "oomed".into(),
    });
    let seen = || {
        let g = sub.text();
        g.contains("\"/tasks/oom\"") && g.contains("oomed")
    };
    for _ in 0..20 {
        d.publish("/tasks/oom", &any);
        if eventually(Duration::from_secs(1), seen) {
            break;
        }
    }
    sub.stop();
    let got = sub.text();
    assert!(
        got.contains("\"/tasks/oom\"") && got.contains("oomed"),
        "subscriber did not see the published event: {got}"
    );
}

#[test]
fn issue2_detached_task_survives_daemon_crash_and_cleans_up() {
    if !runc_ready() {
        return;
    }
    let mut d = Daemon::start();
    let id = unique_id("surv");
    let out = yard_run(
        &d,
        &["--runtime", "runc", "-d", "--name", &id],
        &["/bin/sleep", "1000"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shims = processes_matching(&["containerd-shim-runc-v2", "-id", &id]);
    assert_eq!(shims.len(), 1, "{shims:?}");

    d.kill9();
    // The shim and the task outlive the daemon.
    assert_eq!(
        processes_matching(&["containerd-shim-runc-v2", "-id", &id]).len(),
        1
    );
    d.restart();

    let out = run_timeout(d.yard().args(["ps", "--json"]), T);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not listed after restart: {rows}"));
    assert_eq!(row["status"], "running", "{row}");

    let out = run_timeout(d.yard().args(["kill", "-s", "KILL", &id]), T);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(eventually(Duration::from_secs(10), || {
        let out = run_timeout(d.yard().args(["ps", "--json"]), T);
        text(&out.stdout).contains("stopped")
    }));
    let out = run_timeout(d.yard().args(["rm", &id]), T);
    assert!(out.status.success(), "{}", text(&out.stderr));

    assert!(
        eventually(Duration::from_secs(10), || processes_matching(&[
            "-id", &id
        ])
        .is_empty()),
        "shim left: {:?}",
        processes_matching(&["-id", &id])
    );
    assert!(
        mounts_matching(&id).is_empty(),
        "{:?}",
        mounts_matching(&id)
    );
    let cg = cgroups_matching(&format!("switchyard/default/{id}"));
    assert!(cg.is_empty(), "cgroups left: {cg:?}");
    assert!(!d.state_dir().join("tasks/default").join(&id).exists());
}

/// `yard run --rm` labels its container as removed with its task (switchyardd then writes it
/// without waiting for the disk); at its start switchyardd removes such a container whose task
/// is gone (a crash kept it from its removal), and leaves the others.
#[test]
fn a_container_removed_with_its_task_is_removed_at_restart_once_its_task_is_gone() {
    if !runc_ready() {
        return;
    }
    let mut d = Daemon::start();
    let runtime = "io.containerd.runc.v2";
    let label = "io.switchyard.rm=true";

    // A `yard run --rm` whose client dies: its labelled container keeps its running task.
    let running = unique_id("rmrun");
    let mut client = d
        .yard_run_cmd(
            busybox_rootfs(),
            &["--runtime", "runc", "--rm", "--name", &running],
            &["/bin/sleep", "1000"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.wait_ctr_status(&running, "RUNNING", T);
    let info = d.ctr_ok(&["containers", "info", &running]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["Labels"]["io.switchyard.rm"], "true", "{info}");
    let _ = client.kill();
    let _ = client.wait();

    // A labelled container whose task is gone, and an unlabelled one.
    let left = unique_id("rmleft");
    let plain = unique_id("plain");
    for (id, extra) in [
        (&left, &["-d", "--label", label][..]),
        (&plain, &["-d"][..]),
    ] {
        let out = d.ctr_run(
            runtime,
            busybox_rootfs(),
            extra,
            id,
            &["/bin/sleep", "1000"],
        );
        assert!(out.status.success(), "{}", show(&out));
        d.ctr_ok(&["task", "kill", "-s", "KILL", id]);
        d.wait_ctr_status(id, "STOPPED", T);
        d.ctr_ok(&["task", "delete", id]);
    }

    d.restart();
    let listed = text(&d.ctr_ok(&["containers", "ls", "-q"]).stdout);
    let listed: Vec<&str> = listed.lines().collect();
    assert!(!listed.contains(&left.as_str()), "{listed:?}");
    assert!(listed.contains(&plain.as_str()), "{listed:?}");
    assert!(listed.contains(&running.as_str()), "{listed:?}");
    assert_eq!(d.status(&running).as_deref(), Some("running"));

    d.rm_force(&running);
    d.ctr_ok(&["containers", "delete", &plain]);
}

#[test]
fn issue2_a_dead_shim_is_cleaned_up_with_exit_events() {
    if !runc_ready() {
        return;
    }
    let d = Daemon::start();
    let id = unique_id("dead");
    let ev = Events::watch_container(&d, &id);
    let out = yard_run(
        &d,
        &["--runtime", "runc", "-d", "--name", &id],
        &["/bin/sleep", "1000"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    ev.wait_for("/tasks/start", &id, "any payload", |_| true);
    let socket = switchyard_tests::accounting::bundle_socket(&d, "default", &id)
        .expect("the runc shim's socket");
    assert!(socket.exists(), "{}", socket.display());
    for (pid, _) in processes_matching(&["containerd-shim-runc-v2", "-id", &id]) {
        sigkill(pid);
    }
    // The daemon notices, runs `<shim> delete` (which kills the container), and reports.
    assert!(
        eventually(Duration::from_secs(15), || {
            let out = run_timeout(d.yard().args(["ps", "--json"]), T);
            text(&out.stdout).contains("no task")
        }),
        "task still listed"
    );
    ev.wait_for("/tasks/exit", &id, "any payload", |_| true);
    ev.wait_for("/tasks/delete", &id, "any payload", |_| true);
    assert!(
        processes_matching(&["sleep 1000"])
            .iter()
            .all(|(_, c)| !c.contains(&id))
    );
    assert!(cgroups_matching(&format!("switchyard/default/{id}")).is_empty());
    // runc's `delete` leaves the dead server's socket; switchyardd removes it.
    assert!(
        eventually(Duration::from_secs(5), || !socket.exists()),
        "the dead shim's socket is left: {}",
        socket.display()
    );
    let out = run_timeout(d.yard().args(["rm", &id]), T);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn issue2_bad_input_gets_clear_errors_and_the_daemon_keeps_serving() {
    if !require(is_root(), "needs root") {
        return;
    }
    let d = Daemon::start_with(
        "[runtimes.ghost]\nruntime_type = \"io.containerd.ghost.v1\"\n\
         [runtimes.pathless]\nruntime_type = \"io.containerd.pathless.v1\"\npath = \"/nonexistent/shim-binary\"\n\
         [runtimes.deaf]\nruntime_type = \"io.containerd.yard-native.v1\"\npath = \"/bin/false\"\n",
    );
    let serving = |d: &Daemon| {
        let out = run_timeout(d.yard().arg("info"), T);
        assert!(
            out.status.success(),
            "daemon stopped serving: {}",
            text(&out.stderr)
        );
    };

    // Unknown runtime name.
    let out = yard_run(&d, &["--runtime", "nosuch", "--rm"], &["/bin/true"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("unknown runtime \"nosuch\""), "{err}");
    serving(&d);

    // Missing shim binary, found by name and by explicit path.
    let out = yard_run(&d, &["--runtime", "ghost", "--rm"], &["/bin/true"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("containerd-shim-ghost-v1") && err.contains("not found"),
        "{err}"
    );
    let out = yard_run(&d, &["--runtime", "pathless", "--rm"], &["/bin/true"]);
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/shim-binary"), "{err}");
    serving(&d);

    // One of our runtime types whose binary never serves: switchyardd starts the server
    // itself (no `start`), and says which one did not come up.
    let out = yard_run(&d, &["--runtime", "deaf", "--rm"], &["/bin/true"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("shim server /bin/false did not come up") && err.contains("exit status: 1"),
        "{err}"
    );
    serving(&d);

    // Missing rootfs: yard checks it, and so does the daemon for clients that do not (ctr).
    let out = run_timeout(
        d.yard().args([
            "run",
            "--runtime",
            "runc",
            "--rm",
            "--rootfs",
            "/nonexistent/rootfs",
            "--",
            "/bin/true",
        ]),
        T,
    );
    assert!(
        text(&out.stderr).contains("/nonexistent/rootfs"),
        "{}",
        text(&out.stderr)
    );
    if which("ctr").is_some() {
        let out = run_timeout(
            d.ctr().args([
                "run",
                "--rm",
                "--runtime",
                "io.containerd.runc.v2",
                "--rootfs",
                "/nonexistent/rootfs",
                &unique_id("nr"),
                "/bin/true",
            ]),
            T,
        );
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("rootfs /nonexistent/rootfs"), "{err}");
        assert!(err.contains("invalid argument"), "{err}");
        // A service switchyardd does not serve answers at once, with a clear message.
        let out = run_timeout(d.ctr().args(["content", "ls"]), Duration::from_secs(10));
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("not implemented by switchyardd"),
            "{}",
            text(&out.stderr)
        );
    }
    serving(&d);

    // Bad --env.
    let out = yard_run(&d, &["--env", "NOEQUALS", "--rm"], &["/bin/true"]);
    assert!(text(&out.stderr).contains("NOEQUALS"));
    serving(&d);
}

#[test]
fn issue2_malformed_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("version = 1\nroots = \"/x\"\n", "roots"),
        (
            "default_runtime = \"nosuch\"\n",
            "default_runtime = \"nosuch\"",
        ),
        (
            "[runtimes.x]\nruntime_type = \"runc\"\n",
            "runtimes.x.runtime_type",
        ),
        ("[grpc]\naddress = \"relative.sock\"\n", "grpc.address"),
        ("root = [\n", "parse config"),
    ];
    for (toml, expect) in cases {
        let f = dir.path().join("bad.toml");
        write(&f, toml);
        let out = run_timeout(
            Command::new(bin("switchyardd")).arg("--config").arg(&f),
            Duration::from_secs(10),
        );
        assert!(!out.status.success(), "accepted: {toml}");
        let err = text(&out.stderr);
        assert!(
            err.contains(expect),
            "for {toml:?} expected {expect:?} in: {err}"
        );
        assert!(err.contains("bad.toml"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let missing = dir.path().join("missing.toml");
    let out = run_timeout(
        Command::new(bin("switchyardd"))
            .arg("--config")
            .arg(&missing),
        Duration::from_secs(10),
    );
    assert!(text(&out.stderr).contains("missing.toml"));
}

#[test]
fn issue2_embedded_default_config_is_printed_and_valid() {
    let out = run_timeout(
        Command::new(bin("switchyardd")).args(["config", "default"]),
        Duration::from_secs(10),
    );
    assert!(out.status.success());
    let text = text(&out.stdout);
    for rt in [
        "[runtimes.native]",
        "[runtimes.vm]",
        "[runtimes.wasm]",
        "[runtimes.runc]",
    ] {
        assert!(text.contains(rt), "{rt}");
    }
    assert!(text.contains("default_runtime = \"native\""));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("default.toml");
    write(&f, &text);
    let out = run_timeout(
        Command::new(bin("switchyardd"))
            .arg("--config")
            .arg(&f)
            .args(["config", "check"]),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `yard ps` lists containers whose records together are larger than one gRPC message may be
/// (16 MiB): it streams them, one container per message, as containerd's own client does.
#[test]
fn yard_ps_lists_more_containers_than_one_message_holds() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let d = Daemon::start();
    // 8 variables of 120 KiB (one argument may be 128 KiB): about 1 MiB of spec per record.
    let big = format!("BIG={}", "x".repeat(120 << 10));
    let ids: Vec<String> = (0..20).map(|i| unique_id(&format!("big{i}"))).collect();
    for id in &ids {
        let mut c = d.ctr();
        c.args(["containers", "create"]);
        for _ in 0..8 {
            c.args(["--env", &big]);
        }
        c.arg("--rootfs")
            .arg(busybox_rootfs())
            .args([id.as_str(), "/bin/true"]);
        let out = run_timeout(&mut c, T);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
    }
    let rows = d.ps();
    for id in &ids {
        let row = rows.iter().find(|r| r["id"] == id.as_str());
        assert_eq!(
            row.map(|r| r["status"].clone()),
            Some("no task".into()),
            "{id} in yard ps"
        );
    }
    for id in &ids {
        let out = d.run_yard(&["rm", id]);
        assert!(out.status.success(), "{}", show(&out));
    }
}

/// switchyardd raises its soft `RLIMIT_NOFILE` to the hard limit, as the Go runtime does for
/// containerd (it holds descriptors for every CRI container's output and every shim), and a
/// shim it starts gets the soft limit the daemon was started with, as Go's `os/exec` gives
/// containerd's shims theirs.
#[test]
fn the_daemon_raises_its_descriptor_limit_and_shims_get_the_original() {
    if !require_root_and(&["prlimit"]) {
        return;
    }
    const SOFT: u64 = 256;
    let hard = nofile_limit(std::process::id()).map(|(_, h)| h);
    if !require(
        hard.is_some_and(|h| h > SOFT),
        &format!("needs a hard RLIMIT_NOFILE above {SOFT} (have {hard:?})"),
    ) {
        return;
    }
    let d = Daemon::start_with_nofile(
        Nofile {
            soft: SOFT,
            hard: None,
        },
        |_| String::new(),
    );
    let daemon = d.pid().expect("daemon pid");
    assert_eq!(
        nofile_limit(daemon),
        hard.map(|h| (h, h)),
        "the daemon's soft and hard limits"
    );
    let id = unique_id("nofile");
    let out = yard_run(
        &d,
        &["--runtime", "native", "-d", "--name", &id],
        &["/bin/sleep", "600"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let shims = d.shim_servers("containerd-shim-yard-native-v1");
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert_eq!(
        nofile_limit(shims[0].0),
        hard.map(|h| (SOFT, h)),
        "the shim's soft and hard limits"
    );
    let out = d.run_yard(&["rm", "--force", &id]);
    assert!(out.status.success(), "{}", show(&out));
}
