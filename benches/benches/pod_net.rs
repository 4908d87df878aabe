//! Pod-to-pod networking per runtime (issue 20), through switchyardd's CRI on one CNI bridge, in
//! one run: a client in a `native` pod's network namespace (this process joins it, so the
//! client is as close to the pod's own as a process can be) against servers in a `native`, a
//! `vm` (QEMU here: TCG) and a `wasm` pod:
//!
//! 1. request latency: sequential `GET /` of a small page (busybox `httpd` in the native and vm
//!    pods, the `wasi:http` test component in the wasm pod), connect to close; medians, p10/p90
//!    and requests per second, interleaved by round;
//! 2. TCP throughput: a 32 MiB file from busybox `httpd`, native and vm pods, MB/s and the ratio
//!    of the vm pod to the native one (the design target, on hardware KVM: >= 0.8).
//!
//! Run: `cargo bench -p switchyard-benches --bench pod_net` (root; release binaries; Debian's
//! containernetworking-plugins; the guest kernel and initramfs from `scripts/guest`).
//! `RUNS=N` sets the latency samples per server (default 200), `TP_RUNS=N` the throughput ones
//! (default 5).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use switchyard_benches::{Stats, env_usize, ms, row};
use switchyard_tests::cri::{
    BUSYBOX_IMAGE, Cri, CriNode, Peer, WASM_HTTP_IMAGE, container_config, pod_config, wasm_images,
};

/// The bytes of the throughput file.
const BIG: usize = 32 << 20;

struct Server {
    label: &'static str,
    addr: SocketAddr,
    /// Serves `/big` (busybox httpd): has a throughput row.
    big: bool,
    latency: Vec<Duration>,
    throughput: Vec<Duration>,
}

fn pod_ip(c: &Cri, pod: &str) -> String {
    c.pod_status(pod)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default()
}

/// A pod of `handler` serving on 8080: busybox `httpd` with a page and the 32 MiB file, or the
/// Wasm HTTP component.
fn server(node: &CriNode, c: &Cri, handler: &str) -> String {
    let pod_cfg = pod_config(node, &format!("bench-net-{handler}"));
    let pod = c.run_pod(&pod_cfg, handler).expect("RunPodSandbox");
    let cfg = if handler == "wasm" {
        container_config("func", WASM_HTTP_IMAGE, &[])
    } else {
        let script = format!(
            "mkdir -p /www && echo hello > /www/index.html && head -c {BIG} /dev/zero > /www/big \
             && exec httpd -f -p 8080 -h /www"
        );
        container_config("httpd", BUSYBOX_IMAGE, &["sh", "-c", &script])
    };
    let id = c
        .create_container(&pod, &cfg, &pod_cfg)
        .expect("CreateContainer");
    c.start_container(&id).expect("StartContainer");
    pod
}

/// `GET path` to `addr`, read to the close: the time and the bytes, or `None` on an error.
fn get(addr: SocketAddr, path: &str) -> Option<(Duration, usize)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    Some((t.elapsed(), got))
}

fn main() {
    let Some(node) = CriNode::require(Peer::Switchyardd) else {
        return;
    };
    node.import(wasm_images());
    let c = node.client();
    let runs = env_usize("RUNS", 200).max(1);
    let tp_runs = env_usize("TP_RUNS", 5).max(1);

    let client_cfg = pod_config(&node, "bench-net-client");
    let client = c.run_pod(&client_cfg, "native").expect("client pod");
    let client_ns = std::path::PathBuf::from(c.pod_netns(&client).expect("the client pod's netns"));

    let mut servers = Vec::new();
    let mut pods = vec![client.clone()];
    for (label, handler, big) in [
        ("native pod (busybox httpd)", "native", true),
        ("vm pod, QEMU TCG (busybox httpd)", "vm", true),
        ("wasm pod (wasi:http component)", "wasm", false),
    ] {
        let pod = server(&node, &c, handler);
        let ip = pod_ip(&c, &pod);
        pods.push(pod);
        servers.push(Server {
            label,
            addr: format!("{ip}:8080").parse().expect("pod ip"),
            big,
            latency: Vec::new(),
            throughput: Vec::new(),
        });
    }

    let (dir, name) = (
        client_ns.parent().unwrap().to_owned(),
        client_ns
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    );
    let ns = switchyard_cni::Netns::at(&dir, &name).expect("client netns");
    let servers = ns
        .run_in(move || {
            let mut servers = servers;
            for s in &servers {
                let path = if s.big { "/index.html" } else { "/" };
                let up = switchyard_tests::eventually(Duration::from_secs(60), || {
                    get(s.addr, path).is_some_and(|(_, n)| n > 0)
                });
                assert!(up, "{} at {} never answered", s.label, s.addr);
            }
            // Interleaved by round: every server gets the same machine state.
            for _ in 0..runs {
                for s in servers.iter_mut() {
                    let path = if s.big { "/index.html" } else { "/" };
                    let (t, _) = get(s.addr, path).expect("GET");
                    s.latency.push(t);
                }
            }
            for _ in 0..tp_runs {
                for s in servers.iter_mut().filter(|s| s.big) {
                    let (t, n) = get(s.addr, "/big").expect("GET /big");
                    assert!(n >= BIG, "{}: {n} bytes", s.label);
                    s.throughput.push(t);
                }
            }
            servers
        })
        .expect("join the client pod's netns");

    println!();
    println!(
        "Pod to pod through switchyardd's CRI, one CNI bridge; the client in a native pod's \
         network namespace; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "1. request latency: GET of a small page, connect to close ({runs} per server, interleaved)"
    );
    let native_lat = Stats::of(&servers[0].latency);
    for s in &servers {
        let st = Stats::of(&s.latency);
        let mean = s.latency.iter().sum::<Duration>().as_secs_f64() / s.latency.len() as f64;
        row(s.label, &st);
        println!(
            "  {:<34} {:.0} requests/s sequential; median {:.2}x the native pod's",
            "",
            1.0 / mean,
            st.median.as_secs_f64() / native_lat.median.as_secs_f64()
        );
    }
    println!(
        "2. TCP throughput: GET of a {} MiB file ({tp_runs} per server)",
        BIG >> 20
    );
    let mbps = |d: Duration| BIG as f64 / d.as_secs_f64() / 1e6;
    let native_tp = Stats::of(&servers[0].throughput);
    for s in servers.iter().filter(|s| s.big) {
        let st = Stats::of(&s.throughput);
        println!(
            "  {:<34} median {:>10} = {:>7.1} MB/s   ({:.2}x the native pod's)",
            s.label,
            ms(st.median),
            mbps(st.median),
            native_tp.median.as_secs_f64() / st.median.as_secs_f64()
        );
    }
    println!("notes");
    println!(
        "  - the vm pod runs under QEMU TCG here (this host's KVM cannot boot a stock guest): every \
         guest instruction, virtio-net included, is emulated; the design target, a vm pod >= 0.8x \
         a native pod's throughput, is for hardware KVM (QEMU with KVM, or the built-in VMM)"
    );
    for pod in pods {
        let _ = c.stop_pod(&pod);
        let _ = c.remove_pod(&pod);
    }
}
