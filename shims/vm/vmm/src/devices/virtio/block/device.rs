//! The block device model: [`VirtioDevice`] for [`Block`].

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::super::{ActivateError, InterruptStatus, TYPE_BLOCK, VirtioDevice, read_config_bytes};
use super::event_handler::run;
use super::{Block, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use crate::GuestMemory;
use crate::guest_warn;

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        guest_warn!("virtio-blk: config space is read-only");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: Arc<InterruptStatus>,
    ) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let (Ok([queue]), Ok([evt])) = (
            <[Queue; 1]>::try_from(queues),
            <[EventFd; 1]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let backend = self.backend.clone();
        self.worker
            .start(Box::new(move |stop| {
                if let Err(e) = run(backend, mem, queue, evt, irq, stop) {
                    tracing::error!("virtio-blk worker: {e}");
                }
            }))
            .map_err(ActivateError::Worker)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.stop();
        self.active = false;
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::mmio::REG_STATUS;
    use super::super::super::testing::*;
    use super::super::testing::*;
    use super::super::*;
    use super::*;
    use std::path::Path;

    #[test]
    fn config_reports_capacity() {
        let mut r = rig(false);
        let mut b = [0u8; 8];
        use crate::bus::BusDevice;
        r.t.read(0, 0x100, &mut b);
        assert_eq!(u64::from_le_bytes(b), 8);
        let mut b = [0u8; 4];
        r.t.read(0, 0x100 + 12, &mut b);
        assert_eq!(u32::from_le_bytes(b), u32::from(QUEUE_SIZE - 2));
    }

    #[test]
    fn reset_stops_the_worker_and_reactivates() {
        let mut r = rig(false);
        write32(&mut r.t, REG_STATUS, 0);
        negotiate(&mut r.t);
        r.q = DriverQueue::new(0, 16, 0x20000);
        r.q.setup(&mut r.t);
        driver_ok(&mut r.t);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_OK
        );
    }

    fn capacity(t: &mut super::super::super::mmio::MmioTransport) -> u64 {
        use crate::bus::BusDevice;
        let mut b = [0u8; 8];
        t.read(0, 0x100, &mut b);
        u64::from_le_bytes(b)
    }

    fn read_sector(r: &mut Rig, sector: u64) -> (u8, Vec<u8>) {
        use vm_memory::{Bytes, GuestAddress};
        r.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        let (status, _) = r.request(VIRTIO_BLK_T_IN, sector, &[(DATA, 512, true)]);
        let mut got = vec![0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        (status, got)
    }

    #[test]
    fn an_empty_device_has_no_capacity_and_fails_io() {
        let (mut r, handle) = empty_rig(true);
        assert_eq!(capacity(&mut r.t), 0);
        assert_eq!(handle.capacity(), 0);
        assert_eq!(read_sector(&mut r, 0).0, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn swapping_the_backing_file_changes_capacity_and_io_and_signals_the_driver() {
        use super::super::super::INT_CONFIG;
        use super::super::super::mmio::REG_INTERRUPT_STATUS;
        use super::super::super::mmio::{REG_CONFIG_GENERATION, REG_INTERRUPT_ACK};

        let (mut r, handle) = empty_rig(true);
        let generation = read32(&mut r.t, REG_CONFIG_GENERATION);
        let irqs = r.irq.count();

        // Attach: what the VMM's set_disk does.
        handle.set(Some((r.file.path(), true))).unwrap();
        r.t.notify_config_change();
        assert_eq!(capacity(&mut r.t), 8);
        assert_ne!(read32(&mut r.t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_ne!(read32(&mut r.t, REG_CONFIG_GENERATION), generation);
        assert!(r.irq.count() > irqs, "config change interrupt raised");
        write32(&mut r.t, REG_INTERRUPT_ACK, INT_CONFIG);
        let (status, data) = read_sector(&mut r, 5);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(data.iter().all(|&b| b == 5));

        // Detach: back to empty, I/O fails again.
        handle.set(None).unwrap();
        r.t.notify_config_change();
        assert_eq!(capacity(&mut r.t), 0);
        assert_ne!(read32(&mut r.t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(read_sector(&mut r, 5).0, VIRTIO_BLK_S_IOERR);

        // Reattach another file of another size.
        let mut other = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut other, &[0x42; 3 * 512]).unwrap();
        handle.set(Some((other.path(), true))).unwrap();
        assert_eq!(capacity(&mut r.t), 3);
        let (status, data) = read_sector(&mut r, 2);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(data.iter().all(|&b| b == 0x42));
        assert_eq!(read_sector(&mut r, 3).0, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn a_failed_swap_keeps_the_old_file() {
        let (mut r, handle) = empty_rig(true);
        handle.set(Some((r.file.path(), true))).unwrap();
        let err = handle
            .set(Some((Path::new("/nonexistent/disk.img"), true)))
            .unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }), "{err:?}");
        assert_eq!(capacity(&mut r.t), 8);
        assert_eq!(read_sector(&mut r, 1).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn a_read_only_device_stays_read_only_with_a_writable_file() {
        let (mut r, handle) = empty_rig(true);
        handle.set(Some((r.file.path(), false))).unwrap();
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn swaps_during_io_never_mix_files() {
        // Requests race with swaps between two files of different content: each completes
        // against one whole file (or the empty slot), never a torn mix.
        let (mut r, handle) = empty_rig(true);
        let mut other = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut other, &[0x42; 8 * 512]).unwrap();
        let paths = [r.file.path().to_owned(), other.path().to_owned()];
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let disk = (i % 3 < 2).then(|| (paths[i % 3 % 2].as_path(), true));
                    handle.set(disk).unwrap();
                    i += 1;
                }
                i
            })
        };
        for _ in 0..300 {
            let (status, data) = read_sector(&mut r, 4);
            if status == VIRTIO_BLK_S_OK {
                assert!(data.iter().all(|&b| b == 4) || data.iter().all(|&b| b == 0x42));
            } else {
                assert_eq!(status, VIRTIO_BLK_S_IOERR);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(swapper.join().unwrap() > 0);
    }

    #[test]
    fn activation_with_the_wrong_queue_count_reports_it() {
        use virtio_queue::QueueT;

        let file = tempfile::NamedTempFile::new().unwrap();
        let mut dev = Block::new(file.path(), true, crate::seccomp::Seccomp::Enforce).unwrap();
        let irq = Arc::new(InterruptStatus::new(crate::irq::CountingInterrupt::new()));
        let queues = vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()];
        let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let err = dev.activate(memory(), queues, evts, irq).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 2
            }
        ));
    }
}
