//! Entry paths: split into components (a `..` refused), and resolved inside the root with
//! `openat2(RESOLVE_IN_ROOT)`, creating missing parents on the way; removal and listing through
//! directory descriptors, never following a symlink.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::UnpackError;
use super::entry::Unpacker;

/// An entry's path split into components: no empty, `.` or `..` ones; `None` if a `..` is
/// there. An absolute path is read relative to the root.
pub(super) fn components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

pub(super) fn join(components: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

/// How an entry's parent is found: created where missing (as containerd does), or not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Parents {
    Create,
    Existing,
}

impl Unpacker {
    /// Opens the directory `parents` (relative to the root) for `*at` calls, resolving every
    /// symlink on the way as if the root were `/`.
    pub(super) fn parent(
        &self,
        parents: &[&[u8]],
        mode: Parents,
        name: &str,
    ) -> Result<OwnedFd, UnpackError> {
        let err = |e: Errno| UnpackError::Io {
            entry: name.to_owned(),
            op: "open parent directory",
            source: e.into(),
        };
        match resolve(&self.root, &join(parents)) {
            Err(Errno::NOENT) if mode == Parents::Create => {}
            other => return other.map_err(err),
        }
        // Some component is missing: walk down, making each missing directory inside the one
        // above it (already resolved inside the root).
        let mut dir = resolve(&self.root, b"").map_err(err)?;
        for i in 0..parents.len() {
            let path = join(&parents[..=i]);
            dir = match resolve(&self.root, &path) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rfs::mkdirat(&dir, parents[i], Mode::from_raw_mode(0o755)) {
                        // EEXIST: a dangling symlink; the next resolve reports it.
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(err(e)),
                    }
                    let fd = resolve(&self.root, &path).map_err(err)?;
                    // Independent of the umask.
                    let open = rfs::openat(
                        &fd,
                        c".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(err)?;
                    rfs::fchmod(&open, Mode::from_raw_mode(0o755)).map_err(err)?;
                    fd
                }
                Err(e) => return Err(err(e)),
            };
        }
        Ok(dir)
    }
}

/// Opens `path` (relative, no `..`) under `root` as `root` were `/`: symlinks, absolute or
/// not, cannot lead out of it.
pub(super) fn resolve(root: &OwnedFd, path: &[u8]) -> rustix::io::Result<OwnedFd> {
    let path = if path.is_empty() { &b"."[..] } else { path };
    let mut attempts = 0;
    loop {
        match rfs::openat2(
            root,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            // The kernel asks for a retry when a rename elsewhere raced the lookup.
            Err(Errno::AGAIN) if attempts < 16 => attempts += 1,
            other => return other,
        }
    }
}

/// Removes `name` in `dir`, recursively if it is a directory; missing is fine. Never follows
/// symlinks.
pub(super) fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for (child, _) in list_dir(sub.as_fd())? {
        remove_all_at(sub.as_fd(), child.to_bytes())?;
    }
    drop(sub);
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The entries of an open directory, without `.` and `..`.
pub(super) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(CString, FileType)>> {
    let mut out = Vec::new();
    // `dir` may be an `O_PATH` descriptor, which cannot be read: open it again.
    let readable = rfs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for entry in rfs::Dir::new(readable)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let mut file_type = entry.file_type();
        if file_type == FileType::Unknown {
            file_type =
                FileType::from_raw_mode(rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?.st_mode);
        }
        out.push((name.to_owned(), file_type));
    }
    Ok(out)
}
