//! What the VMM's integration tests share: the prerequisite gate, a console a test can read,
//! waiting for a VM with a deadline, and tiny guests (real-mode code, a minimal ELF).
//!
//! The gate is `switchyard_base::gate`, the workspace test kit's too (yard-vmm cannot depend on
//! that crate, which depends on the shims): a skip prints its reason, and
//! `SWITCHYARD_REQUIRE_ALL=1` turns it into a failure.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use yard_vmm::vmm::{RealModeImage, StartOptions, Vm, VmExit, VmmConfig};

pub use switchyard_base::gate::{is_root, require};

/// Root and a `/dev/kvm` that opens read-write (skipping, with the reason, otherwise).
pub fn have_kvm() -> bool {
    require(is_root(), "needs root")
        && require(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            "needs /dev/kvm",
        )
}

/// The serial console: everything the guest printed, and a way to wait for a line.
#[derive(Clone, Default)]
pub struct Console(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (text, changed) = &*self.0;
        text.lock().unwrap().extend_from_slice(buf);
        changed.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.0.lock().unwrap()).into_owned()
    }

    /// Whether a line starting with `prefix` appears within `timeout`.
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (text, changed) = &*self.0;
        let mut text = text.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&text)
                .lines()
                .any(|l| l.starts_with(prefix))
            {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            text = changed.wait_timeout(text, left).unwrap().0;
        }
    }
}

/// One vCPU, 64 MiB, no devices but the legacy ones, the console on `console`.
pub fn config(console: &Console, kernel: PathBuf) -> VmmConfig {
    VmmConfig {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        memory_mib: 64,
        console: Box::new(console.clone()),
        block: None,
        spare_disks: 0,
        vsock: None,
        net: None,
    }
}

/// Run `code` in real mode at 0x1000 instead of a kernel.
pub fn real_mode(code: &[u8]) -> StartOptions {
    StartOptions {
        real_mode: Some(RealModeImage {
            code: code.to_vec(),
            load_addr: 0x1000,
        }),
        ..Default::default()
    }
}

/// Real mode: `jmp $`.
pub const SPIN: &[u8] = &[0xeb, 0xfe];
/// Real mode: the i8042 reset command, then `hlt`.
pub const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];

/// Waits for the VM to end, failing the test after `secs`.
pub fn wait_for(vm: &Vm, secs: u64) -> VmExit {
    assert!(
        readable(vm.exit_fd(), secs * 1000),
        "the VM did not end in {secs} s"
    );
    vm.exit().expect("exit reason once exit_fd is readable")
}

/// Whether `fd` becomes readable within `timeout_ms`.
pub fn readable(fd: BorrowedFd<'_>, timeout_ms: u64) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = i32::try_from(timeout_ms).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd on the stack, an fd kept open by the borrow.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// A static ELF64 with one PT_LOAD segment of `code` at physical address `entry`.
pub fn elf(code: &[u8], entry: u64) -> Vec<u8> {
    const PHOFF: u64 = 64;
    const CODE_OFF: u64 = 0x1000;
    let code_len = u64::try_from(code.len()).unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, SysV
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&PHOFF.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    assert_eq!(f.len(), 64);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&CODE_OFF.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes()); // vaddr
    f.extend_from_slice(&entry.to_le_bytes()); // paddr
    f.extend_from_slice(&code_len.to_le_bytes());
    f.extend_from_slice(&code_len.to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(0x1000, 0);
    f.extend_from_slice(code);
    f
}

/// Long-mode code (identity mapped, as the VMM enters an ELF): `mov rax, addr;
/// mov dword [rax], value`, the start of a guest that writes to an MMIO device.
pub fn mmio_write32(addr: u64, value: u32) -> Vec<u8> {
    let mut c = vec![0x48, 0xb8]; // mov rax, imm64
    c.extend_from_slice(&addr.to_le_bytes());
    c.extend_from_slice(&[0xc7, 0x00]); // mov dword [rax], imm32
    c.extend_from_slice(&value.to_le_bytes());
    c
}

/// Long mode: the i8042 reset command, then `hlt`.
pub const LONG_MODE_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];
