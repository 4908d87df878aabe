//! The nested-KVM test harness: runs a payload inside a QEMU TCG VM whose emulated CPU has AMD
//! SVM, so the payload sees a hardware-style `/dev/kvm` (kvm_amd) that this host's PVM KVM
//! cannot give. Used for what needs real KVM: the built-in VMM booting Linux.
//!
//! ```no_run
//! # use switchyard_tests::nested::NestedVm;
//! let run = NestedVm::builder()
//!     .binary("target/debug/containerd-shim-yard-vm-v1", "/usr/bin/containerd-shim-yard-vm-v1")
//!     .env("RUST_LOG", "debug")
//!     .payload("containerd-shim-yard-vm-v1 info")
//!     .build()
//!     .unwrap()
//!     .run()
//!     .unwrap();
//! assert_eq!(run.status, 0, "{}", run.output);
//! ```
//!
//! The VM boots the `nested` variant of the guest kernel (`guest/kernel/build.sh nested`) with a
//! cpio initramfs assembled here: busybox (Debian's busybox-static, with applet links), the files
//! and trees the test carries, and `tests/nested/init` as `/init`, which runs the payload and
//! prints an end marker with its exit status on the serial console before it reboots (QEMU
//! exits). Binaries are the dynamically linked ones from `target/debug`, carried stripped with
//! every shared library `ldd` lists and the dynamic loader: no musl build is needed.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Where `scripts/guest` installs the outer kernel.
pub const INSTALLED_KERNEL: &str = "/var/lib/switchyard/guest/nested-vmlinux";
/// Overrides the outer kernel.
pub const KERNEL_ENV: &str = "SWITCHYARD_NESTED_KERNEL";
/// The microVM guest kernel and initramfs as `scripts/guest` installs them (the kernel is a
/// symlink into the kernel cache).
pub const GUEST_KERNEL: &str = "/var/lib/switchyard/guest/vmlinux";
pub const GUEST_INITRD: &str = "/var/lib/switchyard/guest/initrd.img";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The outer VM's kernel: `$SWITCHYARD_NESTED_KERNEL`, else the one `scripts/guest` installed,
/// else whatever `guest/kernel/build.sh nested` has in its cache. `None` when there is none
/// (this does not start a 4-minute kernel build inside a test).
pub fn find_kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(KERNEL_ENV) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let installed = Path::new(INSTALLED_KERNEL);
    if installed.is_file() {
        return Some(installed.to_owned());
    }
    // A cached build answers at once; an uncached one would build, which we do not want here.
    let cache = std::env::var_os("SWITCHYARD_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/switchyard/kernel"));
    let any_cached = std::fs::read_dir(&cache).ok()?.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("nested-") && e.path().join("vmlinux").is_file()
    });
    if !any_cached {
        return None;
    }
    let out = Command::new(repo_root().join("guest/kernel/build.sh"))
        .arg("nested")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// The QEMU binary used for the outer VM.
pub const QEMU: &str = "qemu-system-x86_64";

/// Checks what the harness needs (QEMU, busybox, cpio, strip, ldd, the outer kernel), printing
/// a skip reason (or failing under `SWITCHYARD_REQUIRE_ALL=1`) for the first thing missing.
pub fn require_harness() -> bool {
    if !crate::require(
        crate::which(QEMU).is_some(),
        "the nested-KVM harness needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
    ) {
        return false;
    }
    for (p, pkg) in [
        ("cpio", "cpio"),
        ("strip", "binutils"),
        ("ldd", "libc-bin"),
        ("gzip", "gzip"),
    ] {
        if !crate::require(
            crate::which(p).is_some(),
            &format!("the nested-KVM harness needs {p} (apt-get install {pkg})"),
        ) {
            return false;
        }
    }
    if !crate::require(
        crate::busybox_binary().is_some(),
        "the nested-KVM harness needs busybox (apt-get install busybox-static)",
    ) {
        return false;
    }
    crate::require(
        find_kernel().is_some(),
        "the nested-KVM harness needs its outer kernel: scripts/guest (or guest/kernel/build.sh \
         nested, or SWITCHYARD_NESTED_KERNEL)",
    )
}

