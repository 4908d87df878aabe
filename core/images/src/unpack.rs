//! Applies a layer (an OCI/Docker layer tarball: plain tar, gzip or zstd, told apart by magic
//! bytes) onto a directory.
//!
//! INTERFACE (fixed; callers depend on it):
//! - [`apply_layer`] streams the layer once: decompresses, hashes the uncompressed tar (the
//!   layer's diff id, `sha256:<hex>`), and writes every entry under `root`. The tar is read by
//!   one parser (`archive`, whose doc says why it is ours): PAX headers and GNU long names are
//!   capped at [`MAX_SPECIAL`] bytes, GNU sparse files and data on entry types that have none
//!   are refused, each naming the entry.
//! - The uncompressed stream is bounded ([`Options::max_tar_bytes`], from [`Limits`]: a
//!   multiple of the compressed size and an absolute cap): a layer past it is
//!   [`UnpackError::TooLarge`], and no more than one byte past the bound is decompressed.
//! - Whiteouts (`.wh.NAME`, and the opaque marker `.wh..wh..opq`) become overlayfs whiteouts
//!   (a 0:0 character device `NAME`; the xattr `trusted.overlay.opaque=y` on the directory) with
//!   [`Whiteouts::Overlay`], or delete what lower layers put there with [`Whiteouts::Remove`]
//!   (the copy driver, where `root` already holds the parent's tree).
//! - No entry may reach outside `root`: a `..` component, an absolute path, a path whose parent
//!   resolves (through a symlink already in `root`, absolute or relative) outside `root`, a hard
//!   link whose target is outside `root` — each is [`UnpackError::Escape`] naming the entry.
//! - Ownership, modes (with setuid/setgid/sticky), mtimes and xattrs are kept (we run as root);
//!   device nodes and fifos are created (and the first reported in [`Applied::node`]), or
//!   refused with [`Nodes::Refuse`] (a layer for the wasm runtime); anything else unknown is an
//!   error naming the entry.
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
//!
//! The parts: `archive` (the tar parser), `decompress` (magic bytes to a reader, and the
//! hashing, counting, bounding reader the diff id comes from), `paths` (splitting entry paths and resolving them inside the root), `entry` (applying
//! one entry: files, directories, links, nodes), `meta` (owners, modes, times, xattrs from the
//! header and PAX records), `whiteout` (whiteouts and opaque markers).

pub(crate) mod archive;
mod decompress;
mod entry;
mod meta;
mod paths;
#[cfg(test)]
pub(crate) mod tests;
mod whiteout;

use std::io::{self, Read};
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};
use sha2::Digest;

use self::archive::Archive;
pub use self::archive::MAX_SPECIAL;
use self::decompress::{Hashing, TarTooLarge, decompress};
use self::entry::Unpacker;
use self::whiteout::Written;

/// What to do with whiteout entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Write overlayfs whiteouts: the directory is one lower layer of an overlay mount.
    Overlay,
    /// Remove the whited-out paths: the directory holds the merged tree.
    Remove,
}

/// Whether device nodes and fifos may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nodes {
    Allow,
    /// Refuse them ([`UnpackError::Node`]): the layer is for a runtime that must never be
    /// handed a device (the wasm runtime preopens the root it gets).
    Refuse,
}

/// How much a layer may unpack to: at most `max_ratio` times its compressed size, and never
/// more than `max_bytes`, counted on the uncompressed tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_ratio: u64,
    pub max_bytes: u64,
}

impl Default for Limits {
    /// gzip cannot do better than about 1032:1, so a ratio of 1024 takes any gzip layer of real
    /// content; zstd layers of mostly zeros may need more (a store option). 64 GiB is far above
    /// any layer seen in practice.
    fn default() -> Self {
        Limits {
            max_ratio: 1024,
            max_bytes: 64 << 30,
        }
    }
}

impl Limits {
    /// The uncompressed bytes allowed for a layer blob of `compressed` bytes.
    pub fn max_tar_bytes(&self, compressed: u64) -> u64 {
        compressed
            .saturating_mul(self.max_ratio)
            .min(self.max_bytes)
    }
}

