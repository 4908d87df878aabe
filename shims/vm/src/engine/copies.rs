//! Host paths of bind mounts on a backend without a shared filesystem (the built-in VMM), as
//! Kata does without virtio-fs: a small host file (CRI's `/etc/hosts`, `/etc/resolv.conf`,
//! `/etc/hostname`, the termination log, a configmap or secret file) is *copied* into the guest
//! with the agent's `WriteFile` and the container binds the copy; an emptyDir (a source under
//! kubelet's `kubernetes.io~empty-dir`) is a *directory of the pod in the guest*, one per source
//! path, shared by every container of the pod that names it. Anything else (a hostPath
//! directory, a device) is refused, naming the mount.
//!
//! Copies are kept current: a refresher polls each source's identity (device, inode, size,
//! mtime, ctime) every [`REFRESH`] and rewrites the copy in place when it changed (kubelet
//! updates configmap and secret files by replacing them, which changes the inode). Only the
//! host → guest direction is kept: what a container writes into a writable copy (the
//! termination log) stays in the guest, and is overwritten only if the host file changes.
//!
//! Everything is bounded: [`MAX_COPIED_FILE`] per file (the host file is trusted, but a copy is
//! one agent request and lives in guest memory), [`MAX_COPIES`] and [`MAX_COPIED_BYTES`] per
//! sandbox; a mount over a cap is refused naming the mount and the cap, and a file that grows
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

pub use proto::MAX_COPIED_FILE;
/// How many copies one sandbox holds at once.
pub const MAX_COPIES: usize = 256;
/// How many bytes of copies one sandbox holds at once (guest memory).
pub const MAX_COPIED_BYTES: u64 = 16 << 20;
/// How often the refresher looks at the copies' sources.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The path component kubelet gives emptyDir volumes
/// (`/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`).
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

/// How a host source reaches a guest without a shared filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// A directory of the pod in the guest (an emptyDir).
    PodDir,
    /// A copy of a regular file.
    File,
    /// Nothing: it needs a shared filesystem.
    Refused,
}

/// How `path` would reach the guest. A source that cannot be looked at is a `File`: the copy
/// then fails naming the mount and the reason.
pub fn carry(path: &Path) -> Carry {
    if path.components().any(|c| c.as_os_str() == EMPTY_DIR) {
        return Carry::PodDir;
    }
    match std::fs::metadata(path) {
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
        "config.json: {what}: the {backend} backend has no shared filesystem yet: only files \
         (copied into the guest) and emptyDir volumes (directories in the guest) reach it, not \
         a host directory (use backend = \"qemu\")"
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

/// A source's content as read.
struct Read {
    stamp: Stamp,
    data: Vec<u8>,
    mode: u32,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("{size} bytes, more than the {MAX_COPIED_FILE} a copied file may have")]
    TooLarge { size: u64 },
}

/// Reads a regular file of at most [`MAX_COPIED_FILE`] bytes (never blocking on a fifo put in
/// its place).
fn read_source(path: &Path) -> std::result::Result<Read, ReadError> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile);
    }
    let mut data = Vec::with_capacity(meta.size().min(MAX_COPIED_FILE as u64) as usize);
    (&mut f)
        .take(MAX_COPIED_FILE as u64 + 1)
        .read_to_end(&mut data)?;
    if data.len() > MAX_COPIED_FILE {
        return Err(ReadError::TooLarge {
            size: meta.size().max(data.len() as u64),
        });
    }
    Ok(Read {
        stamp: Stamp::of(&meta),
        data,
        mode: meta.mode() & 0o777,
    })
}

/// The identity of `path` now, if it can be looked at.
fn stamp_of(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
}

struct Copied {
    container: String,
    name: String,
    source: PathBuf,
    /// The version the guest has (or the last one seen, if it could not be copied).
    stamp: Stamp,
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
            let mut v = proto::Volume {
                mount: b.index as u32,
                ..Default::default()
            };
            match &b.source {
                BindSource::PodShm => v.pod_shm = true,
                BindSource::Host { path, .. } => match carry(path) {
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
                    Carry::File => match self.copy(&mut state, &made, id, b, path).await {
                        Ok(c) => {
                            v.copied = c.name.clone();
                            made.push(c);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    },
                },
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

    /// Reads bind `b`'s file within the caps and writes it into the guest.
    async fn copy(
        &self,
        state: &mut State,
        made: &[Copied],
        id: &str,
        b: &Bind,
        path: &Path,
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
        let read = tokio::task::spawn_blocking(move || read_source(&source))
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
        let bytes = read.data.len() as u64;
        if held + bytes > MAX_COPIED_BYTES {
            return Err(Error::FailedPrecondition(format!(
                "config.json: {what}: {bytes} bytes more would take the sandbox's copied files \
                 past {MAX_COPIED_BYTES} bytes, the most one VM on the {} backend holds",
                self.backend
            )));
        }
        let name = state.name();
        self.agent
            .write_file(proto::WriteFileRequest {
                name: name.clone(),
                data: read.data,
                mode: read.mode,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                let e = Error::from(e);
                Error::Internal(format!("config.json: {what}: copy it into the guest: {e}"))
            })?;
        Ok(Copied {
            container: id.to_owned(),
            name,
            source: path.to_owned(),
            stamp: read.stamp,
            bytes,
        })
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
        let sources: Vec<(PathBuf, Stamp)> = state
            .copies
            .iter()
            .map(|c| (c.source.clone(), c.stamp))
            .collect();
        if sources.is_empty() {
            return 0;
        }
        // What changed, read off the async threads.
        let changed = tokio::task::spawn_blocking(move || {
            sources
                .into_iter()
                .enumerate()
                .filter(|(_, (path, old))| stamp_of(path).is_some_and(|now| now != *old))
                .map(|(i, (path, _))| (i, read_source(&path)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut rewritten = 0;
        for (i, read) in changed {
            let held = state.bytes;
            let c = &mut state.copies[i];
            let read = match read {
                Ok(r) if held - c.bytes + r.data.len() as u64 > MAX_COPIED_BYTES => {
                    c.stamp = r.stamp;
                    tracing::warn!(
                        container_id = %c.container,
                        source = %c.source.display(),
                        bytes = r.data.len(),
                        "a copied file changed but would take the sandbox past {MAX_COPIED_BYTES} bytes of copies: the guest keeps the last copy"
                    );
                    continue;
                }
                Ok(r) => r,
                Err(e) => {
                    if let Some(now) = stamp_of(&c.source) {
                        c.stamp = now;
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
            let bytes = read.data.len() as u64;
            let req = proto::WriteFileRequest {
                name: c.name.clone(),
                data: read.data,
                mode: read.mode,
                ..Default::default()
            };
            match self.agent.write_file(req).await {
                Ok(()) => {
                    let c = &mut state.copies[i];
                    let old = std::mem::replace(&mut c.bytes, bytes);
                    c.stamp = read.stamp;
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
