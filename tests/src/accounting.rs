//! Leak accounting for the soak and chaos tests: what one switchyardd and its shims hold on the
//! host, counted before and after a workload and compared row by row.
//!
//! A [`Scope`] names what belongs to one test: the daemon's private directory and socket (every
//! shim it starts carries `-address SOCKET`), and the prefix every container id (and shim group)
//! of the test starts with. A [`Snapshot`] counts, within that scope:
//!
//! - the daemon's open fds, threads and resident memory;
//! - the shim processes (servers, `start`/`delete` runs, Wasm workers) with their fds and
//!   threads; QEMU processes; the tasks' own processes; zombies left to the daemon or a shim;
//! - mounts (the host's naming the daemon or the prefix, and those of every mount namespace
//!   the scope's processes hold), cgroups (every hierarchy), network namespaces (held by any of those processes, or
//!   bind-mounted), sockets (the daemon's, the shims' under `/run/containerd/s`, the vm
//!   runtime's) and the files of the runtime directories (bundles, work directories, `yard`'s
//!   fifo directories, native container state, vm sandbox state).
//!
//! Processes count as the scope's when they descend from the daemon or one of its shims, run
//! in a cgroup named after the prefix, or name the prefix on their command line (a container
//! whose shim was killed is reparented away from it, but keeps its cgroup and arguments).
//! Other tests may run on the machine at the same time; nothing outside the scope is counted.
//!
//! [`compare`] makes the before/after table ([`Comparison::table`], printed by the tests always)
//! and [`settle`] waits, with a deadline, until the counts are back (a shim's exit, a cgroup's
//! removal and an idle thread's end take a moment after the last command returned).
//!
//! [`shim_state`] asks a shim directly (ttrpc `containerd.task.v2.Task/State` on the socket its
//! bundle's `address` file names), so a test can check that the daemon's metadata agrees with
//! what the shims report.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::{Daemon, entries, files_under, open_fds, rss_kib, sockets_under};

/// Where containerd's scheme (which the shims follow) puts shim sockets.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// `yard`'s fifo directories (`<id>-<random>`).
const FIFO_ROOT: &str = "/run/switchyard/fifo";
/// The native shim's libcontainer state (`NS/ID`).
const NATIVE_STATE: &str = "/run/yard-native";
/// The vm runtime's per-sandbox state (`NS/<first container>-<shim pid>`).
const VM_STATE: &str = "/run/switchyard/vm";

/// What belongs to one test's daemon.
pub struct Scope {
    /// The daemon's gRPC socket: shims are started with `-address SOCKET`.
    pub socket: PathBuf,
    /// The daemon's private directory (root, state, config, log).
    pub dir: PathBuf,
    /// Every container id and shim group of the test starts with this.
    pub prefix: String,
    pub namespace: String,
    /// Container ids and group names used so far: a shim's socket is named by a hash of the
    /// daemon's address, the namespace and one of these.
    names: Mutex<BTreeSet<String>>,
}

impl Scope {
    /// The scope of `d`'s tasks whose ids (and groups) start with `prefix`, in namespace
    /// `default`.
    pub fn new(d: &Daemon, prefix: &str) -> Scope {
        Scope {
            socket: d.socket.clone(),
            dir: d.dir.path().to_owned(),
            prefix: prefix.to_owned(),
            namespace: "default".to_owned(),
            names: Mutex::new(BTreeSet::new()),
        }
    }

    /// Notes a container id or group name the test uses (one whose shim socket is ours).
    pub fn note(&self, name: &str) {
        assert!(
            name.starts_with(&self.prefix),
            "{name} is outside the scope ({}*)",
            self.prefix
        );
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
    }

