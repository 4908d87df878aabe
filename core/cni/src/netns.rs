//! Persistent namespaces, one of each kind per pod: a new network namespace bind-mounted at
//! `<dir>/<name>` (what `ip netns add` and containerd's `pkg/netns` do, under a directory the
//! caller chooses), so it outlives every process in it and the CNI plugins and the pod's
//! containers can join it by path. Its loopback is up, with `127.0.0.1` and `::1`: containerd
//! brings it up for every pod (the `loopback` CNI plugin, before the pod's network), and the
//! containers of a pod talk to each other on it. Down, a connection to `127.0.0.1` is not even
//! refused: with no local address, it follows the default route out of `eth0` and waits. A pod's IPC and UTS namespaces (the latter with the pod's
//! hostname set) are held the same way ([`Kind`]), which is what lets switchyardd run pods
//! without a pause process.
//!
//! The `unshare` happens in a thread made for it, which ends right after the bind mount: the
//! caller's threads never change namespace. Joining one (`setns`) likewise happens only in a
//! fresh thread ([`Netns::run_in`]). Everything here goes through `nix`'s safe wrappers; there
//! is no `unsafe` in this crate.
//!
//! Unlike `ip netns`, the directory is not made a shared mount point: the namespaces are only
//! ever joined by path from the daemon's own mount namespace (containerd makes the same choice).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::statfs::NSFS_MAGIC;

/// Error of a netns operation; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid netns name {0:?}: a file name, not `.` or `..`, without `/`")]
    InvalidName(String),
    #[error("invalid hostname {0:?}: 1 to 64 bytes, without NUL")]
    InvalidHostname(String),
    #[error("{} already exists", path.display())]
    Exists { path: PathBuf },
    #[error("{} is not a namespace", path.display())]
    NotNetns { path: PathBuf },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} for {}", path.display())]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("the thread for {} panicked", path.display())]
    ThreadPanicked { path: PathBuf },
}

/// The kind of namespace [`Netns::create_kind`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    Net,
    Ipc,
    /// A UTS namespace whose hostname is set to this (checked: 1 to 64 bytes, no NUL).
    Uts {
        hostname: &'a str,
    },
}

impl Kind<'_> {
    fn flag(self) -> CloneFlags {
        match self {
            Kind::Net => CloneFlags::CLONE_NEWNET,
            Kind::Ipc => CloneFlags::CLONE_NEWIPC,
            Kind::Uts { .. } => CloneFlags::CLONE_NEWUTS,
        }
    }

    fn proc_name(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Ipc => "ipc",
            Kind::Uts { .. } => "uts",
        }
    }
}

