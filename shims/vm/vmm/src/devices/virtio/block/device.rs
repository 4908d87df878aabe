//! The block device model: [`VirtioDevice`] for [`Block`].

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::super::worker::Worker;
use super::super::{ActivateError, InterruptStatus, TYPE_BLOCK, VirtioDevice, read_config_bytes};
use super::event_handler::run;
use super::request::Disk;
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
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let (Ok([queue]), Ok([evt])) = (
            <[Queue; 1]>::try_from(queues),
            <[EventFd; 1]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let disk = Disk {
            file: self.file.clone(),
            read_only: self.read_only,
            capacity: self.capacity,
            id: self.id,
        };
        let worker = Worker::spawn("virtio-blk", move |stop| {
            if let Err(e) = run(disk, mem, queue, evt, irq, stop) {
                tracing::error!("virtio-blk worker: {e}");
            }
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::mmio::REG_STATUS;
    use super::super::super::testing::*;
    use super::super::testing::*;
    use super::super::*;
    use super::*;

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

    #[test]
    fn activation_with_the_wrong_queue_count_reports_it() {
        use virtio_queue::QueueT;

        let file = tempfile::NamedTempFile::new().unwrap();
        let mut dev = Block::new(file.path(), true).unwrap();
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
