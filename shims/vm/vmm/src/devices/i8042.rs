//! The i8042 keyboard controller, as much of it as a guest needs: Linux's probe gets sane
//! answers (self test, control register, interface test) and `reboot=k`, which writes the
//! "pulse reset line" command 0xFE to port 0x64, ends the VM through the `reset` eventfd.
//!
//! vm-superio's i8042 answers every read with 0 (the probe then fails reading the control
//! register), so this is our own, with the same reset behaviour.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_AUX_DATA: u8 = 0x20;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;

/// Bytes the controller holds for the guest; real hardware holds one, Linux copes with more.
const OUT_MAX: usize = 16;

/// What the next write to the data port means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pending {
    None,
    Ctr,
    OutputPort,
    KbdOut,
    AuxOut,
    Aux,
}

pub struct I8042 {
    reset: EventFd,
    ctr: u8,
    last_was_command: bool,
    pending: Pending,
    out: VecDeque<(u8, bool)>,
}

impl I8042 {
    /// A guest reset request writes `reset`.
    pub fn new(reset: EventFd) -> I8042 {
        I8042 {
            reset,
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE | CTR_AUX_DISABLED,
            last_was_command: false,
            pending: Pending::None,
            out: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.out.len() < OUT_MAX {
            self.out.push_back((byte, aux));
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS;
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        if let Some(&(_, aux)) = self.out.front() {
            s |= STATUS_OUT_FULL;
            if aux {
                s |= STATUS_AUX_DATA;
            }
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR => self.pending = Pending::Ctr,
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            // 0xff: no auxiliary (mouse) port.
            CMD_AUX_TEST => self.push(0xff, false),
            CMD_SELF_TEST => self.push(0x55, false),
            CMD_KBD_TEST => self.push(0x00, false),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            CMD_WRITE_KBD_OUT => self.pending = Pending::KbdOut,
            CMD_WRITE_AUX_OUT => self.pending = Pending::AuxOut,
            CMD_WRITE_AUX => self.pending = Pending::Aux,
            CMD_RESET_CPU => {
                // The guest may repeat this before the VMM stops it: rate-limited.
                crate::guest_log!(info, "guest requested a reset through the i8042");
                if let Err(e) = self.reset.write(1) {
                    crate::guest_log!(error, "i8042: signalling reset: {e}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Ctr => self.ctr = value,
            // Bit 0 of the output port is the CPU reset line, active low.
            Pending::OutputPort if value & 1 == 0 => self.command(CMD_RESET_CPU),
            Pending::OutputPort => {}
            Pending::KbdOut => self.push(value, false),
            Pending::AuxOut => self.push(value, true),
            // No mouse: the byte goes nowhere, the guest's wait for an answer times out.
            Pending::Aux => {}
            // A command for the keyboard itself: acknowledge, and answer the two the Linux
            // driver needs an answer to.
            Pending::None => {
                self.push(KBD_ACK, false);
                match value {
                    KBD_RESET => self.push(0xaa, false),
                    KBD_GET_ID => {
                        self.push(0xab, false);
                        self.push(0x83, false);
                    }
                    _ => {}
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => self.out.pop_front().map_or(0, |(b, _)| b),
            COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let &[value] = data else {
            return;
        };
        match offset {
            DATA => {
                self.last_was_command = false;
                self.data(value);
            }
            COMMAND => {
                self.last_was_command = true;
                self.command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    fn inb(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(0x60, off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_eventfd() {
        let (mut d, evt) = dev();
        d.write(0x60, COMMAND, &[CMD_SELF_TEST]);
        assert!(evt.read().is_err());
        d.write(0x60, COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        // Through the output port's reset line too.
        d.write(0x60, COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(0x60, DATA, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        d.write(0x60, COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(0x60, DATA, &[0xff]);
        assert!(evt.read().is_err());
    }

    #[test]
    fn answers_the_linux_probe() {
        let (mut d, _evt) = dev();
        assert_eq!(
            inb(&mut d, COMMAND) & STATUS_OUT_FULL,
            0,
            "nothing to flush"
        );
        d.write(0x60, COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(
            inb(&mut d, COMMAND) & (STATUS_OUT_FULL | STATUS_CMD),
            STATUS_OUT_FULL | STATUS_CMD
        );
        assert_eq!(inb(&mut d, DATA), 0x55);
        d.write(0x60, COMMAND, &[CMD_READ_CTR]);
        let ctr = inb(&mut d, DATA);
        assert_eq!(ctr & CTR_XLATE, CTR_XLATE);
        d.write(0x60, COMMAND, &[CMD_WRITE_CTR]);
        d.write(0x60, DATA, &[ctr & !CTR_KBD_INT]);
        d.write(0x60, COMMAND, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut d, DATA), ctr & !CTR_KBD_INT);
        d.write(0x60, COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(inb(&mut d, DATA), 0);
        d.write(0x60, COMMAND, &[CMD_WRITE_AUX_OUT]);
        d.write(0x60, DATA, &[0x5a]);
        assert_eq!(inb(&mut d, COMMAND) & STATUS_AUX_DATA, STATUS_AUX_DATA);
        assert_eq!(inb(&mut d, DATA), 0x5a);
        d.write(0x60, DATA, &[KBD_GET_ID]);
        assert_eq!(
            [inb(&mut d, DATA), inb(&mut d, DATA), inb(&mut d, DATA)],
            [0xfa, 0xab, 0x83]
        );
        assert_eq!(inb(&mut d, COMMAND) & STATUS_OUT_FULL, 0);
    }

    #[test]
    fn output_is_bounded_and_wide_writes_ignored() {
        let (mut d, evt) = dev();
        for _ in 0..100 {
            d.write(0x60, COMMAND, &[CMD_SELF_TEST]);
        }
        assert_eq!(d.out.len(), OUT_MAX);
        d.write(0x60, COMMAND, &[CMD_RESET_CPU, 0]);
        assert!(evt.read().is_err());
    }
}
