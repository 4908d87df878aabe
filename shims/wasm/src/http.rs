//! Edge functions: a component exporting `wasi:http/incoming-handler` is served on the socket
//! the parent bound for the task, one fresh instance per request from the pre-instantiated
//! template. Clients are untrusted: a client has `header_timeout` to send a request's headers
//! (an idle keep-alive connection too), a task holds at most `max_connections` connections (one
//! more is answered 503 and closed), and a request's instance lives at most `request_timeout`,
//! its response body included.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpHooks, WasiHttpView};

use crate::runtime::P2State;
use crate::task::Guest;

/// Outgoing HTTP from guests: made by `outgoing.rs` from the worker, so from the pod's network
/// namespace, for a task in a pod whose runtime allows it (`outgoing_http`); refused otherwise
/// (`HttpRequestDenied`), always for a task outside a pod. Each request holds a connection of
/// the worker's until its response is read or dropped: an instance has at most `max_sockets`
/// at once (one more is `connection-limit-reached`).
#[derive(Debug, Default)]
pub struct Hooks {
    /// The bound of an outgoing request's waits, when the task may make requests.
    outgoing: Option<std::time::Duration>,
    /// The instance's outgoing connections.
    conns: Option<Arc<Semaphore>>,
}

impl Hooks {
    pub fn new(network: &crate::config::Network) -> Hooks {
        let max = usize::try_from(network.max_sockets).unwrap_or(usize::MAX);
        Hooks {
            outgoing: network.outgoing_http.then_some(network.outgoing_timeout),
            conns: network
                .outgoing_http
                .then(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)))),
        }
    }
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                )>,
            > + Send,
    > {
        let (Some(bound), Some(conns)) = (self.outgoing, &self.conns) else {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            return Box::new(async { Err(wasmtime_wasi_http::Error::ConnectionLimitReached) });
        };
        Box::new(async move {
            let (response, io) = crate::outgoing::send(request, options, bound).await?;
            // The connection is the worker's until its work is done.
            let io: crate::outgoing::Io = Box::new(async move {
                let done = Box::into_pin(io).await;
                drop(permit);
                done
            });
            Ok((response, io))
        })
    }
}

/// What a connection over the cap is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 43\r\nconnection: close\r\n\r\ntoo many connections to this task; try later\n";

