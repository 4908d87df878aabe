//! The `--log` file: libcontainer's own warnings (everything with `--debug`) as text lines, and
//! on failure one last record in runc's log format, `{"level":"error","msg":"..."}`.
//!
//! stdio of the runtime process is the container's, so the log file is the only way back to the
//! caller. A failure's message is the whole error chain plus the errors libcontainer's child
//! processes logged during this invocation (the container's init reports only the outer
//! "failed to prepare rootfs" to its parent; the cause, such as a refused mount, is only in its
//! log line). JSON keeps that message whole however many lines it has, and the same reader
//! ([`last_error`]) reads runc's own logs, so a caller needs one parser for either runtime.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Where this invocation's lines start in the log file (earlier invocations may share it).
pub(crate) struct Log {
    path: Option<std::path::PathBuf>,
    start: u64,
}

/// The most a failure record carries from the children's log lines.
const MAX_DETAIL: usize = 16 * 1024;

impl Log {
    /// Starts logging to `path` (nothing without one): warnings, or everything with `debug`.
    pub(crate) fn init(path: Option<&Path>, debug: bool) -> Log {
        let Some(path) = path else {
            return Log {
                path: None,
                start: 0,
            };
        };
        let start = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if let Ok(f) = OpenOptions::new().create(true).append(true).open(path) {
            let level = if debug {
                tracing::Level::DEBUG
            } else {
                tracing::Level::WARN
            };
            // Forked children share this subscriber and the file (O_APPEND), so their lines
            // land here too, each marked with the pid that wrote it.
            let _ = tracing_subscriber::fmt()
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .with_max_level(level)
                .with_target(false)
                .with_timer(Pid)
                .try_init();
        }
        Log {
            path: Some(path.to_owned()),
            start,
        }
    }

    /// Appends the failure record: `message`, then the `ERROR` lines libcontainer's child
    /// processes logged since [`Log::init`] that it does not already contain (this process's
    /// own are in `message`).
    pub(crate) fn failure(&self, message: &str) {
        let Some(path) = &self.path else { return };
        let mut msg = message.to_owned();
        for line in self.errors_since_start(path) {
            if !msg.contains(line.as_str()) {
                msg.push('\n');
                msg.push_str(&line);
            }
        }
        let record = serde_json::json!({"level": "error", "msg": msg});
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{record}");
        }
    }

    fn errors_since_start(&self, path: &Path) -> Vec<String> {
        let mut text = String::new();
        let read = std::fs::File::open(path).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.start))?;
            f.take(4 * MAX_DETAIL as u64).read_to_string(&mut text)
        });
        if read.is_err() {
            return Vec::new();
        }
        let mut out: Vec<String> = Vec::new();
        let mut size = 0;
        let me = format!("[{}]", std::process::id());
        for line in text.lines() {
            let Some((pid, rest)) = line.split_once(' ') else {
                continue;
            };
            if !pid.starts_with('[') || pid == me {
                continue;
            }
            let Some(rest) = rest.trim_start().strip_prefix("ERROR") else {
                continue;
            };
            let rest = rest.trim().to_owned();
            if rest.is_empty() || out.contains(&rest) || size + rest.len() > MAX_DETAIL {
                continue;
            }
            size += rest.len();
            out.push(rest);
        }
        out
    }
}

/// Marks each line with the pid of the process that logged it, where a timestamp would go.
struct Pid;

impl tracing_subscriber::fmt::time::FormatTime for Pid {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "[{}]", std::process::id())
    }
}

/// The message of the last error record of a runtime log: ours or runc's (`--log-format json`).
pub fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        if v.get("level")?.as_str()? != "error" {
            return None;
        }
        v.get("msg")?.as_str().map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_record_is_read_back_whole_with_the_childrens_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "[7] ERROR from an earlier run\n").unwrap();
        let log = Log {
            path: Some(path.clone()),
            start: std::fs::metadata(&path).unwrap().len(),
        };
        // What libcontainer's init writes before it tells its parent only the outer error, and
        // what this process logged itself.
        let me = std::process::id();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "[7]  WARN something harmless").unwrap();
        for _ in 0..2 {
            writeln!(
                f,
                "[7] ERROR failed to prepare rootfs err=UnknownRootfsPropagation(\"bogus\")"
            )
            .unwrap();
        }
        writeln!(f, "[8] ERROR create container c1").unwrap();
        writeln!(f, "[{me}] ERROR failed to run container process").unwrap();
        writeln!(f, "ERROR an unmarked line").unwrap();
        drop(f);
        log.failure("create container c1: failed to create container\nsecond line");
        let msg = last_error(&path).unwrap();
        assert_eq!(
            msg,
            "create container c1: failed to create container\nsecond line\n\
             failed to prepare rootfs err=UnknownRootfsPropagation(\"bogus\")"
        );
    }

    #[test]
    fn runcs_json_log_reads_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(
            &path,
            "{\"level\":\"warning\",\"msg\":\"w\"}\n{\"level\":\"error\",\"msg\":\"runc: boom\",\"time\":\"t\"}\n{\"level\":\"info\",\"msg\":\"i\"}\n",
        )
        .unwrap();
        assert_eq!(last_error(&path).as_deref(), Some("runc: boom"));
        std::fs::write(&path, "ERROR not a record\n").unwrap();
        assert_eq!(last_error(&path), None);
    }
}
