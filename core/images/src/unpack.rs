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
//!
//! The parts: `decompress` (magic bytes to a reader, and the hashing counter the diff id comes
//! from), `paths` (splitting entry paths and resolving them inside the root), `entry` (applying
//! one entry: files, directories, links, nodes), `meta` (owners, modes, times, xattrs from the
//! header and PAX records), `whiteout` (whiteouts and opaque markers).

mod decompress;
mod entry;
mod meta;
mod paths;
#[cfg(test)]
pub(crate) mod tests;
mod whiteout;

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};
use sha2::Digest;

use self::decompress::{Hashing, decompress};
use self::entry::Unpacker;

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
