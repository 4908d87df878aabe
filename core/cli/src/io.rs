//! Task stdio for `yard run` and `yard exec`: a fifo per stream, which the shim opens, copied to
//! and from this process's stdio by plain threads (a blocking open on a fifo waits for the
//! shim's end; nothing else is needed to synchronize). With a terminal, the local terminal is
//! put in raw mode and the shim's pty is resized to match it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::stat::Mode;
use tokio::sync::mpsc as amsc;

/// Fifos for one process and the threads copying them.
pub struct Fifos {
    dir: PathBuf,
    pub stdin: Option<PathBuf>,
    pub stdout: PathBuf,
    pub stderr: Option<PathBuf>,
    outputs: Vec<(PathBuf, mpsc::Receiver<()>)>,
}

/// Where fifo directories go: beside switchyardd's state when we can write there (root),
/// otherwise the temp directory.
fn fifo_root() -> PathBuf {
    let run = Path::new("/run/switchyard/fifo");
    if std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run)
        .is_ok()
    {
        run.to_owned()
    } else {
        std::env::temp_dir()
    }
}

impl Fifos {
    /// Makes the fifos; `stdin` adds one for input, `terminal` merges stderr into stdout.
    pub fn new(id: &str, stdin: bool, terminal: bool) -> anyhow::Result<Fifos> {
        let dir = fifo_root().join(format!(
            "{id}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let mk = |name: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, Mode::S_IRUSR | Mode::S_IWUSR)
                .with_context(|| format!("create fifo {}", p.display()))?;
            Ok(p)
        };
        Ok(Fifos {
            stdin: if stdin { Some(mk("stdin")?) } else { None },
            stdout: mk("stdout")?,
            stderr: if terminal { None } else { Some(mk("stderr")?) },
            dir,
            outputs: Vec::new(),
        })
    }

    pub fn stdin_uri(&self) -> String {
        self.stdin
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    pub fn stdout_uri(&self) -> String {
        self.stdout.display().to_string()
    }

    pub fn stderr_uri(&self) -> String {
        self.stderr
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Starts copying output to our stdout/stderr, and our stdin to the task. The receiver
    /// hears when our stdin reached EOF (the task's stdin is then closed with CloseIO).
    pub fn start(&mut self) -> amsc::UnboundedReceiver<()> {
        let (tx, rx) = amsc::unbounded_channel();
        let stdin_closed = Some(tx);
        let out = self.stdout.clone();
        self.outputs.push((out.clone(), copy_out(out, false)));
        if let Some(err) = self.stderr.clone() {
            self.outputs.push((err.clone(), copy_out(err, true)));
        }
        if let Some(inp) = self.stdin.clone() {
            thread::spawn(move || {
                // Blocks until the shim opens its end.
                if let Ok(mut f) = File::options().write(true).open(&inp) {
                    let mut buf = [0u8; 8192];
                    let mut stdin = std::io::stdin();
                    loop {
                        match stdin.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if f.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
                if let Some(tx) = stdin_closed {
                    let _ = tx.send(());
                }
            });
        }
        rx
    }

    /// Waits (up to `timeout`) for the task's output to be fully copied; the shim closes its
    /// ends once the process has exited and its output is drained.
    pub fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (path, done) in self.outputs.drain(..) {
            let left = deadline.saturating_duration_since(Instant::now());
            if done.recv_timeout(left).is_err() {
                // Still blocked in open (the shim never opened it): open the write end
                // ourselves so the reader sees EOF.
                let _ = File::options()
                    .write(true)
                    .custom_flags(nix::libc::O_NONBLOCK)
                    .open(&path);
            }
        }
    }
}

impl Drop for Fifos {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn copy_out(path: PathBuf, to_stderr: bool) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok(mut f) = File::open(&path) {
            let mut buf = [0u8; 8192];
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let r = if to_stderr {
                            let mut e = std::io::stderr().lock();
                            e.write_all(&buf[..n]).and_then(|()| e.flush())
                        } else {
                            let mut o = std::io::stdout().lock();
                            o.write_all(&buf[..n]).and_then(|()| o.flush())
                        };
                        if r.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// Puts the local terminal in raw mode until dropped.
pub struct RawTerminal {
    saved: Option<rustix::termios::Termios>,
}

impl RawTerminal {
    pub fn enable() -> RawTerminal {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok();
        if let Some(s) = &saved {
            let mut raw = s.clone();
            raw.make_raw();
            let _ = rustix::termios::tcsetattr(
                stdin.as_fd(),
                rustix::termios::OptionalActions::Now,
                &raw,
            );
        }
        RawTerminal { saved }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(s) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                s,
            );
        }
    }
}

/// The local terminal's size as (columns, rows), if stdout is a terminal.
pub fn terminal_size() -> Option<(u32, u32)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout().as_fd()).ok()?;
    Some((u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    rustix::termios::isatty(std::io::stdin().as_fd())
}
