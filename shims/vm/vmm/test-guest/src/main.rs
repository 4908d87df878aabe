//! A `no_std` test guest for Switchyard's built-in VMM. The VMM loads it like a kernel (ELF at
//! physical 0x200000, entered in 64-bit mode with the first 4 GiB identity-mapped, interrupts
//! off) and it drives the VMM's devices with the `virtio-drivers` crate in polling mode:
//!
//! 1. virtio-blk (virtio-mmio slot 0): reads sector 0, writes [`sector1`] to sector 1, flushes;
//! 2. virtio-vsock (slot 1): listens on port [`ECHO_PORT`] and connects to the host's port
//!    [`HOST_PORT`]; sends `disk: <sector 0's first line>\n` there and waits for a reply line;
//!    on connections to [`ECHO_PORT`] echoes every line until it receives `done`;
//! 3. reports each step on the serial console, writes the boot-timer magic and resets through
//!    the i8042. A panic prints its message and resets too.
//!
//! `shims/vm/vmm/tests/test_guest.rs` builds and boots it and checks the other side.

#![no_std]
#![no_main]

extern crate alloc;

mod hal;
mod io;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{Display, Write};

use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::device::socket::{
    VMADDR_CID_HOST, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType,
};
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceType, Transport};

use hal::DmaHal;

/// The host port the guest connects to (the VMM's hybrid vsock: Unix socket `<uds>_1234`).
const HOST_PORT: u32 = 1234;
/// The guest's end of that stream.
const LOCAL_PORT: u32 = 40_000;
/// The guest port host-initiated connections (`CONNECT 5000`) reach.
const ECHO_PORT: u32 = 5000;

macro_rules! println {
    ($($arg:tt)*) => {{
        // Serial never fails.
        let _ = writeln!(io::Serial, $($arg)*);
    }};
}

/// The first instructions: switch to this program's own stack, then `main`.
mod entry {
    const STACK_SIZE: usize = 64 * 1024;

    #[repr(C, align(16))]
    struct Stack([u8; STACK_SIZE]);

    static mut STACK: Stack = Stack([0; STACK_SIZE]);

    // The VMM's boot stack is a few KiB below the zero page; ours is in `.bss`. `call` leaves
    // the stack aligned the way the ABI expects at a function's entry.
    core::arch::global_asm!(
        ".section .text.entry, \"ax\"",
        ".global _start",
        "_start:",
        "lea rsp, [rip + {stack} + {size}]",
        "xor ebp, ebp",
        "call {main}",
        "ud2",
        stack = sym STACK,
        size = const STACK_SIZE,
        main = sym super::main,
    );
}

extern "C" fn main() -> ! {
    log::set_logger(&SerialLogger).ok();
    log::set_max_level(log::LevelFilter::Info);
    println!("test-guest: started");

    let mut blk = VirtIOBlk::<DmaHal, _>::new(transport(0, DeviceType::Block)).or_fail("blk: init");
    let text = disk(&mut blk);

    let driver =
        VirtIOSocket::<DmaHal, _>::new(transport(1, DeviceType::Socket)).or_fail("vsock: init");
    let mut vsock = VsockConnectionManager::new(driver);
    talk(&mut vsock, &text);

    println!("test-guest: ok");
    io::boot_timer_ready();
    // The devices stay open (never dropped): the VM ends here.
    io::reset()
}

fn transport(index: usize, expect: DeviceType) -> MmioTransport<'static> {
    let transport = hal::mmio_transport(index).or_fail("virtio-mmio");
    let (kind, version) = (transport.device_type(), transport.version());
    println!("virtio-mmio {index}: {kind:?} {version:?}");
    if kind != expect {
        panic!("virtio-mmio {index}: expected {expect:?}");
    }
    transport
}

/// What the guest writes to sector 1: a line, then bytes counting up (the test checks all 512).
pub fn sector1() -> [u8; SECTOR_SIZE] {
    const LINE: &[u8] = b"test-guest wrote sector 1\n";
    let mut sector = [0; SECTOR_SIZE];
    for (i, b) in sector.iter_mut().enumerate() {
        *b = LINE.get(i).copied().unwrap_or(i as u8);
    }
    sector
}

