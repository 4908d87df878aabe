//! Kubernetes' portforward protocol over SPDY (`portforward.k8s.io`): for each connection the
//! client opens a pair of streams, `error` and `data`, with the same `requestid` and the pod's
//! `port`; the data stream is joined to a TCP connection to that port on the pod's loopback,
//! made inside the pod's network namespace.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use switchyard_api::cri::v1 as cri;
use switchyard_spdy::session::PROTOCOL_ERROR;
use switchyard_spdy::{Incoming as Streams, Session, Stream};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::spdy::{PORTFORWARD, upgraded};
use crate::cri::Cri;
use crate::cri::exec::ForwardTarget;

/// Connections being set up (one stream of the pair came) at once.
const MAX_HALF_OPEN: usize = 16;

pub(crate) fn serve(
    cri: Arc<Cri>,
    r: cri::PortForwardRequest,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    match super::upgrade_of(&req) {
        Some(super::Upgrade::Spdy) => {}
        Some(super::Upgrade::WebSocket) => return super::ws::portforward(cri, r, req),
        None => {
            return super::plain(
                http::StatusCode::BAD_REQUEST,
                "port forwarding upgrades to SPDY/3.1 or websocket".into(),
            );
        }
    }
    upgraded(req, PORTFORWARD, move |session, streams| async move {
        forward(cri, r, session, streams).await;
    })
}

#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
}

async fn forward(
    cri: Arc<Cri>,
    r: cri::PortForwardRequest,
    session: Session,
    mut streams: Streams,
) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut conns = tokio::task::JoinSet::new();
    while let Some(mut s) = streams.accept().await {
        let kind = s.headers.get("streamtype").unwrap_or("").to_owned();
        let Some(id) = s.headers.get("requestid").map(str::to_owned) else {
            tracing::info!("port-forward stream without a requestid");
            s.send.reset(PROTOCOL_ERROR);
            continue;
        };
        if !pairs.contains_key(&id) && pairs.len() >= MAX_HALF_OPEN {
            s.send.reset(PROTOCOL_ERROR);
            continue;
        }
        let pair = pairs.entry(id.clone()).or_default();
        let slot = match kind.as_str() {
            "error" => &mut pair.error,
            "data" => &mut pair.data,
            _ => {
                s.send.reset(PROTOCOL_ERROR);
                continue;
            }
        };
        if slot.is_some() {
            s.send.reset(PROTOCOL_ERROR);
            continue;
        }
        *slot = Some(s);
        if pair.error.is_some() && pair.data.is_some() {
            let Some(Pair {
                error: Some(error),
                data: Some(data),
            }) = pairs.remove(&id)
            else {
                continue;
            };
            let (cri, allowed) = (cri.clone(), r.port.clone());
            let pod = r.pod_sandbox_id.clone();
            conns.spawn(async move { connection(&cri, &pod, &allowed, error, data).await });
        }
    }
    // The client went away: its connections end with it.
    conns.abort_all();
    drop(session);
}

async fn connection(cri: &Cri, pod: &str, allowed: &[i32], error: Stream, data: Stream) {
    let (_, mut error_send) = error.split();
    let port = data.headers.get("port").unwrap_or("").to_owned();
    let conn = match dial(cri, pod, allowed, &port).await {
        Ok(t) => t,
        Err(why) => {
            let msg = format!("error forwarding port {port} to pod {pod}: {why}");
            tracing::info!("{msg}");
            let _ = error_send.send(msg.as_bytes()).await;
            let _ = error_send.finish().await;
            return;
        }
    };
    let _ = error_send.finish().await;
    let (mut from_client, mut to_client) = data.split();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let up = async {
        while let Ok(Some(chunk)) = from_client.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_client.send(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_client.finish().await;
    };
    tokio::join!(up, down);
}

/// A forwarded connection: TCP, or a vm shim's socket carrying one.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// The vm shim's answer to a port: `ok` or `error: <why>`, one line.
const MAX_VM_ANSWER: usize = 4096;

/// A connection to `port` on the pod's loopback: made inside its network namespace, or, in a vm
/// pod, by the guest's agent through the vm shim's forwarding socket.
pub(crate) async fn dial(
    cri: &Cri,
    pod: &str,
    allowed: &[i32],
    port: &str,
) -> Result<Box<dyn Duplex>, String> {
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port header {port:?} is not a TCP port"))?;
    if !allowed.is_empty() && !allowed.contains(&i32::from(port)) {
        return Err(format!(
            "port {port} is not among the request's ports {allowed:?}"
        ));
    }
    let target = cri
        .port_forward_target(pod)
        .map_err(|e| e.message().to_owned())?;
    let netns = match target {
        ForwardTarget::Vm(socket) => return dial_vm(&socket, port).await,
        ForwardTarget::Netns(ns) => Some(ns),
        ForwardTarget::Node => None,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let std_stream = tokio::task::spawn_blocking(move || match netns {
        Some(ns) => ns
            .run_in(move || std::net::TcpStream::connect(addr))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string()),
        None => std::net::TcpStream::connect(addr).map_err(|e| e.to_string()),
    })
    .await
    .map_err(|e| e.to_string())??;
    std_stream
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::from_std(std_stream).map_err(|e| e.to_string())?;
    Ok(Box::new(tcp))
}

/// Asks the vm shim at `socket` for a connection to `port` in its guest.
async fn dial_vm(socket: &Path, port: u16) -> Result<Box<dyn Duplex>, String> {
    let mut sock = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("the pod VM's forwarding socket {}: {e}", socket.display()))?;
    sock.write_all(&port.to_be_bytes())
        .await
        .map_err(|e| format!("the pod VM's forwarding socket: {e}"))?;
    // The answer line, read a byte at a time: what follows it is the connection's.
    let mut line = Vec::new();
    loop {
        let b = sock
            .read_u8()
            .await
            .map_err(|e| format!("the pod VM's forwarding socket: {e}"))?;
        if b == b'\n' {
            break;
        }
        if line.len() >= MAX_VM_ANSWER {
            return Err("the pod VM's forwarding socket: an answer line too long".into());
        }
        line.push(b);
    }
    let line = String::from_utf8_lossy(&line);
    match line.strip_prefix("error: ") {
        None if line == "ok" => Ok(Box::new(sock)),
        Some(why) => Err(why.to_owned()),
        None => Err(format!("the pod VM's forwarding socket answered {line:?}")),
    }
}
