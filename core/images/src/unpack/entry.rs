//! Applying one entry: regular files (data streamed through one buffer), directories (merged
//! with one already there), symlinks, hard links (resolved inside the root like any path) and
//! device nodes and fifos; what an entry replaces is removed first.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps};
use tar::EntryType;

use rustix::io::Errno;

use super::archive::Entry;
use super::meta::Meta;
use super::paths::{Parents, components, join, remove_all_at, resolve};
use super::whiteout::Written;
use super::{Nodes, UnpackError, WHITEOUT_PREFIX, Whiteouts, corrupt};

pub(super) struct Unpacker {
    pub(super) root: OwnedFd,
    pub(super) whiteouts: Whiteouts,
    pub(super) nodes: Nodes,
    /// The first device node or fifo made: `(entry, what)`.
    pub(super) node: Option<(String, &'static str)>,
    /// Paths (and their ancestors) this layer wrote: whiteouts and opaque markers hide what
    /// lower layers put there, never what the same layer adds.
    pub(super) written: Written,
    /// Directory mtimes, set at the end: creating their contents changes them.
    pub(super) dir_times: Vec<(Vec<u8>, Timestamps)>,
    /// Copy buffer for file data.
    pub(super) buf: Vec<u8>,
}

/// `UnpackError::Io` for entry `entry`, from an `io::Error` or an errno.
pub(super) fn io_error<E: Into<io::Error>>(
    entry: &str,
    op: &'static str,
) -> impl FnOnce(E) -> UnpackError + use<E> {
    let entry = entry.to_owned();
    move |e| UnpackError::Io {
        entry,
        op,
        source: e.into(),
    }
}

/// Where an entry goes: its parent, opened inside the root, and its name there.
pub(super) struct Place<'a> {
    pub(super) dir: OwnedFd,
    pub(super) base: &'a [u8],
    /// The entry's path as the archive has it, for errors.
    pub(super) name: &'a str,
}

impl Place<'_> {
    /// Removes whatever is at the place (a directory with its contents): a new entry replaces
    /// what lower layers or earlier entries put there.
    pub(super) fn clear(&self) -> Result<(), UnpackError> {
        remove_all_at(self.dir.as_fd(), self.base)
            .map_err(io_error(self.name, "remove what the entry replaces"))
    }
}

impl Unpacker {
    pub(super) fn entry(&mut self, entry: &Entry, data: &mut impl Read) -> Result<(), UnpackError> {
        let raw_path = &entry.path;
        let name = entry.name();
        let kind = entry.kind;
        let Some(comps) = components(raw_path) else {
            return Err(UnpackError::Escape {
                entry: name,
                reason: "path has a `..` component".into(),
            });
        };
        let Some((&base, parents)) = comps.split_last() else {
            // The root itself (`./`): its metadata is the snapshotter's, not the layer's.
            return Ok(());
        };
        if base.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(entry, parents, base, &name);
        }
        let node = match kind {
            EntryType::Char => Some("character device"),
            EntryType::Block => Some("block device"),
            EntryType::Fifo => Some("fifo"),
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => None,
            other => {
                return Err(UnpackError::Unsupported {
                    entry: name,
                    what: format!("entry type {other:?}"),
                });
            }
        };
        if let Some(what) = node {
            if self.nodes == Nodes::Refuse {
                return Err(UnpackError::Node { entry: name, what });
            }
            self.node.get_or_insert_with(|| (name.clone(), what));
        }
        let meta = self.meta(entry, &name)?;
        let place = Place {
            dir: self.parent(parents, Parents::Create, &name)?,
            base,
            name: &name,
        };
        match kind {
            EntryType::Directory => {
                self.directory(&place, &meta)?;
                self.dir_times.push((join(&comps), meta.times()));
            }
            EntryType::Symlink => {
                let target = entry.link.clone().unwrap_or_default();
                // PAX records may hold a NUL; a symlink target cannot.
                let target = CString::new(target).map_err(|_| {
                    UnpackError::Corrupt(format!("symlink {name:?}: target holds a NUL byte"))
                })?;
                place.clear()?;
                // Stored, never followed here: a symlink may point anywhere.
                rfs::symlinkat(target.as_c_str(), &place.dir, base)
                    .map_err(io_error(&name, "create symlink"))?;
                self.set_at_meta(&place, &meta, false)?;
            }
            EntryType::Link => {
                let target = entry.link.as_deref().ok_or_else(|| {
                    UnpackError::Corrupt(format!("hard link {name:?} has no target"))
                })?;
                self.hard_link(&place, &comps, target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = if kind == EntryType::Fifo {
                    // Writers leave a fifo's device fields blank.
                    (FileType::Fifo, 0)
                } else {
                    let header = &entry.header;
                    let number = |n: io::Result<Option<u32>>| n.map(Option::unwrap_or_default);
                    let major = number(header.device_major()).map_err(corrupt)?;
                    let minor = number(header.device_minor()).map_err(corrupt)?;
                    let file_type = if kind == EntryType::Char {
                        FileType::CharacterDevice
                    } else {
                        FileType::BlockDevice
                    };
                    (file_type, rfs::makedev(major, minor))
                };
                place.clear()?;
                rfs::mknodat(&place.dir, base, file_type, Mode::empty(), dev)
                    .map_err(io_error(&name, "create node"))?;
                self.set_at_meta(&place, &meta, true)?;
            }
            _ => self.regular_file(entry.size, data, &place, &meta)?,
        }
        self.written.insert(&comps);
        Ok(())
    }

