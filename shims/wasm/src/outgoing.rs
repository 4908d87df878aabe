//! Outgoing `wasi:http` requests of a guest in a pod: plain HTTP/1.1 over a TCP connection the
//! worker makes, so from the pod's network namespace, the one the worker runs in. What a guest
//! can make the worker do is bounded: connecting, waiting for the response's head, and each
//! wait for a part of its body take at most the runtime's `outgoing_timeout_ms` (a guest may
//! ask for less), and the authority must be a literal address (the worker has no resolver:
//! its root is empty). HTTPS is refused (no TLS client in the worker yet).

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// The connection's remaining work: resolves when the response has been read to its end.
pub type Io = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// The smaller of what the guest asked and the runtime's bound.
fn bounded(asked: Option<Duration>, bound: Duration) -> Duration {
    asked
        .map_or(bound, |a| a.min(bound))
        .max(Duration::from_millis(1))
}

/// The address a request goes to: its authority as a literal `IP:PORT` (port 80 if none).
fn target(uri: &http::Uri) -> Result<SocketAddr, Error> {
    if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        return Err(Error::InternalError(Some(
            "https: the wasm runtime makes plain HTTP requests only".into(),
        )));
    }
    let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
    let with_port = if authority.port().is_some() {
        authority.as_str().to_owned()
    } else {
        format!("{}:80", authority.as_str())
    };
    with_port.parse().map_err(|_| {
        Error::InternalError(Some(format!(
            "{authority}: not an IP address (the wasm runtime does not look names up)"
        )))
    })
}

/// Send `req` and return the response, its body bounded between frames.
pub async fn send(
    mut req: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    bound: Duration,
) -> Result<(http::Response<WasiBody>, Io), Error> {
    let addr = target(req.uri())?;
    let connect = bounded(options.and_then(|o| o.connect_timeout), bound);
    let first_byte = bounded(options.and_then(|o| o.first_byte_timeout), bound);
    let between = bounded(options.and_then(|o| o.between_bytes_timeout), bound);
    let stream = match tokio::time::timeout(connect, TcpStream::connect(addr)).await {
        Ok(s) => s.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
            _ => Error::Connect(e),
        })?,
        Err(_) => return Err(Error::ConnectionTimeout),
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    // The request line carries the path only (no proxy here).
    *req.uri_mut() = http::Uri::builder()
        .path_and_query(req.uri().path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    let mut conn = Some(conn);
    let mut send = pin!(async {
        tokio::time::timeout(first_byte, sender.send_request(req))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(Error::from)
    });
    // Drive the connection while waiting for the response's head.
    let res = poll_fn(|cx| match send.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => {
            let Some(c) = conn.as_mut() else {
                return Poll::Pending;
            };
            let done = ready!(Pin::new(c).poll(cx));
            conn = None;
            match done {
                Ok(()) => send.as_mut().poll(cx),
                Err(e) => Poll::Ready(Err(Error::from(e))),
            }
        }
    })
    .await?;
    let res = res.map(|incoming| {
        let mut timeout = tokio::time::interval(between);
        timeout.reset();
        Bounded { incoming, timeout }.boxed_unsync()
    });
    let io: Io = Box::new(async move {
        match conn {
            Some(c) => c.await.map_err(|e| {
                if e.is_timeout() {
                    Error::HttpResponseTimeout
                } else {
                    Error::from(e)
                }
            }),
            None => Ok(()),
        }
    });
    Ok((res, io))
}

/// A response body whose every frame must come within `timeout` of the one before.
struct Bounded {
    incoming: Incoming,
    timeout: tokio::time::Interval,
}

impl hyper::body::Body for Bounded {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(if e.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(e)
            }))),
            Poll::Ready(Some(Ok(frame))) => {
                self.timeout.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timeout.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_literal_plain_http_addresses() {
        let t = |u: &str| target(&u.parse().unwrap_or_else(|e| panic!("{u}: {e}")));
        assert_eq!(
            t("http://10.1.2.3:8080/x").ok(),
            Some(SocketAddr::from(([10, 1, 2, 3], 8080)))
        );
        assert_eq!(
            t("http://10.1.2.3/x").ok(),
            Some(SocketAddr::from(([10, 1, 2, 3], 80)))
        );
        assert!(t("http://[::1]:81/").is_ok_and(|a| a.port() == 81));
        let e = format!("{:?}", t("http://example.invalid/").err());
        assert!(e.contains("not an IP address"), "{e}");
        let e = format!("{:?}", t("https://10.1.2.3/").err());
        assert!(e.contains("plain HTTP requests only"), "{e}");
    }

    #[test]
    fn a_guest_may_ask_for_less_time_never_more() {
        let bound = Duration::from_secs(30);
        assert_eq!(bounded(None, bound), bound);
        assert_eq!(bounded(Some(Duration::from_secs(600)), bound), bound);
        assert_eq!(
            bounded(Some(Duration::from_secs(2)), bound),
            Duration::from_secs(2)
        );
        assert_eq!(
            bounded(Some(Duration::ZERO), bound),
            Duration::from_millis(1)
        );
    }
}
