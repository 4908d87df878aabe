//! Issue 16, the daemon's side.
//!
//! - Item 4: nothing switchyardd makes is open to other users. With tasks running on native,
//!   wasm and vm, an unprivileged user (uid 65534, through `setpriv`) can read, write or list
//!   none of the files and directories under the daemon's root and state, and connect to none
//!   of its sockets or the shims' sockets; and, checked as root, none of them grants any
//!   permission to group or others (image contents excepted: their modes are the image's).
//! - Item 5: crash windows. switchyardd is made to abort (a failpoint, `SWITCHYARD_FAILPOINTS`)
//!   at each step of task create/start/delete and of image import/pull (blob and snapshot
//!   commits included), restarted, and everything must be done or undone, never half: no
//!   bundle without a shim, no shim without a task, `yard ps` and `ctr task ls` agree with
//!   the shims, the task can be deleted, and the image store holds nothing that an image
//!   does not name once collected.
//! - Item 10: `yard pull --password-stdin`, and a warning for a password in argv.
//!
//! Needs root (and `setpriv`, containerd's `ctr`, `docker-registry`; the vm part QEMU and the
//! guest, the wasm part the Wasm fixtures' targets); skips with a printed reason otherwise.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_tests::images::{Registry, TarEntry, busybox_image, gzip, layer_tar};
use switchyard_tests::wasm::wasm_rootfs;
use switchyard_tests::*;

const T: Duration = Duration::from_secs(120);
const NOBODY: &str = "65534";
/// Set when this test binary runs as the unprivileged probe (see `probe_as_nobody`).
const PROBE_ENV: &str = "SWITCHYARD_ISSUE16_PROBE";
const PROBE_TEST: &str = "issue16_unprivileged_probe_tells_open_from_closed";
const FAILPOINTS: &str = "SWITCHYARD_FAILPOINTS";

/// `yard` with `input` on its stdin.
fn yard_stdin(d: &Daemon, args: &[&str], input: &str) -> Output {
    let mut child = d
        .yard()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // yard may refuse the command and exit before it reads its stdin: the output says why.
    let written = child.stdin.take().unwrap().write_all(input.as_bytes());
    if let Err(e) = written {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "write yard's stdin: {e}"
        );
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(T)
        .unwrap_or_else(|_| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("yard {args:?} did not finish within {T:?}")
        })
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Item 4: the unprivileged probe

/// What an unprivileged user can do with each of `paths`: `read P`, `write P`, `list P`,
/// `connect P`. This test binary is the probe: run again as uid/gid 65534 with no groups.
fn probe_as_nobody(paths: &[PathBuf]) -> BTreeSet<String> {
    let me = std::env::current_exe().unwrap();
    // The probe must be able to run itself; a checkout private to root gets a copy.
    let copy = tempfile::Builder::new()
        .prefix("issue16-probe-")
        .tempdir()
        .unwrap();
    let runnable = run_timeout(
        Command::new("setpriv")
            .args(nobody_args())
            .args(["/bin/sh", "-c", "test -x \"$0\""])
            .arg(&me),
        T,
    )
    .status
    .success();
    let exe = if runnable {
        me
    } else {
        std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = copy.path().join("probe");
        std::fs::copy(&me, &p).unwrap();
        p
    };
    let mut child = Command::new("setpriv")
        .args(nobody_args())
        .arg(&exe)
        .args(["--exact", PROBE_TEST, "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let list: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(list.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "the probe failed: {}", show(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("PROBE DONE"),
        "the probe did not run: {}",
        show(&out)
    );
    stdout
        .lines()
        // libtest's own "test ... " may precede the first line.
        .filter_map(|l| l.split_once("PROBE: "))
        .map(|(_, what)| what.to_owned())
        .collect()
}

fn nobody_args() -> [&'static str; 3] {
    ["--reuid=65534", "--regid=65534", "--clear-groups"]
}

/// The probe's side: paths on stdin, one line per thing it could do on stdout.
fn probe_paths_from_stdin() {
    assert_eq!(nix::unistd::getuid().as_raw().to_string(), NOBODY);
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    for line in input.lines().filter(|l| !l.is_empty()) {
        let p = Path::new(line);
        // Not even stat-able (a closed directory on the way) is closed.
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        let ft = meta.file_type();
        let nonblock = nix::libc::O_NONBLOCK;
        if ft.is_dir() {
            if std::fs::read_dir(p).is_ok() {
                println!("PROBE: list {line}");
            }
        } else if ft.is_socket() {
            match std::os::unix::net::UnixStream::connect(p) {
                Ok(_) => println!("PROBE: connect {line}"),
                // Refused means the permission check passed (nobody listens any more).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    println!("PROBE: connect {line}")
                }
                Err(_) => {}
            }
        } else if ft.is_file() || ft.is_fifo() {
            let flags = if ft.is_fifo() { nonblock } else { 0 };
            if std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(p)
                .is_ok()
            {
                println!("PROBE: read {line}");
            }
            // A fifo nobody reads answers ENXIO, after the permission check.
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(flags)
                .open(p)
            {
                Ok(_) => println!("PROBE: write {line}"),
                Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                    println!("PROBE: write {line}")
                }
                Err(_) => {}
            }
        }
    }
    println!("PROBE DONE");
}

