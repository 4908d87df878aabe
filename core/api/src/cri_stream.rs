//! The names and numbers of Kubernetes' streaming protocols (what CRI's Exec, Attach and
//! PortForward URLs speak), shared by switchyardd's streaming server and `yard cri`'s client.

/// remotecommand over SPDY or WebSocket; v5 (WebSocket) adds closing a channel.
pub const REMOTECOMMAND_V5: &str = "v5.channel.k8s.io";
pub const REMOTECOMMAND_V4: &str = "v4.channel.k8s.io";
/// portforward over SPDY.
pub const PORTFORWARD: &str = "portforward.k8s.io";

/// The channel byte that starts every WebSocket message of remotecommand.
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    /// The final status (a Kubernetes `Status` as JSON).
    pub const ERROR: u8 = 3;
    /// Terminal sizes (`{"Width":W,"Height":H}`).
    pub const RESIZE: u8 = 4;
    /// v5: `[CLOSE, n]` closes channel `n`.
    pub const CLOSE: u8 = 255;
}
