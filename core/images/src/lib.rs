//! Switchyard's image store.
//!
//! - [`content`]: blobs keyed by digest under `<root>/content/blobs/sha256/`, written through
//!   ingest files that are verified (size and digest) before they are renamed into place.
//! - [`unpack`]: applies one layer tarball (plain, gzip or zstd) onto a directory, with
//!   whiteouts and every entry's path checked.
//! - [`hosts`]: registry mirrors and per-registry settings in containerd's `hosts.toml`
//!   layout.
//! - [`snapshot`]: committed snapshots, one per layer chain (overlayfs lower directories, or full
//!   copies where overlayfs is missing), and active snapshots for containers.
//! - [`build`]: images made in memory (layer tars, an OCI image over them, an OCI layout tar to
//!   import): switchyardd's default sandbox image, and the test kit's fixtures.
//!
//! The daemon owns one [`store::ImageStore`]; its metadata lives in the daemon's database.

// Sizes, offsets and modes here come from registries and image authors: a silent truncation or
// sign change would be a bug, so every cast is proven lossless (`From`/`try_from`) or says why
// it cannot lose anything. Per-crate lint levels cannot go in the root manifest.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod build;
pub mod content;
mod fsutil;
pub mod hosts;
mod import;
pub mod oci;
mod pull;
pub mod registry;
pub mod snapshot;
mod snapshot_read;
pub mod store;
pub mod unpack;

pub use hosts::{Endpoint, HostsError, RegistryHosts};
pub use oci::{Platform, RunConfig};
pub use pull::{PullOptions, is_loopback};
pub use store::{
    GcReport, ImageError, ImageRecord, ImageStore, ImageSummary, Prepared, Progress, RootfsKind,
    SNAPSHOTTER, StoreOptions, Target, Usage, normalize,
};
