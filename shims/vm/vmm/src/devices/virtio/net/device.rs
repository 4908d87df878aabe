//! The net device model: [`VirtioDevice`] for [`Net`].

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::super::{ActivateError, InterruptStatus, VirtioDevice, read_config_bytes};
use super::event_handler::Backend;
use super::{Net, OFFERED_FEATURES};
use crate::GuestMemory;
use crate::guest_warn;

/// virtio 1.2, 5: the network device.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's legacy path: not offered.
        guest_warn!("virtio-net: config space is read-only");
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
        let (Ok([rxq, txq]), Ok([rx_evt, tx_evt])) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let (tap, acked) = (self.tap.clone(), self.acked);
        self.worker
            .start(Box::new(move |stop| {
                let backend = Backend::new(mem, rxq, txq, tap, irq, acked);
                if let Err(e) = backend.run(rx_evt, tx_evt, stop) {
                    tracing::error!("virtio-net worker: {e}");
                }
            }))
            .map_err(ActivateError::Worker)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.stop();
        self.acked = 0;
        self.active = false;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        VirtioDevice::reset(self);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::super::testing::*;
    use super::super::testing::*;
    use super::super::*;

    const ALL: u64 = u64::MAX;

    #[test]
    fn offers_the_features_and_sets_only_the_accepted_offloads_on_the_tap() {
        let r = rig(ALL);
        assert_eq!(
            r.features,
            OFFERED_FEATURES | super::super::super::VIRTIO_F_VERSION_1
        );
        assert_eq!(r.features & VIRTIO_NET_F_CTRL_VQ, 0, "no control queue");
        for f in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
        ] {
            assert_ne!(r.features & f, 0, "feature {f:#x} offered");
        }
        // The worker sets them when it starts: wait for it.
        let wait_offloads = |r: &Rig| {
            until("the worker set no offloads", || {
                !r.tap.offloads.lock().unwrap().is_empty()
            });
            r.tap.offloads.lock().unwrap().clone()
        };
        assert_eq!(
            wait_offloads(&r),
            [libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6]
        );

        let r = rig(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_HOST_TSO6);
        assert_eq!(wait_offloads(&r), [libc::TUN_F_CSUM | libc::TUN_F_TSO4]);

        // A driver that takes no offloads gets a tap that hands it none.
        let r = rig(VIRTIO_NET_F_MAC | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(wait_offloads(&r), [0]);
    }

    #[test]
    fn config_space_has_the_mac_the_link_up_and_the_mtu() {
        use crate::bus::BusDevice;
        let mut r = rig(ALL);
        let mut c = [0u8; 12];
        r.t.read(0, 0x100, &mut c);
        assert_eq!(c[..6], MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        // Narrow reads, as Linux's virtio_cread8 of each MAC byte.
        let mut b = [0u8; 1];
        r.t.read(0, 0x100 + 5, &mut b);
        assert_eq!(b[0], MAC[5]);
    }

    #[test]
    fn a_tx_frame_reaches_the_tap_whole_and_its_buffer_comes_back() {
        let mut r = rig(ALL);
        let f = frame(7, 1514);
        let irqs = r.irq.count();
        let head = r.send(&f, 3);
        assert_eq!(r.tap_frame(), f, "header and payload intact");
        assert_eq!(r.tx.wait_used(&r.mem), (u32::from(head), 0));
        until("no interrupt for the used TX buffer", || {
            r.irq.count() != irqs
        });
        // A header alone with a minimal Ethernet frame, in one descriptor.
        let small = frame(9, 14);
        let head = r.send(&small, 1);
        assert_eq!(r.tap_frame(), small);
        assert_eq!(r.tx.wait_used(&r.mem).0, u32::from(head));
    }

    #[test]
    fn bad_tx_chains_are_dropped_and_returned_and_the_device_goes_on() {
        let mut r = rig(ALL);
        // Too long: a header and more than the largest frame.
        let long = frame(1, MAX_FRAME_LEN + 1);
        let head = r.send(&long, 2);
        assert_eq!(r.tx.wait_used(&r.mem), (u32::from(head), 0));
        // Too short: a header without an Ethernet header.
        let head = r.send(&frame(2, 13)[..], 1);
        assert_eq!(r.tx.wait_used(&r.mem), (u32::from(head), 0));
        // Outside guest memory.
        let head = r.send_raw(&[(MEM_SIZE as u64 - 8, 64, false)]);
        assert_eq!(r.tx.wait_used(&r.mem), (u32::from(head), 0));
        // Only device-writable buffers: nothing to send.
        let head = r.send_raw(&[(TX_AREA, 64, true)]);
        assert_eq!(r.tx.wait_used(&r.mem), (u32::from(head), 0));
        assert_eq!(r.tap_frame_now(), None, "a bad chain reached the tap");
        // The device still works.
        let good = frame(3, 100);
        r.send(&good, 1);
        assert_eq!(r.tap_frame(), good);
    }

    #[test]
    fn an_rx_frame_fills_one_buffer_with_num_buffers_one() {
        let mut r = rig(ALL);
        let head = r.post_rx(&[2048]);
        r.kick_rx();
        let f = frame(5, 60);
        r.host_sends(&f);
        let (id, len) = r.rx.wait_used(&r.mem);
        assert_eq!((id, len), (u32::from(head), len32(&f)));
        let got = r.read_guest(RX_AREA, len);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(got[..10], f[..10]);
        assert_eq!(got[12..], f[12..]);
    }

    #[test]
    fn an_rx_frame_spreads_over_mergeable_buffers_and_counts_them() {
        let mut r = rig(ALL);
        assert_ne!(r.features & VIRTIO_NET_F_MRG_RXBUF, 0);
        let heads: Vec<u16> = (0..4).map(|_| r.post_rx(&[1024])).collect();
        r.kick_rx();
        let f = frame(11, 2500); // 2512 bytes: three buffers
        r.host_sends(&f);
        let mut got = Vec::new();
        for (i, want) in [1024u32, 1024, 464].into_iter().enumerate() {
            let (id, len) = r.rx.wait_used(&r.mem);
            assert_eq!((id, len), (u32::from(heads[i]), want), "buffer {i}");
            got.extend(r.read_guest(RX_AREA + 1024 * i as u64, len));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[12..], f[12..]);
        // The fourth buffer takes the next frame.
        let g = frame(12, 50);
        r.host_sends(&g);
        assert_eq!(r.rx.wait_used(&r.mem), (u32::from(heads[3]), len32(&g)));
    }

    #[test]
    fn an_rx_frame_waits_without_spinning_until_the_guest_posts_buffers() {
        let mut r = rig(ALL);
        let first = frame(21, 300);
        let second = frame(22, 400);
        r.host_sends(&first);
        r.host_sends(&second);
        // The worker takes the first frame off the tap and holds it.
        until("the tap was never read", || {
            r.tap.reads.load(Ordering::SeqCst) != 0
        });
        let tid = r.tap.reader_tid.load(Ordering::SeqCst);
        let (cpu0, reads0) = (thread_cpu_ns(tid), r.tap.reads.load(Ordering::SeqCst));
        // Nothing can arrive: there are no buffers. Meanwhile the worker sleeps.
        assert_eq!(r.rx_used_within(Duration::from_millis(300)), None);
        let cpu = thread_cpu_ns(tid) - cpu0;
        assert!(
            cpu < 50_000_000,
            "the worker spun: {cpu} ns of CPU in 300 ms"
        );
        assert_eq!(
            r.tap.reads.load(Ordering::SeqCst),
            reads0,
            "the tap was read while a frame waited"
        );
        // A notification without buffers changes nothing.
        r.kick_rx();
        assert_eq!(r.rx_used_within(Duration::from_millis(50)), None);
        // Buffers come: both frames arrive, in order, nothing lost.
        let a = r.post_rx(&[2048]);
        let b = r.post_rx(&[2048]);
        r.kick_rx();
        assert_eq!(r.rx.wait_used(&r.mem), (u32::from(a), len32(&first)));
        assert_eq!(r.rx.wait_used(&r.mem), (u32::from(b), len32(&second)));
        assert_eq!(r.read_guest(RX_AREA, 2048)[12..312], first[12..]);
        assert_eq!(r.read_guest(RX_AREA + 2048, 2048)[12..412], second[12..]);
    }

    #[test]
    fn a_frame_bigger_than_one_buffer_without_mergeable_buffers_is_dropped() {
        let mut r = rig(ALL & !VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!(r.features & VIRTIO_NET_F_MRG_RXBUF, 0);
        // Two descriptors make one chain: 1536 bytes of room.
        let head = r.post_rx(&[1024, 512]);
        r.kick_rx();
        r.host_sends(&frame(31, 2000));
        let small = frame(32, 1500); // 1512 bytes, across both descriptors
        r.host_sends(&small);
        let (id, len) = r.rx.wait_used(&r.mem);
        assert_eq!(
            (id, len),
            (u32::from(head), len32(&small)),
            "the big frame was dropped, the buffer kept for the next"
        );
        let got = r.read_guest(RX_AREA, 1536);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(got[12..1512], small[12..]);
    }

    #[test]
    fn a_frame_bigger_than_the_whole_ring_is_dropped() {
        let mut r = rig(ALL);
        // Sixteen 64-byte buffers fill the ring: 1024 bytes in all.
        let heads: Vec<u16> = (0..16).map(|_| r.post_rx(&[64])).collect();
        r.kick_rx();
        r.host_sends(&frame(41, 2000));
        let small = frame(42, 100); // 112 bytes: two buffers
        r.host_sends(&small);
        assert_eq!(r.rx.wait_used(&r.mem), (u32::from(heads[0]), 64));
        assert_eq!(r.rx.wait_used(&r.mem), (u32::from(heads[1]), 48));
        let got = r.read_guest(RX_AREA, 64);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2);
    }

    #[test]
    fn a_reset_device_comes_back_with_new_features() {
        let mut r = rig(ALL);
        let _ = negotiate_some(&mut r.t, VIRTIO_NET_F_MAC);
        let rx = DriverQueue::new(0, 16, 0x30000);
        let tx = DriverQueue::new(1, 16, 0x40000);
        rx.setup(&mut r.t);
        tx.setup(&mut r.t);
        driver_ok(&mut r.t);
        r.rx = rx;
        r.tx = tx;
        let f = frame(51, 64);
        r.send(&f, 1);
        assert_eq!(r.tap_frame(), f);
        until("second activation set no offloads", || {
            r.tap.offloads.lock().unwrap().len() >= 2
        });
        assert_eq!(r.tap.offloads.lock().unwrap().last(), Some(&0));
    }

    /// The device on a real tap, in a network namespace of the test's own: a TX frame is
    /// received by the kernel's side of the tap; a frame the kernel sends out of the tap lands
    /// in the guest's buffers with its header (whose `num_buffers` the tap leaves unwritten)
    /// completed. The worker runs under its seccomp filter, so its `TUNSETOFFLOAD` is the
    /// real one.
    #[test]
    fn a_real_tap_carries_frames_both_ways() {
        use super::super::super::mmio::MmioTransport;
        use super::super::sys::test_support::*;
        use crate::irq::CountingInterrupt;

        if !require(
            is_root(),
            "needs root (a tap in a network namespace of its own)",
        ) || !require(
            std::path::Path::new("/dev/net/tun").exists(),
            "needs /dev/net/tun",
        ) {
            return;
        }
        // The namespace is this thread's alone; it goes when the tap closes.
        std::thread::spawn(|| {
            const NAME: &str = "yvnet0";
            unshare_net().unwrap();
            let tap = open_tap(NAME).unwrap();
            set_up(NAME).unwrap();
            // The offloads the worker sets for a driver that takes them all are ones the tap
            // takes.
            super::super::sys::set_offload(std::os::fd::AsFd::as_fd(&tap), tap_offloads(u64::MAX))
                .unwrap();
            let dev = Net::new(tap, MAC, MTU, crate::seccomp::Seccomp::Enforce).unwrap();
            let mem = memory();
            let mut t =
                MmioTransport::new(mem.clone(), Box::new(dev), CountingInterrupt::new()).unwrap();
            negotiate_some(&mut t, ALL);
            let mut rx = DriverQueue::new(0, 16, 0x10000);
            let mut tx = DriverQueue::new(1, 16, 0x20000);
            rx.setup(&mut t);
            tx.setup(&mut t);
            driver_ok(&mut t);

            // TX: an Ethernet broadcast with an unknown EtherType, after a plain header.
            let before = rx_packets(NAME);
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&MAC);
            f.extend_from_slice(&[0x88, 0xb5]);
            f.extend_from_slice(&[0x5a; 46]);
            mem.write_slice(&f, GuestAddress(TX_AREA)).unwrap();
            let head = tx.add(&mem, &[(TX_AREA, len32(&f), false)]);
            notify(&mut t, 1);
            assert_eq!(tx.wait_used(&mem), (u32::from(head), 0));
            until("the tap never received the frame", || {
                rx_packets(NAME) != before
            });

            // RX: the kernel may send its own frames (IPv6 neighbour discovery) first: look
            // for ours among what arrives.
            for i in 0..16u64 {
                rx.add(&mem, &[(RX_AREA + i * 0x1000, 0x1000, true)]);
            }
            notify(&mut t, 0);
            let mut ours = MAC.to_vec();
            ours.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
            ours.extend((0..100u8).map(|i| i ^ 0xa5));
            send_on(NAME, &ours).unwrap();
            loop {
                let (head, len) = rx.wait_used(&mem);
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(RX_AREA + u64::from(head) * 0x1000))
                    .unwrap();
                assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
                if got[VNET_HDR_LEN..] == ours[..] {
                    break;
                }
            }
        })
        .join()
        .unwrap();
    }
}
