//! An entry's metadata: owner, mode, mtime (PAX `mtime` with its fraction) and xattrs (PAX
//! `SCHILY.xattr.*`, overlayfs's own dropped), and setting them on what was created.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{self as rfs, AtFlags, Mode, Timespec, Timestamps};
use rustix::io::Errno;

use super::archive::Entry;
use super::entry::{Place, Unpacker, io_error};
use super::{OVERLAY_XATTR_PREFIX, PAX_XATTR_PREFIX, UnpackError, corrupt};

/// Metadata of one entry, read from its header and PAX records.
pub(super) struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    pub(super) fn owner(&self) -> (Option<rfs::Uid>, Option<rfs::Gid>) {
        (
            Some(rfs::Uid::from_raw(self.uid)),
            Some(rfs::Gid::from_raw(self.gid)),
        )
    }

    pub(super) fn mode(&self) -> Mode {
        Mode::from_raw_mode(self.mode & 0o7777)
    }

    pub(super) fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.mtime,
            last_modification: self.mtime,
        }
    }
}

/// PAX `mtime` is decimal seconds with an optional fraction, possibly negative.
pub(super) fn parse_pax_time(value: &str) -> Option<Timespec> {
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
    for (digit, scale) in frac.bytes().zip((0..9u32).rev()) {
        nanos += i64::from(digit - b'0') * 10i64.pow(scale);
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

impl Unpacker {
    pub(super) fn meta(&self, entry: &Entry, name: &str) -> Result<Meta, UnpackError> {
        let header = &entry.header;
        let id = |value: u64, what: &str| -> Result<u32, UnpackError> {
            u32::try_from(value).map_err(|_| UnpackError::Unsupported {
                entry: name.to_owned(),
                what: format!("{what} {value} does not fit 32 bits"),
            })
        };
        // PAX `uid` and `gid` override the header's (ids too large for its octal fields).
        let pax_id = |key: &str| -> Result<Option<u64>, UnpackError> {
            let Some(value) = entry.pax_value(key) else {
                return Ok(None);
            };
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Some)
                .ok_or_else(|| UnpackError::Pax {
                    entry: name.to_owned(),
                    reason: format!("{key} {:?} is not a number", String::from_utf8_lossy(value)),
                })
        };
        let uid = match pax_id("uid")? {
            Some(v) => v,
            None => header.uid().map_err(corrupt)?,
        };
        let gid = match pax_id("gid")? {
            Some(v) => v,
            None => header.gid().map_err(corrupt)?,
        };
        let mode = header.mode().map_err(corrupt)?;
        let mtime = header.mtime().map_err(corrupt)?;
        let mut meta = Meta {
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            mode,
            mtime: Timespec {
                tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        for (key, value) in &entry.pax {
            if let Some(xattr) = key.strip_prefix(PAX_XATTR_PREFIX) {
                // overlayfs's own metadata (opaque, redirect, metacopy, origin) is ours to
                // write, from whiteouts: a layer setting it would steer overlay lookups.
                if xattr.starts_with(OVERLAY_XATTR_PREFIX) {
                    tracing::debug!(entry = name, xattr, "overlayfs xattr in layer dropped");
                } else if let Ok(xattr) = CString::new(xattr) {
                    meta.xattrs.push((xattr, value.clone()));
                }
            } else if key == "mtime"
                && let Some(t) = std::str::from_utf8(value).ok().and_then(parse_pax_time)
            {
                meta.mtime = t;
            }
        }
        Ok(meta)
    }

    /// Ownership, then mode (chown clears setuid), then xattrs (chown clears
    /// `security.capability`), on an open file or directory.
    pub(super) fn set_fd_meta(
        &self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        name: &str,
    ) -> Result<(), UnpackError> {
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
    pub(super) fn set_at_meta(
        &self,
        place: &Place<'_>,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), UnpackError> {
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
