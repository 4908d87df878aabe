//! The QEMU backend against real QEMU and the guest kernel, with a busybox initramfs whose
//! `/init` (fixtures/init.sh) plays the agent: it writes the ready banner on the `yard.agent`
//! port and echoes lines back.
//!
//! Needs root, `qemu-system-x86_64`, a guest kernel (`$SWITCHYARD_VM_KERNEL`, or the newest
//! build under /var/cache/switchyard/kernel with virtio-console) and busybox-static; each test
//! skips with a printed reason where one is missing (fails instead under
//! `SWITCHYARD_REQUIRE_ALL=1`: the test kit's `require`). CI here has them all. Guests run under
//! TCG unless KVM can run them (see `virt`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use containerd_shim_yard_vm_v1::hypervisor::{Accel, BootVmError, Hypervisor, VmConfig, VmmExit};
use containerd_shim_yard_vm_v1::image::ImageCache;
use containerd_shim_yard_vm_v1::qemu::{self, Qemu};
use containerd_shim_yard_vm_v1::virt::{self, AccelPreference};
use switchyard_tests::{busybox_binary, env_usize, processes_matching, reaped, require};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use yard_agent_protocol::READY_BANNER;

const INIT: &str = include_str!("fixtures/init.sh");
const KERNEL_CACHE: &str = "/var/cache/switchyard/kernel";

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    /// The kernel has 9p (the share can be mounted).
    nine_p: bool,
}

/// The guest to boot, or why these tests cannot run here.
fn guest() -> Result<&'static Guest, String> {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            if !switchyard_tests::is_root() {
                return Err("not root".into());
            }
            if qemu::find_binary(Path::new(qemu::DEFAULT_BINARY)).is_none() {
                return Err("qemu-system-x86_64 not installed".into());
            }
            if busybox_binary().is_none() {
                return Err("no busybox (apt-get install busybox-static)".into());
            }
            let kernel = find_kernel().ok_or("no guest kernel: run guest/kernel/build.sh")?;
            let config =
                std::fs::read_to_string(kernel.with_file_name(".config")).unwrap_or_default();
            let initrd = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-test-initrd.cpio");
            write_initrd(&initrd).map_err(|e| format!("write {}: {e}", initrd.display()))?;
            Ok(Guest {
                kernel,
                initrd,
                nine_p: config.contains("\nCONFIG_9P_FS=y"),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

macro_rules! guest_or_skip {
    () => {
        match guest() {
            Ok(g) => g,
            Err(reason) => {
                require(false, &reason);
                return;
            }
        }
    };
}

/// `$SWITCHYARD_VM_KERNEL`, else the newest cached build with virtio-console, preferring one
/// with 9p.
fn find_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("SWITCHYARD_VM_KERNEL") {
        return Some(PathBuf::from(k)).filter(|k| k.is_file());
    }
    let mut found: Vec<(bool, std::time::SystemTime, PathBuf)> = std::fs::read_dir(KERNEL_CACHE)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let vmlinux = e.path().join("vmlinux");
            let config = std::fs::read_to_string(e.path().join(".config")).ok()?;
            let mtime = vmlinux.metadata().ok()?.modified().ok()?;
            config
                .contains("\nCONFIG_VIRTIO_CONSOLE=y")
                .then(|| (config.contains("\nCONFIG_9P_FS=y"), mtime, vmlinux))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, _, k)| k)
}

/// An uncompressed newc cpio: /init, /bin/busybox, the mount points and /dev/console.
fn write_initrd(path: &Path) -> std::io::Result<()> {
    let busybox = std::fs::read(busybox_binary().ok_or(std::io::ErrorKind::NotFound)?)?;
    let mut out = Vec::with_capacity(busybox.len() + 4096);
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        ino += 1;
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for dir in ["bin", "dev", "proc", "sys", "mnt", "share"] {
        entry(dir, 0o040755, (0, 0), b"");
    }
    entry("dev/console", 0o020600, (5, 1), b"");
    entry("bin/busybox", 0o100755, (0, 0), &busybox);
    entry("init", 0o100755, (0, 0), INIT.as_bytes());
    entry("TRAILER!!!", 0, (0, 0), b"");
    let tmp = path.with_extension("tmp");
    std::fs::File::create(&tmp)?.write_all(&out)?;
    std::fs::rename(tmp, path)
}

