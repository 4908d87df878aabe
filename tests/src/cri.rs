//! Kubernetes' CRI against real runtimes: containerd (1.6, 1.7, 2.1) with its CRI plugin, or
//! switchyardd serving CRI itself, on private sockets and directories, a CNI bridge of the
//! test's own, locally built pause and busybox images, and a CRI client over the vendored
//! `runtime.v1` proto. One scenario list runs against every [`Peer`] (`tests/tests/cri.rs`).
//!
//! crictl cannot be built on these machines (no Go module proxy), so [`Cri`] is the client:
//! typed calls, each with a deadline, on a private tokio runtime so tests stay synchronous.
//!
//! The test network: one bridge per node, `isGateway` (the host can reach pods and `portmap`
//! works) but no masquerade, and an iptables rule that drops forwarded traffic leaving the
//! bridge, so pods reach each other and the host, never anything else. Everything (bridge, rule,
//! IPAM state) goes with the node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_api::cri::v1 as cri;
use switchyard_api::cri::v1::image_service_client::ImageServiceClient;
use switchyard_api::cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::daemon::Daemon;
use crate::images::{Image, TarEntry, busybox_base_layer, docker_save_tar, gzip, image, layer_tar};

/// containerd's CRI namespace.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The locally built sandbox image every node is configured with.
pub const PAUSE_IMAGE: &str = "switchyard.local/pause:1";
/// busybox (the host's static busybox with its applet links), imported into every node.
pub const BUSYBOX_IMAGE: &str = "switchyard.local/busybox:1";
/// The `wasi:http` test component as `/http.wasm`, its entrypoint ([`wasm_images`]).
pub const WASM_HTTP_IMAGE: &str = "switchyard.local/wasm-http:1";
/// The WASI `hello` test module as `/hello.wasm`, its entrypoint ([`wasm_images`]).
pub const WASM_HELLO_IMAGE: &str = "switchyard.local/wasm-hello:1";
/// The `wasi:sockets` test program as `/sockets.wasm`, its entrypoint ([`wasm_images`]).
pub const WASM_SOCKETS_IMAGE: &str = "switchyard.local/wasm-sockets:1";
/// A file that is neither Wasm nor ELF as the entrypoint (bad input for the wasm handler).
pub const NOT_WASM_IMAGE: &str = "switchyard.local/not-wasm:1";

/// The runtime handlers a node offers: containerd's runc and Switchyard's shims.
pub const HANDLERS: &[(&str, &str)] = &[
    ("runc", "io.containerd.runc.v2"),
    ("native", "io.containerd.yard-native.v1"),
    ("vm", "io.containerd.yard-vm.v1"),
    ("wasm", "io.containerd.yard-wasm.v1"),
    ("wasm-nonet", "io.containerd.yard-wasm.v1"),
    ("wasm-few-sockets", "io.containerd.yard-wasm.v1"),
];

/// Handlers with runtime options of their own (besides vm's): name and options (TOML), kept in
/// `<name>.toml` in a node's directory. `wasm-nonet`: the wasm runtime with guests' sockets and
/// outgoing HTTP off; `wasm-few-sockets`: at most 2 sockets per instance.
const HANDLER_OPTIONS: &[(&str, &str)] = &[
    ("wasm-nonet", "sockets = false\noutgoing_http = false\n"),
    ("wasm-few-sockets", "max_sockets = 2\n"),
];

/// Write the [`HANDLER_OPTIONS`] files into a node's directory.
fn write_handler_options(dir: &Path) {
    for (name, toml) in HANDLER_OPTIONS {
        crate::write(&dir.join(format!("{name}.toml")), toml);
    }
}

/// The vm handler's options file in a node's directory ([`vm_options`]).
const VM_OPTIONS: &str = "vm-options.toml";

/// The vm handler's options: the guest from [`crate::guest_dir`] (`SWITCHYARD_GUEST_DIR`), QEMU,
/// and the image cache and shares under the node's directory (so what a test leaves is the
/// node's).
fn vm_options(dir: &Path) -> String {
    let g = crate::guest_dir();
    format!(
        "backend = \"qemu\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncache_dir = \"{}\"\n",
        g.join("vmlinux").display(),
        g.join("initrd.img").display(),
        dir.join("vm-cache").display()
    )
}

/// A CRI runtime the scenarios run against: a containerd line with its CRI plugin, or
/// switchyardd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Debian 12's containerd 1.6 (from apt).
    V1_6,
    /// containerd 1.7 (Debian trixie, `scripts/peers`).
    V1_7,
    /// containerd 2.1 (Debian sid, `scripts/peers`).
    V2_1,
    /// switchyardd from this build, serving CRI on its own socket.
    Switchyardd,
}