/// One thing to put into the initramfs.
#[derive(Clone, Debug)]
enum Carry {
    /// A file, copied as it is.
    File { host: PathBuf, guest: String },
    /// An executable, stripped, with its shared libraries and the dynamic loader.
    Binary { host: PathBuf, guest: String },
    /// A directory tree (`cp -a`: symlinks, modes and special files kept).
    Dir { host: PathBuf, guest: String },
    /// A file with this content.
    Text {
        guest: String,
        content: Vec<u8>,
        mode: u32,
    },
    /// A symlink.
    Symlink { target: String, guest: String },
}

/// Collects what goes into the outer VM. See the module docs.
#[derive(Clone, Debug)]
pub struct NestedVmBuilder {
    carry: Vec<Carry>,
    env: Vec<(String, String)>,
    payload: String,
    kernel: Option<PathBuf>,
    kernel_args: Vec<String>,
    memory_mib: u32,
    vcpus: u32,
    payload_timeout: Duration,
    timeout: Duration,
    gzip: bool,
}

impl Default for NestedVmBuilder {
    fn default() -> Self {
        Self {
            carry: Vec::new(),
            env: Vec::new(),
            payload: "true".into(),
            kernel: None,
            kernel_args: Vec::new(),
            memory_mib: 1024,
            vcpus: 1,
            payload_timeout: Duration::from_secs(120),
            timeout: Duration::from_secs(180),
            gzip: false,
        }
    }
}

/// The payload's first lines in [`switchyard_in_harness`]: start switchyardd and wait for its
/// socket.
pub const START_SWITCHYARDD: &str = "export SWITCHYARD_ADDRESS=/run/switchyard/switchyard.sock\n\
     switchyardd --config /etc/switchyard/config.toml >/tmp/switchyardd.log 2>&1 &\n\
     i=0; while [ ! -S $SWITCHYARD_ADDRESS ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n";

/// A harness VM carrying switchyardd, yard, the vm shim, mkfs.erofs, the guest kernel and agent
/// and a busybox rootfs at `/containers/busybox`, with a config whose vm runtime has the
/// `[runtimes.vm.options]` lines `vm_options`; `payload` runs after switchyardd serves.
pub fn switchyard_in_harness(vm_options: &str, payload: &str) -> NestedVmBuilder {
    NestedVm::builder()
        .binary(crate::bin("switchyardd"), "/usr/bin/switchyardd")
        .binary(crate::bin("yard"), "/usr/bin/yard")
        .binary(
            crate::bin("containerd-shim-yard-vm-v1"),
            "/usr/bin/containerd-shim-yard-vm-v1",
        )
        .mkfs_erofs()
        .guest_kernel_and_initrd()
        .dir(crate::busybox_rootfs(), "/containers/busybox")
        .text(
            "/etc/switchyard/config.toml",
            format!(
                "root = \"/var/lib/switchyard\"\n\
                 state = \"/run/switchyard\"\n\
                 [grpc]\naddress = \"/run/switchyard/switchyard.sock\"\n\
                 [log]\nlevel = \"debug\"\n\
                 [runtimes.vm]\nruntime_type = \"io.containerd.yard-vm.v1\"\n\
                 [runtimes.vm.options]\n{vm_options}boot_timeout_ms = 60000\n"
            ),
            0o644,
        )
        .payload(&format!("{START_SWITCHYARDD}{payload}"))
        .payload_timeout(Duration::from_secs(300))
        .timeout(Duration::from_secs(450))
}

