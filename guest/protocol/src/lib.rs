//! The Switchyard guest agent protocol (`agent.proto`): messages and the async ttrpc `Agent`
//! service, shared by the vm shim (client) and the agent (server), plus the few constants both
//! sides must agree on.

// Generated code: not ours to lint.
#[allow(
    warnings,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent/agent.rs"));
}

// Generated code: not ours to lint.
#[allow(
    warnings,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent/agent_ttrpc.rs"));
}

pub use agent::*;
pub use agent_ttrpc::{Agent, AgentClient, create_agent};
pub use protobuf;
pub use ttrpc;

/// Written once by the agent, before any ttrpc frame, when it has opened its port. The host reads
/// exactly these bytes (its boot timer stops here) and then hands the stream to ttrpc.
pub const READY_BANNER: &[u8] = b"switchyard-agent ready v1\n";

/// The virtio-serial port name the agent serves on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "yard.agent";

/// The 9p mount tag of the sandbox's read-only share (images of later containers).
pub const SHARE_TAG: &str = "yardshare";

/// Where the agent mounts that share in the guest.
pub const SHARE_MOUNT: &str = "/run/yard/share";

/// The kernel command-line key that turns on the agent's debug logs (`yard.debug=1`).
pub const CMDLINE_DEBUG: &str = "yard.debug";
