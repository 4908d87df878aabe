//! CRI stats and metrics: `ContainerStats`, `ListContainerStats`, `PodSandboxStats`,
//! `ListPodSandboxStats`, `ListMetricDescriptors`, `ListPodSandboxMetrics`.
//!
//! A container's CPU and memory are its shim's `Stats` (Tasks.Metrics in `k8s.io`), cgroup v1
//! or v2 metrics whichever runtime answers. A pod's are read from its cgroup parent with
//! libcgroups: there is no pause process, so the parent holds exactly the pod's containers
//! (a pod without a parent gets the sum of its containers). Its network is `/proc/net/dev` read
//! inside its network namespace. `usage_nano_cores` is the rate since the previous sample of the
//! same container or pod, as containerd computes it: the first sample has none.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use switchyard_api::cgroups;
use switchyard_api::containerd::services::tasks::v1 as tasks_api;
use switchyard_api::containerd::services::tasks::v1::tasks_server::Tasks as _;
use switchyard_api::cri::v1 as cri;
use tonic::Status;

use super::containers::{Record, in_ns};
use super::{Cri, NAMESPACE, sandbox};
use crate::server::tasks::TasksService;

/// CPU and memory of one cgroup at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Cumulative CPU time, nanoseconds.
    pub cpu_ns: Option<u64>,
    pub memory: Option<Memory>,
    /// Processes in the cgroup (pods only).
    pub processes: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub usage: u64,
    /// Usage less inactive file pages (cadvisor's and containerd's working set).
    pub working_set: u64,
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    /// The limit, 0 when there is none.
    pub limit: u64,
}

/// A limit this large is no limit (cgroup v1 shows "unlimited" as a page-rounded i64::MAX).
const UNLIMITED: u64 = 1 << 62;

fn working_set(usage: u64, inactive_file: u64) -> u64 {
    usage.saturating_sub(inactive_file)
}

/// The CPU and memory of a shim's `Stats` answer (cgroup v1 or v2 metrics); `None` for another
/// type or a message that does not decode.
pub fn decode(any: &prost_types::Any) -> Option<Usage> {
    use prost::Message as _;
    let kind = any.type_url.rsplit('/').next().unwrap_or_default();
    if kind == cgroups::V1_METRICS {
        let m = cgroups::v1::Metrics::decode(any.value.as_slice()).ok()?;
        let memory = m.memory.map(|s| {
            let usage = s.usage.unwrap_or_default();
            Memory {
                usage: usage.usage,
                working_set: working_set(usage.usage, s.total_inactive_file),
                rss: s.total_rss,
                page_faults: s.total_pg_fault,
                major_page_faults: s.total_pg_maj_fault,
                limit: usage.limit,
            }
        });
        Some(Usage {
            cpu_ns: m.cpu.and_then(|c| c.usage).map(|u| u.total),
            memory,
            processes: None,
        })
    } else if kind == cgroups::V2_METRICS {
        let m = cgroups::v2::Metrics::decode(any.value.as_slice()).ok()?;
        Some(Usage {
            cpu_ns: m.cpu.map(|c| c.usage_usec.saturating_mul(1000)),
            memory: m.memory.map(|s| Memory {
                usage: s.usage,
                working_set: working_set(s.usage, s.inactive_file),
                rss: s.anon,
                page_faults: s.pgfault,
                major_page_faults: s.pgmajfault,
                limit: s.usage_limit,
            }),
            processes: None,
        })
    } else {
        None
    }
}

