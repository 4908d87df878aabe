//! The client side of CRI streaming (issue 21): `yard cri exec -i`, `exec -it`, `attach -i`
//! and `port-forward`, over SPDY/3.1 and WebSocket, against containerd's own streaming server
//! (Kubernetes' Go implementation, the oracle) with the `runc` handler and a busybox pod, then
//! against switchyardd's with `runc`, `native` and `vm` pods.
//! Stdin is piped, or a pseudo-terminal the test owns (`switchyard_tests::pty`) whose size
//! the test sets and changes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::Duration;

use switchyard_api::cri::v1 as cri;
use switchyard_tests::cri::{BUSYBOX_IMAGE, CriNode, Peer, container_config, pod_config};
use switchyard_tests::pty::PtyChild;
use switchyard_tests::{eventually, free_port, http_get, run_with_stdin, show, text};

const T: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Spdy,
    Websocket,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Spdy => "spdy",
            Transport::Websocket => "websocket",
        }
    }
}

/// Whether stdin can reach EOF: over SPDY, and over WebSocket only with
/// `v5.channel.k8s.io`, which none of containerd 1.6, 1.7 and 2.1 chooses (all answer v4).
fn closes_stdin(transport: Transport) -> bool {
    transport == Transport::Spdy
}

struct Pod<'a> {
    node: &'a CriNode,
    c: switchyard_tests::cri::Cri,
    cfg: cri::PodSandboxConfig,
    id: String,
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        let _ = self.c.stop_pod(&self.id);
        let _ = self.c.remove_pod(&self.id);
    }
}

impl Pod<'_> {
    fn run(&self, cfg: &cri::ContainerConfig) -> String {
        self.c.run_container(&self.id, cfg, &self.cfg)
    }
}

fn pod<'a>(node: &'a CriNode, handler: &str) -> Pod<'a> {
    let c = node.client();
    let cfg = pod_config(node, &format!("stream-{handler}"));
    let id = c.run_pod(&cfg, handler).expect("RunPodSandbox");
    Pod { node, c, cfg, id }
}

/// Exec with stdin piped: the output streams apart, stdin to its EOF (where the transport can
/// close it), and the exit code.
fn exec_stdin(p: &Pod, ctr: &str, t: Transport) {
    let script = if closes_stdin(t) {
        "cat; echo err >&2; exit 3"
    } else {
        "head -n 2; echo err >&2; exit 3"
    };
    let out = run_with_stdin(
        p.node
            .yard_cri()
            .args(["exec", "-i", "--transport", t.name(), ctr, "--"])
            .args(["sh", "-c", script]),
        b"one\ntwo\n".to_vec(),
    );
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(text(&out.stdout), "one\ntwo\n", "{}", show(&out));
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out));

    // Megabytes each way: stdin counted in the container, and its output back.
    let big = 4 << 20;
    let script = if closes_stdin(t) {
        "wc -c; seq 1 300000".to_owned()
    } else {
        format!("head -c {big} | wc -c; seq 1 300000")
    };
    let out = run_with_stdin(
        p.node
            .yard_cri()
            .args(["exec", "-i", "--transport", t.name(), ctr, "--"])
            .args(["sh", "-c", &script]),
        vec![b'x'; big],
    );
    assert!(out.status.success(), "{}", show(&out));
    let seq: String = (1..=300_000).map(|n| format!("{n}\n")).collect();
    assert!(
        text(&out.stdout) == format!("{big}\n{seq}"),
        "{} bytes of output, not the count and {} bytes",
        out.stdout.len(),
        seq.len()
    );

    // A command that is not there: the server's message, and a failure.
    let out = run_with_stdin(
        p.node
            .yard_cri()
            .args(["exec", "-i", "--transport", t.name(), ctr, "--"])
            .arg("/no/such/command"),
        Vec::new(),
    );
    assert!(!out.status.success(), "{}", show(&out));
}

