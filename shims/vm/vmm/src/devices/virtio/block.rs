//! virtio-blk on a plain file: IN, OUT, FLUSH and GET_ID, with pread/pwrite on 512-byte
//! sectors. Malformed requests complete with IOERR/UNSUPP; nothing the guest sends panics.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Poller, STOP_TOKEN, Worker};
use super::{ActivateError, InterruptStatus, TYPE_BLOCK, VirtioDevice};
use crate::GuestMemory;
use crate::guest_warn;

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Copy granularity between the file and guest memory.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sizing {path}")]
    Size {
        path: String,
        #[source]
        source: io::Error,
    },
}

pub struct Block {
    file: Arc<File>,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    queue_sizes: [u16; 1],
    worker: Option<Worker>,
}

impl Block {
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let name = || path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: name(),
                source,
            })?;
        // Block devices report size 0 in their metadata; seeking to the end works for both.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: name(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: name(),
            source,
        })?;
        // A stable serial: the backing file's identity, like firecracker's device id.
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let s = format!("{:x}{:x}", meta.dev(), meta.ino());
        let n = s.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        Ok(Block {
            file: Arc::new(file),
            read_only,
            capacity: size / SECTOR_SIZE,
            id,
            queue_sizes: [QUEUE_SIZE],
            worker: None,
        })
    }

    /// Size in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) unused; seg_max:
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

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
        let (Ok([queue]), Ok([evt])) = (
            <[Queue; 1]>::try_from(queues),
            <[EventFd; 1]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
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

/// Config space reads: any width, bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

struct Disk {
    file: Arc<File>,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES],
}

const QUEUE_TOKEN: u64 = 0;

fn run(
    disk: Disk,
    mem: GuestMemory,
    mut queue: Queue,
    evt: EventFd,
    irq: Arc<InterruptStatus>,
    stop: EventFd,
) -> io::Result<()> {
    let mut poller = Poller::new()?;
    poller.add(&evt, QUEUE_TOKEN, EventSet::IN)?;
    poller.add(&stop, STOP_TOKEN, EventSet::IN)?;
    loop {
        for (token, _) in poller.wait(-1)? {
            match token {
                STOP_TOKEN => return Ok(()),
                QUEUE_TOKEN => {
                    let _ = evt.read();
                    if queue.ready() {
                        process_queue(&disk, &mem, &mut queue, &irq);
                    }
                }
                _ => {}
            }
        }
    }
}

fn process_queue(disk: &Disk, mem: &GuestMemory, queue: &mut Queue, irq: &InterruptStatus) {
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            guest_warn!("virtio-blk: queue: {e}");
            return;
        }
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = disk.handle(mem, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!("virtio-blk: used ring: {e}");
                return;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            irq.signal_used();
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                guest_warn!("virtio-blk: queue: {e}");
                return;
            }
        }
    }
}