/// The cgroup at cgroupfs path `parent` (a pod's `linux.cgroup_parent`), read with libcgroups
/// (v1 or v2, as the host has them). `None` when it is not there or not readable.
pub fn cgroup_usage(parent: &str) -> Option<Usage> {
    use libcgroups::common::{CgroupConfig, CgroupManager as _, CgroupSetup};
    let path = Path::new(parent);
    if !path.is_absolute() || parent.contains(':') || parent.ends_with(".slice") {
        return None;
    }
    let unified = matches!(
        libcgroups::common::get_cgroup_setup(),
        Ok(CgroupSetup::Unified)
    );
    let dir = if unified {
        Path::new("/sys/fs/cgroup").join(path.strip_prefix("/").ok()?)
    } else {
        Path::new("/sys/fs/cgroup/memory").join(path.strip_prefix("/").ok()?)
    };
    // The manager creates nothing until told to apply or add a process.
    if !dir.is_dir() {
        return None;
    }
    let stats = libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_owned(),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .ok()?
    .stats()
    .map_err(|e| tracing::debug!(cgroup = parent, error = %e, "pod cgroup stats"))
    .ok()?;
    let m = &stats.memory.stats;
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    let usage = stats.memory.memory.usage;
    let memory = if unified {
        Memory {
            usage,
            working_set: working_set(usage, get("inactive_file")),
            rss: get("anon"),
            page_faults: get("pgfault"),
            major_page_faults: get("pgmajfault"),
            limit: stats.memory.memory.limit,
        }
    } else {
        Memory {
            usage,
            working_set: working_set(usage, get("total_inactive_file")),
            rss: get("total_rss"),
            page_faults: get("total_pgfault"),
            major_page_faults: get("total_pgmajfault"),
            limit: stats.memory.memory.limit,
        }
    };
    Some(Usage {
        cpu_ns: Some(stats.cpu.usage.usage_total),
        memory: Some(memory),
        processes: Some(stats.pids.current),
    })
}

/// One interface's counters from `/proc/net/dev`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

/// Most of a pod's `/proc/net/dev` read, and most interfaces reported: a container with
/// `CAP_NET_ADMIN` makes as many interfaces in its pod's namespace as it likes.
const MAX_NET_DEV_BYTES: u64 = 256 << 10;
const MAX_INTERFACES: usize = 64;

/// `/proc/net/dev`'s interfaces, loopback left out, at most [`MAX_INTERFACES`].
fn parse_net_dev(text: &str) -> Vec<Interface> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            let name = name.trim();
            (name != "lo" && f.len() >= 11).then(|| Interface {
                name: name.to_owned(),
                rx_bytes: f[0],
                rx_errors: f[2],
                tx_bytes: f[8],
                tx_errors: f[10],
            })
        })
        .take(MAX_INTERFACES)
        .collect()
}

/// The interfaces of the network namespace mounted at `netns`.
fn interfaces(netns: &Path) -> Option<Vec<Interface>> {
    let ns = switchyard_cni::Netns::at(netns.parent()?, netns.file_name()?.to_str()?).ok()?;
    // `thread-self`: the namespace of the thread that joined it, not the daemon's.
    ns.run_in(|| {
        use std::io::Read as _;
        let mut text = String::new();
        std::fs::File::open("/proc/thread-self/net/dev")?
            .take(MAX_NET_DEV_BYTES)
            .read_to_string(&mut text)
            .map(|_| text)
    })
    .ok()?
    .ok()
    .map(|t| parse_net_dev(&t))
}

/// How long a writable layer's measured usage is served before it is walked again: the walk
/// visits every file a container wrote (which may be millions), so it runs at most this often per
/// container however often stats are asked for (containerd's CRI likewise walks snapshots on a
/// 10 s period, `stats_collect_period`).
pub const LAYER_USAGE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The previous CPU sample of each container and pod, for `usage_nano_cores`, and the last
/// measured usage of each container's writable layer.
#[derive(Default)]
pub struct Samples {
    cpu: Mutex<HashMap<String, (i64, u64)>>,
    layers: Mutex<HashMap<String, (std::time::Instant, u64, u64)>>,
}

impl Samples {
    /// CPU cores used (in billionths) since the previous sample of `key`; records this one.
    fn nano_cores(&self, key: &str, at_ns: i64, cpu_ns: u64) -> Option<u64> {
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let prev = cpu.get(key).copied();
        match prev {
            Some((t, _)) if t >= at_ns => return None,
            _ => {}
        }
        cpu.insert(key.to_owned(), (at_ns, cpu_ns));
        let (t, used) = prev?;
        let elapsed = u128::try_from(at_ns - t).ok()?;
        let delta = u128::from(cpu_ns.checked_sub(used)?);
        u64::try_from(delta * 1_000_000_000 / elapsed).ok()
    }

