//! The `wasi:sockets` test program, built for `wasm32-wasip2` (a component exporting
//! `wasi:cli/run`; Rust's standard library makes its sockets with `wasi:sockets`).
//!
//! It runs the options it was given, in order:
//!
//! - `--read ADDR`: connects to the TCP server at `ADDR` (a literal `IP:PORT`), reads until the
//!   server closes (at most 64 KiB, 10 s) and prints `read from ADDR: <what it read>`
//! - `--hold N ADDR`: opens up to N connections to `ADDR` and keeps them all open, printing
//!   `held K` after each; the first failure prints `hold failed after K: <error>` and stops
//! - `--udp-loop TEXT`: binds a UDP socket on `127.0.0.1`, sends TEXT to itself and prints
//!   `udp got: TEXT` (10 s at most)
//!
//! A failure prints `<option> ADDR failed: <error>` on stderr and exits with 3; a malformed
//! option exits with 2.

// A test program whose output is its behaviour: printing is what it is for.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::exit;
use std::time::Duration;

fn fail(what: &str, addr: &str, e: std::io::Error) -> ! {
    eprintln!("{what} {addr} failed: {e} ({:?})", e.kind());
    exit(3)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut rest = args.iter().skip(1);
    while let Some(opt) = rest.next() {
        let mut value = |what: &str| -> String {
            rest.next().cloned().unwrap_or_else(|| {
                eprintln!("{opt}: missing {what}");
                exit(2)
            })
        };
        let addr_of = |s: &str| -> SocketAddr {
            s.parse().unwrap_or_else(|e| {
                eprintln!("{opt}: {s:?} is not IP:PORT: {e}");
                exit(2)
            })
        };
        match opt.as_str() {
            "--read" => {
                let a = value("ADDR");
                let addr = addr_of(&a);
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .unwrap_or_else(|e| fail("--read", &a, e));
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut got = String::new();
                s.take(64 << 10)
                    .read_to_string(&mut got)
                    .unwrap_or_else(|e| fail("--read", &a, e));
                println!("read from {a}: {}", got.trim_end());
            }
            "--hold" => {
                let n: usize = value("N").parse().unwrap_or_else(|_| {
                    eprintln!("--hold: N is not a number");
                    exit(2)
                });
                let a = value("ADDR");
                let addr = addr_of(&a);
                let mut held = Vec::new();
                for _ in 0..n {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                        Ok(s) => {
                            held.push(s);
                            println!("held {}", held.len());
                        }
                        Err(e) => {
                            println!("hold failed after {}: {e} ({:?})", held.len(), e.kind());
                            break;
                        }
                    }
                }
            }
            "--udp-loop" => {
                let text = value("TEXT");
                let a = "127.0.0.1:0";
                let s = UdpSocket::bind(a).unwrap_or_else(|e| fail("--udp-loop", a, e));
                let me = s.local_addr().unwrap_or_else(|e| fail("--udp-loop", a, e));
                let me_s = me.to_string();
                s.send_to(text.as_bytes(), me)
                    .unwrap_or_else(|e| fail("--udp-loop", &me_s, e));
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = [0u8; 1024];
                let (n, _) = s
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| fail("--udp-loop", &me_s, e));
                println!("udp got: {}", String::from_utf8_lossy(&buf[..n]));
            }
            other => {
                eprintln!("unknown option {other}");
                exit(2)
            }
        }
    }
}
