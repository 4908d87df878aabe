//! Host paths of bind mounts on a backend without a shared filesystem (the built-in VMM), as
//! Kata does without virtio-fs: a small host file (CRI's `/etc/hosts`, `/etc/resolv.conf`,
//! `/etc/hostname`, the termination log, a configmap or secret file) is *copied* into the guest
//! with the agent's `WriteFile`, and so is a small directory of kubelet's configmap, secret,
//! projected and downward-API volumes (`WriteDir`, the whole tree, its `..data` symlink swap
//! kept); the container binds the copy. An emptyDir (a source under kubelet's
//! `kubernetes.io~empty-dir`) is a *directory of the pod in the guest*, one per source path,
//! shared by every container of the pod that names it. Anything else (a hostPath directory, a
//! device) is refused, naming the mount.
//!
//! Copies are kept current: a refresher polls each source's identity (device, inode, size,
//! mtime, ctime; of every entry for a directory, not following symlinks) every [`REFRESH`] and
//! rewrites the copy in place when it changed (kubelet updates configmap and secret volumes by
//! writing a new directory and swapping `..data`, which changes inodes). Only the
//! host → guest direction is kept: what a container writes into a writable copy (the
//! termination log) stays in the guest, and is overwritten only if the host file changes.
//!
//! Everything is bounded: [`MAX_COPIED_FILE`] per file or directory (the host file is
//! trusted, but a copy is one agent request and lives in guest memory; Kubernetes bounds a
//! configmap's or secret's data to 1 MiB too), [`MAX_COPIED_ENTRIES`] per directory,
//! [`MAX_COPIES`] and [`MAX_COPIED_BYTES`] per sandbox; a mount over a cap is refused naming the mount and the cap, and a file that grows
//! past a cap later keeps its last copy (logged once per change).

use std::collections::HashMap;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use yard_agent_protocol as proto;
use yard_shim_kit::{Error, Result};

use super::spec::{Bind, BindSource};
use crate::agent::Agent;

pub use proto::{MAX_COPIED_ENTRIES, MAX_COPIED_FILE};
/// How many copies one sandbox holds at once.
pub const MAX_COPIES: usize = 256;
/// How many bytes of copies one sandbox holds at once (guest memory).
pub const MAX_COPIED_BYTES: u64 = 16 << 20;
/// How often the refresher looks at the copies' sources.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The path component kubelet gives emptyDir volumes
/// (`/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`).
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
/// The kubelet volume kinds whose directories are small and written by kubelet alone, so they
/// are copied: configmap, secret, projected (service account tokens), downward API.
const COPIED_DIRS: &[&str] = &[
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];
/// How deep a copied directory may go.
const MAX_DEPTH: usize = 8;

/// How a host source reaches a guest without a shared filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// A directory of the pod in the guest (an emptyDir).
    PodDir,
    /// A copy of a regular file.
    File,
    /// A copy of a kubelet-managed directory ([`COPIED_DIRS`]).
    Tree,
    /// Nothing: it needs a shared filesystem.
    Refused,
}

/// How `path` would reach the guest. A source that cannot be looked at is a `File`: the copy
/// then fails naming the mount and the reason.
pub fn carry(path: &Path) -> Carry {
    let kind = |names: &[&str]| {
        path.components()
            .any(|c| names.iter().any(|n| c.as_os_str() == *n))
    };
    if kind(&[EMPTY_DIR]) {
        return Carry::PodDir;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() && kind(COPIED_DIRS) => Carry::Tree,
        Ok(m) if !m.is_file() => Carry::Refused,
        _ => Carry::File,
    }
}

/// The first bind mount of `binds` that only a shared filesystem could carry, described.
pub fn needs_shared_fs(binds: &[Bind]) -> Option<String> {
    binds
        .iter()
        .find(
            |b| matches!(&b.source, BindSource::Host { path, .. } if carry(path) == Carry::Refused),
        )
        .map(Bind::describe)
}

/// A host path for a backend without a shared filesystem.
pub fn no_shared_fs(what: &str, backend: &str) -> Error {
    Error::FailedPrecondition(format!(
        "config.json: {what}: the {backend} backend has no shared filesystem yet: only files and \
         kubelet's configmap, secret, projected and downward-API directories (copied into the \
         guest) and emptyDir volumes (directories in the guest) reach it, not another host \
         directory (use backend = \"qemu\")"
    ))
}