impl Peer {
    /// The containerd lines.
    pub const ALL: [Peer; 3] = [Peer::V1_6, Peer::V1_7, Peer::V2_1];

    pub fn name(self) -> &'static str {
        match self {
            Peer::V1_6 => "containerd-1.6",
            Peer::V1_7 => "containerd-1.7",
            Peer::V2_1 => "containerd-2.1",
            Peer::Switchyardd => "switchyardd",
        }
    }

    /// The daemon's binary, if it is installed (switchyardd: built).
    pub fn binary(self) -> Option<PathBuf> {
        match self {
            Peer::V1_6 => crate::which("containerd"),
            Peer::V1_7 => crate::daemon::peer_containerd("containerd-1.7"),
            Peer::V2_1 => crate::daemon::peer_containerd("containerd-2.1"),
            Peer::Switchyardd => Some(crate::bin_dir().join("switchyardd")).filter(|p| p.is_file()),
        }
    }

    /// The config file: CRI on, our handlers, the test's CNI, a private stream port. For
    /// switchyardd, what [`Daemon::start_in`] adds to its own (root, state and socket are its):
    /// the CNI settings and the vm handler's options (its built-in `[runtimes]` are the
    /// handlers, by the same names).
    fn config(self, dir: &Path, socket: &Path, cni_conf: &Path) -> String {
        let runtimes = |prefix: &str| -> String {
            HANDLERS
                .iter()
                .map(|(name, ty)| {
                    let mut r =
                        format!("[{prefix}.containerd.runtimes.{name}]\nruntime_type = \"{ty}\"\n");
                    let options = if *name == "vm" {
                        Some(dir.join(VM_OPTIONS))
                    } else {
                        HANDLER_OPTIONS
                            .iter()
                            .any(|(n, _)| n == name)
                            .then(|| dir.join(format!("{name}.toml")))
                    };
                    if let Some(options) = options {
                        // CRI hands a runtime that is not runc its options as `ConfigPath`.
                        r.push_str(&format!(
                            "[{prefix}.containerd.runtimes.{name}.options]\nConfigPath = \"{}\"\n",
                            options.display()
                        ));
                    }
                    r
                })
                .collect()
        };
        let head = format!(
            "root = \"{}\"\nstate = \"{}\"\n[grpc]\naddress = \"{}\"\n",
            dir.join("root").display(),
            dir.join("state").display(),
            socket.display()
        );
        match self {
            Peer::Switchyardd => {
                let vm = HANDLERS
                    .iter()
                    .find(|(name, _)| *name == "vm")
                    .map_or("", |(_, ty)| ty);
                let others: String = HANDLER_OPTIONS
                    .iter()
                    .filter_map(|(name, toml)| {
                        let ty = HANDLERS.iter().find(|(n, _)| n == name)?.1;
                        Some(format!(
                            "[runtimes.{name}]\nruntime_type = \"{ty}\"\n[runtimes.{name}.options]\n{toml}"
                        ))
                    })
                    .collect();
                // The default sandbox image, which switchyardd builds from the static
                // yard-pause (scripts/setup installs one where the default config looks).
                format!(
                    "[cri]\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n\
                     pause_binary = \"{}\"\n[runtimes.vm]\nruntime_type = \"{vm}\"\n[runtimes.vm.options]\n{}{others}",
                    cni_conf.display(),
                    pause_binary().display(),
                    vm_options(dir)
                )
            }
            Peer::V1_6 | Peer::V1_7 => {
                let p = "[plugins.\"io.containerd.grpc.v1.cri\"]";
                let pre = "plugins.\"io.containerd.grpc.v1.cri\"";
                format!(
                    "version = 2\n{head}{p}\nsandbox_image = \"{PAUSE_IMAGE}\"\n\
                     restrict_oom_score_adj = true\nstream_server_address = \"127.0.0.1\"\n\
                     stream_server_port = \"0\"\ndisable_apparmor = true\n\
                     [{pre}.containerd]\ndefault_runtime_name = \"runc\"\nsnapshotter = \"overlayfs\"\n\
                     {}[{pre}.cni]\nbin_dir = \"/usr/lib/cni\"\nconf_dir = \"{}\"\n",
                    runtimes(pre),
                    cni_conf.display()
                )
            }
            Peer::V2_1 => {
                let rt = "plugins.'io.containerd.cri.v1.runtime'";
                let img = "plugins.'io.containerd.cri.v1.images'";
                format!(
                    "version = 3\n{head}[{rt}]\nrestrict_oom_score_adj = true\ndisable_apparmor = true\n\
                     [{rt}.containerd]\ndefault_runtime_name = \"runc\"\n{}\
                     [{rt}.cni]\nbin_dirs = [\"/usr/lib/cni\"]\nconf_dir = \"{}\"\n\
                     [{img}]\nsnapshotter = \"overlayfs\"\n[{img}.pinned_images]\nsandbox = \"{PAUSE_IMAGE}\"\n\
                     [plugins.'io.containerd.grpc.v1.cri']\nstream_server_address = \"127.0.0.1\"\n\
                     stream_server_port = \"0\"\n",
                    runtimes(rt),
                    cni_conf.display()
                )
            }
        }
    }
}

