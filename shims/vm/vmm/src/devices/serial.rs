//! COM1: the guest console, a 16550A UART from vm-superio behind the port-I/O bus.

use std::io::{self, Write};
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::guest_warn;
use crate::irq::Interrupt;

/// vm-superio's interrupt hook, onto our interrupt line.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The 8250/16550 serial port at [`crate::layout::SERIAL_PORT`].
pub struct Serial {
    uart: Uart,
}

impl Serial {
    /// Guest output goes to `out`; THR-empty and received-data interrupts go through `irq`.
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queue host input for the guest to read; returns how many bytes fit the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(input)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) => *byte = self.uart.read(offset),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (&[value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            guest_warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingInterrupt;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    fn read(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(0x3f8, offset, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_sink_and_thr_empty_interrupts_when_enabled() {
        let irq = CountingInterrupt::new();
        let sink = Sink::default();
        let mut s = Serial::new(irq.clone(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0x3f8, THR, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(irq.count(), 0, "no interrupt while IER is clear");
        // Line status: transmitter empty.
        assert_eq!(read(&mut s, LSR) & 0x60, 0x60);

        // Enabling the THR-empty interrupt raises it at once (the holding register is empty).
        s.write(0x3f8, IER, &[0x02]);
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut s, IIR) & 0x0f, 0x02, "IIR says THR empty");
        // Reading IIR acknowledged it; the next byte raises it again.
        s.write(0x3f8, THR, b"x");
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn input_is_readable_and_interrupts() {
        let irq = CountingInterrupt::new();
        let mut s = Serial::new(irq.clone(), Box::new(io::sink()));
        s.write(0x3f8, IER, &[0x01]); // received data available
        assert_eq!(s.enqueue_input(b"ok").unwrap(), 2);
        assert!(irq.count() >= 1);
        assert_eq!(read(&mut s, LSR) & 1, 1, "data ready");
        assert_eq!(read(&mut s, 0), b'o');
        assert_eq!(read(&mut s, 0), b'k');
        assert_eq!(read(&mut s, LSR) & 1, 0);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let sink = Sink::default();
        let mut s = Serial::new(CountingInterrupt::new(), Box::new(sink.clone()));
        s.write(0x3f8, THR, b"ab");
        s.write(0x3f8, 0x1_0000, b"a");
        assert!(sink.0.lock().unwrap().is_empty());
        let mut w = [0u8; 2];
        s.read(0x3f8, 0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