/// What identifies a version of a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// What identifies a version of a source: its stamp, or for a directory every entry's path
/// and stamp.
type Version = Vec<(PathBuf, Stamp)>;

/// A source's content as read.
enum Content {
    File { data: Vec<u8>, mode: u32 },
    Tree(Vec<proto::DirEntry>),
}

struct Read {
    version: Version,
    content: Content,
    bytes: u64,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("{size} bytes, more than the {MAX_COPIED_FILE} a copied file may have")]
    TooLarge { size: u64 },
    #[error("more than the {MAX_COPIED_FILE} bytes of files a copied directory may have")]
    TreeTooLarge,
    #[error(
        "more than the {MAX_COPIED_ENTRIES} entries (or {MAX_DEPTH} levels) a copied directory may have"
    )]
    TreeTooBig,
    #[error("{0}: not a file, directory or symlink")]
    Special(PathBuf),
}

/// Reads a regular file of at most `cap` bytes, never through a symlink if `nofollow`, and
/// never blocking on a fifo put in its place.
fn read_file(
    path: &Path,
    cap: usize,
    nofollow: bool,
) -> std::result::Result<(std::fs::Metadata, Vec<u8>), ReadError> {
    let mut flags = rustix::fs::OFlags::NONBLOCK;
    if nofollow {
        flags |= rustix::fs::OFlags::NOFOLLOW;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile(path.to_owned()));
    }
    let mut data = Vec::with_capacity(meta.size().min(cap as u64) as usize);
    (&mut f).take(cap as u64 + 1).read_to_end(&mut data)?;
    if data.len() > cap {
        return Err(ReadError::TooLarge {
            size: meta.size().max(data.len() as u64),
        });
    }
    Ok((meta, data))
}

/// Reads a source: a file of at most [`MAX_COPIED_FILE`] bytes, or a tree within the caps.
fn read_source(path: &Path, tree: bool) -> std::result::Result<Read, ReadError> {
    if !tree {
        let (meta, data) = read_file(path, MAX_COPIED_FILE, false)?;
        return Ok(Read {
            version: vec![(PathBuf::new(), Stamp::of(&meta))],
            bytes: data.len() as u64,
            content: Content::File {
                data,
                mode: meta.mode() & 0o777,
            },
        });
    }
    let mut walk = Walk {
        read: true,
        ..Walk::default()
    };
    walk.dir(path, Path::new(""), 0)?;
    Ok(Read {
        version: walk.version,
        bytes: walk.bytes,
        content: Content::Tree(walk.entries),
    })
}

/// A walk of a copied directory, never following symlinks.
#[derive(Default)]
struct Walk {
    /// Read the files (else only stamp the entries).
    read: bool,
    version: Version,
    entries: Vec<proto::DirEntry>,
    bytes: u64,
}

impl Walk {
    fn dir(&mut self, root: &Path, rel: &Path, depth: usize) -> std::result::Result<(), ReadError> {
        let here = root.join(rel);
        self.version.push((
            rel.to_owned(),
            Stamp::of(&std::fs::symlink_metadata(&here)?),
        ));
        let mut names: Vec<_> = std::fs::read_dir(&here)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for name in names {
            if self.version.len() > MAX_COPIED_ENTRIES || depth >= MAX_DEPTH {
                return Err(ReadError::TreeTooBig);
            }
            let r = rel.join(&name);
            let p = root.join(&r);
            let meta = std::fs::symlink_metadata(&p)?;
            let mut e = proto::DirEntry {
                path: r.to_string_lossy().into_owned(),
                mode: meta.mode() & 0o777,
                ..Default::default()
            };
            if meta.is_dir() {
                e.dir = true;
                if self.read {
                    self.entries.push(e);
                }
                self.dir(root, &r, depth + 1)?;
                continue;
            }
            self.version.push((r.clone(), Stamp::of(&meta)));
            if !self.read {
                continue;
            }
            if meta.is_symlink() {
                e.symlink = std::fs::read_link(&p)?.to_string_lossy().into_owned();
                e.mode = 0;
            } else if meta.is_file() {
                let left = MAX_COPIED_FILE.saturating_sub(self.bytes as usize);
                let (_, data) = read_file(&p, left, true).map_err(|e| match e {
                    ReadError::TooLarge { .. } => ReadError::TreeTooLarge,
                    e => e,
                })?;
                self.bytes += data.len() as u64;
                e.data = data;
            } else {
                return Err(ReadError::Special(p));
            }
            self.entries.push(e);
        }
        Ok(())
    }
}

