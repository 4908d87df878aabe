//! The HTTP/1.1 upgrade to SPDY/3.1 that starts a streaming session: one request written by
//! hand and a response header read with a bound. A streaming server's answer is a status line
//! and a few headers; hyper's client would add a connection task and body plumbing for no
//! gain, and the upgraded socket is handed to the SPDY session as it is (the server sends
//! nothing after its `101` until the client opens streams, so no bytes are read past the
//! header: it is read a byte at a time).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response header accepted.
const MAX_HEADER: usize = 16 << 10;
/// The largest error body shown.
const MAX_BODY: usize = 4 << 10;
/// How long the connection and the upgrade may take.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to a streaming server: TCP, or TLS over it for an `https://` URL.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Conn = Box<dyn Io>;

/// The CA certificates (PEM) an `https://` streaming server must chain to; without them, the
/// system's roots.
static TRUSTED: OnceLock<PathBuf> = OnceLock::new();

/// Trust the CA certificates in `pem` (`--stream-ca`) instead of the system's roots.
pub fn trust(pem: &Path) {
    let _ = TRUSTED.set(pem.to_owned());
}

/// A streaming URL split into what the connection and the request need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`, for the connection and the `Host` header.
    pub authority: String,
    /// The path with its query.
    pub path: String,
    /// An `https://` URL: TLS, verified against the trusted roots.
    pub tls: bool,
}

