//! switchyardd's CRI streaming server under bad and many clients (issue 21): a token works
//! once, an unknown one is refused, garbage on an upgraded connection ends that connection
//! only, a client that goes away takes its exec'd process with it, and 50 execs at once into
//! one pod all come back right. Exec's protocols themselves are checked against containerd in
//! `cri.rs` (`exec_streaming`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use switchyard_api::cri::v1 as cri;
use switchyard_tests::cri::{BUSYBOX_IMAGE, CriNode, Peer, container_config, pod_config};
use switchyard_tests::{eventually, free_port, http_get};

/// A pod of `handler` on switchyardd with a busybox container that sleeps.
fn pod(node: &CriNode, handler: &str, name: &str) -> (String, String) {
    let c = node.client();
    let pod_cfg = pod_config(node, name);
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let cfg = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let id = c.run_container(&pod, &cfg, &pod_cfg);
    (pod, id)
}

/// `(host:port, path)` of a streaming URL.
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let slash = rest.find('/').expect("a path");
    (rest[..slash].to_owned(), rest[slash..].to_owned())
}

/// Sends `request_head` (and nothing else) to the URL's server; the answer's status line and
/// the connection, left open.
fn request(url: &str, head: &str) -> (String, TcpStream) {
    let (addr, path) = split_url(url);
    let mut tcp = TcpStream::connect(&addr).expect("connect to the streaming server");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{head}\r\n").unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut byte).expect("read the answer");
        assert!(n > 0, "the server closed before answering: {answer:?}");
        answer.push(byte[0]);
        assert!(answer.len() < 16 << 10, "an answer head of over 16 KiB");
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    (text, tcp)
}

/// A WebSocket handshake by hand to a remotecommand URL, and nothing more: the connection is
/// the session, until the caller drops it (a client that goes away).
fn vanishing_client(url: &str) -> TcpStream {
    let (addr, path) = split_url(url);
    let mut tcp = TcpStream::connect(&addr).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    )
    .unwrap();
    tcp
}

const SPDY_UPGRADE: &str =
    "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n";

#[test]
fn tokens_are_one_time_and_bad_clients_end_only_their_own_session() {
    let Some(node) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    let c = node.client();
    let (pod, id) = pod(&node, "native", "stream-bad");

    // A token works once; a second use and a made-up one are refused before any upgrade.
    let url = c.exec_url(&id, &["echo", "once"], false, false).unwrap();
    let out = c.stream_exec(&url, b"", None);
    assert_eq!(
        (out.stdout.as_str(), out.exit_code),
        ("once\n", 0),
        "{out:?}"
    );
    for bad in [
        url.clone(),
        format!("{}/exec/made-up-token", split_url(&url).0),
    ] {
        let bad = if bad.starts_with("http") {
            bad
        } else {
            format!("http://{bad}")
        };
        let (head, _) = request(&bad, SPDY_UPGRADE);
        assert!(head.starts_with("HTTP/1.1 404"), "{bad}: {head}");
    }
    // A token of one kind does not open another.
    let url = c.exec_url(&id, &["true"], false, false).unwrap();
    let (head, _) = request(&url.replace("/exec/", "/portforward/"), SPDY_UPGRADE);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // A request the transport cannot serve names what it serves.
    let url = c.exec_url(&id, &["true"], false, false).unwrap();
    let (head, _) = request(
        &url,
        "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v1.channel.k8s.io\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // Garbage after the upgrade ends that connection, and only it.
    let url = c.exec_url(&id, &["true"], false, false).unwrap();
    let (head, mut tcp) = request(&url, SPDY_UPGRADE);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A control frame of SPDY version 2.
    tcp.write_all(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 0])
        .unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest)
        .expect("the server closes the connection (read timed out instead)");

    // A client that goes away takes its process with it.
    // An unusual duration marks the process.
    let marker = "314159";
    let url = c.exec_url(&id, &["sleep", marker], false, false).unwrap();
    let ws = vanishing_client(&url);
    assert!(
        eventually(Duration::from_secs(30), || {
            !switchyard_tests::processes_matching(&["sleep", marker]).is_empty()
        }),
        "the exec'd process never ran"
    );
    drop(ws);
    assert!(
        eventually(Duration::from_secs(30), || {
            switchyard_tests::processes_matching(&["sleep", marker]).is_empty()
        }),
        "the exec'd process outlived its client: {:?}",
        switchyard_tests::processes_matching(&["sleep", marker])
    );

    // The daemon still serves.
    let url = c
        .exec_url(&id, &["sh", "-c", "echo still; exit 3"], false, false)
        .unwrap();
    let out = c.stream_exec(&url, b"", None);
    assert_eq!(
        (out.stdout.as_str(), out.exit_code),
        ("still\n", 3),
        "{out:?}"
    );
    // CRI's own checks, before any URL.
    let not = c.exec_url(&id, &["true"], true, false);
    assert!(not.is_ok(), "tty without stderr is fine: {not:?}");
    let mut rs = c.runtime();
    let both = c
        .call(rs.exec(cri::ExecRequest {
            container_id: id.clone(),
            cmd: vec!["true".into()],
            tty: true,
            stderr: true,
            stdout: true,
            ..Default::default()
        }))
        .unwrap_err();
    assert!(both.message().contains("tty and stderr"), "{both:?}");
    let none = c
        .exec_url("no-such-container", &["true"], false, false)
        .unwrap_err();
    assert_eq!(none.code(), tonic::Code::NotFound, "{none:?}");

    c.stop_pod(&pod).unwrap();
    c.remove_pod(&pod).unwrap();
}

