//! Host files and directories a container binds (CRI's `/etc/resolv.conf`, `/etc/hosts`,
//! `/etc/hostname`, `/dev/termination-log`, emptyDir, hostPath, configmaps, secrets) reach the
//! guest through the sandbox's volume share: a host directory the VM exports read-write over
//! 9p (tag [`VOLUME_TAG`](yard_agent_protocol::VOLUME_TAG)). Each bind mount gets one entry
//! there, `<n>`, onto which the host source is bind-mounted (read-only when the mount is `ro`,
//! so a write from the guest fails on the host side too); the agent binds that entry into the
//! container. A file changed on the host is the same file under the entry, and the guest mounts
//! the share with `cache=none`, so it reads changed. `/dev/shm` is the pod's tmpfs in the guest.
//!
//! The entries are mount points on the host: they are unmounted (detached) when their container
//! is deleted, when the sandbox stops, and by `<shim> delete` after a dead shim; an entry is
//! removed only once unmounted, and never recursively, so no teardown can reach into a volume.
//!
//! The bind mounts go through [`Binder`], so the engine's tests run without root.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use yard_agent_protocol as proto;
use yard_shim_kit::{Error, Result};

use super::spec::{Bind, BindSource};

/// The host side of the volume share's entries.
pub trait Binder: Send + Sync {
    /// Creates `target` (a directory or an empty file, as `source` is) and binds `source` onto
    /// it, recursively; read-only if asked. On error nothing is left at `target`.
    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> io::Result<()>;
    /// Detaches whatever is mounted on `target` and removes it (not recursively). A target
    /// that cannot be unmounted is left in place.
    fn unbind(&self, target: &Path) -> io::Result<()>;
    /// The mount points at or below `dir`, deepest first.
    fn mounted_under(&self, dir: &Path) -> Vec<PathBuf>;
}

/// The real thing: `mount(2)` in the shim's mount namespace (the host's, where QEMU sees them).
pub struct HostBinder;

impl Binder for HostBinder {
    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> io::Result<()> {
        if std::fs::metadata(source)?.is_dir() {
            std::fs::create_dir(target)?;
        } else {
            std::fs::File::create_new(target)?;
        }
        let done = (|| {
            rustix::mount::mount_bind_recursive(source, target)?;
            // Nothing mounted under the entry goes back to the host's mount.
            rustix::mount::mount_change(
                target,
                MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
            )?;
            if readonly {
                rustix::mount::mount_remount(
                    target,
                    MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                    "",
                )?;
            }
            Ok::<_, Errno>(())
        })();
        if let Err(e) = done {
            let _ = self.unbind(target);
            return Err(e.into());
        }
        Ok(())
    }

    fn unbind(&self, target: &Path) -> io::Result<()> {
        loop {
            match rustix::mount::unmount(target, UnmountFlags::DETACH) {
                Ok(()) => continue, // a source bound twice: until nothing is mounted there
                Err(Errno::INVAL) => break,
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn mounted_under(&self, dir: &Path) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut found: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape)
            .filter(|p| p.starts_with(dir))
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found.dedup();
        found
    }
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// A sandbox's volume share on the host.
pub struct Volumes {
    pub dir: PathBuf,
    binder: Arc<dyn Binder>,
    next: AtomicU32,
    /// Container id → its entries.
    entries: Mutex<HashMap<String, Vec<PathBuf>>>,
}

impl Volumes {
    pub fn new(dir: PathBuf, binder: Arc<dyn Binder>) -> Volumes {
        Volumes {
            dir,
            binder,
            next: AtomicU32::new(0),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<PathBuf>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds container `id`'s host sources into the share; the agent's volume list. On error
    /// nothing of `id` is left in the share.
    pub async fn give(&self, id: &str, binds: &[Bind]) -> Result<Vec<proto::Volume>> {
        let mut volumes = Vec::new();
        let mut todo = Vec::new();
        for b in binds {
            let mut v = b.volume();
            if let BindSource::Host { path, readonly } = &b.source {
                let name = self.next.fetch_add(1, Ordering::SeqCst).to_string();
                todo.push((b.describe(), path.clone(), self.dir.join(&name), *readonly));
                v.shared = name;
            }
            volumes.push(v);
        }
        if todo.is_empty() {
            return Ok(volumes);
        }
        let binder = self.binder.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut made: Vec<PathBuf> = Vec::new();
            for (what, source, target, readonly) in todo {
                if let Err(e) = binder.bind(&source, &target, readonly) {
                    for t in made.iter().rev() {
                        let _ = binder.unbind(t);
                    }
                    let msg = format!("config.json: {what}: share it with the guest: {e}");
                    return Err(if e.kind() == io::ErrorKind::NotFound {
                        Error::InvalidArgument(msg)
                    } else {
                        Error::Internal(msg)
                    });
                }
                made.push(target);
            }
            Ok(made)
        })
        .await
        .map_err(|e| Error::Internal(format!("share the volumes: {e}")))??;
        self.entries().insert(id.to_owned(), done);
        Ok(volumes)
    }

    /// Unbinds container `id`'s entries (its container is gone from the guest, or never came).
    pub async fn take_back(&self, id: &str) {
        let Some(targets) = self.entries().remove(id) else {
            return;
        };
        let binder = self.binder.clone();
        let id = id.to_owned();
        let _ = tokio::task::spawn_blocking(move || {
            for t in targets.iter().rev() {
                if let Err(e) = binder.unbind(t) {
                    tracing::warn!(container_id = %id, entry = %t.display(), error = %e, "unbind a volume");
                }
            }
        })
        .await;
    }

    /// Unbinds every entry left and removes the share's directory (the VM is gone).
    pub async fn remove(&self) {
        let left: Vec<PathBuf> = self.entries().drain().flat_map(|(_, v)| v).collect();
        let (binder, dir) = (self.binder.clone(), self.dir.clone());
        let _ = tokio::task::spawn_blocking(move || {
            for t in &left {
                let _ = binder.unbind(t);
            }
            sweep(binder.as_ref(), &dir);
        })
        .await;
    }
}

/// Unbinds whatever is still mounted in `dir` (a dead shim's share), removes its entries (none
/// recursively) and the directory.
pub fn sweep(binder: &dyn Binder, dir: &Path) {
    for m in binder.mounted_under(dir) {
        if m != dir
            && let Err(e) = binder.unbind(&m)
        {
            tracing::warn!(entry = %m.display(), error = %e, "unbind a volume");
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = binder.unbind(&e.path());
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "remove the volume share");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/a\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape(r"/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape(r"/x\04"), PathBuf::from(r"/x\04"));
    }
}
