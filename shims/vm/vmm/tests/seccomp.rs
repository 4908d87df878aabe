//! Issue 16 item 8: the VMM's vCPU, control and device threads run under seccomp filters,
//! installed per thread (the threads of the process that embeds the VMM stay unfiltered), and a
//! system call outside a filter kills the process.
//!
//! Needs root and /dev/kvm; skips with a printed reason otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{Console, LONG_MODE_RESET, config, elf, have_kvm, mmio_write32, real_mode, wait_for};
use yard_vmm::bus::BusDevice;
use yard_vmm::seccomp::Seccomp;
use yard_vmm::vmm::{BlockConfig, NetConfig, StartOptions, Vm, VmExit, VsockConfig};

/// `Seccomp:` and `NoNewPrivs:` of every thread of this process, by thread name (several
/// threads may share one).
fn thread_modes() -> BTreeMap<String, Vec<(u32, u32)>> {
    let mut modes: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        // A thread that ended meanwhile has nothing to say.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
                .trim()
                .parse()
                .unwrap()
        };
        modes
            .entry(comm.trim().to_owned())
            .or_default()
            .push((field("Seccomp:"), field("NoNewPrivs:")));
    }
    modes
}

const VMM_THREADS: &[&str] = &[
    "vcpu0",
    "vcpu1",
    "vm-control",
    "virtio-blk",
    "virtio-vsock",
    "virtio-net",
];

/// A spinning two-vCPU VM with a root disk, a spare disk, vsock and net, so every kind of VMM
/// thread exists; the per-name modes seen while it runs.
fn modes_of_a_running_vm(seccomp: Seccomp) -> BTreeMap<String, Vec<(u32, u32)>> {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cfg = config(&Console::default(), "/nonexistent".into());
    cfg.vcpus = 2;
    cfg.block = Some(BlockConfig {
        path: disk,
        read_only: true,
    });
    cfg.spare_disks = 1;
    cfg.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("vsock.sock"),
    });
    // A socket stands in for the tap: the guest never activates the device, so nothing but the
    // worker's creation touches it.
    let (tap, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    cfg.net = Some(NetConfig {
        tap: tap.into(),
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
    });
    let vm = Vm::start_with(
        cfg,
        StartOptions {
            seccomp,
            ..real_mode(common::SPIN)
        },
    )
    .unwrap();
    // Vm::start returns once every thread of the VM has installed its filter.
    let modes = thread_modes();
    vm.stop();
    modes
}

#[test]
fn issue16_every_vmm_thread_runs_under_its_filter_and_no_other_thread_does() {
    if !have_kvm() {
        return;
    }
    let modes = modes_of_a_running_vm(Seccomp::Enforce);
    for name in VMM_THREADS {
        let threads = modes
            .get(*name)
            .unwrap_or_else(|| panic!("no {name} thread: {modes:?}"));
        let want = if *name == "virtio-blk" { 2 } else { 1 };
        assert_eq!(threads.len(), want, "{name} threads: {modes:?}");
        assert!(
            threads.iter().all(|&m| m == (2, 1)),
            "{name} is not in seccomp filter mode with no_new_privs: {threads:?}"
        );
    }
    // The caller's threads (this test's among them) are untouched: the filters are per thread.
    let own: u32 = std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(own, 0, "the calling thread got a filter");
    for (name, threads) in &modes {
        // KVM's own worker (`kvm-nx-lpage-recovery`) is made by the kernel from the vCPU thread
        // that first enters the guest, so it carries that thread's filter; it never runs in
        // user space.
        if !VMM_THREADS.contains(&name.as_str()) && !name.starts_with("kvm-") {
            assert!(
                threads.iter().all(|&m| m == (0, 0)),
                "thread {name} is not the VMM's but is filtered: {threads:?}"
            );
        }
    }

    // The same VM with the filters off shows them absent: the check above can tell.
    let off = modes_of_a_running_vm(Seccomp::Off);
    for name in VMM_THREADS {
        assert!(
            off[*name].iter().all(|&m| m == (0, 0)),
            "{name} under Seccomp::Off: {off:?}"
        );
    }
}

