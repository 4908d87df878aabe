//! Issue 16, the Wasm shim's part: a Wasm task cannot reach device nodes or host privileges
//! (item 1), its defaults bound what a module or an HTTP client can take (item 7), and what the
//! Wasm runtime cannot enforce fails Create (item 10).
//!
//! Every test drives the real binaries: switchyardd, `yard`, containerd's `ctr`, the shim and
//! its worker, and wasmtime guests (the test programs in `tests/wasm`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_tests::images::{gzip, image, oci_layout_tar};
use switchyard_tests::wasm::{in_cgroup_of, worker_of};
use switchyard_tests::*;

const T: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(10);
const SHIM: &str = "containerd-shim-yard-wasm-v1";
const RUNTIME_TYPE: &str = "io.containerd.yard-wasm.v1";
const WORKER_ID: &str = "2000000000";
/// The Uid/Gid line of the worker's status: real, effective, saved and filesystem.
const WORKER_IDS: &str = "2000000000\t2000000000\t2000000000\t2000000000";

/// switchyardd with the wasm runtime, its cache in a fresh temp dir, and more
/// `[runtimes.wasm.options]` TOML. `None`: skip.
fn daemon(programs: &[&str], options: &str) -> Option<Daemon> {
    let mut needed = vec!["ctr"];
    needed.extend_from_slice(programs);
    if !require_root_and(&needed) {
        return None;
    }
    // The cache goes with the daemon's private directory.
    Some(Daemon::start_in(|dir| {
        format!(
            "[runtimes.wasm]\nruntime_type = \"{RUNTIME_TYPE}\"\n[runtimes.wasm.options]\n\
             cache_dir = \"{}\"\n{options}\n",
            dir.join("wasm-cache").display()
        )
    }))
}

/// A root for Wasm tasks holding what an image could carry: the test programs, a regular
/// file, a character device (1:5, the harmless /dev/zero), a FIFO, and a 2 MiB "module".
struct Rootfs(PathBuf);