/// The CNI plugins issue 20's pod network needs in the harness (Debian's `bridge` and
/// `host-local`, static Go binaries), or false with the reason printed.
pub fn require_cni() -> bool {
    crate::require(
        ["bridge", "host-local"]
            .iter()
            .all(|p| Path::new(CNI_BIN_DIR).join(p).is_file()),
        "needs the CNI plugins (apt-get install containernetworking-plugins)",
    )
}

/// Where Debian installs the CNI plugins, on the host and in the harness.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The one pod's address on the harness's CNI network ([`NestedVmBuilder::pod_network`]).
pub const POD_IP: &str = "10.77.0.10";
/// The bridge's address: the harness's own namespace, in the place of a node.
pub const POD_GATEWAY: &str = "10.77.0.1";

impl NestedVmBuilder {
    /// A CNI network for switchyardd's pods in the harness (issue 20): Debian's `bridge` and
    /// `host-local` plugins, bridge `yardnest0` with the gateway [`POD_GATEWAY`], and a range of
    /// one address, so the harness's one pod gets [`POD_IP`]. No `portmap`: the harness has no
    /// iptables.
    pub fn pod_network(self) -> Self {
        let dir = Path::new(CNI_BIN_DIR);
        self.binary(dir.join("bridge"), "/usr/lib/cni/bridge")
            .binary(dir.join("host-local"), "/usr/lib/cni/host-local")
            .text(
                "/etc/cni/net.d/10-nested.conflist",
                format!(
                    r#"{{"cniVersion": "1.0.0", "name": "nested", "plugins": [{{"type": "bridge",
                    "bridge": "yardnest0", "isGateway": true, "ipam": {{"type": "host-local",
                    "ranges": [[{{"subnet": "10.77.0.0/24", "rangeStart": "{POD_IP}",
                    "rangeEnd": "{POD_IP}", "gateway": "{POD_GATEWAY}"}}]],
                    "dataDir": "/run/cni-ipam"}}}}]}}"#
                ),
                0o644,
            )
    }
}

impl NestedVmBuilder {
    /// Carries a file (as it is) to the absolute `guest` path.
    pub fn file(mut self, host: impl Into<PathBuf>, guest: &str) -> Self {
        self.carry.push(Carry::File {
            host: host.into(),
            guest: guest.into(),
        });
        self
    }

    /// Carries an executable to the absolute `guest` path, stripped, together with the shared
    /// libraries `ldd` lists for it (at the same paths) and the dynamic loader.
    pub fn binary(mut self, host: impl Into<PathBuf>, guest: &str) -> Self {
        self.carry.push(Carry::Binary {
            host: host.into(),
            guest: guest.into(),
        });
        self
    }

    /// Carries a directory tree (a container rootfs, say) to the absolute `guest` path.
    pub fn dir(mut self, host: impl Into<PathBuf>, guest: &str) -> Self {
        self.carry.push(Carry::Dir {
            host: host.into(),
            guest: guest.into(),
        });
        self
    }

    /// Writes a file with `content` and `mode` at the absolute `guest` path.
    pub fn text(mut self, guest: &str, content: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.carry.push(Carry::Text {
            guest: guest.into(),
            content: content.into(),
            mode,
        });
        self
    }

    /// Makes a symlink at the absolute `guest` path.
    pub fn symlink(mut self, target: &str, guest: &str) -> Self {
        self.carry.push(Carry::Symlink {
            target: target.into(),
            guest: guest.into(),
        });
        self
    }

    /// The microVM guest as `scripts/guest` installed it (in [`crate::guest_dir`], so
    /// `SWITCHYARD_GUEST_DIR` points at another build), at the default paths inside:
    /// `/var/lib/switchyard/guest/vmlinux` (the symlink resolved: a plain file inside) and
    /// `initrd.img`.
    pub fn guest_kernel_and_initrd(self) -> Self {
        let dir = crate::guest_dir();
        let kernel = dir.join("vmlinux");
        let kernel = std::fs::canonicalize(&kernel).unwrap_or(kernel);
        self.file(kernel, GUEST_KERNEL)
            .file(dir.join("initrd.img"), GUEST_INITRD)
    }

