//! Applies a layer (an OCI/Docker layer tarball: plain tar, gzip or zstd, told apart by magic
//! bytes) onto a directory.
//!
//! INTERFACE (fixed; callers depend on it):
//! - [`apply_layer`] streams the layer once: decompresses, hashes the uncompressed tar (the
//!   layer's diff id, `sha256:<hex>`), and writes every entry under `root`.
//! - Whiteouts (`.wh.NAME`, and the opaque marker `.wh..wh..opq`) become overlayfs whiteouts
//!   (a 0:0 character device `NAME`; the xattr `trusted.overlay.opaque=y` on the directory) with
//!   [`Whiteouts::Overlay`], or delete what lower layers put there with [`Whiteouts::Remove`]
//!   (the copy driver, where `root` already holds the parent's tree).
//! - No entry may reach outside `root`: a `..` component, an absolute path, a path whose parent
//!   resolves (through a symlink already in `root`, absolute or relative) outside `root`, a hard
//!   link whose target is outside `root` — each is [`UnpackError::Escape`] naming the entry.
//! - Ownership, modes (with setuid/setgid/sticky), mtimes and xattrs are kept (we run as root);
//!   device nodes and fifos are created; anything else unknown is an error naming the entry.
//!
//! How paths stay inside `root`: a `..` component is refused outright. A leading `/` or `./`
//! is dropped, so `/etc/passwd` means `<root>/etc/passwd`, as containerd reads it. Every other
//! lookup goes through the kernel: an entry's parent directory is opened with `openat2` and
//! `RESOLVE_IN_ROOT` relative to a descriptor of `root`, so a symlink on the way (from this
//! layer, or from the parent's tree in the copy driver) resolves as if `root` were `/` — the
//! way the container will see it — and can never lead out. The entry itself is then created
//! with `*at` calls on that parent descriptor and never followed if it is a symlink. Checking
//! paths as strings instead would race with, and be fooled by, symlinks the layer itself makes.
//!
//! A truncated layer is [`UnpackError::Corrupt`]: gzip and zstd check their own framing; for
//! the tar, an entry whose data ends early, or a stream ending inside a block, is an error.
//! (A plain tar cut exactly between two entries looks complete; its diff id will not match.)

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps,
};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::EntryType;

/// What to do with whiteout entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Write overlayfs whiteouts: the directory is one lower layer of an overlay mount.
    Overlay,
    /// Remove the whited-out paths: the directory holds the merged tree.
    Remove,
}

/// What applying a layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Length of the uncompressed tar stream.
    pub tar_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would write outside the root.
    #[error("layer entry {entry:?}: {reason}")]
    Escape { entry: String, reason: String },
    /// An entry this unpacker does not handle.
    #[error("layer entry {entry:?}: {what}")]
    Unsupported { entry: String, what: String },
    /// The stream is not a (complete) tar archive, or decompression failed.
    #[error("layer is not a valid tar stream: {0}")]
    Corrupt(String),
    #[error("layer entry {entry:?}: {op}")]
    Io {
        entry: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The whiteout prefix of the OCI image spec (and AUFS before it).
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Whiteout names with this prefix are AUFS metadata, not whiteouts.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// Marks its directory opaque: nothing from lower layers shows through.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// overlayfs reads this xattr (`y`) as "opaque directory".
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
/// PAX records carrying extended attributes (GNU tar, libarchive, Go's archive/tar).
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Applies `layer` onto `root` (an existing directory). On error `root` may hold part of the
/// layer: callers unpack into a scratch directory and discard it on failure.
pub fn apply_layer(
    layer: impl Read,
    root: &Path,
    whiteouts: Whiteouts,
) -> Result<Applied, UnpackError> {
    let mut stream = Hashing::new(decompress(layer)?);
    let root_fd = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Io {
        entry: String::new(),
        op: "open the unpack root",
        source: e.into(),
    })?;
    let mut unpacker = Unpacker {
        root: root_fd,
        whiteouts,
        written: HashSet::new(),
        dir_times: Vec::new(),
        buf: vec![0; 128 << 10],
    };
    {
        let mut archive = tar::Archive::new(crate::targuard::TarGuard::new(&mut stream));
        let entries = archive.entries().map_err(corrupt)?;
        for entry in entries {
            let mut entry = entry.map_err(corrupt)?;
            unpacker.entry(&mut entry)?;
        }
    }
    unpacker.finish()?;
    // The tar ends at its first zero block; the rest (the second zero block, the padding to
    // a record) belongs to the stream the diff id covers, and reading it to the end makes the
    // decompressor check its trailer.
    io::copy(&mut stream, &mut io::sink()).map_err(corrupt)?;
    let Hashing { hasher, bytes, .. } = stream;
    if bytes % 512 != 0 {
        return Err(UnpackError::Corrupt(format!(
            "the stream ends inside a tar block, after {bytes} bytes"
        )));
    }
    Ok(Applied {
        diff_id: format!("sha256:{:x}", hasher.finalize()),
        tar_bytes: bytes,
    })
}

