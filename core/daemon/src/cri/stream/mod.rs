//! The CRI streaming server: where the URLs of Exec, Attach and PortForward point, as
//! containerd's (Kubernetes' `kubelet/cri/streaming`) does.
//!
//! A CRI call checks its request and answers `http://<stream_address>:<port>/<kind>/<token>`;
//! the token is random, one-time, and expires after [`TOKEN_TTL`]. The client (kubelet, the API
//! server, kubectl, `yard cri`) then connects there over SPDY/3.1 or WebSocket and speaks
//! Kubernetes' remotecommand or portforward protocol ([`remotecommand`], [`portforward`]).
//!
//! The server listens on TCP, where any local user can connect: nothing happens on a
//! connection before its token is checked, connections are counted and their headers bounded
//! and timed.

mod portforward;
pub(crate) mod remotecommand;
mod spdy;
mod tls;
mod tokens;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use switchyard_api::cri::v1 as cri;
use tokio::sync::Semaphore;
use tonic::Status;

use super::Cri;
pub use tokens::TOKEN_TTL;
use tokens::{Pending, Tokens};

/// Connections served at once, upgraded sessions included; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;

/// A connection's place among the [`MAX_CONNECTIONS`]: in each request's extensions, and held
/// by an upgraded session until it ends, so a session counts after hyper has let go of its
/// connection.
#[derive(Clone)]
pub(crate) struct Slot {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl Slot {
    /// The slot of `req`'s connection, for the task serving its upgrade.
    pub(crate) fn of(req: &hyper::Request<Incoming>) -> Option<Slot> {
        req.extensions().get::<Slot>().cloned()
    }
}
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After a session's last word (SPDY's GOAWAY, a WebSocket close), how long the client has to
/// close its end while the server still reads what it sends: closing with its bytes unread
/// would reset the connection, and a reset can discard what the client has not read yet (a
/// status, an error).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The streams of a session must all be opened within this (Kubernetes' 30 s).
pub(crate) const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The server's address and its one-time requests.
pub struct StreamServer {
    base: String,
    tokens: Tokens,
}

impl StreamServer {
    /// Bind the configured address (port 0: a free one) and serve on the current runtime.
    pub async fn start(cri: &Arc<Cri>) -> std::io::Result<Arc<StreamServer>> {
        let config = &cri.config;
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(
            config.stream_address,
            config.stream_port,
        ))
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cri.stream_address {}:{}: {e}",
                    config.stream_address, config.stream_port
                ),
            )
        })?;
        let addr = listener.local_addr()?;
        let tls = match &config.stream_tls {
            Some(files) => Some(tls::acceptor(files)?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = match addr {
            SocketAddr::V4(a) => format!("{scheme}://{a}"),
            SocketAddr::V6(a) => format!("{scheme}://[{}]:{}", a.ip(), a.port()),
        };
        tracing::info!(address = %addr, tls = tls.is_some(), "CRI streaming server");
        let server = Arc::new(StreamServer {
            base,
            tokens: Tokens::default(),
        });
        let cri = Arc::downgrade(cri);
        let srv = server.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "streaming server accept");
                        continue;
                    }
                };
                let (Some(cri), srv) = (cri.upgrade(), srv.clone()) else {
                    return;
                };
                let slot = Slot {
                    _permit: Arc::new(permit),
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some(tls) = tls else {
                        serve_connection(tcp, peer, cri, srv, slot).await;
                        return;
                    };
                    // The handshake is part of the time the request's header may take.
                    match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, cri, srv, slot).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "streaming TLS handshake"),
                        Err(_) => tracing::debug!(%peer, "streaming TLS handshake: timed out"),
                    }
                });
            }
        });
        Ok(server)
    }

    fn url(&self, kind: &str, pending: Pending) -> Result<String, Status> {
        let token = self.tokens.insert(pending)?;
        Ok(format!("{}/{kind}/{token}", self.base))
    }

    /// CRI Exec: the request checked (as containerd checks it) and kept behind a token.
    pub async fn exec(&self, cri: &Cri, r: cri::ExecRequest) -> Result<String, Status> {
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd: empty"));
        }
        check_streams(r.tty, r.stdin, r.stdout, r.stderr)?;
        cri.running_container(&r.container_id).await?;
        self.url("exec", Pending::Exec(r))
    }

    /// CRI Attach: to the container's main process.
    pub async fn attach(&self, cri: &Cri, r: cri::AttachRequest) -> Result<String, Status> {
        check_streams(r.tty, r.stdin, r.stdout, r.stderr)?;
        cri.running_container(&r.container_id).await?;
        self.url("attach", Pending::Attach(r))
    }

    /// CRI PortForward: into the pod's network namespace.
    pub fn port_forward(&self, cri: &Cri, r: cri::PortForwardRequest) -> Result<String, Status> {
        cri.port_forward_target(&r.pod_sandbox_id)?;
        for p in &r.port {
            if !(1..=65535).contains(p) {
                return Err(Status::invalid_argument(format!(
                    "port: {p} is not a TCP port"
                )));
            }
        }
        self.url("portforward", Pending::PortForward(r))
    }

    async fn route(&self, cri: Arc<Cri>, req: hyper::Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if !matches!(kind, "exec" | "attach" | "portforward") {
            return plain(StatusCode::NOT_FOUND, format!("{path}: not found"));
        }
        let pending = match self.tokens.take(token) {
            Ok(p) => p,
            Err(why) => {
                tracing::info!(%kind, "streaming request refused: {why}");
                return plain(StatusCode::NOT_FOUND, why.to_string());
            }
        };
        if pending.kind() != kind {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("the token is for {}, not {kind}", pending.kind()),
            );
        }
        match pending {
            Pending::Exec(r) => remotecommand::serve(cri, remotecommand::Target::Exec(r), req),
            Pending::Attach(r) => remotecommand::serve(cri, remotecommand::Target::Attach(r), req),
            Pending::PortForward(r) => portforward::serve(cri, r, req),
        }
    }
}

/// Serves one connection's requests; an upgraded session keeps `slot` until it ends.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    cri: Arc<Cri>,
    srv: Arc<StreamServer>,
    slot: Slot,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req| {
        let (cri, srv) = (cri.clone(), srv.clone());
        req.extensions_mut().insert(slot.clone());
        async move { Ok::<_, std::convert::Infallible>(srv.route(cri, req).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "streaming connection");
    }
}

/// containerd's rules for the streams a session may ask for.
fn check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), Status> {
    if tty && stderr {
        return Err(Status::invalid_argument(
            "tty and stderr cannot both be true",
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(Status::invalid_argument(
            "one of stdin, stdout, or stderr must be set",
        ));
    }
    Ok(())
}

/// A plain-text HTTP answer (an error before any upgrade).
pub(crate) fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text + "\n")));
    *r.status_mut() = status;
    r
}

/// The protocols a client offers in a header (comma-separated, possibly repeated).
pub(crate) fn offered<'a>(req: &'a hyper::Request<Incoming>, header: &str) -> Vec<&'a str> {
    req.headers()
        .get_all(header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

/// Which transport a request asks to upgrade to.
pub(crate) enum Upgrade {
    Spdy,
    WebSocket,
}

pub(crate) fn upgrade_of(req: &hyper::Request<Incoming>) -> Option<Upgrade> {
    let wants = |v: &str| {
        offered(req, "upgrade")
            .iter()
            .any(|u| u.eq_ignore_ascii_case(v))
    };
    if wants("SPDY/3.1") {
        Some(Upgrade::Spdy)
    } else if wants("websocket") {
        Some(Upgrade::WebSocket)
    } else {
        None
    }
}
