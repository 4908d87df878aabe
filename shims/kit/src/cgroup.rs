//! A shim's own processes in a container's host cgroup: the wasm shim's worker in its tasks'
//! cgroup, a VM's VMM in its sandbox's (as Kata's `sandbox_cgroup_only`), so what they use is
//! accounted where the container's (and the pod's) usage is read. Only cgroupfs paths:
//! systemd's `slice:prefix:name` form needs systemd's D-Bus API, which shims do not speak.
//!
//! youki's libcgroups does the cgroup work (v1 or v2, picked from the host).

use std::path::{Path, PathBuf};

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager};

use crate::{Error, Result};

/// A cgroupfs path the shim can create, or none.
pub fn usable(path: Option<&Path>) -> Option<PathBuf> {
    path.filter(|p| p.is_absolute() && !p.to_string_lossy().contains(':'))
        .map(Path::to_path_buf)
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("linux.cgroupsPath {}: {what}: {e}", path.display()))
}

fn pid(p: u32) -> nix029::unistd::Pid {
    nix029::unistd::Pid::from_raw(i32::try_from(p).unwrap_or(i32::MAX))
}

/// The cgroup at `path` (made where missing), for container `name`.
pub fn manager(path: &Path, name: &str) -> Result<AnyCgroupManager> {
    libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_owned(),
        systemd_cgroup: false,
        container_name: name.to_owned(),
    })
    .map_err(|e| err(path, "open", e))
}

/// Moves process `p` into the cgroup at `path` (made where missing), in every hierarchy.
pub fn join(path: &Path, name: &str, p: u32, what: &str) -> Result<AnyCgroupManager> {
    let m = manager(path, name)?;
    m.add_task(pid(p))
        .map_err(|e| err(path, &format!("move {what} into it"), e))?;
    Ok(m)
}

/// Removes a cgroup its processes have left (or that outlived them); what cannot be removed is
/// logged, not an error.
pub fn remove(path: &Path, name: &str) {
    let r = manager(path, name).and_then(|m| m.remove().map_err(|e| err(path, "remove", e)));
    if let Err(e) = r {
        tracing::warn!(error = %e, "cgroup left behind");
    }
}

/// After a dead shim: removes the cgroup its process joined for the container of `bundle`
/// (`linux.cgroupsPath` of its `config.json`), if the spec names a usable one.
pub fn remove_for_bundle(bundle: &Path, name: &str) {
    let cgroup = crate::bundle::read_spec(bundle).ok().and_then(|(spec, _)| {
        spec.linux()
            .as_ref()
            .and_then(|l| usable(l.cgroups_path().as_deref()))
    });
    if let Some(path) = cgroup {
        remove(&path, name);
    }
}

/// Put `pid` back into this process's own cgroups (every hierarchy of `/proc/self/cgroup`).
pub fn join_own(pid: u32) -> Result<()> {
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
}