#[test]
fn fifty_execs_at_once_into_one_pod_all_come_back_right() {
    let Some(node) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    let c = node.client();
    let (pod, id) = pod(&node, "native", "stream-fifty");
    let urls: Vec<String> = (0..50)
        .map(|i| {
            c.exec_url(
                &id,
                &[
                    "sh",
                    "-c",
                    &format!("echo out-{i}; echo err-{i} >&2; exit {}", i % 7),
                ],
                false,
                false,
            )
            .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        let c = &c;
        let runs: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| s.spawn(move || (i, c.stream_exec(url, b"", None))))
            .collect();
        for r in runs {
            let (i, out) = r.join().unwrap();
            assert_eq!(out.stdout, format!("out-{i}\n"), "{i}: {out:?}");
            assert_eq!(out.stderr, format!("err-{i}\n"), "{i}: {out:?}");
            assert_eq!(out.exit_code, (i % 7) as i32, "{i}: {out:?}");
        }
    });
    c.stop_pod(&pod).unwrap();
    c.remove_pod(&pod).unwrap();
}

/// Attach joins the main process's stdio: input reaches it, its output and exit code come
/// back, on `native`, `runc` and `vm`.
#[test]
fn attach_reaches_the_main_process() {
    let Some(node) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    let c = node.client();
    for handler in ["native", "runc", "vm"] {
        let pod_cfg = pod_config(&node, &format!("attach-{handler}"));
        let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
        let mut cfg = container_config(
            "main",
            BUSYBOX_IMAGE,
            &["sh", "-c", "read x; echo got $x; echo err >&2; exit 6"],
        );
        cfg.stdin = true;
        let id = c.run_container(&pod, &cfg, &pod_cfg);
        let mut rs = c.runtime();
        let url = c
            .call(rs.attach(cri::AttachRequest {
                container_id: id.clone(),
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false,
            }))
            .expect("Attach")
            .url;
        let out = c.stream_exec(&url, b"hello\n", None);
        assert_eq!(out.stdout, "got hello\n", "{handler}: {out:?}");
        assert_eq!(out.stderr, "err\n", "{handler}: {out:?}");
        assert_eq!(out.exit_code, 6, "{handler}: {out:?}");
        c.stop_pod(&pod).unwrap();
        c.remove_pod(&pod).unwrap();
    }
}

