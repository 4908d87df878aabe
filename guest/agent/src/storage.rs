//! A container's root filesystem: its read-only image (a virtio-blk disk, or a file in the 9p
//! share loop-mounted) under a writable overlay whose upper layer is in guest memory.
//!
//! Everything of a container lives on its own tmpfs, `/run/yard/c/<id>`:
//! `image/` (the image), `upper/` and `work/` (overlay), `rootfs/` (the overlay: the container's
//! root), `config.json` (the bundle) and the runtime's pid files and logs. Removal unmounts in
//! reverse order.
//!
//! The mount plan is decided here and carried out through [`Mounter`], so it is tested without
//! root.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};
use yard_agent_protocol::{
    POD_SHM, POD_SHM_SIZE, SHARE_MOUNT, SHARE_TAG, Storage, VOLUME_MOUNT, VOLUME_TAG,
};

use crate::error::{Error, Result};

/// Containers' directories.
pub const CONTAINERS: &str = "/run/yard/c";
/// How long a block device may take to show its capacity: a disk the host attached at run time
/// (a spare virtio-blk slot given a backing file) has it once the driver handled the
/// config-change interrupt, which the host raised before asking for the container.
pub const CAPACITY_WAIT: Duration = Duration::from_secs(5);
const CAPACITY_POLL: Duration = Duration::from_millis(5);

/// The system calls a mount plan makes.
pub trait Mounter: Send + Sync {
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// Binds a loop device to `file` (read-only). The device goes away by itself when its last
    /// user is gone: keep the handle until it is mounted.
    fn attach_loop(&self, file: &Path) -> io::Result<Attached>;
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// The size of block device `device` in 512-byte sectors (`/sys/class/block/<name>/size`).
    fn block_sectors(&self, device: &Path) -> io::Result<u64>;
}

/// The real thing.
pub struct System;

impl Mounter for System {
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(io::Error::from)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => Ok(()),
            // Still busy (a process that has not died yet holds it): detach, the kernel finishes.
            Err(nix::errno::Errno::EBUSY) => {
                nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn attach_loop(&self, file: &Path) -> io::Result<Attached> {
        let backing = std::fs::File::open(file)?;
        let dev = crate::sys::attach_loop_read_only(&backing, &file.to_string_lossy())?;
        Ok(Attached {
            device: dev.path.clone(),
            _handle: Some(dev),
        })
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn block_sectors(&self, device: &Path) -> io::Result<u64> {
        let name = device
            .file_name()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let size = std::fs::read_to_string(Path::new("/sys/class/block").join(name).join("size"))?;
        size.trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// A bound loop device. With autoclear, the kernel unbinds it at its last close: the mount must
/// exist before this is dropped.
#[derive(Debug)]
pub struct Attached {
    pub device: PathBuf,
    _handle: Option<crate::sys::LoopDevice>,
}

/// Where an image comes from (validated request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Block(PathBuf),
    /// Relative to the share's root.
    SharedFile(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub source: Source,
    pub fstype: String,
}

impl Image {
    /// Checks the request's `storage`; errors name the field.
    pub fn from_request(storage: Option<&Storage>) -> Result<Image> {
        let s = storage.ok_or_else(|| Error::InvalidArgument("storage: missing".into()))?;
        if s.fstype != "erofs" && s.fstype != "ext4" {
            return Err(Error::InvalidArgument(format!(
                "storage.fstype: {:?} is not erofs or ext4",
                s.fstype
            )));
        }
        let source = match (s.block_device.is_empty(), s.shared_file.is_empty()) {
            (false, true) => {
                let p = PathBuf::from(&s.block_device);
                if !p.starts_with("/dev") || !plain(&p) || p == Path::new("/dev") {
                    return Err(Error::InvalidArgument(format!(
                        "storage.block_device: {:?} is not a device under /dev",
                        s.block_device
                    )));
                }
                Source::Block(p)
            }
            (true, false) => {
                let p = PathBuf::from(&s.shared_file);
                if p.is_absolute() || !plain(&p) {
                    return Err(Error::InvalidArgument(format!(
                        "storage.shared_file: {:?} is not a relative path inside the share",
                        s.shared_file
                    )));
                }
                Source::SharedFile(p)
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "storage: exactly one of block_device and shared_file must be set".into(),
                ));
            }
        };
        Ok(Image {
            source,
            fstype: s.fstype.clone(),
        })
    }
}

/// No `..`, `.` or empty components.
fn plain(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::RootDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)))
}

