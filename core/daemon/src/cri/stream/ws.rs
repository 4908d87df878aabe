//! remotecommand over WebSocket: `v5.channel.k8s.io` (with its close message, so a client
//! can end stdin) and `v4.channel.k8s.io`. Every binary message starts with its channel:
//! 0 stdin, 1 stdout, 2 stderr, 3 the status, 4 resize, 255 (v5) close a channel.
//!
//! Port-forward over WebSocket, as Kubernetes' server has it: the ports are query parameters
//! (`?port=80`); port `i` has data channel `2i` and error channel `2i+1`, each starting with
//! the port in two bytes, little endian; one WebSocket carries one connection per port.

use std::sync::Arc;

use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::remotecommand::{self, Channels, MAX_RESIZE, QUEUE, Target, take_sizes};
use super::{offered, plain};
use crate::cri::Cri;

use switchyard_api::cri_stream::channel::{CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};
use switchyard_api::cri_stream::{REMOTECOMMAND_V4 as V4, REMOTECOMMAND_V5 as V5};
/// The largest message a client may send.
const MAX_MESSAGE: usize = 1 << 20;

pub(crate) fn remotecommand(
    cri: Arc<Cri>,
    target: Target,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    upgrade(req, &[V5, V4], move |ws, protocol| async move {
        session(cri, target, ws, protocol == V5).await;
    })
}

pub(crate) fn portforward(
    cri: Arc<Cri>,
    r: switchyard_api::cri::v1::PortForwardRequest,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let ports: Vec<String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("port="))
        .map(str::to_owned)
        .collect();
    if ports.is_empty() || ports.len() > MAX_PORTS {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("a websocket port-forward names 1 to {MAX_PORTS} ports as ?port=N"),
        );
    }
    // Kubernetes' server offers the channel protocol, or none.
    upgrade(req, &[V4, ""], move |ws, _| async move {
        forward(cri, r, ws, ports).await;
    })
}

/// Ports one WebSocket port-forward may name.
const MAX_PORTS: usize = 16;

/// The WebSocket handshake's answer, choosing the first of `served` the client offers ("" for
/// a client that offers none), and `then` run on the upgraded connection.
fn upgrade<F, Fut>(
    req: hyper::Request<Incoming>,
    served: &[&'static str],
    then: F,
) -> hyper::Response<Full<Bytes>>
where
    F: FnOnce(WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, &'static str) -> Fut
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send,
{
    let offers = offered(&req, "sec-websocket-protocol");
    let chosen = served
        .iter()
        .find(|p| (p.is_empty() && offers.is_empty()) || offers.contains(p));
    let Some(&protocol) = chosen else {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("websocket protocols offered {offers:?}; served: {served:?}"),
        );
    };
    let key = req.headers().get("sec-websocket-key").cloned();
    let version_ok = req
        .headers()
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = key.filter(|_| version_ok) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "a websocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version 13".into(),
        );
    };
    let mut r = hyper::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", accept);
    }
    if !protocol.is_empty() {
        h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    }
    let slot = super::Slot::of(&req);
    tokio::spawn(async move {
        let _slot = slot;
        match hyper::upgrade::on(req).await {
            Ok(io) => {
                let mut config = WebSocketConfig::default();
                config.max_message_size = Some(MAX_MESSAGE);
                config.max_frame_size = Some(MAX_MESSAGE);
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(config))
                        .await;
                then(ws, protocol).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade"),
        }
    });
    r
}