/// A `wasm` pod: an instance has no process to join, so Exec's session ends with a failure
/// status (the shim's reason), not a hang, and the daemon serves on; port-forward gets the
/// `wasi:http` function on the pod's loopback, and attach joins an instance's stdio (what it
/// is sent comes back on stdout; stopping the container ends the session with the instance's
/// exit code).
#[test]
fn a_wasm_pod_refuses_exec_and_serves_attach_and_port_forward() {
    let Some(node) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    node.import(switchyard_tests::cri::wasm_images());
    let c = node.client();
    let pod_cfg = pod_config(&node, "stream-wasm");
    let pod = c.run_pod(&pod_cfg, "wasm").expect("RunPodSandbox on wasm");
    let cfg = container_config("func", switchyard_tests::cri::WASM_HTTP_IMAGE, &[]);
    let id = c.run_container(&pod, &cfg, &pod_cfg);
    let url = c.exec_url(&id, &["true"], false, false).unwrap();
    let out = c.stream_exec(&url, b"", None);
    assert_eq!(out.exit_code, -1, "a failure without an exit code: {out:?}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("", ""),
        "{out:?}"
    );

    // Port-forward reaches the function on the pod's loopback.
    let local = free_port();
    let forward = node.port_forward(&pod, "spdy", &[(local, 8080)], "port-forward-wasm.err");
    let mut page = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            page = http_get(local, "/forwarded");
            page.contains("hello from wasm http: GET /forwarded")
        }),
        "no answer from the wasm function through the forward: {page:?}; port-forward said: {}",
        forward.said()
    );

    let mut cfg = container_config(
        "echo",
        switchyard_tests::cri::WASM_HELLO_IMAGE,
        &["/hello.wasm", "--stdin"],
    );
    cfg.stdin = true;
    let id = c.run_container(&pod, &cfg, &pod_cfg);
    let mut rs = c.runtime();
    let url = c
        .call(rs.attach(cri::AttachRequest {
            container_id: id.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        }))
        .expect("Attach")
        .url;
    let log = node
        .pod_log_dir(&pod_cfg.metadata.as_ref().unwrap().uid)
        .join("echo.log");
    let out = std::thread::scope(|s| {
        // The instance copies stdin until its end, which attach never sends: once the echo is
        // in the log, stopping the container ends the session.
        s.spawn(|| {
            let echoed = || {
                switchyard_tests::cri::read_cri_log(&log)
                    .contains(&("stdout".into(), "sent through attach".into()))
            };
            assert!(
                eventually(Duration::from_secs(60), echoed),
                "the instance never echoed: {:?}",
                std::fs::read_to_string(&log)
            );
            node.client().stop_container(&id, 0).expect("StopContainer");
        });
        c.stream_exec(&url, b"sent through attach\n", None)
    });
    assert!(
        out.stdout.contains("sent through attach\n"),
        "attach's stdout: {out:?}"
    );
    assert_eq!(out.exit_code, 137, "killed by StopContainer: {out:?}");
    c.stop_pod(&pod).unwrap();
    c.remove_pod(&pod).unwrap();
}

