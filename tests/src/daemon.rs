//! switchyardd and containerd, each on private directories and sockets, for one test, and their
//! clients: `yard` (switchyardd's) and `ctr` (both). After a failed test they print their log
//! and remove what the test left running, so a failure does not orphan containers, cgroups and
//! fifos on the host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{
    bin, eventually, processes_matching, run_timeout, show, sigkill, text, try_run, wait_child,
    write,
};

/// Deadline for one client command (`yard`, `ctr`): a VM boot under TCG on a loaded machine
/// takes several seconds; nothing a client does takes minutes.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// How long each cleanup command may take after a failure.
const CLEANUP: Duration = Duration::from_secs(15);

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

/// Stops a daemon child: SIGTERM, then SIGKILL if it has not exited within `grace`.
fn stop(child: &mut Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if !eventually(grace, || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills what still serves `socket` (shims name their daemon's socket with `-address`).
fn kill_shims_of(socket: &Path) {
    let sock = socket.display().to_string();
    // A vm shim whose last task was deleted powers its VM off after answering, then removes
    // the VMM's cgroup and exits: killed before that, it would leave the cgroup behind.
    let vm_shims = || {
        processes_matching(&["-address", &sock])
            .iter()
            .any(|(_, cmd)| cmd.contains("containerd-shim-yard-vm-v1"))
    };
    eventually(Duration::from_secs(5), || !vm_shims());
    for (pid, cmd) in processes_matching(&["-address", &sock]) {
        sigkill(pid);
        // A server killed leaves its socket file (a group's warm shim lingers after the
        // daemon): the test made it, the test removes it.
        if let Some(file) = crate::accounting::socket_file_flag(&cmd) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// What `ctr` can be pointed at: switchyardd or containerd.
pub trait Ctr {
    /// The daemon's socket.
    fn socket(&self) -> &Path;

    /// The `ctr` binary to use.
    fn ctr_binary(&self) -> PathBuf {
        PathBuf::from("ctr")
    }

    /// Publishes an event whose `ctr events` line contains `marker`, through the daemon's
    /// event service: an event collector has subscribed once it sees the marker.
    fn publish_probe(&self, marker: &str);

    /// `ctr --address SOCKET`.
    fn ctr_command(&self) -> Command {
        let mut c = Command::new(self.ctr_binary());
        c.arg("--address").arg(self.socket());
        c
    }

    /// `ctr ARGS`, within [`CLIENT_DEADLINE`].
    fn ctr_output(&self, args: &[&str]) -> Output {
        run_timeout(self.ctr_command().args(args), CLIENT_DEADLINE)
    }

    /// `ctr ARGS`, which must succeed.
    fn ctr_ok(&self, args: &[&str]) -> Output {
        let out = self.ctr_output(args);
        assert!(
            out.status.success(),
            "ctr {} (on {}): {}",
            args.join(" "),
            self.socket().display(),
            show(&out)
        );
        out
    }

    /// `ctr task ls`'s (pid, STATUS) for `id`.
    fn ctr_task(&self, id: &str) -> Option<(u32, String)> {
        let out = self.ctr_ok(&["task", "ls"]);
        text(&out.stdout).lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols[..] {
                [task, pid, status] if task == id => {
                    Some((pid.parse().unwrap_or(0), status.to_owned()))
                }
                _ => None,
            }
        })
    }

    /// `ctr run --runtime TYPE EXTRA --rootfs ROOTFS ID CMD`, within [`CLIENT_DEADLINE`].
    fn ctr_run(
        &self,
        runtime_type: &str,
        rootfs: &Path,
        extra: &[&str],
        id: &str,
        cmd: &[&str],
    ) -> Output {
        let mut c = self.ctr_command();
        c.args(["run", "--runtime", runtime_type])
            .args(extra)
            .arg("--rootfs")
            .arg(rootfs)
            .arg(id)
            .args(cmd);
        run_timeout(&mut c, CLIENT_DEADLINE)
    }

    /// Waits (up to `timeout`) until `ctr task ls` shows task `id` with `status`; asserts it
    /// does.
    fn wait_ctr_status(&self, id: &str, status: &str, timeout: Duration) {
        let ok = eventually(timeout, || {
            self.ctr_task(id).is_some_and(|(_, s)| s == status)
        });
        assert!(
            ok,
            "task {id} did not become {status}: {:?}",
            self.ctr_task(id)
        );
    }

    /// Ends task `id` as a user of `ctr` does: SIGKILL, wait until it stopped, `ctr task rm`
    /// and `ctr containers rm`, each of which must succeed.
    fn ctr_kill_and_remove(&self, id: &str, timeout: Duration) {
        self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        self.wait_ctr_status(id, "STOPPED", timeout);
        self.ctr_ok(&["task", "rm", id]);
        self.ctr_ok(&["containers", "rm", id]);
    }

    /// `ctr containers ls -q`.
    fn ctr_containers(&self) -> Vec<String> {
        let out = self.ctr_ok(&["containers", "ls", "-q"]);
        text(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// Processes of the shim binary `shim` serving this daemon (the `start` and `delete`
    /// invocations as well as servers).
    fn shim_processes(&self, shim: &str) -> Vec<(u32, String)> {
        processes_matching(&[shim, &format!("-address {} ", self.socket().display())])
    }

    /// The shim servers of `shim` serving this daemon (`-socket` in their command line; the
    /// `start` invocations exit once the server listens).
    fn shim_servers(&self, shim: &str) -> Vec<(u32, String)> {
        processes_matching(&[
            shim,
            &format!("-address {} ", self.socket().display()),
            "-socket",
        ])
    }
}

/// A switchyardd with its own root, state and sockets.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// The `RLIMIT_NOFILE` the daemon starts with (through util-linux `prlimit`), if not the
    /// test's own.
    nofile: Option<Nofile>,
}

/// An `RLIMIT_NOFILE` to start a daemon with: `hard` `None` keeps the test's hard limit.
#[derive(Debug, Clone, Copy)]
pub struct Nofile {
    pub soft: u64,
    pub hard: Option<u64>,
}

impl Daemon {
    /// Starts a daemon on the embedded default config, with paths moved into a temp dir and
    /// `extra` TOML appended.
    pub fn start_with(extra: &str) -> Daemon {
        Self::start_in(|_| extra.to_owned())
    }

    /// Like [`Daemon::start_with`], the TOML made from the daemon's private directory (where
    /// a runtime's cache can go, removed with the daemon).
    pub fn start_in(extra: impl FnOnce(&Path) -> String) -> Daemon {
        let mut d = Self::unstarted(extra);
        d.spawn();
        d
    }

    /// Like [`Daemon::start_in`], started with the `RLIMIT_NOFILE` `limit` (a soft limit as a
    /// login shell's 1,024 would start it, a lower hard limit to reach it in a test).
    pub fn start_with_nofile(limit: Nofile, extra: impl FnOnce(&Path) -> String) -> Daemon {
        let mut d = Self::unstarted(extra);
        d.nofile = Some(limit);
        d.spawn();
        d
    }

    /// Its directories and config, not running yet.
    fn unstarted(extra: impl FnOnce(&Path) -> String) -> Daemon {
        let (dir, socket, config) = private_dir("sy-", |dir, root, state, sock| {
            let extra = extra(dir);
            format!(
                "root = \"{root}\"\nstate = \"{state}\"\n[grpc]\naddress = \"{sock}\"\n[log]\nlevel = \"debug\"\n{extra}\n"
            )
        });
        let log = dir.path().join("switchyardd.log");
        Daemon {
            dir,
            socket,
            config,
            log,
            child: None,
            nofile: None,
        }
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
        let mut cmd = match self.nofile {
            Some(Nofile { soft, hard }) => {
                let hard = hard.map(|h| h.to_string()).unwrap_or_default();
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg(bin("switchyardd"));
                c
            }
            None => Command::new(bin("switchyardd")),
        };
        let mut child = cmd
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

    /// Stops the daemon as its service manager would (SIGTERM, SIGKILL after 5 s), leaving
    /// its directories for the caller to inspect or clean up before they go with it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, Duration::from_secs(5));
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
        self.ctr_command()
    }

    /// `yard ARGS`, within [`CLIENT_DEADLINE`].
    pub fn run_yard(&self, args: &[&str]) -> Output {
        run_timeout(self.yard().args(args), CLIENT_DEADLINE)
    }

    /// `yard ARGS`, which must succeed; its stdout.
    pub fn yard_ok(&self, args: &[&str]) -> String {
        let out = self.run_yard(args);
        assert!(out.status.success(), "yard {args:?}: {}", show(&out));
        text(&out.stdout)
    }

    /// `yard ARGS`, which must fail; its stderr.
    pub fn yard_fails(&self, args: &[&str]) -> String {
        let out = self.run_yard(args);
        assert!(
            !out.status.success(),
            "yard {args:?} should fail: {}",
            show(&out)
        );
        text(&out.stderr)
    }

    /// `yard run EXTRA --rootfs ROOTFS -- CMD`, to run with a deadline or with stdin.
    pub fn yard_run_cmd(&self, rootfs: &Path, extra: &[&str], cmd: &[&str]) -> Command {
        let mut c = self.yard();
        c.arg("run")
            .args(extra)
            .arg("--rootfs")
            .arg(rootfs)
            .arg("--")
            .args(cmd);
        c
    }

    /// `yard run EXTRA --rootfs ROOTFS -- CMD`, within [`CLIENT_DEADLINE`].
    pub fn yard_run(&self, rootfs: &Path, extra: &[&str], cmd: &[&str]) -> Output {
        run_timeout(&mut self.yard_run_cmd(rootfs, extra, cmd), CLIENT_DEADLINE)
    }

    /// `yard ps --json`.
    pub fn ps(&self) -> Vec<Value> {
        let out = self.run_yard(&["ps", "--json"]);
        assert!(out.status.success(), "yard ps: {}", show(&out));
        let rows: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("yard ps --json: {e}: {}", show(&out)));
        match rows {
            Value::Array(rows) => rows,
            other => panic!("yard ps --json is not a list: {other}"),
        }
    }

    /// `yard ps --json`'s row for `id`.
    pub fn ps_row(&self, id: &str) -> Option<Value> {
        self.ps().into_iter().find(|r| r["id"] == id)
    }

    /// The task's status as `yard ps` shows it (`running`, `stopped`, ...).
    pub fn status(&self, id: &str) -> Option<String> {
        self.ps_row(id)
            .and_then(|r| r["status"].as_str().map(str::to_owned))
    }

    /// `yard rm --force ID`, which must succeed.
    pub fn rm_force(&self, id: &str) {
        let out = self.run_yard(&["rm", "--force", id]);
        assert!(out.status.success(), "yard rm --force {id}: {}", show(&out));
    }

    /// Publishes `event` on `topic` through `switchyardd publish`, as a shim's
    /// `-publish-binary` does.
    pub fn publish(&self, topic: &str, event: &prost_types::Any) {
        use prost::Message;
        let mut p = Command::new(bin("switchyardd"))
            .arg("--address")
            .arg(&self.socket)
            .args(["publish", "--topic", topic, "--namespace", "default"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchyardd publish");
        p.stdin
            .take()
            .unwrap()
            .write_all(&event.encode_to_vec())
            .unwrap();
        let out = wait_child(&mut p, CLIENT_DEADLINE);
        assert!(out.status.success(), "switchyardd publish: {}", show(&out));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Ctr for Daemon {
    fn socket(&self) -> &Path {
        &self.socket
    }

    /// A `/tasks/oom` for container `marker`: switchyardd takes no namespace labels.
    fn publish_probe(&self, marker: &str) {
        let any = switchyard_api::typeurl::to_any(&switchyard_api::containerd::events::TaskOom {
            container_id: marker.into(),
        });
        self.publish("/tasks/oom", &any);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed && self.child.is_some() {
            // Remove what the test left running while the daemon still serves: stopping it
            // kills the shims, which would orphan containers, cgroups and fifos.
            if let Some(out) = try_run(self.ctr().args(["containers", "ls", "-q"]), CLEANUP) {
                for id in text(&out.stdout).lines() {
                    let _ = try_run(self.yard().args(["rm", "--force", id]), CLEANUP);
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            stop(&mut c, Duration::from_secs(5));
        }
        // A failing test must not leak shims into the next one.
        kill_shims_of(&self.socket);
        if failed {
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
        let (dir, socket, config) = private_dir("ctd-", |_, root, state, sock| {
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{sock}\"\n"
            )
        });
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

    /// This containerd's own `ctr` pointed at it.
    pub fn ctr(&self) -> Command {
        self.ctr_command()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Ctr for Containerd {
    fn socket(&self) -> &Path {
        &self.socket
    }

    fn ctr_binary(&self) -> PathBuf {
        self.ctr_bin.clone()
    }

    /// A label on the `default` namespace (`/namespace/update`).
    fn publish_probe(&self, marker: &str) {
        self.ctr_ok(&["namespaces", "label", "default", &format!("{marker}=1")]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}", self.log_text());
            if let Some(out) = try_run(self.ctr().args(["containers", "ls", "-q"]), CLEANUP) {
                for id in text(&out.stdout).lines() {
                    let _ = try_run(self.ctr().args(["task", "kill", "-s", "KILL", id]), CLEANUP);
                    let _ = try_run(self.ctr().args(["task", "rm", "-f", id]), CLEANUP);
                    let _ = try_run(self.ctr().args(["containers", "rm", id]), CLEANUP);
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_shims_of(&self.socket);
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

/// [`peer_containerd`], or `None` after a skip reason (a failure under
/// `SWITCHYARD_REQUIRE_ALL=1`).
pub fn require_peer_containerd(name: &str) -> Option<PathBuf> {
    let found = peer_containerd(name);
    crate::require(
        found.is_some(),
        &format!("needs {name} (scripts/peers fetches it)"),
    )
    .then_some(found)
    .flatten()
}

/// A private directory for one daemon: its root, state, socket (returned), config (returned,
/// written from `config(dir, root, state, socket)`) and log.
fn private_dir(
    prefix: &str,
    config: impl FnOnce(&Path, &str, &str, &str) -> String,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("daemon.sock");
    let file = dir.path().join("config.toml");
    let path = |name: &str| dir.path().join(name).display().to_string();
    write(
        &file,
        &config(
            dir.path(),
            &path("root"),
            &path("state"),
            &socket.display().to_string(),
        ),
    );
    (dir, socket, file)
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
