//! Committed snapshots, one per layer chain: commits (built in scratch, renamed into place),
//! lookups by chain id, the parent walk that gives overlayfs its lower directories, listing and
//! removal.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::{
    Committed, Driver, EROFS, ID_LEN, Layer, MAX_CHAIN, SNAPSHOTS, SnapshotError, Snapshotter,
    create_dir, io_err, list, read_line, rename_new, tree,
};
use crate::fsutil;
use crate::unpack::{self, Options, Whiteouts};

/// The file in a committed snapshot naming the first device node or fifo its layer made
/// (`<what>\n<entry>`), empty if it made none. Snapshots committed before it existed lack it
/// and are searched instead.
const NODES: &str = "nodes";

/// The on-disk name of `chain` (`algorithm:hex`): the first [`ID_LEN`] hex digits.
pub(super) fn snapshot_id(chain: &str) -> Result<&str, SnapshotError> {
    let bad = |reason: &str| SnapshotError::BadKey {
        key: chain.to_owned(),
        reason: reason.to_owned(),
    };
    let (algorithm, hex) = chain
        .split_once(':')
        .ok_or_else(|| bad("a chain id is algorithm:hex"))?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
    if !algorithm_ok {
        return Err(bad("a chain id is algorithm:hex"));
    }
    if hex.len() < ID_LEN || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("the digest must be at least 16 lowercase hex digits"));
    }
    Ok(&hex[..ID_LEN])
}

impl Snapshotter {
    /// Whether chain `chain` is committed.
    pub fn exists(&self, chain: &str) -> bool {
        self.committed_dir(chain).is_ok()
    }

    /// Commits chain `chain` = `parent` + `layer`, read from `read` (compressed or not),
    /// checking the uncompressed digest against its diff id. The parent must be committed.
    pub fn commit_layer(
        &self,
        chain: &str,
        parent: Option<&str>,
        layer: &Layer<'_>,
        read: impl Read,
    ) -> Result<Committed, SnapshotError> {
        let opts = Options {
            whiteouts: match self.driver {
                Driver::Overlay => Whiteouts::Overlay,
                Driver::Copy => Whiteouts::Remove,
            },
            nodes: layer.nodes,
            max_tar_bytes: layer.max_tar_bytes,
        };
        self.commit(chain, parent, |fs| {
            let applied =
                unpack::apply_layer(read, fs, &opts).map_err(|source| SnapshotError::Unpack {
                    layer: layer.name.to_owned(),
                    source,
                })?;
            if applied.diff_id != layer.diff_id {
                return Err(SnapshotError::DiffId {
                    diff_id: layer.diff_id.to_owned(),
                    actual: applied.diff_id,
                });
            }
            Ok(applied.node)
        })
    }

