//! Shim process lifecycle: run `<shim> start` (or, for Switchyard's own shims, start the server
//! that `start` would start, one process less), connect to the address it serves, reconnect
//! after a daemon restart, notice when it dies, and run `<shim> delete` to clean up after it.
//! Shims that group tasks (one shim per pod) serve the same address for several tasks; they
//! share one connection here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use switchyard_api::containerd::task::v2 as task;
use tokio::io::AsyncWriteExt;

use super::address::{AddressError, BootstrapParams, dial};
use super::bridge::TaskClient;
use super::bundle::{BOOTSTRAP, Bundle};
use super::watch::{self, Gone};
use crate::error::{Classify, Kind};

/// How long a shim server that closed its stdout without listening is given to finish exiting,
/// so that its exit status can be reported.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// What every shim invocation gets from the daemon.
#[derive(Debug, Clone)]
pub struct ShimSettings {
    /// The daemon's gRPC address (`-address`).
    pub grpc_address: PathBuf,
    /// Where shims publish events (`TTRPC_ADDRESS`).
    pub ttrpc_address: PathBuf,
    /// The `-publish-binary`: switchyardd itself, which has a `publish` subcommand.
    pub publish_binary: PathBuf,
    pub start_timeout: Duration,
    pub delete_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub debug: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("run shim {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shim {} start failed ({status}){}", binary.display(), output_suffix(output))]
    StartFailed {
        binary: PathBuf,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("shim {} start did not finish within {timeout:?}{}", binary.display(), output_suffix(output))]
    StartTimeout {
        binary: PathBuf,
        timeout: Duration,
        output: String,
    },
    #[error("shim server {} did not come up on {address} ({status}); see the shim log", binary.display())]
    ServerDown {
        binary: PathBuf,
        address: String,
        status: String,
    },
    #[error("shim {} start", binary.display())]
    Address {
        binary: PathBuf,
        #[source]
        source: AddressError,
    },
    #[error("connect to shim at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read {}", path.display())]
    Bootstrap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shim {} delete failed ({status}){}", binary.display(), output_suffix(output))]
    DeleteFailed {
        binary: PathBuf,
        status: String,
        output: String,
    },
    #[error("shim {} delete printed a malformed response", binary.display())]
    DeleteResponse {
        binary: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
}

fn output_suffix(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

impl Classify for ShimError {
    fn kind(&self) -> Kind {
        match self {
            ShimError::Spawn { .. } => Kind::FailedPrecondition,
            ShimError::StartFailed { .. }
            | ShimError::ServerDown { .. }
            | ShimError::DeleteFailed { .. } => Kind::Internal,
            ShimError::StartTimeout { .. } => Kind::DeadlineExceeded,
            ShimError::Address { source, .. } => match source {
                AddressError::Empty => Kind::Internal,
                AddressError::Version(_) | AddressError::Protocol(_) => Kind::Unimplemented,
            },
            ShimError::Connect { .. } | ShimError::Bootstrap { .. } => Kind::Unavailable,
            ShimError::DeleteResponse { .. } => Kind::Internal,
        }
    }
}

/// A connected shim.
#[derive(Debug)]
pub struct Shim {
    pub address: String,
    pub client: TaskClient,
    /// The shim's pid, when it told us (Connect).
    pub pid: Option<u32>,
    /// What its `start` printed (written into the bundle of every task it serves).
    params: BootstrapParams,
    gone: Gone,
}

impl Shim {
    /// Resolves once the shim process has exited.
    pub async fn gone(&self) {
        let mut g = self.gone.clone();
        let _ = g.wait_for(|gone| *gone).await;
    }

    fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }
}

/// A group's shim as [`ShimManager::start`] finds it again: the same binary, namespace and
/// group make `<shim> start` print the same address.
type GroupKey = (PathBuf, String, String);

