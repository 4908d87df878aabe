//! What the root tests share: the test kit's prerequisite gate (`tests/src/gate.rs`) and
//! running host tools.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub use switchyard_tests::{require, require_root_and};

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

/// Whether anything is mounted at `path` (per this process's mountinfo).
pub fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}
