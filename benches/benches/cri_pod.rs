//! Pod start and teardown through Kubernetes' CRI (issue 19): switchyardd's `native` handler
//! against containerd 1.7's CRI plugin with runc (and, for reference, containerd 1.7 with our
//! `native` shim as its handler), with the same client ([`Cri`]), the same CNI bridge config
//! ([`TestNet`]: one per daemon, identical but for the bridge name and subnet) and the same
//! busybox image, interleaved in one run; each daemon's RSS with idle pods; and a `vm` pod
//! start next to a plain QEMU boot of the same kernel.
//!
//! One sample: RunPodSandbox + CreateContainer + StartContainer of busybox `sleep 3600` until
//! ContainerStatus says RUNNING (pod start), then StopPodSandbox + RemovePodSandbox, which stop
//! and remove the pod's container with it on both daemons (teardown; checked after each
//! sample, untimed).
//!
//! Run: `cargo bench -p switchyard-benches --bench cri_pod` (root; release binaries built with
//! `scripts/build --release`; containerd 1.7 from `scripts/peers`, Debian's
//! containernetworking-plugins in /usr/lib/cni, iptables; the guest from `scripts/guest` and
//! `qemu-system-x86_64` for the vm part). `RUNS=N` sets the samples of the native rows
//! (default 20), `PODS=N` the idle pods of the memory part (default 20), `VM=0` skips the vm
//! part, `VM_RUNS=N` sets its samples (default 5).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use switchyard_api::cri::v1 as cri;
use switchyard_benches::plain_qemu::{STOCK_KERNEL_ARGS, plain_boot, trivial_initrd};
use switchyard_benches::{Stats, env_usize, mib, row, version};
use switchyard_tests::cri::{
    BUSYBOX_IMAGE, Cri, CriNode, Peer, TestNet, container_config, test_images,
};
use switchyard_tests::daemon::rss_kib;
use switchyard_tests::{
    Daemon, cgroups_matching, guest_kernel_and_initrd, kill_cgroup_tree, processes_matching,
    require, unique_id, which,
};

/// The deadline of one pod start (a vm pod under TCG included).
const TIMEOUT: Duration = Duration::from_secs(180);

/// Where one series of pods goes: a daemon's CRI and a handler.
struct Side<'a> {
    label: String,
    cri: &'a Cri,
    handler: &'static str,
    /// The daemon's socket: its shims carry it as `-address`.
    socket: PathBuf,
    daemon_pid: u32,
    /// Pod log directories go under it.
    logs: PathBuf,
    /// Every pod's cgroup parent goes under it (cgroupfs).
    cgroup_parent: String,
}

impl<'a> Side<'a> {
    /// The same daemon with another handler.
    fn with_handler(&self, label: &str, handler: &'static str) -> Side<'a> {
        Side {
            label: label.to_owned(),
            cri: self.cri,
            handler,
            socket: self.socket.clone(),
            daemon_pid: self.daemon_pid,
            logs: self.logs.join(handler),
            cgroup_parent: self.cgroup_parent.clone(),
        }
    }
}

/// A running pod with its one container.
struct Pod {
    id: String,
    container: String,
}

/// A pod config as crictl's defaults make one, with its own log directory and a cgroup
/// parent under the side's.
fn pod_config(side: &Side, name: &str) -> cri::PodSandboxConfig {
    let uid = unique_id("uid");
    let log_dir = side.logs.join(&uid);
    std::fs::create_dir_all(&log_dir).expect("pod log dir");
    let mut cfg = switchyard_api::cri_defaults::pod_config(
        cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.clone(),
            namespace: "default".to_owned(),
            attempt: 0,
        },
        name,
        &log_dir.display().to_string(),
    );
    if let Some(linux) = cfg.linux.as_mut() {
        linux.cgroup_parent = format!("{}/pod{uid}", side.cgroup_parent);
    }
    cfg
}

