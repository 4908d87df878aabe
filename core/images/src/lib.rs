//! Switchyard's image store.
//!
//! - [`content`]: blobs keyed by digest under `<root>/content/blobs/sha256/`, written through
//!   ingest files that are verified (size and digest) before they are renamed into place.
//! - [`unpack`]: applies one layer tarball (plain, gzip or zstd) onto a directory, with
//!   whiteouts and every entry's path checked.
//! - [`snapshot`]: committed snapshots, one per layer chain (overlayfs lower directories, or full
//!   copies where overlayfs is missing), and active snapshots for containers.
//!
//! The daemon owns one [`store::ImageStore`]; its metadata lives in the daemon's database.

pub mod content;
mod fsutil;
mod import;
pub mod oci;
mod pull;
pub mod registry;
pub mod snapshot;
mod snapshot_read;
pub mod store;
pub mod unpack;

pub use oci::{Platform, RunConfig};
pub use pull::{PullOptions, is_loopback};
pub use store::{
    GcReport, ImageError, ImageRecord, ImageStore, ImageSummary, Prepared, Progress, RootfsKind,
    SNAPSHOTTER, StoreOptions, Target, Usage, normalize,
};
