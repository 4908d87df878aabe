//! Loopback helpers for tests that serve or forward ports.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind a loopback port");
    l.local_addr().expect("its address").port()
}

/// `GET path` over HTTP/1.0 from `127.0.0.1:port`: the whole response as text (the server
/// closes the connection), or empty when nothing answers. Reads wait at most 30 s.
pub fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes());
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body);
    String::from_utf8_lossy(&body).into_owned()
}
