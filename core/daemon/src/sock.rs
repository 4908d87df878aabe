//! Unix socket helpers shared by the gRPC and ttrpc listeners.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use tokio::net::UnixListener;

/// Binds a listener at `path`, creating its directory (0711). A socket file left by a dead
/// process is replaced; one that still answers is an error, so two daemons never share it.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
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
    UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))
}
