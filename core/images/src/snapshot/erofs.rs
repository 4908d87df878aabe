//! The vm runtime's root: one read-only EROFS image of a chain's merged tree, built with
//! `mkfs.erofs` from the copy driver's tree or a read-only overlay mount of the chain.

use std::fs::{self, File};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use rustix::fs::{self as rfs, FlockOperation};

use super::chains::snapshot_id;
use super::mount::mount_overlay;
use super::{Driver, EROFS, SnapshotError, Snapshotter, create_dir, io_err};
use crate::fsutil;

impl Snapshotter {
    /// A chain's merged tree as a read-only EROFS image file, built on first use (under a lock
    /// file, into a temporary name renamed into place), reused afterwards.
    pub fn image(&self, chain: &str) -> Result<PathBuf, SnapshotError> {
        let lowers = self.lowers(chain)?;
        let id = snapshot_id(chain)?;
        let image = self.root.join(EROFS).join(format!("{id}.erofs"));
        if image.exists() {
            return Ok(image);
        }
        let lock_path = self.root.join(EROFS).join(format!("{id}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(fsutil::FILE_MODE)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        rfs::flock(&lock, FlockOperation::LockExclusive).map_err(io_err("lock", &lock_path))?;
        if image.exists() {
            // Another builder finished while we waited.
            return Ok(image);
        }
        let scratch = self.scratch()?;
        let image_err = |reason: String| SnapshotError::Image {
            chain: chain.to_owned(),
            reason,
        };
        let (source, mounted) = match self.driver {
            Driver::Copy => (lowers[0].clone(), None),
            Driver::Overlay => {
                // The merged view, as the container sees it: whiteouts and opaque markers
                // applied, overlay xattrs hidden. A mount without upper directory needs two
                // lower ones; an empty one does for a single layer.
                let mut lowers = lowers;
                if lowers.len() == 1 {
                    let empty = scratch.path.join("empty");
                    create_dir(&empty, 0o755)?;
                    lowers.push(empty);
                }
                let mountpoint = scratch.mountpoint();
                create_dir(&mountpoint, 0o755)?;
                let mounted = mount_overlay(&mountpoint, &lowers, None)
                    .map_err(|e| image_err(format!("mount the chain: {e}")))?;
                (mountpoint, Some(mounted))
            }
        };
        let built = scratch.path.join("image.erofs");
        let output = Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&built)
            .arg(&source)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| image_err(format!("run mkfs.erofs: {e}")))?;
        drop(mounted);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(image_err(format!(
                "mkfs.erofs {}: {}",
                output.status,
                stderr.trim()
            )));
        }
        // Private, on disk, then in place, and the rename durable before a container names it.
        fs::set_permissions(&built, fs::Permissions::from_mode(fsutil::FILE_MODE))
            .map_err(io_err("set mode", &built))?;
        File::open(&built)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", &built))?;
        fs::rename(&built, &image).map_err(io_err("rename into place", &image))?;
        fsutil::sync_parent(&image).map_err(io_err("sync the directory of", &image))?;
        Ok(image)
    }
}