/// How to apply a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub whiteouts: Whiteouts,
    pub nodes: Nodes,
    /// Uncompressed bytes allowed (see [`Limits::max_tar_bytes`]).
    pub max_tar_bytes: u64,
}

impl Options {
    /// Whiteouts as given, nodes allowed, no size bound (tests and trusted input).
    pub fn new(whiteouts: Whiteouts) -> Options {
        Options {
            whiteouts,
            nodes: Nodes::Allow,
            max_tar_bytes: u64::MAX,
        }
    }
}

/// What applying a layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Length of the uncompressed tar stream.
    pub tar_bytes: u64,
    /// The first device node or fifo the layer made, if any: `(entry, what)`.
    pub node: Option<(String, &'static str)>,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would write outside the root.
    #[error("layer entry {entry:?}: {reason}")]
    Escape { entry: String, reason: String },
    /// An entry this unpacker does not handle.
    #[error("layer entry {entry:?}: {what}")]
    Unsupported { entry: String, what: String },
    /// A PAX header or GNU long name larger than [`MAX_SPECIAL`].
    #[error("layer entry {entry:?}: a {what} of {size} bytes (at most {limit} accepted)")]
    SpecialTooLarge {
        entry: String,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    /// A malformed PAX header.
    #[error("layer entry {entry:?}: bad PAX header: {reason}")]
    Pax { entry: String, reason: String },
    /// A GNU sparse file.
    #[error("layer entry {entry:?}: GNU sparse files are not accepted in image layers")]
    Sparse { entry: String },
    /// An entry type without data whose header says it has some.
    #[error("layer entry {entry:?}: a {what} with {size} bytes of data (it has none)")]
    DataOnHeaderOnly {
        entry: String,
        what: &'static str,
        size: u64,
    },
    /// A device node or fifo where [`Nodes::Refuse`] was asked.
    #[error("layer entry {entry:?}: a {what}, which an image for the wasm runtime may not hold")]
    Node { entry: String, what: &'static str },
    /// The uncompressed stream is longer than the layer may unpack to.
    #[error("the layer unpacks to more than {limit} bytes (the bound for its size)")]
    TooLarge { limit: u64 },
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
pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
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
pub fn apply_layer(layer: impl Read, root: &Path, opts: &Options) -> Result<Applied, UnpackError> {
    let stream = Hashing::new(decompress(layer)?, opts.max_tar_bytes);
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
        whiteouts: opts.whiteouts,
        nodes: opts.nodes,
        node: None,
        written: Written::default(),
        dir_times: Vec::new(),
        buf: vec![0; 128 << 10],
    };
    let mut archive = Archive::new(stream);
    while let Some(entry) = archive.next_entry()? {
        unpacker.entry(&entry, &mut archive.data())?;
    }
    unpacker.finish()?;
    // The tar ends at its first zero block; the rest (the second zero block, the padding to
    // a record) belongs to the stream the diff id covers, and reading it to the end makes the
    // decompressor check its trailer.
    let mut stream = archive.into_inner();
    io::copy(&mut stream, &mut io::sink()).map_err(corrupt)?;
    let (hasher, bytes) = stream.finish();
    if bytes % 512 != 0 {
        return Err(UnpackError::Corrupt(format!(
            "the stream ends inside a tar block, after {bytes} bytes"
        )));
    }
    Ok(Applied {
        diff_id: format!("sha256:{:x}", hasher.finalize()),
        tar_bytes: bytes,
        node: unpacker.node,
    })
}

/// A read error: the size bound, or a stream that is not a (complete) layer.
fn corrupt(e: io::Error) -> UnpackError {
    if let Some(TarTooLarge { limit }) = e.get_ref().and_then(|e| e.downcast_ref()) {
        return UnpackError::TooLarge { limit: *limit };
    }
    UnpackError::Corrupt(e.to_string())
}