impl Rootfs {
    fn new() -> Rootfs {
        let f = switchyard_tests::wasm::fixtures();
        let dir = std::env::temp_dir().join(unique_id("issue16-root"));
        std::fs::create_dir_all(dir.join("app")).unwrap();
        std::fs::create_dir_all(dir.join("dev")).unwrap();
        std::fs::copy(&f.hello_module, dir.join("app/hello.wasm")).unwrap();
        std::fs::copy(&f.hello_component, dir.join("app/hello-c.wasm")).unwrap();
        std::fs::copy(&f.http_component, dir.join("app/http.wasm")).unwrap();
        std::fs::write(dir.join("ok.txt"), "a regular file\n").unwrap();
        nix::sys::stat::mknod(
            &dir.join("dev/zero"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .expect("mknod 1:5");
        nix::unistd::mkfifo(
            &dir.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o666),
        )
        .expect("mkfifo");
        let mut big = b"\0asm\x01\0\0\0".to_vec();
        big.resize(2 << 20, 0);
        std::fs::write(dir.join("app/big.wasm"), big).unwrap();
        Rootfs(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `yard run --runtime wasm --rootfs ROOT EXTRA -- CMD`.
fn run(d: &Daemon, root: &Rootfs, extra: &[&str], cmd: &[&str]) -> Output {
    let mut c = d.yard();
    c.args(["run", "--runtime", "wasm", "--rootfs", root.path()])
        .args(extra)
        .arg("--")
        .args(cmd);
    run_timeout(&mut c, T)
}

/// `ctr run -d --runtime wasm FLAGS --rootfs ROOT ID /app/hello.wasm ARGS`: containerd's own
/// client starting a task that stays.
fn ctr_run_detached(d: &Daemon, root: &Rootfs, flags: &[&str], id: &str, args: &[&str]) -> Output {
    let mut c = d.ctr();
    c.args(["run", "-d", "--runtime", RUNTIME_TYPE])
        .args(flags)
        .args(["--rootfs", root.path(), id, "/app/hello.wasm"])
        .args(args);
    run_timeout(&mut c, T)
}

fn status_field(pid: u32, task: Option<&str>, field: &str) -> Option<String> {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Item 1: a module (and a component) cannot open a character device or a FIFO in its root,
/// and the FIFO does not hang it; a regular file still opens. Today's shim opened the device
/// (and a FIFO blocked the task forever).
#[test]
fn issue16_wasm_device_nodes_and_fifos_cannot_be_opened() {
    let Some(d) = daemon(&[], "") else {
        return;
    };
    let root = Rootfs::new();
    for prog in ["/app/hello.wasm", "/app/hello-c.wasm"] {
        let out = run(&d, &root, &["--rm"], &[prog, "--open", "/ok.txt"]);
        assert_eq!(out.status.code(), Some(0), "{prog}: {}", show(&out));
        assert!(
            text(&out.stdout).contains("opened /ok.txt: 15 bytes"),
            "{prog}: {}",
            show(&out)
        );
        for node in ["/dev/zero", "/fifo"] {
            let t = Instant::now();
            let out = run(&d, &root, &["--rm"], &[prog, "--open", node]);
            let took = t.elapsed();
            // A component's exit carries only failure (1); a module's its code (2).
            assert!(
                matches!(out.status.code(), Some(1 | 2)),
                "{prog} opened {node}: {}",
                show(&out)
            );
            assert!(
                !text(&out.stdout).contains("opened"),
                "{prog} {node}: {}",
                show(&out)
            );
            assert!(
                text(&out.stderr).contains(&format!("open {node} failed"))
                    && text(&out.stderr).contains("ermission denied"),
                "{prog} {node}: {}",
                show(&out)
            );
            assert!(
                took < Duration::from_secs(20),
                "{prog} {node} took {took:?}"
            );
        }
    }
}

/// Imports into `d`, as `NAME:1`, an image of one layer holding the hello module as
/// `/app.wasm` (and, with `device`, a character device 1:5 at `/dev/zero`) and image `config`.
/// The import's output.
fn import_image(d: &Daemon, name: &str, device: bool, config: serde_json::Value) -> Output {
    let module = std::fs::read(&switchyard_tests::wasm::fixtures().hello_module).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h
    };
    if device {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, "dev/", std::io::empty()).unwrap();
        let mut h = header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(5).unwrap();
        b.append_data(&mut h, "dev/zero", std::io::empty()).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o644, module.len() as u64);
    b.append_data(&mut h, "app.wasm", module.as_slice())
        .unwrap();
    let layer = gzip(&b.into_inner().unwrap());
    let img = image(vec![layer], config, "amd64");
    let archive = std::env::temp_dir().join(unique_id("issue16-image"));
    std::fs::write(&archive, oci_layout_tar(&[("1", &img)])).unwrap();
    let out = d.run_yard(&["image", "import", "--name", name, archive.to_str().unwrap()]);
    let _ = std::fs::remove_file(&archive);
    out
}

/// Item 1 through an image: an imported image whose layer carries a character device and a
/// module: the device is either refused when the image is unpacked, or cannot be opened by
/// the module; never read.
#[test]
fn issue16_wasm_image_with_a_device_node() {
    let Some(d) = daemon(&[], "") else {
        return;
    };
    let import = import_image(
        &d,
        "issue16/devnode",
        true,
        json!({"Entrypoint": ["/app.wasm"], "Cmd": ["--open", "/dev/zero"]}),
    );
    let refused = |out: &Output| {
        let e = text(&out.stderr).to_lowercase();
        !out.status.success() && e.contains("dev/zero") && e.contains("device")
    };
    if !import.status.success() {
        assert!(refused(&import), "import: {}", show(&import));
        return;
    }
    let out = d.run_yard(&["run", "--rm", "--runtime", "wasm", "issue16/devnode:1"]);
    assert!(
        !text(&out.stdout).contains("opened /dev/zero"),
        "the module read the device: {}",
        show(&out)
    );
    assert!(
        refused(&out)
            || (out.status.code() == Some(2)
                && text(&out.stderr).contains("open /dev/zero failed: Permission denied")),
        "{}",
        show(&out)
    );
}

/// A task without CPU limits is accounted to its cgroup once it has run a while: the worker
/// moves into the task's cgroup `ACCOUNT_AFTER` (25 ms) after its Create rather than at it
/// (shims/wasm/src/cgroup.rs), and the cgroup goes with the task.
#[test]
fn a_task_without_cpu_limits_is_accounted_to_its_cgroup_once_it_has_run() {
    let Some(d) = daemon(&[], "") else {
        return;
    };
    let root = Rootfs::new();
    let id = unique_id("account");
    let out = ctr_run_detached(&d, &root, &[], &id, &["--sleep", "60000"]);
    assert!(out.status.success(), "{}", show(&out));
    let worker = worker_of(&id).expect("the task's worker");
    assert!(
        eventually(SETTLE, || in_cgroup_of(worker, &id)),
        "the worker is not in the task's cgroup: {}\n{}",
        std::fs::read_to_string(format!("/proc/{worker}/cgroup")).unwrap_or_default(),
        d.log_text()
    );
    let out = run_timeout(d.ctr().args(["task", "rm", "-f", &id]), T);
    assert!(out.status.success(), "{}", show(&out));
    let out = run_timeout(d.ctr().args(["containers", "rm", &id]), T);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || cgroups_matching(&format!("default/{id}"))
            .is_empty()),
        "the task's cgroup is left: {:?}",
        cgroups_matching(&format!("default/{id}"))
    );
}

/// Item 1: the process that runs guest code has no capabilities (every thread), no way to
/// regain any, a seccomp filter, a mount namespace of its own, and runs in the task's cgroup
/// with the task's CPU limit; and from inside, that confinement holds (the worker's
/// self-test). Today's guests ran in the shim itself: root with every capability.
#[test]
fn issue16_wasm_worker_has_no_privileges() {
    let Some(d) = daemon(&[], "") else {
        return;
    };
    let root = Rootfs::new();
    let id = unique_id("priv");
    // ctr, for --cpus: containerd's own client asking for a CPU limit.
    let out = ctr_run_detached(&d, &root, &["--cpus", "0.5"], &id, &["--sleep", "60000"]);
    assert!(out.status.success(), "{}", show(&out));
    let pid = worker_of(&id).unwrap_or_else(|| {
        panic!(
            "no worker for {id}: {:?}\n{}",
            processes_matching(&[SHIM]),
            d.log_text()
        )
    });
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap();
    let shim_cmd = std::fs::read_to_string(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
    assert!(
        shim_cmd.contains(SHIM) && shim_cmd.contains("-socket"),
        "the worker's parent is not the shim server: {shim_cmd:?}"
    );
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(threads.len() > 1, "{threads:?}");
    for t in threads.iter().map(|t| Some(t.as_str())).chain([None]) {
        for (field, want) in [
            ("CapEff", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapInh", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
            // Real, effective, saved and filesystem ids: the unprivileged worker ids, no
            // supplementary groups.
            ("Uid", WORKER_IDS),
            ("Gid", WORKER_IDS),
            ("Groups", ""),
        ] {
            assert_eq!(
                status_field(pid, t, field).as_deref(),
                Some(want),
                "worker {pid} thread {t:?}: {field}"
            );
        }
    }
    let ns = |p: &str, kind: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).ok();
    for kind in ["mnt", "user"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "the worker shares the host's {kind} namespace"
        );
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns(&ppid.to_string(), kind),
            "the worker shares the shim's {kind} namespace"
        );
    }
    // Its namespace maps uid and gid 0 to the worker ids, and nothing else.
    for map in ["uid_map", "gid_map"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{map}")).unwrap();
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields, ["0", WORKER_ID, "1"], "{map}: {text:?}");
    }
    // The worker's root is empty: the host's files are not there.
    let listing: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(listing.is_empty(), "the worker sees {listing:?}");

    // In the task's cgroup, with its CPU limit (ctr --cpus 0.5: quota 50000 of 100000).
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let (dir, file, want) = if unified {
        let rel = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        (
            Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/')),
            "cpu.max",
            "50000 100000",
        )
    } else {
        let (ctrls, rel) = cgroups
            .lines()
            .filter_map(|l| l.split_once(':').map(|(_, r)| r))
            .filter_map(|r| r.split_once(':'))
            .find(|(c, _)| c.split(',').any(|c| c == "cpu"))
            .unwrap();
        (
            Path::new("/sys/fs/cgroup")
                .join(ctrls)
                .join(rel.trim_start_matches('/')),
            "cpu.cfs_quota_us",
            "50000",
        )
    };
    assert!(
        dir.to_string_lossy().contains(&id),
        "the worker is not in the task's cgroup: {cgroups}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(file)).unwrap().trim(),
        want,
        "{}",
        dir.display()
    );

    let out = run_timeout(d.ctr().args(["task", "kill", "-s", "SIGKILL", &id]), T);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || {
            text(&run_timeout(d.ctr().args(["task", "ls"]), T).stdout)
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        }),
        "not stopped"
    );
    let out = run_timeout(d.ctr().args(["task", "rm", &id]), T);
    assert!(out.status.success(), "{}", show(&out));
    let out = run_timeout(d.ctr().args(["containers", "rm", &id]), T);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || worker_of(&id).is_none() && !dir.exists()),
        "worker or cgroup left: {:?} {}",
        worker_of(&id),
        dir.display()
    );

    // From inside: sockets, signals to other processes, new namespaces, host files, device
    // nodes and capabilities are all out of reach.
    let scratch = tempfile::tempdir().unwrap();
    let out = run_timeout(
        Command::new(bin(SHIM))
            .args(["worker", "--self-test"])
            .current_dir(scratch.path()),
        T,
    );
    assert_eq!(out.status.code(), Some(0), "self-test: {}", show(&out));
}