/// Polls ContainerStatus until the container runs; an error if it ends or the deadline passes.
fn wait_running(c: &Cri, id: &str, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let st = c
            .container_status(id)
            .map_err(|e| format!("ContainerStatus: {}", e.message()))?;
        if st.state == cri::ContainerState::ContainerRunning as i32 {
            return Ok(());
        }
        if st.state == cri::ContainerState::ContainerExited as i32 {
            return Err(format!("container exited: {} {}", st.reason, st.message));
        }
        if Instant::now() > deadline {
            return Err(format!("not running after {within:?}: {st:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// StopPodSandbox + RemovePodSandbox.
fn teardown(side: &Side, pod: &str) -> Result<(), String> {
    side.cri
        .stop_pod(pod)
        .map_err(|e| format!("StopPodSandbox: {}", e.message()))?;
    side.cri
        .remove_pod(pod)
        .map_err(|e| format!("RemovePodSandbox: {}", e.message()))
}

/// RunPodSandbox + CreateContainer + StartContainer of busybox `sleep 3600`, until it runs.
/// On an error the pod is torn down.
fn start_pod(side: &Side) -> Result<Pod, String> {
    let cfg = pod_config(side, "bench");
    let id = side
        .cri
        .run_pod(&cfg, side.handler)
        .map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
    let ctr = container_config("sleep", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let container = side
        .cri
        .create_container(&id, &ctr, &cfg)
        .map_err(|e| format!("CreateContainer: {}", e.message()))
        .and_then(|c| {
            side.cri
                .start_container(&c)
                .map_err(|e| format!("StartContainer: {}", e.message()))?;
            wait_running(side.cri, &c, TIMEOUT)?;
            Ok(c)
        });
    match container {
        Ok(container) => Ok(Pod { id, container }),
        Err(e) => {
            let _ = teardown(side, &id);
            Err(e)
        }
    }
}

/// One sample: (pod start, teardown). Checks, untimed, that the pod and its container are gone.
fn cycle(side: &Side) -> (Duration, Duration) {
    let t0 = Instant::now();
    let pod = start_pod(side).unwrap_or_else(|e| panic!("{}: {e}", side.label));
    let start = t0.elapsed();
    let t1 = Instant::now();
    teardown(side, &pod.id).unwrap_or_else(|e| panic!("{}: {e}", side.label));
    let down = t1.elapsed();
    assert!(
        !side.cri.list_pods().iter().any(|p| p.id == pod.id),
        "{}: pod {} still listed after RemovePodSandbox",
        side.label,
        pod.id
    );
    assert!(
        !side
            .cri
            .list_containers(None)
            .iter()
            .any(|c| c.id == pod.container),
        "{}: container {} still listed after RemovePodSandbox",
        side.label,
        pod.container
    );
    (start, down)
}

/// RSS in KiB: the daemon, its shims (processes with `-address <socket>`: one count and sum),
/// and the processes in the side's pods' cgroups that are not shims.
#[derive(Debug, Clone, Copy)]
struct Mem {
    daemon: u64,
    shims: u64,
    shim_count: usize,
    pods: u64,
}

fn cgroup_pids(relative: &str) -> BTreeSet<u32> {
    fn walk(dir: &Path, out: &mut BTreeSet<u32>) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    let mut pids = BTreeSet::new();
    for top in cgroups_matching(relative) {
        walk(&top, &mut pids);
    }
    pids
}

fn memory(side: &Side) -> Mem {
    let shims: Vec<u32> = processes_matching(&[&format!("-address {}", side.socket.display())])
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| *pid != side.daemon_pid)
        .collect();
    let pods = cgroup_pids(side.cgroup_parent.trim_start_matches('/'));
    let sum = |pids: &mut dyn Iterator<Item = u32>| pids.filter_map(rss_kib).sum::<u64>();
    Mem {
        daemon: rss_kib(side.daemon_pid).unwrap_or(0),
        shims: sum(&mut shims.iter().copied()),
        shim_count: shims.len(),
        pods: sum(&mut pods.iter().copied().filter(|p| !shims.contains(p))),
    }
}

/// The memory with no pods, then with `n` idle pods; the pods are removed afterwards.
fn idle_pods(side: &Side, n: usize) -> (Mem, Mem) {
    let before = memory(side);
    let pods: Vec<Pod> = (0..n)
        .map(|_| start_pod(side).unwrap_or_else(|e| panic!("{}: {e}", side.label)))
        .collect();
    let after = memory(side);
    for p in &pods {
        teardown(side, &p.id).unwrap_or_else(|e| panic!("{}: {e}", side.label));
    }
    (before, after)
}

/// The switchyardd config: CRI on the test bridge, and the vm runtime on the installed guest
/// (QEMU, as the containerd node's vm handler) with its cache in the daemon's directory.
fn switchyardd_config(dir: &Path, cni_conf: &Path) -> String {
    let mut cfg = format!(
        "[cri]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
        cni_conf.display()
    );
    if let Some((kernel, initrd)) = guest_kernel_and_initrd() {
        cfg.push_str(&format!(
            "[runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n[runtimes.vm.options]\n\
             backend = \"qemu\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncache_dir = \"{}\"\n",
            kernel.display(),
            initrd.display(),
            dir.join("vm-cache").display()
        ));
    }
    cfg
}

/// The value after `flag` in a command line, or after `key=` among its words.
fn word_after<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    let mut words = cmdline.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next();
        }
        if let Some(v) = w.strip_prefix(key).and_then(|v| v.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn main() {
    let Some(node) = CriNode::require(Peer::V1_7) else {
        return;
    };
    if !require(
        Path::new("/usr/lib/cni/bridge").is_file(),
        "needs Debian's containernetworking-plugins (/usr/lib/cni)",
    ) {
        return;
    }
    let runs = env_usize("RUNS", 20);
    let n_pods = env_usize("PODS", 20);
    let work = tempfile::Builder::new()
        .prefix("cri-bench-")
        .tempdir()
        .expect("tempdir");

    let net = TestNet::new(&work.path().join("sy"));
    let sy = Daemon::start_in(|dir| switchyardd_config(dir, &net.conf_dir));
    sy.yard_ok(&[
        "-n",
        "k8s.io",
        "image",
        "import",
        "-q",
        &test_images().display().to_string(),
    ]);
    let ctd_version = version(&Peer::V1_7.binary().expect("containerd 1.7"));
    let ctd_config = node.dir.path().join("config.toml").display().to_string();
    let ctd_pid = processes_matching(&["--config", &ctd_config])
        .first()
        .map(|p| p.0)
        .expect("containerd 1.7's pid");
    let ctd_cri = node.client();
    let sy_cri = Cri::connect(&sy.socket);
    let sy_parent = format!("/{}", unique_id("yardbench"));
    let side = |label: &str, on_sy: bool, handler: &'static str| Side {
        label: label.to_owned(),
        cri: if on_sy { &sy_cri } else { &ctd_cri },
        handler,
        socket: if on_sy {
            sy.socket.clone()
        } else {
            node.socket.clone()
        },
        daemon_pid: if on_sy {
            sy.pid().expect("pid")
        } else {
            ctd_pid
        },
        logs: work
            .path()
            .join(format!("pods-{label}").replace([' ', '+'], "")),
        cgroup_parent: if on_sy {
            sy_parent.clone()
        } else {
            node.cgroup_parent.clone()
        },
    };
    let sides = [
        side(&format!("containerd {ctd_version} + runc"), false, "runc"),
        side("switchyardd + native", true, "native"),
        side(
            &format!("containerd {ctd_version} + native"),
            false,
            "native",
        ),
    ];

    // Warm-up: the first container of an image unpacks it.
    for s in &sides {
        for _ in 0..2 {
            cycle(s);
        }
    }
    let mut start: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); sides.len()];
    let mut down: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); sides.len()];
    for i in 0..runs {
        // Rotate who goes first so drift (page cache, other load) hits every side alike.
        for k in 0..sides.len() {
            let j = (i + k) % sides.len();
            let (s, d) = cycle(&sides[j]);
            start[j].push(s);
            down[j].push(d);
        }
    }
    let mems: Vec<(Mem, Mem)> = sides.iter().map(|s| idle_pods(s, n_pods)).collect();

    let vm = if std::env::var("VM").is_ok_and(|v| v == "0") {
        println!("vm part skipped (VM=0)");
        None
    } else {
        vm_part(&sides, work.path())
    };
    kill_cgroup_tree(sy_parent.trim_start_matches('/'));

    println!();
    println!(
        "pod start through CRI: RunPodSandbox + CreateContainer + StartContainer (busybox sleep 3600) until RUNNING"
    );
    println!(
        "(same client, same CNI bridge config, same image; interleaved, {runs} runs each after 2 warm-ups)"
    );
    let table = |title: &str, samples: &[Vec<Duration>]| {
        println!("{title}");
        let stats: Vec<Stats> = samples.iter().map(|v| Stats::of(v)).collect();
        for (s, st) in sides.iter().zip(&stats) {
            row(&s.label, st);
        }
        let r = ratio(stats[1].median, stats[0].median);
        println!(
            "  ratio switchyardd native / containerd runc (median): {r:.2}   target <= 0.50: {}",
            if r <= 0.5 { "met" } else { "NOT met" }
        );
    };
    table("pod start:", &start);
    table(
        "teardown: StopPodSandbox + RemovePodSandbox (the container with it)",
        &down,
    );

    println!();
    println!(
        "RSS with 0 and {n_pods} idle pods (one busybox sleep each); shims: processes with the daemon's -address"
    );
    let line = |c: [&str; 9]| {
        println!(
            "  {:<30} {:>10} {:>10} {:>9}   {:>10} {:>10} {:>9}   {:>5} {:>10}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        );
    };
    line([
        "", "daemon", "", "per pod", "daemon +", "shims", "per pod", "shims", "pods'",
    ]);
    line([
        "",
        "0 pods",
        "N pods",
        "",
        "0 pods",
        "N pods",
        "",
        "N",
        "processes",
    ]);
    let per = |a: u64, b: u64| mib(b.saturating_sub(a) / n_pods.max(1) as u64);
    for (s, (a, b)) in sides.iter().zip(&mems) {
        line([
            &s.label,
            &mib(a.daemon),
            &mib(b.daemon),
            &per(a.daemon, b.daemon),
            &mib(a.daemon + a.shims),
            &mib(b.daemon + b.shims),
            &per(a.daemon + a.shims, b.daemon + b.shims),
            &b.shim_count.to_string(),
            &mib(b.pods),
        ]);
    }

    if let Some(vm) = vm {
        vm.print();
    }
}

