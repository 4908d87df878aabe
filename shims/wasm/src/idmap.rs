//! A task's overlay root rebuilt on idmapped lower layers, for a worker in a user namespace.
//!
//! An overlay mount cannot be idmapped itself, but its layers can (Linux 5.19+), as containerd's
//! overlay snapshotter does for user namespaces: the lower layers are reached through mounts
//! idmapped to the worker's user namespace, so a root-owned file of the image is the worker's
//! own. The upper layer cannot be idmapped (overlay writes it with the credentials of whoever
//! mounted it, host root, which the namespace does not map): like containerd, the upper
//! directory is handed to the worker's host ids instead, so what a task writes is theirs on disk.
//! [`remount_overlay`] replaces the overlay the kit mounted at a task's root with such an
//! overlay over the same directories. The idmapped layer mounts are attached only for the
//! `mount` call, under a private staging directory, and detached right after: the overlay holds
//! its own references to them.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::mount::{MountFlags, MoveMountFlags, UnmountFlags};
use yard_shim_kit::protos::types::mount::Mount;

/// Where the layers are attached for a moment: short, so that a long list of layers still fits
/// the one page `mount(2)` takes.
const STAGE_BASE: &str = "/run/yard-wasm-idmap";
/// `mount(2)` reads at most one page of options.
const MAX_DATA: usize = 4095;

/// An overlay mount's options, split.
#[derive(Debug, PartialEq, Eq)]
struct Overlay {
    lowers: Vec<PathBuf>,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    /// Filesystem options passed on unchanged (`index=off`, `userxattr`, ...).
    data: Vec<String>,
    flags: MountFlags,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Overlay {
    fn parse(options: &[String]) -> io::Result<Overlay> {
        let mut o = Overlay {
            lowers: Vec::new(),
            upper: None,
            work: None,
            data: Vec::new(),
            flags: MountFlags::NODEV | MountFlags::NOSUID,
        };
        for opt in options {
            let path = |v: &str| -> io::Result<PathBuf> {
                // Overlay escapes `:` and `,` with a backslash; containerd's layers need neither.
                if v.is_empty() || v.contains('\\') || !v.starts_with('/') {
                    return Err(invalid(format!(
                        "overlay option {opt}: not a plain absolute path"
                    )));
                }
                Ok(PathBuf::from(v))
            };
            match opt.split_once('=') {
                Some(("lowerdir", v)) => {
                    o.lowers = v.split(':').map(path).collect::<io::Result<_>>()?;
                }
                Some(("upperdir", v)) => o.upper = Some(path(v)?),
                Some(("workdir", v)) => o.work = Some(path(v)?),
                Some(_) => o.data.push(opt.clone()),
                None => match opt.as_str() {
                    "ro" => o.flags |= MountFlags::RDONLY,
                    "noexec" => o.flags |= MountFlags::NOEXEC,
                    // Roots for Wasm are nodev,nosuid whatever the mount asked for.
                    "rw" | "nodev" | "nosuid" | "dev" | "suid" | "exec" => {}
                    _ => o.data.push(opt.clone()),
                },
            }
        }
        if o.lowers.is_empty() {
            return Err(invalid("overlay: no lowerdir".into()));
        }
        if o.upper.is_some() != o.work.is_some() {
            return Err(invalid(
                "overlay: upperdir without workdir or the reverse".into(),
            ));
        }
        Ok(o)
    }
}

/// A private directory holding the idmapped layer mounts while the overlay is made; dropping it
/// detaches them and removes it.
struct Stage {
    dir: PathBuf,
    attached: Vec<PathBuf>,
}

impl Stage {
    fn new() -> io::Result<Stage> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = Path::new(STAGE_BASE);
        std::fs::create_dir_all(base)?;
        let dir = base.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        Ok(Stage {
            dir,
            attached: Vec::new(),
        })
    }