/// A task whose CPU limit the kernel refuses fails with an error naming the field, and neither
/// its cgroup nor its failure reaches the group's other tasks: the worker, which had joined the
/// cgroup before the limit was refused, leaves it, and it is removed. (The worker stayed in it,
/// unrecorded, and the clean-up of the failed task, which kills what is in the task's cgroup,
/// killed the worker and every task of the group with it.)
#[test]
fn a_refused_cpu_limit_fails_the_task_and_not_its_group() {
    let Some(d) = daemon(&[], "") else {
        return;
    };
    let root = Rootfs::new();
    let group = ["--annotation", "io.switchyard.group=cpu-refused"];
    // A task of the group without a cgroup (`--cgroup ""`), so the next one owns the worker's.
    let keep = unique_id("quota-keep");
    let flags = [&group[..], &["--cgroup", ""]].concat();
    let out = ctr_run_detached(&d, &root, &flags, &keep, &["--sleep", "60000"]);
    assert!(out.status.success(), "{}", show(&out));
    let worker = worker_of(&keep).expect("the group's worker");

    // A CFS quota under the kernel's minimum of 1 ms: cpu.cfs_quota_us (cpu.max on v2) refuses
    // it when the limit is applied, after the worker moved into the task's cgroup.
    let bad = unique_id("quota");
    let flags = [
        &group[..],
        &["--cpu-quota", "100", "--cpu-period", "100000"],
    ]
    .concat();
    let out = ctr_run_detached(&d, &root, &flags, &bad, &["--sleep", "60000"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("linux.resources.cpu"),
        "{}",
        show(&out)
    );
    assert!(
        eventually(SETTLE, || cgroups_matching(&format!("default/{bad}"))
            .is_empty()),
        "the refused task's cgroup is left: {:?}",
        cgroups_matching(&format!("default/{bad}"))
    );
    let tasks = text(&run_timeout(d.ctr().args(["task", "ls"]), T).stdout);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(&keep) && l.contains("RUNNING")),
        "the group's other task did not survive: {tasks}\n{}",
        d.log_text()
    );
    assert_eq!(worker_of(&keep), Some(worker), "the group's worker changed");

    let out = run_timeout(d.ctr().args(["task", "kill", "-s", "SIGKILL", &keep]), T);
    assert!(out.status.success(), "{}", show(&out));
    let out = run_timeout(d.ctr().args(["task", "rm", "-f", &keep]), T);
    assert!(out.status.success(), "{}", show(&out));
    for id in [&bad, &keep] {
        let out = run_timeout(d.ctr().args(["containers", "rm", id]), T);
        assert!(out.status.success(), "{}", show(&out));
    }
}

