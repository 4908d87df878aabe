//! Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`): overlayfs's form (a 0:0
//! character device, the `trusted.overlay.opaque` xattr) or removal of what lower layers put
//! there. Either only hides what lower layers wrote, so the paths this layer wrote are kept.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::entry::{Unpacker, io_error};
use super::paths::{Parents, join, list_dir, remove_all_at, resolve};
use super::{
    OPAQUE_MARKER, OVERLAY_OPAQUE_XATTR, UnpackError, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX,
    Whiteouts,
};

impl Unpacker {
    pub(super) fn mark_written(&mut self, comps: &[&[u8]]) {
        for i in (1..=comps.len()).rev() {
            if !self.written.insert(join(&comps[..i])) {
                break;
            }
        }
    }

    pub(super) fn whiteout<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parents: &[&[u8]],
        base: &[u8],
        name: &str,
    ) -> Result<(), UnpackError> {
        if base == OPAQUE_MARKER {
            match self.whiteouts {
                Whiteouts::Overlay => {
                    let dir = self.parent(parents, Parents::Create, name)?;
                    let fd = rfs::openat(
                        &dir,
                        c".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io_error(name, "open opaque directory"))?;
                    rfs::fsetxattr(&fd, OVERLAY_OPAQUE_XATTR, b"y", rfs::XattrFlags::empty())
                        .map_err(io_error(name, "mark directory opaque"))?;
                    self.mark_written(parents);
                }
                Whiteouts::Remove => {
                    let dir = match self.parent(parents, Parents::Existing, name) {
                        Ok(dir) => dir,
                        Err(UnpackError::Io { source, .. })
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    };
                    self.prune(dir.as_fd(), &join(parents))
                        .map_err(io_error(name, "empty opaque directory"))?;
                }
            }
            return Ok(());
        }
        if base.starts_with(WHITEOUT_META_PREFIX) {
            // AUFS bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): not part of the image.
            return Ok(());
        }
        let hidden = &base[WHITEOUT_PREFIX.len()..];
        match hidden {
            b"" | b"." => {
                return Err(UnpackError::Corrupt(format!(
                    "whiteout {name:?} names no file"
                )));
            }
            b".." => {
                return Err(UnpackError::Escape {
                    entry: name.to_owned(),
                    reason: "whiteout of `..`".into(),
                });
            }
            _ => {}
        }
        let mut key = join(parents);
        if !key.is_empty() {
            key.push(b'/');
        }
        key.extend_from_slice(hidden);
        if self.written.contains(&key) {
            // Whiteouts hide lower layers only.
            return Ok(());
        }
        match self.whiteouts {
            Whiteouts::Overlay => {
                let meta = self.meta(entry, name)?;
                let dir = self.parent(parents, Parents::Create, name)?;
                remove_all_at(dir.as_fd(), hidden)
                    .map_err(io_error(name, "remove what the whiteout replaces"))?;
                rfs::mknodat(
                    &dir,
                    hidden,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rfs::makedev(0, 0),
                )
                .map_err(io_error(name, "create whiteout"))?;
                let (uid, gid) = meta.owner();
                rfs::chownat(&dir, hidden, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_error(name, "set owner"))?;
            }
            Whiteouts::Remove => {
                let dir = match resolve(&self.root, &join(parents)) {
                    Ok(dir) => dir,
                    Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
                    Err(e) => return Err(io_error(name, "open parent directory")(e)),
                };
                remove_all_at(dir.as_fd(), hidden)
                    .map_err(io_error(name, "remove whited-out path"))?;
            }
        }
        Ok(())
    }

    /// Removes everything under `dir` (at `prefix`) this layer did not write.
    fn prune(&self, dir: BorrowedFd<'_>, prefix: &[u8]) -> io::Result<()> {
        for (child, file_type) in list_dir(dir)? {
            let mut key = prefix.to_vec();
            if !key.is_empty() {
                key.push(b'/');
            }
            key.extend_from_slice(child.to_bytes());
            if !self.written.contains(&key) {
                remove_all_at(dir, child.to_bytes())?;
            } else if file_type == FileType::Directory {
                let sub = rfs::openat(
                    dir,
                    child.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                self.prune(sub.as_fd(), &key)?;
            }
        }
        Ok(())
    }
}
