//! Unix socket files whose server is gone.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Removes `path` if it is a socket that refuses connections (its server was killed: a server
/// that exits removes its own) and is still the file found then, so a server that has just
/// bound the name again keeps it. Whether it was removed.
pub fn remove_if_dead(path: &Path) -> io::Result<bool> {
    let socket_inode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| m.ino())
    };
    let Some(found) = socket_inode(path) else {
        return Ok(false);
    };
    let refused = std::os::unix::net::UnixStream::connect(path)
        .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
    if !refused || socket_inode(path) != Some(found) {
        return Ok(false);
    }
    std::fs::remove_file(path).map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_nothing_listens_on_is_removed() {
        let dir = std::env::temp_dir().join(format!("yard-base-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live = dir.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(!remove_if_dead(&live).unwrap());
        assert!(live.exists());

        let dead = dir.join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        assert!(remove_if_dead(&dead).unwrap());
        assert!(!dead.exists());

        let file = dir.join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(!remove_if_dead(&file).unwrap());
        assert!(!remove_if_dead(&dir.join("missing")).unwrap());
        assert!(file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
