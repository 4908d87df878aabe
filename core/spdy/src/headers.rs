//! Name/value header blocks (specification section 2.6.10).
//!
//! Uncompressed, a block is a 32-bit count of pairs, then per pair a 32-bit length and the
//! name, a 32-bit length and the value; several values of one name are joined by NUL bytes.
//! Names are lowercase and appear once. On the wire the blocks of one direction of a session
//! are one zlib stream, started with the SPDY/3 dictionary ([`DICTIONARY`]) and flushed
//! (`Z_SYNC_FLUSH`) at the end of every block, so each side keeps one [`Compressor`] for what
//! it sends and one [`Decompressor`] for what it receives.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Words that start the SPDY/3 dictionary, each written as a 32-bit length and its bytes.
const DICTIONARY_WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The text that ends the SPDY/3 dictionary, as it is (no lengths).
const DICTIONARY_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411\
412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server \
Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov \
Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,\
image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate\
max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

/// The SPDY/3 zlib dictionary (section 2.6.10.1), 1423 bytes.
pub static DICTIONARY: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let mut d = Vec::with_capacity(1423);
    for w in DICTIONARY_WORDS {
        d.extend((w.len() as u32).to_be_bytes());
        d.extend(w.as_bytes());
    }
    d.extend(DICTIONARY_TAIL.as_bytes());
    d
});

/// A decoded header block: names in the order they came, each with its values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    pairs: Vec<(String, Vec<String>)>,
}

impl HeaderBlock {
    pub fn new() -> HeaderBlock {
        HeaderBlock::default()
    }

    /// Add `value` to `name` (lowercased, as SPDY requires).
    pub fn add(&mut self, name: &str, value: &str) -> &mut HeaderBlock {
        let name = name.to_ascii_lowercase();
        match self.pairs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value.to_owned()),
            None => self.pairs.push((name, vec![value.to_owned()])),
        }
        self
    }

    /// The first value of `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values(name).first().map(String::as_str)
    }

    /// Every value of `name` (lowercase).
    pub fn values(&self, name: &str) -> &[String] {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A header block that cannot be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header block: zlib: {0}")]
    Zlib(String),
    #[error("header block: the stream asks for dictionary {found:#010x}, not SPDY/3's")]
    Dictionary { found: u32 },
    #[error("header block: over {max} bytes uncompressed")]
    TooLarge { max: usize },
    #[error("header block: {count} pairs, over the limit of {max}")]
    TooMany { count: u32, max: u32 },
    #[error("header block: truncated in {0}")]
    Truncated(&'static str),
    #[error("header block: {0} bytes after its last pair")]
    Trailing(usize),
    #[error("header block: name {0:?} is empty, not lowercase or not text")]
    BadName(String),
    #[error("header block: name {0:?} appears twice")]
    Duplicate(String),
    #[error("header block: a value of {0:?} is not UTF-8")]
    BadValue(String),
    #[error("header block: {0} is over 4 GiB")]
    Length(&'static str),
}

fn zlib(e: impl std::fmt::Display) -> HeaderError {
    HeaderError::Zlib(e.to_string())
}

/// The sending side's compression context of one session.
pub struct Compressor {
    z: Compress,
}

impl Compressor {
    pub fn new() -> Result<Compressor, HeaderError> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&DICTIONARY).map_err(zlib)?;
        Ok(Compressor { z })
    }

    /// `block` as the next compressed header block of this session.
    pub fn compress(&mut self, block: &HeaderBlock) -> Result<Vec<u8>, HeaderError> {
        let raw = encode(block)?;
        let mut out = Vec::with_capacity(raw.len() / 2 + 64);
        let start = self.z.total_in();
        loop {
            let done = usize::try_from(self.z.total_in() - start).map_err(zlib)?;
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            self.z
                .compress_vec(&raw[done..], &mut out, FlushCompress::Sync)
                .map_err(zlib)?;
            // Flushed once every byte is in and the output did not fill up.
            if usize::try_from(self.z.total_in() - start).map_err(zlib)? == raw.len()
                && out.len() < out.capacity()
            {
                return Ok(out);
            }
        }
    }
}

