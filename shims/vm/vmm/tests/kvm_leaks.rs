//! A VM leaves nothing behind: after it ends and is dropped, the process has the same file
//! descriptors and threads as before. Its own test binary, so no other test opens fds or
//! spawns threads meanwhile.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Duration;

use yard_vmm::vmm::{RealModeImage, StartOptions, Vm, VmExit, VmmConfig};

fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("SWITCHYARD_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("required prerequisite missing: {reason}");
    }
    eprintln!("SKIP: {reason}");
    false
}

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

fn start(code: &[u8], vcpus: u8) -> Vm {
    let cfg = VmmConfig {
        kernel: "/nonexistent".into(),
        initrd: None,
        cmdline: String::new(),
        vcpus,
        memory_mib: 32,
        console: Box::new(std::io::sink()),
        block: None,
        vsock: None,
    };
    let opts = StartOptions {
        real_mode: Some(RealModeImage {
            code: code.to_vec(),
            load_addr: 0x1000,
        }),
        ..Default::default()
    };
    Vm::start_with(cfg, opts).unwrap()
}

#[test]
fn ended_and_stopped_vms_leave_no_fds_or_threads() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !require(root, "needs root")
        || !require(std::path::Path::new("/dev/kvm").exists(), "needs /dev/kvm")
    {
        return;
    }
    // Warm up once: the kick signal handler and the allocator's arenas are per process.
    drop(start(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4], 1));
    let fds = count("/proc/self/fd");
    let threads = count("/proc/self/task");
    let ram_maps = guest_ram_mappings();

    // Ends by itself (i8042 reset), then dropped.
    let vm = start(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4], 1);
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
    let vm = start(&[0xeb, 0xfe], 2);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        count("/proc/self/task") >= threads + 3,
        "two vCPU threads and the control thread"
    );
    drop(vm);
    assert_eq!(count("/proc/self/fd"), fds);
    assert_eq!(count("/proc/self/task"), threads);
    assert_eq!(guest_ram_mappings(), ram_maps, "guest memory unmapped");
}