/// The probe tells an open file, directory, fifo and socket from closed ones (and, run as
/// the probe, does the probing).
#[test]
fn issue16_unprivileged_probe_tells_open_from_closed() {
    if std::env::var_os(PROBE_ENV).is_some() {
        probe_paths_from_stdin();
        return;
    }
    if !require_root_and(&["setpriv"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(d, 0o755).unwrap();
    write(&d.join("open.txt"), "x");
    mode(&d.join("open.txt"), 0o644).unwrap();
    write(&d.join("closed.txt"), "x");
    mode(&d.join("closed.txt"), 0o600).unwrap();
    write(&d.join("shared.txt"), "x");
    mode(&d.join("shared.txt"), 0o666).unwrap();
    std::fs::create_dir(d.join("open-dir")).unwrap();
    mode(&d.join("open-dir"), 0o755).unwrap();
    std::fs::create_dir(d.join("closed-dir")).unwrap();
    mode(&d.join("closed-dir"), 0o700).unwrap();
    write(&d.join("closed-dir/inside.txt"), "x");
    mode(&d.join("closed-dir/inside.txt"), 0o644).unwrap();
    let open_sock = std::os::unix::net::UnixListener::bind(d.join("open.sock")).unwrap();
    mode(&d.join("open.sock"), 0o777).unwrap();
    let closed_sock = std::os::unix::net::UnixListener::bind(d.join("closed.sock")).unwrap();
    mode(&d.join("closed.sock"), 0o600).unwrap();
    for (name, m) in [("open.fifo", 0o666), ("closed.fifo", 0o600)] {
        nix::unistd::mkfifo(
            &d.join(name),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        mode(&d.join(name), m).unwrap();
    }
    let names = [
        "open.txt",
        "closed.txt",
        "shared.txt",
        "open-dir",
        "closed-dir",
        "closed-dir/inside.txt",
        "open.sock",
        "closed.sock",
        "open.fifo",
        "closed.fifo",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| d.join(n)).collect();
    let found = probe_as_nobody(&paths);
    let p = |n: &str| d.join(n).display().to_string();
    let want: BTreeSet<String> = [
        format!("read {}", p("open.txt")),
        format!("read {}", p("shared.txt")),
        format!("write {}", p("shared.txt")),
        format!("list {}", p("open-dir")),
        format!("connect {}", p("open.sock")),
        format!("read {}", p("open.fifo")),
        format!("write {}", p("open.fifo")),
    ]
    .into_iter()
    .collect();
    assert_eq!(found, want);
    drop((open_sock, closed_sock));
}

// ---------------------------------------------------------------------------------------------
// Item 4: the daemon's files and sockets

fn vm_ready() -> bool {
    let g = guest_dir();
    require(
        which("qemu-system-x86_64").is_some()
            && which("mkfs.erofs").is_some()
            && g.join("vmlinux").is_file()
            && g.join("initrd.img").is_file(),
        &format!(
            "the vm part needs qemu-system-x86_64, mkfs.erofs and the guest in {} (scripts/guest)",
            g.display()
        ),
    )
}

/// Every path under `dir` (itself included), not following symlinks or entering mounts.
fn walk(dir: &Path, mounts: &BTreeSet<PathBuf>, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if mounts.contains(dir) {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(ft) if ft.is_dir() => walk(&p, mounts, out),
            Ok(_) => out.push(p),
            Err(_) => {}
        }
    }
}

fn mount_points() -> BTreeSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

/// Whether `p` is an image's own content, whose modes are the image's: a committed layer's
/// tree, a container root's upper and work directories, a mounted container root.
fn is_image_content(root: &Path, p: &Path, mounts: &BTreeSet<PathBuf>) -> bool {
    if mounts.contains(p) {
        return true;
    }
    let Ok(rel) = p.strip_prefix(root.join("images/snapshots")) else {
        return false;
    };
    let parts: Vec<_> = rel.components().collect();
    match parts.first().map(|c| c.as_os_str().to_string_lossy()) {
        // snapshots/<id>/fs/...
        Some(s) if s == "snapshots" => parts.len() >= 3 && parts[2].as_os_str() == "fs",
        // active/<ns>/<id>/{upper,work,fs}/...
        Some(s) if s == "active" => parts.len() >= 4,
        _ => false,
    }
}

/// The shim's socket named by a bundle's `address` file (`unix:///path`).
fn shim_socket(bundle: &Path) -> Option<PathBuf> {
    let a = std::fs::read_to_string(bundle.join("address")).ok()?;
    let a = a.trim();
    a.strip_prefix("unix://").map(PathBuf::from)
}

#[test]
fn issue16_nothing_of_the_daemon_is_open_to_other_users() {
    if !require_root_and(&["setpriv"]) {
        return;
    }
    let vm = vm_ready();
    let g = guest_dir();
    let wasm_cache = std::env::temp_dir().join(unique_id("wasm-cache"));
    let vm_cache = std::env::temp_dir().join(unique_id("vm-cache"));
    let d = Daemon::start_with(&format!(
        "[runtimes.wasm]\nruntime_type = \"io.containerd.yard-wasm.v1\"\n[runtimes.wasm.options]\ncache_dir = \"{}\"\n\
         [runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n[runtimes.vm.options]\nkernel = \"{}\"\ninitrd = \"{}\"\ncache_dir = \"{}\"\n",
        wasm_cache.display(),
        g.join("vmlinux").display(),
        g.join("initrd.img").display(),
        vm_cache.display()
    ));
    // As /run and /var/lib are: anyone may look inside the directory that holds root, state
    // and the sockets. Only the daemon's own modes may keep them out.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // An image (content, snapshots, a container root, an EROFS image for the vm).
    let archive = d.dir.path().join("image.tar");
    std::fs::write(
        &archive,
        switchyard_tests::images::oci_layout_tar(&[("perm:1", &busybox_image(vec![], json!({})))]),
    )
    .unwrap();
    d.yard_ok(&["image", "import", "-q", archive.to_str().unwrap()]);
    let native = unique_id("perm-native");
    d.yard_ok(&[
        "run", "-d", "--name", &native, "perm:1", "--", "sleep", "600",
    ]);
    let wasm = unique_id("perm-wasm");
    let mut c = d.yard();
    c.args([
        "run",
        "-d",
        "--runtime",
        "wasm",
        "--name",
        &wasm,
        "--rootfs",
    ])
    .arg(wasm_rootfs())
    .args(["--", "/app/hello.wasm", "--sleep", "600000"]);
    let out = run_timeout(&mut c, T);
    assert!(out.status.success(), "wasm task: {}", show(&out));
    let vm_id = unique_id("perm-vm");
    if vm {
        d.yard_ok(&[
            "run",
            "-d",
            "--runtime",
            "vm",
            "--name",
            &vm_id,
            "perm:1",
            "--",
            "sleep",
            "600",
        ]);
    }
    let mut ids = vec![native.clone(), wasm.clone()];
    if vm {
        ids.push(vm_id.clone());
    }
    for id in &ids {
        assert!(
            eventually(T, || d
                .yard_ok(&["ps"])
                .lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("running"))),
            "{id} is not running: {}",
            d.yard_ok(&["ps"])
        );
    }

    let mounts = mount_points();
    let root = d.dir.path().join("root");
    let mut paths = Vec::new();
    walk(&root, &mounts, &mut paths);
    walk(&d.state_dir(), &mounts, &mut paths);
    paths.push(d.socket.clone());
    paths.push(PathBuf::from(format!("{}.ttrpc", d.socket.display())));
    for id in &ids {
        let bundle = d.state_dir().join("tasks/default").join(id);
        let sock = shim_socket(&bundle)
            .unwrap_or_else(|| panic!("{id}: no shim address in {}", bundle.display()));
        paths.push(sock);
    }
    // The vm runtime's per-sandbox state (console log, agent and VMM sockets).
    if vm {
        for ns in std::fs::read_dir("/run/switchyard/vm")
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{vm_id}-"))
                {
                    walk(&e.path(), &mounts, &mut paths);
                }
            }
        }
    }
    assert!(paths.iter().any(|p| p.ends_with("meta.redb")));
    assert!(paths.iter().any(|p| p.ends_with("log")), "shim log fifos");

    // As nobody: nothing can be read, written, listed or connected to.
    let open = probe_as_nobody(&paths);
    assert!(
        open.is_empty(),
        "an unprivileged user can reach switchyardd's files and sockets:\n{}",
        open.into_iter().collect::<Vec<_>>().join("\n")
    );

    // As root: nothing grants group or others anything (beyond the image's own modes), so
    // nothing opens up if a directory on the way does.
    let mut loose = Vec::new();
    for p in &paths {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        if meta.file_type().is_symlink() || is_image_content(&root, p, &mounts) {
            continue;
        }
        let m = meta.permissions().mode() & 0o7777;
        if m & 0o077 != 0 {
            loose.push(format!("{m:04o} {}", p.display()));
        }
    }
    assert!(
        loose.is_empty(),
        "these grant group or others access:\n{}",
        loose.join("\n")
    );

    for id in &ids {
        d.yard_ok(&["rm", "-f", id]);
    }
    drop(d);
    let _ = std::fs::remove_dir_all(&wasm_cache);
    let _ = std::fs::remove_dir_all(&vm_cache);
}

