//! Unix socket helpers shared by the gRPC and ttrpc listeners.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use rustix::fs::Mode;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use tokio::net::UnixListener;

/// The mode of the daemon's sockets: connecting needs write permission, and only root (the
/// trusted side of the API) may have it.
pub const SOCKET_MODE: u32 = 0o600;

/// Binds a listener at `path` with mode 0600, creating its directory (0700). A socket file
/// left by a dead process is replaced; one that still answers is an error, so two daemons
/// never share it.
///
/// The mode is set on the socket before `bind` (Linux gives the new file the socket inode's
/// mode less the umask), so the file never exists with a looser mode, whatever the umask: a
/// `chmod` after `bind` would leave a window in which another user could connect.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let bind_err = |e: io::Error| io::Error::new(e.kind(), format!("bind {}: {e}", path.display()));
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(SOCKET_MODE))?;
    let addr = SocketAddrUnix::new(path).map_err(|e| bind_err(e.into()))?;
    rustix::net::bind(&fd, &addr).map_err(|e| bind_err(e.into()))?;
    rustix::net::listen(&fd, 1024)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn sockets_are_bound_0600_in_a_0700_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/api.sock");
        let listener = bind_unix(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // It accepts, and a second daemon cannot take it over.
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _conn = listener.accept().await.unwrap();
        let e = bind_unix(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // A stale file is replaced.
        drop(listener);
        let again = bind_unix(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        drop(again);
    }
}
