//! Pod sandboxes: what the daemon holds for a pod before any container runs in it. A pod gets
//! its own network namespace (unless it asks for the node's), made and held by the daemon
//! (bind-mounted under `<state>/netns`), and CNI ADD puts it on the pod network; likewise its
//! IPC namespace with a `/dev/shm` tmpfs (unless it asks for the node's IPC) and its UTS
//! namespace with the pod's hostname (unless on the node's network), under `<state>/ipcns`,
//! `<state>/utsns` and `<state>/cri/shm`. The pod's containers join these by path, so no process
//! holds the pod (containerd's pause container does that job). StopPodSandbox runs CNI DEL and
//! removes the namespaces and the tmpfs, RemovePodSandbox forgets the pod. Each pod is a JSON
//! record under `<root>/cri/sandboxes`, written atomically, so a restarted daemon lists the same
//! pods and can still tear their networks down (the CNI result cache is under `<root>/cri`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use switchyard_api::cri::v1 as cri;
use switchyard_cni::netns::Kind;
use switchyard_cni::{Attachment, Cni, Netns, NetworkList, PortMapping, Protocol};

/// The interface a pod's network is on, as in every CRI runtime.
pub const POD_INTERFACE: &str = "eth0";
/// The pod's `/dev/shm` tmpfs (containerd's default `shm_size`).
const SHM_OPTIONS: &str = "mode=1777,size=65536k";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("pod sandbox {id} not found")]
    NotFound { id: String },
    #[error("runtime handler {handler:?}: no such runtime under [runtimes] (configured: {known})")]
    UnknownHandler { handler: String, known: String },
    #[error("pod network: {reason}")]
    NetworkNotReady { reason: String },
    #[error("pod network namespace")]
    Netns(#[source] switchyard_cni::NetnsError),
    #[error("the pod's {kind} namespace")]
    Namespace {
        kind: &'static str,
        #[source]
        source: switchyard_cni::NetnsError,
    },
    #[error("the pod's /dev/shm at {}", path.display())]
    Shm {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod network")]
    Cni(#[source] switchyard_cni::CniError),
    #[error("pod sandbox record {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl crate::error::Classify for SandboxError {
    fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            SandboxError::Invalid { .. } | SandboxError::UnknownHandler { .. } => {
                Kind::InvalidArgument
            }
            SandboxError::NotFound { .. } => Kind::NotFound,
            SandboxError::NetworkNotReady { .. } => Kind::FailedPrecondition,
            SandboxError::Netns(_)
            | SandboxError::Namespace { .. }
            | SandboxError::Shm { .. }
            | SandboxError::Cni(_)
            | SandboxError::Record { .. } => Kind::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, SandboxError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Ready,
    NotReady,
}

/// What the daemon keeps of one pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    /// The handler kubelet asked for ("" for the default runtime).
    pub handler: String,
    pub state: State,
    pub created_ns: i64,
    /// The pod's own network namespace; `None` for a pod on the node's network.
    pub netns: Option<PathBuf>,
    pub ip: String,
    pub additional_ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The CNI network list the pod was added to, as read (for DEL after the file changed).
    pub network: Option<SavedNetwork>,
    /// The pod's IPC namespace, `None` for a pod on the node's IPC.
    #[serde(default)]
    pub ipc: Option<PathBuf>,
    /// The pod's UTS namespace (its hostname), `None` for a pod on the node's network.
    #[serde(default)]
    pub uts: Option<PathBuf>,
    /// The pod's `/dev/shm` (a tmpfs), with its IPC namespace.
    #[serde(default)]
    pub shm: Option<PathBuf>,
    /// The pod's config as CRI sent it (protobuf), for status and containers.
    #[serde(with = "b64")]
    pub config: Vec<u8>,
    /// The task that holds the pod besides the namespaces the daemon holds; its id is the pod's.
    #[serde(default)]
    pub task: SandboxTask,
}

/// What runs for a pod before its containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxTask {
    /// Nothing: the daemon holds the pod's namespaces (`native`, `wasm`).
    #[default]
    None,
    /// A pause container from `[cri] sandbox_image`: a foreign runtime's pod, or a pod-wide PID
    /// namespace (the pause process is its init).
    Pause,
    /// The pod's VM (`vm`): a task with no process that the vm shim boots the VM for.
    Vm,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedNetwork {
    pub origin: PathBuf,
    pub text: String,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

impl Record {
    pub fn pod_config(&self) -> cri::PodSandboxConfig {
        prost::Message::decode(self.config.as_slice()).unwrap_or_default()
    }
}

/// Where pods live: records, network namespaces, CNI.
pub struct Sandboxes {
    records_dir: PathBuf,
    netns_dir: PathBuf,
    ipc_dir: PathBuf,
    uts_dir: PathBuf,
    shm_dir: PathBuf,
    conf_dir: PathBuf,
    cni: Cni,
    pods: Mutex<HashMap<String, Record>>,
}

impl Sandboxes {
    /// Opens the pod store under `root` and `state`, reading the records a previous daemon
    /// left (an unreadable one is logged and skipped, not fatal).
    pub fn open(root: &Path, state: &Path, config: &crate::config::CriConfig) -> Result<Sandboxes> {
        let records_dir = root.join("cri").join("sandboxes");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SandboxError::Record { path, source }
        };
        std::fs::create_dir_all(&records_dir).map_err(io(&records_dir))?;
        let cni = Cni::new(config.cni_bin_dirs.clone(), root.join("cri").join("cni"))
            .map_err(SandboxError::Cni)?;
        let mut pods = HashMap::new();
        for entry in std::fs::read_dir(&records_dir).map_err(io(&records_dir))? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match super::read_record::<Record>(&path) {
                Ok(mut r) => {
                    // A pod whose namespace is gone (a reboot cleared the state dir) is not
                    // ready; Stop and Remove still clean up after it.
                    let netns_gone = r.netns.as_ref().is_some_and(|p| {
                        !p.parent()
                            .and_then(|dir| Netns::at(dir, &r.id).ok())
                            .is_some_and(|n| n.exists())
                    });
                    if netns_gone && r.state == State::Ready {
                        tracing::warn!(pod = %r.id, "the pod's network namespace is gone: not ready");
                        r.state = State::NotReady;
                    }
                    pods.insert(r.id.clone(), r);
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "pod record skipped"),
            }
        }
        if !pods.is_empty() {
            tracing::info!(pods = pods.len(), "pod sandboxes restored");
        }
        Ok(Sandboxes {
            records_dir,
            netns_dir: state.join("netns"),
            ipc_dir: state.join("ipcns"),
            uts_dir: state.join("utsns"),
            shm_dir: state.join("cri").join("shm"),
            conf_dir: config.cni_conf_dir.clone(),
            cni,
            pods: Mutex::new(pods),
        })
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, r: &Record) -> Result<()> {
        let path = self.records_dir.join(format!("{}.json", r.id));
        let bytes = serde_json::to_vec(r).map_err(|e| SandboxError::Record {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        crate::runtime::bundle::write_atomic(&path, &bytes)
            .map_err(|source| SandboxError::Record { path, source })
    }

    pub fn get(&self, id: &str) -> Result<Record> {
        self.find(id)
    }

    /// The pod `id` names: its full id or an unambiguous prefix (as crictl accepts).
    fn find(&self, id: &str) -> Result<Record> {
        super::by_id_or_prefix(&self.pods(), id)
            .ok_or_else(|| SandboxError::NotFound { id: id.to_owned() })
    }

    pub fn list(&self) -> Vec<Record> {
        let mut all: Vec<Record> = self.pods().values().cloned().collect();
        all.sort_by_key(|r| r.created_ns);
        all
    }

    /// RunPodSandbox's network part and record: a network namespace, CNI ADD, the record.
    /// Whatever fails undoes what came before it. Blocking (plugins run as processes).
    pub fn run(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
        task: SandboxTask,
    ) -> Result<Record> {
        let meta = config.metadata.as_ref().ok_or(SandboxError::Invalid {
            field: "config.metadata",
            reason: "missing".into(),
        })?;
        for (field, value) in [
            ("config.metadata.name", &meta.name),
            ("config.metadata.uid", &meta.uid),
            ("config.metadata.namespace", &meta.namespace),
        ] {
            if value.is_empty() {
                return Err(SandboxError::Invalid {
                    field,
                    reason: "empty".into(),
                });
            }
        }
        let host_network = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.network == cri::NamespaceMode::Node as i32);
        let id = super::new_id();
        let mut record = Record {
            id: id.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone(),
            namespace: meta.namespace.clone(),
            attempt: meta.attempt,
            handler: handler.to_owned(),
            state: State::Ready,
            created_ns: super::now_nanos(),
            netns: None,
            ipc: None,
            uts: None,
            shm: None,
            ip: String::new(),
            additional_ips: Vec::new(),
            labels: config.labels.clone().into_iter().collect(),
            annotations: config.annotations.clone().into_iter().collect(),
            network: None,
            config: prost::Message::encode_to_vec(config),
            task,
        };
        if let Err(e) = self.hold_namespaces(&mut record, config, host_network) {
            self.release_namespaces(&record);
            return Err(e);
        }
        if !host_network && let Err(e) = self.attach_network(&mut record, config) {
            self.release_namespaces(&record);
            return Err(e);
        }
        if let Err(e) = self.save(&record) {
            if let Err(undo) = self.detach_network(&record) {
                tracing::warn!(pod = %id, error = %switchyard_base::chain(&undo), "undoing the pod network");
            }
            self.release_namespaces(&record);
            return Err(e);
        }
        self.pods().insert(id, record.clone());
        Ok(record)
    }

    /// The pod's IPC namespace and `/dev/shm` (unless on the node's IPC) and its UTS namespace
    /// with its hostname (unless on the node's network, as containerd does), into `record`.
    /// On error, what was made is in `record` for [`Sandboxes::release_namespaces`].
    fn hold_namespaces(
        &self,
        record: &mut Record,
        config: &cri::PodSandboxConfig,
        host_network: bool,
    ) -> Result<()> {
        let host_ipc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.ipc == cri::NamespaceMode::Node as i32);
        if !host_ipc {
            let ipc =
                Netns::create_kind(&self.ipc_dir, &record.id, Kind::Ipc).map_err(|source| {
                    SandboxError::Namespace {
                        kind: "IPC",
                        source,
                    }
                })?;
            record.ipc = Some(ipc.path().to_owned());
            let shm = self.shm_dir.join(&record.id);
            let shm_err = |source| SandboxError::Shm {
                path: shm.clone(),
                source,
            };
            std::fs::create_dir_all(&shm).map_err(shm_err)?;
            record.shm = Some(shm.clone());
            use nix::mount::MsFlags;
            nix::mount::mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(SHM_OPTIONS),
            )
            .map_err(|e| shm_err(e.into()))?;
        }
        if !host_network {
            let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let hostname = if config.hostname.is_empty() {
                node.trim()
            } else {
                config.hostname.as_str()
            };
            let uts = Netns::create_kind(&self.uts_dir, &record.id, Kind::Uts { hostname })
                .map_err(|source| {
                    let source = match source {
                        switchyard_cni::NetnsError::InvalidHostname(h) => {
                            return SandboxError::Invalid {
                                field: "config.hostname",
                                reason: format!("{h:?}: 1 to 64 bytes"),
                            };
                        }
                        other => other,
                    };
                    SandboxError::Namespace {
                        kind: "UTS",
                        source,
                    }
                })?;
            record.uts = Some(uts.path().to_owned());
        }
        Ok(())
    }

    /// Undoes [`Sandboxes::hold_namespaces`]: best effort, each failure logged; idempotent.
    fn release_namespaces(&self, record: &Record) {
        for (kind, dir, held) in [
            ("IPC", &self.ipc_dir, &record.ipc),
            ("UTS", &self.uts_dir, &record.uts),
        ] {
            if held.is_none() {
                continue;
            }
            if let Err(e) = Netns::at(dir, &record.id).and_then(|n| n.remove()) {
                tracing::warn!(pod = %record.id, kind, error = %switchyard_base::chain(&e), "namespace not removed");
            }
        }
        if let Some(shm) = &record.shm {
            match nix::mount::umount2(shm, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    tracing::warn!(pod = %record.id, path = %shm.display(), error = %e, "/dev/shm not unmounted");
                }
            }
            match std::fs::remove_dir(shm) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(pod = %record.id, path = %shm.display(), error = %e, "/dev/shm not removed");
                }
            }
        }
    }

    /// The pod's network namespace and CNI ADD, into `record`; undone on error.
    fn attach_network(&self, record: &mut Record, config: &cri::PodSandboxConfig) -> Result<()> {
        let network = switchyard_cni::load_dir(&self.conf_dir).map_err(|e| {
            SandboxError::NetworkNotReady {
                reason: switchyard_base::chain(&e),
            }
        })?;
        let text =
            std::fs::read_to_string(&network.origin).map_err(|source| SandboxError::Record {
                path: network.origin.clone(),
                source,
            })?;
        let ports = port_mappings(config)?;
        let netns = Netns::create(&self.netns_dir, &record.id).map_err(SandboxError::Netns)?;
        let att = attachment(record, netns.path(), ports);
        let result = match self.cni.add(&network, &att) {
            Ok(r) => r,
            Err(e) => {
                let _ = netns.remove();
                return Err(SandboxError::Cni(e));
            }
        };
        let mut ips = result
            .sandbox_ips(POD_INTERFACE)
            .into_iter()
            .map(|ip| ip.address.addr.to_string());
        record.ip = ips.next().unwrap_or_default();
        record.additional_ips = ips.collect();
        record.netns = Some(netns.path().to_owned());
        record.network = Some(SavedNetwork {
            origin: network.origin.clone(),
            text,
        });
        Ok(())
    }

    /// CNI DEL and the network namespace removed; nothing for a pod on the node's network.
    fn detach_network(&self, record: &Record) -> Result<()> {
        if let (Some(netns), Some(saved)) = (&record.netns, &record.network) {
            let kind = switchyard_cni::config::ConfKind::from_path(&saved.origin)
                .unwrap_or(switchyard_cni::config::ConfKind::List);
            match NetworkList::parse(saved.text.as_bytes(), kind, &saved.origin) {
                Ok(network) => {
                    // DEL gets what ADD got: `portmap` removes its rules only for the mappings
                    // it is given (they were checked at ADD).
                    let ports = port_mappings(&record.pod_config()).unwrap_or_default();
                    let att = attachment(record, netns, ports);
                    self.cni.del(&network, &att).map_err(SandboxError::Cni)?;
                }
                Err(e) => tracing::warn!(
                    pod = %record.id,
                    error = %switchyard_base::chain(&e),
                    "the pod's saved network config no longer parses; CNI DEL skipped"
                ),
            }
            Netns::at(&self.netns_dir, &record.id)
                .and_then(|n| n.remove())
                .map_err(SandboxError::Netns)?;
        }
        Ok(())
    }

    /// StopPodSandbox's part (after the pod's containers stopped): CNI DEL, the namespaces and
    /// `/dev/shm` removed; idempotent.
    pub fn stop(&self, id: &str) -> Result<Record> {
        let mut record = self.find(id)?;
        self.detach_network(&record)?;
        self.release_namespaces(&record);
        if record.state != State::NotReady {
            record.state = State::NotReady;
            self.save(&record)?;
            self.pods().insert(record.id.clone(), record.clone());
        }
        Ok(record)
    }

    /// RemovePodSandbox: stopped first where it was not; an unknown pod is already removed.
    pub fn remove(&self, id: &str) -> Result<()> {
        let record = match self.find(id) {
            Ok(r) => r,
            Err(SandboxError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stop(&record.id)?;
        let path = self.records_dir.join(format!("{}.json", record.id));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SandboxError::Record { path, source }),
        }
        self.pods().remove(&record.id);
        Ok(())
    }
}

