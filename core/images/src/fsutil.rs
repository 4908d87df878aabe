//! File-system steps the store repeats: private directories, and the directory `fsync` that
//! makes a rename durable.
//!
//! A rename is durable only once the directory holding the new name is synced; until then a
//! crash may bring back the old state while a record written after the rename (an image record,
//! a container naming its root) already names the new one. So every rename whose result a later
//! record depends on is followed by [`sync_dir`] of its destination's directory.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of the store's directories, blobs and images: other users of the host read none of it
/// (image content may hold secrets; a path listing tells what runs here).
pub(crate) const DIR_MODE: u32 = 0o700;
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `path` and any missing parents as private directories, and makes `path` itself
/// private if it existed with looser permissions.
pub(crate) fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    let mode = fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if mode != DIR_MODE {
        fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Syncs directory `dir`, so the names created, renamed or removed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Syncs the directory holding `path`.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Flushes the whole file system holding `path` (`syncfs`): one call for a tree of freshly
/// written files, where an `fsync` each would cost a disk flush per file.
pub(crate) fn sync_fs(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    rustix::fs::syncfs(&file)?;
    Ok(())
}