fn corrupt(e: io::Error) -> UnpackError {
    UnpackError::Corrupt(e.to_string())
}

/// Picks the decompressor from the stream's first bytes.
fn decompress<'a>(mut layer: impl Read + 'a) -> Result<Box<dyn Read + 'a>, UnpackError> {
    const GZIP: &[u8] = &[0x1f, 0x8b];
    const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
    let mut magic = [0u8; 4];
    let mut len = 0;
    while len < magic.len() {
        match layer.read(&mut magic[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(corrupt(e)),
        }
    }
    let head = &magic[..len];
    let stream = BufReader::with_capacity(128 << 10, io::Cursor::new(head.to_vec()).chain(layer));
    Ok(if head.starts_with(GZIP) {
        // Multi-member gzip is valid gzip (pigz and concatenated streams produce it).
        Box::new(flate2::bufread::MultiGzDecoder::new(stream))
    } else if head.starts_with(ZSTD) {
        Box::new(zstd::stream::read::Decoder::with_buffer(stream).map_err(corrupt)?)
    } else {
        Box::new(stream)
    })
}

/// Counts and hashes what is read through it: the uncompressed tar.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// An entry's path split into components: no empty, `.` or `..` ones; `None` if a `..` is
/// there. An absolute path is read relative to the root.
fn components(path: &[u8]) -> Option<Vec<&[u8]>> {
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

fn join(components: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

/// Metadata of one entry, read from its header and PAX records.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn owner(&self) -> (Option<rfs::Uid>, Option<rfs::Gid>) {
        (
            Some(rfs::Uid::from_raw(self.uid)),
            Some(rfs::Gid::from_raw(self.gid)),
        )
    }

    fn mode(&self) -> Mode {
        Mode::from_raw_mode(self.mode & 0o7777)
    }

    fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.mtime,
            last_modification: self.mtime,
        }
    }
}

/// PAX `mtime` is decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(value: &str) -> Option<Timespec> {
    let (negative, value) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !negative {
        Timespec {
            tv_sec: secs,
            tv_nsec: nanos as _,
        }
    } else if nanos == 0 {
        Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: (1_000_000_000 - nanos) as _,
        }
    })
}

struct Unpacker {
    root: OwnedFd,
    whiteouts: Whiteouts,
    /// Paths (and their ancestors) this layer wrote: whiteouts and opaque markers hide what
    /// lower layers put there, never what the same layer adds.
    written: HashSet<Vec<u8>>,
    /// Directory mtimes, set at the end: creating their contents changes them.
    dir_times: Vec<(Vec<u8>, Timestamps)>,
    /// Copy buffer for file data.
    buf: Vec<u8>,
}

/// How an entry's parent is found: created where missing (as containerd does), or not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parents {
    Create,
    Existing,
}

/// `UnpackError::Io` for entry `entry`, from an `io::Error` or an errno.
fn io_error<E: Into<io::Error>>(
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
struct Place<'a> {
    dir: OwnedFd,
    base: &'a [u8],
    /// The entry's path as the archive has it, for errors.
    name: &'a str,
}