/// Item 1, least privilege: the worker is not host root. It runs in a user namespace of its own
/// as the unprivileged worker ids (checked in `issue16_wasm_worker_has_no_privileges`), and the
/// task's root is idmapped to it: a task still writes into its root-owned root, and what it
/// writes is root's on disk, as before. A file of another owner stays out of its reach.
/// `worker_uid = 0` keeps the old worker (host uid 0, no user namespace).
#[test]
fn issue16_wasm_worker_is_unprivileged_and_writes_through_an_idmapped_root() {
    for (options, worker_uid) in [("", WORKER_ID), ("worker_uid = 0\nworker_gid = 0\n", "0")] {
        let Some(d) = daemon(&[], options) else {
            return;
        };
        let root = Rootfs::new();
        std::fs::write(root.0.join("private.txt"), "not yours\n").unwrap();
        std::os::unix::fs::chown(root.0.join("private.txt"), Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(
            root.0.join("private.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let id = unique_id("idmap");
        let out = ctr_run_detached(
            &d,
            &root,
            &[],
            &id,
            &[
                "--write",
                "/written.txt",
                "from the guest",
                "--sleep",
                "60000",
            ],
        );
        assert!(out.status.success(), "{options:?}: {}", show(&out));
        let mut pid = None;
        eventually(SETTLE, || {
            pid = worker_of(&id);
            pid.is_some()
        });
        let pid =
            pid.unwrap_or_else(|| panic!("{options:?}: no worker for {id}\n{}", d.log_text()));
        let uid = status_field(pid, None, "Uid").unwrap_or_default();
        assert_eq!(
            uid.split_whitespace().next(),
            Some(worker_uid),
            "{options:?}: {uid}"
        );
        // The task creates the file and then writes it: wait for the whole text, not for the
        // file to exist (a read between the two saw it empty once).
        let written = root.0.join("written.txt");
        assert!(
            eventually(SETTLE, || std::fs::read_to_string(&written)
                .is_ok_and(|t| t == "from the guest")),
            "{options:?}: the task did not write into its root: {:?}\n{}",
            std::fs::read_to_string(&written),
            d.log_text()
        );
        let meta = std::fs::metadata(&written).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "{options:?}: what the task writes is root's on disk"
        );
        let out = run(
            &d,
            &root,
            &["--rm"],
            &["/app/hello.wasm", "--read", "/private.txt"],
        );
        assert!(
            !out.status.success() && text(&out.stderr).contains("Permission denied"),
            "{options:?}: another owner's 0600 file was read: {}",
            show(&out)
        );
        let out = run_timeout(d.ctr().args(["task", "kill", "-s", "SIGKILL", &id]), T);
        assert!(out.status.success(), "{}", show(&out));
        assert!(eventually(SETTLE, || {
            run_timeout(d.ctr().args(["task", "rm", &id]), T)
                .status
                .success()
        }));
        let out = run_timeout(d.ctr().args(["containers", "rm", &id]), T);
        assert!(out.status.success(), "{}", show(&out));

        // An image's root is an overlay, which cannot be idmapped itself: it is rebuilt on
        // idmapped lower layers with the upper directory handed to the worker's ids, and the
        // task writes into it and reads back what it wrote.
        let image = format!("issue16/idmap-{worker_uid}");
        let out = import_image(&d, &image, false, json!({"Entrypoint": ["/app.wasm"]}));
        assert!(out.status.success(), "import: {}", show(&out));
        let out = d.run_yard(&[
            "run",
            "--rm",
            "--runtime",
            "wasm",
            &format!("{image}:1"),
            "--",
            "--write",
            "/w.txt",
            "x",
            "--read",
            "/w.txt",
        ]);
        assert!(
            out.status.success() && text(&out.stdout).contains("read /w.txt: x"),
            "{options:?}: {}\n{}",
            show(&out),
            d.log_text()
        );
    }
}

/// Item 7: a module over the size cap fails Create with an error naming the file and the
/// option, and leaves nothing behind.
#[test]
fn issue16_wasm_module_over_the_size_cap_fails_create() {
    let Some(d) = daemon(&[], "max_module_mib = 1") else {
        return;
    };
    let root = Rootfs::new();
    let id = unique_id("big");
    let out = run(&d, &root, &["--rm", "--name", &id], &["/app/big.wasm"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains(
            "process.args[0] /app/big.wasm: 2097152 bytes is over the runtime's module size \
             limit of 1 MiB (option max_module_mib)"
        ),
        "{}",
        show(&out)
    );
    assert!(
        eventually(SETTLE, || processes_matching(&[SHIM, &id]).is_empty()),
        "shim left"
    );
    let out = run(&d, &root, &["--rm"], &["/app/hello.wasm", "small"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

/// One request on a fresh connection: (status, body).
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
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, resp))
}

/// Waits until the peer closes `s` (or resets it); what it sent before.
fn until_closed(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    text(&got)
}

fn http_task(d: &Daemon, root: &Rootfs, port: u16, annotations: &[String]) -> String {
    let id = unique_id("http");
    let listen = format!("io.switchyard.wasm.http-listen=127.0.0.1:{port}");
    let mut extra = vec!["-d", "--name", &id, "--annotation", &listen];
    for a in annotations {
        extra.push("--annotation");
        extra.push(a);
    }
    let out = run(d, root, &extra, &["/app/http.wasm"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || get(port, "/").is_ok_and(|(c, _)| c == 200)),
        "nothing answers on {port}: {}",
        d.log_text()
    );
    id
}

/// Item 7 for edge functions: a client that sends its headers too slowly is cut off after the
/// header timeout; connections past the cap are refused; a request that computes past its
/// timeout is answered 500 and the task goes on; a privileged port is refused; and the listen
/// address never comes from the image's environment.
#[test]
fn issue16_wasm_http_limits() {
    let option_port = free_port();
    let Some(d) = daemon(&[], &format!("http_listen = \"127.0.0.1:{option_port}\"")) else {
        return;
    };
    let root = Rootfs::new();

    // Slowloris: half a request, then nothing.
    let port = free_port();
    let id = http_task(
        &d,
        &root,
        port,
        &["io.switchyard.wasm.header-timeout-ms=500".into()],
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let got = until_closed(&mut s);
    let took = t.elapsed();
    eprintln!("slow client cut after {took:?}");
    assert!(!got.contains(" 200 "), "{got}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "cut after {took:?}"
    );
    // The task still serves.
    assert_eq!(get(port, "/after").unwrap().0, 200);
    let out = d.run_yard(&["rm", "--force", &id]);
    assert!(out.status.success(), "{}", show(&out));

    // Two connections at most; a request that computes forever gets 500 after 300 ms.
    let port = free_port();
    let id = http_task(
        &d,
        &root,
        port,
        &[
            "io.switchyard.wasm.max-connections=2".into(),
            "io.switchyard.wasm.request-timeout-ms=300".into(),
        ],
    );
    let t = Instant::now();
    let (code, body) = get(port, "/spin").unwrap();
    let took = t.elapsed();
    assert_eq!(code, 500, "{body}");
    assert!(
        took < Duration::from_secs(10),
        "/spin answered after {took:?}"
    );
    assert!(
        eventually(SETTLE, || d.log_text().contains("timeout of 300 ms")),
        "no timeout reported"
    );
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut first = [0u8; 12];
            s.read_exact(&mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 200");
            s
        })
        .collect();
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let got = until_closed(&mut third);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 503"),
        "a third connection got {got:?}"
    );
    drop(held);
    assert!(
        eventually(SETTLE, || get(port, "/again").is_ok_and(|(c, _)| c == 200)),
        "no connection accepted after the held ones closed"
    );
    let out = d.run_yard(&["rm", "--force", &id]);
    assert!(out.status.success(), "{}", show(&out));

    // A privileged port needs the runtime's permission.
    let out = run(
        &d,
        &root,
        &[
            "--rm",
            "--annotation",
            "io.switchyard.wasm.http-listen=127.0.0.1:80",
        ],
        &["/app/http.wasm"],
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr)
            .contains("annotations.io.switchyard.wasm.http-listen: port 80 is privileged"),
        "{}",
        show(&out)
    );

    // The image's environment names another address: the runtime option's is used.
    let env_port = free_port();
    let id = unique_id("env");
    let env = format!("SWITCHYARD_HTTP_LISTEN=127.0.0.1:{env_port}");
    let out = run(
        &d,
        &root,
        &["-d", "--name", &id, "-e", &env],
        &["/app/http.wasm"],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        eventually(SETTLE, || get(option_port, "/")
            .is_ok_and(|(c, _)| c == 200)),
        "not listening on the option's port {option_port}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", env_port)).is_err(),
        "listening on the port from the environment"
    );
    let out = d.run_yard(&["rm", "--force", &id]);
    assert!(out.status.success(), "{}", show(&out));
}