    /// The writable layer's `(bytes, inodes)` of `key` measured within [`LAYER_USAGE_TTL`].
    fn layer_usage(&self, key: &str) -> Option<(u64, u64)> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .get(key)
            .filter(|(at, _, _)| at.elapsed() < LAYER_USAGE_TTL)
            .map(|&(_, bytes, inodes)| (bytes, inodes))
    }

    fn set_layer_usage(&self, key: &str, usage: (u64, u64)) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key.to_owned(),
                (std::time::Instant::now(), usage.0, usage.1),
            );
    }

    /// Forgets a removed container's or pod's samples.
    pub fn forget(&self, key: &str) {
        self.cpu
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// The sample key of a container and of a pod.
pub fn container_key(id: &str) -> String {
    format!("c/{id}")
}
pub fn pod_key(id: &str) -> String {
    format!("p/{id}")
}

fn u64v(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn cpu_usage(samples: &Samples, key: &str, at: i64, u: &Usage) -> Option<cri::CpuUsage> {
    let cpu_ns = u.cpu_ns?;
    Some(cri::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: u64v(cpu_ns),
        usage_nano_cores: samples.nano_cores(key, at, cpu_ns).and_then(u64v),
        psi: None,
    })
}

fn memory_usage(at: i64, u: &Usage) -> Option<cri::MemoryUsage> {
    let m = u.memory?;
    Some(cri::MemoryUsage {
        timestamp: at,
        working_set_bytes: u64v(m.working_set),
        available_bytes: (m.limit != 0 && m.limit < UNLIMITED)
            .then(|| m.limit.saturating_sub(m.working_set))
            .and_then(u64v),
        usage_bytes: u64v(m.usage),
        rss_bytes: u64v(m.rss),
        page_faults: u64v(m.page_faults),
        major_page_faults: u64v(m.major_page_faults),
        psi: None,
    })
}

fn sum(all: &[Usage]) -> Usage {
    let mut out = Usage::default();
    for u in all {
        if let Some(c) = u.cpu_ns {
            out.cpu_ns = Some(out.cpu_ns.unwrap_or(0).saturating_add(c));
        }
        if let Some(m) = u.memory {
            let o = out.memory.get_or_insert_with(Memory::default);
            o.usage += m.usage;
            o.working_set += m.working_set;
            o.rss += m.rss;
            o.page_faults += m.page_faults;
            o.major_page_faults += m.major_page_faults;
        }
    }
    out
}

fn matches(
    labels: &std::collections::BTreeMap<String, String>,
    sel: &HashMap<String, String>,
) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A pod's stats with what its containers' stats were read from, for the metrics.
struct PodSample {
    pod: sandbox::Record,
    stats: cri::PodSandboxStats,
    containers: Vec<(Record, Usage)>,
    interfaces: Vec<Interface>,
    usage: Usage,
}

impl Cri {
    /// CPU and memory of the CRI tasks `filter` selects (all of `k8s.io` when empty), by id.
    async fn task_usage(&self, filter: Option<&str>) -> Result<HashMap<String, Usage>, Status> {
        let r = TasksService(self.shared.clone())
            .metrics(in_ns(tasks_api::MetricsRequest {
                filters: filter
                    .map(|id| vec![format!("id=={id}")])
                    .unwrap_or_default(),
            }))
            .await?
            .into_inner();
        Ok(r.metrics
            .into_iter()
            .filter_map(|m| Some((m.id, decode(m.data.as_ref()?)?)))
            .collect())
    }

    /// Bytes and inodes of the container's writable layer (its active snapshot), walked at
    /// most once per [`LAYER_USAGE_TTL`].
    async fn writable_layer(&self, id: &str, at: i64) -> Option<cri::FilesystemUsage> {
        let root = self.shared.images.snapshots().root().to_path_buf();
        let sample = container_key(id);
        let (bytes, inodes) = match self.stats.layer_usage(&sample) {
            Some(u) => u,
            None => {
                let store = self.shared.images.clone();
                let key = format!("{NAMESPACE}/{id}");
                let used =
                    tokio::task::spawn_blocking(move || store.snapshots().active_usage(&key))
                        .await
                        .ok()?
                        .ok()??;
                self.stats.set_layer_usage(&sample, used);
                used
            }
        };
        Some(cri::FilesystemUsage {
            timestamp: at,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: root.display().to_string(),
            }),
            used_bytes: u64v(bytes),
            inodes_used: u64v(inodes),
        })
    }

    async fn one_container_stats(&self, r: &Record, usage: Option<&Usage>) -> cri::ContainerStats {
        let at = super::now_nanos();
        let key = container_key(&r.id);
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: r.id.clone(),
                metadata: Some(cri::ContainerMetadata {
                    name: r.name.clone(),
                    attempt: r.attempt,
                }),
                labels: r.labels.clone().into_iter().collect(),
                annotations: r.annotations.clone().into_iter().collect(),
            }),
            cpu: usage.and_then(|u| cpu_usage(&self.stats, &key, at, u)),
            memory: usage.and_then(|u| memory_usage(at, u)),
            writable_layer: self.writable_layer(&r.id, at).await,
            swap: None,
            io: None,
        }
    }

    pub async fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, Status> {
        let r = self.containers.find(id)?;
        let usage = self.task_usage(Some(&r.id)).await?;
        Ok(self.one_container_stats(&r, usage.get(&r.id)).await)
    }

    pub async fn list_container_stats(
        &self,
        filter: cri::ContainerStatsFilter,
    ) -> Result<Vec<cri::ContainerStats>, Status> {
        let usage = self.task_usage(None).await?;
        let mut out = Vec::new();
        for r in self.containers.list() {
            if (!filter.id.is_empty() && !r.id.starts_with(&filter.id))
                || (!filter.pod_sandbox_id.is_empty()
                    && !r.pod_id.starts_with(&filter.pod_sandbox_id))
                || !matches(&r.labels, &filter.label_selector)
            {
                continue;
            }
            out.push(self.one_container_stats(&r, usage.get(&r.id)).await);
        }
        Ok(out)
    }

    async fn pod_sample(&self, pod: sandbox::Record, usage: &HashMap<String, Usage>) -> PodSample {
        let at = super::now_nanos();
        let config = pod.pod_config();
        let parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let mut containers = Vec::new();
        let mut stats = Vec::new();
        for r in self.containers.of_pod(&pod.id) {
            let u = usage.get(&r.id).copied();
            stats.push(self.one_container_stats(&r, u.as_ref()).await);
            containers.push((r, u.unwrap_or_default()));
        }
        let pod_usage = if parent.is_empty() {
            sum(&containers.iter().map(|(_, u)| *u).collect::<Vec<_>>())
        } else {
            tokio::task::spawn_blocking(move || cgroup_usage(&parent))
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let interfaces = match pod.netns.clone() {
            Some(ns) => tokio::task::spawn_blocking(move || interfaces(&ns))
                .await
                .ok()
                .flatten()
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let iface = |i: &Interface| cri::NetworkInterfaceUsage {
            name: i.name.clone(),
            rx_bytes: u64v(i.rx_bytes),
            rx_errors: u64v(i.rx_errors),
            tx_bytes: u64v(i.tx_bytes),
            tx_errors: u64v(i.tx_errors),
        };
        let network = (!interfaces.is_empty()).then(|| cri::NetworkUsage {
            timestamp: at,
            default_interface: interfaces
                .iter()
                .find(|i| i.name == sandbox::POD_INTERFACE)
                .map(iface),
            interfaces: interfaces.iter().map(iface).collect(),
        });
        let stats = cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: pod.id.clone(),
                metadata: config.metadata.clone(),
                labels: pod.labels.clone().into_iter().collect(),
                annotations: pod.annotations.clone().into_iter().collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: cpu_usage(&self.stats, &pod_key(&pod.id), at, &pod_usage),
                memory: memory_usage(at, &pod_usage),
                network,
                process: pod_usage.processes.map(|n| cri::ProcessUsage {
                    timestamp: at,
                    process_count: u64v(n),
                }),
                containers: stats,
                io: None,
            }),
            windows: None,
        };
        PodSample {
            pod,
            stats,
            containers,
            interfaces,
            usage: pod_usage,
        }
    }

    pub async fn pod_stats(&self, id: &str) -> Result<cri::PodSandboxStats, Status> {
        let pod = self.sandboxes.get(id).map_err(crate::error::status)?;
        let usage = self.task_usage(None).await?;
        Ok(self.pod_sample(pod, &usage).await.stats)
    }

    async fn pod_samples(
        &self,
        filter: cri::PodSandboxStatsFilter,
    ) -> Result<Vec<PodSample>, Status> {
        let usage = self.task_usage(None).await?;
        let mut out = Vec::new();
        for pod in self.sandboxes.list() {
            if (!filter.id.is_empty() && !pod.id.starts_with(&filter.id))
                || !matches(&pod.labels, &filter.label_selector)
                || pod.state != sandbox::State::Ready
            {
                continue;
            }
            out.push(self.pod_sample(pod, &usage).await);
        }
        Ok(out)
    }

    pub async fn list_pod_stats(
        &self,
        filter: cri::PodSandboxStatsFilter,
    ) -> Result<Vec<cri::PodSandboxStats>, Status> {
        Ok(self
            .pod_samples(filter)
            .await?
            .into_iter()
            .map(|s| s.stats)
            .collect())
    }

    /// Every ready pod's metrics: the pod's own (its cgroup and network, `container` ""
    /// as cAdvisor labels a pod's cgroup) and each container's.
    pub async fn pod_metrics(&self) -> Result<Vec<cri::PodSandboxMetrics>, Status> {
        let samples = self
            .pod_samples(cri::PodSandboxStatsFilter::default())
            .await?;
        let at = super::now_nanos();
        Ok(samples
            .into_iter()
            .map(|s| {
                let pod_labels = Labels {
                    container: "",
                    id: &s.pod.id,
                    image: "",
                    name: &s.pod.id,
                    namespace: &s.pod.namespace,
                    pod: &s.pod.name,
                };
                let mut metrics = usage_metrics(&pod_labels, &s.usage, at);
                for i in &s.interfaces {
                    metrics.extend(network_metrics(&pod_labels, i, at));
                }
                let container_metrics = s
                    .containers
                    .iter()
                    .map(|(r, u)| cri::ContainerMetrics {
                        container_id: r.id.clone(),
                        metrics: usage_metrics(
                            &Labels {
                                container: &r.name,
                                id: &r.id,
                                image: &r.image,
                                name: &r.id,
                                namespace: &s.pod.namespace,
                                pod: &s.pod.name,
                            },
                            u,
                            at,
                        ),
                    })
                    .collect();
                cri::PodSandboxMetrics {
                    pod_sandbox_id: s.pod.id.clone(),
                    metrics,
                    container_metrics,
                }
            })
            .collect())
    }
}

