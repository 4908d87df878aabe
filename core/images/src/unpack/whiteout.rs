//! Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`): overlayfs's form (a 0:0
//! character device, the `trusted.overlay.opaque` xattr) or removal of what lower layers put
//! there. Either only hides what lower layers wrote, so the paths this layer wrote are kept.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::archive::Entry;
use super::entry::{Unpacker, io_error};
use super::paths::{Parents, join, list_dir, remove_all_at, resolve};
use super::{
    OPAQUE_MARKER, OVERLAY_OPAQUE_XATTR, UnpackError, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX,
    Whiteouts,
};

/// The paths a layer wrote, and their ancestors, as a tree of names: memory in proportion to
/// the names written (a set of whole paths would hold every ancestor's path again, the square
/// of a deep path's length).
#[derive(Default)]
pub(super) struct Written {
    /// Node → its children by name. Node 0 is the root.
    children: HashMap<u32, HashMap<Box<[u8]>, u32>>,
    nodes: u32,
}

/// The root's node in [`Written`].
const ROOT: u32 = 0;

impl Written {
    /// Records `comps` (and so its ancestors) as written.
    pub(super) fn insert(&mut self, comps: &[&[u8]]) {
        let mut node = ROOT;
        for c in comps {
            node = match self.child(node, c) {
                Some(next) => next,
                None => {
                    self.nodes += 1;
                    let next = self.nodes;
                    self.children
                        .entry(node)
                        .or_default()
                        .insert((*c).into(), next);
                    next
                }
            };
        }
    }

    fn child(&self, node: u32, name: &[u8]) -> Option<u32> {
        self.children.get(&node)?.get(name).copied()
    }

    /// The node of `comps`, if it was written.
    fn find<'a>(&self, comps: impl IntoIterator<Item = &'a [u8]>) -> Option<u32> {
        comps
            .into_iter()
            .try_fold(ROOT, |node, c| self.child(node, c))
    }
}

impl Unpacker {
    pub(super) fn whiteout(
        &mut self,
        entry: &Entry,
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
                    self.written.insert(parents);
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
                    let node = self.written.find(parents.iter().copied());
                    self.prune(dir.as_fd(), node)
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
        let hidden_path = parents.iter().copied().chain([hidden]);
        if self.written.find(hidden_path).is_some() {
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

    /// Removes everything under `dir` (node `node` of what was written) this layer did not
    /// write.
    fn prune(&self, dir: BorrowedFd<'_>, node: Option<u32>) -> io::Result<()> {
        for (child, file_type) in list_dir(dir)? {
            let written = node.and_then(|n| self.written.child(n, child.to_bytes()));
            if written.is_none() {
                remove_all_at(dir, child.to_bytes())?;
            } else if file_type == FileType::Directory {
                let sub = rfs::openat(
                    dir,
                    child.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                self.prune(sub.as_fd(), written)?;
            }
        }
        Ok(())
    }
}