impl Disk {
    /// Serve one request; the number of bytes written into guest memory.
    fn handle(
        &self,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<()>>,
    ) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                guest_warn!("virtio-blk: request chain outside guest memory");
                return 0;
            }
        };
        let avail = writer.available_bytes();
        if avail == 0 {
            guest_warn!("virtio-blk: request without a status byte");
            return 0;
        }
        let mut status_w = match writer.split_at(avail - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let (status, written) = self.execute(&mut reader, &mut writer);
        if status_w.write_all(&[status]).is_err() {
            return 0;
        }
        (written + 1) as u32
    }

    /// (status, data bytes written to the guest)
    fn execute(
        &self,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
    ) -> (u8, usize) {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            guest_warn!("virtio-blk: short request header");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let Some(offset) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.read_into(offset, len, writer) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len),
                    Err(e) => {
                        guest_warn!("virtio-blk: read at sector {sector}: {e}");
                        (VIRTIO_BLK_S_IOERR, writer.bytes_written())
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Some(offset) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.write_from(offset, len, reader) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        guest_warn!("virtio-blk: write at sector {sector}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        guest_warn!("virtio-blk: flush: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(VIRTIO_BLK_ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The byte offset of `sector` if `len` bytes from it are whole sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR_SIZE) {
            guest_warn!(len, "virtio-blk: request length is not whole sectors");
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        if end > self.capacity {
            guest_warn!(
                sector,
                len,
                capacity = self.capacity,
                "virtio-blk: request beyond the disk"
            );
            return None;
        }
        Some(sector * SECTOR_SIZE)
    }

    fn read_into(
        &self,
        mut offset: u64,
        len: usize,
        writer: &mut virtio_queue::Writer<'_, ()>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.file.read_exact_at(&mut buf[..n], offset)?;
            writer.write_all(&buf[..n])?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn write_from(
        &self,
        mut offset: u64,
        len: usize,
        reader: &mut virtio_queue::Reader<'_, ()>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            reader.read_exact(&mut buf[..n])?;
            self.file.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::mmio::MmioTransport;
    use super::super::testing::*;
    use super::*;
    use crate::irq::CountingInterrupt;

    const HDR: u64 = 0x100000;
    const DATA: u64 = 0x110000;
    const STATUS: u64 = 0x130000;

    struct Rig {
        t: MmioTransport,
        q: DriverQueue,
        mem: GuestMemory,
        irq: Arc<CountingInterrupt>,
        file: tempfile::NamedTempFile,
    }

    fn rig(read_only: bool) -> Rig {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut content = vec![0u8; 8 * 512 + 100];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        file.write_all(&content).unwrap();
        let dev = Block::new(file.path(), read_only).unwrap();
        assert_eq!(dev.capacity(), 8);
        let mem = memory();
        let irq = CountingInterrupt::new();
        let mut t = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
        let features = negotiate(&mut t);
        assert_ne!(features & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(features & VIRTIO_BLK_F_RO != 0, read_only);
        let q = DriverQueue::new(0, 16, 0x10000);
        q.setup(&mut t);
        driver_ok(&mut t);
        Rig {
            t,
            q,
            mem,
            irq,
            file,
        }
    }

    impl Rig {
        /// Submit one request; (status, used len).
        fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HDR, 16, false)];
            chain.extend_from_slice(data);
            chain.push((STATUS, 1, true));
            let head = self.q.add(&self.mem, &chain);
            // Notify as an MMIO exit would (no ioeventfd in tests).
            notify(&mut self.t, 0);
            let (id, len) = self.q.wait_used(&self.mem);
            assert_eq!(id, u32::from(head));
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
    }

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
    fn reads_and_writes_sectors() {
        let mut r = rig(false);
        // Read sectors 2..4 into two buffers.
        let (s, len) = r.request(
            VIRTIO_BLK_T_IN,
            2,
            &[(DATA, 512, true), (DATA + 0x1000, 512, true)],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1025));
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|&b| b == 2));
        r.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(got.iter().all(|&b| b == 3));
        assert!(r.irq.count() >= 1, "used buffer interrupt");

        // Write sector 7, read it back from the file.
        r.mem
            .write_slice(&[0xab; 1024], GuestAddress(DATA))
            .unwrap();
        let (s, len) = r.request(VIRTIO_BLK_T_OUT, 7, &[(DATA, 512, false)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
        let f = File::open(r.file.path()).unwrap();
        let mut back = [0u8; 512];
        f.read_exact_at(&mut back, 7 * 512).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        f.read_exact_at(&mut back, 6 * 512).unwrap();
        assert!(back.iter().all(|&b| b == 6), "neighbour untouched");

        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn get_id_and_unsupported() {
        let mut r = rig(false);
        let (s, len) = r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_ne!(id, [0; 20]);
        assert_eq!(r.request(11, 0, &[]).0, VIRTIO_BLK_S_UNSUPP); // DISCARD
    }

    #[test]
    fn out_of_range_and_partial_sectors_are_refused() {
        let mut r = rig(false);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 8, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 1024, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, u64::MAX, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 8, &[(DATA, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        // The last in-range sector still works.
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn malformed_chains_do_not_stop_the_device() {
        let mut r = rig(false);
        // Header only, no status byte: completed with length 0.
        let head = r.q.add(&r.mem, &[(HDR, 16, false)]);
        notify(&mut r.t, 0);
        assert_eq!(r.q.wait_used(&r.mem), (u32::from(head), 0));
        // Buffer outside guest memory.
        let head = r.q.add(
            &r.mem,
            &[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)],
        );
        notify(&mut r.t, 0);
        assert_eq!(r.q.wait_used(&r.mem), (u32::from(head), 0));
        // Short header.
        let head = r.q.add(&r.mem, &[(HDR, 8, false), (STATUS, 1, true)]);
        notify(&mut r.t, 0);
        assert_eq!(r.q.wait_used(&r.mem), (u32::from(head), 1));
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut r = rig(true);
        r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        let f = File::open(r.file.path()).unwrap();
        let mut back = [0u8; 512];
        f.read_exact_at(&mut back, 512).unwrap();
        assert!(back.iter().all(|&b| b == 1));
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn reset_stops_the_worker_and_reactivates() {
        let mut r = rig(false);
        crate::devices::virtio::testing::write32(&mut r.t, super::super::mmio::REG_STATUS, 0);
        negotiate(&mut r.t);
        r.q = DriverQueue::new(0, 16, 0x20000);
        r.q.setup(&mut r.t);
        driver_ok(&mut r.t);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
            VIRTIO_BLK_S_OK
        );
    }
}
