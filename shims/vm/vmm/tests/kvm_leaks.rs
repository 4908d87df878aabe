//! A VM leaves nothing behind: after it ends and is dropped, or after `Vm::start` fails midway,
//! the process has the same file descriptors, threads and guest memory mappings as before. Its
//! own test binary with one test, so nothing else opens fds or spawns threads meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{RESET, SPIN, have_kvm, real_mode};

use yard_vmm::vmm::{BlockConfig, Vm, VmExit, VmmConfig, VsockConfig};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Mappings the size of the guest RAM (32 MiB) and of its guard reservation (plus two pages).
/// Counting all mappings would see glibc's cache of thread stacks.
fn guest_ram_mappings() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| {
            let range = l.split(' ').next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let len = u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
            len == 32 << 20 || len == (32 << 20) + 2 * 4096
        })
        .count()
}

fn config(kernel: &Path, vcpus: u8) -> VmmConfig {
    VmmConfig {
        kernel: kernel.into(),
        initrd: None,
        cmdline: String::new(),
        vcpus,
        memory_mib: 32,
        console: Box::new(std::io::sink()),
        block: None,
        spare_disks: 0,
        vsock: None,
        net: None,
    }
}

fn start(code: &[u8], vcpus: u8) -> Vm {
    Vm::start_with(config(Path::new("/nonexistent"), vcpus), real_mode(code)).unwrap()
}

#[test]
fn ended_and_stopped_vms_leave_no_fds_or_threads() {
    if !have_kvm() {
        return;
    }
    // Warm up once: the kick signal handler and the allocator's arenas are per process.
    drop(start(RESET, 1));
    let fds = count("/proc/self/fd");
    let threads = count("/proc/self/task");
    let ram_maps = guest_ram_mappings();

    // Ends by itself (i8042 reset), then dropped.
    let vm = start(RESET, 1);
    assert_eq!(vm.wait(), VmExit::Reset);
    assert_eq!(
        guest_ram_mappings(),
        ram_maps + 1,
        "the RAM mapping while the VM exists"
    );
    drop(vm);
    assert_eq!(count("/proc/self/fd"), fds);
    assert_eq!(count("/proc/self/task"), threads);

    // Spinning on two vCPUs, dropped without stop().
    let vm = start(SPIN, 2);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        count("/proc/self/task") >= threads + 3,
        "two vCPU threads and the control thread"
    );
    drop(vm);
    assert_eq!(count("/proc/self/fd"), fds);
    assert_eq!(count("/proc/self/task"), threads);
    assert_eq!(guest_ram_mappings(), ram_maps, "guest memory unmapped");

    a_start_that_fails_midway_leaves_nothing_behind();
}

/// What the process holds, to compare before and after.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    fds: usize,
    threads: usize,
    ram_maps: usize,
}

fn held() -> Held {
    Held {
        fds: count("/proc/self/fd"),
        threads: count("/proc/self/task"),
        ram_maps: guest_ram_mappings(),
    }
}

/// Part of the one test: failing starts.
fn a_start_that_fails_midway_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("vmlinux");
    std::fs::write(&not_elf, b"not an ELF file").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.path().join("vsock.sock");
    let block = |path: PathBuf| {
        Some(BlockConfig {
            path,
            read_only: false,
        })
    };
    let vsock = |uds_path: PathBuf| {
        Some(VsockConfig {
            guest_cid: 3,
            uds_path,
        })
    };
    let fail = |cfg: VmmConfig| -> String {
        let err = Vm::start(cfg).err().expect("the start fails");
        switchyard_base::chain(&err)
    };
    // Warm up: the kick handler, the allocator's arenas.
    drop(start(RESET, 1));
    let before = held();

    // Every device built, then the kernel does not load.
    let mut cfg = config(&not_elf, 2);
    cfg.block = block(disk.clone());
    cfg.vsock = vsock(uds.clone());
    let msg = fail(cfg);
    assert!(msg.contains("kernel"), "{msg}");
    assert_eq!(held(), before, "after a kernel that does not load: {msg}");
    assert!(!uds.exists(), "the vsock socket is removed");

    // Every device built, then the command line is too long for the kernel.
    let mut cfg = config(&not_elf, 1);
    cfg.cmdline = "x".repeat(3000);
    cfg.block = block(disk.clone());
    cfg.vsock = vsock(uds.clone());
    let msg = fail(cfg);
    assert!(msg.contains("3070 bytes"), "{msg}");
    assert_eq!(held(), before, "after a command line too long: {msg}");
    assert!(!uds.exists(), "the vsock socket is removed");

    // A disk that does not open.
    let mut cfg = config(&not_elf, 1);
    cfg.block = block(dir.path().join("missing.img"));
    cfg.vsock = vsock(uds.clone());
    let msg = fail(cfg);
    assert!(msg.contains("virtio-block"), "{msg}");
    assert_eq!(held(), before, "after a disk that does not open: {msg}");

    // A vsock socket that cannot be bound, after the disk was opened.
    let mut cfg = config(&not_elf, 1);
    cfg.block = block(disk.clone());
    cfg.vsock = vsock(dir.path().join("no/such/dir/vsock.sock"));
    let msg = fail(cfg);
    assert!(msg.contains("virtio-vsock"), "{msg}");
    assert_eq!(held(), before, "after a socket that cannot be bound: {msg}");

    // Refused before anything is created.
    let msg = fail(config(&not_elf, 0));
    assert!(msg.contains("0 vCPUs"), "{msg}");
    assert_eq!(held(), before);
}
