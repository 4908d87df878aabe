//! Whole-tree file operations for snapshots: a faithful copy (the copy driver), disk usage, and
//! removal that survives unwritable directories.
//!
//! The trees are our own snapshots, but their contents come from images: symlinks may point
//! anywhere, so nothing here follows one (`lstat`, `AT_SYMLINK_NOFOLLOW`, `lsetxattr`), and
//! copies are made into fresh directories this module creates.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, CWD, FileType, Mode, Timespec, Timestamps};
use rustix::io::Errno;

/// A failed tree operation: what, and on which path.
#[derive(Debug)]
pub(super) struct TreeError {
    pub(super) op: &'static str,
    pub(super) path: PathBuf,
    pub(super) source: io::Error,
}

fn at<E: Into<io::Error>>(op: &'static str, path: &Path) -> impl FnOnce(E) -> TreeError + use<E> {
    let path = path.to_owned();
    move |e| TreeError {
        op,
        path,
        source: e.into(),
    }
}

/// Copies the contents and metadata of directory `src` into the existing, empty directory
/// `dst`: ownership, modes (setuid included), times, xattrs, symlinks, device nodes, fifos and
/// sockets, and hard links between files of the tree.
pub(super) fn copy_tree(src: &Path, dst: &Path) -> Result<(), TreeError> {
    let mut copier = Copier {
        links: HashMap::new(),
    };
    copier.copy_dir(src, dst)?;
    let st = rfs::lstat(src).map_err(at("stat", src))?;
    set_meta(src, dst, &st, FileType::Directory)
}

struct Copier {
    /// `(dev, ino)` of multiply-linked files already copied → their copy.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Copier {
    fn copy_dir(&mut self, src: &Path, dst: &Path) -> Result<(), TreeError> {
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(at("read directory", src))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(at("read directory", src))?;
        names.sort();
        for name in names {
            let (s, d) = (src.join(&name), dst.join(&name));
            let st = rfs::lstat(&s).map_err(at("stat", &s))?;
            let file_type = FileType::from_raw_mode(st.st_mode);
            if file_type != FileType::Directory && st.st_nlink > 1 {
                let key = (st.st_dev as u64, st.st_ino as u64);
                if let Some(first) = self.links.get(&key) {
                    fs::hard_link(first, &d).map_err(at("link", &d))?;
                    continue;
                }
                self.links.insert(key, d.clone());
            }
            match file_type {
                FileType::Directory => {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&d)
                        .map_err(at("create directory", &d))?;
                    self.copy_dir(&s, &d)?;
                }
                FileType::RegularFile => {
                    fs::copy(&s, &d).map_err(at("copy file", &d))?;
                }
                FileType::Symlink => {
                    let target = fs::read_link(&s).map_err(at("read symlink", &s))?;
                    std::os::unix::fs::symlink(&target, &d).map_err(at("create symlink", &d))?;
                }
                FileType::CharacterDevice
                | FileType::BlockDevice
                | FileType::Fifo
                | FileType::Socket => {
                    rfs::mknodat(
                        CWD,
                        &d,
                        file_type,
                        Mode::from_raw_mode(0o600),
                        st.st_rdev as rfs::Dev,
                    )
                    .map_err(at("create node", &d))?;
                }
                FileType::Unknown => {
                    return Err(TreeError {
                        op: "copy",
                        path: s,
                        source: io::Error::other("unknown file type"),
                    });
                }
            }
            set_meta(&s, &d, &st, file_type)?;
        }
        Ok(())
    }
}

