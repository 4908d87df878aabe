//! A `wasi:http/incoming-handler` test component (the `wasi:http/proxy` world), built for
//! `wasm32-wasip2`.
//!
//! Every request gets a 200 `text/plain` response: `hello from wasm http: <METHOD> <PATH>\n`
//! (the path with its query), except path `/env`, which answers the environment variables,
//! sorted, one `KEY=VALUE` per line, path `/spin`, which computes forever without answering
//! (for the request timeout), and path `/fetch?IP:PORT/PATH`, which makes an outgoing
//! `wasi:http` GET of `http://IP:PORT/PATH` and answers `fetched <STATUS>: <BODY>` (at most
//! 64 KiB of it) or `fetch failed: <ERROR>`.

// A test component: a host that breaks the wasi:http contract fails the test that runs it.
#![allow(clippy::expect_used)]

use std::io::Write;

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wasi::http::proxy::export!(Hello);

struct Hello;

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        if path == "/spin" {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        let body = if let Some(target) = path.strip_prefix("/fetch?") {
            fetch(target)
        } else if path.split('?').next() == Some("/env") {
            let mut vars: Vec<(String, String)> = std::env::vars().collect();
            vars.sort();
            vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
        } else {
            format!(
                "hello from wasm http: {} {path}\n",
                method_name(&request.method())
            )
        };

        let headers = Fields::from_list(&[("content-type".to_owned(), b"text/plain".to_vec())])
            .expect("content-type is a valid header");
        let response = OutgoingResponse::new(headers);
        let out_body = response.body().expect("the response body is taken once");
        ResponseOutparam::set(response_out, Ok(response));

        let mut stream = out_body.write().expect("the body stream is taken once");
        // A client that went away is not this component's problem: drop the rest.
        let written = stream
            .write_all(body.as_bytes())
            .and_then(|()| Write::flush(&mut stream));
        drop(stream);
        if written.is_ok() {
            let _ = OutgoingBody::finish(out_body, None);
        }
    }
}

/// GET `http://<target>` through `wasi:http/outgoing-handler`.
fn fetch(target: &str) -> String {
    let (authority, path) = match target.find('/') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    if request.set_scheme(Some(&Scheme::Http)).is_err()
        || request.set_authority(Some(authority)).is_err()
        || request.set_path_with_query(Some(path)).is_err()
    {
        return format!("fetch failed: bad target {target:?}");
    }
    let Ok(body) = request.body() else {
        return "fetch failed: no request body".into();
    };
    let future = match wasi::http::outgoing_handler::handle(request, None) {
        Ok(f) => f,
        Err(e) => return format!("fetch failed: {e:?}"),
    };
    let _ = OutgoingBody::finish(body, None);
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return format!("fetch failed: {e:?}"),
        _ => return "fetch failed: no response".into(),
    };
    let status = response.status();
    let Ok(incoming) = response.consume() else {
        return "fetch failed: no response body".into();
    };
    let Ok(stream) = incoming.stream() else {
        return "fetch failed: no response body stream".into();
    };
    let mut got = Vec::new();
    while got.len() < 64 << 10 {
        match stream.blocking_read(16 << 10) {
            Ok(chunk) => got.extend(chunk),
            Err(_) => break,
        }
    }
    format!("fetched {status}: {}", String::from_utf8_lossy(&got))
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}
