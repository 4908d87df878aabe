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
    fn snapshot_dir(&self, chain: &str) -> PathBuf {
        let hex = chain.strip_prefix("sha256:").unwrap_or(chain);
        let id: String = hex.chars().take(16).collect();
        self.root().join("snapshots").join(id)
    }

    /// Reads `rel` (a relative path without `..`) from chain `chain`'s merged tree: `None` if
    /// it is missing, whited out, or not a regular file. No symlink is followed, so a link in
    /// an image cannot make this read a host file.
    pub fn read_file(&self, chain: &str, rel: &Path) -> Result<Option<Vec<u8>>, SnapshotError> {
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Ok(None);
        }
        let mut cur = Some(chain.to_owned());
        while let Some(chain) = cur {
            let dir = self.snapshot_dir(&chain);
            // The directory is named by a prefix of the chain id; its `chain` file says whose.
            let recorded = fs::read_to_string(dir.join("chain")).unwrap_or_default();
            if recorded.trim() != chain {
                return Err(SnapshotError::NotFound { chain });
            }
            let fs_dir = dir.join("fs");
            match lookup(&fs_dir, rel) {
                Found::File(path) => {
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
                    return Ok(Some(buf));
                }
                Found::Hidden => return Ok(None),
                Found::Missing => {}
            }
            if self.driver() == Driver::Copy {
                return Ok(None);
            }
            cur = fs::read_to_string(dir.join("parent"))
                .ok()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty());
        }
        Ok(None)
    }

    /// How long ago active snapshot `key` was made.
    pub fn active_age(&self, key: &str) -> Option<Duration> {
        let m = fs::symlink_metadata(self.root().join("active").join(key)).ok()?;
        m.modified().ok()?.elapsed().ok()
    }
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
