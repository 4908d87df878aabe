//! switchyardd: one daemon serving containerd's client API that routes each task, by its
//! runtime type, to a shim binary speaking the containerd shim v2 protocol.
//!
//! See `docs/architecture.md` for the map.

pub mod config;
pub mod cri;
pub mod daemon;
pub mod error;
pub mod events;
pub mod failpoints;
pub mod filters;
pub mod ident;
pub mod metadata;
pub mod runtime;
pub mod server;
pub mod sock;
pub mod sys;
pub mod tasks;
