//! Wiring: directories, the single-daemon lock, the metadata store, the event endpoints, task
//! restore, and the gRPC server, in that order. Stopping the daemon leaves shims (and so
//! tasks) running; the next daemon reconnects to them.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Classify, Kind};
use crate::events::Exchange;
use crate::metadata::{Store, StoreError};
use crate::runtime::resolve::Runtimes;
use crate::runtime::shim::{ShimManager, ShimSettings};
use crate::server::Shared;
use crate::tasks::TaskManager;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("create directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("make {} private", path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another switchyardd is using root {}", root.display())]
    Locked { root: PathBuf },
    #[error("lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open metadata {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("serve events on {}", path.display())]
    Ttrpc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve the API on {}", path.display())]
    Grpc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open the image store {}", path.display())]
    Images {
        path: PathBuf,
        #[source]
        source: switchyard_images::ImageError,
    },
    #[error("find switchyardd's own path (for -publish-binary)")]
    SelfExe(#[source] std::io::Error),
    #[error("open the CRI pod store")]
    Cri(#[source] crate::cri::sandbox::SandboxError),
    #[error("the CRI streaming server")]
    Streaming(#[source] std::io::Error),
}

impl Classify for DaemonError {
    fn kind(&self) -> Kind {
        Kind::Internal
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| DaemonError::Dir {
            path: path.to_owned(),
            source,
        })
}

/// Holds `<root>/switchyardd.lock` for the daemon's lifetime.
fn lock_root(root: &Path) -> Result<nix::fcntl::Flock<File>, DaemonError> {
    let path = root.join("switchyardd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| DaemonError::Lock {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                DaemonError::Locked {
                    root: root.to_owned(),
                }
            } else {
                DaemonError::Lock {
                    path,
                    source: errno.into(),
                }
            }
        },
    )
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    // Nothing under root or state is for other users (see docs/operations.md, "Files and
    // permissions"); `main` set the umask to 077 before anything was created.
    mkdir(&config.root, 0o700)?;
    mkdir(&config.state, 0o700)?;
    let _lock = lock_root(&config.root)?;
    let db = config.root.join("meta.redb");
    let store = Store::open(&db).map_err(|source| DaemonError::Store {
        path: db.clone(),
        source,
    })?;
    // A store made by an older daemon (under a looser umask) is closed to other users too.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Chmod {
            path: db.clone(),
            source,
        }
    })?;
    let uuid = store.server_uuid().map_err(|source| DaemonError::Store {
        path: db.clone(),
        source,
    })?;
    let exchange = Exchange::new();
    let _ttrpc = crate::events::serve_ttrpc(&config.ttrpc_address, exchange.clone())
        .await
        .map_err(|source| DaemonError::Ttrpc {
            path: config.ttrpc_address.clone(),
            source,
        })?;
    let publish_binary = std::env::current_exe().map_err(DaemonError::SelfExe)?;
    let shims = ShimManager::new(ShimSettings {
        grpc_address: config.grpc_address.clone(),
        ttrpc_address: config.ttrpc_address.clone(),
        publish_binary,
        start_timeout: config.shim.start_timeout,
        delete_timeout: config.shim.delete_timeout,
        shutdown_timeout: config.shim.shutdown_timeout,
        debug: config.shim.debug,
    });
    let tasks = TaskManager::new(
        shims,
        Runtimes::new(&config),
        store.clone(),
        exchange.clone(),
        config.state.clone(),
        config.root.clone(),
    );
    tasks.restore().await;
    tracing::info!(address = %config.grpc_address.display(), ttrpc = %config.ttrpc_address.display(), "serving");
    let images_root = config.root.join("images");
    let images =
        switchyard_images::ImageStore::open(&images_root, store.database(), config.snapshotter)
            .map_err(|source| DaemonError::Images {
                path: images_root.clone(),
                source,
            })?;
    tracing::info!(snapshotter = ?images.snapshots().driver(), registry_config_path = ?config.registry_config_path, "image store open");
    let shared = std::sync::Arc::new(Shared {
        store,
        tasks,
        exchange,
        uuid,
        images: std::sync::Arc::new(images),
        registry_hosts: config
            .registry_config_path
            .clone()
            .map(switchyard_images::RegistryHosts::new),
    });
    crate::server::containers::remove_leftovers(&shared).await;
    let cri = crate::cri::Cri::new(shared.clone(), &config).map_err(DaemonError::Cri)?;
    let streams = crate::cri::stream::StreamServer::start(&cri)
        .await
        .map_err(DaemonError::Streaming)?;
    let _ = cri.streams.set(streams);
    let served = crate::server::serve(&config.grpc_address, shared, cri, shutdown).await;
    let _ = std::fs::remove_file(&config.grpc_address);
    let _ = std::fs::remove_file(&config.ttrpc_address);
    served.map_err(|source| DaemonError::Grpc {
        path: config.grpc_address.clone(),
        source,
    })?;
    tracing::info!("stopped; shims keep running");
    Ok(())
}
