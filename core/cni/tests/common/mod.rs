//! What the root tests share: the prerequisite gate (the rule of `tests/src/gate.rs`, kept here
//! so a core crate does not depend on the test kit) and running host tools.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether a prerequisite is there; otherwise prints why the test is skipped, or fails under
/// `SWITCHYARD_REQUIRE_ALL=1` (CI), so a missing prerequisite cannot pass silently.
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

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Root and the named programs on PATH.
pub fn require_root_and(programs: &[&str]) -> bool {
    require(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces, mounts, links)",
    ) && programs
        .iter()
        .all(|p| require(which(p).is_some(), &format!("needs {p} on PATH")))
}

/// The plugins in Debian's `containernetworking-plugins`.
pub fn require_plugins(dir: &Path, plugins: &[&str]) -> bool {
    plugins.iter().all(|p| {
        require(
            dir.join(p).is_file(),
            &format!(
                "needs {} (apt-get install containernetworking-plugins)",
                dir.join(p).display()
            ),
        )
    })
}

/// Runs a command; its success and stdout.
pub fn run(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Polls `cond` until it holds or `timeout` passes; whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether anything is mounted at `path` (per this process's mountinfo).
pub fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}
