//! A `wasi:http/incoming-handler` test component (the `wasi:http/proxy` world), built for
//! `wasm32-wasip2`.
//!
//! Every request gets a 200 `text/plain` response: `hello from wasm http: <METHOD> <PATH>\n`
//! (the path with its query), except path `/env`, which answers the environment variables,
//! sorted, one `KEY=VALUE` per line, and path `/spin`, which computes forever without
//! answering (for the request timeout).

// A test component: a host that breaks the wasi:http contract fails the test that runs it.
#![allow(clippy::expect_used)]

use std::io::Write;

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
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
        let body = if path.split('?').next() == Some("/env") {
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