/// The version of `path` now, if it can be looked at.
fn version_of(path: &Path, tree: bool) -> Option<Version> {
    if !tree {
        return std::fs::metadata(path)
            .ok()
            .map(|m| vec![(PathBuf::new(), Stamp::of(&m))]);
    }
    let mut walk = Walk::default();
    // A tree past the caps still has a version: its read then fails and is logged once.
    let _ = walk.dir(path, Path::new(""), 0);
    (!walk.version.is_empty()).then_some(walk.version)
}

struct Copied {
    container: String,
    name: String,
    source: PathBuf,
    tree: bool,
    /// The version the guest has (or the last one seen, if it could not be copied).
    version: Version,
    bytes: u64,
}

#[derive(Default)]
struct State {
    next: u64,
    copies: Vec<Copied>,
    bytes: u64,
    /// emptyDir source → its directory's name in the guest.
    pod_dirs: HashMap<PathBuf, String>,
}

impl State {
    fn name(&mut self) -> String {
        self.next += 1;
        (self.next - 1).to_string()
    }
}

/// A sandbox's copies and pod directories.
pub struct Copies {
    agent: Agent,
    backend: &'static str,
    /// Held across agent calls: a refresh, a give and a take-back never interleave (a refresh
    /// must not rewrite a copy a take-back has just removed).
    state: tokio::sync::Mutex<State>,
}