impl Place<'_> {
    /// Removes whatever is at the place (a directory with its contents): a new entry replaces
    /// what lower layers or earlier entries put there.
    fn clear(&self) -> Result<(), UnpackError> {
        remove_all_at(self.dir.as_fd(), self.base)
            .map_err(io_error(self.name, "remove what the entry replaces"))
    }
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_path).into_owned();
        let mut kind = entry.header().entry_type();
        match kind {
            // Global PAX headers describe the archive, not a file.
            EntryType::XGlobalHeader => return Ok(()),
            // Pre-POSIX archives mark directories by a trailing slash.
            EntryType::Regular if raw_path.ends_with(b"/") => kind = EntryType::Directory,
            _ => {}
        }
        let Some(comps) = components(&raw_path) else {
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
        let meta = self.meta(entry, &name)?;
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {}
            other => {
                return Err(UnpackError::Unsupported {
                    entry: name,
                    what: format!("entry type {other:?}"),
                });
            }
        }
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
                let target = entry.link_name_bytes().unwrap_or_default();
                // PAX records may hold a NUL; a symlink target cannot.
                let target = CString::new(target.into_owned()).map_err(|_| {
                    UnpackError::Corrupt(format!("symlink {name:?}: target holds a NUL byte"))
                })?;
                place.clear()?;
                // Stored, never followed here: a symlink may point anywhere.
                rfs::symlinkat(target.as_c_str(), &place.dir, base)
                    .map_err(io_error(&name, "create symlink"))?;
                self.set_at_meta(&place, &meta, false)?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::Corrupt(format!("hard link {name:?} has no target"))
                })?;
                self.hard_link(&place, &comps, &target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = if kind == EntryType::Fifo {
                    // Writers leave a fifo's device fields blank.
                    (FileType::Fifo, 0)
                } else {
                    let header = entry.header();
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
            _ => self.regular_file(entry, &place, &meta)?,
        }
        self.mark_written(&comps);
        Ok(())
    }

    fn regular_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
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
        let size = entry.size();
        let mut copied = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(io_error(name, "write file"))?;
            copied += n as u64;
        }
        // The tar crate hands out at most `size` bytes, and fewer when the stream ends.
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

    fn mark_written(&mut self, comps: &[&[u8]]) {
        for i in (1..=comps.len()).rev() {
            if !self.written.insert(join(&comps[..i])) {
                break;
            }
        }
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Meta, UnpackError> {
        let header = entry.header();
        let id = |value: io::Result<u64>, what: &str| -> Result<u32, UnpackError> {
            let value = value.map_err(corrupt)?;
            u32::try_from(value).map_err(|_| UnpackError::Unsupported {
                entry: name.to_owned(),
                what: format!("{what} {value} does not fit 32 bits"),
            })
        };
        let uid = id(header.uid(), "uid")?;
        let gid = id(header.gid(), "gid")?;
        let mode = header.mode().map_err(corrupt)?;
        let mtime = header.mtime().map_err(corrupt)?;
        let mut meta = Meta {
            uid,
            gid,
            mode,
            mtime: Timespec {
                tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        if let Some(pax) = entry.pax_extensions().map_err(corrupt)? {
            for record in pax {
                let record = record.map_err(corrupt)?;
                let Ok(key) = record.key() else { continue };
                if let Some(xattr) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    // overlayfs's own metadata (opaque, redirect, metacopy, origin) is ours to
                    // write, from whiteouts: a layer setting it would steer overlay lookups.
                    if xattr.starts_with(OVERLAY_XATTR_PREFIX) {
                        tracing::debug!(entry = name, xattr, "overlayfs xattr in layer dropped");
                    } else if let Ok(xattr) = CString::new(xattr) {
                        meta.xattrs.push((xattr, record.value_bytes().to_vec()));
                    }
                } else if key == "mtime"
                    && let Some(t) = record.value().ok().and_then(parse_pax_time)
                {
                    meta.mtime = t;
                }
            }
        }
        Ok(meta)
    }

    /// Ownership, then mode (chown clears setuid), then xattrs (chown clears
    /// `security.capability`), on an open file or directory.
    fn set_fd_meta(&self, fd: BorrowedFd<'_>, meta: &Meta, name: &str) -> Result<(), UnpackError> {
        let (uid, gid) = meta.owner();
        rfs::fchown(fd, uid, gid).map_err(io_error(name, "set owner"))?;
        rfs::fchmod(fd, meta.mode()).map_err(io_error(name, "set mode"))?;
        for (xattr, value) in &meta.xattrs {
            let result = rfs::fsetxattr(fd, xattr.as_c_str(), value, rfs::XattrFlags::empty());
            check_xattr(result, xattr, name)?;
        }
        Ok(())
    }

    /// The same, and times, for a symlink or node (neither can be opened to write): by name
    /// in its parent, never following it.
    fn set_at_meta(&self, place: &Place<'_>, meta: &Meta, chmod: bool) -> Result<(), UnpackError> {
        let (dir, base, name) = (&place.dir, place.base, place.name);
        let (uid, gid) = meta.owner();
        rfs::chownat(dir, base, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_error(name, "set owner"))?;
        if chmod {
            // `base` is the node mknodat just made, not a symlink: following is moot.
            rfs::chmodat(dir, base, meta.mode(), AtFlags::empty())
                .map_err(io_error(name, "set mode"))?;
        }
        if !meta.xattrs.is_empty() {
            // No `lsetxattrat` before Linux 6.13: the parent's /proc/self/fd link names the
            // parent itself, and `lsetxattr` does not follow `base`.
            let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            path.push(OsStr::from_bytes(base));
            for (xattr, value) in &meta.xattrs {
                let result =
                    rfs::lsetxattr(&path, xattr.as_c_str(), value, rfs::XattrFlags::empty());
                check_xattr(result, xattr, name)?;
            }
        }
        rfs::utimensat(dir, base, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_error(name, "set times"))
    }

    /// Opens the directory `parents` (relative to the root) for `*at` calls, resolving every
    /// symlink on the way as if the root were `/`.
    fn parent(&self, parents: &[&[u8]], mode: Parents, name: &str) -> Result<OwnedFd, UnpackError> {
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

    fn whiteout<R: Read>(
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

    /// Sets directory mtimes, now that nothing more is created in them.
    fn finish(&mut self) -> Result<(), UnpackError> {
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

/// `security.*` xattrs are dropped where the filesystem has no such namespace (SELinux labels
/// on a host without SELinux); every other failure is an error.
fn check_xattr(
    result: rustix::io::Result<()>,
    xattr: &CStr,
    name: &str,
) -> Result<(), UnpackError> {
    match result {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) if xattr.to_bytes().starts_with(b"security.") => {
            tracing::debug!(entry = name, xattr = ?xattr, "xattr not supported here, dropped");
            Ok(())
        }
        Err(e) => Err(UnpackError::Io {
            entry: name.to_owned(),
            op: "set xattr",
            source: e.into(),
        }),
    }
}

/// Opens `path` (relative, no `..`) under `root` as `root` were `/`: symlinks, absolute or
/// not, cannot lead out of it.
fn resolve(root: &OwnedFd, path: &[u8]) -> rustix::io::Result<OwnedFd> {
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
fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
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
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(CString, FileType)>> {
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

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    use sha2::{Digest, Sha256};
    use tar::{EntryType, Header};

    use super::*;

    pub(crate) fn is_root() -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root (chown, mknod, trusted.* xattrs)");
        false
    }

    /// A layer tarball written entry by entry, with raw names where a test needs them.
    pub(crate) struct Layer {
        builder: tar::Builder<Vec<u8>>,
    }

    impl Layer {
        pub(crate) fn new() -> Self {
            Layer {
                builder: tar::Builder::new(Vec::new()),
            }
        }

        fn header(kind: EntryType, name: &[u8], mode: u32) -> Header {
            let mut header = Header::new_gnu();
            // Raw bytes: `set_path` refuses `..`, which is what some tests need.
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_600_000_000);
            header.set_size(0);
            header
        }

        /// Appends one entry; `edit` adjusts the header first.
        pub(crate) fn entry(
            mut self,
            kind: EntryType,
            name: &str,
            mode: u32,
            data: &[u8],
            edit: impl FnOnce(&mut Header),
        ) -> Self {
            let mut header = Self::header(kind, name.as_bytes(), mode);
            header.set_size(data.len() as u64);
            edit(&mut header);
            header.set_cksum();
            self.builder.append(&header, data).unwrap();
            self
        }

        pub(crate) fn file(self, name: &str, data: &[u8]) -> Self {
            self.entry(EntryType::Regular, name, 0o644, data, |_| {})
        }

        pub(crate) fn dir(self, name: &str) -> Self {
            self.entry(EntryType::Directory, name, 0o755, b"", |_| {})
        }

        pub(crate) fn symlink(self, name: &str, target: &str) -> Self {
            self.entry(EntryType::Symlink, name, 0o777, b"", |h| {
                h.set_link_name_literal(target).unwrap()
            })
        }

        pub(crate) fn hardlink(self, name: &str, target: &str) -> Self {
            self.entry(EntryType::Link, name, 0o644, b"", |h| {
                h.set_link_name_literal(target).unwrap()
            })
        }

        /// A PAX extended header for the next entry.
        pub(crate) fn pax(self, records: &[(&str, &[u8])]) -> Self {
            let mut data = Vec::new();
            for (key, value) in records {
                let body = key.len() + value.len() + 3; // ' ', '=', '\n'
                let mut len = body + body.to_string().len();
                if len.to_string().len() + body != len {
                    len += 1;
                }
                data.extend_from_slice(format!("{len} {key}=").as_bytes());
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            self.entry(EntryType::XHeader, "PaxHeaders/x", 0o644, &data, |_| {})
        }

        pub(crate) fn finish(self) -> Vec<u8> {
            self.builder.into_inner().unwrap()
        }
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    pub(crate) fn sha256(data: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(data))
    }

    /// Bytes gzip cannot shrink, so a cut lands where it is aimed.
    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// `path → kind` for a whole tree: `f:<content>`, `d`, `l:<target>`, `c:<maj>:<min>`, `p`.
    pub(crate) fn tree(root: &Path) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let meta = fs::symlink_metadata(&path).unwrap();
                let ft = meta.file_type();
                let kind = if ft.is_dir() {
                    walk(root, &path, out);
                    "d".to_owned()
                } else if ft.is_symlink() {
                    format!("l:{}", fs::read_link(&path).unwrap().display())
                } else if ft.is_file() {
                    format!("f:{}", String::from_utf8_lossy(&fs::read(&path).unwrap()))
                } else if ft.is_char_device() {
                    let dev = meta.rdev();
                    format!("c:{}:{}", rfs::major(dev), rfs::minor(dev))
                } else {
                    "p".to_owned()
                };
                out.insert(rel, kind);
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    fn expect(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sample() -> Vec<u8> {
        Layer::new()
            .dir("etc/")
            .file("etc/hostname", b"yard\n")
            .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
            .hardlink("etc/hostname2", "etc/hostname")
            .file("./usr/bin/implicit-parents", b"#!/bin/sh\n")
            .finish()
    }

    #[test]
    fn plain_gzip_and_zstd_layers_have_the_plain_tars_diff_id() {
        if !is_root() {
            return;
        }
        let tar = sample();
        let want = sha256(&tar);
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for (what, layer) in [("plain", tar.clone()), ("gzip", gzip(&tar)), ("zstd", zst)] {
            let dir = tempfile::tempdir().unwrap();
            let applied = apply_layer(&layer[..], dir.path(), Whiteouts::Overlay).unwrap();
            assert_eq!(applied.diff_id, want, "{what}");
            assert_eq!(applied.tar_bytes, tar.len() as u64, "{what}");
            assert_eq!(
                tree(dir.path()),
                expect(&[
                    ("etc", "d"),
                    ("etc/hostname", "f:yard\n"),
                    ("etc/hostname2", "f:yard\n"),
                    ("etc/localtime", "l:/usr/share/zoneinfo/UTC"),
                    ("usr", "d"),
                    ("usr/bin", "d"),
                    ("usr/bin/implicit-parents", "f:#!/bin/sh\n"),
                ]),
                "{what}"
            );
            let a = fs::metadata(dir.path().join("etc/hostname")).unwrap();
            let b = fs::metadata(dir.path().join("etc/hostname2")).unwrap();
            assert_eq!(a.ino(), b.ino(), "{what}: hard link");
            let implicit = fs::metadata(dir.path().join("usr/bin")).unwrap();
            assert_eq!(implicit.permissions().mode() & 0o7777, 0o755);
        }
    }

    #[test]
    fn empty_stream_is_an_empty_layer() {
        let dir = tempfile::tempdir().unwrap();
        let applied = apply_layer(&b""[..], dir.path(), Whiteouts::Remove).unwrap();
        assert_eq!(applied.tar_bytes, 0);
        assert_eq!(applied.diff_id, sha256(b""));
    }

    #[test]
    fn ownership_modes_times_xattrs_and_nodes_are_kept() {
        if !is_root() {
            return;
        }
        let layer = Layer::new()
            .entry(EntryType::Directory, "tmp/", 0o1777, b"", |h| {
                h.set_mtime(1_000_000)
            })
            .pax(&[
                ("SCHILY.xattr.user.yard", b"value"),
                ("SCHILY.xattr.trusted.yard", b"\x00\x01"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                ("mtime", b"1234567.25"),
            ])
            .entry(EntryType::Regular, "tmp/suid", 0o4755, b"x", |h| {
                h.set_uid(1000);
                h.set_gid(1001);
            })
            .entry(EntryType::Regular, "tmp/sgid", 0o2711, b"x", |h| {
                h.set_gid(50);
            })
            .pax(&[("SCHILY.xattr.trusted.link", b"l")])
            .entry(EntryType::Symlink, "tmp/link", 0o777, b"", |h| {
                h.set_link_name_literal("suid").unwrap();
                h.set_uid(7);
                h.set_gid(8);
                h.set_mtime(42);
            })
            .entry(EntryType::Fifo, "tmp/fifo", 0o620, b"", |h| h.set_uid(3))
            .entry(EntryType::Char, "tmp/null", 0o666, b"", |h| {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            })
            .entry(EntryType::Block, "tmp/loop9", 0o660, b"", |h| {
                h.set_device_major(7).unwrap();
                h.set_device_minor(9).unwrap();
            })
            .finish();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply_layer(&layer[..], root, Whiteouts::Overlay).unwrap();

        let tmp = fs::symlink_metadata(root.join("tmp")).unwrap();
        assert_eq!(tmp.mode() & 0o7777, 0o1777);
        assert_eq!(
            tmp.mtime(),
            1_000_000,
            "directory mtime set after its contents"
        );

        let suid = fs::symlink_metadata(root.join("tmp/suid")).unwrap();
        assert_eq!(suid.mode() & 0o7777, 0o4755);
        assert_eq!((suid.uid(), suid.gid()), (1000, 1001));
        assert_eq!((suid.mtime(), suid.mtime_nsec()), (1_234_567, 250_000_000));
        let mut buf = [0u8; 16];
        let n = rfs::lgetxattr(root.join("tmp/suid"), "user.yard", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"value");
        let n = rfs::lgetxattr(root.join("tmp/suid"), "trusted.yard", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"\x00\x01");
        let redirect = rfs::lgetxattr(
            root.join("tmp/suid"),
            "trusted.overlay.redirect",
            &mut buf[..],
        );
        assert_eq!(
            redirect,
            Err(Errno::NODATA),
            "overlayfs xattrs from a layer are dropped"
        );

        let sgid = fs::symlink_metadata(root.join("tmp/sgid")).unwrap();
        assert_eq!(sgid.mode() & 0o7777, 0o2711);
        assert_eq!(sgid.gid(), 50);
        assert_eq!(sgid.mtime(), 1_600_000_000);

        let link = fs::symlink_metadata(root.join("tmp/link")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!((link.uid(), link.gid(), link.mtime()), (7, 8, 42));
        let n = rfs::lgetxattr(root.join("tmp/link"), "trusted.link", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"l");

        let fifo = fs::symlink_metadata(root.join("tmp/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!((fifo.mode() & 0o7777, fifo.uid()), (0o620, 3));
        let null = fs::symlink_metadata(root.join("tmp/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!((rfs::major(null.rdev()), rfs::minor(null.rdev())), (1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
        let block = fs::symlink_metadata(root.join("tmp/loop9")).unwrap();
        assert!(block.file_type().is_block_device());
        assert_eq!((rfs::major(block.rdev()), rfs::minor(block.rdev())), (7, 9));
    }

    #[test]
    fn dot_dot_entries_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        for name in [
            "../../etc/passwd",
            "../outside/pwned",
            "a/../../outside/pwned",
            "..",
        ] {
            let layer = Layer::new().file(name, b"pwned").finish();
            let err = apply_layer(&layer[..], &root, Whiteouts::Remove).unwrap_err();
            assert!(
                matches!(&err, UnpackError::Escape { entry, .. } if entry == name),
                "{name}: {err}"
            );
        }
        let layer = Layer::new()
            .file("x", b"")
            .hardlink("hl", "../outside/pwned")
            .finish();
        let err = apply_layer(&layer[..], &root, Whiteouts::Remove).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Escape { entry, .. } if entry == "hl"),
            "{err}"
        );
        let layer = Layer::new().file("a/.wh...", b"").finish();
        let err = apply_layer(&layer[..], &root, Whiteouts::Remove).unwrap_err();
        assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn absolute_paths_and_symlinks_resolve_inside_the_root() {
        if !is_root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"host").unwrap();
        let outside_abs = outside.to_str().unwrap();

        // The lower layer: symlinks that would leave the root if followed from the host.
        let lower = Layer::new()
            .dir("etc/")
            .symlink("slash", "/")
            .symlink("up", "../..")
            .symlink("abs", outside_abs)
            .symlink("etc/up", "../../../outside")
            .finish();
        apply_layer(&lower[..], &root, Whiteouts::Remove).unwrap();

        let mut results = Vec::new();
        for (name, layer) in [
            (
                "/etc/passwd",
                Layer::new().file("/etc/passwd", b"1").finish(),
            ),
            (
                "slash/etc/shadow",
                Layer::new().file("slash/etc/shadow", b"2").finish(),
            ),
            (
                "up/etc/group",
                Layer::new().file("up/etc/group", b"3").finish(),
            ),
            ("abs/pwned", Layer::new().file("abs/pwned", b"4").finish()),
            (
                "etc/up/pwned",
                Layer::new().file("etc/up/pwned", b"5").finish(),
            ),
            (
                "same-layer/x",
                Layer::new()
                    .symlink("same-layer", outside_abs)
                    .file("same-layer/x", b"6")
                    .finish(),
            ),
            ("hl", Layer::new().hardlink("hl", "abs/secret").finish()),
            (
                "hl2",
                Layer::new().hardlink("hl2", "slash/etc/passwd").finish(),
            ),
            (
                "abs/.wh.secret",
                Layer::new().file("abs/.wh.secret", b"").finish(),
            ),
            (
                "abs/.wh..wh..opq",
                Layer::new().file("abs/.wh..wh..opq", b"").finish(),
            ),
        ] {
            results.push((
                name,
                apply_layer(&layer[..], &root, Whiteouts::Remove).is_ok(),
            ));
        }
        // Nothing changed outside.
        assert_eq!(
            tree(&outside),
            expect(&[("secret", "f:host")]),
            "results: {results:?}"
        );
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
        // What resolved inside the root landed there.
        assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"1");
        assert_eq!(fs::read(root.join("etc/shadow")).unwrap(), b"2");
        assert_eq!(fs::read(root.join("etc/group")).unwrap(), b"3");
        assert_eq!(
            fs::metadata(root.join("hl2")).unwrap().ino(),
            fs::metadata(root.join("etc/passwd")).unwrap().ino()
        );
        // `abs` and `same-layer` point at a path that does not exist inside the root.
        let ok: BTreeMap<_, _> = results.into_iter().collect();
        assert!(
            !ok["abs/pwned"] && !ok["same-layer/x"] && !ok["hl"],
            "{ok:?}"
        );
    }

    pub(crate) fn lower_tree() -> Vec<u8> {
        Layer::new()
            .dir("a/")
            .file("a/x", b"x")
            .file("a/y", b"y")
            .dir("b/")
            .file("b/z", b"z")
            .file("keep", b"k")
            .dir("o/")
            .file("o/old1", b"1")
            .dir("o/sub/")
            .file("o/sub/old2", b"2")
            .dir("p/")
            .file("p/old", b"3")
            .finish()
    }

    pub(crate) fn upper_tree() -> Vec<u8> {
        Layer::new()
            .file("a/.wh.x", b"")
            .file(".wh.b", b"")
            .file(".wh.missing", b"")
            .dir("o/")
            .file("o/new", b"n")
            .dir("o/sub/")
            .file("o/sub/new2", b"n2")
            // The opaque marker after the directory's new entries...
            .file("o/.wh..wh..opq", b"")
            .dir("p/")
            // ...and before them.
            .file("p/.wh..wh..opq", b"")
            .file("p/new", b"n3")
            // A whiteout of something the same layer adds hides nothing.
            .file("keep2", b"k2")
            .file(".wh.keep2", b"")
            .finish()
    }

    pub(crate) fn merged() -> BTreeMap<String, String> {
        expect(&[
            ("a", "d"),
            ("a/y", "f:y"),
            ("keep", "f:k"),
            ("keep2", "f:k2"),
            ("o", "d"),
            ("o/new", "f:n"),
            ("o/sub", "d"),
            ("o/sub/new2", "f:n2"),
            ("p", "d"),
            ("p/new", "f:n3"),
        ])
    }

    #[test]
    fn whiteouts_remove_lower_paths() {
        let dir = tempfile::tempdir().unwrap();
        apply_layer(&lower_tree()[..], dir.path(), Whiteouts::Remove).unwrap();
        apply_layer(&upper_tree()[..], dir.path(), Whiteouts::Remove).unwrap();
        assert_eq!(tree(dir.path()), merged());
    }

    #[test]
    fn overlay_whiteouts_give_the_same_merged_view() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper, mnt) = (
            dir.path().join("l1"),
            dir.path().join("l2"),
            dir.path().join("mnt"),
        );
        for d in [&lower, &upper, &mnt] {
            fs::create_dir(d).unwrap();
        }
        apply_layer(&lower_tree()[..], &lower, Whiteouts::Overlay).unwrap();
        apply_layer(&upper_tree()[..], &upper, Whiteouts::Overlay).unwrap();

        let whiteout = fs::symlink_metadata(upper.join("a/x")).unwrap();
        assert!(whiteout.file_type().is_char_device());
        assert_eq!(whiteout.rdev(), 0);
        assert!(
            fs::symlink_metadata(upper.join("missing"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert!(fs::symlink_metadata(upper.join("keep2")).unwrap().is_file());
        let mut buf = [0u8; 4];
        let n = rfs::lgetxattr(upper.join("o"), OVERLAY_OPAQUE_XATTR, &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"y");
        let n = rfs::lgetxattr(upper.join("p"), OVERLAY_OPAQUE_XATTR, &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"y");

        let options = format!("lowerdir={}:{}", upper.display(), lower.display());
        if let Err(e) = nix::mount::mount(
            Some("overlay"),
            &mnt,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(options.as_str()),
        ) {
            eprintln!("skipped the overlay check: cannot mount overlayfs: {e}");
            return;
        }
        let view = tree(&mnt);
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(view, merged());
    }

    #[test]
    fn truncated_layers_are_corrupt() {
        let tar = Layer::new()
            .file("big", &noise(300_000))
            .file("small", b"s")
            .finish();
        let gz = gzip(&tar);
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        let cases = [
            ("plain, inside file data", tar[..100_000].to_vec()),
            ("plain, inside a header", tar[..700].to_vec()),
            ("plain, inside padding", tar[..512 + 300_000 + 10].to_vec()),
            (
                "plain, inside the end blocks",
                tar[..tar.len() - 100].to_vec(),
            ),
            ("gzip, half", gz[..gz.len() / 2].to_vec()),
            ("gzip, no trailer", gz[..gz.len() - 4].to_vec()),
            ("zstd, half", zst[..zst.len() / 2].to_vec()),
            ("zstd, last bytes", zst[..zst.len() - 3].to_vec()),
        ];
        for (what, layer) in cases {
            let dir = tempfile::tempdir().unwrap();
            let result = apply_layer(&layer[..], dir.path(), Whiteouts::Remove);
            assert!(
                matches!(result, Err(UnpackError::Corrupt(_))),
                "{what}: {result:?}"
            );
        }
        let mut bad = gz.clone();
        let at = bad.len() - 6;
        bad[at] ^= 0xff; // the CRC
        let dir = tempfile::tempdir().unwrap();
        let result = apply_layer(&bad[..], dir.path(), Whiteouts::Remove);
        assert!(
            matches!(result, Err(UnpackError::Corrupt(_))),
            "crc: {result:?}"
        );
        // Not a tar at all.
        let result = apply_layer(&noise(4096)[..], dir.path(), Whiteouts::Remove);
        assert!(
            matches!(result, Err(UnpackError::Corrupt(_))),
            "noise: {result:?}"
        );
    }

    #[test]
    fn files_and_directories_replace_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let lower = Layer::new()
            .dir("d/")
            .file("d/f", b"old")
            .file("f", b"file")
            .symlink("l", "d")
            .finish();
        apply_layer(&lower[..], dir.path(), Whiteouts::Remove).unwrap();
        let upper = Layer::new()
            .file("d", b"now a file")
            .dir("f/")
            .file("f/g", b"g")
            .dir("l/")
            // Twice in one layer: the last one wins.
            .file("twice", b"1")
            .file("twice", b"2")
            .finish();
        apply_layer(&upper[..], dir.path(), Whiteouts::Remove).unwrap();
        assert_eq!(
            tree(dir.path()),
            expect(&[
                ("d", "f:now a file"),
                ("f", "d"),
                ("f/g", "f:g"),
                ("l", "d"),
                ("twice", "f:2"),
            ])
        );
    }

    #[test]
    fn unknown_entry_types_are_unsupported() {
        let layer = Layer::new()
            .entry(EntryType::new(b'Z'), "weird", 0o644, b"", |_| {})
            .finish();
        let dir = tempfile::tempdir().unwrap();
        let err = apply_layer(&layer[..], dir.path(), Whiteouts::Remove).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Unsupported { entry, .. } if entry == "weird"),
            "{err}"
        );
    }

    #[test]
    fn pax_times_parse() {
        let t = |s| parse_pax_time(s).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("12"), Some((12, 0)));
        assert_eq!(t("12.5"), Some((12, 500_000_000)));
        assert_eq!(t("12.0000000019"), Some((12, 1)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t("x"), None);
        assert_eq!(t("1.x"), None);
        assert_eq!(t(""), None);
    }
}