/// cAdvisor's labels of a container's metrics, in [`LABEL_KEYS`] order.
struct Labels<'a> {
    container: &'a str,
    id: &'a str,
    image: &'a str,
    name: &'a str,
    namespace: &'a str,
    pod: &'a str,
}

impl Labels<'_> {
    fn values(&self) -> Vec<String> {
        [
            self.container,
            self.id,
            self.image,
            self.name,
            self.namespace,
            self.pod,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// The label keys cAdvisor gives a container's metrics (`id` and `name` are the container's
/// id here; cAdvisor's `id` is a cgroup path).
const LABEL_KEYS: [&str; 6] = ["container", "id", "image", "name", "namespace", "pod"];

const CPU_USAGE: &str = "container_cpu_usage_seconds_total";
const MEMORY_WORKING_SET: &str = "container_memory_working_set_bytes";
const MEMORY_USAGE: &str = "container_memory_usage_bytes";
const MEMORY_RSS: &str = "container_memory_rss";
const MEMORY_FAILURES: &str = "container_memory_failures_total";
const SPEC_MEMORY_LIMIT: &str = "container_spec_memory_limit_bytes";
const PROCESSES: &str = "container_processes";
const RX_BYTES: &str = "container_network_receive_bytes_total";
const RX_ERRORS: &str = "container_network_receive_errors_total";
const TX_BYTES: &str = "container_network_transmit_bytes_total";
const TX_ERRORS: &str = "container_network_transmit_errors_total";

/// The metrics served, with cAdvisor's help text; network ones add `interface`.
const DESCRIPTORS: &[(&str, &str, bool)] = &[
    (CPU_USAGE, "Cumulative cpu time consumed in seconds.", false),
    (MEMORY_WORKING_SET, "Current working set in bytes.", false),
    (
        MEMORY_USAGE,
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        false,
    ),
    (MEMORY_RSS, "Size of RSS in bytes.", false),
    (
        MEMORY_FAILURES,
        "Cumulative count of memory allocation failures.",
        false,
    ),
    (SPEC_MEMORY_LIMIT, "Memory limit for the container.", false),
    (
        PROCESSES,
        "Number of processes running inside the container.",
        false,
    ),
    (RX_BYTES, "Cumulative count of bytes received", true),
    (
        RX_ERRORS,
        "Cumulative count of errors encountered while receiving",
        true,
    ),
    (TX_BYTES, "Cumulative count of bytes transmitted", true),
    (
        TX_ERRORS,
        "Cumulative count of errors encountered while transmitting",
        true,
    ),
];

/// `ListMetricDescriptors`.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    DESCRIPTORS
        .iter()
        .map(|(name, help, network)| {
            let mut label_keys: Vec<String> = LABEL_KEYS.map(str::to_owned).to_vec();
            if *network {
                label_keys.push("interface".to_owned());
            }
            if *name == MEMORY_FAILURES {
                label_keys.extend(["failure_type", "scope"].map(str::to_owned));
            }
            cri::MetricDescriptor {
                name: (*name).to_owned(),
                help: (*help).to_owned(),
                label_keys,
            }
        })
        .collect()
}

fn metric(name: &str, labels: Vec<String>, value: u64, at: i64, counter: bool) -> cri::Metric {
    cri::Metric {
        name: name.to_owned(),
        timestamp: at,
        metric_type: if counter {
            cri::MetricType::Counter
        } else {
            cri::MetricType::Gauge
        } as i32,
        label_values: labels,
        value: u64v(value),
    }
}

/// CPU and memory metrics of one cgroup. `container_cpu_usage_seconds_total` carries
/// nanoseconds, as containerd's does (the value is an integer; kubelet scales it).
fn usage_metrics(l: &Labels<'_>, u: &Usage, at: i64) -> Vec<cri::Metric> {
    let mut out = Vec::new();
    if let Some(c) = u.cpu_ns {
        out.push(metric(CPU_USAGE, l.values(), c, at, true));
    }
    if let Some(m) = u.memory {
        out.push(metric(
            MEMORY_WORKING_SET,
            l.values(),
            m.working_set,
            at,
            false,
        ));
        out.push(metric(MEMORY_USAGE, l.values(), m.usage, at, false));
        out.push(metric(MEMORY_RSS, l.values(), m.rss, at, false));
        for (kind, v) in [
            ("pgfault", m.page_faults),
            ("pgmajfault", m.major_page_faults),
        ] {
            let mut labels = l.values();
            labels.extend([kind.to_owned(), "container".to_owned()]);
            out.push(metric(MEMORY_FAILURES, labels, v, at, true));
        }
        if m.limit != 0 && m.limit < UNLIMITED {
            out.push(metric(SPEC_MEMORY_LIMIT, l.values(), m.limit, at, false));
        }
    }
    if let Some(n) = u.processes {
        out.push(metric(PROCESSES, l.values(), n, at, false));
    }
    out
}

fn network_metrics(l: &Labels<'_>, i: &Interface, at: i64) -> Vec<cri::Metric> {
    [
        (RX_BYTES, i.rx_bytes),
        (RX_ERRORS, i.rx_errors),
        (TX_BYTES, i.tx_bytes),
        (TX_ERRORS, i.tx_errors),
    ]
    .into_iter()
    .map(|(name, v)| {
        let mut labels = l.values();
        labels.push(i.name.clone());
        metric(name, labels, v, at, true)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn v1_and_v2_metrics_decode() {
        let v1 = cgroups::v1::Metrics {
            cpu: Some(cgroups::v1::CpuStat {
                usage: Some(cgroups::v1::CpuUsage {
                    total: 5_000,
                    ..Default::default()
                }),
            }),
            memory: Some(cgroups::v1::MemoryStat {
                total_rss: 300,
                total_inactive_file: 100,
                total_pg_fault: 7,
                total_pg_maj_fault: 1,
                usage: Some(cgroups::v1::MemoryEntry {
                    usage: 1000,
                    limit: u64::MAX,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let u = decode(&prost_types::Any {
            type_url: cgroups::V1_METRICS.into(),
            value: v1.encode_to_vec(),
        })
        .unwrap();
        assert_eq!(u.cpu_ns, Some(5_000));
        let m = u.memory.unwrap();
        assert_eq!(
            (m.usage, m.working_set, m.rss, m.page_faults),
            (1000, 900, 300, 7)
        );
        assert!(memory_usage(1, &u).unwrap().available_bytes.is_none());

        let v2 = cgroups::v2::Metrics {
            cpu: Some(cgroups::v2::CpuStat {
                usage_usec: 3,
                ..Default::default()
            }),
            memory: Some(cgroups::v2::MemoryStat {
                usage: 50,
                inactive_file: 80,
                anon: 20,
                usage_limit: 100,
                ..Default::default()
            }),
        };
        let u = decode(&prost_types::Any {
            type_url: format!("types.example/{}", cgroups::V2_METRICS),
            value: v2.encode_to_vec(),
        })
        .unwrap();
        assert_eq!(u.cpu_ns, Some(3_000));
        let m = u.memory.unwrap();
        assert_eq!((m.working_set, m.rss), (0, 20), "never below zero");
        assert_eq!(
            memory_usage(1, &u).unwrap().available_bytes,
            Some(cri::UInt64Value { value: 100 })
        );
        assert!(
            decode(&prost_types::Any {
                type_url: "other".into(),
                value: Vec::new()
            })
            .is_none()
        );
    }

    #[test]
    fn nano_cores_from_the_previous_sample() {
        let s = Samples::default();
        assert_eq!(s.nano_cores("c/a", 1_000_000_000, 0), None, "first sample");
        // Half a core over a second.
        assert_eq!(
            s.nano_cores("c/a", 2_000_000_000, 500_000_000),
            Some(500_000_000)
        );
        // Not newer: no rate, and the sample kept.
        assert_eq!(s.nano_cores("c/a", 2_000_000_000, 600_000_000), None);
        // A counter that went back (a new cgroup): no rate.
        assert_eq!(s.nano_cores("c/a", 3_000_000_000, 10), None);
        s.forget("c/a");
        s.set_layer_usage("c/a", (10, 2));
        assert_eq!(s.layer_usage("c/a"), Some((10, 2)), "served within the TTL");
        s.forget("c/a");
        assert_eq!(s.layer_usage("c/a"), None);
        assert_eq!(s.nano_cores("c/a", 4_000_000_000, 20), None);
    }

    #[test]
    fn net_dev_lines() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
eth0:    2048      10    1    0    0     0          0         0     4096      20    2    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(text),
            vec![Interface {
                name: "eth0".into(),
                rx_bytes: 2048,
                rx_errors: 1,
                tx_bytes: 4096,
                tx_errors: 2,
            }]
        );
    }

    #[test]
    fn net_dev_interfaces_are_capped() {
        let mut text = String::from("h1\nh2\n");
        for i in 0..1000 {
            text.push_str(&format!("d{i}: 1 0 0 0 0 0 0 0 1 0 0 0 0 0 0 0\n"));
        }
        let got = parse_net_dev(&text);
        assert_eq!(got.len(), MAX_INTERFACES);
        assert_eq!(got[0].name, "d0");
    }

    #[test]
    fn every_descriptor_is_named_once() {
        let d = descriptors();
        let mut names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), d.len());
        let labels = Labels {
            container: "c",
            id: "i",
            image: "im",
            name: "n",
            namespace: "ns",
            pod: "p",
        };
        let u = Usage {
            cpu_ns: Some(1),
            memory: Some(Memory {
                limit: 10,
                ..Default::default()
            }),
            processes: Some(2),
        };
        let mut all = usage_metrics(&labels, &u, 0);
        all.extend(network_metrics(&labels, &Interface::default(), 0));
        for m in all {
            let desc = d.iter().find(|d| d.name == m.name).unwrap();
            assert_eq!(desc.label_keys.len(), m.label_values.len(), "{}", m.name);
        }
    }
}