/// Exec with a terminal, on the test's pseudo-terminal: the remote side has a terminal of the
/// local size, a resize reaches it, the exit code comes back, and the local terminal is
/// cooked again afterwards.
fn exec_tty(p: &Pod, ctr: &str, t: Transport) {
    let mut yard = p.node.yard_cri();
    yard.args(["exec", "-t", "--transport", t.name(), ctr, "--"])
        .args(["sh", "-c", "tty; exit 5"]);
    let mut pty = PtyChild::spawn(&mut yard, (91, 37));
    let (status, out) = pty.wait(T);
    assert_eq!(status.code(), Some(5), "{out:?}");
    // Kubernetes' WebSocket server (containerd 1.6, 1.7 and 2.1 alike) sends a short terminal
    // command's status without its output (its messages: the stdout channel opened, then the
    // status), so the output is checked over SPDY; the interactive session below sees the
    // terminal over both.
    if t == Transport::Spdy {
        assert!(out.contains("/dev/pts/"), "not a terminal: {out:?}");
    }

    let mut yard = p.node.yard_cri();
    yard.args(["exec", "-i", "-t", "--transport", t.name(), ctr, "--", "sh"]);
    let mut pty = PtyChild::spawn(&mut yard, (91, 37));
    // The size is sent once the session is up: ask until the shell reports it.
    let sized = |pty: &mut PtyChild, want: &str| {
        let mut polls = 0u32;
        eventually(Duration::from_secs(30), || {
            // Asked again now and then, not at every poll: the shell runs each one.
            if polls.is_multiple_of(20) {
                pty.write(b"stty size\n");
            }
            polls += 1;
            // The shell echoes the command; its answer is a line of its own.
            pty.output().lines().any(|l| l.trim() == want)
        })
    };
    assert!(sized(&mut pty, "37 91"), "{:?}", pty.output());
    assert!(!pty.is_cooked(), "the local terminal is not in raw mode");
    pty.resize(120, 50);
    assert!(sized(&mut pty, "50 120"), "{:?}", pty.output());
    pty.write(b"exit 6\n");
    let (status, out) = pty.wait(T);
    assert_eq!(status.code(), Some(6), "{out:?}");
    assert!(pty.is_cooked(), "the local terminal was left in raw mode");

    // Stopped by SIGTERM in the middle of a session: the terminal is restored all the same.
    let mut pty = PtyChild::spawn(&mut yard, (91, 37));
    assert!(sized(&mut pty, "37 91"), "{:?}", pty.output());
    pty.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, out) = pty.wait(T);
    assert_eq!(status.code(), Some(1), "{out:?}");
    assert!(out.contains("stopped by a signal"), "{out:?}");
    assert!(
        pty.is_cooked(),
        "SIGTERM left the local terminal in raw mode"
    );
}

