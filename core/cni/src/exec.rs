//! Running one plugin binary. A plugin is semi-trusted: it runs as root, but nothing it does may
//! hang the caller or grow its memory without bound. So each call has a deadline, stdout is
//! capped (a larger result is an error) and stderr is kept up to a cap (the rest is dropped).
//!
//! One thread does all of it with `poll(2)` over stdin, stdout, stderr and a pidfd of the plugin:
//! no reader threads that a grandchild holding a pipe open could keep alive, and the call ends
//! when the plugin exits, not when every copy of its pipes is closed. The plugin leads its own
//! process group, so a timeout kills whatever it started too (iptables, an IPAM plugin).

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal};

/// The default deadline of one plugin call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default cap on a plugin's stdout (its result) and on the stderr kept for errors.
pub const DEFAULT_OUTPUT_CAP: usize = 1024 * 1024;

/// One call: the binary, the `CNI_*` variables (set over the caller's environment) and stdin.
#[derive(Debug, Clone)]
pub struct PluginCall<'a> {
    pub binary: &'a Path,
    pub env: Vec<(&'static str, OsString)>,
    pub stdin: &'a [u8],
}

/// How a plugin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// What a plugin left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginOutput {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    /// At most the invoker's stderr cap; the rest was dropped.
    pub stderr: Vec<u8>,
}

/// Error while running a plugin (not the plugin's own error result).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("starting {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer within {} ms, killed", timeout.as_millis())]
    Timeout { timeout: Duration },
    #[error("wrote more than {limit} bytes to stdout, killed")]
    StdoutTooLarge { limit: usize },
    #[error("talking to the plugin")]
    Io(#[source] io::Error),
}

/// Runs plugin binaries; [`ProcessInvoker`] is the real one, tests give a recording double.
pub trait Invoker: Send + Sync + fmt::Debug {
    fn invoke(&self, call: &PluginCall<'_>) -> Result<PluginOutput, ExecError>;
}

/// The bounds of every plugin call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    pub max_stdout: usize,
    pub max_stderr: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: DEFAULT_TIMEOUT,
            max_stdout: DEFAULT_OUTPUT_CAP,
            max_stderr: DEFAULT_OUTPUT_CAP,
        }
    }
}

/// Runs plugins as child processes under [`Limits`].
#[derive(Debug, Clone, Default)]
pub struct ProcessInvoker {
    pub limits: Limits,
}

impl Invoker for ProcessInvoker {
    fn invoke(&self, call: &PluginCall<'_>) -> Result<PluginOutput, ExecError> {
        let mut child = Command::new(call.binary)
            .envs(call.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| ExecError::Spawn {
                path: call.binary.to_owned(),
                source,
            })?;
        match self.talk(&mut child, call.stdin) {
            Ok((stdout, stderr)) => {
                // The pidfd said it exited: this does not block.
                let status = child.wait().map_err(ExecError::Io)?;
                let exit = match (status.code(), status.signal()) {
                    (Some(code), _) => Exit::Code(code),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Code(-1),
                };
                Ok(PluginOutput {
                    exit,
                    stdout,
                    stderr,
                })
            }
            Err(err) => {
                kill_and_reap(&mut child);
                Err(err)
            }
        }
    }
}

/// Which cap applies to a pipe.
#[derive(Clone, Copy)]
enum Overflow {
    Fail,
    Drop,
}