impl Target {
    /// `http://host:port/path?query` (the form runtimes return), or `https://`.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => anyhow::bail!("streaming URL {url:?}: not an http:// or https:// URL"),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() || authority.contains(['@', ' ']) {
            anyhow::bail!("streaming URL {url:?}: bad host {authority:?}");
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        if path.contains(|c: char| c.is_ascii_control() || c == ' ') {
            anyhow::bail!("streaming URL {url:?}: bad path");
        }
        Ok(Target {
            authority,
            path,
            tls,
        })
    }

    /// The same target with `query` appended (`port=80`).
    pub fn with_query(&self, query: &str) -> Target {
        let sep = if self.path.contains('?') { '&' } else { '?' };
        Target {
            path: format!("{}{sep}{query}", self.path),
            ..self.clone()
        }
    }

    /// The host, without the port or an IPv6 address's brackets (TLS's server name).
    fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let what = || format!("connect to the streaming server at {}", self.authority);
        let tcp = tokio::time::timeout(UPGRADE_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| anyhow::anyhow!("no connection within {UPGRADE_TIMEOUT:?}"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(what)?;
        tcp.set_nodelay(true)?;
        if !self.tls {
            return Ok(Box::new(tcp));
        }
        let name = rustls::pki_types::ServerName::try_from(self.host().to_owned())
            .with_context(|| format!("{:?} is not a TLS server name", self.host()))?;
        let connector = tokio_rustls::TlsConnector::from(client_config()?);
        let tls = tokio::time::timeout(UPGRADE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| anyhow::anyhow!("no TLS handshake within {UPGRADE_TIMEOUT:?}"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(what)?;
        Ok(Box::new(tls))
    }
}

/// TLS as a client: the `--stream-ca` certificates, else the system's roots.
fn client_config() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match TRUSTED.get() {
        Some(pem) => {
            for cert in CertificateDer::pem_file_iter(pem)
                .with_context(|| format!("--stream-ca {}", pem.display()))?
            {
                let cert = cert.with_context(|| format!("--stream-ca {}", pem.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("--stream-ca {}", pem.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects to `target` and upgrades to SPDY/3.1 offering `protocols` (in order of
/// preference) as `X-Stream-Protocol-Version`; the connection and the protocol the server
/// chose.
pub async fn upgrade_spdy(target: &Target, protocols: &[&str]) -> anyhow::Result<(Conn, String)> {
    let mut tcp = target.connect().await?;
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: yard\r\nContent-Length: 0\r\n\
         Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n",
        target.path, target.authority
    );
    for p in protocols {
        request.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    request.push_str("\r\n");
    let exchange = async {
        tcp.write_all(request.as_bytes()).await?;
        let head = read_head(&mut tcp).await?;
        let response = Response::parse(&head)?;
        if response.status != 101 {
            let body = read_body(&mut tcp, &response).await;
            anyhow::bail!(
                "the streaming server answered {} {}: {}",
                response.status,
                response.reason,
                body.trim()
            );
        }
        if !response
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("SPDY/3.1"))
        {
            anyhow::bail!("the streaming server did not upgrade to SPDY/3.1");
        }
        let chosen = response
            .header("x-stream-protocol-version")
            .map(str::to_owned)
            .unwrap_or_default();
        if !protocols.contains(&chosen.as_str()) {
            anyhow::bail!(
                "the streaming server chose protocol {chosen:?}, not one of {protocols:?}"
            );
        }
        Ok(chosen)
    };
    let chosen = tokio::time::timeout(UPGRADE_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no upgrade within {UPGRADE_TIMEOUT:?}"))??;
    Ok((tcp, chosen))
}

/// The response header, up to the blank line, read a byte at a time (nothing past it).
async fn read_head(tcp: &mut Conn) -> anyhow::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEADER {
            anyhow::bail!("the streaming server's response header is over {MAX_HEADER} bytes");
        }
        let b = tcp
            .read_u8()
            .await
            .context("the streaming server closed the connection before answering")?;
        head.push(b);
    }
    Ok(head)
}

/// An error response's body, at most [`MAX_BODY`] bytes of it.
async fn read_body(tcp: &mut Conn, response: &Response) -> String {
    let len = response
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(MAX_BODY)
        .min(MAX_BODY);
    let mut body = Vec::with_capacity(len);
    let _ = tcp.take(len as u64).read_to_end(&mut body).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// A parsed response header.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    headers: Vec<(String, String)>,
}

impl Response {
    pub fn parse(head: &[u8]) -> anyhow::Result<Response> {
        let text = std::str::from_utf8(head).context("the response header is not UTF-8")?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
            anyhow::bail!("not an HTTP/1.1 status line: {status_line:?}");
        };
        let reason = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .with_context(|| format!("a response header line without a colon: {line:?}"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        Ok(Response {
            status,
            reason,
            headers,
        })
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_urls_split_into_authority_and_path() {
        let t = Target::parse("http://127.0.0.1:38231/exec/AbC_d").unwrap();
        assert_eq!(t.authority, "127.0.0.1:38231");
        assert_eq!(t.path, "/exec/AbC_d");
        assert_eq!(t.with_query("port=80").path, "/exec/AbC_d?port=80");
        let t = Target::parse("http://[::1]:9/pf/x?a=1").unwrap();
        assert_eq!(t.authority, "[::1]:9");
        assert_eq!(t.with_query("port=80").path, "/pf/x?a=1&port=80");
        assert_eq!(Target::parse("http://host").unwrap().authority, "host:80");
        assert_eq!(
            Target::parse("http://[::1]/a").unwrap().authority,
            "[::1]:80"
        );
        let t = Target::parse("https://h:1/x").unwrap();
        assert!(t.tls && !Target::parse("http://h:1/x").unwrap().tls);
        assert_eq!(t.host(), "h");
        assert!(t.with_query("port=1").tls);
        assert_eq!(Target::parse("https://h/x").unwrap().authority, "h:443");
        assert_eq!(Target::parse("https://[::1]:7/x").unwrap().host(), "::1");
        assert!(Target::parse("ftp://h/x").is_err());
        assert!(Target::parse("http:///x").is_err());
        assert!(Target::parse("http://h:1/a b").is_err());
    }

    #[test]
    fn upgrade_responses_parse() {
        let r = Response::parse(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
              X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 101);
        assert_eq!(r.header("upgrade"), Some("SPDY/3.1"));
        assert_eq!(
            r.header("x-stream-protocol-version"),
            Some("v4.channel.k8s.io")
        );
        assert!(Response::parse(b"SSH-2.0\r\n\r\n").is_err());
        assert!(Response::parse(b"HTTP/1.1 404 Not Found\r\nbad\r\n\r\n").is_err());
    }
}