/// Owner, then mode (chown clears setuid), then xattrs (chown clears `security.capability`),
/// then times (directories after their contents: callers copy the contents first).
fn set_meta(src: &Path, dst: &Path, st: &rfs::Stat, file_type: FileType) -> Result<(), TreeError> {
    rfs::chownat(
        CWD,
        dst,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(at("set owner", dst))?;
    if file_type != FileType::Symlink {
        // Not a symlink (checked), and ours: following is moot.
        rfs::chmodat(
            CWD,
            dst,
            Mode::from_raw_mode(st.st_mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(at("set mode", dst))?;
    }
    copy_xattrs(src, dst)?;
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as _,
            // Nanoseconds: below 10^9, they fit.
            tv_nsec: st.st_atime_nsec.cast_signed(),
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec.cast_signed(),
        },
    };
    rfs::utimensat(CWD, dst, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(at("set times", dst))
}

fn copy_xattrs(src: &Path, dst: &Path) -> Result<(), TreeError> {
    let names = match read_sized(|buf| rfs::llistxattr(src, buf)) {
        Ok(names) => names,
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(at("list xattrs", src)(e)),
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = CString::new(name) else {
            continue;
        };
        let value = match read_sized(|buf| rfs::lgetxattr(src, name.as_c_str(), buf)) {
            Ok(value) => value,
            // Removed meanwhile.
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(at("read xattr", src)(e)),
        };
        match rfs::lsetxattr(dst, name.as_c_str(), &value, rfs::XattrFlags::empty()) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP) if is_security(&name) => {}
            Err(e) => return Err(at("set xattr", dst)(e)),
        }
    }
    Ok(())
}

fn is_security(name: &CStr) -> bool {
    name.to_bytes().starts_with(b"security.")
}

/// Calls a size-query-then-fill xattr function until the buffer is big enough.
fn read_sized(
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if size < (1 << 24) => size *= 4,
            Err(e) => return Err(e),
        }
    }
}

/// Bytes `path` uses on disk (`du`): allocated blocks, each multiply-linked inode once.
pub(super) fn disk_usage(path: &Path) -> Result<u64, TreeError> {
    usage(path).map(|(bytes, _)| bytes)
}

/// Bytes `path` uses on disk (as [`disk_usage`]) and the inodes under it, `path` included.
pub(super) fn usage(path: &Path) -> Result<(u64, u64), TreeError> {
    fn walk(
        path: &Path,
        seen: &mut HashSet<(u64, u64)>,
        inodes: &mut u64,
    ) -> Result<u64, TreeError> {
        let st = rfs::lstat(path).map_err(at("stat", path))?;
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type != FileType::Directory
            && st.st_nlink > 1
            && !seen.insert((st.st_dev as u64, st.st_ino as u64))
        {
            return Ok(0);
        }
        *inodes += 1;
        let mut total = u64::try_from(st.st_blocks).unwrap_or(0) * 512;
        if file_type == FileType::Directory {
            for entry in fs::read_dir(path).map_err(at("read directory", path))? {
                let entry = entry.map_err(at("read directory", path))?;
                total += walk(&entry.path(), seen, inodes)?;
            }
        }
        Ok(total)
    }
    let mut inodes = 0;
    let bytes = walk(path, &mut HashSet::new(), &mut inodes)?;
    Ok((bytes, inodes))
}

/// The first device node, fifo or socket under `dir` (in directory order), with what it is;
/// with `whiteouts`, 0:0 character devices (overlayfs whiteouts) are not nodes.
pub(super) fn find_node(
    dir: &Path,
    whiteouts: bool,
) -> Result<Option<(PathBuf, &'static str)>, TreeError> {
    for entry in fs::read_dir(dir).map_err(at("read directory", dir))? {
        let path = entry.map_err(at("read directory", dir))?.path();
        let st = rfs::lstat(&path).map_err(at("stat", &path))?;
        let what = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => match find_node(&path, whiteouts)? {
                Some(found) => return Ok(Some(found)),
                None => continue,
            },
            FileType::CharacterDevice if whiteouts && st.st_rdev == 0 => continue,
            FileType::CharacterDevice => "character device",
            FileType::BlockDevice => "block device",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
            _ => continue,
        };
        return Ok(Some((path, what)));
    }
    Ok(None)
}

/// Removes `path` and everything under it; missing is fine. Directories without write or
/// search permission (overlayfs leaves `work/work` at mode 000) are opened up first.
pub(super) fn remove_tree(path: &Path) -> Result<(), TreeError> {
    match fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at("remove", path)(e)),
                _ => Ok(()),
            };
        }
        Err(_) => {}
    }
    open_up(path);
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Best effort: gives every directory under `path` `rwx` for its owner.
fn open_up(path: &Path) {
    let Ok(st) = rfs::lstat(path) else { return };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return;
    }
    let _ = rfs::chmodat(
        CWD,
        path,
        Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700),
        AtFlags::empty(),
    );
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            open_up(&entry.path());
        }
    }
}
