//! The WASI CLI test program. Built for `wasm32-wasip1` (a core module) and `wasm32-wasip2` (a
//! component exporting `wasi:cli/run`).
//!
//! It always prints `hello from wasm`, one `arg[i]=VALUE` line per argument (args[0]
//! included) and one `env KEY=VALUE` line per environment variable (sorted by key). Then it
//! runs the options it was given, in order:
//!
//! - `--read PATH`: prints `read PATH: <contents>` (failure: stderr, exit 2)
//! - `--open PATH`: opens PATH for reading and reads at most 16 bytes, printing
//!   `opened PATH: N bytes` (failure: `open PATH failed: ...` on stderr, exit 2); for device
//!   nodes, FIFOs and the like, where `--read` would never end
//! - `--write PATH TEXT`: writes TEXT to PATH and prints `wrote PATH` (failure: stderr, exit 2)
//! - `--stderr TEXT`: prints TEXT to stderr
//! - `--stdin`: copies stdin to stdout until EOF
//! - `--sleep MS`: sleeps MS milliseconds
//! - `--tick PATH MS`: appends one byte to PATH every MS milliseconds, forever
//! - `--loop`: busy-loops forever
//! - `--alloc-mb N`: allocates N MiB in 1 MiB chunks, touching every page, printing
//!   `allocated K MiB` after each chunk and `alloc done` at the end
//! - `--trap`: aborts (a Wasm trap)
//! - `--exit N`: exits with code N
//!
//! Arguments that do not start with `-` are only printed; an unknown option (or a missing or
//! malformed option value) prints a message to stderr and exits with 2.

// A test program whose output is its behaviour: printing is what it is for.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{self, Read, Write};
use std::process::exit;
use std::time::Duration;

const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();

    println!("hello from wasm");
    for (i, arg) in args.iter().enumerate() {
        println!("arg[{i}]={arg}");
    }
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    vars.sort();
    for (k, v) in &vars {
        println!("env {k}={v}");
    }

    let mut rest = args.iter().skip(1);
    while let Some(opt) = rest.next() {
        let mut value = |what: &str| -> String {
            match rest.next() {
                Some(v) => v.clone(),
                None => fail(&format!("{opt}: missing {what}")),
            }
        };
        match opt.as_str() {
            "--read" => {
                let path = value("PATH");
                match std::fs::read(&path) {
                    Ok(contents) => {
                        let mut out = io::stdout().lock();
                        let _ = write!(out, "read {path}: ");
                        let _ = out.write_all(&contents);
                        if !contents.ends_with(b"\n") {
                            let _ = out.write_all(b"\n");
                        }
                    }
                    Err(e) => fail(&format!("read {path} failed: {e}")),
                }
            }
            "--open" => {
                let path = value("PATH");
                let mut buf = [0u8; 16];
                match std::fs::File::open(&path).and_then(|mut f| f.read(&mut buf)) {
                    Ok(n) => println!("opened {path}: {n} bytes"),
                    Err(e) => fail(&format!("open {path} failed: {e}")),
                }
            }
            "--write" => {
                let path = value("PATH");
                let text = value("TEXT");
                if let Err(e) = std::fs::write(&path, text) {
                    fail(&format!("write {path} failed: {e}"));
                }
                println!("wrote {path}");
            }
            "--stderr" => {
                let text = value("TEXT");
                eprintln!("{text}");
            }
            "--stdin" => {
                let mut input = io::stdin().lock();
                let mut out = io::stdout().lock();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Err(e) = out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                                fail(&format!("--stdin: write to stdout failed: {e}"));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => fail(&format!("--stdin: read from stdin failed: {e}")),
                    }
                }
            }
            "--sleep" => {
                let ms: u64 = number(opt, &value("MS"));
                std::thread::sleep(Duration::from_millis(ms));
            }
            "--tick" => {
                // Appends one byte to PATH every MS milliseconds, forever: progress that
                // can be watched from outside (pause must stop it).
                let path = value("PATH");
                let ms: u64 = number(opt, &value("MS"));
                flush();
                loop {
                    let r = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .and_then(|mut f| f.write_all(b"x"));
                    if let Err(e) = r {
                        fail(&format!("tick {path} failed: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
            "--loop" => {
                flush();
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "--alloc-mb" => {
                let mb: usize = number(opt, &value("N"));
                let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(mb);
                for k in 1..=mb {
                    let mut chunk = vec![0u8; MIB];
                    for page in chunk.chunks_mut(PAGE) {
                        page[0] = 1;
                    }
                    chunks.push(std::hint::black_box(chunk));
                    println!("allocated {k} MiB");
                    flush();
                }
                std::hint::black_box(&chunks);
                println!("alloc done");
            }
            "--trap" => {
                flush();
                std::process::abort();
            }
            "--exit" => {
                let code: i32 = number(opt, &value("N"));
                flush();
                exit(code);
            }
            other if other.starts_with('-') => fail(&format!("unknown option {other}")),
            _ => {}
        }
    }
    flush();
}

fn number<T: std::str::FromStr>(opt: &str, s: &str) -> T
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .unwrap_or_else(|e| fail(&format!("{opt}: bad number {s:?}: {e}")))
}

fn flush() {
    let _ = io::stdout().flush();
}

/// Prints `msg` to stderr and exits with 2.
fn fail(msg: &str) -> ! {
    flush();
    eprintln!("{msg}");
    exit(2);
}