/// A namespace held by a bind mount at [`Netns::path`]: a network namespace unless made with
/// [`Netns::create_kind`]. The handle is only a path: dropping it leaves the namespace;
/// [`Netns::remove`] ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    /// The handle of `<dir>/<name>`, whether or not it exists.
    pub fn at(dir: &Path, name: &str) -> Result<Netns, NetnsError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(NetnsError::InvalidName(name.to_owned()));
        }
        Ok(Netns {
            path: dir.join(name),
        })
    }

    /// Creates a new network namespace at `<dir>/<name>` (`dir` is created 0700 if missing).
    /// Fails with [`NetnsError::Exists`] if the path is taken.
    pub fn create(dir: &Path, name: &str) -> Result<Netns, NetnsError> {
        Netns::create_kind(dir, name, Kind::Net)
    }

    /// Creates a new namespace of `kind` at `<dir>/<name>`, as [`Netns::create`] does.
    pub fn create_kind(dir: &Path, name: &str, kind: Kind<'_>) -> Result<Netns, NetnsError> {
        let ns = Netns::at(dir, name)?;
        if let Kind::Uts { hostname } = kind
            && (hostname.is_empty() || hostname.len() > 64 || hostname.contains('\0'))
        {
            return Err(NetnsError::InvalidHostname(hostname.to_owned()));
        }
        let path = ns.path.clone();
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| NetnsError::Io {
                    op: "creating",
                    path: dir.to_owned(),
                    source,
                })?;
        }
        // The mount point: an empty file, new (never someone else's).
        {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&path)
                .map_err(|source| match source.kind() {
                    io::ErrorKind::AlreadyExists => NetnsError::Exists { path: path.clone() },
                    _ => NetnsError::Io {
                        op: "creating",
                        path: path.clone(),
                        source,
                    },
                })?;
        }
        let target = path.clone();
        let hostname = match kind {
            Kind::Uts { hostname } => Some(hostname.to_owned()),
            Kind::Net | Kind::Ipc => None,
        };
        let (flag, proc_name) = (kind.flag(), kind.proc_name());
        let made = std::thread::Builder::new()
            .name("yard-netns".into())
            .spawn(move || bind_new_ns(&target, flag, proc_name, hostname.as_deref()))
            .map_err(|source| NetnsError::Io {
                op: "starting the thread",
                path: path.clone(),
                source,
            })?
            .join()
            .unwrap_or_else(|_| Err(NetnsError::ThreadPanicked { path: path.clone() }));
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        tracing::debug!(path = %path.display(), kind = proc_name, "namespace created");
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a network namespace is mounted at the path.
    pub fn exists(&self) -> bool {
        nix::sys::statfs::statfs(&self.path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
    }

    /// The namespace as a file, for `setns(2)`. Refuses a path that is not a network namespace
    /// (such as the bare mount point left by a crash between its creation and the mount).
    pub fn open(&self) -> Result<File, NetnsError> {
        let file = File::open(&self.path).map_err(|source| NetnsError::Io {
            op: "opening",
            path: self.path.clone(),
            source,
        })?;
        let on_nsfs =
            nix::sys::statfs::fstatfs(&file).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC);
        if !on_nsfs {
            return Err(NetnsError::NotNetns {
                path: self.path.clone(),
            });
        }
        Ok(file)
    }

    /// Runs `f` on a new thread that joined the namespace, and returns what it returns. The
    /// thread ends with `f`, so no other thread ever runs in the namespace by accident.
    pub fn run_in<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.open()?;
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("yard-in-netns".into())
            .spawn(move || {
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::Sys {
                        op: "setns",
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Io {
                op: "starting the thread",
                path: self.path.clone(),
                source,
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(NetnsError::ThreadPanicked {
                    path: self.path.clone(),
                })
            })
    }

    /// Ends the namespace's hold here: detaches the mount and removes the file. No error if
    /// either is already gone, so a retry after a crash is safe. (Processes still in the
    /// namespace keep it alive until they exit.)
    pub fn remove(&self) -> Result<(), NetnsError> {
        // Only our own mount is undone (a bare file left by a crash has none). Lazily: a
        // process opening the path right now must not make this fail.
        if self.exists()
            && let Err(source) = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH)
            && !matches!(source, Errno::EINVAL | Errno::ENOENT)
        {
            return Err(NetnsError::Sys {
                op: "umount",
                path: self.path.clone(),
                source,
            });
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetnsError::Io {
                    op: "removing",
                    path: self.path.clone(),
                    source,
                });
            }
        }
        tracing::debug!(path = %self.path.display(), "netns removed");
        Ok(())
    }
}

/// In a thread of its own: a new namespace (`flag`) for this thread only, its hostname set for
/// a UTS namespace, bind-mounted at `target`.
fn bind_new_ns(
    target: &Path,
    flag: CloneFlags,
    proc_name: &str,
    hostname: Option<&str>,
) -> Result<(), NetnsError> {
    let sys = |op| {
        move |source| NetnsError::Sys {
            op,
            path: target.to_owned(),
            source,
        }
    };
    nix::sched::unshare(flag).map_err(sys("unshare"))?;
    if flag == CloneFlags::CLONE_NEWNET {
        loopback_up().map_err(|source| NetnsError::Io {
            op: "bringing up lo in",
            path: target.to_owned(),
            source,
        })?;
    }
    if let Some(name) = hostname {
        nix::unistd::sethostname(name).map_err(sys("sethostname"))?;
    }
    let tid = nix::unistd::gettid();
    let source = PathBuf::from(format!("/proc/self/task/{tid}/ns/{proc_name}"));
    nix::mount::mount(
        Some(&source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind mount"))
}

/// Sets `lo` up in the calling thread's network namespace (`ip link set lo up`), over
/// rtnetlink, and waits for the kernel's answer.
fn loopback_up() -> io::Result<()> {
    switchyard_rtnl::Rtnl::open()
        .and_then(|mut r| r.set_up_by_name("lo"))
        .map_err(|e| io::Error::other(switchyard_base::chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        for n in ["", ".", "..", "a/b", "../x"] {
            assert!(matches!(
                Netns::at(Path::new("/tmp"), n),
                Err(NetnsError::InvalidName(_))
            ));
        }
        assert_eq!(
            Netns::at(Path::new("/run/yard/netns"), "pod-1")
                .unwrap()
                .path(),
            Path::new("/run/yard/netns/pod-1")
        );
    }

    #[test]
    fn a_plain_file_is_not_a_netns() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), "").unwrap();
        let ns = Netns::at(dir.path(), "x").unwrap();
        assert!(!ns.exists());
        assert!(matches!(ns.open(), Err(NetnsError::NotNetns { .. })));
        // remove takes it (a leftover mount point) and is idempotent.
        ns.remove().unwrap();
        ns.remove().unwrap();
        assert!(!ns.path().exists());
    }
}
