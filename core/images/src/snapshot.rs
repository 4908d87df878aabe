//! Snapshots: the unpacked layers of images, and the writable roots of containers.
//!
//! INTERFACE (fixed; callers depend on it):
//! - A *committed* snapshot is one layer chain, named by its chain id (`sha256:<hex>`, the OCI
//!   image spec's ChainID of the layer diff ids). It is immutable once committed.
//!   - [`Driver::Overlay`]: the directory holds only that layer's own entries (overlay
//!     whiteouts); a chain is mounted as overlayfs with the ancestors as lower directories.
//!   - [`Driver::Copy`]: the directory holds the whole merged tree (the parent's tree copied,
//!     then the layer applied with whiteouts removing paths). For hosts without overlayfs.
//! - Commits are atomic: built in a scratch directory under the snapshotter's root and renamed
//!   into place; a failed commit leaves nothing. A commit of a chain that already exists
//!   (another pull got there first) succeeds without touching the existing one.
//! - An *active* snapshot is a container's writable root, named by a key (`<namespace>/<id>`),
//!   on top of a committed chain: overlay upper+work directories, or a full copy.
//!   [`Snapshotter::prepare`] returns the mount that produces the container's root, as
//!   containerd's snapshotters do (one overlay mount, or one bind mount of the copy).
//! - [`Snapshotter::image`] gives the vm runtime one read-only EROFS image of a chain's merged
//!   tree (mkfs.erofs), built once per chain and reused.
//!
//! Layout under the root: `snapshots/<id>/` with `fs/` (the tree), `chain` (full chain id),
//! `parent` (parent's chain id, absent for a base layer); `active/<namespace>/<id>/` with
//! `upper/`, `work/` (overlay) or `fs/` (copy) and `parent`; `erofs/<id>.erofs`. `<id>` is
//! the first 16 hex digits of the chain id (short overlay lowerdir options; the `chain` file
//! is checked, so a prefix collision is an error, never a wrong tree).
//!
//! Scratch work (commits, active snapshots being built, image builds, removals) happens in
//! `tmp/<pid>-<n>-<nanos>/` under the root, on the same filesystem as its destination, so the
//! final step is one `rename`. `open` clears what dead processes left there.
//!
//! The parts: `chains` (committing layers, listing and removing chains), `active` (container
//! roots), `erofs` (the vm runtime's image files), `mount` (overlayfs mounts the store makes
//! itself), `scratch` (scratch directories and moving things out of sight), `tree` (whole-tree
//! copies, sizes and removal).

mod active;
mod chains;
mod erofs;
mod mount;
mod scratch;
#[cfg(test)]
mod tests;
mod tree;

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, CWD, RenameFlags};
use rustix::io::Errno;

use crate::fsutil;
use crate::unpack::{Nodes, UnpackError};

use self::tree::TreeError;

/// How committed snapshots are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Overlay,
    Copy,
}

/// A mount producing a container's root (containerd's `Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A layer to commit on top of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer<'a> {
    /// What messages call the layer (its blob digest).
    pub name: &'a str,
    /// The digest the uncompressed tar must have.
    pub diff_id: &'a str,
    /// Whether device nodes and fifos may be in it.
    pub nodes: Nodes,
    /// Uncompressed bytes it may unpack to.
    pub max_tar_bytes: u64,
}