// ---------------------------------------------------------------------------------------------
// Item 5: crash windows

/// A switchyardd on `d`'s directories with `point` armed to abort; `d`'s own daemon is
/// stopped first. Dropping the handle kills it.
fn armed(d: &mut Daemon, point: &str) -> KillOnDrop {
    armed_with(d, point, "abort")
}

/// [`armed`] with another action (`hold(FIFO)`, see [`Hold`], or the `fail` crate's).
fn armed_with(d: &mut Daemon, point: &str, action: &str) -> KillOnDrop {
    d.kill9();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&d.log)
        .unwrap();
    writeln!(&log, "--- test: switchyardd with {point}={action} ---").unwrap();
    let child = Command::new(bin("switchyardd"))
        .arg("--config")
        .arg(&d.config)
        .env(FAILPOINTS, format!("{point}={action}"))
        .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info,tonic=info")
        // A core dump, if the system writes one, lands in the test's directory.
        .current_dir(d.dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let up = eventually(T, || {
        std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
            || child.0.try_wait().ok().flatten().is_some()
    });
    assert!(
        up && child.0.try_wait().unwrap().is_none(),
        "armed switchyardd did not start:\n{}",
        d.log_text()
    );
    child
}

/// A fifo an armed daemon waits on at its point (`hold(FIFO)`) until the test lets it go on.
struct Hold {
    fifo: PathBuf,
}

