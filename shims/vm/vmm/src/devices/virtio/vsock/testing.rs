//! A test guest for the vsock device: its rx/tx queues in test memory, packets built and
//! parsed by hand, and host clients on the Unix side.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::super::mmio::MmioTransport;
use super::super::testing::*;
use super::*;
use crate::GuestMemory;
use crate::irq::CountingInterrupt;

pub const CID: u64 = 3;
const RXBUF: u64 = 0x100000;
const TXBUF: u64 = 0x200000;
const RX_DATA: u32 = 4096;

#[derive(Debug, Default, Clone)]
pub struct Pkt {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub data: Vec<u8>,
}

pub struct Rig {
    pub t: MmioTransport,
    pub mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    pub uds: PathBuf,
    _dir: tempfile::TempDir,
    tx_slot: u64,
    /// Post a fresh rx buffer for each one received.
    pub repost: bool,
}

pub fn rig() -> Rig {
    rig_with(8)
}

/// A device with `rx_buffers` rx buffers posted (at most 16).
pub fn rig_with(rx_buffers: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let dev = Vsock::new(CID, uds.clone(), crate::seccomp::Seccomp::Enforce).unwrap();
    let mem = memory();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), CountingInterrupt::new()).unwrap();
    negotiate(&mut t);
    let mut cfg = [0u8; 8];
    crate::bus::BusDevice::read(&mut t, 0, 0x100, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let rx = DriverQueue::new(0, 16, 0x10000);
    let tx = DriverQueue::new(1, 16, 0x20000);
    rx.setup(&mut t);
    tx.setup(&mut t);
    DriverQueue::new(2, 16, 0x30000).setup(&mut t);
    driver_ok(&mut t);
    let mut r = Rig {
        t,
        mem,
        rx,
        tx,
        uds,
        _dir: dir,
        tx_slot: 0,
        repost: true,
    };
    for _ in 0..rx_buffers {
        r.post_rx();
    }
    r.kick_rx();
    r
}

impl Rig {
    pub fn post_rx(&mut self) {
        // Single-descriptor chains: the head index is the descriptor index.
        let idx = u64::from(self.rx.peek_next_desc());
        self.rx.add(
            &self.mem,
            &[(
                RXBUF + idx * 0x2000,
                u32::try_from(PKT_HEADER_SIZE).unwrap() + RX_DATA,
                true,
            )],
        );
    }

    pub fn kick_rx(&mut self) {
        notify(&mut self.t, 0);
    }

    pub fn try_recv(&mut self, wait: Duration) -> Option<Pkt> {
        let deadline = Instant::now() + wait;
        let (head, len) = loop {
            if let Some(u) = self.rx.pop_used(&self.mem) {
                break u;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let addr = RXBUF + u64::from(head) * 0x2000;
        let mut h = [0u8; PKT_HEADER_SIZE];
        self.mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
        let le32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let le64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let n = le32(24) as usize;
        assert_eq!(len as usize, PKT_HEADER_SIZE + n);
        let mut data = vec![0u8; n];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + PKT_HEADER_SIZE as u64))
            .unwrap();
        if self.repost {
            self.post_rx();
            self.kick_rx();
        }
        Some(Pkt {
            src_cid: le64(0),
            dst_cid: le64(8),
            src_port: le32(16),
            dst_port: le32(20),
            type_: u16::from_le_bytes([h[28], h[29]]),
            op: u16::from_le_bytes([h[30], h[31]]),
            flags: le32(32),
            buf_alloc: le32(36),
            fwd_cnt: le32(40),
            data,
        })
    }

    pub fn recv(&mut self) -> Pkt {
        self.try_recv(Duration::from_secs(5))
            .expect("a packet for the guest")
    }

    /// Post `p` on the tx queue and kick; its head index.
    pub fn post_tx(&mut self, p: &Pkt) -> u16 {
        let addr = TXBUF + (self.tx_slot % 16) * 0x20000;
        self.tx_slot += 1;
        let mut h = [0u8; PKT_HEADER_SIZE];
        h[0..8].copy_from_slice(&p.src_cid.to_le_bytes());
        h[8..16].copy_from_slice(&p.dst_cid.to_le_bytes());
        h[16..20].copy_from_slice(&p.src_port.to_le_bytes());
        h[20..24].copy_from_slice(&p.dst_port.to_le_bytes());
        h[24..28].copy_from_slice(&u32::try_from(p.data.len()).unwrap().to_le_bytes());
        h[28..30].copy_from_slice(&p.type_.to_le_bytes());
        h[30..32].copy_from_slice(&p.op.to_le_bytes());
        h[32..36].copy_from_slice(&p.flags.to_le_bytes());
        h[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
        h[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(&p.data, GuestAddress(addr + 0x100))
            .unwrap();
        let mut chain = vec![(addr, u32::try_from(PKT_HEADER_SIZE).unwrap(), false)];
        if !p.data.is_empty() {
            chain.push((addr + 0x100, u32::try_from(p.data.len()).unwrap(), false));
        }
        let head = self.tx.add(&self.mem, &chain);
        notify(&mut self.t, 1);
        head
    }

    /// The next tx buffer the device is done with, if it finishes one within `wait`.
    pub fn try_tx_used(&mut self, wait: Duration) -> Option<u32> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some((head, _)) = self.tx.pop_used(&self.mem) {
                return Some(head);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Send `p` and wait for the device to consume it.
    pub fn send(&mut self, p: &Pkt) {
        let head = self.post_tx(p);
        assert_eq!(self.tx.wait_used(&self.mem).0, u32::from(head));
    }
}

/// A packet from the guest on connection (guest port, host port).
pub fn gp(guest_port: u32, host_port: u32, op: u16) -> Pkt {
    Pkt {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Pkt::default()
    }
}

pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// A host client connected to guest port `guest_port`: the stream and our host port.
pub fn client(r: &mut Rig, guest_port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let req = r.recv();
    assert_eq!(
        (req.op, req.dst_port, req.src_cid, req.dst_cid),
        (OP_REQUEST, guest_port, HOST_CID, CID)
    );
    assert_eq!(req.type_, TYPE_STREAM);
    assert!(req.src_port >= unix::LOCAL_PORT_BASE);
    r.send(&gp(guest_port, req.src_port, OP_RESPONSE));
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(read_n(&mut s, ok.len()), ok.as_bytes());
    (s, req.src_port)
}
