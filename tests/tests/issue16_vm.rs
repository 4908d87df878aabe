//! Issue 16 for the vm runtime, through switchyardd and real QEMU (TCG here):
//!
//! - item 8: QEMU runs under its own seccomp filter (`-sandbox on,obsolete=deny,
//!   elevateprivileges=deny,spawn=deny,resourcecontrol=deny`) and gets a 9p device only when a
//!   later container of the sandbox may need it (a group or pod); the guest boots either way
//!   and a group's second container still runs;
//! - item 10: a spec asking for seccomp (which the guest cannot enforce) fails Create with
//!   InvalidArgument naming `linux.seccomp`, unless the runtime's options say
//!   `allow_unenforced_security = true`; the defaults of `ctr run` and `yard run` still run.
//!
//! Needs root, qemu-system-x86_64, ctr and the installed guest (`scripts/guest`); skips with a
//! printed reason otherwise.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use switchyard_tests::*;

/// A TCG boot takes seconds; a loaded machine several times that.
const T: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(20);
const RUNTIME_TYPE: &str = "io.containerd.yard-vm.v1";
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// switchyardd with the vm runtime on QEMU, its cache in a temp dir, plus `options`.
fn daemon(options: &str) -> Option<Daemon> {
    if !require_root_and(&["qemu-system-x86_64", "ctr"]) {
        return None;
    }
    let g = std::env::var_os("SWITCHYARD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/switchyard/guest"));
    if !require(
        g.join("vmlinux").is_file() && g.join("initrd.img").is_file(),
        &format!("no guest in {} (run scripts/guest)", g.display()),
    ) {
        return None;
    }
    let cache = std::env::temp_dir().join(unique_id("vm-cache"));
    Some(Daemon::start_with(&format!(
        "[runtimes.vm]\nruntime_type = \"{RUNTIME_TYPE}\"\n[runtimes.vm.options]\nbackend = \
         \"qemu\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncache_dir = \"{}\"\n{options}\n",
        g.join("vmlinux").display(),
        g.join("initrd.img").display(),
        cache.display()
    )))
}

fn yard_run(d: &Daemon, extra: &[&str], cmd: &[&str]) -> Output {
    let mut c = d.yard();
    c.args(["run", "--runtime", "vm"])
        .args(extra)
        .arg("--rootfs")
        .arg(busybox_rootfs())
        .arg("--")
        .args(cmd);
    run_timeout(&mut c, T)
}

fn ctr_run(d: &Daemon, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
    let mut c = d.ctr();
    c.args(["run", "--rm", "--runtime", RUNTIME_TYPE])
        .args(extra)
        .arg("--rootfs")
        .arg(busybox_rootfs())
        .arg(id)
        .args(cmd);
    run_timeout(&mut c, T)
}

/// The one QEMU of sandbox `id` (its `-name` holds the first container's id): pid and argv.
fn qemu_of(id: &str) -> (u32, Vec<String>) {
    let found = processes_matching(&["qemu-system-x86_64", id]);
    assert_eq!(found.len(), 1, "{found:?}");
    let pid = found[0].0;
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv = argv
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (pid, argv)
}

fn value_of(argv: &[String], flag: &str) -> Vec<String> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

/// `Seccomp:` of /proc/PID/status: 2 is a filter.
fn seccomp_mode(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_owned()))
}

fn no_qemu_left(id: &str) -> bool {
    eventually(SETTLE, || {
        processes_matching(&["qemu-system-x86_64", id]).is_empty()
    })
}

#[test]
fn issue16_qemu_runs_sandboxed_and_without_9p_outside_a_group() {
    let Some(d) = daemon("") else {
        return;
    };
    let id = unique_id("vm-sb");
    let out = yard_run(&d, &["-d", "--name", &id], &["/bin/sleep", "600"]);
    assert!(out.status.success(), "{}\n{}", show(&out), d.log_text());
    let (pid, argv) = qemu_of(&id);
    assert_eq!(value_of(&argv, "-sandbox"), [SANDBOX], "{argv:?}");
    assert!(
        !argv.iter().any(|a| a.contains("9p") || a == "-fsdev"),
        "{argv:?}"
    );
    // QEMU's filter is in force (it installs it before the guest runs).
    assert_eq!(seccomp_mode(pid).as_deref(), Some("2"));
    // And the guest under it boots and runs the container.
    let out = d.run_yard(&["exec", &id, "--", "/bin/echo", "sandboxed"]);
    assert_eq!(text(&out.stdout), "sandboxed\n", "{}", show(&out));
    assert!(d.run_yard(&["rm", "--force", &id]).status.success());
    assert!(no_qemu_left(&id));
}

#[test]
fn issue16_a_groups_vm_gets_the_share_and_its_second_container_runs() {
    let Some(d) = daemon("") else {
        return;
    };
    let ann = format!("io.switchyard.group={}", unique_id("pod"));
    let (a, b) = (unique_id("vm-ga"), unique_id("vm-gb"));
    for id in [&a, &b] {
        let out = yard_run(
            &d,
            &["-d", "--name", id, "--annotation", &ann],
            &["/bin/sleep", "600"],
        );
        assert!(out.status.success(), "{}\n{}", show(&out), d.log_text());
    }
    let (_, argv) = qemu_of(&a);
    assert_eq!(value_of(&argv, "-sandbox"), [SANDBOX], "{argv:?}");
    assert!(
        value_of(&argv, "-device")
            .iter()
            .any(|d| d.starts_with("virtio-9p-device,")),
        "{argv:?}"
    );
    // The second container's image came through the share into the same VM.
    assert!(processes_matching(&["qemu-system-x86_64", &b]).is_empty());
    let out = d.run_yard(&["exec", &b, "--", "/bin/cat", "/proc/self/mountinfo"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d.run_yard(&["exec", &b, "--", "/bin/echo", "second"]);
    assert_eq!(text(&out.stdout), "second\n", "{}", show(&out));
    for id in [&b, &a] {
        assert!(d.run_yard(&["rm", "--force", id]).status.success());
    }
    assert!(no_qemu_left(&a));
}

#[test]
fn issue16_seccomp_in_the_guest_is_refused_unless_the_options_allow_it() {
    let Some(d) = daemon("") else {
        return;
    };
    let id = unique_id("vm-seccomp");
    let out = ctr_run(&d, &id, &["--seccomp"], &["/bin/echo", "hi"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("linux.seccomp") && err.contains("allow_unenforced_security = true"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("InvalidArgument") || err.contains("invalid argument"),
        "{}",
        show(&out)
    );
    let _ = run_timeout(d.ctr().args(["containers", "rm", &id]), T);
    assert!(no_qemu_left(&id));
    // The defaults carry no seccomp profile: they still run.
    let out = ctr_run(&d, &unique_id("vm-plain"), &[], &["/bin/echo", "plain"]);
    assert_eq!(text(&out.stdout), "plain\n", "{}", show(&out));
    let out = yard_run(&d, &["--rm"], &["/bin/echo", "yard"]);
    assert_eq!(text(&out.stdout), "yard\n", "{}", show(&out));
    drop(d);

    let Some(d) = daemon("allow_unenforced_security = true") else {
        return;
    };
    let id = unique_id("vm-seccomp-ok");
    let out = ctr_run(&d, &id, &["--seccomp"], &["/bin/echo", "allowed"]);
    assert_eq!(text(&out.stdout), "allowed\n", "{}", show(&out));
    // The shim's log reaches the daemon's: the warning is there.
    assert!(
        d.log_text().contains("not enforced inside the guest"),
        "no warning logged:\n{}",
        d.log_text()
    );
}
