//! The shim side of the daemon, split like containerd's runtime v2:
//!
//! * [`resolve`]: task routing, runtime name or type → shim binary (and its options),
//! * [`shim`]: shim process lifecycle (start, connect, reload, watch, delete),
//! * [`bridge`]: the task API over ttrpc, hiding task v2 and v3 behind one client,
//! * [`bundle`]: the on-disk bundle each task runs from.

pub mod address;
pub mod bridge;
pub mod bundle;
pub mod log;
pub mod options;
pub mod resolve;
pub mod shim;
pub mod watch;