/// The receiving side's decompression context of one session, with its bounds.
pub struct Decompressor {
    z: Decompress,
    max_bytes: usize,
    max_pairs: u32,
}

impl Decompressor {
    /// A context that refuses a block of more than `max_bytes` uncompressed or `max_pairs`
    /// pairs.
    pub fn new(max_bytes: usize, max_pairs: u32) -> Decompressor {
        Decompressor {
            z: Decompress::new(true),
            max_bytes,
            max_pairs,
        }
    }

    /// Decode the next compressed header block of this session. After an error the context
    /// is broken, as the session is (the specification makes it a session error).
    pub fn decompress(&mut self, data: &[u8]) -> Result<HeaderBlock, HeaderError> {
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        let start = self.z.total_in();
        loop {
            let done = usize::try_from(self.z.total_in() - start).map_err(zlib)?;
            let before = self.z.total_out();
            let status = match self
                .z
                .decompress(&data[done..], &mut chunk, FlushDecompress::Sync)
            {
                Ok(s) => s,
                Err(e) => match e.needs_dictionary() {
                    // zlib refuses a dictionary whose checksum is not the one the stream
                    // names.
                    Some(id) => match self.z.set_dictionary(&DICTIONARY) {
                        Ok(ours) if ours == id => continue,
                        _ => return Err(HeaderError::Dictionary { found: id }),
                    },
                    None => return Err(zlib(e)),
                },
            };
            let produced = usize::try_from(self.z.total_out() - before).map_err(zlib)?;
            if raw.len() + produced > self.max_bytes {
                return Err(HeaderError::TooLarge {
                    max: self.max_bytes,
                });
            }
            raw.extend_from_slice(&chunk[..produced]);
            let consumed = usize::try_from(self.z.total_in() - start).map_err(zlib)?;
            if status == Status::StreamEnd || (consumed == data.len() && produced < chunk.len()) {
                break;
            }
            if produced == 0 && consumed == done {
                return Err(HeaderError::Zlib("no progress".into()));
            }
        }
        decode(&raw, self.max_pairs)
    }
}

fn len32(n: usize, what: &'static str) -> Result<[u8; 4], HeaderError> {
    u32::try_from(n)
        .map(u32::to_be_bytes)
        .map_err(|_| HeaderError::Length(what))
}

/// The uncompressed form of `block`.
pub fn encode(block: &HeaderBlock) -> Result<Vec<u8>, HeaderError> {
    let mut out = Vec::new();
    out.extend(len32(block.pairs.len(), "the pair count")?);
    for (name, values) in &block.pairs {
        out.extend(len32(name.len(), "a name")?);
        out.extend(name.as_bytes());
        let value = values.join("\0");
        out.extend(len32(value.len(), "a value")?);
        out.extend(value.as_bytes());
    }
    Ok(out)
}

