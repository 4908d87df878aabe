//! overlayfs mounts the store makes itself (a chain's merged view for an EROFS build, the probe
//! that decides the driver): one `mount(2)` where the options fit a page, the new mount API's
//! `lowerdir+` where they do not.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use rustix::fs::CWD;

use super::{MOUNT_DATA_MAX, SnapshotError, Snapshotter, create_dir, io_err};

/// An overlayfs mount, detached when dropped.
pub(super) struct Mounted(pub(super) PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %self.0.display(), error = %e, "unmount");
        }
    }
}

/// Mounts overlayfs on `target`.
pub(super) fn mount_overlay(
    target: &Path,
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> io::Result<Mounted> {
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut options = format!("lowerdir={lowerdir}");
    if let Some((upper, work)) = upper {
        options += &format!(",upperdir={},workdir={}", upper.display(), work.display());
    }
    // `open` refused roots whose paths would need escaping here.
    if options.len() <= MOUNT_DATA_MAX {
        let flags = if upper.is_some() {
            MsFlags::empty()
        } else {
            MsFlags::MS_RDONLY
        };
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(options.as_str()),
        )?;
        return Ok(Mounted(target.to_owned()));
    }
    // Too long for one page: the new mount API takes lower layers one at a time (`lowerdir+`,
    // Linux 6.8+).
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
        fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for lower in lowers {
        fsconfig_set_string(&fs, "lowerdir+", lower)?;
    }
    if let Some((upper, work)) = upper {
        fsconfig_set_string(&fs, "upperdir", upper)?;
        fsconfig_set_string(&fs, "workdir", work)?;
    }
    fsconfig_create(&fs)?;
    let attrs = if upper.is_some() {
        MountAttrFlags::empty()
    } else {
        MountAttrFlags::MOUNT_ATTR_RDONLY
    };
    let mount = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    move_mount(
        &mount,
        c"",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(Mounted(target.to_owned()))
}

/// Whether overlayfs mounts take `index=off` (containerd passes it where they do, so a lower
/// directory shared by many mounts is never tied to one upper).
pub(super) fn overlay_has_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

impl Snapshotter {
    /// Mounts a throwaway overlay in the root, to learn whether overlayfs works here (the
    /// module, the filesystem under the root as upper layer, our privileges).
    pub(super) fn probe_overlay(&self) -> Result<(), SnapshotError> {
        let scratch = self.scratch()?;
        let dir = |name: &str| -> Result<PathBuf, SnapshotError> {
            let path = scratch.path.join(name);
            create_dir(&path, 0o755)?;
            Ok(path)
        };
        let (lower, upper, work) = (dir("lower")?, dir("upper")?, dir("work")?);
        let mountpoint = scratch.mountpoint();
        create_dir(&mountpoint, 0o755)?;
        let mounted = mount_overlay(&mountpoint, &[lower], Some((&upper, &work)))
            .map_err(io_err("mount overlayfs", &mountpoint))?;
        drop(mounted);
        Ok(())
    }
}