/// A prepared rootfs; [`release`] undoes it.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// `/run/yard/c/<id>` (its own tmpfs).
    pub dir: PathBuf,
    /// The overlay: the container's root.
    pub rootfs: PathBuf,
    /// Mount points, innermost last.
    mounts: Vec<PathBuf>,
}

pub fn container_dir(id: &str) -> PathBuf {
    Path::new(CONTAINERS).join(id)
}

/// Mounts the 9p share (once per guest).
pub fn mount_share(m: &dyn Mounter) -> Result<()> {
    let target = Path::new(SHARE_MOUNT);
    m.mkdir(target)
        .map_err(Error::io(format!("create {SHARE_MOUNT}")))?;
    m.mount(
        SHARE_TAG,
        target,
        "9p",
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("trans=virtio,version=9p2000.L,msize=262144"),
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ENODEV) {
            Error::FailedPrecondition(format!(
                "storage.shared_file: the VM has no 9p share tagged {SHARE_TAG:?} ({e})"
            ))
        } else {
            Error::io(format!("mount the 9p share {SHARE_TAG} at {SHARE_MOUNT}"))(e)
        }
    })
}

/// Mounts the read-write volume share (once per guest). `cache=none`: every read goes to the
/// host, so a file changed there (a configmap) reads changed here.
pub fn mount_volumes(m: &dyn Mounter) -> Result<()> {
    let target = Path::new(VOLUME_MOUNT);
    m.mkdir(target)
        .map_err(Error::io(format!("create {VOLUME_MOUNT}")))?;
    m.mount(
        VOLUME_TAG,
        target,
        "9p",
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("trans=virtio,version=9p2000.L,msize=262144,cache=none"),
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ENODEV) {
            Error::FailedPrecondition(format!(
                "volumes: the VM has no 9p share tagged {VOLUME_TAG:?} ({e})"
            ))
        } else {
            Error::io(format!("mount the 9p share {VOLUME_TAG} at {VOLUME_MOUNT}"))(e)
        }
    })
}

/// Mounts the pod's `/dev/shm` (once per guest).
pub fn mount_pod_shm(m: &dyn Mounter) -> Result<()> {
    let target = Path::new(POD_SHM);
    m.mkdir(target)
        .map_err(Error::io(format!("create {POD_SHM}")))?;
    m.mount(
        "shm",
        target,
        "tmpfs",
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!("mode=1777,size={POD_SHM_SIZE}")),
    )
    .map_err(Error::io(format!("mount the pod's shm at {POD_SHM}")))
}

/// Mounts `image` and the overlay for container `id`. On error, what was mounted is undone.
/// The share must be mounted already for a shared file.
pub fn prepare(m: &dyn Mounter, id: &str, image: &Image) -> Result<Rootfs> {
    let dir = container_dir(id);
    let mut done = Rootfs {
        rootfs: dir.join("rootfs"),
        dir: dir.clone(),
        mounts: Vec::new(),
    };
    match prepare_steps(m, image, &mut done) {
        Ok(()) => Ok(done),
        Err(e) => {
            release(m, &done);
            Err(e)
        }
    }
}

fn prepare_steps(m: &dyn Mounter, image: &Image, r: &mut Rootfs) -> Result<()> {
    let dir = r.dir.clone();
    m.mkdir(&dir)
        .map_err(Error::io(format!("create {}", dir.display())))?;
    m.mount(
        "tmpfs",
        &dir,
        "tmpfs",
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("mode=0700"),
    )
    .map_err(Error::io(format!("mount a tmpfs at {}", dir.display())))?;
    r.mounts.push(dir.clone());
    let (image_dir, upper, work) = (dir.join("image"), dir.join("upper"), dir.join("work"));
    for d in [&image_dir, &upper, &work, &r.rootfs] {
        m.mkdir(d)
            .map_err(Error::io(format!("create {}", d.display())))?;
    }
    let (device, _loop_handle) = match &image.source {
        Source::Block(dev) => {
            wait_for_capacity(m, dev, CAPACITY_WAIT)?;
            (dev.clone(), None)
        }
        Source::SharedFile(rel) => {
            let file = Path::new(SHARE_MOUNT).join(rel);
            let attached = m.attach_loop(&file).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Error::NotFound(format!(
                        "storage.shared_file: {} is not in the share",
                        rel.display()
                    ))
                } else {
                    Error::io(format!("loop device for {}", file.display()))(e)
                }
            })?;
            (attached.device.clone(), Some(attached))
        }
    };
    m.mount(
        &device.to_string_lossy(),
        &image_dir,
        &image.fstype,
        MsFlags::MS_RDONLY,
        None,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ENXIO) {
            Error::NotFound(format!(
                "storage.block_device: {} does not exist in the guest",
                device.display()
            ))
        } else {
            Error::io(format!(
                "mount {} ({}) at {}",
                device.display(),
                image.fstype,
                image_dir.display()
            ))(e)
        }
    })?;
    r.mounts.push(image_dir.clone());
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        image_dir.display(),
        upper.display(),
        work.display()
    );
    m.mount(
        "overlay",
        &r.rootfs,
        "overlay",
        MsFlags::empty(),
        Some(&options),
    )
    .map_err(Error::io(format!(
        "mount the overlay at {}",
        r.rootfs.display()
    )))?;
    r.mounts.push(r.rootfs.clone());
    Ok(())
}

