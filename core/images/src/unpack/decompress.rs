//! Layer decompression (gzip, zstd or none, by magic bytes) and the counting hasher the diff
//! id comes from.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

use super::{UnpackError, corrupt};

/// Picks the decompressor from the stream's first bytes.
pub(super) fn decompress<'a>(mut layer: impl Read + 'a) -> Result<Box<dyn Read + 'a>, UnpackError> {
    const GZIP: &[u8] = &[0x1f, 0x8b];
    const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
    let mut magic = [0u8; 4];
    let mut len = 0;
    while len < magic.len() {
        match layer.read(&mut magic[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(corrupt(e)),
        }
    }
    let head = &magic[..len];
    let stream = BufReader::with_capacity(128 << 10, io::Cursor::new(head.to_vec()).chain(layer));
    Ok(if head.starts_with(GZIP) {
        // Multi-member gzip is valid gzip (pigz and concatenated streams produce it).
        Box::new(flate2::bufread::MultiGzDecoder::new(stream))
    } else if head.starts_with(ZSTD) {
        Box::new(zstd::stream::read::Decoder::with_buffer(stream).map_err(corrupt)?)
    } else {
        Box::new(stream)
    })
}

/// The uncompressed stream passed its bound (carried in an `io::Error` up to
/// [`super::corrupt`], which makes it [`UnpackError::TooLarge`]).
#[derive(Debug)]
pub(super) struct TarTooLarge {
    pub(super) limit: u64,
}

impl std::fmt::Display for TarTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {} bytes uncompressed", self.limit)
    }
}

impl std::error::Error for TarTooLarge {}

/// Counts and hashes what is read through it (the uncompressed tar), and fails past `limit`
/// bytes: the decompressor is never asked for more than one byte beyond it.
pub(super) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    limit: u64,
}

impl<R> Hashing<R> {
    pub(super) fn new(inner: R, limit: u64) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            limit,
        }
    }

    /// The hash and length of what was read.
    pub(super) fn finish(self) -> (Sha256, u64) {
        (self.hasher, self.bytes)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.bytes).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        if self.bytes > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                TarTooLarge { limit: self.limit },
            ));
        }
        Ok(n)
    }
}
