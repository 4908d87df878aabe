//! The ADD result kept on disk, one file per container id and interface, so that DEL and CHECK
//! after a daemon restart still hand the plugins their `prevResult` (libcni keeps the same under
//! `/var/lib/cni/results`). Files are 0600 in a 0700 directory, written to a temporary name,
//! synced and renamed, so a crash leaves the old entry or the new one, never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{valid_if_name, valid_name};

/// A cache file larger than this is refused unread.
pub const MAX_CACHE_BYTES: u64 = 1024 * 1024;

const KIND: &str = "switchyard-cni-result-v1";

/// Error while reading or writing a cache entry.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("no cache entry can be named for container {container_id:?}, interface {if_name:?}")]
    InvalidKey {
        container_id: String,
        if_name: String,
    },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{} holds an invalid result", path.display())]
    BadResult {
        path: PathBuf,
        #[source]
        source: crate::result::ResultError,
    },
    #[error("{} is not a result cache entry", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What is kept of one ADD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheEntry {
    pub kind: String,
    pub container_id: String,
    pub if_name: String,
    pub network_name: String,
    pub cni_version: String,
    pub netns: PathBuf,
    /// The last plugin's result, as it printed it.
    pub result: Value,
}

impl CacheEntry {
    pub fn new(
        container_id: &str,
        if_name: &str,
        network_name: &str,
        cni_version: &str,
        netns: &Path,
        result: Value,
    ) -> CacheEntry {
        CacheEntry {
            kind: KIND.to_owned(),
            container_id: container_id.to_owned(),
            if_name: if_name.to_owned(),
            network_name: network_name.to_owned(),
            cni_version: cni_version.to_owned(),
            netns: netns.to_owned(),
            result,
        }
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct ResultCache {
    dir: PathBuf,
}

impl ResultCache {
    pub fn new(dir: PathBuf) -> ResultCache {
        ResultCache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/<container id>:<ifname>.json`. Neither a valid container id nor an interface
    /// name can hold `:` or `/`, so the name is unambiguous and stays in the directory; others
    /// are refused.
    pub fn path(&self, container_id: &str, if_name: &str) -> Result<PathBuf, CacheError> {
        if !valid_name(container_id) || !valid_if_name(if_name) {
            return Err(CacheError::InvalidKey {
                container_id: container_id.to_owned(),
                if_name: if_name.to_owned(),
            });
        }
        Ok(self.dir.join(format!("{container_id}:{if_name}.json")))
    }

    pub fn write(&self, entry: &CacheEntry) -> Result<(), CacheError> {
        let io_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Io { op, path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err("creating", &self.dir))?;
        let path = self.path(&entry.container_id, &entry.if_name)?;
        // A leading dot: no container id starts with one, so no entry is ever named like this.
        let tmp = self
            .dir
            .join(format!(".{}:{}.tmp", entry.container_id, entry.if_name));
        let bytes = serde_json::to_vec(entry).map_err(|source| CacheError::Format {
            path: path.clone(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        let written = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_err("writing", &tmp))
            .and_then(|()| fs::rename(&tmp, &path).map_err(io_err("renaming to", &path)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &self.dir))
    }

    /// The entry, `None` if there is none.
    pub fn read(
        &self,
        container_id: &str,
        if_name: &str,
    ) -> Result<Option<CacheEntry>, CacheError> {
        let path = self.path(container_id, if_name)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    op: "opening",
                    path,
                    source,
                });
            }
        };
        let mut bytes = Vec::new();
        file.take(MAX_CACHE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| CacheError::Io {
                op: "reading",
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_CACHE_BYTES {
            return Err(CacheError::TooLarge {
                path,
                limit: MAX_CACHE_BYTES,
            });
        }
        let entry: CacheEntry =
            serde_json::from_slice(&bytes).map_err(|source| CacheError::Format {
                path: path.clone(),
                source,
            })?;
        if entry.kind != KIND {
            return Err(CacheError::Format {
                path,
                source: serde::de::Error::custom(format!("kind {:?}", entry.kind)),
            });
        }
        Ok(Some(entry))
    }

    /// Removes the entry; no error if there is none.
    pub fn remove(&self, container_id: &str, if_name: &str) -> Result<(), CacheError> {
        let path = self.path(container_id, if_name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CacheError::Io {
                op: "removing",
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry() -> CacheEntry {
        CacheEntry::new(
            "abc",
            "eth0",
            "net",
            "1.0.0",
            Path::new("/run/netns/x"),
            serde_json::json!({"cniVersion": "1.0.0"}),
        )
    }

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResultCache::new(dir.path().join("results"));
        assert_eq!(cache.read("abc", "eth0").unwrap(), None);
        cache.write(&entry()).unwrap();
        assert_eq!(cache.read("abc", "eth0").unwrap(), Some(entry()));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache.path("abc", "eth0").unwrap()), 0o600);
        assert_eq!(mode(cache.dir()), 0o700);
        // Only the entry is left, no temporary file.
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 1);
        cache.remove("abc", "eth0").unwrap();
        cache.remove("abc", "eth0").unwrap();
        assert_eq!(cache.read("abc", "eth0").unwrap(), None);
    }

    #[test]
    fn keys_that_would_leave_the_directory_are_refused() {
        let cache = ResultCache::new(PathBuf::from("/c"));
        for (id, ifname) in [
            ("../x", "eth0"),
            ("a", "../../x"),
            ("a/b", "eth0"),
            ("a", ""),
        ] {
            assert!(matches!(
                cache.path(id, ifname),
                Err(CacheError::InvalidKey { .. })
            ));
            assert!(matches!(
                cache.read(id, ifname),
                Err(CacheError::InvalidKey { .. })
            ));
            assert!(matches!(
                cache.remove(id, ifname),
                Err(CacheError::InvalidKey { .. })
            ));
        }
    }

    #[test]
    fn bad_entries_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResultCache::new(dir.path().to_owned());
        fs::write(cache.path("a", "eth0").unwrap(), "{").unwrap();
        assert!(matches!(
            cache.read("a", "eth0"),
            Err(CacheError::Format { .. })
        ));
        let mut other = serde_json::to_value(entry()).unwrap();
        other["kind"] = "cniCacheV1".into();
        fs::write(cache.path("a", "eth0").unwrap(), other.to_string()).unwrap();
        assert!(matches!(
            cache.read("a", "eth0"),
            Err(CacheError::Format { .. })
        ));
        fs::write(
            cache.path("a", "eth0").unwrap(),
            vec![b' '; MAX_CACHE_BYTES as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            cache.read("a", "eth0"),
            Err(CacheError::TooLarge { .. })
        ));
    }
}