    /// Attach `path`, idmapped to `userns`, at `<stage>/<name>`.
    fn attach(&mut self, path: &Path, userns: BorrowedFd<'_>, name: &str) -> io::Result<PathBuf> {
        let tree = crate::sys::idmapped_clone(path, userns)
            .map_err(|e| io::Error::new(e.kind(), format!("idmap {}: {e}", path.display())))?;
        let at = self.dir.join(name);
        std::fs::create_dir(&at)?;
        rustix::mount::move_mount(
            &tree,
            c"",
            rustix::fs::CWD,
            &at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )?;
        self.attached.push(at.clone());
        Ok(at)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        for at in self.attached.drain(..).rev() {
            if let Err(e) = rustix::mount::unmount(&at, UnmountFlags::DETACH) {
                tracing::warn!(at = %at.display(), error = %e, "detach an idmapped layer");
            }
        }
        remove_stage(&self.dir);
    }
}

/// Remove a staging directory and its (detached) mount points, one level, never recursively:
/// a layer still attached there must not be emptied.
fn remove_stage(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Detach and remove what a shim that died in the middle of [`remount_overlay`] left staged
/// (`<pid>-<n>` directories whose shim is gone). Called when a shim server starts.
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir(STAGE_BASE) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(staged) = std::fs::read_dir(e.path()) {
            for s in staged.flatten() {
                let _ = rustix::mount::unmount(s.path(), UnmountFlags::DETACH);
            }
        }
        remove_stage(&e.path());
    }
}

