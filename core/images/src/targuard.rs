//! A reader that walks a tar stream's headers as the bytes pass and refuses special entries
//! (PAX `x`/`g`, GNU long names `L`/`K`) larger than [`MAX_SPECIAL`].
//!
//! The `tar` crate reads such entries whole into memory, sized by their header, so a small
//! compressed layer could make the daemon allocate gigabytes before any check of ours runs. Go's
//! archive/tar caps them the same way (`maxSpecialFileSize`, 1 MiB).

use std::io::{self, Read};

/// Largest PAX or GNU long-name entry accepted.
pub const MAX_SPECIAL: u64 = 1 << 20;

const BLOCK: u64 = 512;

pub struct TarGuard<R> {
    inner: R,
    /// Bytes passed so far.
    pos: u64,
    /// Where the next header starts.
    next: u64,
    header: Vec<u8>,
    /// The data of the PAX header being passed (for a `size` record), and how much is left.
    pax: Option<(Vec<u8>, u64)>,
    /// A `size` a PAX header set for the next entry.
    pax_size: Option<u64>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R) -> TarGuard<R> {
        TarGuard {
            inner,
            pos: 0,
            next: 0,
            header: Vec::with_capacity(BLOCK as usize),
            pax: None,
            pax_size: None,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if let Some((data, left)) = self.pax.as_mut() {
                let n = (*left).min(bytes.len() as u64) as usize;
                data.extend_from_slice(&bytes[..n]);
                *left -= n as u64;
                self.pos += n as u64;
                bytes = &bytes[n..];
                if *left == 0 {
                    self.pax_size = pax_size(data);
                    self.pax = None;
                }
                continue;
            }
            if self.pos < self.next {
                let n = (self.next - self.pos).min(bytes.len() as u64) as usize;
                self.pos += n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (BLOCK as usize - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            self.pos += n as u64;
            bytes = &bytes[n..];
            if self.header.len() == BLOCK as usize {
                let header = std::mem::take(&mut self.header);
                self.header.reserve(BLOCK as usize);
                self.on_header(&header)?;
            }
        }
        Ok(())
    }

    fn on_header(&mut self, h: &[u8]) -> io::Result<()> {
        if h.iter().all(|b| *b == 0) {
            self.next = self.pos;
            return Ok(());
        }
        let kind = h[156];
        let size = header_size(&h[124..136]);
        let special = matches!(kind, b'x' | b'g' | b'L' | b'K');
        let size = match (special, size) {
            (true, Some(s)) if s <= MAX_SPECIAL => s,
            (true, s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a tar {} entry of {} bytes (more than {MAX_SPECIAL} accepted)",
                        match kind {
                            b'x' | b'g' => "PAX header",
                            _ => "GNU long name",
                        },
                        s.map_or("too many".to_owned(), |s| s.to_string())
                    ),
                ));
            }
            (false, s) => {
                let s = self.pax_size.take().or(s).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "a tar header with a bad size")
                })?;
                // Entries without data in the archive whatever their size says.
                if matches!(kind, b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
                    0
                } else {
                    s
                }
            }
        };
        let padded = size.div_ceil(BLOCK).saturating_mul(BLOCK);
        self.next = self.pos.saturating_add(padded);
        if kind == b'x' {
            self.pax = Some((Vec::with_capacity(size as usize), size));
        }
        Ok(())
    }
}

/// A header's size field: octal, or base-256 when the high bit is set.
fn header_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[..field.len() - 8].iter().skip(1).any(|b| *b != 0) || field[0] != 0x80 {
            return None;
        }
        let mut v = 0u64;
        for b in &field[field.len() - 8..] {
            v = (v << 8) | u64::from(*b);
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&s).ok()?, 8).ok()
}

/// The `size` record of PAX header data (`<len> size=<n>\n`).
fn pax_size(data: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|l| {
        let (_, kv) = l.split_once(' ')?;
        kv.strip_prefix("size=")?.parse().ok()
    })
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn read_all(bytes: &[u8]) -> io::Result<u64> {
        let mut g = TarGuard::new(bytes);
        let mut sink = Vec::new();
        // Small reads, so headers span read boundaries.
        let mut buf = [0u8; 100];
        loop {
            let n = g.read(&mut buf)?;
            if n == 0 {
                return Ok(sink.len() as u64);
            }
            sink.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn a_normal_archive_passes_and_a_huge_pax_header_does_not() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(700);
        h.set_mode(0o644);
        h.set_cksum();
        let long = format!("{}/file", "d".repeat(300));
        b.append_data(&mut h, &long, &[7u8; 700][..]).unwrap();
        let normal = b.into_inner().unwrap();
        assert_eq!(read_all(&normal).unwrap(), normal.len() as u64);

        let mut bomb = header("pax", b'x', 8 << 30);
        bomb.extend(vec![0u8; 4096]);
        let e = read_all(&bomb).unwrap_err();
        assert!(e.to_string().contains("PAX header"), "{e}");
        let mut long_name = header("ll", b'L', 2 << 20);
        long_name.extend(vec![b'a'; 4096]);
        assert!(read_all(&long_name).is_err());
    }

    #[test]
    fn a_pax_size_moves_the_next_header() {
        // A PAX header whose `size` record says 1024 for a file whose ustar size says 0: the
        // guard must skip 1024 bytes of data, then see the next (huge special) header.
        let rec = "13 size=1024\n";
        let mut b = header("pax", b'x', rec.len() as u64);
        let mut data = rec.as_bytes().to_vec();
        data.resize(512, 0);
        b.extend(data);
        b.extend(header("f", b'0', 0));
        b.extend(vec![0u8; 1024]);
        b.extend(header("bomb", b'x', 8 << 30));
        let e = read_all(&b).unwrap_err();
        assert!(e.to_string().contains("PAX header"), "{e}");
    }
}
