//! The content store: blobs keyed by digest, as containerd's local store lays them out
//! (`blobs/sha256/<hex>`).
//!
//! Every blob arrives through an [`Ingest`]: bytes go to `ingest/<hex>`, hashed as they come;
//! [`Ingest::commit`] checks size and digest, syncs, and renames the file into `blobs/`. So a
//! blob under its final name is always complete and verified, and a bad one never lands. An
//! ingest interrupted by a network error is kept and resumed by the next pull of the same digest
//! (its bytes are re-hashed, then the download continues from its length); a failed check deletes
//! it. A blob whose digest is unknown up front (a `docker save` layer) is ingested under a
//! random name and committed under the digest it hashes to.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("digest {0:?}: not a sha256 digest (sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("blob {0}: not in the content store")]
    NotFound(String),
    #[error("blob {expected}: content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest}: {size} bytes is more than the {limit} allowed for this kind of blob")]
    TooLarge {
        digest: String,
        size: u64,
        limit: u64,
    },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, ContentError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ContentError + 'a {
    move |source| ContentError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The hex part of a `sha256:<hex>` digest, checked.
pub fn digest_hex(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(ContentError::BadDigest(digest.to_owned())),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> Result<ContentStore> {
        let blobs = root.join("blobs").join("sha256");
        let ingest = root.join("ingest");
        for d in [root, &root.join("blobs"), &blobs, &ingest] {
            fsutil::private_dir(d).map_err(io_err("create", d))?;
        }
        Ok(ContentStore { blobs, ingest })
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.blobs.join(digest_hex(digest)?))
    }

    /// The blob's size, if it is present.
    pub fn size(&self, digest: &str) -> Option<u64> {
        let path = self.path(digest).ok()?;
        fs::metadata(path).ok().map(|m| m.len())
    }

    pub fn exists(&self, digest: &str) -> bool {
        self.size(digest).is_some()
    }

    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContentError::NotFound(digest.to_owned()),
            _ => ContentError::Io {
                op: "open",
                path,
                source: e,
            },
        })
    }

    /// Reads a small blob (a manifest, index or config) whole, refusing one over `limit` bytes.
    pub fn read(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        let f = self.open_blob(digest)?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        if size > limit {
            return Err(ContentError::TooLarge {
                digest: digest.to_owned(),
                size,
                limit,
            });
        }
        // A hint only: `size` is at most `limit`.
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let path = self.path(digest)?;
        f.take(limit)
            .read_to_end(&mut buf)
            .map_err(io_err("read", &path))?;
        Ok(buf)
    }

    /// Writes `bytes` as blob `digest` (verified), unless it is there already.
    pub fn put(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        if self.exists(digest) {
            return Ok(());
        }
        let mut w = self.ingest(Some(digest), Some(bytes.len() as u64))?;
        if w.offset() > 0 {
            w.discard();
            w = self.ingest(Some(digest), Some(bytes.len() as u64))?;
        }
        w.write_all(bytes)?;
        w.commit()?;
        Ok(())
    }

    /// Starts (or resumes) ingesting blob `digest`; with `None`, the digest is whatever the
    /// content hashes to. `size`, if known, is checked at commit.
    ///
    /// The ingest file of a digest is locked (`flock`) by its writer; a second writer of the
    /// same digest at the same time (two pulls sharing a layer) gets a private file instead,
    /// and whichever commits last renames identical bytes over the first.
    pub fn ingest(&self, digest: Option<&str>, size: Option<u64>) -> Result<Ingest> {
        if let Some(d) = digest {
            let path = self.ingest.join(digest_hex(d)?);
            if let Some(file) = Self::lock_ingest(&path)? {
                return Self::resume(file, path, self.blobs.clone(), d, size);
            }
        }
        let path = self
            .ingest
            .join(format!("anon-{}-{}", std::process::id(), unique()));
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .mode(fsutil::FILE_MODE)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok(Ingest {
            blobs: self.blobs.clone(),
            path,
            file: Some(file),
            hasher: Sha256::new(),
            offset: 0,
            expected: digest.map(str::to_owned),
            size,
            anonymous: true,
        })
    }

    /// Opens and locks `path`; `None` if another writer holds it.
    fn lock_ingest(path: &Path) -> Result<Option<File>> {
        use std::os::unix::fs::MetadataExt;
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(fsutil::FILE_MODE)
            .open(path)
            .map_err(io_err("create", path))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Ok(None);
        }
        // Between our open and our lock the previous holder may have committed (renamed) the
        // file we opened: then it is a blob now, not ours to append to.
        let ours = file.metadata().map(|m| m.ino()).ok();
        let named = fs::metadata(path).map(|m| m.ino()).ok();
        if ours.is_none() || ours != named {
            return Ok(None);
        }
        Ok(Some(file))
    }

    fn resume(
        mut file: File,
        path: PathBuf,
        blobs: PathBuf,
        digest: &str,
        size: Option<u64>,
    ) -> Result<Ingest> {
        // Re-hash what an earlier, interrupted ingest wrote; a partial file longer than the
        // blob is junk.
        let mut hasher = Sha256::new();
        let mut offset = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        if size.is_some_and(|s| offset > s) {
            file.set_len(0).map_err(io_err("truncate", &path))?;
            hasher = Sha256::new();
            offset = 0;
        }
        Ok(Ingest {
            blobs,
            path,
            file: Some(file),
            hasher,
            offset,
            expected: Some(digest.to_owned()),
            size,
            anonymous: false,
        })
    }

    /// Every blob: `(digest, size)`.
    pub fn list(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.blobs).map_err(io_err("read", &self.blobs))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if digest_hex(&digest).is_ok() {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((digest, size));
            }
        }
        Ok(out)
    }

    /// Removes a blob; a missing one is not an error.
    pub fn remove(&self, digest: &str) -> Result<()> {
        let path = self.path(digest)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ContentError::Io {
                op: "remove",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Removes ingest files not written for `max_age` (abandoned downloads and imports).
    pub fn clean_ingests(&self, max_age: std::time::Duration) -> usize {
        let mut removed = 0;
        let Ok(rd) = fs::read_dir(&self.ingest) else {
            return 0;
        };
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= max_age);
            if old && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A blob being written. Dropped without [`commit`](Ingest::commit), the partial file stays
/// for a later resume (anonymous ingests are removed).
pub struct Ingest {
    blobs: PathBuf,
    path: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    offset: u64,
    expected: Option<String>,
    size: Option<u64>,
    /// A private file (unknown digest, or a digest another writer is ingesting): removed when
    /// dropped, never resumed.
    anonymous: bool,
}

impl Ingest {
    /// Bytes written so far (including those of a resumed ingest).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.write_all(bytes).map_err(io_err("write", &self.path))?;
        }
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// The digest the bytes written so far hash to (what an anonymous ingest will commit as).
    pub fn digest(&self) -> String {
        format!("sha256:{:x}", self.hasher.clone().finalize())
    }

    /// Deletes the partial file (its bytes are known bad).
    pub fn discard(mut self) {
        self.file = None;
        let _ = fs::remove_file(&self.path);
    }

    /// Verifies and moves the blob into the store; returns its digest. On a mismatch the
    /// partial file is deleted.
    pub fn commit(mut self) -> Result<String> {
        let actual = format!("sha256:{:x}", self.hasher.clone().finalize());
        let digest = self.expected.clone().unwrap_or_else(|| actual.clone());
        if let Some(expected) = self.size
            && expected != self.offset
        {
            let e = ContentError::SizeMismatch {
                digest,
                expected,
                actual: self.offset,
            };
            self.discard();
            return Err(e);
        }
        if actual != digest {
            self.discard();
            return Err(ContentError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        let Some(file) = self.file.as_ref() else {
            return Ok(digest);
        };
        file.sync_all().map_err(io_err("sync", &self.path))?;
        #[cfg(debug_assertions)]
        fail::fail_point!("images.content.commit");
        let dest = self.blobs.join(digest_hex(&digest)?);
        // Renamed while still locked, so no other writer can take the name meanwhile; and the
        // rename made durable before any record (a manifest, an image) can name the blob.
        fs::rename(&self.path, &dest).map_err(io_err("rename", &self.path))?;
        self.file = None;
        fsutil::sync_dir(&self.blobs).map_err(io_err("sync", &self.blobs))?;
        Ok(digest)
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.file.is_some() && self.anonymous {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn put_verifies_and_stores_once() {
        let (_d, s) = store();
        let data = b"hello layer";
        let digest = sha256_digest(data);
        s.put(&digest, data).unwrap();
        assert_eq!(s.size(&digest), Some(data.len() as u64));
        assert_eq!(s.read(&digest, 100).unwrap(), data);
        assert!(matches!(
            s.read(&digest, 3),
            Err(ContentError::TooLarge { .. })
        ));
        let wrong = sha256_digest(b"other");
        let e = s.put(&wrong, data).unwrap_err();
        assert!(matches!(e, ContentError::DigestMismatch { .. }), "{e}");
        assert!(!s.exists(&wrong));
        assert_eq!(s.list().unwrap().len(), 1);
        assert_eq!(
            fs::read_dir(&s.ingest).unwrap().count(),
            0,
            "no ingest left"
        );
    }

    #[test]
    fn interrupted_ingest_resumes() {
        let (_d, s) = store();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let digest = sha256_digest(&data);
        let mut w = s.ingest(Some(&digest), Some(data.len() as u64)).unwrap();
        w.write_all(&data[..40_000]).unwrap();
        drop(w);
        let mut w = s.ingest(Some(&digest), Some(data.len() as u64)).unwrap();
        assert_eq!(w.offset(), 40_000);
        w.write_all(&data[40_000..]).unwrap();
        assert_eq!(w.commit().unwrap(), digest);
        assert_eq!(s.read(&digest, 1 << 20).unwrap(), data);
    }

    #[test]
    fn concurrent_ingests_of_one_digest_both_commit() {
        let (_d, s) = store();
        let data = b"shared layer bytes";
        let digest = sha256_digest(data);
        let mut a = s.ingest(Some(&digest), None).unwrap();
        let mut b = s.ingest(Some(&digest), None).unwrap();
        a.write_all(&data[..5]).unwrap();
        b.write_all(data).unwrap();
        a.write_all(&data[5..]).unwrap();
        assert_eq!(b.commit().unwrap(), digest);
        assert_eq!(a.commit().unwrap(), digest);
        assert_eq!(s.read(&digest, 100).unwrap(), data);
        assert_eq!(fs::read_dir(&s.ingest).unwrap().count(), 0);
    }

    #[test]
    fn size_mismatch_and_anonymous_ingest() {
        let (_d, s) = store();
        let digest = sha256_digest(b"abc");
        let mut w = s.ingest(Some(&digest), Some(4)).unwrap();
        w.write_all(b"abc").unwrap();
        assert!(matches!(w.commit(), Err(ContentError::SizeMismatch { .. })));
        let mut w = s.ingest(None, None).unwrap();
        w.write_all(b"abc").unwrap();
        assert_eq!(w.commit().unwrap(), digest);
        let w = s.ingest(None, None).unwrap();
        drop(w);
        assert_eq!(fs::read_dir(&s.ingest).unwrap().count(), 0);
        assert!(matches!(
            digest_hex("sha256:../../etc"),
            Err(ContentError::BadDigest(_))
        ));
    }
}