fn accel() -> Accel {
    virt::choose_accel(AccelPreference::Auto, &virt::detect()).unwrap()
}

fn config(g: &Guest, state: &Path, id: &str, mode: &str) -> VmConfig {
    VmConfig {
        id: format!("vmtest-{id}-{}", std::process::id()),
        state_dir: state.to_owned(),
        kernel: g.kernel.clone(),
        initrd: g.initrd.clone(),
        kernel_args: vec![format!("yard.test={mode}")],
        vcpus: 1,
        memory_mib: 128,
        accel: accel(),
        boot_timeout: Duration::from_secs(20),
        root_disk: None,
        share_dir: None,
        volume_dir: None,
        net: None,
    }
}

struct Agent {
    stream: BufReader<tokio::net::UnixStream>,
}

impl Agent {
    async fn ask(&mut self, line: &str) -> String {
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut answer))
            .await
            .expect("guest answers")
            .unwrap();
        answer.trim_end().to_owned()
    }
}

#[tokio::test]
async fn boots_serves_the_agent_stream_disk_and_share_then_stops() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let rootfs = tempfile::tempdir().unwrap();
    std::fs::write(rootfs.path().join("hello"), "from the root disk").unwrap();
    let images = ImageCache::new(state.path().join("images"));
    let image = images.image_for(rootfs.path()).unwrap();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("hello"), "from the share").unwrap();

    let mut cfg = config(g, state.path(), "echo", "echo");
    cfg.root_disk = Some(image.path.clone());
    cfg.share_dir = Some(share.path().to_owned());
    let timeout = cfg.boot_timeout;
    let mut vm = Qemu::default().boot(cfg).await.unwrap();
    let pid = vm.pid().unwrap();
    eprintln!(
        "boot to banner: {} ms ({}, {})",
        vm.boot_time().as_millis(),
        vm.accel(),
        g.kernel.display()
    );
    assert!(vm.boot_time() > Duration::ZERO && vm.boot_time() < timeout);
    assert_eq!(vm.accel(), accel());

    let mut agent = Agent {
        stream: BufReader::new(vm.take_agent_stream().unwrap()),
    };
    assert!(vm.take_agent_stream().is_none());
    // The banner was consumed: the first line read is the echo.
    assert_eq!(agent.ask("ping").await, "echo:ping");
    assert_eq!(
        agent.ask(&format!("disk {}", image.fstype())).await,
        "disk:from the root disk"
    );
    if g.nine_p {
        assert_eq!(agent.ask("share").await, "share:from the share");
    } else {
        eprintln!("share not checked: the kernel has no 9p");
    }

    // The guest clock runs at the host's pace (under TCG it reads the host TSC at the rate the
    // backend measured and passed as tsc_early_khz).
    let uptime = async |agent: &mut Agent| -> f64 {
        let answer = agent.ask("uptime").await;
        answer.strip_prefix("uptime:").unwrap().parse().unwrap()
    };
    let (guest0, host0) = (uptime(&mut agent).await, Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (guest1, host1) = (uptime(&mut agent).await, Instant::now());
    let ratio = (guest1 - guest0) / (host1 - host0).as_secs_f64();
    assert!(
        (0.9..1.1).contains(&ratio),
        "guest clock runs at {ratio} x the host's"
    );

    let status = vm.status().await.unwrap();
    assert!(status.running, "{status:?}");
    assert_eq!(status.state, "running");
    assert!(vm.exit_status().is_none());

    let started = Instant::now();
    vm.stop(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "QMP quit, not SIGKILL"
    );
    assert!(reaped(pid), "QEMU {pid} still there after stop");
    assert!(vm.exit_status().is_some());
    vm.stop(Duration::from_secs(1)).await;
    vm.exited().await;
    assert!(vm.status().await.is_err());

    let log = std::fs::read_to_string(state.path().join("console.log")).unwrap();
    assert!(log.len() < 1024 * 1024 + 200);
}

