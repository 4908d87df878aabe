//! Persistent metadata: namespaces, containers and leases in one redb database under the root
//! directory. Records are stored as their containerd protobuf messages, so what `ctr` sent is
//! what it gets back.
//!
//! The store is synchronous (commits fsync); RPC handlers call it through [`Store::run`], which
//! moves the work off the async workers.
//!
//! One kind of record is written lazily: a container labelled [`REMOVE_LABEL`] (`yard run --rm`
//! without `-d`), which its client removes with its task. Its create (unless it also makes the
//! namespace) and its delete commit without fsync; [`Store::sync`], which the daemon starts in
//! the background after such a commit and which Tasks.Create waits for before it makes a task,
//! makes them durable. So a task never exists for a record a crash could lose, and a removal a
//! crash loses leaves a labelled record with no task, which the daemon removes at its next start
//! (`server::containers::remove_leftovers`), as `--rm` asked.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use prost::Message;
use prost_types::Timestamp;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
pub use switchyard_api::client::REMOVE_LABEL;
use switchyard_api::containerd::services::containers::v1::Container;
use switchyard_api::containerd::services::leases::v1::{Lease, Resource};
use switchyard_api::containerd::services::namespaces::v1::Namespace;

use crate::error::{Classify, Kind};

const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const LEASE_RESOURCES: TableDefinition<&str, ()> = TableDefinition::new("lease_resources");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id:?} in namespace {namespace:?}: not found")]
    NotFound {
        what: &'static str,
        namespace: String,
        id: String,
    },
    #[error("{what} {id:?} in namespace {namespace:?}: already exists")]
    AlreadyExists {
        what: &'static str,
        namespace: String,
        id: String,
    },
    #[error("namespace {0:?}: not found")]
    NamespaceNotFound(String),
    #[error("namespace {0:?}: already exists")]
    NamespaceExists(String),
    #[error("namespace {namespace:?} is not empty: it still has {what}")]
    NamespaceNotEmpty {
        namespace: String,
        what: &'static str,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Ident(crate::ident::InvalidIdent),
    #[error("metadata database")]
    Db(#[source] Box<redb::Error>),
    #[error("metadata record {key:?} is corrupt")]
    Decode {
        key: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("metadata worker stopped")]
    Join(#[source] tokio::task::JoinError),
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Db(Box::new(e.into()))
    }
}

impl Classify for StoreError {
    fn kind(&self) -> Kind {
        match self {
            StoreError::NotFound { .. } | StoreError::NamespaceNotFound(_) => Kind::NotFound,
            StoreError::AlreadyExists { .. } | StoreError::NamespaceExists(_) => {
                Kind::AlreadyExists
            }
            StoreError::NamespaceNotEmpty { .. } => Kind::FailedPrecondition,
            StoreError::InvalidArgument(_) | StoreError::Ident(_) => Kind::InvalidArgument,
            StoreError::Db(_) | StoreError::Decode { .. } | StoreError::Join(_) => Kind::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The metadata database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
    lazy: Arc<Lazy>,
}

/// Counts of commits made without fsync, and how many of them are durable.
#[derive(Debug, Default)]
struct Lazy {
    committed: AtomicU64,
    durable: AtomicU64,
}

/// Whether a container record is removed with its task by its client (module doc).
pub fn removed_with_task(c: &Container) -> bool {
    c.labels.get(REMOVE_LABEL).is_some_and(|v| v == "true")
}

fn key(ns: &str, id: &str) -> String {
    format!("{ns}/{id}")
}

/// The key range holding every record of namespace `ns` (`ns/` up to `ns0`, '0' following '/').
fn ns_range(ns: &str) -> (String, String) {
    (format!("{ns}/"), format!("{ns}0"))
}

fn resource_key(ns: &str, lease: &str, r: &Resource) -> String {
    format!("{ns}/{lease}\0{}\0{}", r.r#type, r.id)
}

fn now() -> Timestamp {
    Timestamp::from(SystemTime::now())
}

fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|source| StoreError::Decode {
        key: key.to_owned(),
        source,
    })
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let mut builder = Database::builder();
        // Metadata is small; a large page cache would only inflate the daemon's RSS.
        builder.set_cache_size(4 << 20);
        let db = builder.create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(NAMESPACES)?;
            txn.open_table(CONTAINERS)?;
            txn.open_table(LEASES)?;
            txn.open_table(LEASE_RESOURCES)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Store {
            db: Arc::new(db),
            lazy: Arc::default(),
        })
    }

    /// Commits `txn` without waiting for the disk (module doc).
    fn commit_lazily(&self, mut txn: WriteTransaction) -> Result<()> {
        // Fails only for a transaction that changed persistent savepoints, which these do not;
        // the commit is then simply durable.
        let _ = txn.set_durability(Durability::None);
        txn.commit()?;
        self.lazy.committed.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Whether a commit made without fsync is not durable yet.
    pub fn has_lazy_commits(&self) -> bool {
        self.lazy.durable.load(Ordering::Acquire) < self.lazy.committed.load(Ordering::Acquire)
    }

    /// Makes every commit made so far without fsync durable; returns at once when they are.
    pub fn sync(&self) -> Result<()> {
        let wanted = self.lazy.committed.load(Ordering::Acquire);
        if self.lazy.durable.load(Ordering::Acquire) >= wanted {
            return Ok(());
        }
        // One writer at a time: a sync already committing finishes first, and may have
        // covered this one (the unused transaction is then dropped, which aborts it).
        let txn = self.db.begin_write()?;
        if self.lazy.durable.load(Ordering::Acquire) >= wanted {
            return Ok(());
        }
        // Read under the write lock: every commit counted here is done, so this durable
        // commit makes it durable.
        let upto = self.lazy.committed.load(Ordering::Acquire);
        txn.commit()?;
        self.lazy.durable.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Starts [`Store::sync`] in the background when a commit made without fsync is pending.
    pub fn sync_soon(&self) {
        if !self.has_lazy_commits() {
            return;
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.sync() {
                tracing::warn!(error = %crate::error::chain(&e), "make the metadata durable");
            }
        });
    }

    /// The database, shared with the image store (which keeps its own tables in it).
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// Runs `f` on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(StoreError::Join)?
    }

    /// The server's persistent identity, made on first use.
    pub fn server_uuid(&self) -> Result<String> {
        let txn = self.db.begin_write()?;
        let id = {
            let mut t = txn.open_table(META)?;
            let existing = t
                .get("uuid")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match existing {
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    t.insert("uuid", id.as_bytes())?;
                    id
                }
            }
        };
        txn.commit()?;
        Ok(id)
    }

    // ---- namespaces ----

    fn ensure_namespace(txn: &redb::WriteTransaction, ns: &str) -> Result<bool> {
        crate::ident::check("namespace", ns).map_err(StoreError::Ident)?;
        let mut t = txn.open_table(NAMESPACES)?;
        if t.get(ns)?.is_some() {
            return Ok(false);
        }
        let rec = Namespace {
            name: ns.to_owned(),
            labels: Default::default(),
        };
        t.insert(ns, rec.encode_to_vec().as_slice())?;
        Ok(true)
    }

    /// Creates `ns` unless it exists; true when it was created.
    pub fn ensure_ns(&self, ns: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let created = Self::ensure_namespace(&txn, ns)?;
        txn.commit()?;
        Ok(created)
    }

    pub fn create_namespace(&self, ns: Namespace) -> Result<Namespace> {
        crate::ident::check("namespace", &ns.name).map_err(StoreError::Ident)?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(NAMESPACES)?;
            if t.get(ns.name.as_str())?.is_some() {
                return Err(StoreError::NamespaceExists(ns.name));
            }
            t.insert(ns.name.as_str(), ns.encode_to_vec().as_slice())?;
        }
        txn.commit()?;
        Ok(ns)
    }

    pub fn get_namespace(&self, ns: &str) -> Result<Namespace> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NAMESPACES)?;
        match t.get(ns)? {
            Some(v) => decode(ns, v.value()),
            None => Err(StoreError::NamespaceNotFound(ns.to_owned())),
        }
    }

    pub fn list_namespaces(&self) -> Result<Vec<Namespace>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NAMESPACES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Replaces the labels of `ns` (all of them, or only those named `labels.KEY` in `paths`).
    pub fn update_namespace(&self, update: Namespace, paths: &[String]) -> Result<Namespace> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(NAMESPACES)?;
            let mut rec: Namespace = match t.get(update.name.as_str())? {
                Some(v) => decode(&update.name, v.value())?,
                None => return Err(StoreError::NamespaceNotFound(update.name)),
            };
            if paths.is_empty() {
                rec.labels = update.labels;
            } else {
                for p in paths {
                    if p == "labels" {
                        rec.labels = update.labels.clone();
                    } else if let Some(k) = p.strip_prefix("labels.") {
                        match update.labels.get(k) {
                            Some(v) => rec.labels.insert(k.to_owned(), v.clone()),
                            None => rec.labels.remove(k),
                        };
                    } else {
                        return Err(StoreError::InvalidArgument(format!(
                            "cannot update {p:?} of namespace {:?}",
                            rec.name
                        )));
                    }
                }
            }
            t.insert(rec.name.as_str(), rec.encode_to_vec().as_slice())?;
            rec
        };
        txn.commit()?;
        Ok(rec)
    }

    pub fn delete_namespace(&self, ns: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let (lo, hi) = ns_range(ns);
            if txn
                .open_table(CONTAINERS)?
                .range(lo.as_str()..hi.as_str())?
                .next()
                .is_some()
            {
                return Err(StoreError::NamespaceNotEmpty {
                    namespace: ns.to_owned(),
                    what: "containers",
                });
            }
            if txn
                .open_table(LEASES)?
                .range(lo.as_str()..hi.as_str())?
                .next()
                .is_some()
            {
                return Err(StoreError::NamespaceNotEmpty {
                    namespace: ns.to_owned(),
                    what: "leases",
                });
            }
            if txn.open_table(NAMESPACES)?.remove(ns)?.is_none() {
                return Err(StoreError::NamespaceNotFound(ns.to_owned()));
            }
        }
        txn.commit()?;
        Ok(())
    }

    // ---- containers ----

    /// Stores a new container; the second value is true when its namespace was created too.
    pub fn create_container(&self, ns: &str, mut c: Container) -> Result<(Container, bool)> {
        crate::ident::check("container id", &c.id).map_err(StoreError::Ident)?;
        if c.spec.is_none() {
            return Err(StoreError::InvalidArgument(format!(
                "container {:?}: spec is required",
                c.id
            )));
        }
        let txn = self.db.begin_write()?;
        let ns_created = Self::ensure_namespace(&txn, ns)?;
        {
            let mut t = txn.open_table(CONTAINERS)?;
            let k = key(ns, &c.id);
            if t.get(k.as_str())?.is_some() {
                return Err(StoreError::AlreadyExists {
                    what: "container",
                    namespace: ns.to_owned(),
                    id: c.id,
                });
            }
            let ts = now();
            c.created_at = Some(ts);
            c.updated_at = Some(ts);
            t.insert(k.as_str(), c.encode_to_vec().as_slice())?;
        }
        if removed_with_task(&c) && !ns_created {
            self.commit_lazily(txn)?;
        } else {
            txn.commit()?;
        }
        Ok((c, ns_created))
    }

    pub fn get_container(&self, ns: &str, id: &str) -> Result<Container> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CONTAINERS)?;
        let k = key(ns, id);
        match t.get(k.as_str())? {
            Some(v) => decode(&k, v.value()),
            None => Err(StoreError::NotFound {
                what: "container",
                namespace: ns.to_owned(),
                id: id.to_owned(),
            }),
        }
    }

    pub fn list_containers(&self, ns: &str) -> Result<Vec<Container>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CONTAINERS)?;
        let (lo, hi) = ns_range(ns);
        let mut out = Vec::new();
        for e in t.range(lo.as_str()..hi.as_str())? {
            let (k, v) = e?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Applies `update` to the stored container: every updatable field when `paths` is empty,
    /// else the named ones (`labels`, `labels.KEY`, `spec`, `image`, `snapshotkey`,
    /// `extensions`, `extensions.KEY`), as containerd does.
    pub fn update_container(
        &self,
        ns: &str,
        update: Container,
        paths: &[String],
    ) -> Result<Container> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(CONTAINERS)?;
            let k = key(ns, &update.id);
            let mut rec: Container = match t.get(k.as_str())? {
                Some(v) => decode(&k, v.value())?,
                None => {
                    return Err(StoreError::NotFound {
                        what: "container",
                        namespace: ns.to_owned(),
                        id: update.id,
                    });
                }
            };
            let all = [
                "labels".to_owned(),
                "spec".to_owned(),
                "image".to_owned(),
                "snapshotkey".to_owned(),
                "extensions".to_owned(),
            ];
            let paths = if paths.is_empty() { &all[..] } else { paths };
            for p in paths {
                match p.as_str() {
                    "labels" => rec.labels = update.labels.clone(),
                    "spec" => {
                        if update.spec.is_none() {
                            return Err(StoreError::InvalidArgument(format!(
                                "container {:?}: spec is required",
                                rec.id
                            )));
                        }
                        rec.spec = update.spec.clone();
                    }
                    "image" => rec.image = update.image.clone(),
                    "snapshotkey" => rec.snapshot_key = update.snapshot_key.clone(),
                    "extensions" => rec.extensions = update.extensions.clone(),
                    other => {
                        if let Some(l) = other.strip_prefix("labels.") {
                            match update.labels.get(l) {
                                Some(v) => rec.labels.insert(l.to_owned(), v.clone()),
                                None => rec.labels.remove(l),
                            };
                        } else if let Some(x) = other.strip_prefix("extensions.") {
                            match update.extensions.get(x) {
                                Some(v) => rec.extensions.insert(x.to_owned(), v.clone()),
                                None => rec.extensions.remove(x),
                            };
                        } else {
                            return Err(StoreError::InvalidArgument(format!(
                                "cannot update {other:?} of container {:?}",
                                rec.id
                            )));
                        }
                    }
                }
            }
            rec.updated_at = Some(now());
            t.insert(k.as_str(), rec.encode_to_vec().as_slice())?;
            rec
        };
        txn.commit()?;
        Ok(rec)
    }

    pub fn delete_container(&self, ns: &str, id: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        let lazy = {
            let k = key(ns, id);
            let mut t = txn.open_table(CONTAINERS)?;
            let Some(old) = t.remove(k.as_str())? else {
                return Err(StoreError::NotFound {
                    what: "container",
                    namespace: ns.to_owned(),
                    id: id.to_owned(),
                });
            };
            removed_with_task(&decode(&k, old.value())?)
        };
        if lazy {
            self.commit_lazily(txn)
        } else {
            txn.commit()?;
            Ok(())
        }
    }

    // ---- leases ----

    pub fn create_lease(&self, ns: &str, mut lease: Lease) -> Result<Lease> {
        if lease.id.is_empty() {
            lease.id = uuid::Uuid::new_v4().simple().to_string();
        }
        // Lease ids are not identifiers in containerd (ctr makes them from base64: "123-_x"),
        // but they are keys here, so they may not hold '/' or control characters.
        if lease.id.len() > 256 || lease.id.chars().any(|c| c == '/' || c.is_control()) {
            return Err(StoreError::InvalidArgument(format!(
                "invalid lease id {:?}: at most 256 characters, no '/' or control characters",
                lease.id
            )));
        }
        let txn = self.db.begin_write()?;
        Self::ensure_namespace(&txn, ns)?;
        {
            let mut t = txn.open_table(LEASES)?;
            let k = key(ns, &lease.id);
            if t.get(k.as_str())?.is_some() {
                return Err(StoreError::AlreadyExists {
                    what: "lease",
                    namespace: ns.to_owned(),
                    id: lease.id,
                });
            }
            lease.created_at = Some(now());
            t.insert(k.as_str(), lease.encode_to_vec().as_slice())?;
        }
        txn.commit()?;
        Ok(lease)
    }

    pub fn list_leases(&self, ns: &str) -> Result<Vec<Lease>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(LEASES)?;
        let (lo, hi) = ns_range(ns);
        let mut out = Vec::new();
        for e in t.range(lo.as_str()..hi.as_str())? {
            let (k, v) = e?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn delete_lease(&self, ns: &str, id: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let k = key(ns, id);
            if txn.open_table(LEASES)?.remove(k.as_str())?.is_none() {
                return Err(StoreError::NotFound {
                    what: "lease",
                    namespace: ns.to_owned(),
                    id: id.to_owned(),
                });
            }
            let mut r = txn.open_table(LEASE_RESOURCES)?;
            let lo = format!("{k}\0");
            let hi = format!("{k}\u{1}");
            r.retain_in(lo.as_str()..hi.as_str(), |_, _| false)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn require_lease(txn: &redb::WriteTransaction, ns: &str, id: &str) -> Result<()> {
        let k = key(ns, id);
        if txn.open_table(LEASES)?.get(k.as_str())?.is_none() {
            return Err(StoreError::NotFound {
                what: "lease",
                namespace: ns.to_owned(),
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    pub fn add_lease_resource(&self, ns: &str, lease: &str, r: &Resource) -> Result<()> {
        if r.id.is_empty() || r.r#type.is_empty() {
            return Err(StoreError::InvalidArgument(
                "lease resource needs an id and a type".to_owned(),
            ));
        }
        let txn = self.db.begin_write()?;
        Self::require_lease(&txn, ns, lease)?;
        txn.open_table(LEASE_RESOURCES)?
            .insert(resource_key(ns, lease, r).as_str(), ())?;
        txn.commit()?;
        Ok(())
    }

    pub fn delete_lease_resource(&self, ns: &str, lease: &str, r: &Resource) -> Result<()> {
        let txn = self.db.begin_write()?;
        Self::require_lease(&txn, ns, lease)?;
        txn.open_table(LEASE_RESOURCES)?
            .remove(resource_key(ns, lease, r).as_str())?;
        txn.commit()?;
        Ok(())
    }

    pub fn list_lease_resources(&self, ns: &str, lease: &str) -> Result<Vec<Resource>> {
        let txn = self.db.begin_read()?;
        if txn
            .open_table(LEASES)?
            .get(key(ns, lease).as_str())?
            .is_none()
        {
            return Err(StoreError::NotFound {
                what: "lease",
                namespace: ns.to_owned(),
                id: lease.to_owned(),
            });
        }
        let t = txn.open_table(LEASE_RESOURCES)?;
        let lo = format!("{}\0", key(ns, lease));
        let hi = format!("{}\u{1}", key(ns, lease));
        let mut out = Vec::new();
        for e in t.range(lo.as_str()..hi.as_str())? {
            let (k, _) = e?;
            let rest = &k.value()[lo.len()..];
            if let Some((ty, id)) = rest.split_once('\0') {
                out.push(Resource {
                    id: id.to_owned(),
                    r#type: ty.to_owned(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Any;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("meta.redb")).unwrap();
        (dir, s)
    }

    fn ctr(id: &str) -> Container {
        Container {
            id: id.into(),
            spec: Some(Any {
                type_url: "x".into(),
                value: b"{}".to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn containers_round_trip_per_namespace() {
        let (_d, s) = store();
        let (c, created) = s.create_container("default", ctr("a")).unwrap();
        assert!(created);
        assert!(c.created_at.is_some());
        s.create_container("default", ctr("b")).unwrap();
        s.create_container("other", ctr("a")).unwrap();
        let e = s.create_container("default", ctr("a")).unwrap_err();
        assert_eq!(e.kind(), Kind::AlreadyExists);
        assert_eq!(s.list_containers("default").unwrap().len(), 2);
        // "default0" must not leak into "default"'s range.
        s.create_container("default0", ctr("z")).unwrap();
        assert_eq!(s.list_containers("default").unwrap().len(), 2);
        assert_eq!(s.get_container("other", "a").unwrap().id, "a");
        s.delete_container("default", "a").unwrap();
        assert_eq!(
            s.get_container("default", "a").unwrap_err().kind(),
            Kind::NotFound
        );
        let e = s.delete_namespace("default").unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
    }

    #[test]
    fn container_update_follows_field_paths() {
        let (_d, s) = store();
        let mut c = ctr("a");
        c.labels.insert("x".into(), "1".into());
        c.labels.insert("y".into(), "2".into());
        s.create_container("ns", c).unwrap();
        let mut u = ctr("a");
        u.labels.insert("x".into(), "9".into());
        u.image = "img".into();
        let r = s.update_container("ns", u, &["labels.x".into()]).unwrap();
        assert_eq!(r.labels["x"], "9");
        assert_eq!(r.labels["y"], "2");
        assert_eq!(r.image, "");
        let e = s
            .update_container("ns", ctr("a"), &["runtime".into()])
            .unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument);
    }

    #[test]
    fn invalid_ids_are_refused() {
        let (_d, s) = store();
        let e = s.create_container("default", ctr("../etc")).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument);
        let e = s.create_container("bad ns", ctr("a")).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument);
        let mut c = ctr("a");
        c.spec = None;
        assert_eq!(
            s.create_container("default", c).unwrap_err().kind(),
            Kind::InvalidArgument
        );
    }

    #[test]
    fn leases_and_resources() {
        let (_d, s) = store();
        let l = s.create_lease("default", Lease::default()).unwrap();
        assert!(!l.id.is_empty());
        // ctr's own lease ids are base64-ish.
        s.create_lease(
            "default",
            Lease {
                id: "909752614-_Dj3".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            s.create_lease(
                "default",
                Lease {
                    id: "a/b".into(),
                    ..Default::default()
                }
            )
            .is_err()
        );
        let r = Resource {
            id: "sha256:abc/def".into(),
            r#type: "content".into(),
        };
        s.add_lease_resource("default", &l.id, &r).unwrap();
        assert_eq!(
            s.list_lease_resources("default", &l.id).unwrap(),
            vec![r.clone()]
        );
        s.delete_lease_resource("default", &l.id, &r).unwrap();
        assert!(s.list_lease_resources("default", &l.id).unwrap().is_empty());
        s.add_lease_resource("default", &l.id, &r).unwrap();
        s.delete_lease("default", &l.id).unwrap();
        assert_eq!(
            s.list_lease_resources("default", &l.id).unwrap_err().kind(),
            Kind::NotFound
        );
        assert_eq!(s.list_leases("default").unwrap().len(), 1);
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.redb");
        let uuid = {
            let s = Store::open(&p).unwrap();
            s.create_container("default", ctr("keep")).unwrap();
            s.server_uuid().unwrap()
        };
        let s = Store::open(&p).unwrap();
        assert_eq!(s.get_container("default", "keep").unwrap().id, "keep");
        assert_eq!(s.server_uuid().unwrap(), uuid);
        assert_eq!(s.list_namespaces().unwrap().len(), 1);
    }

    fn removed_with_task_ctr(id: &str) -> Container {
        let mut c = ctr(id);
        c.labels.insert(REMOVE_LABEL.into(), "true".into());
        c
    }

    #[test]
    fn a_container_removed_with_its_task_commits_without_fsync_until_synced() {
        let (_d, s) = store();
        // Its first container makes the namespace, which is always durable.
        s.create_container("default", removed_with_task_ctr("first"))
            .unwrap();
        assert!(!s.has_lazy_commits());
        s.create_container("default", ctr("plain")).unwrap();
        assert!(!s.has_lazy_commits());
        let mut other = ctr("other-label");
        other.labels.insert(REMOVE_LABEL.into(), "false".into());
        s.create_container("default", other).unwrap();
        assert!(!s.has_lazy_commits());

        s.create_container("default", removed_with_task_ctr("a"))
            .unwrap();
        assert!(s.has_lazy_commits());
        s.sync().unwrap();
        assert!(!s.has_lazy_commits());
        s.sync().unwrap();
        s.delete_container("default", "plain").unwrap();
        assert!(!s.has_lazy_commits());
        s.delete_container("default", "a").unwrap();
        assert!(s.has_lazy_commits());
        assert_eq!(
            s.get_container("default", "a").unwrap_err().kind(),
            Kind::NotFound
        );
        s.sync().unwrap();
        assert!(!s.has_lazy_commits());
    }

    /// Set for the child process of [`a_crash_keeps_what_was_synced_and_loses_what_was_not`].
    const CRASH_CHILD: &str = "SWITCHYARD_TEST_METADATA_CRASH";

    #[test]
    fn a_crash_keeps_what_was_synced_and_loses_what_was_not() {
        if let Some(path) = std::env::var_os(CRASH_CHILD) {
            let s = Store::open(Path::new(&path)).unwrap();
            s.ensure_ns("default").unwrap();
            s.create_container("default", removed_with_task_ctr("synced"))
                .unwrap();
            s.sync().unwrap();
            s.create_container("default", removed_with_task_ctr("lost"))
                .unwrap();
            // A crash: the process ends without closing the database (which would make
            // the last commit durable).
            std::process::exit(0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "metadata::tests::a_crash_keeps_what_was_synced_and_loses_what_was_not",
                "--nocapture",
            ])
            .env(CRASH_CHILD, &path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get_container("default", "synced").unwrap().id, "synced");
        assert_eq!(
            s.get_container("default", "lost").unwrap_err().kind(),
            Kind::NotFound
        );
    }

    #[test]
    fn runs_removed_with_their_tasks_do_not_grow_the_file() {
        let (d, s) = store();
        s.ensure_ns("default").unwrap();
        // `n` runs' records made and removed, then synced; the file's size after them.
        let runs = |n: usize| {
            for i in 0..n {
                let id = format!("c{i}");
                s.create_container("default", removed_with_task_ctr(&id))
                    .unwrap();
                s.delete_container("default", &id).unwrap();
            }
            s.sync().unwrap();
            std::fs::metadata(d.path().join("meta.redb")).unwrap().len()
        };
        let after_100 = runs(100);
        let after_3100 = runs(3000);
        eprintln!("file: {after_100} bytes after 100 runs, {after_3100} after 3100");
        assert!(after_3100 <= after_100 * 2, "{after_100} -> {after_3100}");
    }
}