async fn session<S>(cri: Arc<Cri>, target: Target, ws: WebSocketStream<S>, v5: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let want = target.wanted();
    let (mut sink, mut incoming) = ws.split();
    // Everything written goes through one queue: output, then the status, then the close.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                while out_rx.recv().await.is_some() {}
                return;
            }
        }
        let _ = sink.close().await;
    });

    let (gone_tx, gone) = watch::channel(false);
    let (stdin_tx, stdin_rx) = mpsc::channel(QUEUE);
    let (resize_tx, resize_rx) = mpsc::channel(QUEUE);
    let reader = tokio::spawn(async move {
        let mut stdin = want.stdin.then_some(stdin_tx);
        let mut resize = want.tty.then_some(resize_tx);
        let mut sizes = Vec::new();
        while let Some(Ok(m)) = incoming.next().await {
            let data = match m {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            match data.split_first() {
                Some((&STDIN, rest)) if !rest.is_empty() => {
                    if let Some(tx) = &stdin
                        && tx.send(rest.to_vec()).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some((&RESIZE, rest)) => {
                    sizes.extend_from_slice(&rest[..rest.len().min(MAX_RESIZE)]);
                    match take_sizes(&mut sizes) {
                        Ok(got) => {
                            for s in got {
                                if let Some(tx) = &resize {
                                    let _ = tx.send(s).await;
                                }
                            }
                        }
                        Err(why) => {
                            tracing::info!("websocket resize: {why}");
                            resize = None;
                            sizes.clear();
                        }
                    }
                }
                Some((&CLOSE, [STDIN])) if v5 => stdin = None,
                _ => {}
            }
        }
        let _ = gone_tx.send(true);
    });

    let output = |channel: u8, on: bool| {
        on.then(|| {
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
            let out = out_tx.clone();
            let pump = tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    let mut m = Vec::with_capacity(data.len() + 1);
                    m.push(channel);
                    m.extend(data);
                    if out.send(Message::binary(m)).await.is_err() {
                        while rx.recv().await.is_some() {}
                        return;
                    }
                }
                if v5 {
                    let _ = out.send(Message::binary(vec![CLOSE, channel])).await;
                }
            });
            (tx, pump)
        })
    };
    let (stdout, out_pump) = output(STDOUT, want.stdout).unzip();
    let (stderr, err_pump) = output(STDERR, want.stderr).unzip();
    let outcome = remotecommand::run(
        &cri,
        &target,
        Channels {
            stdin: want.stdin.then_some(stdin_rx),
            stdout,
            stderr,
            resize: want.tty.then_some(resize_rx),
            gone,
        },
    )
    .await;
    for p in [out_pump, err_pump].into_iter().flatten() {
        let _ = p.await;
    }
    let mut status = vec![ERROR];
    status.extend(remotecommand::status(&target, &outcome));
    let _ = out_tx.send(Message::binary(status)).await;
    drop(out_tx);
    let _ = writer.await;
    // A lingering close: the reader goes on until the client closes too (or CLOSE_GRACE), so
    // input it sends late is read and does not reset the connection under the status.
    let mut reader = reader;
    if tokio::time::timeout(super::CLOSE_GRACE, &mut reader)
        .await
        .is_err()
    {
        reader.abort();
    }
}

/// One connection per named port: data channel `2i` joined to a TCP connection to the port in
/// the pod, errors on channel `2i+1`.
async fn forward<S>(
    cri: Arc<Cri>,
    r: switchyard_api::cri::v1::PortForwardRequest,
    ws: WebSocketStream<S>,
    ports: Vec<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut sink, mut incoming) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let mut to_tcp = Vec::new();
    let mut conns = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        to_tcp.push(tx);
        let out = out_tx.clone();
        let (cri, allowed, pod, port) = (
            cri.clone(),
            r.port.clone(),
            r.pod_sandbox_id.clone(),
            port.clone(),
        );
        conns.push(tokio::spawn(async move {
            let number = port.parse::<u16>().unwrap_or(0);
            for channel in [data, error] {
                let mut m = vec![channel];
                m.extend(number.to_le_bytes());
                let _ = out.send(Message::binary(m)).await;
            }
            let conn = match super::portforward::dial(&cri, &pod, &allowed, &port).await {
                Ok(t) => t,
                Err(why) => {
                    let mut m = vec![error];
                    m.extend(format!("error forwarding port {port} to pod {pod}: {why}").bytes());
                    let _ = out.send(Message::binary(m)).await;
                    return;
                }
            };
            let (mut rd, mut wr) = tokio::io::split(conn);
            let up = async {
                while let Some(chunk) = rx.recv().await {
                    if wr.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            };
            let down = async {
                let mut buf = vec![0u8; 32 << 10];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut m = Vec::with_capacity(n + 1);
                    m.push(data);
                    m.extend_from_slice(&buf[..n]);
                    if out.send(Message::binary(m)).await.is_err() {
                        break;
                    }
                }
            };
            // The connection ends when the pod's side does.
            tokio::select! {
                () = down => {}
                () = async { up.await; std::future::pending::<()>().await } => {}
            }
        }));
    }
    drop(out_tx);
    let reader = async {
        while let Some(Ok(m)) = incoming.next().await {
            let data = match m {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&channel, rest)) = data.split_first() else {
                continue;
            };
            // Client data on a data channel (its first two bytes may be the port again, as
            // Kubernetes' client does not send them; nothing to strip).
            if channel % 2 == 0
                && let Some(tx) = to_tcp.get(usize::from(channel / 2))
                && !rest.is_empty()
                && tx.send(rest.to_vec()).await.is_err()
            {
                break;
            }
        }
    };
    let all_done = async {
        for c in conns.iter_mut() {
            let _ = c.await;
        }
    };
    tokio::select! {
        () = reader => {}
        () = all_done => {}
    }
    for c in &conns {
        c.abort();
    }
    drop(to_tcp);
    let _ = writer.await;
    // A lingering close: the client may still be sending (data for a connection that failed
    // here); read until it closes, or CLOSE_GRACE, so that the error just sent is not lost to
    // a reset.
    let _ = tokio::time::timeout(super::CLOSE_GRACE, async {
        while let Some(Ok(_)) = incoming.next().await {}
    })
    .await;
}
