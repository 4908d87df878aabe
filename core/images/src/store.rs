//! The image store: image records (in the daemon's database), the content they reference, and
//! the snapshots their layers unpack into; `prepare` turns an image into a container's root,
//! `gc` removes what no image, container or operation in progress still needs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::content::{ContentError, ContentStore};
use crate::fsutil;
use crate::oci::{self, ManifestError, Parsed, Platform, RunConfig};
use crate::snapshot::{Driver, Layer, Mount, SnapshotError, Snapshotter};
use crate::unpack::{Limits, Nodes, UnpackError};

/// The `snapshotter` a container record names when its root came from [`ImageStore::prepare`].
pub const SNAPSHOTTER: &str = "yard";

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// An active snapshot this young is kept by `gc` even without a container: `yard run` prepares
/// the root before it creates the container record.
const ACTIVE_GRACE: Duration = Duration::from_secs(120);
/// Interrupted downloads are kept this long for a resume.
const INGEST_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("image {name:?}: not found")]
    NotFound { name: String },
    #[error("pull {reference}")]
    Registry {
        reference: String,
        #[source]
        source: Box<crate::registry::RegistryError>,
    },
    /// The registry hosts directory could not be used.
    #[error("registry hosts")]
    Hosts(#[from] crate::hosts::HostsError),
    #[error("import: {0}")]
    Import(String),
    #[error("image config User {user:?}: {reason}")]
    User { user: String, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("image metadata")]
    Db(#[source] Box<redb::Error>),
    #[error("image record {0:?} is corrupt")]
    Record(String),
    #[error("image worker stopped")]
    Join,
}

impl<E: Into<redb::Error>> From<E> for ImageError {
    fn from(e: E) -> Self {
        ImageError::Db(Box::new(e.into()))
    }
}

pub type Result<T> = std::result::Result<T, ImageError>;

/// A content descriptor as the store records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// An image: a name in a namespace pointing at a manifest or index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub target: Target,
    /// The platform chosen out of an index (`os/arch`).
    pub platform: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// An image as `yard images` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub record: ImageRecord,
    /// The platform manifest's digest (the record's target where it is not an index).
    pub manifest: String,
    /// The image config's digest: the image's id, as containerd's CRI names images.
    pub config: String,
    /// The config's `User`, unresolved.
    pub user: String,
    /// Bytes of the image's content: index, manifest, config and layers as stored.
    pub size: u64,
    /// Bytes of its unpacked snapshots (shared layers counted in each image).
    pub unpacked: u64,
    pub layers: Vec<String>,
    pub wasm: bool,
    /// Why the image cannot be resolved (missing content), if it cannot.
    pub problem: Option<String>,
}

/// What the store holds on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub snapshots: u64,
    pub snapshot_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub snapshots: u64,
    pub active: u64,
}

/// A step of a pull, import or unpack, for progress displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The image's manifest is known: how many layers, how many bytes in all.
    Resolved {
        name: String,
        digest: String,
        layers: u64,
        bytes: u64,
    },
    /// The endpoint that resolved the image's tag (or served its manifest by digest).
    Source { name: String, url: String },
    /// Bytes of a blob fetched so far (`current` of `total`).
    Fetch {
        digest: String,
        current: u64,
        total: u64,
    },
    /// A blob is complete (`cached`: it was in the store already).
    Fetched { digest: String, cached: bool },
    /// A layer is being unpacked.
    Unpack { digest: String },
    /// An image record was written.
    Stored { name: String, digest: String },
}

pub type Report<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// How a container wants its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsKind {
    /// A writable root: one overlay (or bind) mount.
    Mounts,
    /// The image's read-only EROFS file (the vm runtime makes its own writable layer).
    Erofs,
}

/// A container root made from an image.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub name: String,
    pub mounts: Vec<Mount>,
    pub run: RunConfig,
    pub uid: u32,
    pub gid: u32,
}

/// What an image resolves to in the content store.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    pub config: Option<ImageConfiguration>,
    pub diff_ids: Vec<String>,
    pub chains: Vec<String>,
    pub run: RunConfig,
    pub wasm: bool,
    /// Digests of every blob the image needs: index (if any), manifest, config, layers.
    pub blobs: Vec<(String, u64)>,
}

/// How the store is set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// The snapshot driver (`None`: overlayfs where it works, copies otherwise).
    pub driver: Option<Driver>,
    /// How much a layer may unpack to.
    pub limits: Limits,
}

