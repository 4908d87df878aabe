//! One virtio-blk request (virtio 1.2, 5.2.6): the header, the data buffers and the status
//! byte, served against the backing file. Every length and sector is the guest's: checked
//! against the disk before any I/O, and copied in bounded chunks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use vm_memory::GuestMemoryMmap;

use super::{
    SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::GuestMemory;
use crate::guest_warn;

/// Copy granularity between the file and guest memory.
const CHUNK: usize = 64 * 1024;

pub(super) struct Disk {
    pub(super) file: File,
    pub(super) read_only: bool,
    pub(super) capacity: u64,
    pub(super) id: [u8; VIRTIO_BLK_ID_BYTES],
}

/// Serve one request against `disk` (`None`: an empty slot); the number of bytes written into
/// guest memory.
pub(super) fn handle(
    disk: Option<&Disk>,
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
    let (status, written) = execute(disk, &mut reader, &mut writer);
    if status_w.write_all(&[status]).is_err() {
        return 0;
    }
    // A chain may describe more than 4 GiB (descriptors can overlap): saturate.
    u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
}

/// (status, data bytes written to the guest)
fn execute(
    disk: Option<&Disk>,
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
    match disk {
        Some(disk) => disk.execute(kind, sector, reader, writer),
        // An empty slot: the driver sees capacity 0 and has no reason to send I/O.
        None if kind == VIRTIO_BLK_T_FLUSH => (VIRTIO_BLK_S_OK, 0),
        None => (VIRTIO_BLK_S_IOERR, 0),
    }
}

impl Disk {
    fn execute(
        &self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
    ) -> (u8, usize) {
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
    use std::fs::File;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::super::testing::*;
    use super::super::testing::*;
    use super::*;

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
}
