//! Sockets only their owner can reach: 0600, in 0700 directories, with no moment in between
//! when anyone else could connect. The shim runs with umask 0o077 (see `sys`), so a socket is
//! created 0700 and a directory 0700; the directory is what keeps others out, the socket's own
//! mode is then narrowed to 0600 as containerd's shims leave theirs.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::error::{Error, Result};

/// `sun_path` holds 108 bytes, with the terminating NUL.
pub const SOCKET_PATH_MAX: usize = 107;

/// Make `dir` (and missing parents) owner-only. An existing directory that others can enter
/// is narrowed to 0700: only root's shims and runtimes use these directories.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("create {}", dir.display())))?;
    let meta = std::fs::metadata(dir).map_err(Error::io(format!("stat {}", dir.display())))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("make {} private", dir.display())))?;
    }
    Ok(())
}

/// Listen on `path` (whose directory is private) and narrow the socket to 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let len = path.as_os_str().len();
    if len > SOCKET_PATH_MAX {
        return Err(Error::InvalidArgument(format!(
            "socket path {} is {len} bytes, more than a unix socket address holds \
             ({SOCKET_PATH_MAX})",
            path.display()
        )));
    }
    let listener =
        UnixListener::bind(path).map_err(Error::io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[test]
    fn issue16_sockets_are_0600_in_0700_directories() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path().join("a/s");
        private_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&dir), 0o700);
        let sock = dir.join("x.sock");
        let _l = bind(&sock).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&sock), 0o600);

        // A directory someone else made open is narrowed.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        private_dir(&open).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&open), 0o700);
    }

    #[test]
    fn a_socket_path_too_long_is_refused_by_name() {
        let long = Path::new("/tmp").join("x".repeat(120));
        let e = bind(&long).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("more than a unix socket address holds"), "{e}");
    }
}
