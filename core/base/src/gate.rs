//! Prerequisite gates for tests, one home for the workspace test kit (`tests/src/gate.rs`) and
//! the crates that cannot depend on it (the VMM's unit and integration tests): a test that needs
//! root or a device checks with [`require`], which prints why it skips, or fails under
//! `SWITCHYARD_REQUIRE_ALL=1` (CI sets it, so a missing prerequisite cannot pass silently).

/// Whether a prerequisite is there; otherwise prints why the test is skipped (or fails, under
/// `SWITCHYARD_REQUIRE_ALL=1`).
#[allow(clippy::print_stderr)]
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

/// Whether this process runs as root (its effective uid owns `/proc/self`).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
