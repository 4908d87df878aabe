//! Tiny hand-assembled guests through the whole VMM: real mode (straight into the vCPU) and
//! long mode (a minimal ELF through the same kernel loader and boot setup as vmlinux). They run
//! under any KVM, PVM included, because they need no interrupts.
//!
//! Needs root and /dev/kvm; skips with a printed reason otherwise (fails under
//! `SWITCHYARD_REQUIRE_ALL=1`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Console, config, elf, have_kvm, readable, real_mode, wait_for};
use vm_memory::{Bytes, GuestAddress};
use yard_vmm::bus::BusDevice;
use yard_vmm::layout;
use yard_vmm::vmm::{StartOptions, Vm, VmExit};

// Real mode: `mov dx, 0x3f8; mov al, 'H'; out dx, al; mov al, 'i'; out dx, al;
// mov al, 0xfe; out 0x64, al; hlt` (the i8042 reset command).
const HELLO_RESET: &[u8] = &[
    0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
];

#[test]
fn real_mode_serial_output_reaches_the_console_and_i8042_resets() {
    if !have_kvm() {
        return;
    }
    let console = Console::default();
    let vm = Vm::start_with(
        config(&console, "/nonexistent".into()),
        real_mode(HELLO_RESET),
    )
    .unwrap();
    assert_eq!(wait_for(&vm, 10), VmExit::Reset);
    assert_eq!(console.text(), "Hi");
    assert_eq!(vm.wait(), VmExit::Reset);
    vm.stop();
    assert_eq!(
        vm.exit(),
        Some(VmExit::Reset),
        "stop keeps the reason the VM ended with"
    );
}

#[test]
fn a_halted_boot_vcpu_waits_on_the_irqchip_or_ends_the_vm_without_one() {
    if !have_kvm() {
        return;
    }
    let console = Console::default();
    // `mov al, '!'; mov dx, 0x3f8; out dx, al; cli; hlt`
    let code = [0xb0, b'!', 0xba, 0xf8, 0x03, 0xee, 0xfa, 0xf4];
    let vm = Vm::start_with(config(&console, "/nonexistent".into()), real_mode(&code)).unwrap();
    if vm.has_irqchip() {
        // KVM waits inside the kernel for an interrupt that never comes.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vm.exit(), None);
        vm.stop();
        assert_eq!(vm.exit(), Some(VmExit::Stopped));
    } else {
        match wait_for(&vm, 10) {
            VmExit::Error(msg) => assert!(msg.contains("halted"), "{msg}"),
            other => panic!("expected a halt error, got {other:?}"),
        }
    }
    assert_eq!(console.text(), "!");
}

#[test]
fn stop_ends_a_spinning_guest_on_every_vcpu() {
    if !have_kvm() {
        return;
    }
    let console = Console::default();
    let mut cfg = config(&console, "/nonexistent".into());
    cfg.vcpus = 2;
    // `jmp $`
    let vm = Vm::start_with(cfg, real_mode(&[0xeb, 0xfe])).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.exit(), None);
    assert!(!readable(vm.exit_fd(), 0));
    vm.stop();
    assert_eq!(vm.exit(), Some(VmExit::Stopped));
    assert!(readable(vm.exit_fd(), 0));
    vm.stop();
    assert_eq!(vm.wait(), VmExit::Stopped);
}

/// An MMIO test device: remembers the last u32 written and reads back that value + 1, so a
/// round trip proves both directions went through the bus.
#[derive(Default)]
struct Scratch {
    value: u32,
    writes: u32,
}

impl BusDevice for Scratch {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&(self.value + 1).to_le_bytes());
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.value = u32::from_le_bytes(data.try_into().unwrap());
            self.writes += 1;
        }
    }
}

const SCRATCH_BASE: u64 = 0xd080_0000;
const RESULT_ADDR: u64 = 0x30_0000;
const ENTRY: u64 = 0x20_0000;

/// Long mode, identity mapped: MMIO write then read at SCRATCH_BASE, store the value read at
/// RESULT_ADDR, boot-timer magic, 'K' on the serial port, i8042 reset.
fn long_mode_program() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x48, 0xb8]); // mov rax, imm64
    c.extend_from_slice(&SCRATCH_BASE.to_le_bytes());
    c.extend_from_slice(&[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12]); // mov dword [rax], 0x12345678
    c.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [rax]
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, imm64
    c.extend_from_slice(&RESULT_ADDR.to_le_bytes());
    c.extend_from_slice(&[0x89, 0x19]); // mov [rcx], ebx
    c.extend_from_slice(&[0x66, 0xba, 0x40, 0x04]); // mov dx, 0x440
    c.extend_from_slice(&[0xb0, layout::BOOT_TIMER_MAGIC, 0xee]); // mov al, 123; out dx, al
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'K', 0xee]); // serial 'K'
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]); // i8042 reset; hlt
    c
}