/// The vm pod starts and the plain QEMU boots, measured.
struct VmResult {
    path: String,
    accel: String,
    append: String,
    pod_start: Vec<Duration>,
    teardown: Vec<Duration>,
    plain_ready: Vec<Duration>,
    plain_total: Vec<Duration>,
    stock_ready: Vec<Duration>,
}

impl VmResult {
    fn print(&self) {
        println!();
        println!(
            "vm pod start (accel {}) vs a plain QEMU boot of the same kernel (trivial init, 1 vcpu, 256 MiB)",
            self.accel
        );
        println!("measured through: {}", self.path);
        row("vm pod start (to RUNNING)", &Stats::of(&self.pod_start));
        row("vm pod teardown", &Stats::of(&self.teardown));
        row("plain QEMU, same args: init", &Stats::of(&self.plain_ready));
        row("plain QEMU, same args: exit", &Stats::of(&self.plain_total));
        row(
            "plain QEMU, stock args: init",
            &Stats::of(&self.stock_ready),
        );
        println!(
            "  ratio vm pod start / plain boot to init (median): {:.2}",
            ratio(
                Stats::of(&self.pod_start).median,
                Stats::of(&self.plain_ready).median
            )
        );
        println!("  kernel args of the plain boot: {}", self.append);
    }
}