impl Copies {
    pub fn new(agent: Agent, backend: &'static str) -> Copies {
        Copies {
            agent,
            backend,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Copies container `id`'s host files into the guest and names its pod directories: the
    /// agent's volume list. On error nothing of `id` is left in the guest.
    pub async fn give(&self, id: &str, binds: &[Bind]) -> Result<Vec<proto::Volume>> {
        let mut state = self.state.lock().await;
        let mut volumes = Vec::new();
        let mut made: Vec<Copied> = Vec::new();
        let mut failed = None;
        for b in binds {
            let mut v = b.volume();
            let BindSource::Host { path, .. } = &b.source else {
                volumes.push(v);
                continue;
            };
            match carry(path) {
                Carry::PodDir => {
                    let known = state.pod_dirs.get(path).cloned();
                    v.pod_dir = match known {
                        Some(name) => name,
                        None => {
                            let name = state.name();
                            state.pod_dirs.insert(path.clone(), name.clone());
                            name
                        }
                    };
                }
                Carry::Refused => {
                    failed = Some(no_shared_fs(&b.describe(), self.backend));
                    break;
                }
                kind @ (Carry::File | Carry::Tree) => {
                    match self
                        .copy(&mut state, &made, id, b, (path, kind == Carry::Tree))
                        .await
                    {
                        Ok(c) => {
                            v.copied = c.name.clone();
                            made.push(c);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            volumes.push(v);
        }
        if let Some(e) = failed {
            for c in &made {
                self.remove(&c.name).await;
            }
            return Err(e);
        }
        state.bytes += made.iter().map(|c| c.bytes).sum::<u64>();
        state.copies.extend(made);
        Ok(volumes)
    }

    /// Reads bind `b`'s file or directory within the caps and writes it into the guest.
    async fn copy(
        &self,
        state: &mut State,
        made: &[Copied],
        id: &str,
        b: &Bind,
        (path, tree): (&Path, bool),
    ) -> Result<Copied> {
        let what = b.describe();
        if state.copies.len() + made.len() >= MAX_COPIES {
            return Err(Error::FailedPrecondition(format!(
                "config.json: {what}: sandbox already holds {MAX_COPIES} copied files, the most \
                 one VM on the {} backend takes",
                self.backend
            )));
        }
        let source = path.to_owned();
        let read = tokio::task::spawn_blocking(move || read_source(&source, tree))
            .await
            .map_err(|e| Error::Internal(format!("read {}: {e}", path.display())))?;
        let read = read.map_err(|e| {
            let msg = format!("config.json: {what}: copy it into the guest: {e}");
            match e {
                ReadError::Io(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Error::Internal(msg)
                }
                _ => Error::InvalidArgument(msg),
            }
        })?;
        let held = state.bytes + made.iter().map(|c| c.bytes).sum::<u64>();
        let bytes = read.bytes;
        if held + bytes > MAX_COPIED_BYTES {
            return Err(Error::FailedPrecondition(format!(
                "config.json: {what}: {bytes} bytes more would take the sandbox's copied files \
                 past {MAX_COPIED_BYTES} bytes, the most one VM on the {} backend holds",
                self.backend
            )));
        }
        let name = state.name();
        self.write(&name, read.content).await.map_err(|e| {
            let e = Error::from(e);
            Error::Internal(format!("config.json: {what}: copy it into the guest: {e}"))
        })?;
        Ok(Copied {
            container: id.to_owned(),
            name,
            source: path.to_owned(),
            tree,
            version: read.version,
            bytes,
        })
    }

    /// Writes copy `name` into the guest.
    async fn write(
        &self,
        name: &str,
        content: Content,
    ) -> std::result::Result<(), crate::agent::AgentError> {
        match content {
            Content::File { data, mode } => {
                self.agent
                    .write_file(proto::WriteFileRequest {
                        name: name.to_owned(),
                        data,
                        mode,
                        ..Default::default()
                    })
                    .await
            }
            Content::Tree(entries) => {
                self.agent
                    .write_dir(proto::WriteDirRequest {
                        name: name.to_owned(),
                        entries,
                        ..Default::default()
                    })
                    .await
            }
        }
    }

    async fn remove(&self, name: &str) {
        let req = proto::WriteFileRequest {
            name: name.to_owned(),
            remove: true,
            ..Default::default()
        };
        if let Err(e) = self.agent.write_file(req).await {
            tracing::debug!(copy = name, error = %yard_shim_kit::error::chain(&e), "remove a copy from the guest");
        }
    }

    /// Removes container `id`'s copies from the guest (its container is gone, or never came).
    /// The pod's directories stay with the VM.
    pub async fn take_back(&self, id: &str) {
        let mut state = self.state.lock().await;
        let (gone, kept): (Vec<Copied>, Vec<Copied>) = std::mem::take(&mut state.copies)
            .into_iter()
            .partition(|c| c.container == id);
        state.copies = kept;
        state.bytes -= gone.iter().map(|c| c.bytes).sum::<u64>();
        for c in &gone {
            self.remove(&c.name).await;
        }
    }

    /// Re-copies every source that changed since its last copy. Returns how many it rewrote.
    pub async fn refresh(&self) -> usize {
        let mut state = self.state.lock().await;
        let sources: Vec<(PathBuf, bool, Version)> = state
            .copies
            .iter()
            .map(|c| (c.source.clone(), c.tree, c.version.clone()))
            .collect();
        if sources.is_empty() {
            return 0;
        }
        // What changed, read off the async threads.
        let changed = tokio::task::spawn_blocking(move || {
            sources
                .into_iter()
                .enumerate()
                .filter(|(_, (path, tree, old))| {
                    version_of(path, *tree).is_some_and(|now| now != *old)
                })
                .map(|(i, (path, tree, _))| (i, read_source(&path, tree)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut rewritten = 0;
        for (i, read) in changed {
            let held = state.bytes;
            let c = &mut state.copies[i];
            let read = match read {
                Ok(r) if held - c.bytes + r.bytes > MAX_COPIED_BYTES => {
                    c.version = r.version;
                    tracing::warn!(
                        container_id = %c.container,
                        source = %c.source.display(),
                        bytes = r.bytes,
                        "a copied file changed but would take the sandbox past {MAX_COPIED_BYTES} bytes of copies: the guest keeps the last copy"
                    );
                    continue;
                }
                Ok(r) => r,
                Err(e) => {
                    if let Some(now) = version_of(&c.source, c.tree) {
                        c.version = now;
                    }
                    tracing::warn!(
                        container_id = %c.container,
                        source = %c.source.display(),
                        error = %e,
                        "a copied file changed but cannot be copied: the guest keeps the last copy"
                    );
                    continue;
                }
            };
            let (bytes, name) = (read.bytes, c.name.clone());
            match self.write(&name, read.content).await {
                Ok(()) => {
                    let c = &mut state.copies[i];
                    let old = std::mem::replace(&mut c.bytes, bytes);
                    c.version = read.version;
                    state.bytes = state.bytes - old + bytes;
                    rewritten += 1;
                }
                Err(e) => tracing::debug!(
                    source = %state.copies[i].source.display(),
                    error = %yard_shim_kit::error::chain(&e),
                    "re-copy a changed file (tried again next time)"
                ),
            }
        }
        rewritten
    }

    /// Refreshes every [`REFRESH`] until aborted (with its sandbox).
    pub async fn keep_current(&self) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh().await;
        }
    }
}