/// Replace the overlay `m` mounted at `target` with the same overlay over lower layers idmapped
/// to `userns`, its upper directory handed to `owner` (the host uid and gid the namespace's root
/// is). On an error nothing is mounted at `target` any more (the task fails Create).
pub fn remount_overlay(
    target: &Path,
    m: &Mount,
    userns: BorrowedFd<'_>,
    owner: (u32, u32),
) -> io::Result<()> {
    let o = Overlay::parse(&m.options)?;
    let mut stage = Stage::new()?;
    let mut lowers = Vec::with_capacity(o.lowers.len());
    for (i, l) in o.lowers.iter().enumerate() {
        lowers.push(stage.attach(l, userns, &i.to_string())?);
    }
    let mut data = vec![format!(
        "lowerdir={}",
        lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    )];
    if let (Some(upper), Some(work)) = (&o.upper, &o.work) {
        std::os::unix::fs::chown(upper, Some(owner.0), Some(owner.1))
            .map_err(|e| io::Error::new(e.kind(), format!("chown {}: {e}", upper.display())))?;
        data.push(format!("upperdir={}", upper.display()));
        data.push(format!("workdir={}", work.display()));
    }
    data.extend(o.data.iter().cloned());
    let data = data.join(",");
    if data.len() > MAX_DATA {
        return Err(invalid(format!(
            "overlay: {} layers do not fit one mount call when idmapped",
            o.lowers.len()
        )));
    }
    let data = std::ffi::CString::new(data).map_err(|e| invalid(format!("overlay: {e}")))?;
    // The kit's overlay goes first: two overlays must not share an upper directory.
    rustix::mount::unmount(target, UnmountFlags::DETACH)?;
    rustix::mount::mount("overlay", target, "overlay", o.flags, data.as_c_str())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn overlay_options_split() {
        let o = Overlay::parse(&opts(&[
            "index=off",
            "lowerdir=/l/2:/l/1",
            "upperdir=/s/fs",
            "workdir=/s/work",
            "ro",
            "dev",
            "nosuid",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.lowers, [PathBuf::from("/l/2"), PathBuf::from("/l/1")]);
        assert_eq!(o.upper.as_deref(), Some(Path::new("/s/fs")));
        assert_eq!(o.work.as_deref(), Some(Path::new("/s/work")));
        assert_eq!(o.data, ["index=off"]);
        assert_eq!(
            o.flags,
            MountFlags::NODEV | MountFlags::NOSUID | MountFlags::RDONLY
        );
        for bad in [
            &["upperdir=/u", "workdir=/w"][..],
            &["lowerdir=/a\\:b"],
            &["lowerdir=rel"],
            &["lowerdir=/a", "upperdir=/u"],
        ] {
            assert!(Overlay::parse(&opts(bad)).is_err(), "{bad:?}");
        }
    }

    /// Requires root; skipped without. A stage left by a dead shim, with a mount still
    /// attached in it, is detached and removed, and what the mount showed is untouched.
    #[test]
    fn a_dead_shims_stage_is_swept_without_touching_the_layer() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let layer = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(layer.path().join("keep"), "x").unwrap_or_else(|e| panic!("{e}"));
        // No process has pid 0x3fffffff (above the kernel's pid_max).
        let stage = Path::new(STAGE_BASE).join("1073741823-0");
        let at = stage.join("0");
        std::fs::create_dir_all(&at).unwrap_or_else(|e| panic!("{e}"));
        rustix::mount::mount_bind(layer.path(), &at).unwrap_or_else(|e| panic!("{e}"));
        sweep();
        assert!(!stage.exists(), "the stage is left");
        assert!(layer.path().join("keep").exists(), "the layer was emptied");
    }

    /// Requires root and a kernel with idmapped overlay layers; skipped without root.
    #[test]
    fn an_overlay_on_idmapped_layers_shows_root_files_as_the_namespaces() {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let d = |n: &str| {
            let p = dir.path().join(n);
            std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
            p
        };
        let (lower, upper, work, target) = (d("l"), d("s/fs"), d("s/work"), d("root"));
        std::fs::write(lower.join("f"), "x").unwrap_or_else(|e| panic!("{e}"));
        // A user namespace, held by a child that waits; mapped here as the shim maps its
        // worker's: 0 inside is 2000000000 outside.
        let mut holder = std::process::Command::new("unshare")
            .args(["--user", "cat"])
            .stdin(std::process::Stdio::piped())
            .spawn();
        let Ok(child) = holder.as_mut() else {
            eprintln!("skipped: no unshare(1)");
            return;
        };
        let ns_path = format!("/proc/{}/ns/user", child.id());
        // unshare(1) enters the namespace before it runs cat: wait until it has.
        let own = std::fs::read_link("/proc/self/ns/user").ok();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(&ns_path).ok() == own && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        for map in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{}/{map}", child.id()), "0 2000000000 1\n")
                .unwrap_or_else(|e| panic!("{map}: {e}"));
        }
        let ns = std::fs::File::open(&ns_path).unwrap_or_else(|e| panic!("{e}"));
        let m = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: opts(&[
                &format!("lowerdir={}", lower.display()),
                &format!("upperdir={}", upper.display()),
                &format!("workdir={}", work.display()),
            ]),
            ..Default::default()
        };
        rustix::mount::mount(
            "overlay",
            &target,
            "overlay",
            MountFlags::empty(),
            std::ffi::CString::new(m.options.join(","))
                .unwrap_or_else(|e| panic!("{e}"))
                .as_c_str(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let r = remount_overlay(
            &target,
            &m,
            std::os::fd::AsFd::as_fd(&ns),
            (2_000_000_000, 2_000_000_000),
        );
        let _ = child.kill();
        let _ = child.wait();
        r.unwrap_or_else(|e| panic!("{e}"));
        let owner = |p: &Path| std::fs::metadata(p).map(|m| m.uid()).ok();
        // The image's file through the idmapped lower layer, and the root (the upper directory).
        let (file, root) = (owner(&target.join("f")), owner(&target));
        let _ = rustix::mount::unmount(&target, UnmountFlags::DETACH);
        assert_eq!(file, Some(2_000_000_000));
        assert_eq!(root, Some(2_000_000_000));
        assert_eq!(
            owner(&lower.join("f")),
            Some(0),
            "the layer itself is unchanged"
        );
        // Nothing staged is left.
        assert!(
            std::fs::read_dir(STAGE_BASE)
                .map(|rd| rd.flatten().all(|e| !e
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}-", std::process::id()))))
                .unwrap_or(true)
        );
    }
}