/// Reads sector 0 and returns its first line; writes sector 1 and flushes.
fn disk(blk: &mut VirtIOBlk<DmaHal, MmioTransport<'static>>) -> String {
    println!("blk: capacity {} sectors", blk.capacity());
    let mut sector = [0; SECTOR_SIZE];
    blk.read_blocks(0, &mut sector)
        .or_fail("blk: read sector 0");
    let end = sector
        .iter()
        .position(|&b| b == b'\n' || b == 0)
        .unwrap_or(64)
        .min(64);
    let text = String::from_utf8_lossy(&sector[..end]).into_owned();
    println!("blk: sector 0: {text}");

    blk.write_blocks(1, &sector1())
        .or_fail("blk: write sector 1");
    blk.flush().or_fail("blk: flush");
    println!("blk: wrote sector 1, flushed");
    text
}

/// The two vsock streams, served from one polling loop until both are done.
fn talk(vsock: &mut VsockConnectionManager<DmaHal, MmioTransport<'static>>, text: &str) {
    let host = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: HOST_PORT,
    };
    println!("vsock: guest cid {}", vsock.guest_cid());
    vsock.listen(ECHO_PORT);
    vsock.connect(host, LOCAL_PORT).or_fail("vsock: connect");
    println!("vsock: listening on port {ECHO_PORT}, connecting to host port {HOST_PORT}");

    let mut reply = Vec::new();
    let mut echo = Vec::new();
    let (mut replied, mut echo_done) = (false, false);
    let mut buf = [0; 512];
    while !(replied && echo_done) {
        let event = vsock.wait_for_event().or_fail("vsock: poll");
        let (peer, port) = (event.source, event.destination.port);
        match event.event_type {
            VsockEventType::Connected if port == LOCAL_PORT => {
                let line = alloc::format!("disk: {text}\n");
                vsock
                    .send(host, LOCAL_PORT, line.as_bytes())
                    .or_fail("vsock: send");
                println!(
                    "vsock: connected to host port {HOST_PORT}, sent {} bytes",
                    line.len()
                );
            }
            VsockEventType::ConnectionRequest if port == ECHO_PORT => {
                println!(
                    "vsock: accepted port {ECHO_PORT} from host port {}",
                    peer.port
                );
            }
            VsockEventType::Received { .. } if port == LOCAL_PORT => {
                let n = vsock.recv(peer, port, &mut buf).or_fail("vsock: recv");
                reply.extend_from_slice(&buf[..n]);
                if let Some(line) = take_line(&mut reply) {
                    println!("vsock: host replied: {line}");
                    replied = true;
                }
            }
            VsockEventType::Received { .. } if port == ECHO_PORT => {
                let n = vsock.recv(peer, port, &mut buf).or_fail("vsock: recv");
                echo.extend_from_slice(&buf[..n]);
                while let Some(line) = take_line(&mut echo) {
                    if line == "done" {
                        println!("vsock: echo done");
                        echo_done = true;
                        break;
                    }
                    let back = alloc::format!("{line}\n");
                    vsock
                        .send(peer, port, back.as_bytes())
                        .or_fail("vsock: echo");
                    println!("vsock: echoed {line}");
                }
            }
            VsockEventType::Disconnected { reason } => {
                println!(
                    "vsock: port {port}: peer {} disconnected ({reason:?})",
                    peer.port
                );
                let early = (port == LOCAL_PORT && !replied) || (port == ECHO_PORT && !echo_done);
                if early {
                    panic!("vsock: port {port}: disconnected before the exchange ended");
                }
            }
            _ => {}
        }
    }
    vsock.shutdown(host, LOCAL_PORT).ok();
}

/// Removes and returns the first complete line of `buf`, without its newline.
fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..=end);
    Some(line)
}

/// Ends the guest with a message on the console when a driver call fails.
trait OrFail<T> {
    fn or_fail(self, what: &str) -> T;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    #[track_caller]
    fn or_fail(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// `virtio-drivers` logs through `log`; show its messages on the console.
struct SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        println!("virtio-drivers: {} {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("test-guest: panic: {}", info.message());
    io::reset()
}
