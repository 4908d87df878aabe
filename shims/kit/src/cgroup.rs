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
    match manager(path, name) {
        Ok(m) => remove_managed(&m, path),
        Err(e) => tracing::warn!(error = %e, "cgroup left behind"),
    }
}

/// [`remove`] with the cgroup's manager at hand: opening one reads the host's mounts and the
/// process's cgroups on cgroup v1 (0.3 ms here).
pub fn remove_managed(m: &AnyCgroupManager, path: &Path) {
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