/// Attach with stdin to a container whose main process reads lines. Made with `stdin_once`,
/// its stdin ends with the session's input where the transport can end it (then it says so),
/// as containerd does for `kubectl run -i --rm`.
fn attach(p: &Pod, t: Transport) {
    let (script, expected) = if closes_stdin(t) {
        (
            "while read x; do echo got $x; done; echo stdin closed",
            "got hello\nstdin closed\n",
        )
    } else {
        ("read x; echo got $x", "got hello\n")
    };
    let mut cfg = container_config(
        &format!("attach-{}", t.name()),
        BUSYBOX_IMAGE,
        &["sh", "-c", script],
    );
    cfg.stdin = true;
    cfg.stdin_once = true;
    let ctr = p.run(&cfg);
    let out = run_with_stdin(
        p.node
            .yard_cri()
            .args(["attach", "-i", "--transport", t.name(), &ctr]),
        b"hello\n".to_vec(),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(text(&out.stdout), expected, "{}", show(&out));
}

/// Port-forward to busybox httpd in the pod: connections to the loopback port get its page,
/// several in a row through one command.
fn port_forward(p: &Pod, t: Transport) {
    let page = format!("forwarded over {}", t.name());
    let script = format!(
        "mkdir -p /www && echo '{page}' > /www/index.html && seq 1 300000 > /www/big && \
         exec httpd -f -p 8080 -h /www"
    );
    let cfg = container_config(
        &format!("httpd-{}", t.name()),
        BUSYBOX_IMAGE,
        &["sh", "-c", &script],
    );
    p.run(&cfg);
    let local = free_port();
    // A second pair to a port nothing in the pod listens on: its connections fail with the
    // server's message, and the forward goes on.
    let closed = free_port();
    let mut forward = p.node.port_forward(
        &p.id,
        t.name(),
        &[(local, 8080), (closed, 9)],
        &format!("port-forward-{}.err", t.name()),
    );
    let get = |port: u16| http_get(port, "/");
    // Until the listener is up and httpd listens.
    let mut last = String::new();
    let served = eventually(Duration::from_secs(60), || {
        last = get(local);
        last.contains(&page)
    });
    assert!(served, "no page through the forward: {last:?}");
    assert_eq!(get(closed), "", "port 9 answered");
    assert!(
        eventually(Duration::from_secs(30), || forward
            .said()
            .contains("error: forwarding to port 9: ")),
        "no error for port 9: {:?}",
        forward.said()
    );
    for _ in 0..3 {
        let again = get(local);
        assert!(
            again.contains("200 OK") && again.contains(&page),
            "{again:?}; port-forward said: {}",
            forward.said()
        );
    }
    // Megabytes back through the forward, whole.
    let seq: String = (1..=300_000).map(|n| format!("{n}\n")).collect();
    let big = http_get(local, "/big");
    let (head, body) = big.split_once("\r\n\r\n").unwrap_or_default();
    assert!(
        head.contains(" 200 OK") && body == seq,
        "{head:?} and {} bytes, not the {} of /big",
        body.len(),
        seq.len()
    );
    assert!(
        forward.running(),
        "port-forward exited early: {}",
        forward.said()
    );
}

/// Every client command through `peer`'s streaming server into a `handler` pod.
fn streaming(peer: Peer, handler: &str, t: Transport) {
    let Some(node) = CriNode::require(peer) else {
        return;
    };
    let p = pod(&node, handler);
    let ctr = p.run(&container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]));
    exec_stdin(&p, &ctr, t);
    exec_tty(&p, &ctr, t);
    attach(&p, t);
    port_forward(&p, t);
}

#[test]
fn containerd_1_7_spdy() {
    streaming(Peer::V1_7, "runc", Transport::Spdy);
}

#[test]
fn containerd_1_7_websocket() {
    streaming(Peer::V1_7, "runc", Transport::Websocket);
}

#[test]
fn containerd_1_6_spdy() {
    streaming(Peer::V1_6, "runc", Transport::Spdy);
}

#[test]
fn containerd_1_6_websocket() {
    streaming(Peer::V1_6, "runc", Transport::Websocket);
}

#[test]
fn containerd_2_1_spdy() {
    streaming(Peer::V2_1, "runc", Transport::Spdy);
}

#[test]
fn containerd_2_1_websocket() {
    streaming(Peer::V2_1, "runc", Transport::Websocket);
}

#[test]
fn switchyardd_spdy() {
    streaming(Peer::Switchyardd, "runc", Transport::Spdy);
}

#[test]
fn switchyardd_websocket() {
    streaming(Peer::Switchyardd, "runc", Transport::Websocket);
}

/// A `native` pod: exec through the kit's exec, port-forward inside the pod's netns.
#[test]
fn switchyardd_native_spdy() {
    streaming(Peer::Switchyardd, "native", Transport::Spdy);
}

/// A `vm` pod: exec and attach through the guest agent (a pty in the guest), port-forward to
/// the guest's loopback through the vm shim's socket and the agent.
#[test]
fn switchyardd_vm_spdy() {
    streaming(Peer::Switchyardd, "vm", Transport::Spdy);
}

#[test]
fn switchyardd_vm_websocket() {
    streaming(Peer::Switchyardd, "vm", Transport::Websocket);
}
