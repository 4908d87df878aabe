//! Commands run to completion with a deadline, their output shown on failure, and waiting for
//! a condition with a deadline (never a fixed sleep).

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::CLIENT_DEADLINE;

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
            crate::host::sigkill(pid);
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

/// Runs a command to completion within `timeout`, stderr discarded; never panics (for use
/// while unwinding).
pub fn try_run(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !eventually(timeout, || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    child.wait_with_output().ok()
}

/// Runs `cmd` with `input` on its stdin (written by a thread, so a task that writes before
/// reading cannot deadlock) and its output read as it comes, killing it after
/// [`CLIENT_DEADLINE`].
pub fn run_with_stdin(cmd: &mut Command, input: Vec<u8>) -> Output {
    run_piped(cmd, Some(input))
}

/// Like [`run_with_stdin`]; `None` keeps stdin open and silent until the command exits, as a
/// user at a terminal who types nothing.
pub fn run_piped(cmd: &mut Command, input: Option<Vec<u8>>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let (writer, held) = match input {
        Some(input) => (
            Some(std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            })),
            None,
        ),
        None => (None, Some(stdin)),
    };
    let done = Arc::new(AtomicBool::new(false));
    let pid = child.id();
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + CLIENT_DEADLINE;
            while !done.load(Ordering::SeqCst) {
                if Instant::now() > deadline {
                    crate::host::sigkill(pid);
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    drop(held);
    assert!(
        !watchdog.join().unwrap(),
        "{cmd:?} did not finish within {CLIENT_DEADLINE:?}: {}",
        show(&out)
    );
    if let Some(w) = writer {
        w.join().unwrap();
    }
    out
}

/// Waits for a spawned child (its stdout and stderr piped) up to `timeout`, killing it after;
/// asserts that it finished in time.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Output {
    let finished = eventually(timeout, || child.try_wait().ok().flatten().is_some());
    if !finished {
        let _ = child.kill();
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut stderr);
    }
    let status = child.wait().unwrap();
    let out = Output {
        status,
        stdout,
        stderr,
    };
    assert!(
        finished,
        "did not finish within {timeout:?}: {}",
        show(&out)
    );
    out
}

/// The text of an output stream.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything about a finished command, for assertion messages (long streams cut).
pub fn show(out: &Output) -> String {
    let cut = |b: &[u8]| {
        const MAX: usize = 4096;
        if b.len() > MAX {
            format!("{}... ({} bytes)", text(&b[..MAX]), b.len())
        } else {
            text(b)
        }
    };
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        cut(&out.stdout),
        cut(&out.stderr)
    )
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

/// A child that is killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