    /// The shim socket containerd's scheme gives a task or group `name` of this daemon.
    pub fn shim_socket(&self, name: &str) -> PathBuf {
        let path = self.socket.join(&self.namespace).join(name);
        let hash = Sha256::digest(path.display().to_string().as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        Path::new(SHIM_SOCKETS).join(hex)
    }

    /// What the scope holds now; `daemon` is the daemon's pid (it changes with a restart).
    pub fn snapshot(&self, daemon: u32) -> Snapshot {
        let procs = ProcTable::read();
        let address = format!("-address {} ", self.socket.display());
        let mut shims = Vec::new();
        let mut qemus = Vec::new();
        let mut tasks = Vec::new();
        let mut zombies = Vec::new();
        let mut netns = BTreeSet::new();
        let host_net: BTreeSet<String> = [ns_of(1, "net"), ns_of(std::process::id(), "net")]
            .into_iter()
            .flatten()
            .collect();
        let cgroup_needle = format!("/{}", self.prefix);
        let host_mnt: BTreeSet<String> = [ns_of(1, "mnt"), ns_of(std::process::id(), "mnt")]
            .into_iter()
            .flatten()
            .collect();
        // One process per mount namespace of the scope's own (a Wasm worker keeps its tasks'
        // roots in one; a container's processes share theirs).
        let mut mount_namespaces: BTreeMap<String, u32> = BTreeMap::new();
        let ours = procs.ours(daemon, |p| {
            p.cmd.contains(&address)
                || p.cmd.contains(&self.prefix)
                || p.cgroup.contains(&cgroup_needle)
        });
        for p in procs.by_pid.values() {
            if p.pid == daemon || !ours.contains(&p.pid) {
                continue;
            }
            // The test's own clients (`yard run --name PREFIX-...`) are not the daemon's.
            if p.exe_name() == "yard" {
                continue;
            }
            if p.state == "Z" {
                zombies.push(format!("{} (parent {}): {}", p.pid, p.ppid, p.cmd));
                continue;
            }
            if let Some(ns) = ns_of(p.pid, "net").filter(|ns| !host_net.contains(ns)) {
                netns.insert(ns);
            }
            if let Some(ns) = ns_of(p.pid, "mnt").filter(|ns| !host_mnt.contains(ns)) {
                mount_namespaces.entry(ns).or_insert(p.pid);
            }
            let counted = Proc {
                pid: p.pid,
                cmd: p.cmd.clone(),
                fds: open_fds(p.pid),
                threads: p.threads,
            };
            let name = p.exe_name();
            if name.starts_with("containerd-shim-yard-") {
                shims.push(counted);
            } else if name.starts_with("qemu-system") {
                qemus.push(counted);
            } else {
                tasks.push(counted);
            }
        }
        let dir = self.dir.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&dir) || l.contains(&self.prefix))
            .map(str::to_owned)
            .collect();
        for (ns, pid) in &mount_namespaces {
            let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"));
            mounts.extend(
                table
                    .unwrap_or_default()
                    .lines()
                    .map(|l| format!("{ns} (pid {pid}): {l}")),
            );
        }
        // A namespace kept by a bind mount rather than a process.
        for m in mounts.iter().filter(|m| m.contains(" - nsfs ")) {
            netns.insert(format!("mount: {m}"));
        }
        let mut sockets: Vec<String> = sockets_under(&self.dir)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        for name in self.names.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let s = self.shim_socket(name);
            if s.exists() {
                sockets.push(format!("{} (the shim socket of {name})", s.display()));
            }
        }
        let mut files = Vec::new();
        let ns = &self.namespace;
        let state = self.dir.join("state");
        files.extend(files_under(&state.join("tasks")));
        // Empty per-task directories count too.
        for d in [
            state.join("tasks").join(ns),
            self.dir.join("root/tasks").join(ns),
        ] {
            files.extend(entries(&d).into_iter().map(|e| d.join(e)));
        }
        for d in [
            PathBuf::from(FIFO_ROOT),
            Path::new(NATIVE_STATE).join(ns),
            Path::new(VM_STATE).join(ns),
        ] {
            for e in entries(&d)
                .into_iter()
                .filter(|e| e.starts_with(&self.prefix))
            {
                let p = d.join(&e);
                sockets.extend(sockets_under(&p).iter().map(|s| s.display().to_string()));
                files.push(p);
            }
        }
        files.sort();
        files.dedup();
        sockets.sort();
        sockets.dedup();
        let daemon_proc = procs.by_pid.get(&daemon);
        Snapshot {
            daemon,
            daemon_fds: open_fds(daemon),
            daemon_threads: daemon_proc.map_or(0, |p| p.threads),
            daemon_rss_kib: rss_kib(daemon).unwrap_or(0),
            shims,
            qemus,
            tasks,
            zombies,
            mounts,
            cgroups: cgroups_named(&self.prefix),
            netns,
            sockets,
            files,
        }
    }
}

