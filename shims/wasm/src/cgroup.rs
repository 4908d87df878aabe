//! Where the worker's CPU is accounted: the worker runs in the cgroup of the oldest live task
//! of the shim that names one (`linux.cgroupsPath`, a cgroupfs path), with that task's
//! `linux.resources.cpu` applied, so a shim's guests, a group's included, are bounded by it.
//! When that task goes, the worker moves to the next such task's cgroup, or back to the shim's
//! own, and the cgroup it left is removed. Memory is not limited here: a task's memory limit
//! applies to its linear memory (`runtime.rs`), and the worker's own memory is shared.
//!
//! youki's libcgroups does the cgroup work (v1 or v2, picked from the host).

use std::path::{Path, PathBuf};

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use oci_spec::runtime::{LinuxCpu, LinuxResourcesBuilder};
use yard_shim_kit::{Error, Result};

use crate::policy::CpuHome;

struct Member {
    task: String,
    path: Option<PathBuf>,
    cpu: Option<LinuxCpu>,
}

/// The cgroups of one worker's tasks, and which one holds the worker.
#[derive(Default)]
pub struct Placement {
    members: Vec<Member>,
    /// The task whose cgroup holds the worker, and that cgroup.
    current: Option<(String, PathBuf)>,
}

/// A cgroupfs path the shim can create, or none (systemd's `slice:prefix:name` form needs
/// systemd's D-Bus API, which the shim does not speak).
pub fn usable(path: Option<&Path>) -> Option<PathBuf> {
    path.filter(|p| p.is_absolute() && !p.to_string_lossy().contains(':'))
        .map(Path::to_path_buf)
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

    pub fn add(&mut self, task: &str, path: Option<&Path>, cpu: Option<LinuxCpu>) {
        self.members.push(Member {
            task: task.to_owned(),
            path: usable(path),
            cpu,
        });
    }

    pub fn remove(&mut self, task: &str) {
        self.members.retain(|m| m.task != task);
    }

    /// Move worker `pid` where it belongs now (see the module docs); the cgroup it leaves is
    /// removed.
    pub fn place(&mut self, worker: u32) -> Result<()> {
        let want = self.members.iter().find(|m| m.path.is_some()).map(|m| {
            (
                m.task.clone(),
                m.path.clone().unwrap_or_default(),
                m.cpu.clone(),
            )
        });
        if want.as_ref().map(|(t, p, _)| (t, p)) == self.current.as_ref().map(|(t, p)| (t, p)) {
            return Ok(());
        }
        match want {
            Some((task, path, cpu)) => {
                let m = manager(&path, &task)?;
                m.add_task(pid(worker))
                    .map_err(|e| err(&path, "move the wasm worker into it", e))?;
                if let Some(cpu) = cpu {
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
                    .map_err(|e| err(&path, "apply linux.resources.cpu", e))?;
                }
                let old = self.current.replace((task, path));
                if let Some((task, path)) = old {
                    remove(&path, &task);
                }
            }
            None => {
                join_own(worker)?;
                if let Some((task, path)) = self.current.take() {
                    remove(&path, &task);
                }
            }
        }
        Ok(())
    }

    /// The worker is gone: remove the cgroup it was in.
    pub fn clear(&mut self) {
        if let Some((task, path)) = self.current.take() {
            remove(&path, &task);
        }
    }
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("linux.cgroupsPath {}: {what}: {e}", path.display()))
}

fn pid(p: u32) -> nix029::unistd::Pid {
    nix029::unistd::Pid::from_raw(i32::try_from(p).unwrap_or(i32::MAX))
}

fn manager(path: &Path, task: &str) -> Result<AnyCgroupManager> {
    libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_owned(),
        systemd_cgroup: false,
        container_name: task.to_owned(),
    })
    .map_err(|e| err(path, "open", e))
}

/// Remove a cgroup the worker has left (or that outlived it).
pub fn remove(path: &Path, task: &str) {
    let r = manager(path, task).and_then(|m| m.remove().map_err(|e| err(path, "remove", e)));
    if let Err(e) = r {
        tracing::warn!(error = %e, "cgroup left behind");
    }
}

/// Put `pid` back into this process's own cgroups (every hierarchy of `/proc/self/cgroup`).
fn join_own(pid: u32) -> Result<()> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(Error::io("read /proc/self/cgroup"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read /proc/self/mountinfo"))?;
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some(mount) = mount_of(&mounts, controllers) else {
            continue;
        };
        let procs = mount
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, pid.to_string()) {
            tracing::debug!(path = %procs.display(), error = %e, "cgroup not joined");
        }
    }
    Ok(())
}

/// The mount point of the hierarchy with these controllers (`cpu,cpuacct`, `name=systemd`, or
/// empty for cgroup v2).
fn mount_of(mountinfo: &str, controllers: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let options = post.nth(1).unwrap_or("");
        let point = pre.split_whitespace().nth(4)?;
        let wanted = if controllers.is_empty() {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup"
                && controllers
                    .split(',')
                    .all(|c| options.split(',').any(|o| o == c))
        };
        wanted.then(|| PathBuf::from(point))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    #[test]
    fn hierarchies_are_found_by_their_controllers() {
        let m = |c| mount_of(MOUNTINFO, c).map(|p| p.display().to_string());
        assert_eq!(
            m("cpu,cpuacct").as_deref(),
            Some("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(m("memory").as_deref(), Some("/sys/fs/cgroup/memory"));
        assert_eq!(m("name=systemd").as_deref(), Some("/sys/fs/cgroup/systemd"));
        assert_eq!(m("").as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(m("pids"), None);
    }

    #[test]
    fn the_oldest_task_with_a_cgroup_owns_the_worker() {
        let mut p = Placement::default();
        assert_eq!(p.home(None), CpuHome::NoCgroup);
        assert_eq!(
            p.home(Some(Path::new("kubepods.slice:cri:x"))),
            CpuHome::NoCgroup
        );
        assert_eq!(p.home(Some(Path::new("/a/t1"))), CpuHome::Owner);
        p.add("t0", None, None);
        assert_eq!(p.home(Some(Path::new("/a/t1"))), CpuHome::Owner);
        p.add("t1", Some(Path::new("/a/t1")), None);
        assert_eq!(p.home(Some(Path::new("/a/t2"))), CpuHome::Joiner);
        p.remove("t1");
        assert_eq!(p.home(Some(Path::new("/a/t2"))), CpuHome::Owner);
    }
}
