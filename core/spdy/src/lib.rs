//! SPDY/3.1 framing, as Kubernetes' streaming protocols (remotecommand and portforward over
//! SPDY, which kubelet, the API server and kubectl speak) use it.
//!
//! No kept Rust crate implements SPDY, so this one does, from the SPDY/3.1 specification:
//!
//! - [`frame`]: every frame type encoded, and parsed from untrusted bytes with a bound on the
//!   frame size, an error naming what is wrong and never a panic; control frames of unknown
//!   types are skipped, as the specification requires.
//! - [`headers`]: name/value header blocks, zlib-compressed with the SPDY/3 dictionary, one
//!   compression context per direction of a session, with bounds on the decompressed size and
//!   the number of pairs.
//!
//! - [`session`]: a session over an upgraded connection (tokio), for the server and the client
//!   ends alike: streams opened, accepted and reset, data in order with back-pressure, pings
//!   answered, and flow control that also works with Kubernetes' own implementation, which
//!   has none.

pub mod frame;
pub mod headers;
pub mod session;

pub use frame::{ControlKind, Frame, FrameError, Limits, Parsed, Setting, parse};
pub use headers::{Compressor, Decompressor, HeaderBlock, HeaderError};
pub use session::{Config, Incoming, RecvHalf, Role, SendHalf, Session, SessionError, Stream};

/// The protocol version every control frame carries.
pub const VERSION: u16 = 3;