impl ProcessInvoker {
    /// Feeds stdin and collects stdout and stderr until the plugin exits or the deadline passes.
    fn talk(&self, child: &mut Child, input: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ExecError> {
        let io_err = |e: Errno| ExecError::Io(e.into());
        let deadline = Instant::now() + self.limits.timeout;
        let pidfd = rustix::process::pidfd_open(Pid::from_child(child), PidfdFlags::empty())
            .map_err(io_err)?;
        let mut stdin = child.stdin.take().filter(|_| !input.is_empty());
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        if let Some(p) = &stdin {
            rustix::io::ioctl_fionbio(p, true).map_err(io_err)?;
        }
        if let Some(p) = &stdout {
            rustix::io::ioctl_fionbio(p, true).map_err(io_err)?;
        }
        if let Some(p) = &stderr {
            rustix::io::ioctl_fionbio(p, true).map_err(io_err)?;
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut written = 0;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ExecError::Timeout {
                    timeout: self.limits.timeout,
                });
            }
            let left = deadline - now;
            let ts = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: left.subsec_nanos().into(),
            };
            let (exited, can_write, out_ready, err_ready) = {
                let mut fds = vec![PollFd::new(&pidfd, PollFlags::IN)];
                let i_in = stdin.as_ref().map(|p| push(&mut fds, p, PollFlags::OUT));
                let i_out = stdout.as_ref().map(|p| push(&mut fds, p, PollFlags::IN));
                let i_err = stderr.as_ref().map(|p| push(&mut fds, p, PollFlags::IN));
                match rustix::event::poll(&mut fds, Some(&ts)) {
                    Ok(_) => {}
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(io_err(e)),
                }
                let ready = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
                (
                    !fds[0].revents().is_empty(),
                    ready(i_in),
                    ready(i_out),
                    ready(i_err),
                )
            };
            if can_write && let Some(p) = &stdin {
                match rustix::io::write(p, &input[written..]) {
                    Ok(n) => written += n,
                    Err(Errno::AGAIN | Errno::INTR) => {}
                    // The plugin closed its stdin without reading it all: its business. (EPIPE,
                    // not SIGPIPE: Rust programs ignore SIGPIPE from their start.)
                    Err(Errno::PIPE) => written = input.len(),
                    Err(e) => return Err(io_err(e)),
                }
                if written >= input.len() {
                    stdin = None;
                }
            }
            // After the exit, whatever it wrote is in the pipes: drain them and stop, even if
            // something it started still holds them open.
            if out_ready || exited {
                let limit = self.limits.max_stdout;
                read_available(&mut stdout, &mut out, limit, Overflow::Fail, deadline)?;
            }
            if err_ready || exited {
                let limit = self.limits.max_stderr;
                read_available(&mut stderr, &mut err, limit, Overflow::Drop, deadline)?;
            }
            if exited {
                return Ok((out, err));
            }
        }
    }
}

fn push<'a>(fds: &mut Vec<PollFd<'a>>, fd: &'a impl AsFd, events: PollFlags) -> usize {
    fds.push(PollFd::new(fd, events));
    fds.len() - 1
}

