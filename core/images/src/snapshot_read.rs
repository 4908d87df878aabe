//! Reading committed snapshots without mounting them: the image's `/etc/passwd` for a `User`
//! lookup, and the age of active snapshots for garbage collection. Follows the layout
//! documented in [`crate::snapshot`].

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::snapshot::{Driver, SnapshotError, Snapshotter};

/// Largest file [`Snapshotter::read_file`] reads.
const MAX_READ: u64 = 1 << 20;

impl Snapshotter {
    /// Reads `rel` (a relative path without `..`) from chain `chain`'s merged tree: `None` if
    /// it is missing, whited out, or not a regular file. No symlink is followed, so a link in
    /// an image cannot make this read a host file.
    pub fn read_file(&self, chain: &str, rel: &Path) -> Result<Option<Vec<u8>>, SnapshotError> {
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Ok(None);
        }
        for fs_dir in self.lowers(chain)? {
            match lookup(&fs_dir, rel) {
                Found::File(path) => return read_limited(path).map(Some),
                Found::Hidden => return Ok(None),
                // The copy driver's top snapshot holds the whole tree.
                Found::Missing if self.driver() == Driver::Copy => return Ok(None),
                Found::Missing => {}
            }
        }
        Ok(None)
    }

    /// How long ago active snapshot `key` was made.
    pub fn active_age(&self, key: &str) -> Option<Duration> {
        let m = fs::symlink_metadata(self.root().join("active").join(key)).ok()?;
        m.modified().ok()?.elapsed().ok()
    }
}

fn read_limited(path: PathBuf) -> Result<Vec<u8>, SnapshotError> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| SnapshotError::Io {
            op: "open",
            path: path.clone(),
            source,
        })?;
    let mut buf = Vec::new();
    f.take(MAX_READ)
        .read_to_end(&mut buf)
        .map_err(|source| SnapshotError::Io {
            op: "read",
            path,
            source,
        })?;
    Ok(buf)
}

enum Found {
    File(PathBuf),
    /// A whiteout, an opaque directory above it, or something not a file: lower layers'
    /// copies do not show.
    Hidden,
    Missing,
}

fn lookup(root: &Path, rel: &Path) -> Found {
    let mut p = root.to_path_buf();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        p.push(c);
        let Ok(m) = fs::symlink_metadata(&p) else {
            return Found::Missing;
        };
        let t = m.file_type();
        if t.is_char_device() && m_rdev_zero(&m) {
            return Found::Hidden;
        }
        if i + 1 == n {
            return if t.is_file() {
                Found::File(p)
            } else {
                Found::Hidden
            };
        }
        if !t.is_dir() {
            return Found::Hidden;
        }
        if xattr_opaque(&p) {
            // An opaque directory hides the lower layers below this point.
            return match lookup(&p, &rel.components().skip(i + 1).collect::<PathBuf>()) {
                Found::Missing => Found::Hidden,
                f => f,
            };
        }
    }
    Found::Missing
}

fn m_rdev_zero(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    m.rdev() == 0
}

fn xattr_opaque(p: &Path) -> bool {
    let mut buf = [0u8; 4];
    matches!(
        rustix::fs::lgetxattr(p, "trusted.overlay.opaque", &mut buf),
        Ok(1) if buf[0] == b'y'
    )
}
