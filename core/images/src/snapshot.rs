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

mod tree;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::mount::{MntFlags, MsFlags};
use rustix::fs::{self as rfs, CWD, FlockOperation, RenameFlags};
use rustix::io::Errno;

use crate::unpack::{self, UnpackError, Whiteouts};

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
    #[error(transparent)]
    Unpack(#[from] UnpackError),
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

/// The on-disk name of `chain` (`algorithm:hex`): the first [`ID_LEN`] hex digits.
fn snapshot_id(chain: &str) -> Result<&str, SnapshotError> {
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

/// Splits an active snapshot's key `<namespace>/<id>`.
fn parse_key(key: &str) -> Result<(&str, &str), SnapshotError> {
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

/// Reads a one-line metadata file; `None` if it is missing.
fn read_line(path: &Path) -> Result<Option<String>, SnapshotError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim_end().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), SnapshotError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("create directory", path))
}

/// Renames a directory into place unless something is already there (`Ok(false)`).
fn rename_new(from: &Path, to: &Path) -> Result<bool, SnapshotError> {
    let result = match rfs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        // A filesystem without RENAME_NOREPLACE: plain rename still refuses to replace a
        // non-empty directory, and ours never are empty (they hold `parent` or `chain`).
        Err(Errno::INVAL) => rfs::rename(from, to),
        other => other,
    };
    match result {
        Ok(()) => Ok(true),
        Err(Errno::EXIST | Errno::NOTEMPTY) => Ok(false),
        Err(e) => Err(io_err("rename into place", to)(e)),
    }
}

fn unique_name() -> String {
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
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    /// Where this scratch directory mounts things; dropping it detaches what is left there.
    fn mountpoint(&self) -> PathBuf {
        self.path.join("mnt")
    }

    fn renamed(mut self) {
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

/// An overlayfs mount, detached when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %self.0.display(), error = %e, "unmount");
        }
    }
}