/// A CNI bridge network of the test's own (see the module doc).
pub struct TestNet {
    pub bridge: String,
    /// The /24 the pods get addresses from, e.g. `10.77.3.0/24`.
    pub subnet: String,
    pub conf_dir: PathBuf,
    rule: Vec<String>,
}

impl TestNet {
    /// A bridge named after this process and a counter, so concurrent tests never share one.
    pub fn new(dir: &Path) -> TestNet {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("ytb{}x{n}", pid % 100_000);
        let subnet = format!("10.{}.{}.0/24", 64 + (n % 64), pid % 250);
        let conf_dir = dir.join("net.d");
        std::fs::create_dir_all(&conf_dir).expect("cni conf dir");
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("yardtest-{bridge}"),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("ipam"),
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        crate::write(
            &conf_dir.join("10-yardtest.conflist"),
            &serde_json::to_string_pretty(&conf).expect("json"),
        );
        let rule: Vec<String> = ["FORWARD", "-i", &bridge, "!", "-o", &bridge, "-j", "DROP"]
            .map(str::to_owned)
            .to_vec();
        let st = Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .status()
            .expect("iptables");
        assert!(st.success(), "iptables -I {}", rule.join(" "));
        TestNet {
            bridge,
            subnet,
            conf_dir,
            rule,
        }
    }

