//! Issue 16 item 6: a hostile registry cannot grow the daemon's memory. A registry written
//! here, on loopback, streams an endless manifest, announces a manifest of 10 GiB, streams an
//! endless token response, an endless error body and an endless config; each pull fails
//! promptly with an error saying what was too large, and the memory the pull held at its peak
//! (this binary's allocator counts every thread) stays small. The same server then serves a
//! real image behind bearer-token authentication, which pulls.
//!
//! The "endless" streams stop after [`SAFETY_CAP`] bytes so that a regression cannot take the
//! machine down with it; a client reading them whole would hold that much, far over the bound.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use switchyard_images::{ImageStore, Platform, PullOptions};

// ---- a counting allocator (all threads: the pull runs on the runtime's workers) ----

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes as isize, Ordering::Relaxed) + bytes as isize;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator with the caller's arguments; the
// bookkeeping is two atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most memory a failed pull may hold above where it started: the 4 MiB cap (a growing
/// buffer may briefly hold twice that), the HTTP client, the runtime's buffers.
const MEMORY_BOUND: isize = 24 << 20;
/// Where the test server stops an "endless" stream.
const SAFETY_CAP: usize = 512 << 20;
/// The two tests measure memory with one allocator: they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// What "promptly" means here (the cap is reached in well under a second on loopback).
const PROMPTLY: Duration = Duration::from_secs(20);

// ---- a hostile registry ----

/// What the server sends for a request.
enum Reply {
    Body {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A chunked body of spaces that does not end (until [`SAFETY_CAP`]).
    Endless {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// A `Content-Length` far larger than what follows.
    Announced { length: u64 },
}

struct Request {
    path: String,
    headers: HashMap<String, String>,
}

type Route = dyn Fn(&Request) -> Reply + Send + Sync;

struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

fn serve(route: Arc<Route>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (route, seen) = (route.clone(), seen.clone());
            std::thread::spawn(move || answer(stream, &*route, &seen));
        }
    });
    Server { port, requests }
}

fn answer(stream: TcpStream, route: &Route, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    seen.lock().unwrap().push(path.clone());
    let mut out = stream;
    let head = |status: u16, headers: &[(String, String)], extra: &str| {
        let mut h = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n{extra}");
        for (k, v) in headers {
            h += &format!("{k}: {v}\r\n");
        }
        h + "\r\n"
    };
    let _ = match route(&Request { path, headers }) {
        Reply::Body {
            status,
            headers,
            body,
        } => out
            .write_all(
                head(
                    status,
                    &headers,
                    &format!("Content-Length: {}\r\n", body.len()),
                )
                .as_bytes(),
            )
            .and_then(|()| out.write_all(&body)),
        Reply::Endless { status, headers } => {
            let chunk = [b' '; 64 << 10];
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(&chunk);
            framed.extend_from_slice(b"\r\n");
            let mut sent = 0;
            let mut result =
                out.write_all(head(status, &headers, "Transfer-Encoding: chunked\r\n").as_bytes());
            while result.is_ok() && sent < SAFETY_CAP {
                result = out.write_all(&framed);
                sent += chunk.len();
            }
            result.and_then(|()| out.write_all(b"0\r\n\r\n"))
        }
        Reply::Announced { length } => out
            .write_all(head(200, &[], &format!("Content-Length: {length}\r\n")).as_bytes())
            .and_then(|()| out.write_all(&[b'{'; 1 << 16])),
    };
}

fn json_reply(body: Vec<u8>, media_type: &str) -> Reply {
    Reply::Body {
        status: 200,
        headers: vec![("Content-Type".into(), media_type.into())],
        body,
    }
}

fn not_found() -> Reply {
    Reply::Body {
        status: 404,
        headers: vec![],
        body: br#"{"errors":[{"code":"NAME_UNKNOWN","message":"no such repository"}]}"#.to_vec(),
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A one-layer image: `(manifest, blobs by digest)`.
fn image(config_size_lie: Option<u64>) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("hello").unwrap();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(6);
    h.set_cksum();
    b.append(&h, &b"hello\n"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let host = Platform::host();
    let config = serde_json::to_vec(&json!({
        "architecture": host.architecture, "os": host.os,
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(&config), "size": config_size_lie.unwrap_or(config.len() as u64)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(&tar), "size": tar.len()}],
    }))
    .unwrap();
    let blobs = HashMap::from([(digest(&config), config), (digest(&tar), tar)]);
    (manifest, blobs)
}