impl Hold {
    fn new(d: &Daemon) -> Hold {
        let fifo = d.dir.path().join(format!("hold-{}", unique_id("fp")));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        Hold { fifo }
    }

    fn action(&self) -> String {
        format!("hold({})", self.fifo.display())
    }

    /// Waits until the daemon waits at its point (it has the fifo open for reading: only then
    /// can a writer open it without blocking). The operation goes on when the returned writer
    /// is dropped.
    fn reached(&self) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        let mut writer = None;
        let open = || {
            writer = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&self.fifo)
                .ok();
            writer.is_some()
        };
        assert!(eventually(T, open), "the daemon never waited at its point");
        writer.unwrap()
    }

    /// Lets the held operation go on, once the daemon waits there.
    fn release(&self) {
        drop(self.reached());
    }
}

/// Waits until nothing listens on a killed server's socket any more.
fn dead_server(socket: &Path) {
    assert!(
        eventually(T, || std::os::unix::net::UnixStream::connect(socket)
            .is_err()),
        "{} still answers after its server's kill",
        socket.display()
    );
}

/// Waits for the armed daemon to abort at its failpoint.
fn aborted(d: &Daemon, child: &mut KillOnDrop, point: &str) {
    let mut status = None;
    eventually(T, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap_or_else(|| panic!("switchyardd did not stop at {point}"));
    assert_eq!(
        status.signal(),
        Some(nix::libc::SIGABRT),
        "switchyardd did not abort at {point} ({status}):\n{}",
        d.log_text()
    );
}

/// `ctr task ls`: id → (pid, status).
fn ctr_tasks(d: &Daemon) -> Vec<(String, u32, String)> {
    let out = run_timeout(d.ctr().args(["task", "ls"]), T);
    assert!(out.status.success(), "ctr task ls: {}", show(&out));
    text(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| {
                (
                    f[0].to_owned(),
                    f[1].parse().unwrap_or(0),
                    f[2].to_ascii_lowercase(),
                )
            })
        })
        .collect()
}

/// The shim servers (and `<shim> start|delete` runs) working for this daemon: (pid, `-id`).
fn shims(d: &Daemon) -> Vec<(u32, String)> {
    let sock = d.socket.display().to_string();
    processes_matching(&[" -address ", &sock, " -id "])
        .into_iter()
        .map(|(pid, cmd)| {
            let id = cmd
                .split(' ')
                .skip_while(|a| *a != "-id")
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            (pid, id)
        })
        .collect()
}

