//! switchyardd and containerd, each on private directories and sockets, for one test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{bin, eventually, processes_matching, write};

/// Waits until something accepts connections on `socket`.
pub(crate) fn wait_for_socket(socket: &Path, child: &mut Child, log: &Path) {
    let up = eventually(Duration::from_secs(15), || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    if !up {
        let status = child.try_wait().ok().flatten();
        panic!(
            "daemon did not listen on {} (exit: {status:?}); log:\n{}",
            socket.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// A switchyardd with its own root, state and sockets.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon on the embedded default config, with paths moved into a temp dir and
    /// `extra` TOML appended.
    pub fn start_with(extra: &str) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("sy-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("sy.sock");
        let config = dir.path().join("config.toml");
        write(
            &config,
            &format!(
                "root = \"{root}\"\nstate = \"{state}\"\n[grpc]\naddress = \"{sock}\"\n[log]\nlevel = \"debug\"\n{extra}\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        );
        let log = dir.path().join("switchyardd.log");
        let mut d = Daemon {
            dir,
            socket,
            config,
            log,
            child: None,
        };
        d.spawn();
        d
    }

    pub fn start() -> Daemon {
        Self::start_with("")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = Command::new(bin("switchyardd"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info,tonic=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn switchyardd");
        wait_for_socket(&self.socket, &mut child, &self.log);
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again on the same directories and config.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `yard` pointed at this daemon.
    pub fn yard(&self) -> Command {
        let mut c = Command::new(bin("yard"));
        c.env("SWITCHYARD_ADDRESS", &self.socket);
        c
    }

    /// containerd's `ctr` pointed at this daemon.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket);
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if !eventually(Duration::from_secs(5), || {
                c.try_wait().ok().flatten().is_some()
            }) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // A failing test must not leak shims into the next one.
        let sock = self.socket.display().to_string();
        for (pid, _) in processes_matching(&["-address", &sock]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::thread::panicking() {
            eprintln!("--- switchyardd log ---\n{}", self.log_text());
        }
    }
}

/// A containerd daemon (Debian's 1.6 by default) with its own root, state and socket, CRI
/// off.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The `ctr` shipped with this containerd (Debian's `ctr` when there is none beside it).
    pub ctr_bin: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    pub fn start(binary: &Path) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("ctd-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        write(
            &config,
            &format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{}\"\n",
                dir.path().join("root").display(),
                dir.path().join("state").display(),
                socket.display()
            ),
        );
        let log = dir.path().join("containerd.log");
        let logf = std::fs::File::create(&log).expect("log");
        // Shims are found on containerd's PATH: put ours (the build's bin dir) first.
        let path = format!(
            "{}:{}",
            crate::bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new(binary)
            .env("PATH", path)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn containerd");
        wait_for_socket(&socket, &mut child, &log);
        let ctr_bin = binary
            .parent()
            .map(|d| d.join("ctr"))
            .filter(|c| c.exists())
            .unwrap_or_else(|| PathBuf::from("ctr"));
        Containerd {
            dir,
            socket,
            log,
            ctr_bin,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new(&self.ctr_bin);
        c.arg("--address").arg(&self.socket);
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// containerd binaries fetched by `scripts/peers`: `containerd-1.7`, `containerd-2.1`
/// (under `$SWITCHYARD_PEERS`, default /var/cache/switchyard/peers).
pub fn peer_containerd(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SWITCHYARD_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/switchyard/peers"));
    let bin = dir.join(name).join("usr/bin/containerd");
    bin.exists().then_some(bin)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let sock = self.socket.display().to_string();
        for (pid, _) in processes_matching(&["-address", &sock]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