/// Port-forward into a `vm` pod reaches the guest's loopback through the agent. A client that
/// goes away mid-connection leaves no connection in the guest (and an exec client that goes
/// away, no process), even to a server that never
/// closes its side (`nc -ll -e`: a shell writing a line a second and never reading): the
/// guest connection must be closed, not only half-closed, for the server's socket to go (its
/// next write is then reset). Read from the guest's `/proc/net/tcp`, which the pod's
/// containers share. The daemon forwards again after.
#[test]
fn vanished_clients_leave_no_connection_or_process_in_the_vm() {
    let Some(node) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    let c = node.client();
    let pod_cfg = pod_config(&node, "forward-vm");
    let pod = c.run_pod(&pod_cfg, "vm").expect("RunPodSandbox");
    let cfg = container_config(
        "ticker",
        BUSYBOX_IMAGE,
        &[
            "busybox",
            "nc",
            "-ll",
            "-p",
            "9090",
            "-e",
            "sh",
            "-c",
            "while echo tick; do sleep 1; done",
        ],
    );
    let id = c.run_container(&pod, &cfg, &pod_cfg);
    // The server's connections: sockets on local port 9090 (0x2382) other than the listener
    // (state 0A), over IPv4 or IPv6 (busybox listens on `::` where the guest has IPv6).
    let served = || -> usize {
        let out = c
            .exec_sync(&id, &["cat", "/proc/net/tcp", "/proc/net/tcp6"], 60)
            .expect("ExecSync cat /proc/net/tcp");
        out.stdout
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(":2382") && f[3] != "0A"
            })
            .count()
    };
    let forward =
        |local: u16| node.port_forward(&pod, "websocket", &[(local, 9090)], "port-forward-vm.err");
    let said =
        || std::fs::read_to_string(node.dir.path().join("port-forward-vm.err")).unwrap_or_default();
    // The first line from the server through a forward at `local` (the connection kept).
    let tick = |local: u16| -> Option<TcpStream> {
        let mut s = TcpStream::connect(("127.0.0.1", local)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        let mut line = [0u8; 5];
        s.read_exact(&mut line).ok()?;
        (&line == b"tick\n").then_some(s)
    };
    let local = free_port();
    let client = forward(local);
    let mut held = None;
    assert!(
        eventually(Duration::from_secs(60), || {
            held = tick(local);
            held.is_some()
        }),
        "no line from the server through the forward; port-forward said: {}",
        said()
    );
    assert!(served() > 0, "the held connection is not in the guest");
    drop(client);
    let mut left = usize::MAX;
    assert!(
        eventually(Duration::from_secs(30), || {
            left = served();
            left == 0
        }),
        "{left} connections of the server still in the guest after the client went away"
    );
    drop(held);
    // The daemon forwards again.
    let local = free_port();
    let _client = forward(local);
    assert!(
        eventually(Duration::from_secs(60), || tick(local).is_some()),
        "no line through a new forward; port-forward said: {}",
        said()
    );
    // An exec whose client goes away is killed in the guest too.
    let marker = "271828";
    let url = c.exec_url(&id, &["sleep", marker], false, false).unwrap();
    let sleeping = || {
        let ps = c
            .exec_sync(&id, &["busybox", "ps", "-o", "args"], 60)
            .expect("ExecSync ps");
        ps.stdout
            .lines()
            .any(|l| l.trim() == format!("sleep {marker}"))
    };
    let ws = vanishing_client(&url);
    assert!(
        eventually(Duration::from_secs(60), sleeping),
        "the exec'd process never ran in the guest"
    );
    drop(ws);
    assert!(
        eventually(Duration::from_secs(30), || !sleeping()),
        "the exec'd process outlived its client in the guest"
    );
    c.stop_pod(&pod).unwrap();
    c.remove_pod(&pod).unwrap();
}

/// With `[cri] stream_tls_cert` and `stream_tls_key` the URLs are `https://`, and the client
/// verifies the server: trusting the test's CA, a streaming exec (`-i`; without it `yard`
/// uses ExecSync) works over both transports; trusting only the system's roots, the handshake
/// is refused and nothing runs.
#[test]
fn a_tls_streaming_server_is_verified_and_serves() {
    if CriNode::require(Peer::Switchyardd).is_none()
        || !switchyard_tests::require(
            switchyard_tests::which("openssl").is_some(),
            "openssl makes the test's certificates",
        )
    {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = switchyard_tests::test_certificates(certs.path());
    let node = CriNode::start_switchyardd_with(&format!(
        "stream_tls_cert = \"{}\"\nstream_tls_key = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let (pod_id, id) = pod(&node, "native", "tls");
    let c = node.client();
    let url = c.exec_url(&id, &["true"], false, false).unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    for transport in ["spdy", "websocket"] {
        let out = node
            .yard_cri()
            .args(["exec", "-i", "--transport", transport, "--stream-ca"])
            .arg(&ca)
            .args([&id, "--", "sh", "-c", "echo over tls; exit 3"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{transport}: {}",
            switchyard_tests::show(&out)
        );
        assert_eq!(
            switchyard_tests::text(&out.stdout),
            "over tls\n",
            "{transport}"
        );
    }
    let out = node
        .yard_cri()
        .args(["exec", "-i", &id, "--", "sh", "-c", "echo ran"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = switchyard_tests::show(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        !switchyard_tests::text(&out.stdout).contains("ran"),
        "{shown}"
    );
    assert!(
        switchyard_tests::text(&out.stderr).contains("certificate"),
        "a refused certificate is named: {shown}"
    );
    c.stop_pod(&pod_id).unwrap();
    c.remove_pod(&pod_id).unwrap();
}