/// Everything switchyardd and the shims say about task `id` agrees, and nothing is half
/// made: a task is listed by `ctr task ls` and `yard ps` alike, with its bundle, work
/// directory and shim; or it has none of them. Returns the task's status.
fn whole_or_gone(d: &Daemon, id: &str) -> Option<String> {
    let listed = ctr_tasks(d).into_iter().find(|(t, _, _)| t == id);
    if listed.is_none() {
        // A shim the restored daemon stopped (it knew no task of it) may still be exiting: it
        // forwards its last events first (the kit's flush, at most 2 s). Gone means gone once
        // that is over.
        eventually(Duration::from_secs(10), || {
            !shims(d).iter().any(|(_, s)| s == id)
        });
    }
    let ps = d
        .ps_row(id)
        .map(|r| r["status"].as_str().unwrap_or_default().to_owned());
    let bundle = d.state_dir().join("tasks/default").join(id);
    let work = d.dir.path().join("root/tasks/default").join(id);
    let shim_alive = shims(d).iter().any(|(_, s)| s == id);
    let mounted = !mounts_matching(&bundle.display().to_string()).is_empty();
    let all = || {
        format!(
            "ctr task ls: {listed:?}; yard ps: {ps:?}; bundle {}; work {}; shim alive {shim_alive}; rootfs mounted {mounted}",
            bundle.exists(),
            work.exists()
        )
    };
    match &listed {
        Some((_, pid, status)) => {
            assert_eq!(ps.as_deref(), Some(status.as_str()), "{}", all());
            assert!(
                bundle.is_dir() && work.is_dir() && shim_alive,
                "half a task: {}",
                all()
            );
            if status == "running" {
                assert!(
                    Path::new(&format!("/proc/{pid}")).exists(),
                    "the listed pid is gone: {}",
                    all()
                );
            }
            Some(status.clone())
        }
        None => {
            assert!(matches!(ps.as_deref(), None | Some("no task")), "{}", all());
            assert!(
                !bundle.exists() && !work.exists() && !shim_alive && !mounted,
                "half a task: {}",
                all()
            );
            None
        }
    }
}