#[tokio::test]
async fn guest_reboot_ends_the_vm_and_dropping_a_vm_kills_qemu() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let mut vm = Qemu::default()
        .boot(config(g, state.path(), "bye", "echo"))
        .await
        .unwrap();
    let mut agent = Agent {
        stream: BufReader::new(vm.take_agent_stream().unwrap()),
    };
    agent.stream.get_mut().write_all(b"bye\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), vm.exited())
        .await
        .expect("QEMU exits when the guest reboots");
    assert_eq!(vm.exit_status(), Some(VmmExit::Code(0)));
    assert!(reaped(vm.pid().unwrap()));

    let state = tempfile::tempdir().unwrap();
    let vm = Qemu::default()
        .boot(config(g, state.path(), "drop", "echo"))
        .await
        .unwrap();
    let pid = vm.pid().unwrap();
    drop(vm);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reaped(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reaped(pid), "QEMU {pid} survived its Vm");
}

#[tokio::test]
async fn guest_that_exits_during_boot_is_reported_with_its_console() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(g, state.path(), "exit", "exit");
    let id = cfg.id.clone();
    let err = Qemu::default().boot(cfg).await.err().unwrap();
    let BootVmError::ExitedDuringBoot { status, console } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        *status,
        VmmExit::Code(0),
        "reboot=t + -no-reboot: QEMU exits cleanly"
    );
    assert!(console.contains("Attempted to kill init"), "{console}");
    assert!(
        err.to_string()
            .starts_with("VMM exited during boot (exit code 0); console tail:\n")
    );
    assert!(processes_matching(&[&id]).is_empty());
}

#[tokio::test]
async fn boot_timeout_kills_qemu() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(g, state.path(), "hang", "hang");
    cfg.boot_timeout = Duration::from_millis(500);
    let id = cfg.id.clone();
    let started = Instant::now();
    let err = Qemu::default().boot(cfg).await.err().unwrap();
    assert!(
        matches!(
            err,
            BootVmError::Timeout {
                timeout_ms: 500,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("guest agent not ready after 500 ms; console tail:")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(processes_matching(&[&id]).is_empty(), "QEMU left running");
}

#[tokio::test]
async fn wrong_banner_is_refused() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(g, state.path(), "badbanner", "badbanner");
    let id = cfg.id.clone();
    let err = Qemu::default().boot(cfg).await.err().unwrap();
    let BootVmError::BannerMismatch { got } = &err else {
        panic!("{err}");
    };
    assert_eq!(got.len(), READY_BANNER.len());
    assert!(got.starts_with("not the banner"));
    assert!(processes_matching(&[&id]).is_empty());
}

#[tokio::test]
async fn stop_without_grace_kills_at_once() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let vm = Qemu::default()
        .boot(config(g, state.path(), "kill", "stay"))
        .await
        .unwrap();
    vm.stop(Duration::ZERO).await;
    assert_eq!(vm.exit_status(), Some(VmmExit::Signal(9)));
    assert!(reaped(vm.pid().unwrap()));
}

#[tokio::test]
async fn qemu_refusing_the_kernel_is_reported_with_its_message() {
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let kernel = state.path().join("vmlinux");
    std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
    let cfg = VmConfig {
        kernel,
        ..config(g, state.path(), "badkernel", "echo")
    };
    let err = Qemu::default().boot(cfg).await.err().unwrap();
    let BootVmError::ExitedDuringBoot { status, console } = &err else {
        panic!("{err}");
    };
    assert_eq!(*status, VmmExit::Code(1));
    // QEMU's stderr shares the console stream.
    assert!(console.contains("linux kernel too old"), "{console}");
}