/// A process of the scope.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub cmd: String,
    pub fds: usize,
    pub threads: usize,
}

/// What a [`Scope`] held at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub daemon: u32,
    pub daemon_fds: usize,
    pub daemon_threads: usize,
    pub daemon_rss_kib: u64,
    /// Shim servers, their `start`/`delete` runs and Wasm workers.
    pub shims: Vec<Proc>,
    pub qemus: Vec<Proc>,
    /// Everything else of the scope: the tasks' processes, runtime-mode runs.
    pub tasks: Vec<Proc>,
    /// Zombies among the scope's processes.
    pub zombies: Vec<String>,
    /// The host's mountinfo lines naming the daemon's directory or the prefix, and every
    /// mount of the mount namespaces the scope's processes made (Wasm workers, containers).
    pub mounts: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    /// Network namespaces (`net:[INODE]`) held by the scope's processes, other than the
    /// host's, and nsfs bind mounts.
    pub netns: BTreeSet<String>,
    /// Socket files: the daemon's, the shims' (named by the task or group whose shim made
    /// them), the vm runtime's.
    pub sockets: Vec<String>,
    /// Bundles, work directories, fifo directories, native and vm runtime state.
    pub files: Vec<PathBuf>,
}

impl Snapshot {
    pub fn shim_fds(&self) -> usize {
        self.shims.iter().map(|p| p.fds).sum()
    }

    pub fn shim_threads(&self) -> usize {
        self.shims.iter().map(|p| p.threads).sum()
    }
}

/// How much a count may exceed its starting value. `None` leaves a row unchecked (printed
/// only): a restarted daemon is a new process, for example.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub daemon_fds: Option<usize>,
    pub daemon_threads: Option<usize>,
    pub daemon_rss_kib: Option<u64>,
    pub shim_fds: Option<usize>,
    pub shim_threads: Option<usize>,
}

impl Bounds {
    /// Exact counts for everything, the daemon's memory within `rss_mib` MiB of its start.
    pub fn exact(rss_mib: u64) -> Bounds {
        Bounds {
            daemon_fds: Some(0),
            daemon_threads: Some(0),
            daemon_rss_kib: Some(rss_mib * 1024),
            shim_fds: Some(0),
            shim_threads: Some(0),
        }
    }

    /// Only what the tasks leave on the host (the daemon's own rows printed, not checked).
    pub fn host_only() -> Bounds {
        Bounds {
            daemon_fds: None,
            daemon_threads: None,
            daemon_rss_kib: None,
            shim_fds: Some(0),
            shim_threads: Some(0),
        }
    }
}

/// One row of the before/after table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: &'static str,
    pub before: u64,
    pub after: u64,
    /// The largest `after` allowed; `None` when the row is not checked.
    pub limit: Option<u64>,
    /// What is there after that was not before (for the failure message).
    pub extra: Vec<String>,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.limit.is_none_or(|l| self.after <= l)
    }
}

/// The before/after table.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub rows: Vec<Row>,
}

impl Comparison {
    /// The table, one row per count, `!!` marking a row over its limit.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<26} {:>10} {:>10} {:>12}\n",
            "", "before", "after", "limit"
        );
        for r in &self.rows {
            let limit = r
                .limit
                .map_or_else(|| "-".to_owned(), |l| format!("<= {l}"));
            let mark = if r.ok() { "" } else { "  !!" };
            let _ = writeln!(
                out,
                "{:<26} {:>10} {:>10} {:>12}{mark}",
                r.what, r.before, r.after, limit
            );
        }
        out
    }

    /// The rows over their limit, each with what was left.
    pub fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| !r.ok())
            .map(|r| {
                let mut s = format!(
                    "{}: {} before, {} after (limit {:?})",
                    r.what, r.before, r.after, r.limit
                );
                for e in r.extra.iter().take(20) {
                    let _ = write!(s, "\n    {e}");
                }
                s
            })
            .collect()
    }

    pub fn is_ok(&self) -> bool {
        self.rows.iter().all(Row::ok)
    }
}