/// The vm part: through switchyardd's CRI if its vm handler runs a pod's container, else
/// through containerd 1.7's CRI with our vm handler; next to plain QEMU boots.
fn vm_part(sides: &[Side], work: &Path) -> Option<VmResult> {
    let Some((kernel, _)) = guest_kernel_and_initrd() else {
        println!("vm part skipped: no guest installed (scripts/guest)");
        return None;
    };
    if which("qemu-system-x86_64").is_none() {
        println!("vm part skipped: no qemu-system-x86_64");
        return None;
    }
    let runs = env_usize("VM_RUNS", 5);
    let sy_vm = sides[1].with_handler("switchyardd + vm", "vm");
    let ctd_vm = sides[0].with_handler(&sides[0].label.replace("runc", "vm"), "vm");
    // The first pod also builds the rootfs image into the cache: a warm-up either way.
    let (side, path, first) = match start_pod(&sy_vm) {
        Ok(p) => (sy_vm, "switchyardd's CRI, handler vm".to_owned(), p),
        Err(e) => {
            let path = format!(
                "{}'s CRI with our vm shim as its handler (switchyardd's vm handler did not run the pod: {})",
                ctd_vm.label.trim_end_matches(" + vm"),
                e.lines().map(str::trim).collect::<Vec<_>>().join(" | ")
            );
            let p = start_pod(&ctd_vm).unwrap_or_else(|e| panic!("{}: {e}", ctd_vm.label));
            (ctd_vm, path, p)
        }
    };
    // The running QEMU tells the accelerator and the TSC rate the shim chose.
    let qemu = processes_matching(&["qemu-system-x86_64", &first.id])
        .into_iter()
        .chain(processes_matching(&[
            "qemu-system-x86_64",
            &first.container,
        ]))
        .map(|p| p.1)
        .next();
    teardown(&side, &first.id).unwrap_or_else(|e| panic!("{}: {e}", side.label));
    let accel = qemu
        .as_deref()
        .and_then(|c| word_after(c, "-accel"))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if switchyard_benches::plain_qemu::hardware_virtualization() {
                "kvm".to_owned()
            } else {
                "tcg".to_owned()
            }
        });
    let khz = qemu
        .as_deref()
        .and_then(|c| word_after(c, "tsc_early_khz"))
        .and_then(|v| v.parse().ok());
    let append = switchyard_benches::plain_qemu::shim_kernel_args(&accel, khz);
    let trivial = trivial_initrd(work);
    let mut r = VmResult {
        path,
        accel,
        append,
        pod_start: vec![],
        teardown: vec![],
        plain_ready: vec![],
        plain_total: vec![],
        stock_ready: vec![],
    };
    for _ in 0..runs {
        let (s, d) = cycle(&side);
        r.pod_start.push(s);
        r.teardown.push(d);
        let (ready, total) = plain_boot(&kernel, &trivial, &r.accel, &r.append);
        r.plain_ready.push(ready);
        r.plain_total.push(total);
        r.stock_ready
            .push(plain_boot(&kernel, &trivial, &r.accel, STOCK_KERNEL_ARGS).0);
    }
    Some(r)
}