    /// `mkfs.erofs` (the vm shim builds rootfs images with it) as `/usr/bin/mkfs.erofs`.
    pub fn mkfs_erofs(self) -> Self {
        let host = crate::which("mkfs.erofs").unwrap_or_else(|| "/usr/bin/mkfs.erofs".into());
        self.binary(host, "/usr/bin/mkfs.erofs")
    }

    /// A variable for the payload's environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The shell script (busybox `sh`) to run; its exit status is the run's. It starts in
    /// `/tmp` (tmpfs), as root, with `/proc`, `/sys`, `/dev` mounted and tmpfs on `/run` and
    /// `/var/lib` on the initramfs itself.
    pub fn payload(mut self, script: &str) -> Self {
        self.payload = script.into();
        self
    }

    /// The outer kernel (default: [`find_kernel`]).
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Appended to the outer kernel's command line.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// The outer VM's memory (default 1024 MiB); the initramfs unpacks into it.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The outer VM's vCPUs (default 1: under TCG a second one made the run slower here).
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// How long the payload may run inside (default 120 s); then it is killed (status 124).
    pub fn payload_timeout(mut self, t: Duration) -> Self {
        self.payload_timeout = t;
        self
    }

    /// How long the whole run may take on the host (default 180 s); then QEMU is killed.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Compresses the initramfs with gzip (default: no; unpacking gzip under TCG costs more
    /// than QEMU loading the larger file).
    pub fn gzip(mut self, on: bool) -> Self {
        self.gzip = on;
        self
    }

    /// Assembles the initramfs in a temporary directory (removed with the [`NestedVm`]).
    pub fn build(self) -> Result<NestedVm> {
        let kernel = match self.kernel.clone() {
            Some(k) => k,
            None => find_kernel().context(
                "no outer kernel: run scripts/guest (or guest/kernel/build.sh nested), or set \
                 SWITCHYARD_NESTED_KERNEL",
            )?,
        };
        ensure!(
            kernel.is_file(),
            "outer kernel {} is missing",
            kernel.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("switchyard-nested-")
            .tempdir()
            .context("temp dir")?;
        let root = dir.path().join("root");
        let marker = format!(
            "SWITCHYARD-NESTED-{}",
            uuid::Uuid::new_v4().simple().to_string()[..12].to_uppercase()
        );
        let started = Instant::now();
        self.assemble(&root, &marker)?;
        let initrd = dir.path().join("initrd.cpio");
        pack(&root, &initrd, self.gzip)?;
        let initrd_bytes = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_dir_all(&root).context("remove the staging tree")?;
        Ok(NestedVm {
            kernel,
            initrd,
            initrd_bytes,
            pack_time: started.elapsed(),
            marker,
            kernel_args: self.kernel_args,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            timeout: self.timeout,
            dir,
        })
    }

    fn assemble(&self, root: &Path, marker: &str) -> Result<()> {
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "var/lib",
            "etc", "root", "nested",
        ] {
            std::fs::create_dir_all(root.join(d)).with_context(|| format!("mkdir {d}"))?;
        }
        let busybox =
            crate::busybox_binary().context("busybox (apt-get install busybox-static)")?;
        copy_file(busybox, &root.join("bin/busybox"))?;
        let list = Command::new(busybox)
            .arg("--list-full")
            .output()
            .context("busybox --list-full")?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let link = root.join(applet);
            if applet.is_empty() || applet == "bin/busybox" || link.exists() {
                continue;
            }
            std::os::unix::fs::symlink("/bin/busybox", &link)
                .with_context(|| format!("link {applet}"))?;
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
        std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
        let init = repo_root().join("tests/nested/init");
        copy_file(&init, &root.join("init"))?;
        set_mode(&root.join("init"), 0o755)?;

        let mut env = String::new();
        writeln!(env, "NESTED_MARKER={}", shell_quote(marker))?;
        writeln!(
            env,
            "NESTED_TIMEOUT_S={}",
            self.payload_timeout.as_secs().max(1)
        )?;
        for (k, v) in &self.env {
            ensure!(
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad environment variable name {k:?}"
            );
            writeln!(env, "{k}={}", shell_quote(v))?;
        }
        std::fs::write(root.join("nested/env"), env)?;
        std::fs::write(root.join("nested/payload"), &self.payload)?;

        for c in &self.carry {
            match c {
                Carry::File { host, guest } => {
                    copy_file(host, &inside(root, guest)?)?;
                }
                Carry::Binary { host, guest } => carry_binary(root, host, guest)?,
                Carry::Dir { host, guest } => {
                    let to = inside(root, guest)?;
                    std::fs::create_dir_all(&to)?;
                    let mut from = host.as_os_str().to_owned();
                    from.push("/.");
                    run(Command::new("cp").arg("-a").arg(from).arg(&to))?;
                }
                Carry::Text {
                    guest,
                    content,
                    mode,
                } => {
                    let to = inside(root, guest)?;
                    std::fs::write(&to, content).with_context(|| format!("write {guest}"))?;
                    set_mode(&to, *mode)?;
                }
                Carry::Symlink { target, guest } => {
                    let to = inside(root, guest)?;
                    let _ = std::fs::remove_file(&to);
                    std::os::unix::fs::symlink(target, &to)
                        .with_context(|| format!("symlink {guest}"))?;
                }
            }
        }
        Ok(())
    }
}