fn new_items<T: Ord + Clone, F: Fn(&T) -> String>(
    before: &[T],
    after: &[T],
    show: F,
) -> Vec<String> {
    let b: BTreeSet<&T> = before.iter().collect();
    after.iter().filter(|x| !b.contains(x)).map(show).collect()
}

fn procs_row(what: &'static str, before: &[Proc], after: &[Proc]) -> Row {
    Row {
        what,
        before: before.len() as u64,
        after: after.len() as u64,
        limit: Some(before.len() as u64),
        extra: after
            .iter()
            .filter(|p| !before.iter().any(|b| b.pid == p.pid))
            .map(|p| {
                format!(
                    "{} ({} fds, {} threads): {}",
                    p.pid, p.fds, p.threads, p.cmd
                )
            })
            .collect(),
    }
}

fn count_row<T: Ord + Clone, F: Fn(&T) -> String>(
    what: &'static str,
    before: &[T],
    after: &[T],
    show: F,
) -> Row {
    Row {
        what,
        before: before.len() as u64,
        after: after.len() as u64,
        limit: Some(before.len() as u64),
        extra: new_items(before, after, show),
    }
}

/// Compares two snapshots of a scope row by row.
pub fn compare(before: &Snapshot, after: &Snapshot, bounds: &Bounds) -> Comparison {
    let slack = |base: usize, b: Option<usize>| b.map(|s| (base + s) as u64);
    let same_daemon = before.daemon == after.daemon;
    let daemon_note = |n: &str| {
        if same_daemon {
            vec![]
        } else {
            vec![format!(
                "{n}: the daemon was restarted (pid {} then {})",
                before.daemon, after.daemon
            )]
        }
    };
    let netns_before: Vec<String> = before.netns.iter().cloned().collect();
    let netns_after: Vec<String> = after.netns.iter().cloned().collect();
    let rows = vec![
        Row {
            what: "daemon fds",
            before: before.daemon_fds as u64,
            after: after.daemon_fds as u64,
            limit: slack(before.daemon_fds, bounds.daemon_fds),
            extra: daemon_note("fds"),
        },
        Row {
            what: "daemon threads",
            before: before.daemon_threads as u64,
            after: after.daemon_threads as u64,
            limit: slack(before.daemon_threads, bounds.daemon_threads),
            extra: daemon_note("threads"),
        },
        Row {
            what: "daemon RSS (KiB)",
            before: before.daemon_rss_kib,
            after: after.daemon_rss_kib,
            limit: bounds.daemon_rss_kib.map(|s| before.daemon_rss_kib + s),
            extra: daemon_note("RSS"),
        },
        procs_row("shim processes", &before.shims, &after.shims),
        Row {
            what: "shim fds",
            before: before.shim_fds() as u64,
            after: after.shim_fds() as u64,
            limit: slack(before.shim_fds(), bounds.shim_fds),
            extra: after
                .shims
                .iter()
                .map(|p| format!("{}: {} fds: {}", p.pid, p.fds, p.cmd))
                .collect(),
        },
        Row {
            what: "shim threads",
            before: before.shim_threads() as u64,
            after: after.shim_threads() as u64,
            limit: slack(before.shim_threads(), bounds.shim_threads),
            extra: after
                .shims
                .iter()
                .map(|p| format!("{}: {} threads: {}", p.pid, p.threads, p.cmd))
                .collect(),
        },
        procs_row("QEMU processes", &before.qemus, &after.qemus),
        procs_row("task processes", &before.tasks, &after.tasks),
        count_row("zombies", &before.zombies, &after.zombies, Clone::clone),
        count_row("mounts", &before.mounts, &after.mounts, Clone::clone),
        count_row("cgroups", &before.cgroups, &after.cgroups, |p| {
            p.display().to_string()
        }),
        count_row(
            "network namespaces",
            &netns_before,
            &netns_after,
            Clone::clone,
        ),
        count_row("sockets", &before.sockets, &after.sockets, Clone::clone),
        count_row("runtime files", &before.files, &after.files, |p| {
            p.display().to_string()
        }),
    ];
    Comparison { rows }
}