#[test]
fn long_mode_elf_does_mmio_boot_timer_serial_and_memory_then_resets() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, elf(&long_mode_program(), ENTRY)).unwrap();
    let scratch = Arc::new(Mutex::new(Scratch::default()));
    let opts = StartOptions {
        mmio_devices: vec![(scratch.clone(), SCRATCH_BASE, 0x1000)],
        ..Default::default()
    };
    let console = Console::default();
    let vm = Vm::start_with(config(&console, kernel), opts).unwrap();
    assert_eq!(wait_for(&vm, 10), VmExit::Reset);
    assert_eq!(console.text(), "K");
    let s = scratch.lock().unwrap();
    assert_eq!((s.value, s.writes), (0x1234_5678, 1));
    drop(s);
    let stored: u32 = vm.memory().read_obj(GuestAddress(RESULT_ADDR)).unwrap();
    assert_eq!(
        stored, 0x1234_5679,
        "the MMIO read result the guest stored in RAM"
    );
    let boot = vm.boot_time().expect("boot timer fired");
    assert!(boot < Duration::from_secs(10), "{boot:?}");
    assert!(readable(vm.boot_timer_fd(), 0));
    // The boot structures the guest was given are in its memory.
    let mut sig = [0u8; 4];
    vm.memory()
        .read_slice(&mut sig, GuestAddress(layout::MPTABLE_START))
        .unwrap();
    assert_eq!(&sig, b"_MP_");
    let cmdline = vm
        .memory()
        .read_obj::<[u8; 13]>(GuestAddress(layout::CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0");
}

#[test]
fn a_missing_kernel_fails_start_cleanly() {
    if !have_kvm() {
        return;
    }
    let console = Console::default();
    let err = Vm::start(config(&console, "/nonexistent/vmlinux".into()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    let mut cfg = config(&console, "/nonexistent".into());
    cfg.vcpus = 0;
    assert!(Vm::start(cfg).is_err());
}

/// A device model that panics on a guest write.
struct Panicky;

impl BusDevice for Panicky {
    fn read(&mut self, _base: u64, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        panic!("device model bug (expected by the test)");
    }
}

#[test]
fn a_panic_in_a_vcpu_thread_ends_the_vm_instead_of_hanging_it() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, elf(&long_mode_program(), ENTRY)).unwrap();
    let opts = StartOptions {
        mmio_devices: vec![(Arc::new(Mutex::new(Panicky)), SCRATCH_BASE, 0x1000)],
        ..Default::default()
    };
    let console = Console::default();
    let vm = Vm::start_with(config(&console, kernel), opts).unwrap();
    match wait_for(&vm, 10) {
        VmExit::Error(msg) => assert_eq!(msg, "vCPU 0 panicked"),
        other => panic!("expected the panic to end the VM, got {other:?}"),
    }
    assert_eq!(console.text(), "", "nothing ran after the panicking access");
    vm.stop();
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn memory_above_the_mmio_gap_goes_above_4_gib_and_into_the_e820_map() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, elf(&long_mode_program(), ENTRY)).unwrap();
    let opts = StartOptions {
        mmio_devices: vec![(
            Arc::new(Mutex::new(Scratch::default())),
            SCRATCH_BASE,
            0x1000,
        )],
        ..Default::default()
    };
    let console = Console::default();
    let mut cfg = config(&console, kernel);
    cfg.memory_mib = 4096;
    let vm = Vm::start_with(cfg, opts).unwrap();
    assert_eq!(wait_for(&vm, 10), VmExit::Reset);
    assert_eq!(
        console.text(),
        "K",
        "the MMIO gap still reaches the devices"
    );

    // The zero page, by the offsets of Documentation/arch/x86/zero-page.rst: e820_entries at
    // 0x1e8, e820_table (20-byte entries) at 0x2d0.
    let mut zero_page = vec![0u8; 4096];
    vm.memory()
        .read_slice(&mut zero_page, GuestAddress(layout::ZERO_PAGE_START))
        .unwrap();
    let entries: Vec<(u64, u64, u32)> = (0..usize::from(zero_page[0x1e8]))
        .map(|i| {
            let e = &zero_page[0x2d0 + 20 * i..][..20];
            (
                u64_at(e, 0),
                u64_at(e, 8),
                u32::from_le_bytes(e[16..20].try_into().unwrap()),
            )
        })
        .collect();
    let gap = layout::MMIO_GAP_START;
    assert_eq!(
        entries,
        vec![
            (0, layout::EBDA_START, 1),
            (layout::HIMEM_START, gap - layout::HIMEM_START, 1),
            (1 << 32, (4096 << 20) - gap, 1),
        ]
    );
    // The RAM behind the last entry exists, up to its last byte, and nothing is mapped in the gap.
    let last = (1u64 << 32) + (4096 << 20) - gap - 8;
    vm.memory()
        .write_obj(0x55aa_u64, GuestAddress(last))
        .unwrap();
    assert_eq!(
        vm.memory().read_obj::<u64>(GuestAddress(last)).unwrap(),
        0x55aa
    );
    assert!(vm.memory().read_obj::<u64>(GuestAddress(last + 8)).is_err());
    assert!(vm.memory().read_obj::<u64>(GuestAddress(gap)).is_err());
}

#[test]
fn concurrent_stops_all_return_after_the_vm_ended() {
    if !have_kvm() {
        return;
    }
    let console = Console::default();
    let mut cfg = config(&console, "/nonexistent".into());
    cfg.vcpus = 2;
    let vm = Vm::start_with(cfg, real_mode(&[0xeb, 0xfe])).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                vm.stop();
                assert_eq!(vm.exit(), Some(VmExit::Stopped), "stop returned early");
            });
        }
    });
}
