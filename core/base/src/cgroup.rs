//! This process's own cgroups, and the kernel lock every cgroup migration takes.

use std::path::PathBuf;

/// The `cgroup.procs` of this process's own cgroup in every hierarchy it is in (from
/// `/proc/self/cgroup` and `/proc/self/mountinfo`).
pub fn own_procs_files() -> std::io::Result<Vec<PathBuf>> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(own
        .lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
                return None;
            };
            let mount = mount_of(&mounts, controllers)?;
            Some(
                mount
                    .join(path.trim_start_matches('/'))
                    .join("cgroup.procs"),
            )
        })
        .collect())
}

/// Pays, off the create path, the wait that a container's first cgroup migration would
/// otherwise pay on it; blocks for that wait, so callers run it on a thread of its own. Writing
/// a pid into `cgroup.procs` takes the kernel's one global `cgroup_threadgroup_rwsem` for
/// writing, and the first writer after a quiet spell waits out an RCU grace period first (9-16
/// ms of a 30 ms native run measured on this machine's cgroup v1; kernels with cgroup v2's
/// `favordynmods` do not wait). A no-op migration of this process into the cgroup it is already
/// in starts that wait while the runtime starts, so the container's own migration a few
/// milliseconds later finds it (nearly) over. The kernel holds its cgroup mutex through that
/// wait, so only a caller about to migrate a process should do this (a runc-class container, a
/// Wasm task's worker): other cgroup work (a VM task's) would wait for it instead. Best
/// effort: nothing changes whether it works.
pub fn prewarm_migration() {
    if let Some(procs) = prewarm_procs_file() {
        let _ = std::fs::write(&procs, std::process::id().to_string());
    }
}

/// The `cgroup.procs` file [`prewarm_migration`] writes to: this process's own cgroup in the
/// first hierarchy `/proc/self/cgroup` lists (the wait is for a lock all hierarchies share).
pub fn prewarm_procs_file() -> Option<PathBuf> {
    own_procs_files().ok().and_then(|f| f.into_iter().next())
}

/// The mount point of the hierarchy with these controllers (`cpu,cpuacct`, `name=systemd`, or
/// empty for cgroup v2).
pub fn mount_of(mountinfo: &str, controllers: &str) -> Option<PathBuf> {
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