/// The pod's interface for CNI, the same at ADD and DEL (as containerd's CRI passes the same
/// capabilities to both).
fn attachment(record: &Record, netns: &Path, ports: Vec<PortMapping>) -> Attachment {
    Attachment::new(&record.id, netns, POD_INTERFACE)
        .with_pod(&record.namespace, &record.name, Some(&record.uid))
        .with_port_mappings(ports)
}

/// The pod's port mappings for CNI's `portMappings` capability.
fn port_mappings(config: &cri::PodSandboxConfig) -> Result<Vec<PortMapping>> {
    config
        .port_mappings
        .iter()
        .map(|p| {
            let port = |field: &'static str, v: i32| {
                u16::try_from(v).map_err(|_| SandboxError::Invalid {
                    field,
                    reason: format!("{v} is not a port"),
                })
            };
            let protocol = match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Tcp) => Protocol::Tcp,
                Ok(cri::Protocol::Udp) => Protocol::Udp,
                Ok(cri::Protocol::Sctp) => Protocol::Sctp,
                Err(_) => {
                    return Err(SandboxError::Invalid {
                        field: "config.port_mappings.protocol",
                        reason: format!("{} is not a protocol", p.protocol),
                    });
                }
            };
            let host_ip = if p.host_ip.is_empty() {
                None
            } else {
                Some(p.host_ip.parse().map_err(|_| SandboxError::Invalid {
                    field: "config.port_mappings.host_ip",
                    reason: format!("{:?} is not an IP address", p.host_ip),
                })?)
            };
            Ok(PortMapping {
                host_port: port("config.port_mappings.host_port", p.host_port)?,
                container_port: port("config.port_mappings.container_port", p.container_port)?,
                protocol,
                host_ip,
            })
        })
        .collect()
}