/// Waits until block device `device` has a non-zero size, polling: a disk the host attached
/// after boot starts empty. A device the guest does not have is left to the mount to report.
pub fn wait_for_capacity(m: &dyn Mounter, device: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match m.block_sectors(device) {
            Ok(0) => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(Error::io(format!("size of {}", device.display()))(e));
            }
        }
        if start.elapsed() >= timeout {
            return Err(Error::FailedPrecondition(format!(
                "storage.block_device: {} is still empty after {} ms (the host did not attach \
                 the image)",
                device.display(),
                timeout.as_millis()
            )));
        }
        std::thread::sleep(CAPACITY_POLL);
    }
}

/// Unmounts the overlay, the image and the container's tmpfs, and removes its directory.
pub fn release(m: &dyn Mounter, r: &Rootfs) {
    for target in r.mounts.iter().rev() {
        if let Err(e) = m.unmount(target) {
            tracing::warn!(target = %target.display(), error = %e, "unmount");
        }
    }
    if let Err(e) = m.remove_dir(&r.dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %r.dir.display(), error = %e, "remove the container directory");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail_on: Option<&'static str>,
        /// What successive `block_sectors` calls return; 8 once used up.
        sectors: Mutex<std::collections::VecDeque<io::Result<u64>>>,
    }

    impl Recorder {
        fn record(&self, call: String) -> io::Result<()> {
            let fail = self.fail_on.is_some_and(|f| call.contains(f));
            self.calls.lock().unwrap().push(call);
            if fail {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(())
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Mounter for Recorder {
        fn mkdir(&self, path: &Path) -> io::Result<()> {
            self.record(format!("mkdir {}", path.display()))
        }
        fn mount(
            &self,
            source: &str,
            target: &Path,
            fstype: &str,
            flags: MsFlags,
            data: Option<&str>,
        ) -> io::Result<()> {
            let ro = if flags.contains(MsFlags::MS_RDONLY) {
                " ro"
            } else {
                ""
            };
            self.record(format!(
                "mount {source} {} {fstype}{ro} {}",
                target.display(),
                data.unwrap_or("-")
            ))
        }
        fn unmount(&self, target: &Path) -> io::Result<()> {
            self.record(format!("umount {}", target.display()))
        }
        fn attach_loop(&self, file: &Path) -> io::Result<Attached> {
            self.record(format!("loop {}", file.display()))?;
            Ok(Attached {
                device: PathBuf::from("/dev/loop0"),
                _handle: None,
            })
        }
        fn remove_dir(&self, path: &Path) -> io::Result<()> {
            self.record(format!("rmdir {}", path.display()))
        }
        fn block_sectors(&self, _device: &Path) -> io::Result<u64> {
            self.sectors.lock().unwrap().pop_front().unwrap_or(Ok(8))
        }
    }

    #[test]
    fn a_block_device_is_mounted_once_it_has_capacity() {
        let m = Recorder::default();
        m.sectors.lock().unwrap().extend([Ok(0), Ok(0), Ok(0)]);
        wait_for_capacity(&m, Path::new("/dev/vdb"), Duration::from_secs(5)).unwrap();
        assert!(
            m.sectors.lock().unwrap().is_empty(),
            "polled until non-zero"
        );

        let m = Recorder::default();
        m.sectors.lock().unwrap().extend((0..1000).map(|_| Ok(0)));
        let started = Instant::now();
        let err =
            wait_for_capacity(&m, Path::new("/dev/vdb"), Duration::from_millis(30)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("/dev/vdb is still empty"), "{err}");

        // A device the guest lacks is the mount's to report.
        let m = Recorder::default();
        m.sectors
            .lock()
            .unwrap()
            .push_back(Err(io::ErrorKind::NotFound.into()));
        wait_for_capacity(&m, Path::new("/dev/vdz"), Duration::from_secs(5)).unwrap();
    }

    fn storage(block: &str, file: &str, fstype: &str) -> Storage {
        Storage {
            block_device: block.into(),
            shared_file: file.into(),
            fstype: fstype.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_block_device_image_under_an_overlay() {
        let m = Recorder::default();
        let image = Image::from_request(Some(&storage("/dev/vda", "", "erofs"))).unwrap();
        let r = prepare(&m, "c1", &image).unwrap();
        assert_eq!(r.rootfs, Path::new("/run/yard/c/c1/rootfs"));
        assert_eq!(
            m.calls(),
            [
                "mkdir /run/yard/c/c1",
                "mount tmpfs /run/yard/c/c1 tmpfs mode=0700",
                "mkdir /run/yard/c/c1/image",
                "mkdir /run/yard/c/c1/upper",
                "mkdir /run/yard/c/c1/work",
                "mkdir /run/yard/c/c1/rootfs",
                "mount /dev/vda /run/yard/c/c1/image erofs ro -",
                "mount overlay /run/yard/c/c1/rootfs overlay lowerdir=/run/yard/c/c1/image,upperdir=/run/yard/c/c1/upper,workdir=/run/yard/c/c1/work",
            ]
        );
        let m2 = Recorder::default();
        release(&m2, &r);
        assert_eq!(
            m2.calls(),
            [
                "umount /run/yard/c/c1/rootfs",
                "umount /run/yard/c/c1/image",
                "umount /run/yard/c/c1",
                "rmdir /run/yard/c/c1",
            ]
        );
    }

    #[test]
    fn a_shared_file_is_loop_mounted_from_the_share() {
        let m = Recorder::default();
        let image = Image::from_request(Some(&storage("", "images/b.erofs", "erofs"))).unwrap();
        prepare(&m, "c2", &image).unwrap();
        let calls = m.calls();
        assert!(calls.contains(&"loop /run/yard/share/images/b.erofs".to_owned()));
        assert!(calls.contains(&"mount /dev/loop0 /run/yard/c/c2/image erofs ro -".to_owned()));
        let m = Recorder::default();
        mount_share(&m).unwrap();
        assert_eq!(
            m.calls()[1],
            "mount yardshare /run/yard/share 9p ro trans=virtio,version=9p2000.L,msize=262144"
        );
        let m = Recorder::default();
        mount_volumes(&m).unwrap();
        mount_pod_shm(&m).unwrap();
        assert_eq!(
            m.calls(),
            [
                "mkdir /run/yard/vol",
                "mount yardvol /run/yard/vol 9p trans=virtio,version=9p2000.L,msize=262144,cache=none",
                "mkdir /run/yard/shm",
                "mount shm /run/yard/shm tmpfs mode=1777,size=64m",
            ]
        );
    }

    #[test]
    fn a_failed_step_undoes_the_earlier_ones() {
        let m = Recorder {
            fail_on: Some("overlay"),
            ..Default::default()
        };
        let image = Image::from_request(Some(&storage("/dev/vdb", "", "ext4"))).unwrap();
        assert!(prepare(&m, "c3", &image).is_err());
        let calls = m.calls();
        assert_eq!(
            &calls[calls.len() - 3..],
            [
                "umount /run/yard/c/c3/image",
                "umount /run/yard/c/c3",
                "rmdir /run/yard/c/c3"
            ]
        );
    }

    #[test]
    fn bad_storage_names_the_field() {
        let cases = [
            (storage("/dev/vda", "", "xfs"), "storage.fstype"),
            (storage("/etc/passwd", "", "erofs"), "storage.block_device"),
            (storage("/dev/../etc", "", "erofs"), "storage.block_device"),
            (storage("", "../x", "erofs"), "storage.shared_file"),
            (storage("", "/abs", "erofs"), "storage.shared_file"),
            (storage("/dev/vda", "x", "erofs"), "storage: exactly one"),
            (storage("", "", "erofs"), "storage: exactly one"),
        ];
        for (s, want) in cases {
            match Image::from_request(Some(&s)) {
                Err(Error::InvalidArgument(m)) => assert!(m.starts_with(want), "{m}"),
                other => panic!("{s:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Image::from_request(None),
            Err(Error::InvalidArgument(m)) if m == "storage: missing"
        ));
    }
}