/// Where the probe device sits: above the guest's RAM, below the virtio-mmio window.
const PROBE_BASE: u64 = 0xd080_0000;
const ENTRY: u64 = 0x20_0000;
const CHILD_ENV: &str = "YARD_VMM_SECCOMP_CHILD";

/// An MMIO device whose write handler, on a vCPU thread, stands in for a device model taken over
/// by the guest: it opens a file and makes an Internet socket, neither of which a vCPU thread
/// has any use for, and reports each step on stderr.
struct Probe {
    writes: Arc<Mutex<u32>>,
}

impl BusDevice for Probe {
    fn read(&mut self, _base: u64, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        *self.writes.lock().unwrap() += 1;
        let mut err = std::io::stderr();
        let opened = std::fs::File::open("/proc/self/status");
        let _ = match &opened {
            Ok(_) => writeln!(err, "probe: open: ok"),
            Err(e) => writeln!(err, "probe: open: {:?}", e.raw_os_error()),
        };
        let _ = writeln!(err, "probe: calling socket(AF_INET)");
        // SAFETY: socket(2) with constant arguments; the descriptor is closed right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let _ = writeln!(err, "probe: socket returned {fd}");
        if fd >= 0 {
            // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
            unsafe { libc::close(fd) };
        }
    }
}

/// The child: boots a long-mode guest that writes to the probe, then resets.
fn child(seccomp: Seccomp) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("probe.elf");
    let mut code = mmio_write32(PROBE_BASE, 1);
    code.extend_from_slice(LONG_MODE_RESET);
    std::fs::write(&kernel, elf(&code, ENTRY)).unwrap();
    let writes = Arc::new(Mutex::new(0));
    let probe = Arc::new(Mutex::new(Probe {
        writes: writes.clone(),
    }));
    let vm = Vm::start_with(
        config(&Console::default(), kernel),
        StartOptions {
            mmio_devices: vec![(probe, PROBE_BASE, 0x1000)],
            seccomp,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(wait_for(&vm, 10), VmExit::Reset);
    assert_eq!(*writes.lock().unwrap(), 1);
    eprintln!("probe: child done");
}

/// Runs this test in a child process with `mode`; its exit status and stderr.
fn run_child(test: &str, mode: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("child ({mode}): {:?}\n{stderr}", out.status);
    (out.status, stderr)
}

#[test]
fn issue16_a_syscall_outside_the_vcpu_filter_kills_the_process() {
    const NAME: &str = "issue16_a_syscall_outside_the_vcpu_filter_kills_the_process";
    match std::env::var(CHILD_ENV).as_deref() {
        Ok("enforce") => return child(Seccomp::Enforce),
        Ok("off") => return child(Seccomp::Off),
        _ => {}
    }
    if !have_kvm() {
        return;
    }
    assert!(Path::new("/proc/self/status").exists());

    // Without filters the probe does all it tries, and the child finishes: the harness sees a
    // survivor as one.
    let (status, log) = run_child(NAME, "off");
    assert!(status.success(), "{status:?}");
    assert!(log.contains("probe: open: ok"), "{log}");
    assert!(log.contains("probe: socket returned"), "{log}");
    assert!(!log.contains("probe: socket returned -1"), "{log}");
    assert!(log.contains("probe: child done"), "{log}");

    // Under the vCPU filter: the open is refused with EACCES (a file look-up), the socket kills
    // the whole process with SIGSYS before it returns.
    let (status, log) = run_child(NAME, "enforce");
    assert!(
        log.contains(&format!("probe: open: Some({})", libc::EACCES)),
        "{log}"
    );
    assert!(log.contains("probe: calling socket(AF_INET)"), "{log}");
    assert!(!log.contains("probe: socket returned"), "{log}");
    assert!(!log.contains("probe: child done"), "{log}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}
