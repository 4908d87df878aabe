//! Scratch directories under `tmp/`, on the same filesystem as their destinations: commits are
//! built there and renamed into place, removals are renamed there first, and what a dead process
//! left there is cleared at open.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::mount::MntFlags;
use rustix::io::Errno;

use super::{SCRATCH, SnapshotError, Snapshotter, create_dir, io_err, list, tree};

pub(super) fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch directory, removed when dropped unless it was renamed into place.
pub(super) struct Scratch {
    pub(super) path: PathBuf,
    pub(super) keep: bool,
}

impl Scratch {
    /// Where this scratch directory mounts things; dropping it detaches what is left there.
    pub(super) fn mountpoint(&self) -> PathBuf {
        self.path.join("mnt")
    }

    pub(super) fn renamed(mut self) {
        self.keep = true;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Never remove through a mount that failed to come off: detach it first.
        let _ = nix::mount::umount2(
            &self.mountpoint(),
            MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
        );
        if let Err(e) = tree::remove_tree(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e.source, op = e.op, "leaving scratch directory behind");
        }
    }
}

impl Snapshotter {
    pub(super) fn scratch(&self) -> Result<Scratch, SnapshotError> {
        let path = self.root.join(SCRATCH).join(unique_name());
        create_dir(&path, 0o700)?;
        Ok(Scratch { path, keep: false })
    }

    /// Moves `dir` out of sight (one rename), then deletes it. Missing is fine.
    pub(super) fn discard(&self, dir: &Path) -> Result<(), SnapshotError> {
        let trash = self.root.join(SCRATCH).join(unique_name());
        match fs::rename(dir, &trash) {
            Ok(()) => Ok(tree::remove_tree(&trash)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", dir)(e)),
        }
    }

    /// Removes scratch directories of processes that are gone (a crash mid-commit).
    pub(super) fn clean_scratch(&self) {
        let dir = self.root.join(SCRATCH);
        let Ok(names) = list(&dir) else { return };
        for name in names {
            let owner = name
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw);
            let alive = owner.is_some_and(|pid| {
                !matches!(rustix::process::test_kill_process(pid), Err(Errno::SRCH))
            });
            if !alive {
                drop(Scratch {
                    path: dir.join(name),
                    keep: false,
                });
            }
        }
    }
}