/// A committed snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub chain: String,
    pub parent: Option<String>,
    /// Bytes the snapshot's own directory uses on disk (`du`-style, hard links once).
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {chain}: not found")]
    NotFound { chain: String },
    #[error("active snapshot {key}: not found")]
    ActiveNotFound { key: String },
    #[error(
        "snapshot {chain}: its {layers} layers make overlay mount options longer than a page \
         ({bytes} bytes); images this deep are not supported with the overlayfs snapshotter yet \
         (use [images] snapshotter = \"copy\")"
    )]
    TooDeep {
        chain: String,
        layers: usize,
        bytes: usize,
    },
    #[error("active snapshot {key}: already exists")]
    ActiveExists { key: String },
    #[error("snapshot key {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("layer {diff_id}: the unpacked layer's digest is {actual}")]
    DiffId { diff_id: String, actual: String },
    #[error("unpack layer {layer}")]
    Unpack {
        layer: String,
        #[source]
        source: UnpackError,
    },
    #[error("snapshot {chain}: build EROFS image: {reason}")]
    Image { chain: String, reason: String },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<TreeError> for SnapshotError {
    fn from(e: TreeError) -> Self {
        SnapshotError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// `SnapshotError::Io` for `op` on `path`, from an `io::Error` or an errno.
fn io_err<E: Into<io::Error>>(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(E) -> SnapshotError + use<E> {
    let path = path.to_owned();
    move |e| SnapshotError::Io {
        op,
        path,
        source: e.into(),
    }
}

const SNAPSHOTS: &str = "snapshots";
const ACTIVE: &str = "active";
const EROFS: &str = "erofs";
const SCRATCH: &str = "tmp";
/// A committed snapshot's directory name: this many hex digits of its chain id.
const ID_LEN: usize = 16;
/// Far more ancestors than an image can have (overlayfs stacks at most 500): a longer walk
/// through `parent` files is a loop.
const MAX_CHAIN: usize = 1024;
/// Mount options longer than a page do not fit `mount(2)`.
const MOUNT_DATA_MAX: usize = 4095;

/// Reads a one-line metadata file; `None` if it is missing.
fn read_line(path: &Path) -> Result<Option<String>, SnapshotError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim_end().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Creates a directory with exactly `mode`, whatever the umask (the daemon's is 077): a
/// layer's root that its tar does not list is 0755, as in containerd, or a non-root process
/// could not reach its own image's files.
fn create_dir(path: &Path, mode: u32) -> Result<(), SnapshotError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("create directory", path))?;
    rfs::chmod(path, rfs::Mode::from_raw_mode(mode)).map_err(io_err("set mode", path))
}

/// Renames a directory into place unless something is already there (`Ok(false)`), durably:
/// the directory holding `to` is synced before a record can name it.
fn rename_new(from: &Path, to: &Path) -> Result<bool, SnapshotError> {
    let result = match rfs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        // A filesystem without RENAME_NOREPLACE: plain rename still refuses to replace a
        // non-empty directory, and ours never are empty (they hold `parent` or `chain`).
        Err(Errno::INVAL) => rfs::rename(from, to),
        other => other,
    };
    match result {
        Ok(()) => {
            fsutil::sync_parent(to).map_err(io_err("sync the directory of", to))?;
            Ok(true)
        }
        Err(Errno::EXIST | Errno::NOTEMPTY) => Ok(false),
        Err(e) => Err(io_err("rename into place", to)(e)),
    }
}

pub struct Snapshotter {
    root: PathBuf,
    driver: Driver,
}

impl Snapshotter {
    /// Opens (creating) a snapshotter under `root`. With `driver` `None`, overlayfs is used
    /// where a test mount in `root` works, copies otherwise.
    pub fn open(root: &Path, driver: Option<Driver>) -> Result<Snapshotter, SnapshotError> {
        // Absolute: the paths end up in mount options.
        let root = std::path::absolute(root).map_err(io_err("resolve", root))?;
        fsutil::private_dir(&root).map_err(io_err("create directory", &root))?;
        for dir in [SNAPSHOTS, ACTIVE, EROFS, SCRATCH] {
            let path = root.join(dir);
            fsutil::private_dir(&path).map_err(io_err("create directory", &path))?;
        }
        // The mounts `prepare` returns list directories in one option string.
        let mountable = !root
            .as_os_str()
            .as_bytes()
            .iter()
            .any(|b| b":,\\".contains(b));
        if driver == Some(Driver::Overlay) && !mountable {
            return Err(SnapshotError::Io {
                op: "overlayfs options cannot name",
                path: root,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the path holds `:`, `,` or `\\`",
                ),
            });
        }
        let mut snapshotter = Snapshotter {
            root,
            driver: driver.unwrap_or(Driver::Copy),
        };
        snapshotter.clean_scratch();
        if driver.is_none() && mountable {
            snapshotter.driver = match snapshotter.probe_overlay() {
                Ok(()) => Driver::Overlay,
                Err(e) => {
                    tracing::info!(root = %snapshotter.root.display(), error = %e, "overlayfs does not work here: snapshots are copies");
                    Driver::Copy
                }
            };
        }
        Ok(snapshotter)
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The UTF-8 names in a directory (ours are all UTF-8).
fn list(dir: &Path) -> Result<Vec<String>, SnapshotError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push(name);
        }
    }
    Ok(out)
}