/// Accept connections until the task is killed (the caller drops this future); every
/// connection and in-flight request is owned by `conns` and ends with it.
pub async fn serve(listener: TcpListener, pre: ProxyPre<P2State>, guest: Arc<Guest>) -> u32 {
    let mut conns = tokio::task::JoinSet::new();
    let slots = Arc::new(Semaphore::new(guest.settings.max_connections as usize));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "http accept");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, id = %guest.id, "http connection over the cap refused");
            // Told if the socket takes it at once (a fresh one does), then closed: nothing is
            // spent waiting on a client over the cap.
            let _ = sock.try_write(BUSY);
            drop(sock);
            continue;
        };
        let pre = pre.clone();
        let guest = guest.clone();
        conns.spawn(async move {
            let sock = Slotted {
                io: sock,
                slot: Some(slot),
            };
            let header_timeout = guest.settings.header_timeout;
            let service = hyper::service::service_fn(move |req| {
                let pre = pre.clone();
                let guest = guest.clone();
                async move { Ok::<_, Infallible>(handle(pre, guest, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(sock), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "http connection");
            }
        });
    }
}

/// A connection holding one of the task's connection slots until its write side is shut down:
/// the last thing a client sees of it is the shutdown, so a client that saw the connection end
/// finds the slot free (with the slot dropped only when the connection's task ended, a client's
/// next connection could still be over the cap).
struct Slotted {
    io: TcpStream,
    slot: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.slot = None;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn handle(
    pre: ProxyPre<P2State>,
    guest: Arc<Guest>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    match call(pre, guest.clone(), req).await {
        Ok(resp) => resp,
        Err(msg) => {
            guest.report(&format!("http request failed: {msg}"));
            let body = http_body_util::Full::new(Bytes::from(format!("{msg}\n")))
                .map_err(|never: Infallible| match never {})
                .boxed_unsync();
            let mut resp = hyper::Response::new(body);
            *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    }
}

async fn call(
    pre: ProxyPre<P2State>,
    guest: Arc<Guest>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<HyperOutgoingBody>, String> {
    let state = guest.p2_state().map_err(|e| e.to_string())?;
    let mut store = Store::new(pre.engine(), state);
    let timeout = guest.settings.request_timeout;
    guest.configure(&mut store, timeout, |s| &mut s.limits);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, req)
        .map_err(|e| e.to_string())?;
    let out = store
        .data_mut()
        .http()
        .new_response_outparam(tx)
        .map_err(|e| e.to_string())?;
    // The guest may go on writing the body after it has set the response, so it runs in its
    // own task; it ends when it returns, traps, is interrupted by a kill, or runs out of time
    // (the epoch deadline stops a computing guest; the wall-clock bound one waiting in I/O).
    let began = std::time::Instant::now();
    let task = tokio::spawn(async move {
        let run = async {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        };
        match timeout {
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(r) => r,
                Err(_) => Err(wasmtime::Error::msg(format!(
                    "the request ran past its timeout of {} ms",
                    t.as_millis()
                ))),
            },
            None => run.await,
        }
    });
    match rx.await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(code)) => Err(format!("the handler answered with an error: {code:?}")),
        Err(_) => match task.await {
            Ok(Ok(())) => Err("the handler never set a response".into()),
            // Stopped by the epoch deadline (computing) or the wall clock (waiting).
            Ok(Err(_)) if timeout.is_some_and(|t| began.elapsed() >= t) => Err(format!(
                "the request ran past its timeout of {} ms",
                timeout.map(|t| t.as_millis()).unwrap_or_default()
            )),
            Ok(Err(e)) => Err(format!("{e:?}")),
            Err(e) => Err(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty};
    use wasmtime_wasi_http::Error as HttpError;

    use super::*;
    use crate::config::Network;

    fn get(addr: std::net::SocketAddr) -> http::Request<WasiBody> {
        let body = Empty::<Bytes>::new()
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();
        http::Request::get(format!("http://{addr}/"))
            .body(body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    type Sent = Pin<
        Box<
            dyn Future<
                    Output = wasmtime_wasi_http::Result<(
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    )>,
                > + Send,
        >,
    >;

    fn send(hooks: &mut Hooks, addr: std::net::SocketAddr) -> Sent {
        let done: Box<dyn Future<Output = Result<(), HttpError>> + Send> =
            Box::new(async { Ok(()) });
        Box::into_pin(hooks.send_request(get(addr), None, done))
    }

    /// Issue 20: outgoing requests are refused where the task has no network, and an instance
    /// holds at most `max_sockets` outgoing connections at once (a dropped one frees its place).
    #[test]
    fn issue20_outgoing_requests_are_switchable_and_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            // A server on this test's loopback that accepts and never answers.
            let server = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let addr = server.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let _accepting = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = server.accept().await {
                    held.push(s);
                }
            });

            let mut off = Hooks::new(&Network::default());
            let e = send(&mut off, addr).await.err();
            assert!(matches!(e, Some(HttpError::HttpRequestDenied)), "{e:?}");

            let net = Network {
                sockets: false,
                outgoing_http: true,
                max_sockets: 1,
                outgoing_timeout: Duration::from_secs(30),
            };
            let mut hooks = Hooks::new(&net);
            let mut first = send(&mut hooks, addr);
            // The first connects and waits for an answer that never comes.
            let pending = tokio::time::timeout(Duration::from_millis(200), &mut first).await;
            assert!(
                pending.is_err(),
                "the first request ended: {:?}",
                pending.map(|r| r.err())
            );
            let e = send(&mut hooks, addr).await.err();
            assert!(
                matches!(e, Some(HttpError::ConnectionLimitReached)),
                "{e:?}"
            );
            drop(first);
            let mut third = send(&mut hooks, addr);
            let pending = tokio::time::timeout(Duration::from_millis(200), &mut third).await;
            assert!(
                pending.is_err(),
                "a freed place is refused: {:?}",
                pending.map(|r| r.err())
            );
        });
    }
}