/// Reads what a non-blocking pipe has now; `None` once it reached end of file.
fn read_available<R: Read>(
    pipe: &mut Option<R>,
    buf: &mut Vec<u8>,
    limit: usize,
    overflow: Overflow,
    deadline: Instant,
) -> Result<(), ExecError> {
    let mut chunk = [0u8; 16 * 1024];
    while let Some(p) = pipe {
        match p.read(&mut chunk) {
            Ok(0) => *pipe = None,
            Ok(n) => {
                let room = limit.saturating_sub(buf.len());
                if n > room && matches!(overflow, Overflow::Fail) {
                    return Err(ExecError::StdoutTooLarge { limit });
                }
                buf.extend_from_slice(&chunk[..n.min(room)]);
                // A pipe that never runs dry still ends at the deadline.
                if Instant::now() >= deadline {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ExecError::Io(e)),
        }
    }
    Ok(())
}

/// Kills the plugin's process group and the plugin, and reaps it.
fn kill_and_reap(child: &mut Child) {
    let pid = Pid::from_child(child);
    if let Err(e) = rustix::process::kill_process_group(pid, Signal::KILL) {
        tracing::debug!(error = %e, pid = pid.as_raw_nonzero().get(), "killing plugin group");
    }
    // The plugin may have left its group; its own pid is still ours to kill until reaped.
    let _ = child.kill();
    if let Err(e) = child.wait() {
        tracing::warn!(error = %e, "reaping a killed plugin");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("plugin");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn invoker(timeout_ms: u64, cap: usize) -> Retrying {
        Retrying(ProcessInvoker {
            limits: Limits {
                timeout: Duration::from_millis(timeout_ms),
                max_stdout: cap,
                max_stderr: cap,
            },
        })
    }

    /// A script just written may be briefly "busy" (ETXTBSY) while a child another test thread
    /// forked still holds the writing descriptor before its exec closes it: start again then.
    struct Retrying(ProcessInvoker);

    impl Retrying {
        fn invoke(&self, call: &PluginCall<'_>) -> Result<PluginOutput, ExecError> {
            let mut tries = 0;
            loop {
                match self.0.invoke(call) {
                    Err(ExecError::Spawn { source, .. })
                        if source.raw_os_error() == Some(Errno::TXTBSY.raw_os_error())
                            && tries < 50 =>
                    {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => return other,
                }
            }
        }
    }

    fn call<'a>(binary: &'a Path, stdin: &'a [u8]) -> PluginCall<'a> {
        PluginCall {
            binary,
            env: vec![("CNI_COMMAND", "ADD".into()), ("CNI_IFNAME", "eth0".into())],
            stdin,
        }
    }

    #[test]
    fn passes_env_and_stdin_and_collects_output() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(
            dir.path(),
            r#"echo "$CNI_COMMAND $CNI_IFNAME $(cat)"; echo warn >&2; exit 3"#,
        );
        let out = invoker(10_000, 1024)
            .invoke(&call(&bin, b"{\"x\":1}"))
            .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.stdout, b"ADD eth0 {\"x\":1}\n");
        assert_eq!(out.stderr, b"warn\n");
    }

    #[test]
    fn a_large_stdin_is_fed_without_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "wc -c");
        let input = vec![b'x'; 1024 * 1024];
        let out = invoker(10_000, 1024).invoke(&call(&bin, &input)).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    }

    #[test]
    fn a_plugin_that_ignores_stdin_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "exec 0<&-; echo ok");
        let input = vec![b'x'; 1024 * 1024];
        let out = invoker(10_000, 1024).invoke(&call(&bin, &input)).unwrap();
        assert_eq!(out.stdout, b"ok\n");
        assert!(out.exit.success());
    }

    #[test]
    fn a_hanging_plugin_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // The child of the plugin holds stdout open too; both die with the group.
        let bin = script(dir.path(), "sleep 600 & sleep 600");
        let start = Instant::now();
        let e = invoker(300, 1024).invoke(&call(&bin, b"")).unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn an_exit_ends_the_call_even_if_a_grandchild_keeps_the_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "setsid sleep 5 & echo done");
        let start = Instant::now();
        let out = invoker(20_000, 1024).invoke(&call(&bin, b"")).unwrap();
        assert_eq!(out.stdout, b"done\n");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn stdout_over_the_cap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "head -c 100000 /dev/zero");
        let e = invoker(10_000, 4096).invoke(&call(&bin, b"")).unwrap_err();
        assert!(
            matches!(e, ExecError::StdoutTooLarge { limit: 4096 }),
            "{e:?}"
        );
    }

    #[test]
    fn stderr_over_the_cap_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "head -c 100000 /dev/zero >&2; echo ok");
        let out = invoker(10_000, 4096).invoke(&call(&bin, b"")).unwrap();
        assert_eq!(out.stderr.len(), 4096);
        assert_eq!(out.stdout, b"ok\n");
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let e = invoker(1000, 1024)
            .invoke(&call(Path::new("/nonexistent/plugin"), b""))
            .unwrap_err();
        assert!(matches!(e, ExecError::Spawn { .. }), "{e:?}");
    }

    #[test]
    fn a_signal_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "kill -9 $$");
        let out = invoker(10_000, 1024).invoke(&call(&bin, b"")).unwrap();
        assert_eq!(out.exit, Exit::Signal(9));
    }
}