/// Item 10: a user other than root (from an image's `User`) and a seccomp profile (ctr's
/// `--seccomp`) ask for confinement a Wasm task would not get: Create fails naming the field,
/// unless the runtime option allows it. The defaults of ctr and `yard run` pass.
#[test]
fn issue16_wasm_unenforceable_settings_fail_create() {
    let root = Rootfs::new();
    let ctr_run = |d: &Daemon, flags: &[&str]| {
        let id = unique_id("unenf");
        let mut c = d.ctr();
        c.args(["run", "--rm", "--runtime", RUNTIME_TYPE])
            .args(flags)
            .args(["--rootfs", root.path(), &id, "/app/hello.wasm", "ran"]);
        run_timeout(&mut c, T)
    };
    let user_image = |d: &Daemon| {
        let out = import_image(
            d,
            "issue16/user",
            false,
            json!({"Entrypoint": ["/app.wasm"], "Cmd": ["ran"], "User": "1000"}),
        );
        assert!(out.status.success(), "import: {}", show(&out));
        d.run_yard(&["run", "--rm", "--runtime", "wasm", "issue16/user:1"])
    };
    {
        let Some(d) = daemon(&[], "") else {
            return;
        };
        // The defaults of ctr and yard pass.
        let out = ctr_run(&d, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        let out = run(&d, &root, &["--rm"], &["/app/hello.wasm", "ran"]);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        let out = ctr_run(&d, &["--seccomp"]);
        assert!(!out.status.success(), "--seccomp: {}", show(&out));
        assert!(
            text(&out.stderr).contains("linux.seccomp: ")
                && text(&out.stderr).contains("allow_unenforced"),
            "--seccomp: {}",
            show(&out)
        );
        let out = user_image(&d);
        assert!(!out.status.success(), "User 1000: {}", show(&out));
        assert!(
            text(&out.stderr).contains("process.user.uid: ")
                && text(&out.stderr).contains("allow_unenforced"),
            "User 1000: {}",
            show(&out)
        );
    }
    let Some(d) = daemon(&[], "allow_unenforced = [\"process.user\"]") else {
        return;
    };
    let out = user_image(&d);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stdout).contains("arg[1]=ran"), "{}", show(&out));
    let out = ctr_run(&d, &["--seccomp"]);
    assert!(!out.status.success(), "{}", show(&out));
}

