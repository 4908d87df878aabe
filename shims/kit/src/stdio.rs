//! A task's stdio, as containerd hands it to a shim: fifo paths, `file://PATH`, or
//! `binary://PATH?args` (a logging binary that reads the output on fds 3 and 4), and a terminal
//! flag. This module turns those into plain files an engine can give to a process, and for a
//! terminal, copies between the pty master and the fifos.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};

use crate::error::{Error, Result};

/// The stdio URIs of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioSpec {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Where output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Null,
    Fifo(PathBuf),
    File(PathBuf),
    Binary { path: PathBuf, args: Vec<String> },
}

/// Parse one output URI: a bare path is a fifo.
pub fn parse_target(uri: &str) -> Result<Target> {
    if uri.is_empty() {
        return Ok(Target::Null);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Target::File(PathBuf::from(path)));
    }
    if let Some(rest) = uri.strip_prefix("binary://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(unescape(k));
            if !v.is_empty() {
                args.push(unescape(v));
            }
        }
        return Ok(Target::Binary {
            path: PathBuf::from(path),
            args,
        });
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(Error::InvalidArgument(format!(
            "stdio {uri:?}: unsupported scheme {scheme:?} (fifo path, file:// or binary://)"
        )));
    }
    Ok(Target::Fifo(PathBuf::from(uri)))
}

/// Percent-decoding for `binary://` query strings.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How long the shim waits for the client to open its end of an output fifo.
const READER_WAIT: Duration = Duration::from_secs(10);

/// Open an output fifo for the process, once the client has its end open (as containerd's
/// shims do). A fifo drops what is in it when its last descriptor closes: had the process
/// written and exited before the client's reader arrived (ctr opens its ends in goroutines
/// that can run late under load), its output would be lost and the client would print
/// nothing. The process then gets a read-write descriptor: it never blocks, and a client that
/// goes away does not turn the process's writes into EPIPE.
fn open_fifo_write(path: &Path) -> Result<File> {
    let reader_is_there = wait_for_reader(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("open stdio fifo {}", path.display())))?;
    // Closed only now, so the client never sees a moment without a writer (end of file).
    drop(reader_is_there);
    Ok(file)
}

/// A write-only descriptor of the fifo `path`, opened once a reader has it open (such an open
/// blocks until then); `None` if no reader came within `READER_WAIT`, or on an error (which
/// the caller's own open then reports).
fn wait_for_reader(path: &Path) -> Option<File> {
    let (tx, rx) = std::sync::mpsc::channel();
    let fifo = path.to_owned();
    std::thread::Builder::new()
        .name("fifo-reader-wait".into())
        .spawn(move || {
            let _ = tx.send(OpenOptions::new().write(true).open(&fifo));
        })
        .ok()?;
    match rx.recv_timeout(READER_WAIT) {
        Ok(opened) => opened.ok(),
        Err(_) => {
            tracing::warn!(
                fifo = %path.display(),
                "the client has not opened its end of the fifo; output before it does may be lost"
            );
            // A read-write open counts as a reader: it releases the waiting thread.
            let _ = OpenOptions::new().read(true).write(true).open(path);
            None
        }
    }
}

fn open_file_append(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(Error::io(format!("open log file {}", path.display())))
}

fn null_write() -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(Error::io("open /dev/null"))
}

fn null_read() -> Result<File> {
    File::open("/dev/null").map_err(Error::io("open /dev/null"))
}

/// Closes a process's stdin on `CloseIO` (or when the client closes its end).
#[derive(Clone, Default)]
pub struct StdinCloser {
    writer: Arc<Mutex<Option<File>>>,
    /// The copy thread has the client's fifo open: what the client wrote is still on its way.
    reading: Arc<std::sync::atomic::AtomicBool>,
}

/// How long `close` lets the copy drain the client's input before it cuts it off.
const STDIN_DRAIN: Duration = Duration::from_secs(5);

impl StdinCloser {
    /// `CloseIO`: the client has sent everything. What it wrote is still delivered (the copy
    /// ends at the fifo's end of file); only a client that keeps its end open past a grace
    /// period is cut off.
    pub fn close(&self) {
        if !self.reading.load(std::sync::atomic::Ordering::SeqCst) {
            self.close_now();
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("stdin-drain".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + STDIN_DRAIN;
                while std::time::Instant::now() < deadline && me.is_open() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                me.close_now();
            });
    }

