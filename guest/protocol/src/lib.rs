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

/// The largest ttrpc frame the host reads from the agent (ttrpc's own limit is 4 MiB). A
/// well-behaved agent stays far below it: a stdio read returns at most what the host asked for
/// (64 KiB), and the other replies are a few hundred bytes (`ListPids` of a guest full of
/// processes, the largest, is about 200 KiB). A frame announcing more is a protocol violation:
/// the host refuses it before allocating for it and tears the sandbox down.
pub const MAX_REPLY_FRAME: u32 = 1 << 20;

/// The most port-forwarding connections (`DialLoopback`) the agent keeps open at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Bounds of one [`NetworkConfig`]: what the host reads from the pod's network namespace (a CNI
/// plugin filled it) and the agent applies; more is refused on both sides.
pub const MAX_NET_INTERFACES: usize = 4;
pub const MAX_NET_ADDRESSES: usize = 64;
pub const MAX_NET_ROUTES: usize = 256;
pub const MAX_NET_NEIGHBOURS: usize = 256;

/// The virtio-serial port name the agent serves on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "yard.agent";

/// The 9p mount tag of the sandbox's read-only share (images of later containers).
pub const SHARE_TAG: &str = "yardshare";

/// Where the agent mounts that share in the guest.
pub const SHARE_MOUNT: &str = "/run/yard/share";

/// The 9p mount tag of the sandbox's read-write volume share: host files and directories
/// (volumes, `/etc/resolv.conf`, ...) the host binds into it, one entry per bind mount of a
/// container ([`Volume::shared`]).
pub const VOLUME_TAG: &str = "yardvol";

/// Where the agent mounts the volume share in the guest.
pub const VOLUME_MOUNT: &str = "/run/yard/vol";

/// The pod's `/dev/shm` in the guest ([`Volume::pod_shm`]): one tmpfs, mounted on first use.
pub const POD_SHM: &str = "/run/yard/shm";

/// The size of the pod's `/dev/shm`, as containerd's CRI sizes the host's.
pub const POD_SHM_SIZE: &str = "64m";

/// Where the agent keeps copies of host files ([`Volume::copied`], written by `WriteFile`).
pub const COPY_DIR: &str = "/run/yard/files";

/// Where the pod's directories live in the guest ([`Volume::pod_dir`]: emptyDir volumes).
pub const POD_DIRS: &str = "/run/yard/pod";

/// The largest file `WriteFile` carries: one request, well under ttrpc's 4 MiB frame.
pub const MAX_COPIED_FILE: usize = 1 << 20;

/// The most entries a `WriteDir` tree has (its file content is bounded by [`MAX_COPIED_FILE`]
/// in all, as Kubernetes bounds a configmap's or secret's data to 1 MiB).
pub const MAX_COPIED_ENTRIES: usize = 256;

/// The longest [`Volume::shared`] name the agent takes.
pub const MAX_VOLUME_NAME: usize = 64;

/// The kernel command-line key that turns on the agent's debug logs (`yard.debug=1`).
pub const CMDLINE_DEBUG: &str = "yard.debug";

/// The vsock port the agent listens on where the guest has vsock (the built-in VMM's hybrid
/// vsock reaches it with `CONNECT 1024`).
pub const VSOCK_PORT: u32 = 1024;

/// `yard.channel=vsock` on the kernel command line: the VMM has no virtio-serial port, so the
/// agent serves on vsock only (and does not wait for the port).
pub const CMDLINE_CHANNEL: &str = "yard.channel";

/// `yard.boot_timer=1`: when it is ready to serve, the agent writes
/// [`BOOT_TIMER_MAGIC`] to I/O port [`BOOT_TIMER_PORT`], the built-in VMM's boot-timer device
/// (firecracker's boot timer works the same way), so the VMM measures boot time itself.
pub const CMDLINE_BOOT_TIMER: &str = "yard.boot_timer";
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// `yard.zygote=0`: the agent starts runtime mode by executing itself, without its zygote
/// (the way it falls back to when the zygote is gone; tests take it on purpose).
pub const CMDLINE_ZYGOTE: &str = "yard.zygote";

/// The value of `key=value` on a kernel command line, if present (the last one wins, as the
/// kernel's own parameters do).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

#[cfg(test)]
mod cmdline_tests {
    use super::*;

    #[test]
    fn values_are_read_by_key() {
        let c = "console=ttyS0 yard.channel=vsock yard.debug=1 yard.channelx=no yard.debug=0";
        assert_eq!(cmdline_value(c, CMDLINE_CHANNEL), Some("vsock"));
        assert_eq!(cmdline_value(c, CMDLINE_DEBUG), Some("0"));
        assert_eq!(cmdline_value(c, CMDLINE_BOOT_TIMER), None);
    }
}
