//! remotecommand and portforward over SPDY/3.1: the HTTP upgrade, then the client opens one
//! SPDY stream per channel, each named by its `streamtype` header.

use std::sync::Arc;

use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use switchyard_spdy::session::PROTOCOL_ERROR;
use switchyard_spdy::{Config, Incoming as Streams, RecvHalf, Role, SendHalf, Session, Stream};
use tokio::sync::{mpsc, watch};

use super::remotecommand::{self, Channels, Outcome, QUEUE, Target, take_sizes};
use super::{STREAM_CREATION_TIMEOUT, offered, plain};
use crate::cri::Cri;

/// The remotecommand version spoken over SPDY (kubectl's first choice).
pub(crate) use switchyard_api::cri_stream::{PORTFORWARD, REMOTECOMMAND_V4};
const VERSION_HEADER: &str = "x-stream-protocol-version";

/// The 101 answer for `protocol`, or the refusal naming what is supported.
fn negotiate(
    req: &hyper::Request<Incoming>,
    protocol: &'static str,
) -> hyper::Response<Full<Bytes>> {
    let offers = offered(req, VERSION_HEADER);
    if !offers.contains(&protocol) {
        return plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offers:?}, server supports [{protocol:?}]"
            ),
        );
    }
    let mut r = hyper::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(VERSION_HEADER, HeaderValue::from_static(protocol));
    r
}

/// Start a SPDY session on the upgraded connection of `req` (in a task of its own).
pub(crate) fn upgraded<F, Fut>(
    req: hyper::Request<Incoming>,
    protocol: &'static str,
    then: F,
) -> hyper::Response<Full<Bytes>>
where
    F: FnOnce(Session, Streams) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let response = negotiate(&req, protocol);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let slot = super::Slot::of(&req);
    tokio::spawn(async move {
        let _slot = slot;
        match hyper::upgrade::on(req).await {
            Ok(io) => {
                let (session, streams) =
                    Session::start(TokioIo::new(io), Role::Server, Config::default());
                then(session.clone(), streams).await;
                // After our GOAWAY the client has a moment to close; one that keeps the
                // connection open does not keep its session.
                session.close().await;
                if tokio::time::timeout(super::CLOSE_GRACE, session.ended())
                    .await
                    .is_err()
                {
                    session.abort();
                }
            }
            Err(e) => tracing::debug!(error = %e, "SPDY upgrade"),
        }
    });
    response
}

pub(crate) fn remotecommand(
    cri: Arc<Cri>,
    target: Target,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    upgraded(req, REMOTECOMMAND_V4, move |session, streams| async move {
        session_of(cri, target, session, streams).await;
    })
}

/// The streams of one remotecommand session, by type.
#[derive(Default)]
struct Opened {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

async fn session_of(cri: Arc<Cri>, target: Target, session: Session, mut streams: Streams) {
    let want = target.wanted();
    let expected = 1
        + usize::from(want.stdin)
        + usize::from(want.stdout)
        + usize::from(want.stderr)
        + usize::from(want.tty);
    let mut opened = Opened::default();
    let collect = async {
        let mut n = 0;
        while n < expected {
            let Some(mut s) = streams.accept().await else {
                return Err("the client went away before opening its streams".to_owned());
            };
            let kind = s.headers.get("streamtype").unwrap_or("").to_owned();
            let slot = match kind.as_str() {
                "error" => &mut opened.error,
                "stdin" if want.stdin => &mut opened.stdin,
                "stdout" if want.stdout => &mut opened.stdout,
                "stderr" if want.stderr => &mut opened.stderr,
                "resize" if want.tty => &mut opened.resize,
                _ => {
                    s.send.reset(PROTOCOL_ERROR);
                    return Err(format!("unexpected stream of type {kind:?}"));
                }
            };
            if slot.is_some() {
                s.send.reset(PROTOCOL_ERROR);
                return Err(format!("a second {kind} stream"));
            }
            *slot = Some(s);
            n += 1;
        }
        Ok(())
    };
    let collected = match tokio::time::timeout(STREAM_CREATION_TIMEOUT, collect).await {
        Ok(r) => r,
        Err(_) => Err("timed out waiting for the client to create its streams".to_owned()),
    };
    if let Err(why) = collected {
        tracing::info!("SPDY remotecommand session refused: {why}");
        if let Some(mut e) = opened.error.take() {
            let status = remotecommand::status(&target, &Outcome::Failed(why));
            let _ = e.send.send(&status).await;
            let _ = e.send.finish().await;
        }
        return;
    }

    let (gone_tx, gone) = watch::channel(false);
    let ended = session.clone();
    let watcher = tokio::spawn(async move {
        let _ = ended.ended().await;
        let _ = gone_tx.send(true);
    });
    // Output pumps end with the process's output; input pumps with the session.
    let mut pumps = Vec::new();
    let mut inputs = Vec::new();
    let stdin = opened.stdin.take().map(|s| {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (recv, send) = s.split();
        inputs.push(tokio::spawn(client_to_process(recv, send, tx)));
        rx
    });
    let mut output = |s: Option<Stream>| {
        s.map(|s| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (_, send) = s.split();
            pumps.push(tokio::spawn(process_to_client(rx, send)));
            tx
        })
    };
    let stdout = output(opened.stdout.take());
    let stderr = output(opened.stderr.take());
    let resize = opened.resize.take().map(|s| {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (recv, send) = s.split();
        inputs.push(tokio::spawn(resizes(recv, send, tx)));
        rx
    });
    let outcome = remotecommand::run(
        &cri,
        &target,
        Channels {
            stdin,
            stdout,
            stderr,
            resize,
            gone,
        },
    )
    .await;
    // The output is all sent before the status.
    for p in pumps {
        let _ = p.await;
    }
    for i in inputs {
        i.abort();
    }
    if let Some(mut e) = opened.error.take() {
        let _ = e.send.send(&remotecommand::status(&target, &outcome)).await;
        let _ = e.send.finish().await;
    }
    watcher.abort();
}

/// The client's data on `recv` to the process, until its FIN; this side of the stream is
/// finished at once (nothing goes back on stdin).
async fn client_to_process(mut recv: RecvHalf, mut send: SendHalf, tx: mpsc::Sender<Vec<u8>>) {
    let _ = send.finish().await;
    while let Ok(Some(data)) = recv.recv().await {
        if tx.send(data).await.is_err() {
            break;
        }
    }
}

/// The process's output to the client, then FIN.
async fn process_to_client(mut rx: mpsc::Receiver<Vec<u8>>, mut send: SendHalf) {
    while let Some(data) = rx.recv().await {
        if send.send(&data).await.is_err() {
            // The client is gone: keep draining so the process side never blocks.
            while rx.recv().await.is_some() {}
            return;
        }
    }
    let _ = send.finish().await;
}

/// Terminal sizes from the resize stream.
async fn resizes(
    mut recv: RecvHalf,
    mut send: SendHalf,
    tx: mpsc::Sender<remotecommand::TermSize>,
) {
    let _ = send.finish().await;
    let mut buf = Vec::new();
    while let Ok(Some(data)) = recv.recv().await {
        buf.extend(data);
        match take_sizes(&mut buf) {
            Ok(sizes) => {
                for s in sizes {
                    if tx.send(s).await.is_err() {
                        return;
                    }
                }
            }
            Err(why) => {
                tracing::info!("SPDY resize stream: {why}");
                send.reset(PROTOCOL_ERROR);
                return;
            }
        }
    }
}
