//! Edge functions: a component exporting `wasi:http/incoming-handler` is served on the task's
//! listen address, one fresh instance per request from the pre-instantiated template.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use tokio::net::TcpListener;
use wasmtime::Store;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpHooks, WasiHttpView};

use crate::runtime::P2State;
use crate::task::Guest;

/// Outgoing HTTP from guests is refused: an edge function here answers requests, it does not
/// reach the network.
#[derive(Debug, Default)]
pub struct Hooks;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// Accept connections until the task is killed (the caller drops this future); every
/// connection and in-flight request is owned by `conns` and ends with it.
pub async fn serve(listener: TcpListener, pre: ProxyPre<P2State>, guest: Arc<Guest>) -> u32 {
    let mut conns = tokio::task::JoinSet::new();
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
        let pre = pre.clone();
        let guest = guest.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let pre = pre.clone();
                let guest = guest.clone();
                async move { Ok::<_, Infallible>(handle(pre, guest, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(sock), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "http connection");
            }
        });
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
    guest.configure(&mut store, |s| &mut s.limits);
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
    // own task; it ends when it returns, traps, or is interrupted by a kill.
    let task = tokio::spawn(async move {
        let proxy = pre.instantiate_async(&mut store).await?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, req, out)
            .await
    });
    match rx.await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(code)) => Err(format!("the handler answered with an error: {code:?}")),
        Err(_) => match task.await {
            Ok(Ok(())) => Err("the handler never set a response".into()),
            Ok(Err(e)) => Err(format!("{e:?}")),
            Err(e) => Err(e.to_string()),
        },
    }
}