    /// Close the process's stdin at once (it has exited, or is being deleted).
    pub fn close_now(&self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn is_open(&self) -> bool {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// The files a process gets as fds 0, 1 and 2, plus what keeps them fed.
pub struct Opened {
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
    pub stdin_closer: StdinCloser,
}

/// Feed `fifo` into a pipe whose read end the process gets. The copy waits (in its own thread)
/// for the client to open the fifo, and closes the pipe when the client closes its end or on
/// `CloseIO`.
fn stdin_pipe(fifo: PathBuf) -> Result<(File, StdinCloser)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| Error::io("create stdin pipe")(e.into()))?;
    let closer = StdinCloser {
        writer: Arc::new(Mutex::new(Some(File::from(w)))),
        reading: Arc::default(),
    };
    let c = closer.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            // Blocks until the client opens its write end, as containerd's shims do.
            let Ok(mut src) = File::open(&fifo) else {
                c.close_now();
                return;
            };
            c.reading.store(true, std::sync::atomic::Ordering::SeqCst);
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match src.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut guard = c.writer.lock().unwrap_or_else(|p| p.into_inner());
                        let Some(w) = guard.as_mut() else { break };
                        if w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            c.close_now();
        })
        .map_err(Error::io("spawn stdin copy thread"))?;
    Ok((File::from(r), closer))
}

/// Unblock a stdin copy thread still waiting for the client to open `fifo`.
pub fn release_stdin_fifo(stdin: &str) {
    if stdin.is_empty() {
        return;
    }
    // A non-blocking writer completes the reader's open; it then reads EOF.
    let _ = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(stdin);
}

/// Open the stdio of a process without a terminal.
pub fn open(spec: &StdioSpec, namespace: &str, id: &str) -> Result<Opened> {
    let (stdin, stdin_closer) = if spec.stdin.is_empty() {
        (null_read()?, StdinCloser::default())
    } else {
        match parse_target(&spec.stdin)? {
            Target::Fifo(p) => stdin_pipe(p)?,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "stdin {:?}: must be a fifo path",
                    spec.stdin
                )));
            }
        }
    };
    let (stdout, stderr) = open_outputs(&spec.stdout, &spec.stderr, namespace, id)?;
    Ok(Opened {
        stdin,
        stdout,
        stderr,
        stdin_closer,
    })
}

fn open_outputs(stdout: &str, stderr: &str, namespace: &str, id: &str) -> Result<(File, File)> {
    let out = parse_target(stdout)?;
    let err = parse_target(stderr)?;
    match (&out, &err) {
        (Target::Binary { path, args }, _) => {
            return spawn_logger(path, args, namespace, id);
        }
        (Target::File(p), Target::File(q)) if p == q => {
            let f = open_file_append(p)?;
            let g = f.try_clone().map_err(Error::io("dup log file"))?;
            return Ok((f, g));
        }
        _ => {}
    }
    let one = |t: &Target| -> Result<File> {
        match t {
            Target::Null => null_write(),
            Target::Fifo(p) => open_fifo_write(p),
            Target::File(p) => open_file_append(p),
            Target::Binary { .. } => Err(Error::InvalidArgument(
                "stderr: binary:// must be used for stdout too".into(),
            )),
        }
    };
    Ok((one(&out)?, one(&err)?))
}

/// containerd's `binary://` log driver: the binary reads stdout on fd 3 and stderr on fd 4, and
/// closes fd 5 when it is ready.
fn spawn_logger(path: &Path, args: &[String], namespace: &str, id: &str) -> Result<(File, File)> {
    let pipe = |what: &str| {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| Error::io(format!("create {what} pipe"))(e.into()))
    };
    let (out_r, out_w) = pipe("stdout")?;
    let (err_r, err_w) = pipe("stderr")?;
    let (ready_r, ready_w) = pipe("ready")?;
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .fd_mappings(vec![
            FdMapping {
                parent_fd: out_r,
                child_fd: 3,
            },
            FdMapping {
                parent_fd: err_r,
                child_fd: 4,
            },
            FdMapping {
                parent_fd: ready_w,
                child_fd: 5,
            },
        ])
        .map_err(|e| Error::Internal(format!("logging binary fds: {e}")))?;
    crate::sys::child_umask(&mut cmd, crate::sys::WORKLOAD_UMASK);
    use std::os::unix::process::CommandExt as _;
    let _child = cmd.spawn().map_err(Error::io(format!(
        "start logging binary {}",
        path.display()
    )))?;
    drop(cmd); // closes our copies of the child's ends
    let mut ready = File::from(ready_r);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = ready.read(&mut b);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(Error::Internal(format!(
            "logging binary {} did not become ready in 10s",
            path.display()
        )));
    }
    Ok((File::from(out_w), File::from(err_w)))
}

/// Where console sockets live: a short, root-only directory, so a socket's path stays far
/// below the 108-byte `sun_path` limit whatever the namespace and ids (a path derived from a
/// 64-character namespace and id did not fit: issue 18).
pub const CONSOLE_DIR: &str = "/run/yard-pty";

