//! Active snapshots: a container's writable root on top of a committed chain (overlay upper
//! and work directories, or a full copy), and the mount that makes it.

use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs as rfs;

use super::mount::overlay_has_index;
use super::{
    ACTIVE, Driver, Mount, SnapshotError, Snapshotter, create_dir, io_err, list, read_line,
    rename_new, tree,
};
use crate::fsutil;

/// Splits an active snapshot's key `<namespace>/<id>`.
pub(super) fn parse_key(key: &str) -> Result<(&str, &str), SnapshotError> {
    let bad = |reason: String| SnapshotError::BadKey {
        key: key.to_owned(),
        reason,
    };
    let (namespace, id) = key
        .split_once('/')
        .ok_or_else(|| bad("a key is <namespace>/<id>".into()))?;
    for (what, part) in [("namespace", namespace), ("id", id)] {
        switchyard_base::ident::check(what, part).map_err(|e| bad(e.to_string()))?;
    }
    Ok((namespace, id))
}

impl Snapshotter {
    /// Creates active snapshot `key` on top of committed `parent`; returns the mounts that
    /// make the container's root.
    pub fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>, SnapshotError> {
        let (namespace, id) = parse_key(key)?;
        let lowers = self.lowers(parent)?;
        if self.driver == Driver::Overlay {
            // The shim mounts with mount(2), whose options are one page at most.
            let bytes = self
                .mount_of(&self.root.join(ACTIVE).join(namespace).join(id), &lowers)
                .options
                .join(",")
                .len();
            if bytes >= 4096 {
                return Err(SnapshotError::TooDeep {
                    chain: parent.to_owned(),
                    layers: lowers.len(),
                    bytes,
                });
            }
        }
        let namespace_dir = self.root.join(ACTIVE).join(namespace);
        fsutil::private_dir(&namespace_dir).map_err(io_err("create directory", &namespace_dir))?;
        let dir = namespace_dir.join(id);
        if fs::symlink_metadata(&dir).is_ok() {
            return Err(SnapshotError::ActiveExists {
                key: key.to_owned(),
            });
        }
        let scratch = self.scratch()?;
        match self.driver {
            Driver::Overlay => {
                let upper = scratch.path.join("upper");
                create_dir(&upper, 0o755)?;
                // The container's `/` is the upper directory's: give it the image's owner
                // and mode, as containerd does.
                let st = rfs::lstat(&lowers[0]).map_err(io_err("stat", &lowers[0]))?;
                rfs::chown(
                    &upper,
                    Some(rfs::Uid::from_raw(st.st_uid)),
                    Some(rfs::Gid::from_raw(st.st_gid)),
                )
                .map_err(io_err("set owner", &upper))?;
                rfs::chmod(&upper, rfs::Mode::from_raw_mode(st.st_mode & 0o7777))
                    .map_err(io_err("set mode", &upper))?;
                create_dir(&scratch.path.join("work"), 0o711)?;
            }
            Driver::Copy => {
                let fs = scratch.path.join("fs");
                create_dir(&fs, 0o755)?;
                tree::copy_tree(&lowers[0], &fs)?;
            }
        }
        let parent_file = scratch.path.join("parent");
        fs::write(&parent_file, parent).map_err(io_err("write", &parent_file))?;
        // On disk before the rename, which a container record then names.
        fsutil::sync_fs(&scratch.path).map_err(io_err("sync the file system of", &scratch.path))?;
        if !rename_new(&scratch.path, &dir)? {
            return Err(SnapshotError::ActiveExists {
                key: key.to_owned(),
            });
        }
        scratch.renamed();
        Ok(vec![self.mount_of(&dir, &lowers)])
    }

    fn mount_of(&self, dir: &Path, lowers: &[PathBuf]) -> Mount {
        match self.driver {
            Driver::Overlay => {
                let mut options = Vec::new();
                if overlay_has_index() {
                    options.push("index=off".to_owned());
                }
                let lowerdir = lowers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":");
                options.push(format!("lowerdir={lowerdir}"));
                options.push(format!("upperdir={}", dir.join("upper").display()));
                options.push(format!("workdir={}", dir.join("work").display()));
                Mount {
                    kind: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }
            }
            Driver::Copy => Mount {
                kind: "bind".into(),
                source: dir.join("fs").display().to_string(),
                options: vec!["rbind".into(), "rw".into()],
            },
        }
    }

    /// Removes active snapshot `key` (unmounting nothing: the shim unmounted it). Missing is
    /// not an error.
    pub fn remove_active(&self, key: &str) -> Result<(), SnapshotError> {
        let (namespace, id) = parse_key(key)?;
        let namespace_dir = self.root.join(ACTIVE).join(namespace);
        self.discard(&namespace_dir.join(id))?;
        // Fails while the namespace has other active snapshots; that is fine.
        let _ = fs::remove_dir(&namespace_dir);
        Ok(())
    }

    /// Bytes and inodes of active snapshot `key`'s writable part (the overlay upper
    /// directory, or the whole copy); `None` when there is no such snapshot.
    pub fn active_usage(&self, key: &str) -> Result<Option<(u64, u64)>, SnapshotError> {
        let (namespace, id) = parse_key(key)?;
        let dir = self.root.join(ACTIVE).join(namespace).join(id);
        let writable = match self.driver {
            Driver::Overlay => dir.join("upper"),
            Driver::Copy => dir.join("fs"),
        };
        if fs::symlink_metadata(&writable).is_err() {
            return Ok(None);
        }
        Ok(Some(tree::usage(&writable)?))
    }

    /// Active snapshots: `(key, parent chain)`.
    pub fn active(&self) -> Result<Vec<(String, String)>, SnapshotError> {
        let mut out = Vec::new();
        let active = self.root.join(ACTIVE);
        for namespace in list(&active)? {
            let namespace_dir = active.join(&namespace);
            if !namespace_dir.is_dir() {
                continue;
            }
            for id in list(&namespace_dir)? {
                if let Some(parent) = read_line(&namespace_dir.join(&id).join("parent"))? {
                    out.push((format!("{namespace}/{id}"), parent));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