/// Item 10: a compiled-code cache others can write to is refused with a clear error.
#[test]
fn issue16_wasm_cache_dir_must_be_roots_alone() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start_with(&format!(
        "[runtimes.wasm]\nruntime_type = \"{RUNTIME_TYPE}\"\n[runtimes.wasm.options]\n\
         cache_dir = \"{}\"\n",
        cache.path().display()
    ));
    let root = Rootfs::new();
    let out = run(&d, &root, &["--rm"], &["/app/hello.wasm"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains(&format!(
            "options: cache_dir: {} is writable by group or others (mode 0777)",
            cache.path().display()
        )),
        "{}",
        show(&out)
    );
    let entries = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(entries, 0, "something was cached");
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run(&d, &root, &["--rm"], &["/app/hello.wasm"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

/// Item 1 when the client, not the image, picks Wasm: an image that is not for Wasm may carry a
/// device node (it imports), but a root made from it for the wasm runtime is refused when it
/// is unpacked, naming the entry.
#[test]
fn issue16_device_node_refused_when_wasm_is_forced() {
    let Some(d) = daemon(&[], "") else {
        return;
    };
    let import = import_image(
        &d,
        "issue16/linuxdev",
        true,
        json!({"Entrypoint": ["/app"], "Cmd": ["--open", "/dev/zero"]}),
    );
    assert!(import.status.success(), "import: {}", show(&import));
    let out = d.run_yard(&["run", "--rm", "--runtime", "wasm", "issue16/linuxdev:1"]);
    let e = text(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && e.contains("dev/zero") && e.contains("device"),
        "{}",
        show(&out)
    );
    assert!(d.ps().is_empty(), "nothing is left: {:?}", d.ps());
}