/// The host path for the absolute guest path `guest` under `root`, its parent created.
fn inside(root: &Path, guest: &str) -> Result<PathBuf> {
    let rel = guest
        .strip_prefix('/')
        .with_context(|| format!("guest path {guest:?} is not absolute"))?;
    ensure!(
        !rel.is_empty() && !rel.split('/').any(|c| c == ".."),
        "bad guest path {guest:?}"
    );
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("mkdir for {guest}"))?;
    }
    Ok(p)
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copy {}", from.display()))?;
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The executable stripped at `guest`, and every library `ldd` names at its own path.
fn carry_binary(root: &Path, host: &Path, guest: &str) -> Result<()> {
    let to = inside(root, guest)?;
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&to)
        .arg(host))?;
    for lib in shared_libraries(host)? {
        let at = inside(root, &lib.to_string_lossy())?;
        if !at.exists() {
            // ldd names the path the loader opens; copy what it resolves to.
            copy_file(&std::fs::canonicalize(&lib)?, &at)?;
        }
    }
    Ok(())
}

/// The absolute paths `ldd` lists for `bin` (libraries and the loader); none for a static one.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .stdin(Stdio::null())
        .output()
        .context("spawn ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable" (on stderr with glibc's ldd)
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("not a dynamic executable") || text.contains("statically linked"),
            "ldd {}: {}",
            bin.display(),
            err.trim()
        );
        return Ok(Vec::new());
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2
        // (0x…)", "linux-vdso.so.1 (0x…)", "statically linked"
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let p = rest.split_whitespace().next().unwrap_or("");
                if p == "not" {
                    bail!("ldd: {} not found", name.trim());
                }
                p
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `root` as a newc cpio archive (owner root), gzip'd or not.
fn pack(root: &Path, out: &Path, gzip: bool) -> Result<()> {
    let script = format!(
        "set -o pipefail; find . -mindepth 1 -print0 | LC_ALL=C sort -z | \
         cpio --quiet --null -o -H newc -R +0:+0 {} > \"$1\"",
        if gzip { "| gzip -1" } else { "" }
    );
    run(Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("pack")
        .arg(out)
        .current_dir(root))
}

/// A built outer VM: kernel + initramfs, ready to [`run`](NestedVm::run) (more than once).
#[derive(Debug)]
pub struct NestedVm {
    kernel: PathBuf,
    initrd: PathBuf,
    initrd_bytes: u64,
    pack_time: Duration,
    marker: String,
    kernel_args: Vec<String>,
    memory_mib: u32,
    vcpus: u32,
    timeout: Duration,
    dir: tempfile::TempDir,
}

/// What a run gave.
#[derive(Debug)]
pub struct NestedRun {
    /// The payload's exit status (124: it timed out).
    pub status: i32,
    /// What the payload printed (stdout and stderr, interleaved, `\r` removed): the console
    /// between the markers.
    pub output: String,
    /// The whole serial console (kernel messages included).
    pub console: String,
    /// Guest uptime when the payload started: the outer VM's boot.
    pub boot_to_payload: Duration,
    /// Guest uptime at the end marker minus `boot_to_payload`.
    pub payload_time: Duration,
    /// QEMU start to QEMU exit, on the host.
    pub wall: Duration,
}

impl NestedVm {
    pub fn builder() -> NestedVmBuilder {
        NestedVmBuilder::default()
    }

    /// The initramfs (in a temporary directory that lives as long as this).
    pub fn initrd_path(&self) -> &Path {
        &self.initrd
    }

    /// The initramfs size and how long assembling it took.
    pub fn initrd_stats(&self) -> (u64, Duration) {
        (self.initrd_bytes, self.pack_time)
    }

    /// The outer kernel's command line.
    fn cmdline(&self) -> String {
        let mut args = vec![
            "console=ttyS0",
            "reboot=t",
            "panic=-1",
            "quiet",
            "rdinit=/init",
            // What docs/vm.md found to matter under TCG
            "nolapic_timer",
            "no_timer_check",
            "pty.legacy_count=0",
            "8250.nr_uarts=1",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        if let Some(khz) = host_tsc_khz() {
            args.push(format!("tsc_early_khz={khz}"));
        }
        args.extend(self.kernel_args.iter().cloned());
        args.join(" ")
    }

    /// The QEMU command line (without the console file).
    pub fn qemu_command(&self, console: &Path) -> Command {
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "microvm,acpi=off", "-accel", "tcg"])
            .args(["-cpu", "qemu64,+svm"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(self.cmdline());
        cmd
    }

    /// Boots the outer VM, runs the payload, and returns its status and output. Fails (with
    /// the console's tail) when QEMU cannot start, the run exceeds the timeout (QEMU is
    /// killed), or QEMU ends without the end marker (the guest crashed or panicked).
    pub fn run(&self) -> Result<NestedRun> {
        let console = self.dir.path().join(format!(
            "console-{}.log",
            uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
        ));
        let stderr_path = self.dir.path().join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).context("qemu stderr file")?;
        let mut cmd = self.qemu_command(&console);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        die_with_parent(&mut cmd);
        let started = Instant::now();
        let child = cmd.spawn().context("spawn qemu-system-x86_64")?;
        let mut qemu = Qemu(child);
        let deadline = started + self.timeout;
        let status = loop {
            if let Some(s) = qemu.0.try_wait().context("wait for qemu")? {
                break s;
            }
            if Instant::now() >= deadline {
                qemu.kill();
                bail!(
                    "the nested VM did not finish within {:?} (QEMU killed); console tail:\n{}",
                    self.timeout,
                    tail(&read_lossy(&console), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let wall = started.elapsed();
        let text = read_lossy(&console).replace('\r', "");
        match parse_console(&text, &self.marker) {
            Some(r) => Ok(NestedRun {
                status: r.status,
                output: r.output,
                boot_to_payload: r.begin,
                payload_time: r.end.saturating_sub(r.begin),
                wall,
                console: text,
            }),
            None => bail!(
                "the nested VM ended ({status}) without reporting the payload's status; QEMU \
                 stderr: {}; console tail:\n{}",
                read_lossy(&stderr_path).trim(),
                tail(&text, 40)
            ),
        }
    }
}

/// QEMU, killed if the run is abandoned (a panic, a timeout).
struct Qemu(Child);

impl Qemu {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// QEMU gets SIGKILL if the test process dies first, so a killed test run leaves no VM behind.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The host TSC rate (kHz), measured over 25 ms, when it ticks at a constant rate: under TCG
/// the guest reads the host's TSC, and `tsc_early_khz` saves its calibration (as the vm shim
/// does).
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if !(has("constant_tsc") && has("nonstop_tsc")) {
        return None;
    }
    let (c0, t0) = rdtsc_now();
    std::thread::sleep(Duration::from_millis(25));
    let (c1, t1) = rdtsc_now();
    let nanos = u64::try_from(t1.duration_since(t0).as_nanos()).ok()?;
    (nanos > 0).then(|| c1.wrapping_sub(c0).saturating_mul(1_000_000) / nanos)
}

fn rdtsc_now() -> (u64, Instant) {
    // SAFETY: `rdtsc` exists on every x86_64 CPU and faults only with CR4.TSD, which Linux sets
    // only after prctl(PR_SET_TSC, PR_TSC_SIGSEGV), never called here; it touches no memory.
    let before = unsafe { core::arch::x86_64::_rdtsc() };
    let now = Instant::now();
    // SAFETY: as above.
    let after = unsafe { core::arch::x86_64::_rdtsc() };
    (before / 2 + after / 2, now)
}

#[derive(Debug, PartialEq)]
struct Parsed {
    status: i32,
    output: String,
    begin: Duration,
    end: Duration,
}

fn parse_console(text: &str, marker: &str) -> Option<Parsed> {
    let begin_tag = format!("{marker} BEGIN uptime=");
    let end_tag = format!("{marker} END status=");
    let b = text.find(&begin_tag)?;
    let after_begin = &text[b + begin_tag.len()..];
    let (begin_uptime, rest) = after_begin.split_once('\n')?;
    let e = rest.find(&end_tag)?;
    let output = rest[..e].to_owned();
    let end_line = rest[e + end_tag.len()..].lines().next()?;
    let (status, end_uptime) = end_line.split_once(" uptime=")?;
    let secs = |s: &str| s.trim().parse::<f64>().ok().map(Duration::from_secs_f64);
    Some(Parsed {
        status: status.trim().parse().ok()?,
        output,
        begin: secs(begin_uptime)?,
        end: secs(end_uptime)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_markers_give_status_output_and_times() {
        let m = "SWITCHYARD-NESTED-ABC";
        let console = format!(
            "[    0.1] kernel noise\n{m} BEGIN uptime=0.61\nhello\nworld\n\
             {m} END status=3 uptime=1.75\n[    1.8] reboot: Restarting system\n"
        );
        let p = parse_console(&console, m).unwrap();
        assert_eq!(p.status, 3);
        assert_eq!(p.output, "hello\nworld\n");
        assert_eq!(p.begin, Duration::from_millis(610));
        assert_eq!(p.end, Duration::from_millis(1750));
        // another run's marker, or a run cut short, is not a result
        assert_eq!(parse_console(&console, "SWITCHYARD-NESTED-XYZ"), None);
        let cut = format!("{m} BEGIN uptime=0.61\nhello\n");
        assert_eq!(parse_console(&cut, m), None);
    }

    #[test]
    fn ldd_output_lists_libraries_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = "\tlibfoo.so.1 => not found\n";
        assert!(
            parse_ldd(missing)
                .unwrap_err()
                .to_string()
                .contains("libfoo")
        );
    }

    #[test]
    fn guest_paths_stay_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        assert!(inside(root.path(), "relative").is_err());
        assert!(inside(root.path(), "/a/../../etc").is_err());
        assert_eq!(
            inside(root.path(), "/usr/bin/x").unwrap(),
            root.path().join("usr/bin/x")
        );
        assert!(root.path().join("usr/bin").is_dir());
    }

    #[test]
    fn env_values_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
