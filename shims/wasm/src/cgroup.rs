//! Where the worker's CPU is accounted: the worker runs in the cgroup of the oldest live task
//! of the shim that names one (`linux.cgroupsPath`, a cgroupfs path), with that task's
//! `linux.resources.cpu` applied, so a shim's guests, a group's included, are bounded by it.
//! When that task goes, the worker moves to the next such task's cgroup, or back to the shim's
//! own, and the cgroup it left is removed. Memory is not limited here: a task's memory limit
//! applies to its linear memory (`runtime.rs`), and the worker's own memory is shared.
//!
//! A task with CPU limits gets the worker at its Create, so the limits bound it from its first
//! instruction. One without is accounted to its cgroup once it has lived [`ACCOUNT_AFTER`]: a
//! move into a cgroup can wait out an RCU grace period (`cgroup.procs` takes the kernel's
//! global threadgroup lock for writing: 10-15 ms on a quiet cgroup v1 host), which a short
//! task would otherwise pay twice, at its Create and its Delete, for a worker it uses for a
//! millisecond. Until then its CPU is the shim's, as a joiner's always is.
//!
//! The kit's `cgroup` module does the cgroup work.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcgroups::common::{AnyCgroupManager, CgroupManager, ControllerOpt};
use oci_spec::runtime::{LinuxCpu, LinuxResourcesBuilder};
use yard_shim_kit::cgroup::{holds, join, join_own, remove_managed, usable};
use yard_shim_kit::{Error, Result};

use crate::policy::{CpuHome, asks_for_cpu};

/// How long a task without CPU limits runs before the worker moves into its cgroup (see the
/// module docs).
pub const ACCOUNT_AFTER: Duration = Duration::from_millis(25);

struct Member {
    task: String,
    path: Option<PathBuf>,
    /// CPU settings that ask for something (`policy::asks_for_cpu`).
    cpu: Option<LinuxCpu>,
    since: Instant,
}

impl Member {
    /// Whether the worker may move into this task's cgroup at `now`.
    fn due(&self, now: Instant) -> bool {
        self.cpu.is_some() || now.saturating_duration_since(self.since) >= ACCOUNT_AFTER
    }
}

/// The cgroup that holds the worker: its task's, kept with its manager for the cgroup's
/// removal (opening another reads the host's mounts again on cgroup v1).
struct Current {
    task: String,
    path: PathBuf,
    manager: AnyCgroupManager,
}

impl Current {
    fn remove(self) {
        remove_managed(&self.manager, &self.path);
    }

    /// Removes the cgroup `worker` has left. One it is still in, in any hierarchy (a move out
    /// that failed), is left and logged: removing it kills what is in it, the worker and with
    /// it every task of the shim.
    fn leave(self, worker: u32) {
        if holds(&self.path, worker) {
            tracing::warn!(
                path = %self.path.display(),
                "cgroup left behind: the wasm worker could not leave it"
            );
            return;
        }
        self.remove();
    }
}

/// The cgroups of one worker's tasks, and which one holds the worker.
#[derive(Default)]
pub struct Placement {
    members: Vec<Member>,
    /// The task whose cgroup holds the worker, and that cgroup.
    current: Option<Current>,
}

impl Placement {
    /// Where a new task's CPU would be accounted.
    pub fn home(&self, path: Option<&Path>) -> CpuHome {
        if usable(path).is_none() {
            CpuHome::NoCgroup
        } else if self.members.iter().any(|m| m.path.is_some()) {
            CpuHome::Joiner
        } else {
            CpuHome::Owner
        }
    }

    /// A new task, with its spec's CPU settings. True when the worker's move into its cgroup
    /// waits for [`ACCOUNT_AFTER`] (settings that ask for nothing are no limits): the caller
    /// places the worker again then.
    pub fn add(&mut self, task: &str, path: Option<&Path>, cpu: Option<LinuxCpu>) -> bool {
        let m = Member {
            task: task.to_owned(),
            path: usable(path),
            cpu: cpu.filter(asks_for_cpu),
            since: Instant::now(),
        };
        let deferred = m.path.is_some() && !m.due(m.since);
        self.members.push(m);
        deferred
    }

    pub fn remove(&mut self, task: &str) {
        self.members.retain(|m| m.task != task);
    }

    /// The task whose cgroup should hold the worker at `now`: the oldest with a cgroup, once it
    /// is due. Until then the worker stays in the shim's own.
    fn owner(&self, now: Instant) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.path.is_some())
            .filter(|m| m.due(now))
    }

    /// Move worker `pid` where it belongs now (see the module docs); the cgroup it leaves is
    /// removed.
    pub fn place(&mut self, worker: u32) -> Result<()> {
        let want = self.owner(Instant::now()).map(|m| {
            (
                m.task.clone(),
                m.path.clone().unwrap_or_default(),
                m.cpu.clone(),
            )
        });
        if want.as_ref().map(|(t, p, _)| (t, p))
            == self.current.as_ref().map(|c| (&c.task, &c.path))
        {
            return Ok(());
        }
        match want {
            Some((task, path, cpu)) => {
                let m = join(&path, &task, worker, "the wasm worker")?;
                let applied = cpu.map_or(Ok(()), |cpu| apply_cpu(&m, &path, cpu));
                // The worker is in this cgroup now, limit or not: it is recorded, so that it is
                // removed when the worker leaves it (a refused limit fails only its task).
                let old = self.current.replace(Current {
                    task,
                    path,
                    manager: m,
                });
                if let Some(old) = old {
                    old.leave(worker);
                }
                applied?;
            }
            None => {
                join_own(worker)?;
                if let Some(old) = self.current.take() {
                    old.leave(worker);
                }
            }
        }
        Ok(())
    }

    /// The worker is gone: remove the cgroup it was in.
    pub fn clear(&mut self) {
        if let Some(old) = self.current.take() {
            old.remove();
        }
    }
}