/// Waits (up to `timeout`) until the scope is back within `bounds` of `before`; returns the
/// last comparison, whether or not it is.
pub fn settle(
    scope: &Scope,
    daemon: u32,
    before: &Snapshot,
    bounds: &Bounds,
    timeout: Duration,
) -> Comparison {
    let deadline = Instant::now() + timeout;
    loop {
        let c = compare(before, &scope.snapshot(daemon), bounds);
        if c.is_ok() || Instant::now() >= deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

struct ProcInfo {
    pid: u32,
    ppid: u32,
    state: String,
    threads: usize,
    cmd: String,
    cgroup: String,
}

impl ProcInfo {
    /// The file name of argv[0].
    fn exe_name(&self) -> &str {
        let argv0 = self.cmd.split(' ').next().unwrap_or_default();
        argv0.rsplit('/').next().unwrap_or(argv0)
    }
}

struct ProcTable {
    by_pid: BTreeMap<u32, ProcInfo>,
}

impl ProcTable {
    fn read() -> ProcTable {
        let mut by_pid = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            // state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
            // stime cutime cstime priority nice num_threads
            let (Some(state), Some(ppid), Some(threads)) = (
                f.first(),
                f.get(1).and_then(|p| p.parse().ok()),
                f.get(17).and_then(|t| t.parse().ok()),
            ) else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            by_pid.insert(
                pid,
                ProcInfo {
                    pid,
                    ppid,
                    state: (*state).to_owned(),
                    threads,
                    cmd,
                    cgroup,
                },
            );
        }
        ProcTable { by_pid }
    }

    /// The daemon, the processes `seed` accepts, and everything descending from them.
    fn ours(&self, daemon: u32, seed: impl Fn(&ProcInfo) -> bool) -> BTreeSet<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in self.by_pid.values() {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        let mut stack: Vec<u32> = self
            .by_pid
            .values()
            .filter(|p| p.pid == daemon || seed(p))
            .map(|p| p.pid)
            .collect();
        let mut out = BTreeSet::new();
        while let Some(pid) = stack.pop() {
            if out.insert(pid) {
                stack.extend(children.get(&pid).into_iter().flatten());
            }
        }
        out
    }
}

/// A process's namespace of `kind` (`net`, `mnt`): `net:[INODE]`.
fn ns_of(pid: u32, kind: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|l| l.display().to_string())
}

/// cgroup directories, in every hierarchy, whose name contains `needle` (under the
/// `switchyard` subtree, where tasks' cgroups go, and at the top of each hierarchy).
pub fn cgroups_named(needle: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut tops = vec![root.to_owned()];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            tops.push(e.path());
        }
    }
    let mut found = Vec::new();
    for top in tops {
        for e in entries(&top) {
            if e.contains(needle) {
                found.push(top.join(&e));
            }
        }
        // switchyard/NS/ID and anything below.
        let mut stack = vec![(top.join("switchyard"), 0)];
        while let Some((d, depth)) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let p = e.path();
                if e.file_name().to_string_lossy().contains(needle) {
                    found.push(p.clone());
                }
                if depth < 4 {
                    stack.push((p, depth + 1));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

// ---------------------------------------------------------------------------------------------
// Asking a shim directly

/// ttrpc's request envelope (`ttrpc.Request`).
#[derive(Clone, PartialEq, prost::Message)]
struct TtrpcRequest {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(string, tag = "2")]
    method: String,
    #[prost(bytes = "vec", tag = "3")]
    payload: Vec<u8>,
    #[prost(int64, tag = "4")]
    timeout_nano: i64,
}

/// ttrpc's response envelope (`ttrpc.Response`).
#[derive(Clone, PartialEq, prost::Message)]
struct TtrpcResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<switchyard_api::google::rpc::Status>,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
}