/// A listening socket on which an OCI runtime sends the pty master (`--console-socket`), in a
/// fresh private directory that goes with it.
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: UnixListener,
    _dir: tempfile::TempDir,
}

impl ConsoleSocket {
    /// A console socket under [`CONSOLE_DIR`].
    pub fn new() -> Result<ConsoleSocket> {
        ConsoleSocket::new_in(Path::new(CONSOLE_DIR))
    }

    /// A console socket in a new directory under `base`.
    pub fn new_in(base: &Path) -> Result<ConsoleSocket> {
        crate::perms::private_dir(base)?;
        let dir = tempfile::Builder::new()
            .prefix("pty")
            .tempdir_in(base)
            .map_err(Error::io(format!(
                "create a directory in {}",
                base.display()
            )))?;
        let path = dir.path().join("pty.sock");
        let listener = crate::perms::bind(&path)?;
        Ok(ConsoleSocket {
            path,
            listener,
            _dir: dir,
        })
    }

    /// Wait (blocking) for the runtime to connect and send the master.
    pub fn receive(&self, timeout: Duration) -> Result<OwnedFd> {
        self.listener
            .set_nonblocking(true)
            .map_err(Error::io("console socket"))?;
        let deadline = std::time::Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(Error::Internal(
                            "runtime did not send the pty master".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(Error::io("accept on console socket")(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(Error::io("console socket"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(Error::io("console socket"))?;
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        rustix::net::recvmsg(
            &stream,
            &mut iov,
            &mut control,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| Error::io("receive pty master")(e.into()))?;
        for msg in control.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(mut fds) = msg
                && let Some(fd) = fds.next()
            {
                return Ok(fd);
            }
        }
        Err(Error::Internal(
            "console socket message carried no fd".into(),
        ))
    }
}

/// Copies between a pty master and the task's fifos. `finish` waits for the output copy to
/// drain after the process has exited.
pub struct ConsoleCopy {
    master: Arc<File>,
    output: Option<JoinHandle<()>>,
    stdin_closer: StdinCloser,
}

impl ConsoleCopy {
    pub fn start(master: OwnedFd, spec: &StdioSpec, namespace: &str, id: &str) -> Result<Self> {
        let master = Arc::new(File::from(master));
        let (mut out, _) = open_outputs(&spec.stdout, "", namespace, id)?;
        let m = master.clone();
        let output = std::thread::Builder::new()
            .name("pty-out".into())
            .spawn(move || {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    // EIO once the last slave fd is closed: the process is gone.
                    match (&*m).read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .map_err(Error::io("spawn pty copy thread"))?;
        let stdin_closer = StdinCloser::default();
        if let Target::Fifo(fifo) = parse_target(&spec.stdin)? {
            let m = master.clone();
            std::thread::Builder::new()
                .name("pty-in".into())
                .spawn(move || {
                    let Ok(mut src) = File::open(&fifo) else {
                        return;
                    };
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = src.read(&mut buf) {
                        if n == 0 || (&*m).write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                })
                .map_err(Error::io("spawn pty copy thread"))?;
        }
        Ok(ConsoleCopy {
            master,
            output: Some(output),
            stdin_closer,
        })
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let ws = rustix::termios::Winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(self.master.as_fd(), ws)
            .map_err(|e| Error::io("resize pty")(e.into()))
    }

    /// Send end-of-file to the terminal (^D), as closing stdin does for a pty.
    pub fn close_stdin(&self) {
        self.stdin_closer.close();
        let _ = (&*self.master).write_all(&[4]);
    }

    /// From async code: deliver what the process wrote (up to `timeout`) before its exit is
    /// reported.
    pub async fn drain(mut self, timeout: Duration) {
        let _ = tokio::task::spawn_blocking(move || self.finish(timeout)).await;
    }

    /// Wait up to `timeout` for output to drain after the process exited.
    pub fn finish(&mut self, timeout: Duration) {
        if let Some(h) = self.output.take() {
            let deadline = std::time::Instant::now() + timeout;
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// How long a process's exit waits for what it wrote to reach its console's output.
pub const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// The console of a process from its start until its exit drains it: what an engine's process
/// keeps for `resize_pty`, `close_stdin` and `wait`.
#[derive(Default)]
pub struct ConsoleSlot(std::sync::Mutex<Option<ConsoleCopy>>);

impl ConsoleSlot {
    pub fn new(console: Option<ConsoleCopy>) -> Self {
        ConsoleSlot(std::sync::Mutex::new(console))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ConsoleCopy>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, console: Option<ConsoleCopy>) {
        *self.lock() = console;
    }

    /// Resizes the terminal; `None` when the process has none (or it has been drained).
    pub fn resize(&self, width: u32, height: u32) -> Option<Result<()>> {
        self.lock().as_ref().map(|c| c.resize(width, height))
    }

    /// End-of-file to the terminal, if the process has one.
    pub fn close_stdin(&self) {
        if let Some(c) = self.lock().as_ref() {
            c.close_stdin();
        }
    }

    /// Delivers what the process wrote (for up to [`CONSOLE_DRAIN`]) before its exit is
    /// reported. Only the first call waits; the console is gone afterwards.
    pub async fn drain_at_exit(&self) {
        let console = self.lock().take();
        if let Some(c) = console {
            c.drain(CONSOLE_DRAIN).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stdio_uris() {
        assert_eq!(parse_target("").unwrap(), Target::Null);
        assert_eq!(
            parse_target("/run/x/fifo").unwrap(),
            Target::Fifo("/run/x/fifo".into())
        );
        assert_eq!(
            parse_target("file:///var/log/t.log").unwrap(),
            Target::File("/var/log/t.log".into())
        );
        assert_eq!(
            parse_target("binary:///usr/bin/logger?tag=a%20b&debug").unwrap(),
            Target::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["tag".into(), "a b".into(), "debug".into()]
            }
        );
        let e = parse_target("tcp://1.2.3.4:5").unwrap_err();
        assert!(e.to_string().contains("unsupported scheme \"tcp\""), "{e}");
    }

    /// An output fifo opens whether its reader is there already (the usual case) or comes
    /// later, and what the process writes reaches it.
    #[test]
    fn an_output_fifo_opens_with_its_reader_there_or_coming_later() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fifo = |name: &str| {
            let p = dir.path().join(name);
            nix029::unistd::mkfifo(&p, nix029::sys::stat::Mode::S_IRWXU)
                .unwrap_or_else(|e| panic!("mkfifo: {e}"));
            p
        };
        let read_all = |mut f: File| {
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap_or_else(|e| panic!("{e}"));
            s
        };

        let early = fifo("early");
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&early)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut w = open_fifo_write(&early).unwrap_or_else(|e| panic!("{e}"));
        w.write_all(b"early").unwrap_or_else(|e| panic!("{e}"));
        drop(w);
        let mut got = [0u8; 5];
        (&reader)
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"early");

        let late = fifo("late");
        let path = late.clone();
        // Blocks in its open until the shim's side has the fifo open for writing.
        let client = std::thread::spawn(move || {
            read_all(File::open(&path).unwrap_or_else(|e| panic!("{e}")))
        });
        let mut w = open_fifo_write(&late).unwrap_or_else(|e| panic!("{e}"));
        w.write_all(b"late").unwrap_or_else(|e| panic!("{e}"));
        drop(w);
        assert_eq!(client.join().unwrap_or_else(|_| panic!("client")), "late");
    }

    #[test]
    fn file_uri_shares_one_file_for_both_streams() {
        let dir = std::env::temp_dir().join(format!("kit-stdio-{}", std::process::id()));
        let log = dir.join("t.log");
        let uri = format!("file://{}", log.display());
        let spec = StdioSpec {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let mut o = open(&spec, "ns", "id").unwrap();
        o.stdout.write_all(b"out\n").unwrap();
        o.stderr.write_all(b"err\n").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn issue18_console_sockets_are_short_and_pass_the_master() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let console = ConsoleSocket::new_in(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
        // The default place leaves room for any id: the path does not contain one.
        assert!(
            CONSOLE_DIR.len() + "/pty123456/pty.sock".len() < 64,
            "{CONSOLE_DIR}"
        );
        let (r, w) = rustix::pipe::pipe().unwrap_or_else(|e| panic!("{e}"));
        let path = console.path.clone();
        let sender = std::thread::spawn(move || {
            let stream = std::os::unix::net::UnixStream::connect(&path)
                .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
            let fds = [w.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
            rustix::net::sendmsg(
                &stream,
                &[std::io::IoSlice::new(b"pty")],
                &mut control,
                rustix::net::SendFlags::empty(),
            )
            .unwrap_or_else(|e| panic!("sendmsg: {e}"));
        });
        let fd = console
            .receive(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        sender.join().unwrap_or_else(|_| panic!("sender panicked"));
        File::from(fd)
            .write_all(b"hello")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 5];
        File::from(r)
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"hello");
        let dir = console.path.parent().map(Path::to_path_buf);
        drop(console);
        assert!(dir.is_some_and(|d| !d.exists()), "socket directory left");
    }
}