    /// Whether `ip` is in this network's /24.
    pub fn contains(&self, ip: &str) -> bool {
        let prefix = self.subnet.trim_end_matches("0/24");
        ip.starts_with(prefix)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        remove_portmap_rules(&format!("yardtest-{}", self.bridge));
        let _ = Command::new("iptables").arg("-D").args(&self.rule).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes what `portmap` left for pods of the CNI network `name` that a failed test did not
/// tear down (a passing test's teardown asserts there is nothing): each pod's jump from
/// `CNI-HOSTPORT-DNAT` (its comment names the network) and the chain it jumps to.
fn remove_portmap_rules(name: &str) {
    let listed = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"])
        .stderr(Stdio::null())
        .output();
    let Ok(listed) = listed else { return };
    let marker = format!("dnat name: \\\"{name}\\\"");
    for rule in crate::text(&listed.stdout)
        .lines()
        .filter(|l| l.contains(&marker))
    {
        let Some(spec) = rule.strip_prefix("-A ") else {
            continue;
        };
        // `iptables -S` quotes its output for a shell, as iptables-save does.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("iptables -w -t nat -D {spec}"))
            .status();
        if let Some(chain) = rule
            .rsplit(" -j ")
            .next()
            .filter(|c| c.starts_with("CNI-DN-"))
        {
            for op in ["-F", "-X"] {
                let _ = Command::new("iptables")
                    .args(["-w", "-t", "nat", op, chain])
                    .status();
            }
        }
    }
}

/// A host port for a pod's `portmap` mapping: free now, and below the kernel's ephemeral range
/// (`ip_local_port_range`). While the mapping's DNAT rule exists, every connection to
/// 127.0.0.1 on that port goes to the pod; a port from the ephemeral range could meanwhile be
/// handed to a socket bound to port 0 — a peer's streaming server in a test running alongside —
/// whose clients would then reach the pod instead (seen: an exec's connection never answered).
pub fn host_port() -> u16 {
    static N: AtomicU32 = AtomicU32::new(0);
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u32 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    // Ports [low/2, low): far above the well-known ones, below the ephemeral ones; each
    // process starts elsewhere in them, so concurrent test binaries rarely try the same port.
    let (base, span) = (low / 2, low - low / 2);
    assert!(
        span >= 1024,
        "ip_local_port_range starts at {low}: no room for host ports below it"
    );
    let start = std::process::id().wrapping_mul(2654435761) % span;
    for _ in 0..span {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let port = (base + (start + n.wrapping_mul(7919)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free host port in [{base}, {low})");
}

/// The iptables NAT rules that name `id` (`portmap` writes the container id of the pod's
/// sandbox in its rules' comments): none once the pod is removed.
pub fn nat_rules_naming(id: &str) -> Vec<String> {
    let out = crate::run_timeout(
        Command::new("iptables").args(["-w", "-t", "nat", "-S"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "iptables -t nat -S: {out:?}");
    crate::text(&out.stdout)
        .lines()
        .filter(|l| l.contains(id))
        .map(str::to_owned)
        .collect()
}

/// A CRI runtime ([`Peer`]) on private directories, with [`TestNet`] and the test images.
pub struct CriNode {
    pub peer: Peer,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub ctr_bin: PathBuf,
    pub net: TestNet,
    /// The cgroup parent of every pod of this node (cgroupfs driver), as kubelet gives one: a
    /// pod's usage (PodSandboxStats) is read from it, and what a failed test leaves in it is
    /// killed when the node is dropped.
    pub cgroup_parent: String,
    /// containerd's process.
    child: Option<Child>,
    /// switchyardd (its own directories and log).
    daemon: Option<Daemon>,
}

impl CriNode {
    /// The node a test runs on, or `None` (the reason printed) where this machine lacks root,
    /// `iptables`, `ip` or the peer containerd.
    pub fn require(peer: Peer) -> Option<CriNode> {
        if !crate::require_root_and(&["iptables", "ip"]) {
            return None;
        }
        if !crate::require(
            peer.binary().is_some(),
            &format!("{} is not installed (scripts/peers)", peer.name()),
        ) {
            return None;
        }
        Some(CriNode::start(peer))
    }

    /// Starts `peer` and imports the busybox image, and for containerd the pause image
    /// (switchyardd builds its default one itself).
    pub fn start(peer: Peer) -> CriNode {
        if peer == Peer::Switchyardd {
            return CriNode::start_switchyardd();
        }
        let binary = peer
            .binary()
            .unwrap_or_else(|| panic!("{} is not installed", peer.name()));
        let dir = tempfile::Builder::new()
            .prefix("cri-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("c.sock");
        let net = TestNet::new(dir.path());
        let config = dir.path().join("config.toml");
        crate::write(&config, &peer.config(dir.path(), &socket, &net.conf_dir));
        crate::write(&dir.path().join(VM_OPTIONS), &vm_options(dir.path()));
        write_handler_options(dir.path());
        let log = dir.path().join("containerd.log");
        let logf = std::fs::File::create(&log).expect("log");
        // Shims are found on containerd's PATH: ours (the build's bin dir) first.
        let path = format!(
            "{}:{}",
            crate::bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new(&binary)
            .env("PATH", path)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn containerd");
        crate::daemon::wait_for_socket(&socket, &mut child, &log);
        let ctr_bin = binary
            .parent()
            .map(|d| d.join("ctr"))
            .filter(|c| c.exists())
            .unwrap_or_else(|| PathBuf::from("ctr"));
        let node = CriNode {
            peer,
            dir,
            socket,
            log,
            ctr_bin,
            net,
            cgroup_parent: format!("/{}", crate::unique_id("yardcri")),
            child: Some(child),
            daemon: None,
        };
        node.import(test_images());
        node
    }

    /// switchyardd on its own directories ([`Daemon`]), configured by [`Peer::config`].
    fn start_switchyardd() -> CriNode {
        CriNode::start_switchyardd_with("")
    }

    /// switchyardd as [`CriNode::start`] makes it, with `cri` (TOML lines) added to its `[cri]`
    /// table. The caller checks the prerequisites ([`CriNode::require`]).
    pub fn start_switchyardd_with(cri: &str) -> CriNode {
        let dir = tempfile::Builder::new()
            .prefix("cri-")
            .tempdir()
            .expect("tempdir");
        let net = TestNet::new(dir.path());
        crate::write(&dir.path().join(VM_OPTIONS), &vm_options(dir.path()));
        write_handler_options(dir.path());
        let config = Peer::Switchyardd
            .config(dir.path(), Path::new(""), &net.conf_dir)
            .replacen("[cri]\n", &format!("[cri]\n{cri}"), 1);
        let daemon = Daemon::start_in(|_| config);
        let node = CriNode {
            peer: Peer::Switchyardd,
            socket: daemon.socket.clone(),
            log: daemon.log.clone(),
            ctr_bin: PathBuf::from("ctr"),
            dir,
            net,
            cgroup_parent: format!("/{}", crate::unique_id("yardcri")),
            child: None,
            daemon: Some(daemon),
        };
        node.import(busybox_images());
        node
    }

    /// `ctr` against this node, in the CRI namespace.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new(&self.ctr_bin);
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", K8S_NAMESPACE]);
        c
    }

    /// Imports an image archive (docker save or OCI layout tar) into the CRI namespace:
    /// `ctr images import` for containerd, `yard image import` for switchyardd (which serves no
    /// content store for `ctr` to write to).
    /// Kills switchyardd (SIGKILL) and starts it again on the same directories, as a crash
    /// and restart would; shims and pods run on. Only for [`Peer::Switchyardd`].
    pub fn restart_switchyardd(&mut self) {
        self.daemon
            .as_mut()
            .expect("restart_switchyardd: this node runs containerd")
            .restart();
    }

    pub fn import(&self, archive: &Path) {
        let mut cmd = match &self.daemon {
            Some(d) => {
                let mut c = d.yard();
                c.args(["-n", K8S_NAMESPACE, "image", "import", "-q"]);
                c
            }
            None => {
                let mut c = self.ctr();
                c.args(["images", "import"]);
                c
            }
        };
        let out = crate::run_timeout(cmd.arg(archive), Duration::from_secs(120));
        assert!(
            out.status.success(),
            "import {}: {}\n{}",
            archive.display(),
            crate::text(&out.stderr),
            self.log_text()
        );
    }

    pub fn client(&self) -> Cri {
        Cri::connect(&self.socket)
    }

    /// `yard cri` against this node (the command's arguments still to add).
    pub fn yard_cri(&self) -> Command {
        let mut c = Command::new(crate::bin("yard"));
        c.arg("--address").arg(&self.socket).arg("cri");
        c
    }

    /// `yard cri port-forward POD LOCAL:REMOTE...` over `transport` (`spdy` or `websocket`),
    /// killed when dropped; its stderr goes to `<node dir>/<log>` ([`PortForward::said`]).
    pub fn port_forward(
        &self,
        pod: &str,
        transport: &str,
        ports: &[(u16, u16)],
        log: &str,
    ) -> PortForward {
        let log = self.dir.path().join(log);
        let child = self
            .yard_cri()
            .args(["port-forward", "--transport", transport, pod])
            .args(
                ports
                    .iter()
                    .map(|(local, remote)| format!("{local}:{remote}")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the port-forward log"))
            .spawn()
            .expect("spawn yard cri port-forward");
        PortForward {
            child: crate::KillOnDrop(child),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The directory pods of this node log into (`log_directory` of [`pod_config`]).
    pub fn pod_log_dir(&self, pod: &str) -> PathBuf {
        self.dir.path().join("pods").join(pod)
    }
}

impl Drop for CriNode {
    fn drop(&mut self) {
        // switchyardd's own Drop prints its log.
        if std::thread::panicking() && self.daemon.is_none() {
            eprintln!(
                "--- {} log (last 60 lines) ---\n{}",
                self.peer.name(),
                tail(&self.log_text(), 60)
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.daemon.as_mut() {
            d.stop();
        }
        let sock = self.socket.display().to_string();
        for (pid, _) in crate::processes_matching(&["-address", &sock]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Whatever a failed test left running in the node's pods, then their cgroups.
        crate::kill_cgroup_tree(self.cgroup_parent.trim_start_matches('/'));
        // Whatever a failed test left mounted under the node's directories (switchyardd's:
        // pod network namespaces, container roots), before they are removed.
        let dirs =
            std::iter::once(self.dir.path()).chain(self.daemon.as_ref().map(|d| d.dir.path()));
        for dir in dirs {
            for m in crate::mount_points_under(dir) {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        self.daemon = None;
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The pause and busybox images as one docker-save archive, built once per test process.
pub fn test_images() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let bytes = std::fs::read(pause_binary()).expect("read yard-pause");
        // The image switchyardd builds for its default sandbox image, under the tests' name.
        let pause =
            switchyard_images::build::pause_image(bytes, &switchyard_images::Platform::host())
                .expect("pause image");
        let tar = docker_save_tar(&[(PAUSE_IMAGE, &pause), (BUSYBOX_IMAGE, &busybox())]);
        write_archive("images", &tar)
    })
}

/// The busybox image alone as a docker-save archive (for switchyardd, which builds its pause
/// image itself), built once per test process.
pub fn busybox_images() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| write_archive("busybox", &docker_save_tar(&[(BUSYBOX_IMAGE, &busybox())])))
}

fn busybox() -> Image {
    image(
        vec![busybox_base_layer()],
        json!({"Cmd": ["sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
        "amd64",
    )
}

/// `tar` as `switchyard-cri-<what>-<digest>.tar` in the temp dir, named by its content, so every
/// test process shares one file rather than leaving one each behind.
fn write_archive(what: &str, tar: &[u8]) -> PathBuf {
    let digest = crate::images::sha256_hex(tar);
    let path = std::env::temp_dir().join(format!("switchyard-cri-{what}-{}.tar", &digest[..16]));
    if std::fs::read(&path).is_ok_and(|old| old == tar) {
        return path;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, tar)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .expect("write image archive");
    path
}

/// The Wasm test images (their modules in an ordinary tar layer, as runwasi also accepts them),
/// as one docker-save archive built once per test process; import with [`CriNode::import`].
pub fn wasm_images() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let f = crate::wasm::fixtures();
        let one = |file: &str, bytes: Vec<u8>| {
            image(
                vec![gzip(&layer_tar(&[TarEntry::file(file, 0o755, bytes)]))],
                json!({"Entrypoint": [format!("/{file}")]}),
                "amd64",
            )
        };
        let http = one(
            "http.wasm",
            std::fs::read(&f.http_component).expect("http.wasm"),
        );
        let hello = one(
            "hello.wasm",
            std::fs::read(&f.hello_module).expect("hello.wasm"),
        );
        let sockets = one(
            "sockets.wasm",
            std::fs::read(&f.sockets_component).expect("sockets.wasm"),
        );
        let not_wasm = one("app.wasm", b"#!/bin/sh\necho not wasm\n".to_vec());
        let tar = docker_save_tar(&[
            (WASM_HTTP_IMAGE, &http),
            (WASM_HELLO_IMAGE, &hello),
            (WASM_SOCKETS_IMAGE, &sockets),
            (NOT_WASM_IMAGE, &not_wasm),
        ]);
        write_archive("wasm-images", &tar)
    })
}

/// `yard-pause` built statically (musl) so it runs in an image with nothing else in it: the
/// switchyardd peer's `[cri] pause_binary`, and containerd's [`PAUSE_IMAGE`].
pub fn pause_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = root.join("target");
        let out = crate::run_timeout(
            Command::new(env!("CARGO"))
                .current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "--locked",
                    "-p",
                    "switchyard-pause",
                    "--target",
                    "x86_64-unknown-linux-musl",
                    "--target-dir",
                ])
                .arg(&target),
            Duration::from_secs(600),
        );
        assert!(
            out.status.success(),
            "build yard-pause: {}",
            crate::text(&out.stderr)
        );
        target.join("x86_64-unknown-linux-musl/release/yard-pause")
    })
    .clone()
}

/// A running `yard cri port-forward` ([`CriNode::port_forward`]).
pub struct PortForward {
    child: crate::KillOnDrop,
    log: PathBuf,
}

impl PortForward {
    /// What it printed on stderr so far.
    pub fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.0.try_wait().ok().flatten().is_none()
    }
}

/// A pod config as crictl's defaults make one (`cri_defaults::pod_config`), with a log
/// directory under the node.
pub fn pod_config(node: &CriNode, name: &str) -> cri::PodSandboxConfig {
    let uid = crate::unique_id("uid");
    let log_dir = node.pod_log_dir(&uid);
    std::fs::create_dir_all(&log_dir).expect("pod log dir");
    let metadata = cri::PodSandboxMetadata {
        name: name.to_owned(),
        uid,
        namespace: "default".to_owned(),
        attempt: 0,
    };
    let mut cfg =
        switchyard_api::cri_defaults::pod_config(metadata, name, &log_dir.display().to_string());
    if let Some(linux) = cfg.linux.as_mut() {
        linux.cgroup_parent = format!(
            "{}/pod{}",
            node.cgroup_parent,
            cfg.metadata.as_ref().map_or("", |m| m.uid.as_str())
        );
    }
    cfg
}

/// A container of `image` running `command`, logging to `<name>.log` in the pod's directory.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// What [`Cri::exec_sync`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// A CRI client (RuntimeService + ImageService) with a deadline on every call.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    rs: RuntimeServiceClient<Channel>,
    is: ImageServiceClient<Channel>,
    socket: PathBuf,
    /// The deadline of each call.
    pub timeout: Duration,
}

impl Cri {
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let channel = rt
            .block_on(switchyard_api::client::connect(socket))
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        Cri {
            rt,
            rs: RuntimeServiceClient::new(channel.clone()),
            is: ImageServiceClient::new(channel),
            socket: socket.to_owned(),
            timeout: Duration::from_secs(120),
        }
    }

    /// Runs one call with the deadline; the status on failure.
    pub fn call<T, F>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let timeout = self.timeout;
        match self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, f).await })
        {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// The pod's network namespace path, from PodSandboxStatus' verbose info (switchyardd's
    /// `netns`; containerd's info has none).
    pub fn pod_netns(&self, pod: &str) -> Option<String> {
        let st = self
            .call(
                self.runtime()
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: pod.to_owned(),
                        verbose: true,
                    }),
            )
            .expect("PodSandboxStatus");
        let info: serde_json::Value =
            serde_json::from_str(st.info.get("info")?).expect("info json");
        info["netns"].as_str().map(str::to_owned)
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.rs.clone()
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        self.is.clone()
    }

    pub fn version(&self) -> cri::VersionResponse {
        let mut rs = self.runtime();
        self.call(rs.version(cri::VersionRequest::default()))
            .expect("Version")
    }

    /// RunPodSandbox on `handler`; the pod id.
    pub fn run_pod(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        }))
        .map(|r| r.pod_sandbox_id)
    }

    pub fn pod_status(&self, id: &str) -> Result<cri::PodSandboxStatus, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        }))
        .map(|r| r.status.unwrap_or_default())
    }

    pub fn list_pods(&self) -> Vec<cri::PodSandbox> {
        let mut rs = self.runtime();
        self.call(rs.list_pod_sandbox(cri::ListPodSandboxRequest::default()))
            .expect("ListPodSandbox")
            .items
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    /// CreateContainer in `pod`; the container id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        }))
        .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.start_container(cri::StartContainerRequest {
            container_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.stop_container(cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: timeout_s,
        }))
        .map(|_| ())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        }))
        .map(|_| ())
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.container_status(cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        }))
        .map(|r| r.status.unwrap_or_default())
    }

    pub fn list_containers(&self, pod: Option<&str>) -> Vec<cri::Container> {
        let mut rs = self.runtime();
        let filter = pod.map(|p| cri::ContainerFilter {
            pod_sandbox_id: p.to_owned(),
            ..Default::default()
        });
        self.call(rs.list_containers(cri::ListContainersRequest { filter }))
            .expect("ListContainers")
            .containers
    }

    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<ExecOutput, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.exec_sync(cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: timeout_s,
        }))
        .map(|r| ExecOutput {
            stdout: crate::text(&r.stdout),
            stderr: crate::text(&r.stderr),
            exit_code: r.exit_code,
        })
    }

    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.container_stats(cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        }))
        .map(|r| r.stats.unwrap_or_default())
    }

    pub fn pod_stats(&self, id: &str) -> Result<cri::PodSandboxStats, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .map(|r| r.stats.unwrap_or_default())
    }

    /// GetContainerEvents, subscribed when this returns: the events as they come, read on a
    /// thread of its own (with its own connection) until the stream or the receiver ends.
    pub fn container_events(&self) -> std::sync::mpsc::Receiver<cri::ContainerEventResponse> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let socket = self.socket.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let stream = async {
                    let channel = switchyard_api::client::connect(&socket)
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    RuntimeServiceClient::new(channel)
                        .get_container_events(cri::GetEventsRequest {})
                        .await
                };
                let mut stream = match stream.await {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s.into_inner()
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(Some(e)) = stream.message().await {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            });
        });
        ready
            .recv_timeout(self.timeout)
            .expect("GetContainerEvents: no answer")
            .expect("GetContainerEvents");
        rx
    }

    /// Waits until the container is in `state` (a [`cri::ContainerState`]).
    /// CreateContainer and StartContainer of `cfg` in `pod`, then waits (up to a minute) until
    /// it runs; its id.
    pub fn run_container(
        &self,
        pod: &str,
        cfg: &cri::ContainerConfig,
        pod_cfg: &cri::PodSandboxConfig,
    ) -> String {
        let id = self
            .create_container(pod, cfg, pod_cfg)
            .expect("CreateContainer");
        self.start_container(&id).expect("StartContainer");
        self.wait_container_state(
            &id,
            cri::ContainerState::ContainerRunning,
            Duration::from_secs(60),
        );
        id
    }

    pub fn wait_container_state(
        &self,
        id: &str,
        state: cri::ContainerState,
        within: Duration,
    ) -> cri::ContainerStatus {
        let deadline = Instant::now() + within;
        loop {
            let st = self.container_status(id).expect("ContainerStatus");
            if st.state == state as i32 {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} is {:?}, not {state:?}, after {within:?}",
                cri::ContainerState::try_from(st.state)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What an exec through the streaming server returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamExit {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl Cri {
    /// CRI Exec: the streaming server's URL for running `cmd` in container `id`.
    pub fn exec_url(
        &self,
        id: &str,
        cmd: &[&str],
        tty: bool,
        stdin: bool,
    ) -> Result<String, tonic::Status> {
        let mut rs = self.runtime();
        self.call(rs.exec(cri::ExecRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        }))
        .map(|r| r.url)
    }

    /// Runs a remotecommand session at `url` (from [`Cri::exec_url`]) over WebSocket
    /// (`v4.channel.k8s.io`: one channel byte before each message; 0 stdin, 1 stdout, 2 stderr,
    /// 3 the final status as JSON, 4 terminal size): sends the terminal size if given, then
    /// `input`, and collects the output until the server closes.
    pub fn stream_exec(&self, url: &str, input: &[u8], size: Option<(u16, u16)>) -> StreamExit {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;

        let ws_url = url
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        let mut request = ws_url.into_client_request().expect("websocket request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "v4.channel.k8s.io".parse().expect("header"),
        );
        let input = input.to_vec();
        // What arrived so far, kept outside the session so that a timeout can say how far the
        // session got (no output at all, the shell's echo only, output but no status).
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Streams {
            phase: "no TCP connection",
            ..Streams::default()
        }));
        let got = seen.clone();
        let session = async move {
            let addr = request.uri().authority().expect("address").to_string();
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            got.lock().unwrap().phase = "TCP connected, no WebSocket handshake";
            let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
                .await
                .expect("websocket handshake");
            got.lock().unwrap().phase = "WebSocket open";
            if let Some((w, h)) = size {
                let mut msg = vec![4u8];
                msg.extend(format!("{{\"Width\":{w},\"Height\":{h}}}").bytes());
                ws.send(Message::binary(msg)).await.expect("send resize");
            }
            if !input.is_empty() {
                let mut msg = vec![0u8];
                msg.extend(&input);
                ws.send(Message::binary(msg)).await.expect("send stdin");
            }
            while let Some(msg) = ws.next().await {
                let data = match msg {
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let mut got = got.lock().unwrap();
                match data.split_first() {
                    Some((1, rest)) => got.stdout.extend_from_slice(rest),
                    Some((2, rest)) => got.stderr.extend_from_slice(rest),
                    Some((3, rest)) => got.status.extend_from_slice(rest),
                    _ => {}
                }
            }
            let got = got.lock().unwrap();
            StreamExit {
                stdout: crate::text(&got.stdout),
                stderr: crate::text(&got.stderr),
                exit_code: exit_code_of_status(&got.status),
            }
        };
        let timeout = self.timeout;
        self.rt
            .block_on(async move { tokio::time::timeout(timeout, session).await })
            .unwrap_or_else(|_| {
                let seen = seen.lock().unwrap();
                panic!(
                    "exec session at {url} did not end within {timeout:?}; {}; \
                     stdout so far: {:?}, stderr so far: {:?}, status so far: {:?}",
                    seen.phase,
                    crate::text(&seen.stdout),
                    crate::text(&seen.stderr),
                    crate::text(&seen.status),
                )
            })
    }
}

/// The streams of an exec session as they arrive.
#[derive(Default)]
struct Streams {
    /// How far the connection got.
    phase: &'static str,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Vec<u8>,
}

/// The exit code in a remotecommand v4 status (`metav1.Status`): 0 for `Success`, the
/// `ExitCode` cause of a `Failure`, -1 when there is neither.
fn exit_code_of_status(status: &[u8]) -> i32 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(status) else {
        return -1;
    };
    if v["status"] == "Success" {
        return 0;
    }
    v["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str())
        .and_then(|m| m.parse().ok())
        .unwrap_or(-1)
}

/// The lines of a CRI log file, as (stream, text) with partial lines joined.
pub fn read_cri_log(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    switchyard_api::cri_log::parse(&text)
        .into_iter()
        .map(|l| (l.stream, l.text))
        .collect()
}