    /// Commits chain `chain` as `parent` + files `populate` writes into the given directory
    /// (used for Wasm artifacts, whose layers are modules, not tarballs).
    pub fn commit_with(
        &self,
        chain: &str,
        parent: Option<&str>,
        populate: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Committed, SnapshotError> {
        self.commit(chain, parent, |fs| {
            populate(fs).map_err(io_err("populate snapshot", fs))?;
            Ok(None)
        })
    }

    /// Committed snapshots.
    pub fn committed(&self) -> Result<Vec<Committed>, SnapshotError> {
        self.list_committed(true)
    }

    /// Committed snapshots without their sizes (no tree walk): what collection needs.
    pub fn chains(&self) -> Result<Vec<Committed>, SnapshotError> {
        self.list_committed(false)
    }

    fn list_committed(&self, sizes: bool) -> Result<Vec<Committed>, SnapshotError> {
        let mut out = Vec::new();
        let snapshots = self.root.join(SNAPSHOTS);
        for id in list(&snapshots)? {
            let dir = snapshots.join(&id);
            if let Some(chain) = read_line(&dir.join("chain"))? {
                out.push(self.describe(&dir, chain, sizes)?);
            }
        }
        out.sort_by(|a, b| a.chain.cmp(&b.chain));
        Ok(out)
    }

    /// Removes committed `chain` and its EROFS image. The caller (garbage collection) makes
    /// sure no child or active snapshot still needs it.
    pub fn remove(&self, chain: &str) -> Result<(), SnapshotError> {
        let dir = self.committed_dir(chain)?;
        let id = snapshot_id(chain)?;
        // The image first: it must never outlive its tree.
        for suffix in ["erofs", "lock"] {
            let path = self.root.join(EROFS).join(format!("{id}.{suffix}"));
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("remove", &path)(e));
                }
                _ => {}
            }
        }
        self.discard(&dir)
    }

    /// Builds a snapshot in scratch and renames it into place; a concurrent commit of the
    /// same chain that got there first wins, and this one returns what it committed.
    fn commit(
        &self,
        chain: &str,
        parent: Option<&str>,
        build: impl FnOnce(&Path) -> Result<Option<(String, &'static str)>, SnapshotError>,
    ) -> Result<Committed, SnapshotError> {
        let id = snapshot_id(chain)?;
        let dir = self.root.join(SNAPSHOTS).join(id);
        if let Some(existing) = self.existing(&dir, chain)? {
            return Ok(existing);
        }
        let parent_dir = parent.map(|p| self.committed_dir(p)).transpose()?;
        let scratch = self.scratch()?;
        let fs = scratch.path.join("fs");
        create_dir(&fs, 0o755)?;
        if let (Driver::Copy, Some(parent_dir)) = (self.driver, &parent_dir) {
            tree::copy_tree(&parent_dir.join("fs"), &fs)?;
        }
        let node = build(&fs)?;
        let nodes_file = scratch.path.join(NODES);
        let nodes = node.map_or(String::new(), |(entry, what)| format!("{what}\n{entry}"));
        fs::write(&nodes_file, nodes).map_err(io_err("write", &nodes_file))?;
        let chain_file = scratch.path.join("chain");
        fs::write(&chain_file, chain).map_err(io_err("write", &chain_file))?;
        if let Some(parent) = parent {
            let parent_file = scratch.path.join("parent");
            fs::write(&parent_file, parent).map_err(io_err("write", &parent_file))?;
        }
        // The tree and its metadata reach the disk before the rename makes them a snapshot
        // (one `syncfs` rather than an `fsync` per unpacked file).
        fsutil::sync_fs(&scratch.path).map_err(io_err("sync the file system of", &scratch.path))?;
        #[cfg(debug_assertions)]
        fail::fail_point!("images.snapshot.commit");
        if rename_new(&scratch.path, &dir)? {
            scratch.renamed();
            tracing::debug!(chain, "committed snapshot");
        } else {
            drop(scratch);
        }
        self.existing(&dir, chain)?
            .ok_or_else(|| SnapshotError::NotFound {
                chain: chain.to_owned(),
            })
    }

    /// The first device node or fifo committed `chain`'s own layer made: `(entry, what)`.
    pub fn node(&self, chain: &str) -> Result<Option<(String, String)>, SnapshotError> {
        let dir = self.committed_dir(chain)?;
        let path = dir.join(NODES);
        match fs::read_to_string(&path) {
            Ok(text) if text.is_empty() => Ok(None),
            Ok(text) => {
                let (what, entry) = text.split_once('\n').unwrap_or(("node", text.as_str()));
                Ok(Some((entry.to_owned(), what.to_owned())))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Committed before nodes were recorded: look.
                let fs_dir = dir.join("fs");
                let whiteouts = self.driver == Driver::Overlay;
                Ok(tree::find_node(&fs_dir, whiteouts)?.map(|(path, what)| {
                    let entry = path.strip_prefix(&fs_dir).unwrap_or(&path);
                    (entry.display().to_string(), what.to_owned())
                }))
            }
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// The committed snapshot in `dir` if it is `chain`; an error if it is another chain
    /// with the same id prefix.
    fn existing(&self, dir: &Path, chain: &str) -> Result<Option<Committed>, SnapshotError> {
        match read_line(&dir.join("chain"))? {
            None => Ok(None),
            Some(found) if found == chain => Ok(Some(self.describe(dir, found, true)?)),
            Some(found) => Err(SnapshotError::Io {
                op: "chain id prefix taken by the snapshot in",
                path: dir.to_owned(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, found),
            }),
        }
    }

    fn describe(&self, dir: &Path, chain: String, size: bool) -> Result<Committed, SnapshotError> {
        let bytes = if size {
            // A tree the walk cannot finish (deeper than PATH_MAX) shows 0 bytes rather than
            // making every listing and collection fail.
            tree::disk_usage(dir).unwrap_or_else(|e| {
                tracing::warn!(%chain, error = %SnapshotError::from(e), "snapshot size unknown");
                0
            })
        } else {
            0
        };
        Ok(Committed {
            chain,
            parent: read_line(&dir.join("parent"))?,
            bytes,
        })
    }

    /// The directory of committed `chain`.
    pub(super) fn committed_dir(&self, chain: &str) -> Result<PathBuf, SnapshotError> {
        let not_found = || SnapshotError::NotFound {
            chain: chain.to_owned(),
        };
        let dir = self
            .root
            .join(SNAPSHOTS)
            .join(snapshot_id(chain).map_err(|_| not_found())?);
        match read_line(&dir.join("chain"))? {
            Some(found) if found == chain => Ok(dir),
            _ => Err(not_found()),
        }
    }

    /// The `fs` directories of `chain` and its ancestors, top-most first (overlayfs's
    /// `lowerdir` order).
    pub(crate) fn lowers(&self, chain: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut next = Some(chain.to_owned());
        while let Some(chain) = next {
            if out.len() == MAX_CHAIN {
                return Err(SnapshotError::Io {
                    op: "walk parents",
                    path: self.root.join(SNAPSHOTS),
                    source: io::Error::other("the chain of parents loops"),
                });
            }
            let dir = self.committed_dir(&chain)?;
            next = read_line(&dir.join("parent"))?;
            out.push(dir.join("fs"));
        }
        Ok(out)
    }
}