/// Nothing of any task is left: no shim, bundle, work directory, mount or cgroup.
fn nothing_left(d: &Daemon, ids: &[&str]) {
    assert!(
        eventually(Duration::from_secs(20), || shims(d).is_empty()),
        "shims left: {:?}",
        shims(d)
    );
    let entries = |p: PathBuf| {
        std::fs::read_dir(p)
            .map(|r| r.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(entries(d.state_dir().join("tasks/default")).is_empty());
    assert!(entries(d.dir.path().join("root/tasks/default")).is_empty());
    for id in ids {
        assert!(mounts_matching(id).is_empty(), "{id} still mounted");
        assert!(
            cgroups_matching(&format!("switchyard/default/{id}")).is_empty(),
            "{id}'s cgroup is left"
        );
    }
}

/// A failing test still removes its task, so no container process outlives it.
struct RemoveOnPanic {
    socket: PathBuf,
    id: String,
}

impl Drop for RemoveOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut c = Command::new(bin("yard"));
            c.env("SWITCHYARD_ADDRESS", &self.socket)
                .args(["rm", "-f", &self.id]);
            let _ = run_timeout(&mut c, T);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum TaskOp {
    /// `yard run -d` (create and start).
    Run,
    /// `yard rm` of a stopped task.
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Gone,
    Intact(&'static str),
}

/// Every step of a task's life at which switchyardd can die, and what a restart finds.
const TASK_STEPS: &[(&str, TaskOp, Outcome)] = &[
    ("task.create.bundle-written", TaskOp::Run, Outcome::Gone),
    ("task.create.record-written", TaskOp::Run, Outcome::Gone),
    ("task.create.shim-spawned", TaskOp::Run, Outcome::Gone),
    ("task.create.shim-started", TaskOp::Run, Outcome::Gone),
    (
        "task.create.shim-created",
        TaskOp::Run,
        Outcome::Intact("created"),
    ),
    (
        "task.start.shim-started",
        TaskOp::Run,
        Outcome::Intact("running"),
    ),
    ("task.delete.shim-deleted", TaskOp::Remove, Outcome::Gone),
    ("task.delete.shim-shutdown", TaskOp::Remove, Outcome::Gone),
];

fn run_args<'a>(runtime: &'a str, id: &'a str, rootfs: &'a Path) -> Vec<String> {
    let mut a: Vec<String> = ["run", "-d", "--name", id, "--runtime", runtime, "--rootfs"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    a.push(rootfs.display().to_string());
    a.push("--".to_owned());
    if runtime == "wasm" {
        a.extend(["/app/hello.wasm", "--sleep", "600000"].map(str::to_owned));
    } else {
        a.extend(["sleep", "600"].map(str::to_owned));
    }
    a
}

/// Crashes the daemon at `point` during `op` on a task of `runtime`, restarts it, checks that
/// the task is whole or gone as `expect` says, and deletes it.
fn crash_task_at(
    d: &mut Daemon,
    runtime: &str,
    rootfs: &Path,
    point: &str,
    op: TaskOp,
    expect: Outcome,
) {
    let id = unique_id("crash");
    let _cleanup = RemoveOnPanic {
        socket: d.socket.clone(),
        id: id.clone(),
    };
    let args = run_args(runtime, &id, rootfs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if let TaskOp::Remove = op {
        d.yard_ok(&args);
        d.yard_ok(&["kill", "-s", "KILL", &id]);
        // Both views settle (they are read one after the other, so compare only then).
        let stopped = || {
            ctr_tasks(d)
                .iter()
                .any(|(t, _, s)| *t == id && s == "stopped")
                && d.ps_row(&id).is_some_and(|r| r["status"] == "stopped")
        };
        assert!(eventually(T, stopped), "{id} did not stop");
        assert_eq!(whole_or_gone(d, &id).as_deref(), Some("stopped"));
    }
    let mut crashing = armed(d, point);
    let out = match op {
        TaskOp::Run => d.run_yard(&args),
        TaskOp::Remove => d.run_yard(&["rm", &id]),
    };
    assert!(
        !out.status.success(),
        "{point}: the operation outlived the crash: {}",
        show(&out)
    );
    aborted(d, &mut crashing, point);
    d.restart();
    let found = whole_or_gone(d, &id);
    let want = match expect {
        Outcome::Gone => None,
        Outcome::Intact(status) => Some(status.to_owned()),
    };
    assert_eq!(found, want, "{runtime} {point}: after a restart");
    // The container record is the client's and stays; the task, if any, goes with it.
    let out = d.run_yard(&["rm", "-f", &id]);
    assert!(out.status.success(), "{runtime} {point}: {}", show(&out));
    assert_eq!(whole_or_gone(d, &id), None);
    assert!(d.ps_row(&id).is_none());
    nothing_left(d, &[&id]);
}

#[test]
fn issue16_a_crash_at_any_step_of_a_task_leaves_it_whole_or_gone() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let mut d = Daemon::start();
    for &(point, op, expect) in TASK_STEPS {
        eprintln!("native: {point}");
        crash_task_at(&mut d, "native", busybox_rootfs(), point, op, expect);
    }
}

/// The window the issue names (between shim start and shim Create) on the other runtimes,
/// containerd's runc shim included: restore asks the shim and cleans up what it does not know.
#[test]
fn issue16_a_crash_between_shim_start_and_create_leaves_no_shim_on_any_runtime() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let g = guest_dir();
    let wasm_cache = std::env::temp_dir().join(unique_id("wasm-cache"));
    let mut d = Daemon::start_with(&format!(
        "[runtimes.wasm]\nruntime_type = \"io.containerd.yard-wasm.v1\"\n[runtimes.wasm.options]\ncache_dir = \"{}\"\n\
         [runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n[runtimes.vm.options]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
        wasm_cache.display(),
        g.join("vmlinux").display(),
        g.join("initrd.img").display(),
    ));
    let mut runtimes: Vec<(&str, &Path)> = vec![("wasm", wasm_rootfs())];
    if vm_ready() {
        runtimes.push(("vm", busybox_rootfs()));
    }
    if require(
        which("containerd-shim-runc-v2").is_some() && which("runc").is_some(),
        "the runc part needs containerd-shim-runc-v2 and runc",
    ) {
        runtimes.push(("runc", busybox_rootfs()));
    }
    for (runtime, rootfs) in runtimes {
        for point in ["task.create.shim-spawned", "task.create.shim-started"] {
            eprintln!("{runtime}: {point}");
            crash_task_at(&mut d, runtime, rootfs, point, TaskOp::Run, Outcome::Gone);
        }
    }
    drop(d);
    let _ = std::fs::remove_dir_all(&wasm_cache);
}

/// A shim that dies after `start` answered and before switchyardd reached it (a SIGKILL in
/// that window: the chaos test found one) leaves no socket: the create fails naming the
/// connection, and switchyardd runs the binary's cleanup, which removes the dead server's
/// socket, as containerd does after a shim it cannot reach.
#[test]
fn a_shim_killed_before_it_is_reached_leaves_no_socket() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let mut d = Daemon::start();
    // The daemon waits at the point until the test has killed the server.
    let hold = Hold::new(&d);
    let _held = armed_with(&mut d, "task.create.shim-spawned", &hold.action());
    let id = unique_id("unreached");
    let _cleanup = RemoveOnPanic {
        socket: d.socket.clone(),
        id: id.clone(),
    };
    let args = run_args("native", &id, busybox_rootfs());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = std::thread::scope(|s| {
        let run = s.spawn(|| d.run_yard(&args));
        let mut server = None;
        assert!(
            eventually(T, || {
                server = processes_matching(&["containerd-shim-yard-native-v1", "-socket", &id])
                    .into_iter()
                    .next();
                server.is_some()
            }),
            "the shim server of {id} never ran"
        );
        let (pid, cmd) = server.unwrap();
        let socket = accounting::socket_file_flag(&cmd).expect("the server's -socket");
        // Killed once the daemon has seen it listen and waits at the point, not before: a
        // server killed earlier is one that never came up (a different error, and the point
        // is never reached).
        let held = hold.reached();
        assert!(socket.exists(), "{} never appeared", socket.display());
        sigkill(pid);
        dead_server(&socket);
        drop(held);
        (run.join().unwrap(), socket)
    });
    let (out, socket) = run;
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("connect to shim"),
        "the error names the connection: {}",
        show(&out)
    );
    assert!(!socket.exists(), "{} was left", socket.display());
    nothing_left(&d, &[&id]);
}