/// Applies a task's `linux.resources.cpu` to the cgroup `m` manages (at `path`).
fn apply_cpu(m: &AnyCgroupManager, path: &Path, cpu: LinuxCpu) -> Result<()> {
    let resources = LinuxResourcesBuilder::default()
        .cpu(cpu)
        .build()
        .map_err(|e| Error::Internal(format!("linux.resources.cpu: {e}")))?;
    m.apply(&ControllerOpt {
        resources: &resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })
    .map_err(|e| {
        Error::Internal(format!(
            "linux.cgroupsPath {}: apply linux.resources.cpu: {e}",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_task_with_a_cgroup_owns_the_worker() {
        let mut p = Placement::default();
        assert_eq!(p.home(None), CpuHome::NoCgroup);
        assert_eq!(
            p.home(Some(Path::new("kubepods.slice:cri:x"))),
            CpuHome::NoCgroup
        );
        assert_eq!(p.home(Some(Path::new("/a/t1"))), CpuHome::Owner);
        assert!(!p.add("t0", None, None));
        assert_eq!(p.home(Some(Path::new("/a/t1"))), CpuHome::Owner);
        assert!(p.add("t1", Some(Path::new("/a/t1")), None));
        assert_eq!(p.home(Some(Path::new("/a/t2"))), CpuHome::Joiner);
        p.remove("t1");
        assert_eq!(p.home(Some(Path::new("/a/t2"))), CpuHome::Owner);
    }

    /// A task with CPU limits owns the worker from its Create; one without once it has lived
    /// `ACCOUNT_AFTER`, and until then no younger task takes the worker in its place.
    #[test]
    fn a_task_without_cpu_limits_owns_the_worker_once_it_is_due() {
        let owner = |p: &Placement, at: Instant| p.owner(at).map(|m| m.task.clone());
        let mut p = Placement::default();
        let limited = LinuxCpu::default().set_quota(Some(50_000)).clone();
        assert!(!p.add("limited", Some(Path::new("/a/l")), Some(limited)));
        assert_eq!(owner(&p, Instant::now()), Some("limited".to_owned()));
        p.remove("limited");
        // containerd's default weight (1024) is no limit.
        let default_weight = LinuxCpu::default().set_shares(Some(1024)).clone();
        assert!(p.add("weight", Some(Path::new("/a/w")), Some(default_weight)));
        p.remove("weight");

        assert!(p.add("t1", Some(Path::new("/a/t1")), None));
        let t1 = p.members[0].since;
        assert!(p.add("t2", Some(Path::new("/a/t2")), None));
        assert_eq!(owner(&p, t1), None);
        assert_eq!(owner(&p, t1 + ACCOUNT_AFTER / 2), None);
        assert_eq!(owner(&p, t1 + ACCOUNT_AFTER), Some("t1".to_owned()));
        p.remove("t1");
        let t2 = p.members[0].since;
        assert_eq!(owner(&p, t2), None);
        assert_eq!(owner(&p, t2 + ACCOUNT_AFTER), Some("t2".to_owned()));
    }

    /// A cgroup the worker did not leave is not removed (which would kill the worker); one it
    /// left is. A `sleep` stands in for the worker.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_cgroup_is_removed_only_once_the_worker_has_left_it() {
        if !switchyard_base::gate::require(switchyard_base::gate::is_root(), "needs root") {
            return;
        }
        let path = PathBuf::from(format!("/yard-wasm-test-{}", std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let worker = child.id();
        let current = || Current {
            task: "t".to_owned(),
            path: path.clone(),
            manager: join(&path, "t", worker, "the test's worker").unwrap(),
        };
        current().leave(worker);
        let alive = child.try_wait().unwrap().is_none();
        let kept = holds(&path, worker);
        if !(alive && kept) {
            let _ = child.kill();
            let _ = child.wait();
            yard_shim_kit::cgroup::remove(&path, "t");
        }
        assert!(
            alive,
            "the worker was killed with the cgroup it had not left"
        );
        assert!(kept, "the worker is no longer in {}", path.display());
        let after = current();
        join_own(worker).unwrap();
        after.leave(worker);
        let name = path.strip_prefix("/").unwrap();
        let left: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path().join(name)))
            .chain([Path::new("/sys/fs/cgroup").join(name)])
            .filter(|d| d.is_dir())
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        if !left.is_empty() {
            yard_shim_kit::cgroup::remove(&path, "t");
        }
        assert!(left.is_empty(), "not removed: {left:?}");
    }
}