    fn regular_file(
        &mut self,
        size: u64,
        data: &mut impl Read,
        place: &Place<'_>,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let name = place.name;
        place.clear()?;
        let fd = rfs::openat(
            &place.dir,
            place.base,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_error(name, "create file"))?;
        let mut file = File::from(fd);
        let mut copied = 0u64;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(io_error(name, "write file"))?;
            copied += n as u64;
        }
        // The archive hands out at most `size` bytes, and fewer when the stream ends.
        if copied != size {
            return Err(UnpackError::Corrupt(format!(
                "entry {name:?} ends after {copied} of its {size} bytes"
            )));
        }
        self.set_fd_meta(file.as_fd(), meta, name)?;
        rfs::futimens(&file, &meta.times()).map_err(io_error(name, "set times"))
    }

    /// A directory entry merges with a directory already there, and replaces anything else.
    fn directory(&self, place: &Place<'_>, meta: &Meta) -> Result<(), UnpackError> {
        let name = place.name;
        let existing = rfs::statat(&place.dir, place.base, AtFlags::SYMLINK_NOFOLLOW);
        let is_dir = matches!(&existing,
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        if !is_dir {
            if existing.is_ok() {
                place.clear()?;
            }
            rfs::mkdirat(&place.dir, place.base, Mode::from_raw_mode(0o700))
                .map_err(io_error(name, "create directory"))?;
        }
        let fd = rfs::openat(
            &place.dir,
            place.base,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_error(name, "open directory"))?;
        self.set_fd_meta(fd.as_fd(), meta, name)
    }

    /// A hard link's target is a path in the archive, resolved inside the root like any
    /// entry's; linked without following it, so a symlink target links the symlink.
    fn hard_link(
        &self,
        place: &Place<'_>,
        comps: &[&[u8]],
        target: &[u8],
    ) -> Result<(), UnpackError> {
        let name = place.name;
        let Some(target_comps) = components(target) else {
            return Err(UnpackError::Escape {
                entry: name.to_owned(),
                reason: format!(
                    "hard link target {:?} has a `..` component",
                    String::from_utf8_lossy(target)
                ),
            });
        };
        let Some((target_base, target_parents)) = target_comps.split_last() else {
            return Err(UnpackError::Escape {
                entry: name.to_owned(),
                reason: "hard link to the root".into(),
            });
        };
        if target_comps == comps {
            return Ok(());
        }
        let target_dir = self.parent(target_parents, Parents::Existing, name)?;
        place.clear()?;
        rfs::linkat(
            &target_dir,
            *target_base,
            &place.dir,
            place.base,
            AtFlags::empty(),
        )
        .map_err(io_error(name, "create hard link"))
    }

    /// Sets directory mtimes, now that nothing more is created in them.
    pub(super) fn finish(&mut self) -> Result<(), UnpackError> {
        for (path, times) in std::mem::take(&mut self.dir_times) {
            let name = String::from_utf8_lossy(&path).into_owned();
            let Some(comps) = components(&path) else {
                continue;
            };
            let Some((base, parents)) = comps.split_last() else {
                continue;
            };
            let dir = match resolve(&self.root, &join(parents)) {
                Ok(dir) => dir,
                Err(Errno::NOENT | Errno::NOTDIR) => continue,
                Err(e) => {
                    return Err(UnpackError::Io {
                        entry: name,
                        op: "open parent directory",
                        source: e.into(),
                    });
                }
            };
            match rfs::utimensat(&dir, *base, &times, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => {
                    return Err(UnpackError::Io {
                        entry: name,
                        op: "set directory times",
                        source: e.into(),
                    });
                }
            }
        }
        Ok(())
    }
}
