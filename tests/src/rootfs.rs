//! A busybox root filesystem (Debian's busybox-static) for containers, and files written for
//! tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The host's busybox-static, if installed.
pub fn busybox_binary() -> Option<&'static Path> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
}

/// Fills `dir` with a minimal busybox root: `/bin/busybox` and a symlink per applet, the usual
/// mount points, and `/etc/passwd` and `/etc/group` with root.
pub fn busybox_tree(dir: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let busybox = busybox_binary().expect("busybox (apt-get install busybox-static)");
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    let list = Command::new(dir.join("bin/busybox"))
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

/// A busybox root filesystem ([`busybox_tree`] plus `/etc/hello.txt`), shared by the test
/// processes of the machine (tests write only names of their own into it, and remove them):
/// made once, and renamed into place whole, so a concurrent process never sees it half made.
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        // The version changes with what is in the tree.
        let dir = std::env::temp_dir().join("switchyard-busybox-v1");
        if dir.join("etc/hello.txt").is_file() {
            return dir;
        }
        let new =
            std::env::temp_dir().join(format!("switchyard-busybox-v1.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&new);
        busybox_tree(&new);
        std::fs::write(new.join("etc/hello.txt"), "hello from the rootfs\n").unwrap();
        if std::fs::rename(&new, &dir).is_err() {
            // Another process made it first.
            let _ = std::fs::remove_dir_all(&new);
            assert!(
                dir.join("etc/hello.txt").is_file(),
                "{} is not a busybox rootfs",
                dir.display()
            );
        }
        dir
    })
}

/// Writes a file, creating parents.
pub fn write(path: &Path, content: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(content.as_bytes()).unwrap();
}
