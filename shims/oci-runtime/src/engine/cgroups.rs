//! What needs no fork: signals to every process, freeze/thaw, resource updates, metrics and OOM
//! notification, straight through the container's cgroup (youki's libcgroups picks the v1 or v2
//! driver from the host).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use libcgroups::common::{
    AnyCgroupManager, CgroupConfig, CgroupManager, CgroupSetup, ControllerOpt, FreezerState,
};
use libcgroups::stats::Stats;
use oci_spec::runtime::LinuxResources;
use rustix::process::{Pid, PidfdFlags, Signal};
use yard_shim_kit::protos::cgroups::metrics as v1;
use yard_shim_kit::protos::cgroups_v2::metrics as v2;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::protos::protobuf::{Message, MessageField};
use yard_shim_kit::{Error, Publisher};

use super::oom::OomWatch;

const ROOT: &str = "/sys/fs/cgroup";

fn err(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |e| Error::Internal(format!("cgroup {what}: {e}"))
}

pub fn unified() -> bool {
    matches!(
        libcgroups::common::get_cgroup_setup(),
        Ok(CgroupSetup::Unified)
    )
}

#[derive(Clone)]
pub struct Cgroup {
    path: PathBuf,
    id: String,
}

impl Cgroup {
    pub fn new(path: PathBuf, id: &str) -> Cgroup {
        Cgroup {
            path,
            id: id.to_owned(),
        }
    }

    fn manager(&self) -> Result<AnyCgroupManager, Error> {
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| err("open")(e.to_string()))
    }

    pub fn pids(&self) -> Result<Vec<u32>, Error> {
        let pids = self
            .manager()?
            .get_all_pids()
            .map_err(|e| err("list processes")(e.to_string()))?;
        Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
    }

    /// Signal every process in the cgroup, by pidfd. A listed process may exit, and its pid be
    /// reused outside the container, before the signal: so each is pinned with a pidfd first,
    /// and signalled only if its pid is still listed afterwards. A pid still listed is still the
    /// pinned process (or that process has died since, and its pidfd signals nobody).
    pub fn kill_all(&self, signal: u32) -> Result<(), Error> {
        let sig = to_signal(signal)?;
        let pinned: Vec<(u32, OwnedFd)> = self
            .pids()?
            .into_iter()
            .filter_map(|pid| pidfd(pid).map(|fd| (pid, fd)))
            .collect();
        let listed: HashSet<u32> = self.pids()?.into_iter().collect();
        for (pid, fd) in pinned {
            if listed.contains(&pid) {
                // A process may exit between the listing and the signal.
                let _ = rustix::process::pidfd_send_signal(&fd, sig);
            }
        }
        Ok(())
    }

    /// Remove the (empty) cgroup from every hierarchy.
    pub fn remove(&self) -> Result<(), Error> {
        self.manager()?
            .remove()
            .map_err(|e| err("remove")(e.to_string()))
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), Error> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.manager()?
            .freeze(state)
            .map_err(|e| err(if frozen { "freeze" } else { "thaw" })(e.to_string()))
    }

    pub fn update(&self, resources_json: &[u8]) -> Result<(), Error> {
        let de = &mut serde_json::Deserializer::from_slice(resources_json);
        let resources: LinuxResources = serde_path_to_error::deserialize(de).map_err(|e| {
            Error::InvalidArgument(format!("resources: {}: {}", e.path(), e.inner()))
        })?;
        let opt = ControllerOpt {
            resources: &resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        self.manager()?
            .apply(&opt)
            .map_err(|e| err("update")(e.to_string()))
    }

    pub fn stats(&self) -> Result<Any, Error> {
        let stats = self
            .manager()?
            .stats()
            .map_err(|e| err("stats")(e.to_string()))?;
        let (type_url, bytes) = if unified() {
            (
                "io.containerd.cgroups.v2.Metrics",
                metrics_v2(&stats).write_to_bytes(),
            )
        } else {
            (
                "io.containerd.cgroups.v1.Metrics",
                metrics_v1(&stats).write_to_bytes(),
            )
        };
        Ok(Any {
            type_url: type_url.to_owned(),
            value: bytes.map_err(|e| Error::Internal(format!("encode metrics: {e}")))?,
            ..Default::default()
        })
    }

    /// The memory controller's directory for this cgroup.
    fn memory_dir(&self) -> PathBuf {
        let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
        if unified() {
            Path::new(ROOT).join(rel)
        } else {
            Path::new(ROOT).join("memory").join(rel)
        }
    }

    /// Publish a TaskOOM event for each kill of the kernel's OOM killer in this cgroup, until
    /// it is gone.
    pub fn watch_oom(&self, publisher: Publisher) -> Result<OomWatch, Error> {
        OomWatch::start(self.memory_dir(), unified(), self.id.clone(), publisher)
    }
}

pub fn to_signal(signal: u32) -> Result<Signal, Error> {
    i32::try_from(signal)
        .ok()
        .and_then(Signal::from_named_raw)
        .ok_or_else(|| Error::InvalidArgument(format!("signal: {signal} is not a valid signal")))
}

