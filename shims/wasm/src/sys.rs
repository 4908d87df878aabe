//! The Wasm shim's unsafe operations, each wrapped once: turning a compiled artifact back into
//! executable code (in the worker), hardening a detached mount tree (no wrapper exists for
//! `mount_setattr`), and taking over the channel and network namespace descriptors the parent
//! placed in the worker; and binding a task's HTTP listener inside a pod's network namespace.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use rustix::mount::OpenTreeFlags;
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// Load a precompiled core module.
pub fn deserialize_module(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires the bytes to come from `Module::serialize` of a compatible engine
    // and not to have been tampered with. The artifact comes from the parent, which compiled it
    // or read it from its root-only cache after checking its SHA-256 checksum; wasmtime itself
    // checks the version and configuration header and refuses a mismatch.
    unsafe { Module::deserialize(engine, artifact) }
}

/// Load a precompiled component.
pub fn deserialize_component(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: as for `deserialize_module`: from the parent, compiled there or checksum-checked
    // from its root-only cache; version and configuration checked by wasmtime.
    unsafe { Component::deserialize(engine, artifact) }
}

/// A detached copy of the mount tree at `path` (with what is mounted below it), made `nodev`,
/// `nosuid`, `noexec` and, when asked, read-only, all the way down: what the worker gets as a
/// task's root. It is attached nowhere, so `..` stops at its root, and it goes away with the
/// last descriptor. With `idmap` (a user namespace), the tree is idmapped to it: a file of
/// uid 0 on disk is the namespace's uid 0 (its owner on the host) through the tree, and what
/// that owner creates is uid 0's on disk.
pub fn detached_tree(
    path: &Path,
    readonly: bool,
    idmap: Option<BorrowedFd<'_>>,
) -> io::Result<OwnedFd> {
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )?;
    let mut set = libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC;
    if readonly {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    set_attrs(tree.as_fd(), set, idmap, true)?;
    Ok(tree)
}

/// A detached copy of the one mount at `path` (nothing below it), idmapped to `userns`: an
/// overlay layer for [`crate::idmap`], which cannot idmap the overlay itself.
pub fn idmapped_clone(path: &Path, userns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?;
    set_attrs(tree.as_fd(), 0, Some(userns), false)?;
    Ok(tree)
}

/// `mount_setattr` on a detached tree: set `set` (and the idmap of `idmap`), down the whole
/// tree when `recursive`.
fn set_attrs(
    tree: BorrowedFd<'_>,
    mut set: u64,
    idmap: Option<BorrowedFd<'_>>,
    recursive: bool,
) -> io::Result<()> {
    let mut userns_fd = 0;
    if let Some(ns) = idmap {
        set |= libc::MOUNT_ATTR_IDMAP;
        userns_fd = u64::try_from(ns.as_raw_fd()).map_err(io::Error::other)?;
    }
    let mut attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `tree` is an open mount tree descriptor, the path is a valid empty C string (with
    // AT_EMPTY_PATH the descriptor itself is the target), and `attr` is a live, initialized
    // `mount_attr` whose exact size is passed; the kernel only reads it (`userns_fd`, when set,
    // is `idmap`'s descriptor, open for the whole call).
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &raw mut attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The descriptor the worker talks to its parent on.
pub const CHANNEL_FD: i32 = 3;

/// Take over the channel the parent placed at [`CHANNEL_FD`]. Call once, in the worker.
pub fn channel() -> io::Result<OwnedFd> {
    // Refuse to own a descriptor that is not an open socket.
    // SAFETY: fd 3 is borrowed only for the duration of this check, while no other code in
    // this single-threaded process can close it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(CHANNEL_FD) };
    let st = rustix::fs::fstat(borrowed)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Err(io::Error::other("fd 3 is not the parent's socket"));
    }
    // SAFETY: the parent put the channel at fd 3 for this process (command-fds mapping), nothing
    // else in the worker owns it, and this is called once, so the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) })
}

/// Where the parent places a pod's network namespace for a worker that serves the pod.
pub const NETNS_FD: i32 = 4;

/// `NSFS_MAGIC`: the filesystem of `/proc/PID/ns/*` and of their bind mounts.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Open the network namespace at `path` (a pod's, as CRI names it in `linux.namespaces`):
/// refused unless it is a namespace file. Returns it with its identity (device and inode),
/// which is the same whichever path names the namespace (containerd names a pod's by its
/// bind mount for the sandbox, by `/proc/PID/ns/net` for the pod's containers).
pub fn open_netns(path: &Path) -> io::Result<(OwnedFd, (u64, u64))> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let fs = rustix::fs::fstatfs(&fd)?;
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    if i64::from(fs.f_type as i64) != NSFS_MAGIC {
        return Err(io::Error::other("not a namespace file"));
    }
    let st = rustix::fs::fstat(&fd)?;
    #[allow(clippy::useless_conversion)]
    Ok((fd, (u64::from(st.st_dev), u64::from(st.st_ino))))
}

/// In the worker, before its confinement: join the network namespace the parent placed at
/// [`NETNS_FD`] (this needs CAP_SYS_ADMIN over the namespace's owner, which only host root
/// has: the worker does this while it still is), then close the descriptor. Call once, while
/// single-threaded (`setns` moves the calling thread; every later thread inherits it).
pub fn enter_inherited_netns() -> io::Result<()> {
    // SAFETY: fd 4 is borrowed only for this check, while no other code in this
    // single-threaded process can close it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(NETNS_FD) };
    rustix::fs::fstat(borrowed)?;
    // SAFETY: the parent put the namespace at fd 4 for this process (command-fds mapping), it
    // was open just above, nothing else in the worker owns it, and this is called once, so the
    // OwnedFd is its only owner.
    let ns = unsafe { OwnedFd::from_raw_fd(NETNS_FD) };
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// A TCP listener bound to `addr` inside the network namespace at `netns` (a pod's, as
/// containerd's CRI names it in `linux.namespaces`), or in the shim's own when there is none.
/// The bind happens on a short-lived thread that alone enters the namespace (`setns` moves only
/// the calling thread); the socket stays in that namespace for its whole life.
pub fn listen_in(
    netns: Option<&Path>,
    addr: std::net::SocketAddr,
) -> io::Result<std::net::TcpListener> {
    let Some(netns) = netns else {
        return std::net::TcpListener::bind(addr);
    };
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            std::net::TcpListener::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the bind thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requires root (CAP_SYS_ADMIN); skipped otherwise.
    #[test]
    fn detached_trees_refuse_devices_and_writes_when_read_only() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let node = dir.path().join("zero");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &node,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 5),
        )
        .unwrap_or_else(|e| panic!("mknod: {e}"));
        // The node opens on the host's mount...
        assert!(std::fs::File::open(&node).is_ok());
        for readonly in [false, true] {
            let tree = detached_tree(dir.path(), readonly, None).unwrap_or_else(|e| panic!("{e}"));
            let open = |name: &str, flags| {
                rustix::fs::openat(&tree, name, flags, rustix::fs::Mode::from_raw_mode(0o644))
            };
            // ...but not through the detached tree.
            assert_eq!(
                open("zero", rustix::fs::OFlags::RDONLY).err(),
                Some(rustix::io::Errno::ACCESS)
            );
            let created = open(
                "new",
                rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
            );
            assert_eq!(created.is_ok(), !readonly, "readonly {readonly}");
            // `..` stops at the tree's root.
            let up = rustix::fs::openat(
                &tree,
                "../../..",
                rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
                rustix::fs::Mode::empty(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(rustix::fs::statat(&up, "zero", rustix::fs::AtFlags::empty()).is_ok());
        }
    }
}
