//! The rootfs image cache: a container's rootfs directory becomes a read-only filesystem image
//! (EROFS, or ext4 where erofs-utils is missing) that the VM gets as a virtio-blk disk. Images
//! are keyed by a digest of the tree, so the second sandbox of the same rootfs boots from the
//! image the first one built.
//!
//! **The digest covers metadata, not content**, the bet `make` and rsync's quick check make:
//! for every entry, without following symlinks, its relative path, file type, mode, uid, gid,
//! size, link count, mtime and ctime (in nanoseconds), symlink target and device numbers. Reading
//! every byte of a multi-gigabyte rootfs on each container start would cost seconds; a walk
//! costs milliseconds. Any change made through the filesystem moves the ctime, which no user can
//! set back (tools like `tar` and `touch -d` restore mtimes, not ctimes), so a changed tree gets
//! a new digest. The price is the other way round: an identical tree copied elsewhere has new
//! ctimes and builds its own image (a cache miss, never a wrong hit).
//!
//! Builds go to a temporary file in the cache directory and are renamed into place, so an image
//! under its final name is always complete. Concurrent shims asking for the same digest
//! serialize on `flock(<dir>/<digest>.lock)` and the later ones find the image built; the lock
//! dies with its holder, so a crashed build blocks nobody. [`ImageCache::image_for`] blocks:
//! call it from `spawn_blocking`.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use sha2::{Digest, Sha256};

use crate::sys;

/// Changing how images are built or digested must change this, so old images are not reused.
const DIGEST_VERSION: &[u8] = b"switchyard rootfs image v1\0";

/// How much of a failed build's stderr goes into the error.
const STDERR_TAIL: usize = 2048;

/// A filesystem an image can be built as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// `mkfs.erofs` (erofs-utils): compact, read-only by design, fast to build.
    Erofs,
    /// `mkfs.ext4 -d` (e2fsprogs), without a journal: the fallback.
    Ext4,
}

impl ImageFormat {
    /// The guest's `mount -t` type, also the image file's extension.
    pub fn fstype(self) -> &'static str {
        match self {
            ImageFormat::Erofs => "erofs",
            ImageFormat::Ext4 => "ext4",
        }
    }

    fn tool(self) -> &'static str {
        match self {
            ImageFormat::Erofs => "mkfs.erofs",
            ImageFormat::Ext4 => "mkfs.ext4",
        }
    }

    const ALL: [ImageFormat; 2] = [ImageFormat::Erofs, ImageFormat::Ext4];

    /// The filesystem's superblock magic is in place (at 1024: EROFS `0xE0F5E1E2`, ext4
    /// `0xEF53` 56 bytes in).
    pub fn has_superblock(self, image: &Path) -> bool {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 4];
        let (offset, magic): (u64, &[u8]) = match self {
            ImageFormat::Erofs => (1024, &0xE0F5_E1E2u32.to_le_bytes()),
            ImageFormat::Ext4 => (1024 + 56, &0xEF53u16.to_le_bytes()),
        };
        File::open(image)
            .and_then(|f| f.read_exact_at(&mut buf[..magic.len()], offset))
            .is_ok_and(|()| &buf[..magic.len()] == magic)
    }
}

/// A built image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub path: PathBuf,
    /// Hex SHA-256 of the tree's metadata (see the module docs).
    pub digest: String,
    /// The image file's size.
    pub bytes: u64,
    pub format: ImageFormat,
}