/// What a shim says of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimState {
    /// `created`, `running`, `stopped`, `paused`, ... (as `yard ps` names them).
    pub status: String,
    pub pid: u32,
    pub exit_status: u32,
}

/// Asks the shim at `address` (`unix:///...`) for the State of task `id`, within `timeout`.
/// `Err` says why there is no answer (the shim is gone, or answered with an error: its
/// ttrpc code and message).
pub fn shim_state(address: &str, id: &str, timeout: Duration) -> Result<ShimState, String> {
    use switchyard_api::containerd::task::v2 as task;
    let path = address
        .trim()
        .strip_prefix("unix://")
        .unwrap_or(address.trim());
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{path}: {e}"))?;
    let req = TtrpcRequest {
        service: "containerd.task.v2.Task".to_owned(),
        method: "State".to_owned(),
        payload: task::StateRequest {
            id: id.to_owned(),
            exec_id: String::new(),
        }
        .encode_to_vec(),
        timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
    }
    .encode_to_vec();
    // Header: length, stream id (odd: the client's), type 1 (request), flags.
    let mut frame = Vec::with_capacity(10 + req.len());
    frame.extend_from_slice(&u32::try_from(req.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&[1, 0]);
    frame.extend_from_slice(&req);
    s.write_all(&frame)
        .map_err(|e| format!("{path}: send State: {e}"))?;
    loop {
        let mut header = [0u8; 10];
        s.read_exact(&mut header)
            .map_err(|e| format!("{path}: read State's answer: {e}"))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let stream = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > 4 << 20 {
            return Err(format!("{path}: a {len}-byte frame"));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)
            .map_err(|e| format!("{path}: read State's answer: {e}"))?;
        if stream != 1 || header[8] != 2 {
            continue;
        }
        let resp = TtrpcResponse::decode(body.as_slice()).map_err(|e| format!("{path}: {e}"))?;
        if let Some(st) = resp.status.filter(|st| st.code != 0) {
            return Err(format!("State {id}: code {}: {}", st.code, st.message));
        }
        let r = task::StateResponse::decode(resp.payload.as_slice())
            .map_err(|e| format!("{path}: State: {e}"))?;
        let status = switchyard_api::containerd::v1::types::Status::try_from(r.status)
            .map(|s| s.as_str_name().to_ascii_lowercase())
            .unwrap_or_else(|_| "unknown".to_owned());
        return Ok(ShimState {
            status,
            pid: r.pid,
            exit_status: r.exit_status,
        });
    }
}

/// The shim address a task's bundle names (`<state>/tasks/NS/ID/address`), if any.
pub fn bundle_address(d: &Daemon, namespace: &str, id: &str) -> Option<String> {
    std::fs::read_to_string(
        d.state_dir()
            .join("tasks")
            .join(namespace)
            .join(id)
            .join("address"),
    )
    .ok()
    .map(|a| a.trim().to_owned())
    .filter(|a| !a.is_empty())
}

/// `-socket`'s value in a shim server's command line.
pub fn socket_flag(cmd: &str) -> Option<String> {
    cmd.split(' ')
        .skip_while(|a| *a != "-socket")
        .nth(1)
        .map(str::to_owned)
}

/// The socket file of task `id`'s shim, from its bundle's `address` (`unix:///path`).
pub fn bundle_socket(d: &Daemon, namespace: &str, id: &str) -> Option<PathBuf> {
    bundle_address(d, namespace, id)?
        .strip_prefix("unix://")
        .map(PathBuf::from)
}

/// The socket file a shim server's command line names (`-socket unix://PATH`).
pub fn socket_file_flag(cmd: &str) -> Option<PathBuf> {
    socket_flag(cmd)?.strip_prefix("unix://").map(PathBuf::from)
}
