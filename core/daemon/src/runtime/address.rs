//! What a shim prints from `start`, and dialing it.
//!
//! containerd 1.6 shims print a plain address; 1.7+ may print JSON bootstrap parameters
//! (`{"version":3,"address":"unix:///...","protocol":"ttrpc"}`). containerd's socket rule: an
//! address with `unix://` is a filesystem path, one without is an abstract socket.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::bridge::TaskApi;

/// How to reach a shim (containerd's `BootstrapParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapParams {
    pub version: u32,
    pub address: String,
    pub protocol: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("shim printed no address")]
    Empty,
    #[error("shim speaks task API version {0}; switchyardd speaks 2 and 3")]
    Version(u32),
    #[error("shim speaks {0:?}; switchyardd connects to shims over ttrpc only")]
    Protocol(String),
}

impl BootstrapParams {
    /// Parses `start`'s output as containerd does.
    pub fn parse(output: &[u8]) -> Result<BootstrapParams, AddressError> {
        let text = String::from_utf8_lossy(output);
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        let params = match serde_json::from_str::<BootstrapParams>(text) {
            Ok(p) if p.version >= 2 => p,
            _ => BootstrapParams {
                version: 2,
                address: text.to_owned(),
                protocol: "ttrpc".to_owned(),
            },
        };
        params.api()?;
        if !params.protocol.eq_ignore_ascii_case("ttrpc") {
            return Err(AddressError::Protocol(params.protocol));
        }
        Ok(params)
    }

    pub fn api(&self) -> Result<TaskApi, AddressError> {
        TaskApi::from_version(self.version).ok_or(AddressError::Version(self.version))
    }
}

/// The socket file of an address (`unix://PATH`); none for an abstract socket.
pub fn socket_file(address: &str) -> Option<&Path> {
    address.strip_prefix("unix://").map(Path::new)
}

/// Connects to a shim address.
pub async fn dial(address: &str) -> io::Result<tokio::net::UnixStream> {
    match address.strip_prefix("unix://") {
        Some(path) => tokio::net::UnixStream::connect(path).await,
        None => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(address.as_bytes())?;
            let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_addresses() {
        let p = BootstrapParams::parse(b"unix:///run/containerd/s/abc\n").unwrap();
        assert_eq!(p.address, "unix:///run/containerd/s/abc");
        assert_eq!(p.api().unwrap(), TaskApi::V2);
        let p = BootstrapParams::parse(
            br#"{"version":3,"address":"unix:///run/x.sock","protocol":"ttrpc"}"#,
        )
        .unwrap();
        assert_eq!(p.api().unwrap(), TaskApi::V3);
        assert_eq!(p.address, "unix:///run/x.sock");
        assert!(matches!(
            BootstrapParams::parse(br#"{"version":4,"address":"x","protocol":"ttrpc"}"#),
            Err(AddressError::Version(4))
        ));
        assert!(matches!(
            BootstrapParams::parse(br#"{"version":3,"address":"x","protocol":"grpc"}"#),
            Err(AddressError::Protocol(_))
        ));
        assert!(matches!(
            BootstrapParams::parse(b"  \n"),
            Err(AddressError::Empty)
        ));
    }

    #[tokio::test]
    async fn abstract_and_path_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = tokio::net::UnixListener::bind(&path).unwrap();
        dial(&format!("unix://{}", path.display())).await.unwrap();
        // Without unix:// the same text names an abstract socket, which does not exist.
        assert!(dial(path.to_str().unwrap()).await.is_err());
        let name = format!("switchyard-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let _a = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        dial(&name).await.unwrap();
    }
}