/// A cursor over an uncompressed block.
struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HeaderError> {
        let b = self
            .raw
            .get(self.at..self.at.saturating_add(n))
            .ok_or(HeaderError::Truncated(what))?;
        self.at += n;
        Ok(b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, HeaderError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Read an uncompressed block.
pub fn decode(raw: &[u8], max_pairs: u32) -> Result<HeaderBlock, HeaderError> {
    let mut r = Reader { raw, at: 0 };
    let count = r.u32("the pair count")?;
    if count > max_pairs {
        return Err(HeaderError::TooMany {
            count,
            max: max_pairs,
        });
    }
    let mut block = HeaderBlock::new();
    for _ in 0..count {
        let n = r.u32("a name's length")? as usize;
        let name = r.take(n, "a name")?;
        let name = match std::str::from_utf8(name) {
            Ok(s) if !s.is_empty() && !s.bytes().any(|b| b.is_ascii_uppercase()) => s,
            _ => return Err(HeaderError::BadName(String::from_utf8_lossy(name).into())),
        };
        if block.pairs.iter().any(|(n, _)| n == name) {
            return Err(HeaderError::Duplicate(name.into()));
        }
        let n = r.u32("a value's length")? as usize;
        let value = r.take(n, "a value")?;
        let value = std::str::from_utf8(value).map_err(|_| HeaderError::BadValue(name.into()))?;
        block.pairs.push((
            name.to_owned(),
            value.split('\0').map(str::to_owned).collect(),
        ));
    }
    if r.at != raw.len() {
        return Err(HeaderError::Trailing(raw.len() - r.at));
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(pairs: &[(&str, &str)]) -> HeaderBlock {
        let mut b = HeaderBlock::new();
        for (n, v) in pairs {
            b.add(n, v);
        }
        b
    }

    #[test]
    fn the_dictionary_is_the_specifications() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(DICTIONARY.ends_with(b"utf-,*,enq=0."));
    }

    #[test]
    fn blocks_round_trip_through_one_context_per_direction() {
        let mut c = Compressor::new().unwrap_or_else(|e| panic!("{e}"));
        let mut d = Decompressor::new(64 << 10, 128);
        let first = block(&[
            ("streamtype", "error"),
            ("x-kubernetes-pf-port", "8080"),
            ("requestid", "0"),
        ]);
        let wire1 = c.compress(&first).unwrap_or_else(|e| panic!("{e}"));
        // A zlib stream naming the dictionary (FDICT) by its Adler-32 checksum.
        assert_eq!(wire1[0] & 0x0f, 8, "deflate");
        assert_ne!(wire1[1] & 0x20, 0, "FDICT");
        assert_eq!(d.decompress(&wire1), Ok(first.clone()));
        // The second block rides the same stream: repeated names cost almost nothing.
        let second = block(&[("streamtype", "data"), ("requestid", "0")]);
        let wire2 = c.compress(&second).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            wire2.len() < wire1.len(),
            "{} vs {}",
            wire2.len(),
            wire1.len()
        );
        assert_eq!(d.decompress(&wire2), Ok(second));
        // Several values of one name, joined by NUL.
        let multi = block(&[("a", "1"), ("a", "2"), ("B", "3")]);
        assert_eq!(multi.values("a"), ["1", "2"]);
        assert_eq!(multi.get("b"), Some("3"));
        let wire3 = c.compress(&multi).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.decompress(&wire3), Ok(multi));
        // A fresh context cannot read the middle of a stream.
        assert!(Decompressor::new(64 << 10, 128).decompress(&wire2).is_err());
    }

    #[test]
    fn bounds_and_malformed_blocks_are_refused() {
        let big = block(&[("x", &"v".repeat(10_000))]);
        let wire = Compressor::new()
            .and_then(|mut c| c.compress(&big))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Decompressor::new(4096, 128).decompress(&wire),
            Err(HeaderError::TooLarge { max: 4096 })
        );
        let many = {
            let mut b = HeaderBlock::new();
            for i in 0..10 {
                b.add(&format!("h{i}"), "v");
            }
            b
        };
        let wire = Compressor::new()
            .and_then(|mut c| c.compress(&many))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Decompressor::new(4096, 5).decompress(&wire),
            Err(HeaderError::TooMany { count: 10, max: 5 })
        );
        // A plain zlib stream with another dictionary.
        let mut other = Compress::new(Compression::default(), true);
        other
            .set_dictionary(b"not spdy")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::with_capacity(256);
        other
            .compress_vec(&[0, 0, 0, 0], &mut out, FlushCompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            Decompressor::new(4096, 5).decompress(&out),
            Err(HeaderError::Dictionary { .. })
        ));
        // Uncompressed layouts.
        assert_eq!(
            decode(&[0, 0, 0], 8),
            Err(HeaderError::Truncated("the pair count"))
        );
        assert_eq!(
            decode(&[0, 0, 0, 1, 0, 0, 0, 9, b'a'], 8),
            Err(HeaderError::Truncated("a name"))
        );
        assert_eq!(
            decode(&[0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 0], 8),
            Err(HeaderError::BadName("A".into()))
        );
        let dup = [
            0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 0, 0,
        ];
        assert_eq!(decode(&dup, 8), Err(HeaderError::Duplicate("a".into())));
        assert_eq!(decode(&[0, 0, 0, 0, 1], 8), Err(HeaderError::Trailing(1)));
        assert_eq!(decode(&[0, 0, 0, 0], 8), Ok(HeaderBlock::new()));
    }
}