struct Pulled {
    result: Result<String, String>,
    elapsed: Duration,
    peak: isize,
}

fn pull(
    rt: &tokio::runtime::Runtime,
    store: &ImageStore,
    reference: &str,
    auth: Option<(&str, &str)>,
) -> Pulled {
    let opts = PullOptions {
        auth: auth.map(|(u, p)| (u.to_owned(), p.to_owned())),
        ..PullOptions::default()
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let result = rt.block_on(async {
        tokio::time::timeout(
            PROMPTLY * 3,
            store.pull("default", reference, &opts, &|_| {}),
        )
        .await
    });
    let elapsed = start.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let result = match result {
        Err(_) => Err(format!("no answer in {:?}", PROMPTLY * 3)),
        Ok(Ok(r)) => Ok(r.name),
        Ok(Err(e)) => Err(switchyard_base::chain(&e)),
    };
    Pulled {
        result,
        elapsed,
        peak,
    }
}

/// Expects `p` to have failed promptly, within the memory bound, with a message holding all of
/// `says`.
fn refused(what: &str, p: Pulled, says: &[&str]) {
    eprintln!(
        "{what}: {:?} in {:?}, peak memory {} bytes",
        p.result, p.elapsed, p.peak
    );
    assert!(
        p.peak < MEMORY_BOUND,
        "{what}: the pull held {} bytes at its peak (bound {MEMORY_BOUND})",
        p.peak
    );
    let message = match p.result {
        Ok(name) => panic!("{what}: pulled {name}"),
        Err(m) => m,
    };
    assert!(p.elapsed < PROMPTLY, "{what}: took {:?}", p.elapsed);
    for s in says {
        assert!(
            message.contains(s),
            "{what}: the error does not say {s:?}: {message}"
        );
    }
}

#[test]
fn issue16_a_hostile_registry_cannot_grow_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("meta.redb")).unwrap());
    let store = ImageStore::open(
        &dir.path().join("images"),
        db,
        Some(switchyard_images::snapshot::Driver::Copy),
    )
    .unwrap();

    let (lying_manifest, lying_blobs) = image(Some(100));
    let port_cell: Arc<Mutex<u16>> = Arc::new(Mutex::new(0));
    let port_of = port_cell.clone();
    let server = serve(Arc::new(move |r: &Request| {
        let port = *port_of.lock().unwrap();
        let p = r.path.as_str();
        if p.starts_with("/v2/endless/manifests/") {
            Reply::Endless {
                status: 200,
                headers: vec![(
                    "Content-Type".into(),
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
            }
        } else if p.starts_with("/v2/announced/manifests/") {
            Reply::Announced { length: 10 << 30 }
        } else if p.starts_with("/v2/token/manifests/") {
            Reply::Body {
                status: 401,
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!(r#"Bearer realm="http://127.0.0.1:{port}/endless-token",service="t""#),
                )],
                body: vec![],
            }
        } else if p.starts_with("/endless-token") {
            Reply::Endless {
                status: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
            }
        } else if p.starts_with("/v2/error/manifests/") {
            Reply::Endless {
                status: 404,
                headers: vec![],
            }
        } else if p.starts_with("/v2/config/manifests/") {
            json_reply(
                lying_manifest.clone(),
                "application/vnd.oci.image.manifest.v1+json",
            )
        } else if let Some(d) = p.strip_prefix("/v2/config/blobs/") {
            if lying_blobs.get(d).is_some_and(|b| b.len() > 100) {
                Reply::Endless {
                    status: 200,
                    headers: vec![],
                }
            } else {
                not_found()
            }
        } else {
            not_found()
        }
    }));
    *port_cell.lock().unwrap() = server.port;
    let at = |repo: &str| format!("127.0.0.1:{}/{repo}:latest", server.port);

    // Warm up what every pull sets up once (TLS roots, the runtime's pools), so the peaks
    // below are the pulls' own.
    let _ = pull(&rt, &store, &at("missing"), None);

    refused(
        "endless manifest",
        pull(&rt, &store, &at("endless"), None),
        &["endless/manifests/latest", "larger than 4194304 bytes"],
    );
    refused(
        "a manifest announcing 10 GiB",
        pull(&rt, &store, &at("announced"), None),
        &["announced/manifests/latest", "larger than 4194304 bytes"],
    );
    refused(
        "endless token",
        pull(&rt, &store, &at("token"), Some(("user", "pass"))),
        &["endless-token", "larger than 4194304 bytes"],
    );
    refused(
        "endless error body",
        pull(&rt, &store, &at("error"), None),
        &["error/manifests/latest", "404"],
    );
    refused(
        "endless config",
        pull(&rt, &store, &at("config"), None),
        &["config/blobs/sha256:", "larger than 100 bytes"],
    );
    assert!(store.records(None).unwrap().is_empty());
    let (blobs, _) = store.paths();
    assert_eq!(
        std::fs::read_dir(blobs).unwrap().count(),
        0,
        "a refused pull left blobs"
    );
    assert!(
        server
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with("/endless-token")),
        "the token realm was never asked"
    );
}

