//! Kubernetes' CRI (`runtime.v1.RuntimeService`, `runtime.v1.ImageService`) on the daemon's
//! socket, beside containerd's API, as containerd serves both on one socket.
//!
//! What is served is listed in docs/cri.md. Every other RPC answers UNIMPLEMENTED naming the
//! method (the server's `Unsupported` layer rewrites tonic's default message), never hangs.
//!
//! CRI's objects live in containerd's CRI namespace, `k8s.io`: images pulled through CRI are
//! the images `yard -n k8s.io images` lists.

pub mod containers;
pub mod events;
mod exec;
mod images;
pub mod logs;
mod pause_image;
mod resources;
mod runtime;
pub mod sandbox;
pub mod spec;
pub mod stats;
pub mod stream;
mod wasm_port;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use images::ImageService;
pub use runtime::RuntimeService;

use crate::server::Shared;

/// The containerd namespace CRI's images, pods and containers live in (containerd's).
pub const NAMESPACE: &str = "k8s.io";
/// The runtime name `Version` reports.
pub const RUNTIME_NAME: &str = "switchyard";
/// The CRI API version served.
pub const API_VERSION: &str = "v1";

/// What the CRI services share beyond the daemon's [`Shared`].
pub struct Cri {
    pub shared: Arc<Shared>,
    pub config: crate::config::CriConfig,
    /// The pod CIDR kubelet last gave (`UpdateRuntimeConfig`), for CNI's `ipRanges`.
    pub pod_cidr: Mutex<String>,
    pub sandboxes: sandbox::Sandboxes,
    pub containers: containers::Containers,
    /// `GetContainerEvents` subscribers.
    pub events: events::ContainerEvents,
    /// The previous CPU sample of each container and pod (`usage_nano_cores`).
    pub stats: stats::Samples,
    /// The streaming server of Exec, Attach and PortForward, once started.
    pub streams: std::sync::OnceLock<Arc<stream::StreamServer>>,
}

impl Cri {
    /// The CRI services' state, with the pods a previous daemon left (`<root>/cri`).
    pub fn new(
        shared: Arc<Shared>,
        config: &crate::config::Config,
    ) -> Result<Arc<Cri>, sandbox::SandboxError> {
        let sandboxes = sandbox::Sandboxes::open(&config.root, &config.state, &config.cri)?;
        let containers =
            containers::Containers::open(&config.root, &config.state).map_err(|source| {
                sandbox::SandboxError::Record {
                    path: config.root.join("cri").join("containers"),
                    source,
                }
            })?;
        let cri = Arc::new(Cri {
            shared,
            config: config.cri.clone(),
            pod_cidr: Mutex::new(String::new()),
            sandboxes,
            containers,
            events: events::ContainerEvents::default(),
            stats: stats::Samples::default(),
            streams: std::sync::OnceLock::new(),
        });
        Cri::watch_exits(&cri);
        Ok(cri)
    }

    /// Whether pod networking can be set up: a CNI network config loads from the conf dir
    /// and its plugins are in the bin dirs. `Err` says why not.
    pub fn network_ready(&self) -> Result<(), String> {
        let list = switchyard_cni::load_dir(&self.config.cni_conf_dir)
            .map_err(|e| switchyard_base::chain(&e))?;
        for plugin in &list.plugins {
            let found = self
                .config
                .cni_bin_dirs
                .iter()
                .any(|d| d.join(&plugin.plugin_type).is_file());
            if !found {
                return Err(format!(
                    "network {:?}: plugin {:?} is in none of {}",
                    list.name,
                    plugin.plugin_type,
                    join_paths(&self.config.cni_bin_dirs)
                ));
            }
        }
        Ok(())
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pod or container id as containerd makes them: 64 hex characters.
fn new_id() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The record `id` names: its full id, or an unambiguous prefix of one (as crictl accepts).
fn by_id_or_prefix<T: Clone>(
    records: &std::collections::HashMap<String, T>,
    id: &str,
) -> Option<T> {
    if let Some(r) = records.get(id) {
        return Some(r.clone());
    }
    let mut matching = records
        .iter()
        .filter(|(k, _)| !id.is_empty() && k.starts_with(id));
    match (matching.next(), matching.next()) {
        (Some((_, r)), None) => Some(r.clone()),
        _ => None,
    }
}

/// Largest record file (`<root>/cri/...`) read back: a pod's or container's config is
/// kubelet's, typically a few KiB.
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// A JSON record file the daemon wrote, read back with a size cap.
fn read_record<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> std::io::Result<T> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(std::io::Error::other("larger than 4 MiB"));
    }
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