pub struct ImageStore {
    content: ContentStore,
    snapshots: Snapshotter,
    limits: Limits,
    db: Arc<Database>,
    platform: Platform,
    leases: Mutex<HashMap<u64, HashSet<String>>>,
    next_lease: std::sync::atomic::AtomicU64,
    /// Serializes collections (a sweep must see every lease taken before it).
    gc_lock: Mutex<()>,
}

/// Keeps digests and chain ids an operation is writing away from `gc` until it ends.
pub struct Lease<'a> {
    store: &'a ImageStore,
    id: u64,
}

impl Lease<'_> {
    pub fn add(&self, item: &str) {
        if let Ok(mut l) = self.store.leases.lock() {
            l.entry(self.id).or_default().insert(item.to_owned());
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.store.leases.lock() {
            l.remove(&self.id);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a recorded node kind reads back as.
fn node_kind(what: &str) -> &'static str {
    match what {
        "character device" => "character device",
        "block device" => "block device",
        "fifo" => "fifo",
        "socket" => "socket",
        _ => "device node",
    }
}

fn record_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// The full name of an image reference, as `docker` and `nerdctl` spell it
/// (`busybox` → `docker.io/library/busybox:latest`).
pub fn normalize(reference: &str) -> Result<String> {
    let r: oci_client::Reference =
        reference
            .parse()
            .map_err(|e: oci_client::ParseError| ImageError::Reference {
                reference: reference.to_owned(),
                reason: e.to_string(),
            })?;
    Ok(r.whole())
}

impl ImageStore {
    /// Opens the store under `root` (content, snapshots) with records in `db`, with the default
    /// limits.
    pub fn open(root: &Path, db: Arc<Database>, driver: Option<Driver>) -> Result<ImageStore> {
        Self::open_with(
            root,
            db,
            StoreOptions {
                driver,
                ..StoreOptions::default()
            },
        )
    }

    /// Opens the store under `root` (content, snapshots) with records in `db`.
    pub fn open_with(root: &Path, db: Arc<Database>, opts: StoreOptions) -> Result<ImageStore> {
        fsutil::private_dir(root).map_err(|source| ContentError::Io {
            op: "create",
            path: root.to_owned(),
            source,
        })?;
        let content = ContentStore::open(&root.join("content"))?;
        let snapshots = Snapshotter::open(&root.join("snapshots"), opts.driver)?;
        let txn = db.begin_write()?;
        txn.open_table(IMAGES)?;
        txn.commit()?;
        Ok(ImageStore {
            content,
            snapshots,
            limits: opts.limits,
            db,
            platform: Platform::host(),
            leases: Mutex::new(HashMap::new()),
            next_lease: Default::default(),
            gc_lock: Mutex::new(()),
        })
    }

    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    pub fn snapshots(&self) -> &Snapshotter {
        &self.snapshots
    }

    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    pub fn lease(&self) -> Lease<'_> {
        // Taking the gc lock orders this lease before any sweep that starts later.
        let _g = self.gc_lock.lock();
        let id = self
            .next_lease
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Lease { store: self, id }
    }

    pub fn get(&self, ns: &str, name: &str) -> Result<ImageRecord> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(IMAGES)?;
        let key = record_key(ns, name);
        let Some(v) = t.get(key.as_str())? else {
            return Err(ImageError::NotFound {
                name: name.to_owned(),
            });
        };
        serde_json::from_slice(v.value()).map_err(|_| ImageError::Record(key))
    }

    /// Finds an image by the name the user typed (as is, or normalized).
    pub fn find(&self, ns: &str, name: &str) -> Result<ImageRecord> {
        match self.get(ns, name) {
            Err(ImageError::NotFound { .. }) => {
                let full = normalize(name).map_err(|_| ImageError::NotFound {
                    name: name.to_owned(),
                })?;
                self.get(ns, &full).map_err(|e| match e {
                    ImageError::NotFound { .. } => ImageError::NotFound {
                        name: name.to_owned(),
                    },
                    e => e,
                })
            }
            r => r,
        }
    }

    pub fn records(&self, ns: Option<&str>) -> Result<Vec<(String, ImageRecord)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(IMAGES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let key = k.value().to_owned();
            let Some((rns, _)) = key.split_once('/') else {
                continue;
            };
            if ns.is_some_and(|n| n != rns) {
                continue;
            }
            let rec: ImageRecord =
                serde_json::from_slice(v.value()).map_err(|_| ImageError::Record(key.clone()))?;
            out.push((rns.to_owned(), rec));
        }
        Ok(out)
    }

    /// Writes (or replaces) an image record.
    pub fn put_record(&self, ns: &str, name: &str, target: Target, platform: &str) -> Result<()> {
        let key = record_key(ns, name);
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(IMAGES)?;
            let created_ms = t
                .get(key.as_str())?
                .and_then(|v| serde_json::from_slice::<ImageRecord>(v.value()).ok())
                .map(|r| r.created_ms)
                .unwrap_or_else(now_ms);
            let rec = ImageRecord {
                name: name.to_owned(),
                target,
                platform: platform.to_owned(),
                created_ms,
                updated_ms: now_ms(),
            };
            let bytes = serde_json::to_vec(&rec).map_err(|_| ImageError::Record(key.clone()))?;
            t.insert(key.as_str(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes image records (not their content: see [`ImageStore::gc`]); returns the names
    /// removed, and fails naming the first that does not exist before removing any.
    pub fn remove(&self, ns: &str, names: &[String]) -> Result<Vec<String>> {
        let recs = names
            .iter()
            .map(|n| self.find(ns, n))
            .collect::<Result<Vec<_>>>()?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(IMAGES)?;
            for r in &recs {
                t.remove(record_key(ns, &r.name).as_str())?;
            }
        }
        txn.commit()?;
        Ok(recs.into_iter().map(|r| r.name).collect())
    }

    /// Reads what `target` resolves to for this store's platform (`platform` overrides it).
    pub fn resolve(&self, target: &Target, platform: Option<&Platform>) -> Result<Resolved> {
        let wanted = platform.unwrap_or(&self.platform);
        let mut blobs = vec![(target.digest.clone(), target.size)];
        let bytes = self.content.read(&target.digest, oci::MAX_METADATA_BYTES)?;
        let (manifest_digest, manifest) =
            match oci::parse_manifest(&target.digest, &target.media_type, &bytes)? {
                Parsed::Manifest(m) => (target.digest.clone(), *m),
                Parsed::Index(index) => {
                    let d = oci::select_platform(&target.digest, &index, wanted)?;
                    let digest = d.digest().to_string();
                    let bytes = self.content.read(&digest, oci::MAX_METADATA_BYTES)?;
                    blobs.push((digest.clone(), d.size()));
                    match oci::parse_manifest(&digest, d.media_type().as_ref(), &bytes)? {
                        Parsed::Manifest(m) => (digest, *m),
                        Parsed::Index(_) => {
                            return Err(ManifestError::Invalid {
                                what: "index",
                                digest,
                                reason: "nested indexes are not supported".into(),
                            }
                            .into());
                        }
                    }
                }
            };
        let artifact = oci::is_wasm_artifact(&manifest);
        let cfg = manifest.config();
        let cfg_digest = cfg.digest().to_string();
        blobs.push((cfg_digest.clone(), cfg.size()));
        let config = if artifact {
            None
        } else {
            let bytes = self.content.read(&cfg_digest, oci::MAX_METADATA_BYTES)?;
            let c = ImageConfiguration::from_reader(bytes.as_slice()).map_err(|e| {
                ManifestError::Invalid {
                    what: "image config",
                    digest: cfg_digest.clone(),
                    reason: e.to_string(),
                }
            })?;
            Some(c)
        };
        for l in manifest.layers() {
            blobs.push((l.digest().to_string(), l.size()));
        }
        let diff_ids = oci::diff_ids(&manifest, config.as_ref())?;
        let chains = oci::chain_ids(&diff_ids);
        let wasm = oci::is_for_wasm(&manifest, config.as_ref());
        let mut run = match &config {
            Some(c) => RunConfig::from_image(c),
            None => RunConfig::wasm_artifact(&manifest),
        };
        run.wasm = wasm;
        Ok(Resolved {
            manifest_digest,
            wasm,
            manifest,
            config,
            diff_ids,
            chains,
            run,
            blobs,
        })
    }

    /// Unpacks every layer of `r` not yet in a snapshot. An image for the wasm runtime (`r.wasm`,
    /// or `for_wasm`) may hold no device node or fifo: its layers are unpacked refusing them,
    /// and layers already unpacked for another image are checked.
    pub fn unpack(&self, r: &Resolved, lease: &Lease<'_>, report: Report<'_>) -> Result<()> {
        self.unpack_for(r, r.wasm, lease, report)
    }

    fn unpack_for(
        &self,
        r: &Resolved,
        for_wasm: bool,
        lease: &Lease<'_>,
        report: Report<'_>,
    ) -> Result<()> {
        let wasm_artifact = oci::is_wasm_artifact(&r.manifest);
        let nodes = if for_wasm || r.wasm {
            Nodes::Refuse
        } else {
            Nodes::Allow
        };
        let mut parent: Option<&str> = None;
        for ((layer, diff_id), chain) in r.manifest.layers().iter().zip(&r.diff_ids).zip(&r.chains)
        {
            lease.add(chain);
            let digest = layer.digest().to_string();
            if self.snapshots.exists(chain) {
                if nodes == Nodes::Refuse
                    && let Some((entry, what)) = self.snapshots.node(chain)?
                {
                    return Err(SnapshotError::Unpack {
                        layer: digest,
                        source: UnpackError::Node {
                            entry,
                            what: node_kind(&what),
                        },
                    }
                    .into());
                }
            } else {
                report(Progress::Unpack {
                    digest: digest.clone(),
                });
                if wasm_artifact {
                    let name = oci::wasm_module_name(layer);
                    let src = self.content.path(&digest)?;
                    self.snapshots.commit_with(chain, parent, |dir| {
                        std::fs::copy(&src, dir.join(&name)).map(|_| ())
                    })?;
                } else {
                    let blob = self.content.open_blob(&digest)?;
                    let compressed = blob.metadata().map(|m| m.len()).unwrap_or(layer.size());
                    let reader = std::io::BufReader::with_capacity(1 << 16, blob);
                    let spec = Layer {
                        name: &digest,
                        diff_id,
                        nodes,
                        max_tar_bytes: self.limits.max_tar_bytes(compressed),
                    };
                    self.snapshots.commit_layer(chain, parent, &spec, reader)?;
                }
            }
            parent = Some(chain);
        }
        Ok(())
    }

    /// Makes a container root from image `name`: an active snapshot `<ns>/<key>` (or, for
    /// [`RootfsKind::Erofs`], the chain's image file), and the image's run configuration with
    /// its user resolved against the image's `/etc/passwd` and `/etc/group`.
    pub fn prepare(&self, ns: &str, name: &str, key: &str, kind: RootfsKind) -> Result<Prepared> {
        self.prepare_for(ns, name, key, kind, false)
    }

    /// [`ImageStore::prepare`] for a root the caller hands to the wasm runtime whatever the
    /// image says (`for_wasm`): such a root holds no device node or fifo, or is refused.
    pub fn prepare_for(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        kind: RootfsKind,
        for_wasm: bool,
    ) -> Result<Prepared> {
        let rec = self.find(ns, name)?;
        let platform = Platform::parse(&rec.platform).ok();
        let r = self.resolve(&rec.target, platform.as_ref())?;
        let lease = self.lease();
        self.unpack_for(&r, for_wasm, &lease, &|_| {})?;
        let Some(top) = r.chains.last() else {
            return Err(ManifestError::Invalid {
                what: "manifest",
                digest: r.manifest_digest,
                reason: "no layers".into(),
            }
            .into());
        };
        let (uid, gid) = self.resolve_user(top, &r.run.user)?;
        let mounts = match kind {
            RootfsKind::Mounts => self.snapshots.prepare(&format!("{ns}/{key}"), top)?,
            RootfsKind::Erofs => {
                let path = self.snapshots.image(top)?;
                vec![Mount {
                    kind: "erofs".into(),
                    source: path.display().to_string(),
                    options: vec!["ro".into()],
                }]
            }
        };
        Ok(Prepared {
            name: rec.name,
            mounts,
            run: r.run,
            uid,
            gid,
        })
    }

    /// Whether image `name` is for the wasm runtime (see [`oci::is_for_wasm`]): the one decision
    /// the daemon routes by and the store refuses device nodes by.
    pub fn is_wasm(&self, ns: &str, name: &str) -> Result<bool> {
        let rec = self.find(ns, name)?;
        let platform = Platform::parse(&rec.platform).ok();
        Ok(self.resolve(&rec.target, platform.as_ref())?.wasm)
    }

    /// A regular file of image `name`'s root as its layers make it (at most 1 MiB, no link
    /// followed): `None` where the image has none. For the image's `/etc/passwd` and
    /// `/etc/group`.
    pub fn image_file(&self, ns: &str, name: &str, rel: &Path) -> Result<Option<Vec<u8>>> {
        let rec = self.find(ns, name)?;
        let platform = Platform::parse(&rec.platform).ok();
        let r = self.resolve(&rec.target, platform.as_ref())?;
        let Some(top) = r.chains.last() else {
            return Ok(None);
        };
        Ok(self.snapshots.read_file(top, rel)?)
    }

    /// Removes a container's active snapshot (a missing one is fine).
    pub fn remove_rootfs(&self, ns: &str, key: &str) -> Result<()> {
        Ok(self.snapshots.remove_active(&format!("{ns}/{key}"))?)
    }

    fn resolve_user(&self, chain: &str, user: &str) -> Result<(u32, u32)> {
        if user.is_empty() {
            return Ok((0, 0));
        }
        let err = |reason: String| ImageError::User {
            user: user.to_owned(),
            reason,
        };
        let (u, g) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        let passwd = || -> Result<String> {
            let b = self.snapshots.read_file(chain, Path::new("etc/passwd"))?;
            Ok(String::from_utf8_lossy(&b.unwrap_or_default()).into_owned())
        };
        let (uid, primary) = match u.parse::<u32>() {
            Ok(uid) => {
                let gid = passwd()?
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 4 && f[2] == u)
                    .and_then(|f| f[3].parse().ok());
                (uid, gid)
            }
            Err(_) => {
                let pw = passwd()?;
                let f = pw
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 4 && f[0] == u)
                    .ok_or_else(|| err("no such user in the image's /etc/passwd".into()))?;
                let uid = f[2]
                    .parse()
                    .map_err(|_| err(format!("/etc/passwd has uid {:?}", f[2])))?;
                (uid, f[3].parse().ok())
            }
        };
        let gid = match g {
            None => primary.unwrap_or(0),
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    let b = self.snapshots.read_file(chain, Path::new("etc/group"))?;
                    let gr = String::from_utf8_lossy(&b.unwrap_or_default()).into_owned();
                    gr.lines()
                        .map(|l| l.split(':').collect::<Vec<_>>())
                        .find(|f| f.len() >= 3 && f[0] == g)
                        .and_then(|f| f[2].parse().ok())
                        .ok_or_else(|| err(format!("no group {g:?} in the image's /etc/group")))?
                }
            },
        };
        Ok((uid, gid))
    }

    /// Every image of `ns` with its sizes.
    pub fn list(&self, ns: &str) -> Result<Vec<ImageSummary>> {
        let snap_bytes: HashMap<String, u64> = self
            .snapshots
            .committed()?
            .into_iter()
            .map(|c| (c.chain, c.bytes))
            .collect();
        let mut out = Vec::new();
        for (_, record) in self.records(Some(ns))? {
            let platform = Platform::parse(&record.platform).ok();
            let s = match self.resolve(&record.target, platform.as_ref()) {
                Ok(r) => ImageSummary {
                    manifest: r.manifest_digest.clone(),
                    config: r.manifest.config().digest().to_string(),
                    user: r.run.user.clone(),
                    size: r.blobs.iter().fold(0u64, |a, (_, s)| a.saturating_add(*s)),
                    unpacked: r.chains.iter().fold(0u64, |a, c| {
                        a.saturating_add(snap_bytes.get(c).copied().unwrap_or(0))
                    }),
                    layers: r
                        .manifest
                        .layers()
                        .iter()
                        .map(|l| l.digest().to_string())
                        .collect(),
                    wasm: r.wasm,
                    problem: None,
                    record,
                },
                Err(e) => ImageSummary {
                    manifest: String::new(),
                    config: String::new(),
                    user: String::new(),
                    size: 0,
                    unpacked: 0,
                    layers: Vec::new(),
                    wasm: false,
                    problem: Some(switchyard_base::chain(&e)),
                    record,
                },
            };
            out.push(s);
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    pub fn usage(&self) -> Result<Usage> {
        let blobs = self.content.list()?;
        let snaps = self.snapshots.committed()?;
        Ok(Usage {
            blobs: blobs.len() as u64,
            blob_bytes: blobs.iter().fold(0u64, |a, (_, s)| a.saturating_add(*s)),
            snapshots: snaps.len() as u64,
            snapshot_bytes: snaps.iter().fold(0u64, |a, c| a.saturating_add(c.bytes)),
        })
    }

    /// Removes blobs and snapshots no image, container (`live(ns, id)`) or operation in
    /// progress needs, and active snapshots whose container is gone.
    pub fn gc(&self, live: &dyn Fn(&str, &str) -> bool) -> Result<GcReport> {
        let _g = self.gc_lock.lock();
        // What exists is listed before the marks are read: anything committed after the
        // listing is not swept, and anything committed before it was leased (operations lease
        // a digest or chain before writing it) or recorded by the time the marks are read.
        let committed = self.snapshots.chains()?;
        let blobs = self.content.list()?;
        let active = self.snapshots.active()?;
        let mut keep: HashSet<String> = HashSet::new();
        if let Ok(l) = self.leases.lock() {
            for set in l.values() {
                keep.extend(set.iter().cloned());
            }
        }
        for (_, rec) in self.records(None)? {
            self.mark(&rec, &mut keep);
        }
        let mut report = GcReport::default();
        for (key, parent) in active {
            let (ns, id) = key.split_once('/').unwrap_or(("", key.as_str()));
            let young = self
                .snapshots
                .active_age(&key)
                .is_some_and(|a| a < ACTIVE_GRACE);
            if live(ns, id) || young {
                keep.insert(parent);
            } else if self.snapshots.remove_active(&key).is_ok() {
                report.active += 1;
            }
        }
        // A kept snapshot keeps its ancestors (the overlay driver mounts them as lowers).
        let parents: HashMap<&str, Option<&str>> = committed
            .iter()
            .map(|c| (c.chain.as_str(), c.parent.as_deref()))
            .collect();
        let mut kept_chains: HashSet<String> = HashSet::new();
        for c in &committed {
            if keep.contains(&c.chain) {
                let mut cur = Some(c.chain.as_str());
                while let Some(ch) = cur {
                    if !kept_chains.insert(ch.to_owned()) {
                        break;
                    }
                    cur = parents.get(ch).copied().flatten();
                }
            }
        }
        for c in &committed {
            if !kept_chains.contains(&c.chain) && self.snapshots.remove(&c.chain).is_ok() {
                report.snapshots += 1;
            }
        }
        for (digest, size) in blobs {
            if !keep.contains(&digest) && self.content.remove(&digest).is_ok() {
                report.blobs += 1;
                report.blob_bytes += size;
            }
        }
        self.content.clean_ingests(INGEST_MAX_AGE);
        tracing::info!(
            blobs = report.blobs,
            bytes = report.blob_bytes,
            snapshots = report.snapshots,
            active = report.active,
            "image garbage collection"
        );
        Ok(report)
    }

    /// Adds everything `rec` references that is present to `keep`: all platforms' manifests of
    /// an index, their configs and layers, and the chains of their unpacked layers.
    fn mark(&self, rec: &ImageRecord, keep: &mut HashSet<String>) {
        keep.insert(rec.target.digest.clone());
        let Ok(bytes) = self
            .content
            .read(&rec.target.digest, oci::MAX_METADATA_BYTES)
        else {
            return;
        };
        let manifests =
            match oci::parse_manifest(&rec.target.digest, &rec.target.media_type, &bytes) {
                Ok(Parsed::Manifest(_)) => vec![(rec.target.clone(), bytes)],
                Ok(Parsed::Index(index)) => index
                    .manifests()
                    .iter()
                    .filter_map(|d| {
                        let digest = d.digest().to_string();
                        let b = self.content.read(&digest, oci::MAX_METADATA_BYTES).ok()?;
                        Some((
                            Target {
                                media_type: d.media_type().to_string(),
                                digest,
                                size: d.size(),
                            },
                            b,
                        ))
                    })
                    .collect(),
                Err(_) => return,
            };
        for (t, _bytes) in &manifests {
            keep.insert(t.digest.clone());
            // Resolving a plain manifest never consults the platform.
            if let Ok(r) = self.resolve(t, None) {
                keep.extend(r.blobs.iter().map(|(d, _)| d.clone()));
                keep.extend(r.chains.iter().cloned());
            }
        }
    }

    /// The store's directories (for documentation and tests).
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        (
            self.content
                .path(&format!("sha256:{}", "0".repeat(64)))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_default(),
            self.snapshots.root().to_owned(),
        )
    }
}