/// A shim killed after its Delete answered and before its Shutdown (the task no longer
/// registered, so no monitor cleans up after it: the chaos test found one) leaves no socket:
/// switchyardd sees Shutdown go unanswered and runs the binary's cleanup.
#[test]
fn a_shim_killed_between_delete_and_shutdown_leaves_no_socket() {
    if !require_root_and(&["ctr"]) {
        return;
    }
    let mut d = Daemon::start();
    // The daemon waits at the point (after the task's Delete, before the shim's Shutdown)
    // until the test has killed the server.
    let hold = Hold::new(&d);
    let _held = armed_with(&mut d, "task.delete.shim-deleted", &hold.action());
    let id = unique_id("undone");
    let _cleanup = RemoveOnPanic {
        socket: d.socket.clone(),
        id: id.clone(),
    };
    let args = run_args("native", &id, busybox_rootfs());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.yard_ok(&args);
    d.yard_ok(&["kill", "-s", "KILL", &id]);
    let listed = |status: Option<&str>| {
        let found = ctr_tasks(&d).into_iter().find(|(t, _, _)| *t == id);
        found.map(|(_, _, s)| s).as_deref() == status
    };
    assert!(
        eventually(T, || listed(Some("stopped"))),
        "{id} did not stop"
    );
    let (pid, cmd) = processes_matching(&["containerd-shim-yard-native-v1", "-socket", &id])
        .into_iter()
        .next()
        .expect("the shim server");
    let socket = accounting::socket_file_flag(&cmd).expect("the server's -socket");
    let out = std::thread::scope(|s| {
        let rm = s.spawn(|| d.run_yard(&["rm", &id]));
        // Unlisted while its shim lives: Delete has answered, Shutdown not yet been sent.
        assert!(eventually(T, || listed(None)), "{id} was never deleted");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the shim exited before the kill"
        );
        sigkill(pid);
        dead_server(&socket);
        hold.release();
        rm.join().unwrap()
    });
    assert!(out.status.success(), "{}", show(&out));
    assert!(!socket.exists(), "{} was left", socket.display());
    nothing_left(&d, &[&id]);
}

#[derive(Debug, Clone, Copy)]
enum ImageOp {
    Import,
    Pull,
}

/// Every step of an image import or pull at which switchyardd can die. None is past the
/// image's record, so each must leave no image and nothing that a collection keeps.
const IMAGE_STEPS: &[(&str, ImageOp)] = &[
    ("images.content.commit", ImageOp::Import),
    ("images.snapshot.commit", ImageOp::Import),
    ("images.import.unpacked", ImageOp::Import),
    ("images.content.commit", ImageOp::Pull),
    ("images.pull.fetched", ImageOp::Pull),
    ("images.snapshot.commit", ImageOp::Pull),
    ("images.pull.unpacked", ImageOp::Pull),
];

fn image_list(d: &Daemon) -> Value {
    serde_json::from_str(&d.yard_ok(&["images", "--json"])).unwrap()
}

