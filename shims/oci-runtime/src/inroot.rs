//! Reading a file of an untrusted root filesystem from outside it: the path is resolved with
//! `openat2(RESOLVE_IN_ROOT)` on a descriptor of the root, so `..` and symlinks, absolute ones
//! included, stop at the root, and it is opened `O_PATH` first: a device node or fifo an image
//! put there is looked at, never opened (opening some devices acts, a fifo blocks). Only a
//! regular file is read, through a descriptor reopened from the `O_PATH` one (the same inode,
//! whatever the path names meanwhile), and only up to a bound. Used for the container's
//! `/etc/passwd` (`home.rs`) and the Wasm shim's entrypoint check.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The root directory `path`, as an `O_PATH` descriptor to resolve paths in.
pub fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `path` inside `root`, never leaving it, as an `O_PATH` descriptor (nothing is opened for
/// I/O). `None` when it does not exist.
pub fn find(root: impl AsFd, path: &Path) -> std::io::Result<Option<OwnedFd>> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    match rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::NOTDIR => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a descriptor (an `O_PATH` one from [`find`]) names a regular file.
pub fn is_file(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
    })
}

/// At most `max` bytes from the start of the file an `O_PATH` descriptor from [`find`] names,
/// reopened for reading without blocking; anything but a regular file is refused unopened.
pub fn read(fd: &OwnedFd, max: u64) -> std::io::Result<Vec<u8>> {
    if !is_file(fd) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let file = rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let mut bytes = Vec::new();
    std::fs::File::from(file)
        .take(max)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fifo an image put where a file is read is refused, not opened (it would block).
    #[test]
    fn only_a_regular_file_is_read() {
        let r = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(r.path().join("file"), b"abc").unwrap_or_else(|e| panic!("{e}"));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            r.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let root = open_root(r.path()).unwrap_or_else(|e| panic!("{e}"));
        let found = |p: &str| {
            find(&root, Path::new(p))
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("{p} not found"))
        };
        assert_eq!(
            read(&found("/file"), 2).unwrap_or_else(|e| panic!("{e}")),
            b"ab"
        );
        let err = read(&found("/fifo"), 2).err().map(|e| e.kind());
        assert_eq!(err, Some(std::io::ErrorKind::InvalidInput));
    }
}