#[test]
fn issue16_bearer_tokens_are_fetched_and_used() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("meta.redb")).unwrap());
    let store = ImageStore::open(
        &dir.path().join("images"),
        db,
        Some(switchyard_images::snapshot::Driver::Copy),
    )
    .unwrap();
    let (manifest, blobs) = image(None);
    let port_cell: Arc<Mutex<u16>> = Arc::new(Mutex::new(0));
    let port_of = port_cell.clone();
    // `user:pass`, base64.
    let basic = "Basic dXNlcjpwYXNz";
    let server = serve(Arc::new(move |r: &Request| {
        let port = *port_of.lock().unwrap();
        let p = r.path.as_str();
        if let Some(query) = p.strip_prefix("/token?") {
            let ok = r.headers.get("authorization").map(String::as_str) == Some(basic)
                && query.contains("scope=repository%3Aapp%3Apull")
                && query.contains("service=reg");
            return if ok {
                json_reply(
                    br#"{"token":"t0ken","expires_in":300}"#.to_vec(),
                    "application/json",
                )
            } else {
                Reply::Body {
                    status: 401,
                    headers: vec![],
                    body: vec![],
                }
            };
        }
        if r.headers.get("authorization").map(String::as_str) != Some("Bearer t0ken") {
            return Reply::Body {
                status: 401,
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="reg",scope="repository:app:pull""#
                    ),
                )],
                body: br#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#
                    .to_vec(),
            };
        }
        if p.starts_with("/v2/app/manifests/") {
            json_reply(
                manifest.clone(),
                "application/vnd.oci.image.manifest.v1+json",
            )
        } else if let Some(b) = p.strip_prefix("/v2/app/blobs/").and_then(|d| blobs.get(d)) {
            json_reply(b.clone(), "application/octet-stream")
        } else {
            not_found()
        }
    }));
    *port_cell.lock().unwrap() = server.port;
    let reference = format!("127.0.0.1:{}/app:latest", server.port);
    let p = pull(&rt, &store, &reference, Some(("user", "pass")));
    assert_eq!(
        p.result,
        Ok(reference.clone()),
        "{:?}",
        server.requests.lock().unwrap()
    );
    // Wrong credentials: the token endpoint refuses, and the error says so.
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("meta.redb")).unwrap());
    let store = ImageStore::open(
        &dir.path().join("images"),
        db,
        Some(switchyard_images::snapshot::Driver::Copy),
    )
    .unwrap();
    let p = pull(&rt, &store, &reference, Some(("user", "wrong")));
    let message = p.result.unwrap_err();
    assert!(
        message.contains("/token") && message.contains("401"),
        "{message}"
    );
}