/// A pidfd for `pid`, if it names a live (or unreaped) process.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
}

fn stat(map: &HashMap<String, u64>, key: &str) -> u64 {
    map.get(key).copied().unwrap_or(0)
}

fn entry(d: &libcgroups::stats::MemoryData) -> MessageField<v1::MemoryEntry> {
    MessageField::some(v1::MemoryEntry {
        limit: d.limit,
        usage: d.usage,
        max: d.max_usage,
        failcnt: d.fail_count,
        ..Default::default()
    })
}

fn metrics_v1(s: &Stats) -> v1::Metrics {
    let m = &s.memory.stats;
    v1::Metrics {
        pids: MessageField::some(v1::PidsStat {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: s.cpu.usage.usage_total,
                kernel: s.cpu.usage.usage_kernel,
                user: s.cpu.usage.usage_user,
                per_cpu: s.cpu.usage.per_core_usage_total.clone(),
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                periods: s.cpu.throttling.periods,
                throttled_periods: s.cpu.throttling.throttled_periods,
                throttled_time: s.cpu.throttling.throttled_time,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(v1::MemoryStat {
            cache: stat(m, "cache"),
            rss: stat(m, "rss"),
            rss_huge: stat(m, "rss_huge"),
            mapped_file: stat(m, "mapped_file"),
            dirty: stat(m, "dirty"),
            writeback: stat(m, "writeback"),
            pg_pg_in: stat(m, "pgpgin"),
            pg_pg_out: stat(m, "pgpgout"),
            pg_fault: stat(m, "pgfault"),
            pg_maj_fault: stat(m, "pgmajfault"),
            inactive_anon: stat(m, "inactive_anon"),
            active_anon: stat(m, "active_anon"),
            inactive_file: stat(m, "inactive_file"),
            active_file: stat(m, "active_file"),
            unevictable: stat(m, "unevictable"),
            hierarchical_memory_limit: stat(m, "hierarchical_memory_limit"),
            hierarchical_swap_limit: stat(m, "hierarchical_memsw_limit"),
            total_cache: stat(m, "total_cache"),
            total_rss: stat(m, "total_rss"),
            total_rss_huge: stat(m, "total_rss_huge"),
            total_mapped_file: stat(m, "total_mapped_file"),
            total_dirty: stat(m, "total_dirty"),
            total_writeback: stat(m, "total_writeback"),
            total_pg_pg_in: stat(m, "total_pgpgin"),
            total_pg_pg_out: stat(m, "total_pgpgout"),
            total_pg_fault: stat(m, "total_pgfault"),
            total_pg_maj_fault: stat(m, "total_pgmajfault"),
            total_inactive_anon: stat(m, "total_inactive_anon"),
            total_active_anon: stat(m, "total_active_anon"),
            total_inactive_file: stat(m, "total_inactive_file"),
            total_active_file: stat(m, "total_active_file"),
            total_unevictable: stat(m, "total_unevictable"),
            usage: entry(&s.memory.memory),
            swap: entry(&s.memory.memswap),
            kernel: entry(&s.memory.kernel),
            kernel_tcp: entry(&s.memory.kernel_tcp),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn metrics_v2(s: &Stats) -> v2::Metrics {
    let m = &s.memory.stats;
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            // libcgroups reports nanoseconds; containerd's v2 metrics are microseconds.
            usage_usec: s.cpu.usage.usage_total / 1000,
            user_usec: s.cpu.usage.usage_user / 1000,
            system_usec: s.cpu.usage.usage_kernel / 1000,
            nr_periods: s.cpu.throttling.periods,
            nr_throttled: s.cpu.throttling.throttled_periods,
            throttled_usec: s.cpu.throttling.throttled_time / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: stat(m, "anon"),
            file: stat(m, "file"),
            kernel_stack: stat(m, "kernel_stack"),
            slab: stat(m, "slab"),
            sock: stat(m, "sock"),
            shmem: stat(m, "shmem"),
            file_mapped: stat(m, "file_mapped"),
            file_dirty: stat(m, "file_dirty"),
            file_writeback: stat(m, "file_writeback"),
            anon_thp: stat(m, "anon_thp"),
            inactive_anon: stat(m, "inactive_anon"),
            active_anon: stat(m, "active_anon"),
            inactive_file: stat(m, "inactive_file"),
            active_file: stat(m, "active_file"),
            unevictable: stat(m, "unevictable"),
            slab_reclaimable: stat(m, "slab_reclaimable"),
            slab_unreclaimable: stat(m, "slab_unreclaimable"),
            pgfault: stat(m, "pgfault"),
            pgmajfault: stat(m, "pgmajfault"),
            usage: s.memory.memory.usage,
            usage_limit: s.memory.memory.limit,
            max_usage: s.memory.memory.max_usage,
            swap_usage: s.memory.memswap.usage,
            swap_limit: s.memory.memswap.limit,
            ..Default::default()
        }),
        ..Default::default()
    }
}
