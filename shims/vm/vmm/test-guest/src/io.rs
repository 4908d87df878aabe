//! Port I/O: the serial console (COM1, polled), the boot-timer port and the i8042 reset. The
//! only `unsafe` here is the `in`/`out` instruction itself, on fixed ports of this machine.

use core::arch::asm;
use core::fmt;
use core::hint::spin_loop;

const COM1: u16 = 0x3f8;
/// Line status register; bit 5: the transmit holding register is empty.
const COM1_LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
const BOOT_TIMER_PORT: u16 = 0x440;
const BOOT_TIMER_MAGIC: u8 = 123;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

fn outb(port: u16, value: u8) {
    // SAFETY: only called with the ports above (serial, boot timer, i8042). Writing them has no
    // effect on this program's memory; the instruction touches no memory, stack or flags.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`: a read of a device register, no memory, stack or flags touched.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// The guest console: COM1, written byte by byte once the transmitter is empty.
pub struct Serial;

impl Serial {
    fn put(byte: u8) {
        // Bounded: a device that never reports an empty transmitter must not hang the guest.
        for _ in 0..100_000 {
            if inb(COM1_LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
            spin_loop();
        }
        outb(COM1, byte);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(Self::put);
        Ok(())
    }
}

/// Tells the VMM's boot timer that the guest is ready.
pub fn boot_timer_ready() {
    outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
}

/// Ends the VM: the i8042 "pulse reset line" command, which the VMM turns into `VmExit::Reset`.
pub fn reset() -> ! {
    outb(I8042_COMMAND, I8042_RESET);
    // The VMM stops this vCPU asynchronously; spin (not `hlt`: with interrupts off a halt could
    // end the VM as an error before the reset is seen).
    loop {
        spin_loop();
    }
}
