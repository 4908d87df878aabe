//! The virtio-mmio transport, version 2 ("modern" only), one 4 KiB page per device.
//!
//! The driver's status state machine (virtio 1.2, 3.1.1) is enforced: features may be written
//! only between DRIVER and FEATURES_OK, queues only between FEATURES_OK and DRIVER_OK, and the
//! device is activated once, on DRIVER_OK, after its queues were validated. Writing 0 resets.
//! Out-of-order or malformed accesses are ignored (and logged, rate-limited).

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{INT_CONFIG, InterruptStatus, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::GuestMemory;
use crate::bus::BusDevice;
use crate::guest_warn;
use crate::irq::Interrupt;

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;
pub const MMIO_LEN: u64 = 0x1000;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// The low and high 32 bits of a 64-bit value the driver reads as two registers.
pub fn halves(v: u64) -> [u32; 2] {
    let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
    [
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    ]
}

pub struct MmioTransport {
    mem: GuestMemory,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<InterruptStatus>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        irq: Arc<dyn Interrupt>,
    ) -> io::Result<MmioTransport> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            let q = Queue::new(max).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("queue size {max}: {e}"),
                )
            })?;
            queues.push(q);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            mem,
            device,
            interrupt: Arc::new(InterruptStatus::new(irq)),
            queues,
            queue_evts,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// One eventfd per queue, signalled on QueueNotify: the VMM registers each as an
    /// ioeventfd at `base + REG_QUEUE_NOTIFY` with datamatch on the queue index; a notify that
    /// arrives here as an MMIO exit signals the same eventfd.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The shared interrupt status (for a device that reports config changes).
    pub fn interrupt_status(&self) -> &Arc<InterruptStatus> {
        &self.interrupt
    }

    /// The driver's status byte.
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Tell the driver the device config changed.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(INT_CONFIG);
    }

    fn device_features(&self) -> u64 {
        self.device.avail_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => halves(self.device_features())[0],
                1 => halves(self.device_features())[1],
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length "all ones" means absent.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!(
                    offset,
                    "virtio-mmio: read of an unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let features_phase = self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER;
        let queue_phase = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == STATUS_FEATURES_OK;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => guest_warn!(
                    sel = self.driver_features_sel,
                    "virtio-mmio: bad feature select"
                ),
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if queue_phase =>
            {
                self.write_queue_reg(offset, value)
            }
            _ => guest_warn!(
                offset,
                value,
                status = self.status,
                "virtio-mmio: write to an unknown register or out of order"
            ),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            guest_warn!("virtio-mmio: queue register write with no such queue selected");
            return;
        };
        if q.ready() && !(offset == REG_QUEUE_READY && value == 0) {
            guest_warn!(offset, "virtio-mmio: queue configured while ready");
            return;
        }
        // The virtio-queue setters refuse bad values (size not a power of two or too big,
        // misaligned rings) and keep the old one.
        match offset {
            REG_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.set_size(size),
                Err(_) => guest_warn!(value, "virtio-mmio: queue size out of range"),
            },
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            REG_QUEUE_READY => {
                q.set_ready(value == 1);
                if value == 1 && !q.is_valid(&mem) {
                    q.set_ready(false);
                    guest_warn!("virtio-mmio: queue rings outside guest memory, not ready");
                }
            }
            _ => {}
        }
    }

    fn notify(&mut self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    guest_warn!("virtio-mmio: queue notify: {e}");
                }
            }
            None => guest_warn!(index, "virtio-mmio: notify for a queue that does not exist"),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // Bits are only ever added, and the status is always a prefix of the init sequence;
        // a driver may add several steps in one write (virtio-drivers writes ACKNOWLEDGE |
        // DRIVER at once; Linux adds one bit at a time).
        let old = self.status;
        if value & old != old {
            guest_warn!(old, value, "virtio-mmio: status bits cleared without reset");
            return;
        }
        const SEQUENCE: [u32; 4] = [
            STATUS_ACKNOWLEDGE,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        ];
        if !SEQUENCE.contains(&value) {
            guest_warn!(old, value, "virtio-mmio: status change out of order");
            return;
        }
        let added = value & !old;
        if added & STATUS_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // FEATURES_OK stays clear: the driver reads it back and gives up.
                guest_warn!(
                    features = self.driver_features,
                    "virtio-mmio: driver accepted features not offered, or not VERSION_1"
                );
                self.status = old | (value & (STATUS_ACKNOWLEDGE | STATUS_DRIVER));
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        if added & STATUS_DRIVER_OK != 0 {
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        if let Some(i) = self.queues.iter().position(|q| !q.ready()) {
            // Linux leaves queues it does not use unready (vsock's event queue is always set
            // up, but other drivers may skip some): the device sees them unready.
            tracing::debug!(queue = i, "virtio-mmio: activating with a queue not ready");
        }
        let evts: io::Result<Vec<EventFd>> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        // The device gets its own copies; ours keep the configuration for the registers.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let result = match (evts, queues) {
            (Ok(evts), Ok(queues)) => {
                self.device
                    .activate(self.mem.clone(), queues, evts, self.interrupt.clone())
            }
            (Err(e), _) => Err(super::ActivateError::QueueEvents(e)),
            (_, Err(e)) => Err(super::ActivateError::Queue(e)),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                // A guest can retry (reset, DRIVER_OK) in a loop: rate-limited.
                crate::guest_log!(
                    error,
                    "virtio-mmio: activating device type {}: {e}",
                    self.device.device_type()
                );
                self.status |= STATUS_NEEDS_RESET;
                self.notify_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        // Drain notifications the old driver left behind.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
            guest_warn!(
                offset,
                "virtio-mmio: register read that is not an aligned u32"
            );
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_DRIVER == 0 {
                guest_warn!("virtio-mmio: config write before DRIVER");
                return;
            }
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(word))
            }
            _ => guest_warn!(
                offset,
                "virtio-mmio: register write that is not an aligned u32"
            ),
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.activated {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::testing::*;
    use super::*;
    use crate::irq::CountingInterrupt;

    #[derive(Default)]
    struct Log {
        activations: Vec<(usize, usize)>,
        resets: usize,
        acked: u64,
        config: Vec<u8>,
    }

    /// Records what the transport does to it.
    struct Dummy {
        log: Arc<Mutex<Log>>,
        sizes: Vec<u16>,
        fail: bool,
        irq: Option<Arc<InterruptStatus>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            0b101
        }
        fn ack_features(&mut self, f: u64) {
            self.log.lock().unwrap().acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn write_config(&mut self, _offset: u64, data: &[u8]) {
            self.log.lock().unwrap().config.extend_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            queues: Vec<Queue>,
            evts: Vec<EventFd>,
            irq: Arc<InterruptStatus>,
        ) -> Result<(), super::super::ActivateError> {
            if self.fail {
                return Err(super::super::ActivateError::AlreadyActive);
            }
            self.log
                .lock()
                .unwrap()
                .activations
                .push((queues.len(), evts.len()));
            self.irq = Some(irq);
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
    }

    fn transport(
        fail: bool,
    ) -> (
        MmioTransport,
        Arc<Mutex<Log>>,
        Arc<CountingInterrupt>,
        GuestMemory,
    ) {
        let log = Arc::new(Mutex::new(Log::default()));
        let irq = CountingInterrupt::new();
        let mem = memory();
        let dev = Dummy {
            log: log.clone(),
            sizes: vec![16, 8],
            fail,
            irq: None,
        };
        let t = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
        (t, log, irq, mem)
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = transport(false);
        assert_eq!(read32(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(read32(&mut t, REG_VERSION), 2);
        assert_eq!(read32(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(read32(&mut t, REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(read32(&mut t, REG_CONFIG_GENERATION), 0);
        assert_eq!(read32(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(t.queue_evts().len(), 2);
        // Write-only registers read as zero; writes to read-only ones change nothing.
        assert_eq!(read32(&mut t, REG_QUEUE_NOTIFY), 0);
        write32(&mut t, REG_MAGIC, 0);
        assert_eq!(read32(&mut t, REG_MAGIC), MAGIC_VALUE);
    }

    #[test]
    fn features_offer_version_1_and_are_accepted_only_in_order() {
        let (mut t, log, ..) = transport(false);
        write32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read32(&mut t, REG_DEVICE_FEATURES), 0b101);
        write32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read32(&mut t, REG_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        write32(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(&mut t, REG_DEVICE_FEATURES), 0);

        // Before DRIVER, feature writes are ignored.
        write32(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, REG_DRIVER_FEATURES, 1);
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(
            read32(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            0,
            "VERSION_1 not accepted"
        );

        // A feature not offered is refused.
        write32(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, REG_DRIVER_FEATURES, 1);
        write32(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write32(&mut t, REG_DRIVER_FEATURES, 0b10);
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(read32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);

        write32(&mut t, REG_DRIVER_FEATURES, 0b100);
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(read32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(log.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b100);
        // After FEATURES_OK they are frozen.
        write32(&mut t, REG_DRIVER_FEATURES, 0b1);
        write32(&mut t, REG_STATUS, 0);
        assert_eq!(read32(&mut t, REG_STATUS), 0);
        assert_eq!(log.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b100);
    }

    #[test]
    fn status_steps_must_come_in_order() {
        let (mut t, log, ..) = transport(false);
        write32(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(read32(&mut t, REG_STATUS), 0, "DRIVER before ACKNOWLEDGE");
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(read32(&mut t, REG_STATUS), 0, "two steps at once");
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(
            read32(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            "DRIVER_OK before FEATURES_OK"
        );
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            read32(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            "bits cleared"
        );
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED,
        );
        assert_ne!(read32(&mut t, REG_STATUS) & STATUS_FAILED, 0);
        assert!(log.lock().unwrap().activations.is_empty());
    }

    /// virtio-drivers writes ACKNOWLEDGE | DRIVER in one go after the reset.
    #[test]
    fn several_steps_of_the_sequence_may_come_in_one_write() {
        let (mut t, ..) = transport(false);
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(
            read32(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER
        );
        write32(&mut t, REG_STATUS, 0);
        assert_eq!(read32(&mut t, REG_STATUS), 0);
        write32(&mut t, REG_STATUS, STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(
            read32(&mut t, REG_STATUS),
            0,
            "not a prefix of the sequence"
        );
    }

    #[test]
    fn queues_are_configured_between_features_ok_and_driver_ok() {
        let (mut t, log, _irq, mem) = transport(false);
        let q0 = DriverQueue::new(0, 16, 0x10000);
        let q1 = DriverQueue::new(1, 8, 0x20000);
        // Too early: ignored.
        write32(&mut t, REG_QUEUE_SEL, 0);
        write32(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(read32(&mut t, REG_QUEUE_READY), 0);

        negotiate(&mut t);
        write32(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read32(&mut t, REG_QUEUE_NUM_MAX), 16);
        write32(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read32(&mut t, REG_QUEUE_NUM_MAX), 8);
        write32(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(read32(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        write32(&mut t, REG_QUEUE_READY, 1);

        // Rings outside guest memory: not ready.
        write32(&mut t, REG_QUEUE_SEL, 0);
        write32(&mut t, REG_QUEUE_DESC_HIGH, 1);
        write32(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(read32(&mut t, REG_QUEUE_READY), 0);
        // A size that is not a power of two is refused (the old size stays).
        write32(&mut t, REG_QUEUE_NUM, 12);
        q0.setup(&mut t);
        // Configuring a ready queue is refused; unready is allowed.
        write32(&mut t, REG_QUEUE_DESC_LOW, 0x30000);
        write32(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(read32(&mut t, REG_QUEUE_READY), 0);
        q0.setup(&mut t);
        q1.setup(&mut t);
        driver_ok(&mut t);
        assert_eq!(log.lock().unwrap().activations, vec![(2, 2)]);
        // Once running, queue registers are frozen.
        write32(&mut t, REG_QUEUE_SEL, 0);
        write32(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(read32(&mut t, REG_QUEUE_READY), 1);
        // A second DRIVER_OK write does not activate again.
        driver_ok(&mut t);
        assert_eq!(log.lock().unwrap().activations.len(), 1);
        let _ = mem;
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let (mut t, ..) = transport(false);
        notify(&mut t, 1);
        notify(&mut t, 1);
        assert!(t.queue_evts()[0].read().is_err());
        assert_eq!(t.queue_evts()[1].read().unwrap(), 2);
        notify(&mut t, 7);
        assert!(t.queue_evts()[1].read().is_err());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _log, irq, _mem) = transport(false);
        let status = t.interrupt_status().clone();
        status.signal_used();
        assert_eq!(irq.count(), 1);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 1);
        t.notify_config_change();
        assert_eq!(irq.count(), 2);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 3);
        assert_eq!(read32(&mut t, REG_CONFIG_GENERATION), 1);
        write32(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 2);
        write32(&mut t, REG_INTERRUPT_ACK, 2);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn reset_stops_the_device_and_clears_state() {
        let (mut t, log, _irq, _mem) = transport(false);
        negotiate(&mut t);
        DriverQueue::new(0, 16, 0x10000).setup(&mut t);
        DriverQueue::new(1, 8, 0x20000).setup(&mut t);
        driver_ok(&mut t);
        t.interrupt_status().signal_used();
        notify(&mut t, 0);
        write32(&mut t, REG_STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert!(!t.is_activated());
        assert_eq!(read32(&mut t, REG_STATUS), 0);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 0);
        assert!(
            t.queue_evts()[0].read().is_err(),
            "stale notification drained"
        );
        write32(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read32(&mut t, REG_QUEUE_READY), 0);
        // And it comes back up.
        negotiate(&mut t);
        DriverQueue::new(0, 16, 0x10000).setup(&mut t);
        driver_ok(&mut t);
        assert_eq!(log.lock().unwrap().activations.len(), 2);
        drop(t);
        assert_eq!(
            log.lock().unwrap().resets,
            2,
            "drop resets an active device"
        );
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, _log, irq, _mem) = transport(true);
        negotiate(&mut t);
        write32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(read32(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn bad_widths_and_alignment_are_ignored() {
        let (mut t, ..) = transport(false);
        let mut b2 = [0xaau8; 2];
        t.read(0, REG_MAGIC, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xaau8; 4];
        t.read(0, REG_MAGIC + 1, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.write(0, REG_STATUS, &[1]);
        t.write(0, REG_STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(read32(&mut t, REG_STATUS), 0);
        t.write(0, REG_QUEUE_NOTIFY, &[0, 0]);
        assert!(t.queue_evts()[0].read().is_err());
    }

    #[test]
    fn config_space_any_width_and_writes_after_driver() {
        let (mut t, log, ..) = transport(false);
        let mut b = [0u8; 1];
        t.read(0, CONFIG_SPACE + 2, &mut b);
        assert_eq!(b, [3]);
        let mut b = [0xffu8; 4];
        t.read(0, CONFIG_SPACE + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        let mut b = [0xffu8; 8];
        t.read(0, CONFIG_SPACE, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        t.write(0, CONFIG_SPACE, &[9]);
        assert!(log.lock().unwrap().config.is_empty(), "before DRIVER");
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        t.write(0, CONFIG_SPACE, &[9]);
        assert_eq!(log.lock().unwrap().config, vec![9]);
    }
}
