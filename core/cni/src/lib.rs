//! Pod networking through CNI, the library side of switchyardd's CRI server: the daemon makes a
//! network namespace per pod ([`Netns`]), loads the network from the CNI conf dir
//! ([`load_dir`]) and runs ADD, DEL and CHECK through the plugins ([`Cni`]).
//!
//! - [`config`]: conf dir and file loading (libcni's rules), bounded and validated;
//! - [`invoke`]: ADD/DEL/CHECK of a network list (CNI spec 1.0; configs 0.3.x, 0.4.0, 1.0.0),
//!   `prevResult` chaining, `runtimeConfig` from capabilities, cleanup of a failed ADD;
//! - [`exec`]: one plugin call, with a deadline and capped output;
//! - [`cache`]: the ADD result on disk, for DEL and CHECK after a restart;
//! - [`result`]: the results and error results plugins print;
//! - [`netns`]: persistent network namespaces under a directory the caller chooses.
//!
//! Everything blocks; an async caller runs it on a blocking thread. `docs/networking.md` has
//! the defaults, limits and what is left out.

pub mod cache;
pub mod config;
pub mod exec;
pub mod invoke;
pub mod netns;
pub mod result;

pub use cache::{CacheError, ResultCache};
pub use config::{ConfigError, DEFAULT_CONF_DIR, NetworkList, PluginConf, load_dir};
pub use exec::{Limits, ProcessInvoker};
pub use invoke::{
    Attachment, Cni, CniError, Command, DEFAULT_BIN_DIR, PluginError, PortMapping, Protocol,
    RuntimeConfig,
};
pub use netns::{Netns, NetnsError};
pub use result::{CniResult, Dns, Interface, IpConfig, IpPrefix, Route};
