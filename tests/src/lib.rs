//! The test kit shared by the integration tests and benchmarks: privilege checks that skip
//! with a printed reason, a busybox rootfs, and switchyardd / containerd daemons on private
//! sockets and directories, driven through their real binaries.
//!
//! Set `SWITCHYARD_REQUIRE_ALL=1` (CI does) to turn every skip into a failure, so a missing
//! prerequisite cannot pass silently.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod cri;
pub mod daemon;
pub mod images;
pub mod nested;
pub mod wasm;

pub use daemon::{Containerd, Daemon};

/// Whether a prerequisite is there; otherwise prints why the test is skipped (or fails, under
/// `SWITCHYARD_REQUIRE_ALL=1`).
pub fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("SWITCHYARD_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("required prerequisite missing: {reason}");
    }
    eprintln!("SKIP: {reason}");
    false
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Root, and the named programs on PATH.
pub fn require_root_and(programs: &[&str]) -> bool {
    if !require(is_root(), "needs root (namespaces, cgroups, mounts)") {
        return false;
    }
    programs
        .iter()
        .all(|p| require(which(p).is_some(), &format!("needs {p} on PATH")))
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The cargo target directory holding the workspace binaries (the one this test runs from).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A workspace binary, which must have been built (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A fresh id that no other test (or earlier run) uses.
pub fn unique_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A busybox root filesystem (Debian's busybox-static), made once per test process.
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("switchyard-busybox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run", "root"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .expect("busybox (apt-get install busybox-static)");
        std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
        let list = Command::new(dir.join("bin/busybox"))
            .arg("--list")
            .output()
            .unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.is_empty() {
                std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
            }
        }
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(dir.join("etc/hello.txt"), "hello from the rootfs\n").unwrap();
        dir
    })
}

/// Runs a command to completion with a deadline; the output is printed on failure to help
/// debugging. Output is read while the command runs (so a chatty command cannot fill a pipe
/// and stall), and the exit is noticed as it happens (timings taken around this are exact).
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let out = rx
                .recv_timeout(Duration::from_secs(5))
                .ok()
                .and_then(Result::ok);
            let (o, e) = out
                .map(|o| (text(&o.stdout), text(&o.stderr)))
                .unwrap_or_default();
            panic!("{cmd:?} did not finish within {timeout:?}\nstdout: {o}\nstderr: {e}");
        }
    }
}

/// The text of an output stream.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// Processes whose command line contains every one of `needles`.
pub fn processes_matching(needles: &[&str]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) {
            out.push((pid, cmd));
        }
    }
    out
}

/// Mount points whose path contains `needle`.
pub fn mounts_matching(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// cgroup directories (v1 controllers or the v2 tree) for `relative` (like
/// `switchyard/default/ID`) that exist.
pub fn cgroups_matching(relative: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut found = Vec::new();
    let direct = root.join(relative);
    if direct.is_dir() {
        found.push(direct);
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path().join(relative);
            if p.is_dir() {
                found.push(p);
            }
        }
    }
    found
}

/// Writes a file, creating parents.
pub fn write(path: &Path, content: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

/// A child that is killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
