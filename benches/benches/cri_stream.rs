//! The CRI streaming path (issue 21), through switchyardd (`runc` and `native` pods) and
//! through containerd 1.7's CRI plugin with runc (the baseline, Kubernetes' own streaming
//! server), with the same clients, image and CNI bridge config, interleaved in one run:
//!
//! 1. an exec of `true`, end to end as kubelet drives it (CRI Exec for the URL, the WebSocket
//!    upgrade, remotecommand v4, the exit status). Medians, p10/p90 and the ratio to
//!    containerd (target <= 0.5);
//! 2. port-forward throughput: 100 MiB from busybox `httpd` in the pod through
//!    `yard cri port-forward` (SPDY) to a loopback client, MB/s per sample and the ratio.
//!
//! Run: `cargo bench -p switchyard-benches --bench cri_stream` (root; release binaries;
//! containerd 1.7 from `scripts/peers`; Debian's containernetworking-plugins). The exec is also
//! timed through ExecSync, so what the streaming session adds is printed. `RUNS=N` sets
//! the exec samples per row (default 30), `PF_RUNS=N` the port-forward ones (default 5).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use switchyard_benches::{Stats, env_usize, row};
use switchyard_tests::cri::{BUSYBOX_IMAGE, Cri, CriNode, Peer, container_config, pod_config};
use switchyard_tests::free_port;

struct Side<'a> {
    label: &'static str,
    node: &'a CriNode,
    cri: &'a Cri,
    pod: String,
    pod_cfg: switchyard_api::cri::v1::PodSandboxConfig,
    container: String,
    samples: Vec<Duration>,
}

/// The bytes port-forward carries per sample.
const BIG: usize = 100 << 20;

fn running(
    node: &CriNode,
    cri: &Cri,
    handler: &str,
) -> (String, switchyard_api::cri::v1::PodSandboxConfig, String) {
    let pod_cfg = pod_config(node, &format!("bench-stream-{handler}"));
    let pod = cri.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let cfg = container_config("main", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let id = cri.run_container(&pod, &cfg, &pod_cfg);
    (pod, pod_cfg, id)
}

/// GET of the 100 MiB file through the forward at `port`: the time to the last byte, or
/// `None` while the forward or the server is not up yet.
fn fetch(port: u16) -> Option<Duration> {
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    (got >= BIG).then(|| t.elapsed())
}

/// Port-forward samples of one side: httpd with a 100 MiB file in its pod, `yard cri
/// port-forward` to it, `runs` GETs.
fn port_forward(side: &Side, runs: usize) -> Vec<Duration> {
    let script = format!(
        "mkdir -p /www && head -c {BIG} /dev/zero > /www/big && exec httpd -f -p 8080 -h /www"
    );
    let cfg = container_config("httpd", BUSYBOX_IMAGE, &["sh", "-c", &script]);
    side.cri.run_container(&side.pod, &cfg, &side.pod_cfg);
    let local = free_port();
    // Refused connections while httpd writes its file are expected in its log.
    let _forward = side.node.port_forward(
        &side.pod,
        "spdy",
        &[(local, 8080)],
        "port-forward-bench.err",
    );
    assert!(
        switchyard_tests::eventually(Duration::from_secs(120), || fetch(local).is_some()),
        "{}: no 100 MiB through the forward",
        side.label
    );
    (0..runs)
        .map(|_| fetch(local).expect("a GET through the forward"))
        .collect()
}

/// One exec of `true`: CRI Exec, then the session to its status.
fn exec_true(cri: &Cri, container: &str) -> Duration {
    let t = Instant::now();
    let url = cri
        .exec_url(container, &["true"], false, false)
        .expect("Exec");
    let out = cri.stream_exec(&url, b"", None);
    let took = t.elapsed();
    assert_eq!(out.exit_code, 0, "{out:?}");
    took
}

fn main() {
    let Some(ctd) = CriNode::require(Peer::V1_7) else {
        return;
    };
    let Some(sy) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    let runs = env_usize("RUNS", 30);
    let pf_runs = env_usize("PF_RUNS", 5);
    let (ctd_cri, sy_cri) = (ctd.client(), sy.client());
    let side = |label, node, cri, handler| {
        let (pod, pod_cfg, container) = running(node, cri, handler);
        Side {
            label,
            node,
            cri,
            pod,
            pod_cfg,
            container,
            samples: Vec::new(),
        }
    };
    let mut sides = [
        side("containerd 1.7 CRI, runc", &ctd, &ctd_cri, "runc"),
        side("switchyardd CRI, runc", &sy, &sy_cri, "runc"),
        side("switchyardd CRI, native", &sy, &sy_cri, "native"),
    ];
    // Warm-up: the first exec of each side pays its one-time costs.
    for s in &sides {
        exec_true(s.cri, &s.container);
    }
    for _ in 0..runs {
        for s in sides.iter_mut() {
            let took = exec_true(s.cri, &s.container);
            s.samples.push(took);
        }
    }
    println!(
        "exec of `true` through the CRI streaming server (Exec + WebSocket v4 session), interleaved:"
    );
    let base = Stats::of(&sides[0].samples).median;
    for s in &sides {
        let st = Stats::of(&s.samples);
        row(s.label, &st);
        println!(
            "  {:<34} ratio to containerd + runc: {:.2}",
            "",
            st.median.as_secs_f64() / base.as_secs_f64()
        );
    }

    // The same exec through ExecSync (one gRPC call, no streaming session): what the streaming
    // layer adds is the difference.
    println!("\nthe same exec through ExecSync (no streaming session), interleaved:");
    let mut sync: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    for _ in 0..runs {
        for (s, samples) in sides.iter().zip(sync.iter_mut()) {
            let t = Instant::now();
            let out = s
                .cri
                .exec_sync(&s.container, &["true"], 10)
                .expect("ExecSync");
            samples.push(t.elapsed());
            assert_eq!(out.exit_code, 0, "{out:?}");
        }
    }
    for (s, samples) in sides.iter().zip(&sync) {
        let st = Stats::of(samples);
        row(s.label, &st);
        let streamed = Stats::of(&s.samples).median;
        println!(
            "  {:<34} the streaming session adds {:.1} ms",
            "",
            (streamed.as_secs_f64() - st.median.as_secs_f64()) * 1e3
        );
    }

    println!(
        "\nport-forward: 100 MiB from httpd in the pod through `yard cri port-forward` (SPDY):"
    );
    let mut base = None;
    for s in &sides {
        let st = Stats::of(&port_forward(s, pf_runs));
        let mbps = BIG as f64 / 1e6 / st.median.as_secs_f64();
        let base = *base.get_or_insert(mbps);
        row(s.label, &st);
        println!(
            "  {:<34} {mbps:.0} MB/s, ratio to containerd + runc: {:.2}",
            "",
            mbps / base
        );
    }
    for s in &sides {
        let _ = s.cri.stop_pod(&s.pod);
        let _ = s.cri.remove_pod(&s.pod);
    }
}