impl Image {
    /// `erofs` or `ext4`: what the guest mounts it as.
    pub fn fstype(&self) -> &'static str {
        self.format.fstype()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("rootfs {} not found", rootfs.display())]
    RootfsMissing { rootfs: PathBuf },
    #[error("rootfs {} is not a directory", rootfs.display())]
    NotADirectory { rootfs: PathBuf },
    #[error("read rootfs {} at {}", rootfs.display(), path.display())]
    Walk {
        rootfs: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image cache directory {}", dir.display())]
    CacheDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot build an image of rootfs {}: no {tools} found (apt-get install erofs-utils)",
        rootfs.display()
    )]
    NoTool { rootfs: PathBuf, tools: String },
    #[error("run {tool} for rootfs {}", rootfs.display())]
    Spawn {
        rootfs: PathBuf,
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{tool} failed for rootfs {} ({}): {stderr}",
        rootfs.display(),
        status.map_or("exit status unknown".to_owned(), |s| s.to_string())
    )]
    Build {
        rootfs: PathBuf,
        tool: &'static str,
        /// `None` when someone else collected the tool's exit.
        status: Option<ExitStatus>,
        stderr: String,
    },
    #[error("store the image of rootfs {}", rootfs.display())]
    Store {
        rootfs: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Images on disk, one file per tree digest.
#[derive(Clone, Debug)]
pub struct ImageCache {
    dir: PathBuf,
    formats: Vec<ImageFormat>,
}

/// Counts gathered by the digest walk, to size an ext4 image.
#[derive(Clone, Copy, Debug, Default)]
struct TreeStats {
    entries: u64,
    /// Regular file sizes rounded up to 4 KiB blocks, plus a block per other entry.
    blocks_bytes: u64,
}

impl ImageCache {
    /// A cache in `dir` (created on first use), building EROFS images, or ext4 where
    /// `mkfs.erofs` is missing.
    pub fn new(dir: impl Into<PathBuf>) -> ImageCache {
        ImageCache::with_formats(dir, &ImageFormat::ALL)
    }

    /// A cache that builds the first of `formats` whose tool is installed.
    pub fn with_formats(dir: impl Into<PathBuf>, formats: &[ImageFormat]) -> ImageCache {
        ImageCache {
            dir: dir.into(),
            formats: formats.to_vec(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image of `rootfs`: the cached one when the tree's digest has one, else a new build.
    /// Blocks (a walk of the tree, maybe a build): call it from `spawn_blocking`.
    pub fn image_for(&self, rootfs: &Path) -> Result<Image, ImageError> {
        let (digest, stats) = tree_digest(rootfs)?;
        if let Some(image) = self.cached(&digest) {
            tracing::debug!(rootfs = %rootfs.display(), %digest, "rootfs image cached");
            return Ok(image);
        }
        let cache_err = |source| ImageError::CacheDir {
            dir: self.dir.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(cache_err)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!("{digest}.lock")))
            .map_err(cache_err)?;
        sys::lock_exclusive(&lock).map_err(cache_err)?;
        // Someone may have built it while we waited.
        if let Some(image) = self.cached(&digest) {
            return Ok(image);
        }
        self.remove_stale_temporaries(&digest);
        let image = self.build(rootfs, &digest, stats)?;
        drop(lock);
        Ok(image)
    }

    fn cached(&self, digest: &str) -> Option<Image> {
        ImageFormat::ALL.into_iter().find_map(|format| {
            let path = self.image_path(digest, format);
            let meta = fs::metadata(&path).ok().filter(|m| m.is_file())?;
            Some(Image {
                path,
                digest: digest.to_owned(),
                bytes: meta.len(),
                format,
            })
        })
    }

    fn image_path(&self, digest: &str, format: ImageFormat) -> PathBuf {
        self.dir.join(format!("{digest}.{}", format.fstype()))
    }

    /// Temporaries of this digest left by a build that died (we hold the digest's lock, so
    /// nobody else is writing them).
    fn remove_stale_temporaries(&self, digest: &str) {
        let prefix = format!(".{digest}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                tracing::info!(path = %entry.path().display(), "removing a dead build's image");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn build(&self, rootfs: &Path, digest: &str, stats: TreeStats) -> Result<Image, ImageError> {
        let (format, tool) = self
            .formats
            .iter()
            .find_map(|f| find_tool(f.tool()).map(|t| (*f, t)))
            .ok_or_else(|| ImageError::NoTool {
                rootfs: rootfs.to_owned(),
                tools: self
                    .formats
                    .iter()
                    .map(|f| f.tool())
                    .collect::<Vec<_>>()
                    .join(" or "),
            })?;
        let store = |source| ImageError::Store {
            rootfs: rootfs.to_owned(),
            source,
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{digest}."))
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .map_err(store)?
            .into_temp_path();

        let mut cmd = Command::new(&tool);
        match format {
            ImageFormat::Erofs => {
                cmd.args(["--quiet", "--preserve-mtime"])
                    .arg(&*tmp)
                    .arg(rootfs);
            }
            ImageFormat::Ext4 => {
                // Data plus inode tables, with room for ext4's own metadata.
                let inodes = stats.entries + 64;
                let bytes = (stats.blocks_bytes + inodes * 256) / 4 * 5 + (16 << 20);
                cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                    .args(["-O", "^has_journal,^resize_inode"])
                    .arg("-N")
                    .arg(inodes.to_string())
                    .arg("-d")
                    .arg(rootfs)
                    .arg(&*tmp)
                    .arg(format!("{}k", bytes.div_ceil(4096) * 4));
            }
        }
        let started = std::time::Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ImageError::Spawn {
                rootfs: rootfs.to_owned(),
                tool: format.tool(),
                source,
            })?;
        let mut stderr = Vec::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_end(&mut stderr);
        }
        let (ok, status) =
            tool_outcome(child.wait(), format, &tmp).map_err(|source| ImageError::Spawn {
                rootfs: rootfs.to_owned(),
                tool: format.tool(),
                source,
            })?;
        if !ok {
            let start = stderr.len().saturating_sub(STDERR_TAIL);
            return Err(ImageError::Build {
                rootfs: rootfs.to_owned(),
                tool: format.tool(),
                status,
                stderr: String::from_utf8_lossy(&stderr[start..]).trim().to_owned(),
            });
        }

        let file = File::open(&tmp).map_err(store)?;
        file.sync_all().map_err(store)?;
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(store)?;
        let bytes = file.metadata().map_err(store)?.len();
        let path = self.image_path(digest, format);
        tmp.persist(&path).map_err(|e| store(e.error))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        tracing::info!(
            rootfs = %rootfs.display(),
            image = %path.display(),
            bytes,
            build_ms = started.elapsed().as_millis() as u64,
            "built rootfs image"
        );
        Ok(Image {
            path,
            digest: digest.to_owned(),
            bytes,
            format,
        })
    }
}

/// Whether a build succeeded, and its status when known. A subreaper's `waitpid(-1)` (the shim
/// kit's reaper) may collect the tool first (`ECHILD`): then the image is judged by its
/// superblock, which both tools write last.
fn tool_outcome(
    wait: io::Result<ExitStatus>,
    format: ImageFormat,
    image: &Path,
) -> io::Result<(bool, Option<ExitStatus>)> {
    match wait {
        Ok(status) => Ok((status.success(), Some(status))),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::CHILD.raw_os_error()) => {
            tracing::debug!(
                tool = format.tool(),
                "build collected elsewhere; checking the image"
            );
            Ok((format.has_superblock(image), None))
        }
        Err(e) => Err(e),
    }
}

/// `name` on `PATH`, or in the usual system directories (a shim's `PATH` may be minimal and
/// leave out `sbin`, where `mkfs.ext4` lives).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The metadata digest of the tree at `rootfs` (see the module docs), hex SHA-256.
pub fn digest(rootfs: &Path) -> Result<String, ImageError> {
    tree_digest(rootfs).map(|(d, _)| d)
}

fn tree_digest(rootfs: &Path) -> Result<(String, TreeStats), ImageError> {
    let walk_err = |path: &Path| {
        let rootfs = rootfs.to_owned();
        let path = path.to_owned();
        move |source: io::Error| ImageError::Walk {
            rootfs,
            path,
            source,
        }
    };
    let root_meta = match fs::metadata(rootfs) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::RootfsMissing {
                rootfs: rootfs.to_owned(),
            });
        }
        Err(e) => return Err(walk_err(rootfs)(e)),
    };
    if !root_meta.is_dir() {
        return Err(ImageError::NotADirectory {
            rootfs: rootfs.to_owned(),
        });
    }

    let mut hasher = Sha256::new();
    hasher.update(DIGEST_VERSION);
    let mut stats = TreeStats::default();
    record(&mut hasher, &mut stats, OsStr::new("."), &root_meta, None);

    // Depth first, names in byte order: the same tree always hashes the same.
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = rootfs.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(walk_err(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(walk_err(&dir))?;
        entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for name in entries {
            let rel_path = rel.join(&name);
            let full = rootfs.join(&rel_path);
            let meta = fs::symlink_metadata(&full).map_err(walk_err(&full))?;
            let target = if meta.file_type().is_symlink() {
                Some(fs::read_link(&full).map_err(walk_err(&full))?)
            } else {
                None
            };
            record(
                &mut hasher,
                &mut stats,
                rel_path.as_os_str(),
                &meta,
                target.as_deref(),
            );
            if meta.is_dir() {
                subdirs.push(rel_path);
            }
        }
        // Reversed so the stack pops them in order.
        stack.extend(subdirs.into_iter().rev());
    }
    let digest = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((digest, stats))
}

