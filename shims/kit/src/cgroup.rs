//! A shim's own processes in a container's host cgroup: the wasm shim's worker in its tasks'
//! cgroup, a VM's VMM in its sandbox's (as Kata's `sandbox_cgroup_only`), so what they use is
//! accounted where the container's (and the pod's) usage is read. Only cgroupfs paths:
//! systemd's `slice:prefix:name` form needs systemd's D-Bus API, which shims do not speak.
//!
//! youki's libcgroups does the cgroup work (v1 or v2, picked from the host).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    match manager(path, name) {
        Ok(m) => remove_managed(&m, path),
        Err(e) => tracing::warn!(error = %e, "cgroup left behind"),
    }
}

/// How long a removal waits for the processes it killed to be gone: a worker or VMM that died
/// with its shim (`PR_SET_PDEATHSIG`) may still be exiting when `<shim> delete` runs, and on a
/// busy host its exit can take longer than the 0.1 s libcgroups' removal retries for.
const REMOVE_WITHIN: Duration = Duration::from_secs(5);

/// How often a removal looks whether the cgroup has emptied.
const REMOVE_POLL: Duration = Duration::from_millis(10);

/// [`remove`] with the cgroup's manager at hand: opening one reads the host's mounts and the
/// process's cgroups on cgroup v1 (0.3 ms here). libcgroups kills what is left in the cgroup;
/// should that still be exiting when its retries end, the removal is tried once more when the
/// cgroup has emptied (within [`REMOVE_WITHIN`]).
pub fn remove_managed(m: &AnyCgroupManager, path: &Path) {
    let Err(first) = m.remove() else {
        return;
    };
    tracing::debug!(error = %err(path, "remove", first), "cgroup not removed yet: waiting for its processes");
    let deadline = Instant::now() + REMOVE_WITHIN;
    while m.get_all_pids().is_ok_and(|pids| !pids.is_empty()) && Instant::now() < deadline {
        std::thread::sleep(REMOVE_POLL);
    }
    if let Err(e) = m.remove() {
        tracing::warn!(error = %err(path, "remove", e), "cgroup left behind");
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
    let files = switchyard_base::cgroup::own_procs_files()
        .map_err(Error::io("read /proc/self/cgroup and mountinfo"))?;
    for procs in files {
        if let Err(e) = std::fs::write(&procs, pid.to_string()) {
            tracing::debug!(path = %procs.display(), error = %e, "cgroup not joined");
        }
    }
    Ok(())
}

/// Whether process `pid` is in the cgroup at `path` (a cgroupfs path) or one below it, in any
/// hierarchy (`/proc/PID/cgroup`). A process that is gone is in none.
pub fn holds(path: &Path, pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|own| lists_within(&own, path))
}

/// Whether a `/proc/PID/cgroup` text names `path` or a cgroup below it in any hierarchy.
fn lists_within(proc_cgroup: &str, path: &Path) -> bool {
    proc_cgroup
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|p| Path::new(p).starts_with(path))
}

/// Starts [`switchyard_base::cgroup::prewarm_migration`] on a blocking thread: the wait that a
/// container's first cgroup migration would otherwise pay on the create path.
pub fn prewarm_migration() {
    tokio::task::spawn_blocking(switchyard_base::cgroup::prewarm_migration);
}

/// The same for `start`, which exits as soon as it has printed the server's address: a child
/// forked for it makes the no-op migration (it writes `0`, itself) and waits out the kernel's
/// wait, while `start` exits and the server it started comes up. Under containerd this begins
/// the wait a few milliseconds before the server could (containerd sends Create right after
/// `start` exits).
pub fn prewarm_migration_in_child() {
    let Some(path) = switchyard_base::cgroup::prewarm_procs_file() else {
        return;
    };
    let procs = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cgroup prewarm: open");
            return;
        }
    };
    if let Err(e) = crate::sys::write_in_child(procs.into(), b"0") {
        tracing::debug!(error = %e, "cgroup prewarm: fork");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcgroups::common::FreezerState;

    #[test]
    fn a_process_is_within_a_cgroup_or_one_below_it_in_any_hierarchy() {
        let own = "12:pids:/\n4:cpu,cpuacct:/switchyard/default/t1\n0::/\n";
        assert!(lists_within(own, Path::new("/switchyard/default/t1")));
        assert!(lists_within(own, Path::new("/switchyard/default")));
        assert!(!lists_within(own, Path::new("/switchyard/default/t")));
        assert!(!lists_within(own, Path::new("/switchyard/default/t1/x")));
        assert!(!lists_within("", Path::new("/switchyard")));
    }

    /// A process that dies slowly once killed does not leave its cgroup behind: the removal
    /// waits for it. Here the process is held in a frozen cgroup v1 (where a killed process
    /// stays until thawed) for longer than libcgroups' own retries, then thawed.
    #[test]
    #[allow(clippy::unwrap_used, clippy::print_stderr)]
    fn a_cgroup_is_removed_once_its_killed_process_is_gone() {
        if !switchyard_base::gate::require(switchyard_base::gate::is_root(), "needs root") {
            return;
        }
        let freezer = Path::new("/sys/fs/cgroup/freezer");
        if !freezer.is_dir() {
            // cgroup v2 lets a fatal signal through a frozen cgroup: no way to hold the exit.
            eprintln!("SKIP: no cgroup v1 freezer on this host");
            return;
        }
        let path = PathBuf::from(format!("/yard-kit-test-{}", std::process::id()));
        let m = manager(&path, "t").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        m.add_task(pid(child.id())).unwrap();
        m.freeze(FreezerState::Frozen).unwrap();
        let thaw = manager(&path, "t").unwrap();
        let thawer = std::thread::spawn(move || {
            // The stimulus, not a wait: the exit is held past libcgroups' retries (0.1 s).
            std::thread::sleep(Duration::from_millis(500));
            thaw.freeze(FreezerState::Thawed).unwrap();
        });
        remove_managed(&m, &path);
        thawer.join().unwrap();
        let _ = child.kill();
        let status = child.wait().unwrap();
        let left = freezer.join(path.strip_prefix("/").unwrap());
        let gone = !left.exists();
        if !gone {
            // What a failed run left, in every hierarchy.
            let _ = m.remove();
        }
        assert!(!status.success(), "the process was not killed: {status}");
        assert!(gone, "{} is left", left.display());
    }
}