/// The store holds no image and, collected, nothing at all; no scratch is left, and only
/// resumable downloads or the dead daemon's own ingests wait in the ingest area (collected
/// when old).
fn store_is_empty(d: &Daemon, dead_pid: u32) {
    let list = image_list(d);
    assert_eq!(list["images"], json!([]), "{list}");
    d.yard_ok(&["image", "prune"]);
    let usage = &image_list(d)["usage"];
    assert_eq!(
        (usage["blobs"].as_u64(), usage["snapshots"].as_u64()),
        (Some(0), Some(0)),
        "after a collection: {usage}"
    );
    let images = d.dir.path().join("root/images");
    let scratch: Vec<_> = std::fs::read_dir(images.join("snapshots/tmp"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "snapshot scratch left: {scratch:?}");
    for e in std::fs::read_dir(images.join("content/ingest"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let resumable = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(
            resumable || name.starts_with(&format!("anon-{dead_pid}-")),
            "ingest {name} left"
        );
    }
}

#[test]
fn issue16_a_crash_at_any_step_of_an_image_operation_leaves_no_half_image() {
    if !require_root_and(&["docker-registry"]) {
        return;
    }
    let marker = gzip(&layer_tar(&[
        TarEntry::dir("etc", 0o755),
        TarEntry::file("etc/whole", 0o644, "whole\n"),
    ]));
    let img = busybox_image(vec![marker], json!({"Cmd": ["cat", "/etc/whole"]}));
    let reg = Registry::start();
    reg.push("crash", "1", &img);
    let reference = reg.reference("crash", "1");
    let mut d = Daemon::start();
    let archive = d.dir.path().join("image.tar");
    std::fs::write(
        &archive,
        switchyard_tests::images::oci_layout_tar(&[("crash:1", &img)]),
    )
    .unwrap();
    let archive = archive.display().to_string();
    for &(point, op) in IMAGE_STEPS {
        eprintln!("{op:?}: {point}");
        let (args, name): (Vec<&str>, &str) = match op {
            ImageOp::Import => (vec!["image", "import", "-q", &archive], "crash:1"),
            ImageOp::Pull => (vec!["pull", "-q", &reference], &reference),
        };
        let mut crashing = armed(&mut d, point);
        let dead_pid = crashing.0.id();
        let out = d.run_yard(&args);
        assert!(!out.status.success(), "{point}: {}", show(&out));
        aborted(&d, &mut crashing, point);
        d.restart();
        store_is_empty(&d, dead_pid);
        // The operation works again, and its image is whole.
        d.yard_ok(&args);
        let list = image_list(&d);
        let images = list["images"].as_array().unwrap();
        assert_eq!(images.len(), 1, "{list}");
        assert!(images[0]["problem"].is_null(), "{list}");
        let out = d.yard_ok(&["run", "--rm", name]);
        assert_eq!(out, "whole\n");
        d.yard_ok(&["rmi", name]);
        store_is_empty(&d, dead_pid);
    }
}

// ---------------------------------------------------------------------------------------------
// Item 10: yard pull --password-stdin

#[test]
fn issue16_pull_takes_the_password_from_stdin() {
    if !require_root_and(&["docker-registry"]) {
        return;
    }
    let (user, pass) = ("alice", "s3cret: with spaces");
    let reg = Registry::start_with_auth(user, pass);
    reg.push("private", "1", &busybox_image(vec![], json!({})));
    let reference = reg.reference("private", "1");
    let d = Daemon::start();
    let warning = "--password-stdin";

    let out = yard_stdin(
        &d,
        &["pull", "-q", "-u", user, "--password-stdin", &reference],
        &format!("{pass}\n"),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(text(&out.stdout).contains(&reference), "{}", show(&out));
    assert!(!text(&out.stderr).contains("warning"), "{}", show(&out));
    d.yard_ok(&["rmi", &reference]);

    // A wrong password from stdin is refused by the registry.
    let out = yard_stdin(
        &d,
        &["pull", "-q", "-u", user, "--password-stdin", &reference],
        "wrong\n",
    );
    assert!(!out.status.success(), "{}", show(&out));

    // In argv it still works, with a warning on stderr.
    let out = d.run_yard(&["pull", "-q", "-u", &format!("{user}:{pass}"), &reference]);
    assert!(out.status.success(), "{}", show(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains(warning),
        "{}",
        show(&out)
    );

    // Clear errors for the mixed-up forms; nothing is read or sent.
    let out = yard_stdin(
        &d,
        &["pull", "-q", "--password-stdin", &reference],
        &format!("{pass}\n"),
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("--user"),
        "{}",
        show(&out)
    );
    let out = yard_stdin(
        &d,
        &[
            "pull",
            "-q",
            "-u",
            &format!("{user}:x"),
            "--password-stdin",
            &reference,
        ],
        &format!("{pass}\n"),
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("only the user name"),
        "{}",
        show(&out)
    );
    let out = yard_stdin(
        &d,
        &["pull", "-q", "-u", user, "--password-stdin", &reference],
        "",
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("stdin is empty"),
        "{}",
        show(&out)
    );
}
