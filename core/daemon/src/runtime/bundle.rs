//! Task bundles: `<state>/tasks/<namespace>/<id>/` holds what a shim needs (`config.json`, the
//! `rootfs` mount point, `options.json`, the `log` fifo) and what switchyardd needs to find the
//! shim again after a restart (`task.json`, `bootstrap.json`, and the shim's own `address`).
//! Each bundle's `work` link points at `<root>/tasks/<namespace>/<id>/`, which outlives the
//! state directory's tmpfs only until the task is deleted.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::error::{Classify, Kind};

/// What switchyardd records about a task's runtime, to reload it after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRecord {
    pub runtime: String,
    pub runtime_type: String,
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("container spec is not valid JSON")]
    Spec(#[source] serde_json::Error),
    #[error("rootfs {}: {reason}", path.display())]
    Rootfs { path: PathBuf, reason: String },
}

impl Classify for BundleError {
    fn kind(&self) -> Kind {
        match self {
            BundleError::Io { .. } => Kind::Internal,
            BundleError::Spec(_) | BundleError::Rootfs { .. } => Kind::InvalidArgument,
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BundleError + 'a {
    move |source| BundleError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A task's bundle directory.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub namespace: String,
    pub id: String,
    pub path: PathBuf,
    pub work: PathBuf,
}

pub const TASK_RECORD: &str = "task.json";
pub const BOOTSTRAP: &str = "bootstrap.json";
pub const LOG_FIFO: &str = "log";

impl Bundle {
    pub fn locate(state: &Path, root: &Path, namespace: &str, id: &str) -> Bundle {
        Bundle {
            namespace: namespace.to_owned(),
            id: id.to_owned(),
            path: state.join("tasks").join(namespace).join(id),
            work: root.join("tasks").join(namespace).join(id),
        }
    }

    /// Checks the spec and writes a fresh bundle. `has_rootfs_mounts` says whether the task
    /// brings mounts for `rootfs/`; without them the spec's `root.path` must exist.
    pub fn create(
        &self,
        spec: &[u8],
        has_rootfs_mounts: bool,
        options_json: Option<&[u8]>,
    ) -> Result<(), BundleError> {
        check_spec(spec, &self.path, has_rootfs_mounts)?;
        if self.path.exists() {
            // Left by a create that died half way; nothing can be using it (no task is
            // registered under this id), so start over.
            self.delete()?;
        }
        // Nothing here is for other users: the bundle holds the task's spec and the shim's
        // log fifo, and a shim or runtime that needs a path reaches it as root.
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true).mode(0o700);
        if let Some(parent) = self.path.parent() {
            dirs.create(parent).map_err(io_err("create", parent))?;
        }
        dirs.recursive(false);
        dirs.create(&self.path)
            .map_err(io_err("create bundle", &self.path))?;
        let result = self.populate(spec, options_json);
        if result.is_err() {
            let _ = self.delete();
        }
        result
    }

    fn populate(&self, spec: &[u8], options_json: Option<&[u8]>) -> Result<(), BundleError> {
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true).mode(0o700);
        dirs.create(&self.work)
            .map_err(io_err("create work dir", &self.work))?;
        let link = self.path.join("work");
        std::os::unix::fs::symlink(&self.work, &link).map_err(io_err("link", &link))?;
        let rootfs = self.path.join("rootfs");
        dirs.recursive(false)
            .create(&rootfs)
            .map_err(io_err("create", &rootfs))?;
        let config = self.path.join("config.json");
        write_private(&config, spec).map_err(io_err("write", &config))?;
        if let Some(opts) = options_json {
            let p = self.path.join("options.json");
            write_private(&p, opts).map_err(io_err("write", &p))?;
        }
        let log = self.log_fifo();
        nix::unistd::mkfifo(&log, Mode::S_IRUSR | Mode::S_IWUSR)
            .map_err(|e| io_err("create fifo", &log)(e.into()))?;
        Ok(())
    }

    pub fn log_fifo(&self) -> PathBuf {
        self.path.join(LOG_FIFO)
    }

    pub fn write_record(&self, rec: &TaskRecord) -> Result<(), BundleError> {
        let p = self.path.join(TASK_RECORD);
        let json =
            serde_json::to_vec(rec).map_err(|e| io_err("encode", &p)(io::Error::other(e)))?;
        write_atomic(&p, &json).map_err(io_err("write", &p))
    }

