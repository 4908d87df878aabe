//! Failpoints: named steps of task and image operations where a test can make switchyardd
//! crash (`abort`, as a `kill -9` would leave things) to prove that a restart finds every
//! operation either done or undone, never half.
//!
//! They exist in debug builds only (what `scripts/build` makes and the
//! integration tests run) and do nothing unless `SWITCHYARD_FAILPOINTS` names them; release
//! builds compile every point away. They are the `fail` crate's points, configured here with
//! two extra actions, `abort` and `hold(FIFO)`. See docs/operations.md ("Failpoints").

/// `name=action[;name=action...]`; `action` is `abort`, `hold(FIFO)` (wait there until a
/// writer opens and closes the fifo at FIFO: a test holds an operation at a step while it
/// acts, then lets it go on) or one of the `fail` crate's actions (`panic`, `sleep(ms)`,
/// `off`, ...).
pub const ENV: &str = "SWITCHYARD_FAILPOINTS";

/// Every failpoint, in the order an operation reaches them.
pub const POINTS: &[&str] = &[
    "task.create.bundle-written",
    "task.create.record-written",
    "task.create.shim-spawned",
    "task.create.shim-started",
    "task.create.shim-created",
    "task.start.shim-started",
    "task.delete.shim-deleted",
    "task.delete.shim-shutdown",
    "images.content.commit",
    "images.snapshot.commit",
    "images.pull.fetched",
    "images.pull.unpacked",
    "images.import.unpacked",
];

#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    #[error("{ENV}: {entry:?}: {reason}")]
    Invalid { entry: String, reason: String },
    #[error("{ENV} is set, but this is a release build: it has no failpoints")]
    Release,
}

/// Whether [`ENV`] configured any point.
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks a step of an operation; a no-op unless [`ENV`] configured this point.
#[inline]
pub fn hit(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unknown failpoint {name}");
    #[cfg(debug_assertions)]
    if ARMED.load(std::sync::atomic::Ordering::Relaxed) {
        let fire = || fail::fail_point!(name);
        // `hold` and `sleep` block their thread: off the runtime's workers, so that the daemon
        // answers its other clients meanwhile (a test looks at it while one operation waits).
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(fire);
            }
            _ => fire(),
        }
    }
}

/// Configures the points [`ENV`] names; returns them. Unknown names and bad actions are
/// errors (a misspelt point would otherwise never fire and a test would pass for nothing).
pub fn install() -> Result<Vec<String>, FailpointError> {
    configure(
        std::env::var_os(ENV)
            .as_deref()
            .map(|s| s.to_string_lossy())
            .as_deref(),
    )
}

fn configure(spec: Option<&str>) -> Result<Vec<String>, FailpointError> {
    let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    if !cfg!(debug_assertions) {
        return Err(FailpointError::Release);
    }
    let mut names = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let invalid = |reason: String| FailpointError::Invalid {
            entry: entry.to_owned(),
            reason,
        };
        let (name, action) = entry
            .split_once('=')
            .ok_or_else(|| invalid("expected NAME=ACTION".into()))?;
        let name = name.trim();
        if !POINTS.contains(&name) {
            return Err(invalid(format!(
                "no failpoint {name:?} (known: {})",
                POINTS.join(", ")
            )));
        }
        let action = action.trim();
        match action {
            "abort" => fail::cfg_callback(name, || std::process::abort()),
            _ if action.starts_with("hold(") && action.ends_with(')') => {
                let fifo = std::path::PathBuf::from(&action["hold(".len()..action.len() - 1]);
                // Opening a fifo to read blocks until a writer opens it; reading ends when the
                // writer closes it.
                fail::cfg_callback(name, move || {
                    let _ = std::fs::read(&fifo);
                })
            }
            other => fail::cfg(name, other),
        }
        .map_err(invalid)?;
        names.push(name.to_owned());
    }
    ARMED.store(!names.is_empty(), std::sync::atomic::Ordering::Relaxed);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_configured_from_a_spec() {
        assert!(configure(None).unwrap().is_empty());
        assert!(configure(Some("  ")).unwrap().is_empty());
        for (bad, says) in [
            ("nope=abort", "no failpoint \"nope\""),
            ("task.create.shim-started", "expected NAME=ACTION"),
            ("task.create.shim-started=explode", "explode"),
        ] {
            let e = configure(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(ENV), "{bad}: {e}");
        }
        assert_eq!(
            configure(Some("task.delete.shim-deleted=hold(/run/x.fifo)")).unwrap(),
            ["task.delete.shim-deleted"]
        );
        let spec = " images.pull.fetched=panic ; task.start.shim-started=off";
        assert_eq!(
            configure(Some(spec)).unwrap(),
            ["images.pull.fetched", "task.start.shim-started"]
        );
        if fail::has_failpoints() {
            let panicked = std::panic::catch_unwind(|| hit("images.pull.fetched"));
            assert!(panicked.is_err(), "a configured point acts");
            hit("task.start.shim-started");
        }
        fail::remove("images.pull.fetched");
        fail::remove("task.start.shim-started");
    }
}