fn record(
    hasher: &mut Sha256,
    stats: &mut TreeStats,
    rel: &OsStr,
    meta: &fs::Metadata,
    target: Option<&Path>,
) {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else {
        '?'
    };
    // A directory's size and link count depend on the filesystem, not on the tree.
    let (size, nlink) = if ft.is_dir() {
        (0, 0)
    } else {
        (meta.size(), meta.nlink())
    };
    hasher.update(rel.as_bytes());
    hasher.update(b"\0");
    hasher.update(
        format!(
            "{kind} {:o} {} {} {size} {nlink} {}.{} {}.{} {}\0",
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.rdev(),
        )
        .as_bytes(),
    );
    if let Some(t) = target {
        hasher.update(t.as_os_str().as_bytes());
    }
    hasher.update(b"\n");
    stats.entries += 1;
    stats.blocks_bytes += if ft.is_file() {
        size.div_ceil(4096) * 4096
    } else {
        4096
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn libc_echild() -> i32 {
        rustix::io::Errno::CHILD.raw_os_error()
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc/sub")).unwrap();
        fs::write(root.join("etc/hostname"), "box\n").unwrap();
        fs::write(root.join("etc/sub/x"), vec![7u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("etc/hostname", root.join("link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("dangling")).unwrap();
        dir
    }

    #[test]
    fn digest_is_stable_and_sees_changes() {
        let t = tree();
        let d1 = digest(t.path()).unwrap();
        assert_eq!(d1, digest(t.path()).unwrap());
        assert_eq!(d1.len(), 64);

        // Same size, same mtime restored: the ctime still moves.
        let f = t.path().join("etc/hostname");
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        fs::write(&f, "xyz\n").unwrap();
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let d2 = digest(t.path()).unwrap();
        assert_ne!(d1, d2);

        std::os::unix::fs::symlink("elsewhere", t.path().join("etc/sub/new")).unwrap();
        assert_ne!(d2, digest(t.path()).unwrap());
    }

    #[test]
    fn missing_or_file_rootfs_is_named() {
        let t = tree();
        let missing = t.path().join("nope");
        let err = digest(&missing).unwrap_err();
        assert!(matches!(err, ImageError::RootfsMissing { .. }));
        assert_eq!(
            err.to_string(),
            format!("rootfs {} not found", missing.display())
        );
        let file = t.path().join("etc/hostname");
        assert!(matches!(
            digest(&file).unwrap_err(),
            ImageError::NotADirectory { .. }
        ));
    }

    fn build_twice_and_touch(format: ImageFormat) {
        if find_tool(format.tool()).is_none() {
            eprintln!("skipped: {} not installed", format.tool());
            return;
        }
        let t = tree();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::with_formats(cache_dir.path().join("images"), &[format]);
        let first = cache.image_for(t.path()).unwrap();
        assert_eq!(first.format, format);
        assert_eq!(first.fstype(), format.fstype());
        assert!(first.bytes > 0);
        let echild = || Err(io::Error::from_raw_os_error(libc_echild()));
        assert!(matches!(
            tool_outcome(echild(), format, &first.path),
            Ok((true, None))
        ));
        let not_an_image = t.path().join("etc/sub/x");
        assert!(matches!(
            tool_outcome(echild(), format, &not_an_image),
            Ok((false, None))
        ));
        assert_eq!(
            first.path,
            cache
                .dir()
                .join(format!("{}.{}", first.digest, format.fstype()))
        );
        let built_at = fs::metadata(&first.path).unwrap().modified().unwrap();

        std::thread::sleep(Duration::from_millis(20));
        let again = cache.image_for(t.path()).unwrap();
        assert_eq!(again, first);
        assert_eq!(
            fs::metadata(&again.path).unwrap().modified().unwrap(),
            built_at
        );

        File::options()
            .write(true)
            .open(t.path().join("etc/sub/x"))
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        let touched = cache.image_for(t.path()).unwrap();
        assert_ne!(touched.digest, first.digest);
        assert!(touched.path.is_file() && first.path.is_file());

        // No temporaries left; one lock file per digest.
        let mut names: Vec<String> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn erofs_image_is_built_once_per_tree() {
        build_twice_and_touch(ImageFormat::Erofs);
    }

    #[test]
    fn ext4_image_is_built_once_per_tree() {
        build_twice_and_touch(ImageFormat::Ext4);
    }

    #[test]
    fn concurrent_builders_build_once() {
        if find_tool("mkfs.erofs").is_none() {
            eprintln!("skipped: mkfs.erofs not installed");
            return;
        }
        let t = tree();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(cache_dir.path());
        let images: Vec<Image> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.image_for(t.path()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(images.windows(2).all(|w| w[0] == w[1]));
    }

    /// The shim kit's reaper runs `waitpid(-1)`; it may collect mkfs before `image_for` does.
    #[test]
    fn builds_when_a_subreaper_collects_the_tool() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        let t = tree();
        let cache_dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = rustix::process::wait(rustix::process::WaitOptions::NOHANG);
                    std::thread::yield_now();
                }
            });
            for format in ImageFormat::ALL {
                if find_tool(format.tool()).is_some() {
                    let cache = ImageCache::with_formats(cache_dir.path(), &[format]);
                    let image = cache.image_for(t.path());
                    assert!(image.is_ok(), "{format:?}: {image:?}");
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }

    #[test]
    fn stale_temporaries_are_removed_and_a_missing_tool_is_named() {
        let t = tree();
        let cache_dir = tempfile::tempdir().unwrap();
        let d = digest(t.path()).unwrap();
        let stale = cache_dir.path().join(format!(".{d}.dead.tmp"));
        fs::write(&stale, "half an image").unwrap();
        let cache = ImageCache::with_formats(cache_dir.path(), &[]);
        let err = cache.image_for(t.path()).unwrap_err();
        assert!(matches!(err, ImageError::NoTool { .. }), "{err}");
        assert!(err.to_string().contains(&t.path().display().to_string()));
        assert!(!stale.exists());
    }
}