    pub fn read_record(&self) -> Result<TaskRecord, BundleError> {
        let p = self.path.join(TASK_RECORD);
        let bytes = std::fs::read(&p).map_err(io_err("read", &p))?;
        serde_json::from_slice(&bytes).map_err(|e| io_err("decode", &p)(io::Error::other(e)))
    }

    /// Unmounts what a dead shim may have left on `rootfs/` and removes the bundle and its
    /// work directory. Missing pieces are fine: this runs on every cleanup path.
    pub fn delete(&self) -> Result<(), BundleError> {
        let rootfs = self.path.join("rootfs");
        // Unmount until nothing is mounted there (EINVAL) or it is gone (ENOENT).
        for _ in 0..16 {
            if nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        for dir in [&self.path, &self.work] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", dir)(e)),
            }
        }
        Ok(())
    }
}

/// Writes a new file only its owner can read (0600, whatever the umask).
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// Writes `data` to `path` (0600) through a temporary file of its own in the same directory
/// (`tempfile`: a fresh name, so two writers of one path never share it) and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".yard-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The part of the OCI spec switchyardd looks at: enough to catch a missing rootfs before a
/// shim is started.
#[derive(Deserialize)]
struct SpecRoot {
    root: Option<Root>,
}

#[derive(Deserialize)]
struct Root {
    path: String,
}

fn check_spec(spec: &[u8], bundle: &Path, has_rootfs_mounts: bool) -> Result<(), BundleError> {
    let spec: SpecRoot = serde_json::from_slice(spec).map_err(BundleError::Spec)?;
    if has_rootfs_mounts {
        return Ok(());
    }
    let Some(root) = spec.root else {
        return Ok(());
    };
    let path = Path::new(&root.path);
    if !path.is_absolute() {
        // Relative to the bundle (usually "rootfs"): the shim mounts or fills it.
        let _ = bundle;
        return Ok(());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(BundleError::Rootfs {
            path: path.to_owned(),
            reason: "not a directory".to_owned(),
        }),
        Err(e) => Err(BundleError::Rootfs {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_delete_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("r");
        std::fs::create_dir(&rootfs).unwrap();
        let b = Bundle::locate(
            &tmp.path().join("state"),
            &tmp.path().join("root"),
            "ns",
            "t",
        );
        let spec = format!(
            "{{\"root\":{{\"path\":{:?}}}}}",
            rootfs.display().to_string()
        );
        b.create(spec.as_bytes(), false, Some(b"{}")).unwrap();
        for f in ["config.json", "rootfs", "work", "log", "options.json"] {
            assert!(b.path.join(f).exists(), "{f}");
        }
        // Nothing of the bundle is open to other users, whatever the umask.
        for p in [
            b.path.parent().unwrap().to_owned(),
            b.path.clone(),
            b.work.clone(),
            b.path.join("config.json"),
            b.path.join("options.json"),
            b.path.join("rootfs"),
            b.path.join("log"),
        ] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }
        b.write_record(&TaskRecord {
            runtime: "runc".into(),
            runtime_type: "io.containerd.runc.v2".into(),
            binary: "/x".into(),
        })
        .unwrap();
        assert_eq!(b.read_record().unwrap().runtime, "runc");
        // A second create over a stale bundle starts fresh.
        b.create(spec.as_bytes(), false, None).unwrap();
        assert!(!b.path.join("options.json").exists());
        b.delete().unwrap();
        assert!(!b.path.exists());
        assert!(!b.work.exists());
        b.delete().unwrap();
    }

    #[test]
    fn spec_problems_are_invalid_arguments() {
        let tmp = tempfile::tempdir().unwrap();
        let b = Bundle::locate(tmp.path(), tmp.path(), "ns", "t");
        let e = b.create(b"not json", false, None).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument);
        let e = b
            .create(br#"{"root":{"path":"/nonexistent/rootfs"}}"#, false, None)
            .unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument);
        assert!(e.to_string().contains("/nonexistent/rootfs"), "{e}");
        assert!(!b.path.exists());
        // With rootfs mounts the path is the shim's business.
        b.create(br#"{"root":{"path":"/nonexistent/rootfs"}}"#, true, None)
            .unwrap();
    }
}
