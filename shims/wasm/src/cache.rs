//! The precompilation cache: compiled artifacts on disk, keyed by the module's digest, the
//! wasmtime version and the engine's configuration, so a second run loads native code instead
//! of compiling.
//!
//! An artifact is native code the worker will execute, so only root may write the cache: the
//! directory (and every directory above it) must belong to root and not be writable by anyone
//! else ([`check_dir`]), and only the parent, which never runs guest code, reads and writes it.
//! An entry is still not trusted as it is: the file carries the SHA-256 of its payload, checked
//! before wasmtime sees it, and wasmtime itself refuses an artifact built by another version or
//! configuration. An entry failing either check is deleted and the module recompiled.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 16] = b"yard-wasm-cwasm1";

/// Why a cache directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} belongs to uid {uid}, not root", path.display())]
    NotRoot { path: PathBuf, uid: u32 },
    #[error("{} is writable by group or others (mode {mode:04o})", path.display())]
    Writable { path: PathBuf, mode: u32 },
}

/// Create `dir` if missing (mode 0700) and check that only root can change what is in it: it
/// and each directory above it belong to root, it is not writable by group or others, and an
/// ancestor is only if sticky (as `/tmp` is: there nobody can replace root's entries).
pub fn check_dir(dir: &Path) -> Result<(), CacheDirError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CacheDirError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    for (i, p) in dir.ancestors().enumerate() {
        let m = std::fs::metadata(p).map_err(io(p))?;
        if m.uid() != 0 {
            return Err(CacheDirError::NotRoot {
                path: p.to_owned(),
                uid: m.uid(),
            });
        }
        let mode = m.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && (i == 0 || !sticky) {
            return Err(CacheDirError::Writable {
                path: p.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

/// Where one module's artifact lives.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
}

/// The cache key: module digest, wasmtime version, and the engine's compatibility hash.
pub fn entry(dir: &Path, digest: &str, engine: &wasmtime::Engine, kind: &str) -> Entry {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let compat = h.finish();
    let mut key = Sha256::new();
    key.update(digest.as_bytes());
    key.update(crate::WASMTIME_VERSION.as_bytes());
    key.update(compat.to_le_bytes());
    key.update(kind.as_bytes());
    let key = hex(&key.finalize());
    Entry {
        path: dir.join(format!("{}.cwasm", &key[..32])),
    }
}

/// The artifact's bytes if the entry exists and its checksum holds. A damaged entry is removed.
pub fn load(entry: &Entry) -> Option<Vec<u8>> {
    let bytes = std::fs::read(&entry.path).ok()?;
    let ok = bytes.len() > MAGIC.len() + 32
        && &bytes[..MAGIC.len()] == MAGIC
        && Sha256::digest(&bytes[MAGIC.len() + 32..])[..] == bytes[MAGIC.len()..MAGIC.len() + 32];
    if ok {
        Some(bytes[MAGIC.len() + 32..].to_vec())
    } else {
        tracing::warn!(path = %entry.path.display(), "discarding a damaged cache entry");
        discard(entry);
        None
    }
}

pub fn discard(entry: &Entry) {
    let _ = std::fs::remove_file(&entry.path);
}

/// Store an artifact atomically (temp file, then rename). Failures only cost a recompile later.
pub fn store(entry: &Entry, artifact: &[u8]) {
    let Some(dir) = entry.path.parent() else {
        return;
    };
    let r = (|| -> std::io::Result<()> {
        let mut tmp = tempfile_in(dir)?;
        tmp.1.write_all(MAGIC)?;
        tmp.1.write_all(&Sha256::digest(artifact))?;
        tmp.1.write_all(artifact)?;
        tmp.1.sync_all()?;
        std::fs::rename(&tmp.0, &entry.path)
    })();
    if let Err(e) = r {
        tracing::warn!(path = %entry.path.display(), error = %e, "cannot cache a compiled module");
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    Ok((path, f))
}

pub fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dirs_must_be_roots_alone() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        // Under the sticky, world-writable temp dir: fine.
        let top = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = top.path().join("a/cache");
        check_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(&dir)
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o700);
        let chmod = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        chmod(&dir, 0o770);
        let e = check_dir(&dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.ends_with("cache is writable by group or others (mode 0770)"),
            "{e}"
        );
        chmod(&dir, 0o700);
        // A writable parent lets others swap the directory.
        chmod(&top.path().join("a"), 0o777);
        let e = check_dir(&dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("/a is writable by group or others (mode 0777)"),
            "{e}"
        );
        chmod(&top.path().join("a"), 0o755);
        rustix::fs::chown(&dir, Some(rustix::fs::Uid::from_raw(1000)), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let e = check_dir(&dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.ends_with("cache belongs to uid 1000, not root"), "{e}");
    }

    #[test]
    fn roundtrip_and_damage() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = Entry {
            path: dir.path().join("x.cwasm"),
        };
        assert_eq!(load(&e), None);
        store(&e, b"native code");
        assert_eq!(load(&e).as_deref(), Some(&b"native code"[..]));
        // Flip one payload byte: the entry is refused and removed.
        let mut bytes = std::fs::read(&e.path).unwrap_or_default();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&e.path, bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(&e), None);
        assert!(!e.path.exists());
        // Truncated garbage is refused too.
        std::fs::write(&e.path, b"yard").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(&e), None);
    }
}