/// Runs and tracks shim processes.
#[derive(Debug)]
pub struct ShimManager {
    settings: ShimSettings,
    /// The live shim of each group a task was started in, kept while the shim lives (a group's
    /// shim may stay warm after its last task for the group's next one).
    groups: Arc<Mutex<HashMap<GroupKey, Arc<Shim>>>>,
    conns: Mutex<HashMap<String, Weak<Shim>>>,
}

/// The last bytes of a process's output worth putting in an error.
fn tail(bytes: &[u8]) -> String {
    const MAX: usize = 2048;
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut start = s.len() - MAX;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// containerd's rule for a shim server's socket (`containerd_shim::socket_address`, which the
/// shim kit's `start` uses): `/run/containerd/s/` and the SHA-256 of `<address>/<namespace>/<group>`.
pub fn server_address(grpc_address: &Path, namespace: &str, group: &str) -> String {
    let key = grpc_address.join(namespace).join(group);
    let digest = switchyard_images::content::sha256_digest(key.as_os_str().as_encoded_bytes());
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    format!("unix:///run/containerd/s/{hex}")
}

impl ShimManager {
    pub fn new(settings: ShimSettings) -> Self {
        Self {
            settings,
            groups: Arc::new(Mutex::new(HashMap::new())),
            conns: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &ShimSettings {
        &self.settings
    }

    /// `<binary> [flags] <action>`; with no action the flags of a server (`-socket`) follow.
    fn command(
        &self,
        binary: &Path,
        bundle: &Bundle,
        action: Option<&str>,
    ) -> tokio::process::Command {
        let s = &self.settings;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("-namespace")
            .arg(&bundle.namespace)
            .arg("-address")
            .arg(&s.grpc_address)
            .arg("-publish-binary")
            .arg(&s.publish_binary)
            .arg("-id")
            .arg(&bundle.id);
        if action == Some("delete") {
            cmd.arg("-bundle").arg(&bundle.path);
        }
        if s.debug {
            cmd.arg("-debug");
        }
        cmd.args(action)
            .current_dir(&bundle.path)
            .env("GOMAXPROCS", "2")
            .env("TTRPC_ADDRESS", &s.ttrpc_address)
            .env("GRPC_ADDRESS", &s.grpc_address)
            .env("NAMESPACE", &bundle.namespace)
            .env("MAX_SHIM_VERSION", "3")
            // Shims daemonize; keep them out of the daemon's process group so a ^C to the
            // daemon does not reach them.
            .process_group(0)
            // Only `start`/`delete` themselves: a shim that daemonized is not our child.
            .kill_on_drop(true)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::sys::spawn::child_umask(&mut cmd, crate::sys::spawn::SHIM_UMASK);
        crate::sys::spawn::child_nofile(&mut cmd);
        cmd
    }

    /// The shim for a new task: the live shim of its `group`, without running `<binary> start`
    /// (which would only find that shim and print its address: one process start less per
    /// task), else what [`ShimManager::start`] starts, or with `kit` (a shim built on
    /// Switchyard's shim kit) what [`ShimManager::serve`] starts; `starting` runs first then
    /// (a new shim writes its log into this bundle). Returns whether the shim was joined.
    pub async fn start_or_join(
        &self,
        bundle: &Bundle,
        binary: &Path,
        options: Option<&Any>,
        group: Option<&str>,
        kit: bool,
        starting: impl FnOnce(),
    ) -> Result<(Arc<Shim>, bool), ShimError> {
        let key = group.map(|g| (binary.to_owned(), bundle.namespace.clone(), g.to_owned()));
        if let Some(key) = &key
            && let Some(shim) = self.group_shim(key)
        {
            self.record(bundle, binary, &shim.params, false)?;
            return Ok((shim, true));
        }
        starting();
        let shim = if kit {
            self.serve(bundle, binary, group).await?
        } else {
            self.start(bundle, binary, options).await?
        };
        if let Some(key) = key {
            self.keep_group(key, &shim);
        }
        Ok((shim, false))
    }

    fn group_shim(&self, key: &GroupKey) -> Option<Arc<Shim>> {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.get(key).filter(|s| !s.is_gone()).cloned()
    }

    /// Forgets a group's shim that turned out unusable (it is exiting), so the next task of
    /// the group runs `start` and connects anew.
    pub fn forget_group_shim(&self, shim: &Arc<Shim>) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|_, s| !Arc::ptr_eq(s, shim));
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, w| w.upgrade().is_some_and(|s| !Arc::ptr_eq(&s, shim)));
    }

    /// Remembers `shim` as its group's until it exits.
    fn keep_group(&self, key: GroupKey, shim: &Arc<Shim>) {
        {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            if groups.get(&key).is_some_and(|s| Arc::ptr_eq(s, shim)) {
                return;
            }
            groups.insert(key.clone(), shim.clone());
        }
        let (groups, shim) = (self.groups.clone(), shim.clone());
        tokio::spawn(async move {
            shim.gone().await;
            let mut groups = groups.lock().unwrap_or_else(|e| e.into_inner());
            if groups.get(&key).is_some_and(|s| Arc::ptr_eq(s, &shim)) {
                groups.remove(&key);
            }
        });
    }

    /// Runs `<binary> start` for a bundle and connects to the shim it leaves running.
    pub async fn start(
        &self,
        bundle: &Bundle,
        binary: &Path,
        options: Option<&Any>,
    ) -> Result<Arc<Shim>, ShimError> {
        let mut cmd = self.command(binary, bundle, Some("start"));
        // containerd 1.7+ hands the runtime options to `start` on stdin.
        cmd.stdin(if options.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        if let (Some(opts), Some(mut stdin)) = (options, child.stdin.take()) {
            // A shim that does not read stdin is fine; ignore a closed pipe.
            let _ = stdin.write_all(&opts.encode_to_vec()).await;
        }
        let timeout = self.settings.start_timeout;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(ShimError::Spawn {
                    binary: binary.to_owned(),
                    source,
                });
            }
            Err(_) => {
                // Dropping wait_with_output's future killed the child (kill_on_drop).
                return Err(ShimError::StartTimeout {
                    binary: binary.to_owned(),
                    timeout,
                    output: String::new(),
                });
            }
        };
        if !output.status.success() {
            let mut text = tail(&output.stderr);
            let out = tail(&output.stdout);
            if !out.is_empty() {
                if !text.is_empty() {
                    text.push_str("; ");
                }
                text.push_str(&out);
            }
            return Err(ShimError::StartFailed {
                binary: binary.to_owned(),
                status: output.status,
                output: text,
            });
        }
        if !output.stderr.is_empty() {
            tracing::debug!(container_id = %bundle.id, stderr = %tail(&output.stderr), "shim start wrote to stderr");
        }
        let params =
            BootstrapParams::parse(&output.stdout).map_err(|source| ShimError::Address {
                binary: binary.to_owned(),
                source,
            })?;
        crate::failpoints::hit("task.create.shim-spawned");
        self.record(bundle, binary, &params, true)?;
        self.attach(bundle, &params).await
    }

    /// Starts a shim kit server for a bundle as `<binary> start` would (the same socket by
    /// containerd's rule, the same command line) without running `start`: one process start
    /// less per task. The server closes its stdout once it listens, as it does for `start`; it
    /// is this daemon's child, reaped here when it exits. A live server of the group at that
    /// address (one a previous daemon started) is used, as `start` would.
    pub async fn serve(
        &self,
        bundle: &Bundle,
        binary: &Path,
        group: Option<&str>,
    ) -> Result<Arc<Shim>, ShimError> {
        let group = group.unwrap_or(&bundle.id);
        let params = BootstrapParams {
            version: 3,
            address: server_address(&self.settings.grpc_address, &bundle.namespace, group),
            protocol: "ttrpc".to_owned(),
        };
        let listening = || async { dial(&params.address).await.is_ok() };
        // Recorded before the server starts: a daemon killed from here on leaves a bundle that
        // names its server, so the next one reconnects to it or stops it (`start` wrote the
        // bundle's address as soon as its server listened, whatever became of its caller).
        self.record(bundle, binary, &params, false)?;
        if group == bundle.id || !listening().await {
            // The server makes its socket's directory private itself.
            let mut cmd = self.command(binary, bundle, None);
            cmd.arg("-socket")
                .arg(&params.address)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                // The server outlives this call.
                .kill_on_drop(false);
            let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
                binary: binary.to_owned(),
                source,
            })?;
            let timeout = self.settings.start_timeout;
            // Ready when it closes its stdout (whatever it wrote there is dropped, not held).
            let ready = async {
                if let Some(mut out) = child.stdout.take() {
                    let _ = tokio::io::copy(&mut out, &mut tokio::io::sink()).await;
                }
            };
            let in_time = tokio::time::timeout(timeout, ready).await.is_ok();
            // A server that found another of its group listening (a concurrent Create of the
            // group) exits at once, and that one serves.
            if !in_time || !listening().await {
                // A server that closed its stdout by exiting can be seen doing so before its
                // exit can be collected: give it a moment, so the error names its status.
                let exited = if in_time {
                    tokio::time::timeout(EXIT_GRACE, child.wait()).await.ok()
                } else {
                    child.try_wait().transpose()
                };
                let status = match exited {
                    Some(Ok(status)) => status.to_string(),
                    _ if in_time => "not listening".to_owned(),
                    _ => format!("not listening after {timeout:?}"),
                };
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(ShimError::ServerDown {
                    binary: binary.to_owned(),
                    address: params.address.clone(),
                    status,
                });
            }
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        }
        crate::failpoints::hit("task.create.shim-spawned");
        self.attach(bundle, &params).await
    }

    /// Writes into the bundle which shim serves it, for a restarted daemon (`bootstrap.json`,
    /// `shim-binary-path`); unless `start` ran (`address_written`), also the `address` that
    /// `start` writes (the shim binary's `delete` reads it).
    fn record(
        &self,
        bundle: &Bundle,
        binary: &Path,
        params: &BootstrapParams,
        address_written: bool,
    ) -> Result<(), ShimError> {
        let json = serde_json::to_vec(params).unwrap_or_default();
        let path = bundle.path.join(BOOTSTRAP);
        super::bundle::write_atomic(&path, &json)
            .map_err(|source| ShimError::Bootstrap { path, source })?;
        let mut files = vec![("shim-binary-path", binary.as_os_str().as_encoded_bytes())];
        if !address_written {
            files.push(("address", params.address.as_bytes()));
        }
        for (name, data) in files {
            let path = bundle.path.join(name);
            super::bundle::write_private(&path, data)
                .map_err(|source| ShimError::Bootstrap { path, source })?;
        }
        Ok(())
    }

    /// Reconnects to the shim of a bundle left by a previous daemon.
    pub async fn load(&self, bundle: &Bundle) -> Result<Arc<Shim>, ShimError> {
        let path = bundle.path.join(BOOTSTRAP);
        let params = match std::fs::read(&path) {
            Ok(bytes) => BootstrapParams::parse(&bytes),
            // A shim always writes `address`; fall back to it if bootstrap.json is missing.
            Err(_) => {
                let addr = bundle.path.join("address");
                let bytes = std::fs::read(&addr)
                    .map_err(|source| ShimError::Bootstrap { path: addr, source })?;
                BootstrapParams::parse(&bytes)
            }
        }
        .map_err(|source| ShimError::Address {
            binary: PathBuf::from("(restored)"),
            source,
        })?;
        self.attach(bundle, &params).await
    }

    async fn attach(
        &self,
        bundle: &Bundle,
        params: &BootstrapParams,
    ) -> Result<Arc<Shim>, ShimError> {
        if let Some(shim) = self.lookup(&params.address) {
            return Ok(shim);
        }
        let api = params.api().map_err(|source| ShimError::Address {
            binary: PathBuf::new(),
            source,
        })?;
        let stream = tokio::time::timeout(Duration::from_secs(10), dial(&params.address))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .map_err(|source| ShimError::Connect {
                address: params.address.clone(),
                source,
            })?;
        let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
        let client = TaskClient::new(client, api, &bundle.namespace);
        let pid = client
            .connect(task::ConnectRequest {
                id: bundle.id.clone(),
            })
            .await
            .ok()
            .map(|r| r.shim_pid)
            .filter(|p| *p != 0);
        let gone = match pid {
            Some(pid) => watch::watch_pid(pid),
            None => watch::watch_by_ping(client.clone(), bundle.id.clone()),
        };
        let shim = Arc::new(Shim {
            address: params.address.clone(),
            client,
            pid,
            params: params.clone(),
            gone,
        });
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, w| w.strong_count() > 0);
        // Another task of the same shim may have connected meanwhile; either connection works.
        conns.insert(params.address.clone(), Arc::downgrade(&shim));
        Ok(shim)
    }

    /// The live connection to the shim at `address`. A shim that has exited is not it: a new
    /// server of its group may listen at the same address now.
    fn lookup(&self, address: &str) -> Option<Arc<Shim>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .get(address)
            .and_then(Weak::upgrade)
            .filter(|s| !s.is_gone())
    }

    /// Runs `<binary> delete` for a bundle whose shim is gone, as containerd does: the shim
    /// binary cleans up what its runtime left (runc state, mounts) and reports the exit. Then
    /// the dead server's socket goes, if the binary left it (containerd's runc shim does) and
    /// nothing listens there.
    pub async fn delete(
        &self,
        bundle: &Bundle,
        binary: &Path,
    ) -> Result<task::DeleteResponse, ShimError> {
        let deleted = self.run_delete(bundle, binary).await;
        let address = std::fs::read_to_string(bundle.path.join("address")).unwrap_or_default();
        if let Some(path) = super::address::socket_file(address.trim()) {
            match switchyard_base::socket::remove_if_dead(path) {
                Ok(true) => {
                    tracing::debug!(socket = %path.display(), "removed a dead shim's socket")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(socket = %path.display(), error = %e, "remove a dead shim's socket")
                }
            }
        }
        deleted
    }

    async fn run_delete(
        &self,
        bundle: &Bundle,
        binary: &Path,
    ) -> Result<task::DeleteResponse, ShimError> {
        let mut cmd = self.command(binary, bundle, Some("delete"));
        cmd.stdin(Stdio::null());
        if !bundle.path.is_dir() {
            cmd.current_dir("/");
        }
        let child = cmd.spawn().map_err(|source| ShimError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        let out = match tokio::time::timeout(self.settings.delete_timeout, child.wait_with_output())
            .await
        {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(ShimError::Spawn {
                    binary: binary.to_owned(),
                    source,
                });
            }
            Err(_) => {
                return Err(ShimError::DeleteFailed {
                    binary: binary.to_owned(),
                    status: format!("no answer within {:?}", self.settings.delete_timeout),
                    output: String::new(),
                });
            }
        };
        if !out.status.success() {
            return Err(ShimError::DeleteFailed {
                binary: binary.to_owned(),
                status: out.status.to_string(),
                output: tail(&out.stderr),
            });
        }
        if !out.stderr.is_empty() {
            tracing::warn!(container_id = %bundle.id, warnings = %tail(&out.stderr), "shim delete wrote warnings");
        }
        task::DeleteResponse::decode(out.stdout.as_slice()).map_err(|source| {
            ShimError::DeleteResponse {
                binary: binary.to_owned(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// containerd's rule, as the shim kit's `start` applies it (the kit's
    /// `the_server_socket_is_containerds` holds the same vector).
    #[test]
    fn a_server_address_is_the_one_start_would_print() {
        assert_eq!(
            server_address(
                Path::new("/run/switchyard/switchyard.sock"),
                "default",
                "g1"
            ),
            "unix:///run/containerd/s/32078c77e9d1e8d80dcaa4b9d889d4ae79dd3a34a86610c3a63eb1e012368206"
        );
    }
}