/// Mounts overlayfs on `target`.
fn mount_overlay(
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
fn overlay_has_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
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
        for dir in [SNAPSHOTS, ACTIVE, EROFS, SCRATCH] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err("create directory", &path))?;
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

    /// Whether chain `chain` is committed.
    pub fn exists(&self, chain: &str) -> bool {
        self.committed_dir(chain).is_ok()
    }

    /// Commits chain `chain` = `parent` + the layer read from `layer` (compressed or not),
    /// checking the uncompressed digest against `diff_id`. The parent must be committed.
    pub fn commit_layer(
        &self,
        chain: &str,
        parent: Option<&str>,
        diff_id: &str,
        layer: impl Read,
    ) -> Result<Committed, SnapshotError> {
        let whiteouts = match self.driver {
            Driver::Overlay => Whiteouts::Overlay,
            Driver::Copy => Whiteouts::Remove,
        };
        self.commit(chain, parent, |fs| {
            let applied = unpack::apply_layer(layer, fs, whiteouts)?;
            if applied.diff_id != diff_id {
                return Err(SnapshotError::DiffId {
                    diff_id: diff_id.to_owned(),
                    actual: applied.diff_id,
                });
            }
            Ok(())
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
            populate(fs).map_err(io_err("populate snapshot", fs))
        })
    }

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
        fs::create_dir_all(&namespace_dir).map_err(io_err("create directory", &namespace_dir))?;
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
        File::open(&built)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", &built))?;
        fs::rename(&built, &image).map_err(io_err("rename into place", &image))?;
        Ok(image)
    }

    /// Builds a snapshot in scratch and renames it into place; a concurrent commit of the
    /// same chain that got there first wins, and this one returns what it committed.
    fn commit(
        &self,
        chain: &str,
        parent: Option<&str>,
        build: impl FnOnce(&Path) -> Result<(), SnapshotError>,
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
        build(&fs)?;
        let chain_file = scratch.path.join("chain");
        fs::write(&chain_file, chain).map_err(io_err("write", &chain_file))?;
        if let Some(parent) = parent {
            let parent_file = scratch.path.join("parent");
            fs::write(&parent_file, parent).map_err(io_err("write", &parent_file))?;
        }
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
    fn committed_dir(&self, chain: &str) -> Result<PathBuf, SnapshotError> {
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

    fn scratch(&self) -> Result<Scratch, SnapshotError> {
        let path = self.root.join(SCRATCH).join(unique_name());
        create_dir(&path, 0o700)?;
        Ok(Scratch { path, keep: false })
    }

    /// Moves `dir` out of sight (one rename), then deletes it. Missing is fine.
    fn discard(&self, dir: &Path) -> Result<(), SnapshotError> {
        let trash = self.root.join(SCRATCH).join(unique_name());
        match fs::rename(dir, &trash) {
            Ok(()) => Ok(tree::remove_tree(&trash)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", dir)(e)),
        }
    }

    /// Removes scratch directories of processes that are gone (a crash mid-commit).
    fn clean_scratch(&self) {
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

    /// Mounts a throwaway overlay in the root, to learn whether overlayfs works here (the
    /// module, the filesystem under the root as upper layer, our privileges).
    fn probe_overlay(&self) -> Result<(), SnapshotError> {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use tar::EntryType;

    use super::*;
    use crate::unpack::tests::{
        Layer, gzip, is_root, lower_tree, merged, sha256, tree, upper_tree,
    };

    /// The OCI ChainID of `parent` + a layer with diff id `diff_id`.
    fn chain_of(parent: Option<&str>, diff_id: &str) -> String {
        match parent {
            None => diff_id.to_owned(),
            Some(parent) => sha256(format!("{parent} {diff_id}").as_bytes()),
        }
    }

    /// Opens a snapshotter with `driver`, or says why the test cannot run.
    fn open(driver: Driver) -> Option<(tempfile::TempDir, Snapshotter)> {
        if !is_root() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::open(dir.path(), Some(driver)).unwrap();
        if driver == Driver::Overlay && snapshotter.probe_overlay().is_err() {
            eprintln!("skipped: overlayfs cannot be mounted here");
            return None;
        }
        Some((dir, snapshotter))
    }

    /// Commits the two-layer test image; returns `(base, child)` chain ids.
    fn commit_two(s: &Snapshotter) -> (String, String) {
        let (lower, upper) = (lower_tree(), upper_tree());
        let (d1, d2) = (sha256(&lower), sha256(&upper));
        let base = chain_of(None, &d1);
        let child = chain_of(Some(&base), &d2);
        let c = s.commit_layer(&base, None, &d1, &gzip(&lower)[..]).unwrap();
        assert_eq!(
            (c.chain.as_str(), c.parent.as_deref()),
            (base.as_str(), None)
        );
        let c = s
            .commit_layer(&child, Some(&base), &d2, &upper[..])
            .unwrap();
        assert_eq!(c.parent.as_deref(), Some(base.as_str()));
        assert!(c.bytes > 0);
        (base, child)
    }

    /// Mounts `m` as a shim would (containerd's mount helper turns `bind` into `MS_BIND`).
    fn mount(m: &Mount, target: &Path) -> Mounted {
        if m.kind == "bind" {
            assert_eq!(m.options, ["rbind", "rw"]);
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .unwrap();
        } else {
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                Some(m.kind.as_str()),
                MsFlags::empty(),
                Some(m.options.join(",").as_str()),
            )
            .unwrap();
        }
        Mounted(target.to_owned())
    }

    fn scratch_is_empty(s: &Snapshotter) -> bool {
        fs::read_dir(s.root().join(SCRATCH)).unwrap().count() == 0
    }

    #[test]
    fn open_detects_overlayfs_and_clears_dead_scratch() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("tmp/999999999-0-0");
        let ours = dir.path().join(format!("tmp/{}-7-7", std::process::id()));
        fs::create_dir_all(stale.join("fs/sub")).unwrap();
        fs::create_dir_all(&ours).unwrap();
        let s = Snapshotter::open(dir.path(), None).unwrap();
        assert!(!stale.exists());
        assert!(ours.exists(), "a live process's scratch stays");
        fs::remove_dir(&ours).unwrap();
        assert!(scratch_is_empty(&s), "the probe cleans up");
        // A root overlayfs options cannot name.
        let odd = dir.path().join("a:b");
        assert!(Snapshotter::open(&odd, Some(Driver::Overlay)).is_err());
        assert_eq!(
            Snapshotter::open(&odd, None).unwrap().driver(),
            Driver::Copy
        );
        match s.probe_overlay() {
            Ok(()) => assert_eq!(s.driver(), Driver::Overlay),
            Err(e) => {
                eprintln!("overlayfs unavailable ({e}): expecting copies");
                assert_eq!(s.driver(), Driver::Copy);
            }
        }
    }

    #[test]
    fn overlay_commit_prepare_and_remove() {
        let Some((_dir, s)) = open(Driver::Overlay) else {
            return;
        };
        let (base, child) = commit_two(&s);
        assert!(s.exists(&base) && s.exists(&child));
        let committed = s.committed().unwrap();
        assert_eq!(committed.len(), 2);

        // Each snapshot holds its own layer only, whiteouts as overlayfs writes them.
        let child_fs = s
            .root()
            .join(SNAPSHOTS)
            .join(snapshot_id(&child).unwrap())
            .join("fs");
        let whiteout = fs::symlink_metadata(child_fs.join("a/x")).unwrap();
        assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);

        let mounts = s.prepare("default/c1", &child).unwrap();
        assert_eq!(mounts.len(), 1);
        let m = &mounts[0];
        assert_eq!((m.kind.as_str(), m.source.as_str()), ("overlay", "overlay"));
        let base_fs = s
            .root()
            .join(SNAPSHOTS)
            .join(snapshot_id(&base).unwrap())
            .join("fs");
        let active = s.root().join("active/default/c1");
        let mut want = Vec::new();
        if overlay_has_index() {
            want.push("index=off".to_owned());
        }
        want.push(format!(
            "lowerdir={}:{}",
            child_fs.display(),
            base_fs.display()
        ));
        want.push(format!("upperdir={}", active.join("upper").display()));
        want.push(format!("workdir={}", active.join("work").display()));
        assert_eq!(m.options, want);

        let target = tempfile::tempdir().unwrap();
        {
            let _mounted = mount(m, target.path());
            assert_eq!(tree(target.path()), merged());
            fs::write(target.path().join("a/y"), b"changed").unwrap();
        }
        assert_eq!(fs::read(active.join("upper/a/y")).unwrap(), b"changed");
        assert_eq!(
            s.active().unwrap(),
            vec![("default/c1".to_owned(), child.clone())]
        );
        assert!(matches!(
            s.prepare("default/c1", &child),
            Err(SnapshotError::ActiveExists { .. })
        ));

        // A single-layer chain mounts too (upper + one lower).
        let mounts = s.prepare("other/c2", &base).unwrap();
        let target2 = tempfile::tempdir().unwrap();
        {
            let _mounted = mount(&mounts[0], target2.path());
            assert!(target2.path().join("b/z").exists());
        }

        s.remove_active("default/c1").unwrap();
        s.remove_active("default/c1").unwrap();
        s.remove_active("other/c2").unwrap();
        assert!(s.active().unwrap().is_empty());
        assert!(!s.root().join("active/default").exists());
        assert!(scratch_is_empty(&s));

        s.remove(&child).unwrap();
        assert!(!s.exists(&child) && s.exists(&base));
        assert!(matches!(
            s.remove(&child),
            Err(SnapshotError::NotFound { .. })
        ));
    }

    #[test]
    fn copy_commit_prepare_and_remove() {
        let Some((_dir, s)) = open(Driver::Copy) else {
            return;
        };
        let (base, child) = commit_two(&s);
        let child_fs = s
            .root()
            .join(SNAPSHOTS)
            .join(snapshot_id(&child).unwrap())
            .join("fs");
        assert_eq!(
            tree(&child_fs),
            merged(),
            "the merged tree, whiteouts applied"
        );
        let base_fs = s
            .root()
            .join(SNAPSHOTS)
            .join(snapshot_id(&base).unwrap())
            .join("fs");
        assert!(base_fs.join("b/z").exists(), "the parent is untouched");

        let mounts = s.prepare("default/c1", &child).unwrap();
        let fs_dir = s.root().join("active/default/c1/fs");
        assert_eq!(
            mounts,
            vec![Mount {
                kind: "bind".into(),
                source: fs_dir.display().to_string(),
                options: vec!["rbind".into(), "rw".into()],
            }]
        );
        assert_eq!(tree(&fs_dir), merged());
        let target = tempfile::tempdir().unwrap();
        {
            let _mounted = mount(&mounts[0], target.path());
            assert_eq!(tree(target.path()), merged());
        }
        assert_eq!(
            s.active().unwrap(),
            vec![("default/c1".to_owned(), child.clone())]
        );
        s.remove_active("default/c1").unwrap();
        assert!(s.active().unwrap().is_empty());
        assert!(s.exists(&child));
    }

    #[test]
    fn copies_keep_links_owners_modes_xattrs_and_nodes() {
        let Some((_dir, s)) = open(Driver::Copy) else {
            return;
        };
        let layer = Layer::new()
            .entry(EntryType::Directory, "d/", 0o750, b"", |h| {
                h.set_uid(5);
                h.set_mtime(77);
            })
            .pax(&[("SCHILY.xattr.user.k", b"v"), ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")])
            .entry(EntryType::Regular, "d/suid", 0o4711, b"bin", |h| {
                h.set_uid(1000);
                h.set_gid(100);
            })
            .hardlink("d/link", "d/suid")
            .symlink("d/sym", "../nowhere")
            .entry(EntryType::Char, "d/null", 0o666, b"", |h| {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            })
            .entry(EntryType::Fifo, "d/fifo", 0o600, b"", |_| {})
            .finish();
        let d1 = sha256(&layer);
        let base = chain_of(None, &d1);
        s.commit_layer(&base, None, &d1, &layer[..]).unwrap();
        let empty = Layer::new().finish();
        let d2 = sha256(&empty);
        let child = chain_of(Some(&base), &d2);
        s.commit_layer(&child, Some(&base), &d2, &empty[..])
            .unwrap();
        s.prepare("ns/copy", &child).unwrap();

        for root in [
            s.root()
                .join(SNAPSHOTS)
                .join(snapshot_id(&child).unwrap())
                .join("fs"),
            s.root().join("active/ns/copy/fs"),
        ] {
            let d = fs::symlink_metadata(root.join("d")).unwrap();
            assert_eq!((d.mode() & 0o7777, d.uid(), d.mtime()), (0o750, 5, 77));
            let suid = fs::symlink_metadata(root.join("d/suid")).unwrap();
            assert_eq!(
                (suid.mode() & 0o7777, suid.uid(), suid.gid()),
                (0o4711, 1000, 100)
            );
            let link = fs::symlink_metadata(root.join("d/link")).unwrap();
            assert_eq!((link.ino(), link.nlink()), (suid.ino(), 2));
            let mut buf = [0u8; 64];
            let n = rfs::lgetxattr(root.join("d/suid"), "user.k", &mut buf[..]).unwrap();
            assert_eq!(&buf[..n], b"v");
            let n =
                rfs::lgetxattr(root.join("d/suid"), "security.capability", &mut buf[..]).unwrap();
            assert_eq!(n, 20, "file capabilities survive the chown");
            assert_eq!(
                fs::read_link(root.join("d/sym")).unwrap(),
                Path::new("../nowhere")
            );
            let null = fs::symlink_metadata(root.join("d/null")).unwrap();
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), rfs::makedev(1, 3));
            assert!(
                fs::symlink_metadata(root.join("d/fifo"))
                    .unwrap()
                    .file_type()
                    .is_fifo()
            );
        }
    }

    #[test]
    fn failed_commits_leave_nothing() {
        for driver in [Driver::Overlay, Driver::Copy] {
            let Some((_dir, s)) = open(driver) else {
                return;
            };
            let (base, _) = commit_two(&s);
            let layer = Layer::new().file("f", b"data").finish();
            let diff_id = sha256(&layer);
            let chain = chain_of(Some(&base), &diff_id);
            let wrong = sha256(b"other");
            let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
                ("wrong diff id", layer.clone(), wrong.as_str(), Some(&base)),
                (
                    "truncated",
                    gzip(&layer)[..30].to_vec(),
                    diff_id.as_str(),
                    Some(&base),
                ),
                (
                    "escape",
                    Layer::new().file("../x", b"").finish(),
                    diff_id.as_str(),
                    Some(&base),
                ),
                (
                    "missing parent",
                    layer.clone(),
                    diff_id.as_str(),
                    Some(&wrong),
                ),
            ];
            for (what, data, diff, parent) in cases {
                let err = s.commit_layer(&chain, parent, diff, &data[..]).unwrap_err();
                let expected = match what {
                    "wrong diff id" => matches!(err, SnapshotError::DiffId { .. }),
                    "truncated" => matches!(err, SnapshotError::Unpack(UnpackError::Corrupt(_))),
                    "escape" => matches!(err, SnapshotError::Unpack(UnpackError::Escape { .. })),
                    _ => matches!(err, SnapshotError::NotFound { .. }),
                };
                assert!(expected, "{driver:?} {what}: {err}");
                assert!(!s.exists(&chain), "{driver:?} {what}");
                assert_eq!(
                    fs::read_dir(s.root().join(SNAPSHOTS)).unwrap().count(),
                    2,
                    "{driver:?} {what}"
                );
                assert!(scratch_is_empty(&s), "{driver:?} {what}");
            }
            let err = s
                .commit_with("sha256:0123456789abcdef0000", None, |_| {
                    Err(io::Error::other("no"))
                })
                .unwrap_err();
            assert!(matches!(err, SnapshotError::Io { .. }), "{err}");
            assert!(scratch_is_empty(&s));
        }
    }

    #[test]
    fn concurrent_commits_of_one_chain_all_succeed() {
        for driver in [Driver::Overlay, Driver::Copy] {
            let Some((_dir, s)) = open(driver) else {
                return;
            };
            let (base, _) = commit_two(&s);
            let layer = Layer::new()
                .dir("many/")
                .file("many/a", &[7u8; 100_000])
                .file("many/b", b"b")
                .finish();
            let diff_id = sha256(&layer);
            let chain = chain_of(Some(&base), &diff_id);
            let results: Vec<_> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| s.commit_layer(&chain, Some(&base), &diff_id, &layer[..]))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for result in results {
                let c = result.unwrap();
                assert_eq!(
                    (c.chain.as_str(), c.parent.as_deref()),
                    (chain.as_str(), Some(base.as_str()))
                );
            }
            assert_eq!(fs::read_dir(s.root().join(SNAPSHOTS)).unwrap().count(), 3);
            assert!(scratch_is_empty(&s));
            // Committing it again reads what is there.
            let again = s
                .commit_layer(&chain, Some(&base), &diff_id, &b""[..])
                .unwrap();
            assert_eq!(again.chain, chain);
        }
    }

    #[test]
    fn id_prefix_collisions_are_errors() {
        let Some((_dir, s)) = open(Driver::Copy) else {
            return;
        };
        let first = format!("sha256:{}{}", "ab".repeat(8), "0".repeat(48));
        let second = format!("sha256:{}{}", "ab".repeat(8), "1".repeat(48));
        s.commit_with(&first, None, |fs| std::fs::write(fs.join("x"), b"1"))
            .unwrap();
        let err = s.commit_with(&second, None, |_| Ok(())).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert!(s.exists(&first) && !s.exists(&second));
        assert!(matches!(
            s.prepare("a/b", &second),
            Err(SnapshotError::NotFound { .. })
        ));
        assert!(matches!(
            s.image(&second),
            Err(SnapshotError::NotFound { .. })
        ));
    }

    #[test]
    fn keys_and_chain_ids_are_checked() {
        for key in [
            "default/c1",
            "k8s.io/abc_DEF-1.2",
            &format!("a/{}", "x".repeat(76)),
        ] {
            assert!(parse_key(key).is_ok(), "{key}");
        }
        for key in [
            "nokey",
            "/x",
            "x/",
            "a/b/c",
            "a/../b",
            "../x",
            "a/.hidden",
            "a/-x",
            "a/b c",
            &format!("a/{}", "x".repeat(77)),
        ] {
            assert!(
                matches!(parse_key(key), Err(SnapshotError::BadKey { .. })),
                "{key}"
            );
        }
        assert_eq!(
            snapshot_id(&format!("sha256:{}", "0123456789abcdef".repeat(4))).unwrap(),
            "0123456789abcdef"
        );
        for chain in [
            "sha256",
            "sha256:abc",
            "sha256:../../../etc/passwd00",
            ":0123456789abcdef",
            "SHA256:0123456789abcdef",
            "sha256:0123456789ABCDEF",
        ] {
            assert!(snapshot_id(chain).is_err(), "{chain}");
        }
        if let Some((_dir, s)) = open(Driver::Copy) {
            assert!(matches!(
                s.prepare("bad key", "sha256:0"),
                Err(SnapshotError::BadKey { .. })
            ));
            assert!(matches!(
                s.remove_active("../x"),
                Err(SnapshotError::BadKey { .. })
            ));
            assert!(matches!(
                s.commit_with("nope", None, |_| Ok(())),
                Err(SnapshotError::BadKey { .. })
            ));
            assert!(!s.exists("nope"));
        }
    }

    #[test]
    fn images_of_chains_longer_than_a_page_of_mount_options() {
        let Some((_dir, s)) = open(Driver::Overlay) else {
            return;
        };
        let mut parent: Option<String> = None;
        let layers = 120;
        for i in 0..layers {
            let layer = Layer::new().file(&format!("f{i}"), b"x").finish();
            let diff_id = sha256(&layer);
            let chain = chain_of(parent.as_deref(), &diff_id);
            s.commit_layer(&chain, parent.as_deref(), &diff_id, &layer[..])
                .unwrap();
            parent = Some(chain);
        }
        let top = parent.unwrap();
        let lowerdir = s.lowers(&top).unwrap().len()
            * s.root()
                .join("snapshots/0123456789abcdef/fs")
                .as_os_str()
                .len();
        assert!(lowerdir > MOUNT_DATA_MAX);
        let image = match s.image(&top) {
            Ok(image) => image,
            Err(e) => {
                eprintln!("skipped: long chains need `lowerdir+` (Linux 6.8+): {e}");
                return;
            }
        };
        assert_erofs(&image);
        if let Some(view) = erofs_tree(&image) {
            assert_eq!(view.len(), layers);
        }
    }

    /// The EROFS superblock sits at offset 1024 and starts with its magic.
    fn assert_erofs(path: &Path) {
        let data = fs::read(path).unwrap();
        assert!(data.len() > 1028);
        assert_eq!(
            u32::from_le_bytes(data[1024..1028].try_into().unwrap()),
            0xE0F5_E1E2
        );
    }

    /// Mounts an EROFS image file (file-backed mounts: Linux 6.12+) and lists it.
    fn erofs_tree(image: &Path) -> Option<std::collections::BTreeMap<String, String>> {
        let target = tempfile::tempdir().unwrap();
        if let Err(e) = nix::mount::mount(
            Some(image),
            target.path(),
            Some("erofs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            eprintln!("not checking the image's contents: cannot mount EROFS files here: {e}");
            return None;
        }
        let _mounted = Mounted(target.path().to_owned());
        Some(tree(target.path()))
    }

    #[test]
    fn images_are_built_once_and_hold_the_merged_tree() {
        if Command::new("mkfs.erofs").arg("--help").output().is_err() {
            eprintln!("skipped: mkfs.erofs is not installed");
            return;
        }
        for driver in [Driver::Overlay, Driver::Copy] {
            let Some((_dir, s)) = open(driver) else {
                return;
            };
            let (base, child) = commit_two(&s);
            let image = s.image(&child).unwrap();
            assert_eq!(
                image,
                s.root()
                    .join(EROFS)
                    .join(format!("{}.erofs", snapshot_id(&child).unwrap()))
            );
            assert_erofs(&image);
            let inode = fs::metadata(&image).unwrap().ino();
            assert_eq!(s.image(&child).unwrap(), image);
            assert_eq!(
                fs::metadata(&image).unwrap().ino(),
                inode,
                "{driver:?}: reused"
            );
            if let Some(view) = erofs_tree(&image) {
                assert_eq!(view, merged(), "{driver:?}: no whiteouts in the image");
            }
            // A single layer (overlay: mounted over an empty second lower).
            let image = s.image(&base).unwrap();
            assert_erofs(&image);
            if let Some(view) = erofs_tree(&image) {
                assert!(view.contains_key("b/z") && view.contains_key("o/sub/old2"));
            }
            // Concurrent builders of one image share it.
            let (d, layer) = {
                let layer = Layer::new().file("x", b"x").finish();
                (sha256(&layer), layer)
            };
            let third = chain_of(Some(&child), &d);
            s.commit_layer(&third, Some(&child), &d, &layer[..])
                .unwrap();
            let paths: Vec<_> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..4)
                    .map(|_| scope.spawn(|| s.image(&third).unwrap()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(paths.iter().all(|p| *p == paths[0]));
            assert_erofs(&paths[0]);
            assert!(scratch_is_empty(&s), "{driver:?}");

            s.remove(&third).unwrap();
            assert!(!paths[0].exists(), "{driver:?}: remove deletes the image");
            assert!(matches!(
                s.image(&third),
                Err(SnapshotError::NotFound { .. })
            ));
        }
    }
}