#[tokio::test]
async fn missing_files_are_named_before_anything_starts() {
    let state = tempfile::tempdir().unwrap();
    let cfg = VmConfig {
        id: "missing".into(),
        state_dir: state.path().to_owned(),
        kernel: state.path().join("no-vmlinux"),
        initrd: state.path().join("no-initrd"),
        kernel_args: vec![],
        vcpus: 1,
        memory_mib: 128,
        accel: Accel::Tcg,
        boot_timeout: Duration::from_secs(1),
        root_disk: None,
        share_dir: None,
        volume_dir: None,
        net: None,
    };
    let err = Qemu::default().boot(cfg.clone()).await.err().unwrap();
    assert!(matches!(err, BootVmError::KernelMissing { .. }), "{err}");
    assert!(err.to_string().contains("guest/kernel/build.sh"));
    assert!(err.to_string().contains("`kernel` option"));

    let kernel = state.path().join("vmlinux");
    std::fs::write(&kernel, "not a kernel").unwrap();
    let cfg = VmConfig { kernel, ..cfg };
    let err = Qemu::default().boot(cfg.clone()).await.err().unwrap();
    assert!(matches!(err, BootVmError::InitrdMissing { .. }), "{err}");
    assert!(err.to_string().contains("guest/agent/build-initrd.sh"));

    let initrd = state.path().join("initrd");
    std::fs::write(&initrd, "not an initrd").unwrap();
    let cfg = VmConfig { initrd, ..cfg };
    let err = Qemu::new("/nonexistent/qemu-system-x86_64")
        .boot(cfg)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, BootVmError::QemuMissing { .. }), "{err}");
    assert!(err.to_string().contains("apt-get install qemu-system-x86"));
}

/// Boot-to-banner times through the backend, one VM at a time (`cargo test -p
/// containerd-shim-yard-vm-v1 --test qemu -- --ignored --nocapture boot_time`).
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn boot_time_report() {
    let g = guest_or_skip!();
    let runs = env_usize("BOOTS", 5);
    let mut times = Vec::new();
    for i in 0..runs {
        let state = tempfile::tempdir().unwrap();
        let vm = Qemu::default()
            .boot(config(g, state.path(), &format!("time{i}"), "echo"))
            .await
            .unwrap();
        times.push(vm.boot_time());
        vm.stop(Duration::from_secs(2)).await;
    }
    times.sort();
    eprintln!(
        "{} boots ({}, {}): min {} ms, median {} ms, max {} ms",
        runs,
        accel(),
        g.kernel.display(),
        times[0].as_millis(),
        times[runs / 2].as_millis(),
        times[runs - 1].as_millis()
    );
}

const CHILD_ENV: &str = "YARD_VM_TEST_SHIM";

/// Plays a shim for [`qemu_dies_with_a_killed_shim`]: boots a VM, says QEMU's pid, waits.
#[tokio::test]
#[ignore = "run by qemu_dies_with_a_killed_shim"]
async fn helper_shim_that_boots_and_waits() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let g = guest_or_skip!();
    let state = tempfile::tempdir().unwrap();
    let vm = Qemu::default()
        .boot(config(g, state.path(), "orphan", "stay"))
        .await
        .unwrap();
    println!("qemu-pid {}", vm.pid().unwrap());
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn qemu_dies_with_a_killed_shim() {
    use std::io::BufRead;
    let _ = guest_or_skip!();
    let mut shim = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_shim_that_boots_and_waits",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = shim.stdout.take().unwrap();
    let pid = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("qemu-pid ")?.parse::<u32>().ok())
    })
    .await
    .unwrap()
    .expect("the helper shim booted a VM");
    assert!(!reaped(pid));
    shim.kill().unwrap(); // SIGKILL: no destructor runs in the shim
    shim.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // QEMU was reparented (to init or a subreaper), which collects it.
    while !reaped(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reaped(pid), "QEMU {pid} outlived its shim");
}
