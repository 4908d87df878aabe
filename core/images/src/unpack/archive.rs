//! The one tar parser the unpack uses: it walks the uncompressed stream header by header and
//! decides, alone, where each header and each entry's data is.
//!
//! It used to be two: a guard re-parsing the stream to cap special entries, under the `tar`
//! crate's own reader. They placed headers differently (a directory with a size, GNU sparse
//! extension blocks, a PAX header with a blank line), and each disagreement let a small layer
//! hide a special entry from the guard that `tar` then read whole into memory. So there is one
//! reader, and it is ours: `tar`'s raw entries cannot take a PAX `size` (Go's archive/tar writes
//! one for files over 8 GiB, with 0 in the header), and its cooked entries read PAX headers and
//! GNU long names whole before anyone can cap them. `tar` still decodes each header's fields.
//!
//! The rules, as Go's archive/tar (what builds most images) reads them where it matters:
//! - PAX (`x`) and GNU long-name (`L`, `K`) entries are read into memory only up to
//!   [`MAX_SPECIAL`] bytes (Go's `maxSpecialFileSize`); larger ones are refused before a byte of
//!   them is read. PAX records are parsed by their length prefixes; a malformed record (a blank
//!   line, a length past the end) refuses the layer, as Go does. Global PAX headers (`g`) are
//!   read the same way and otherwise ignored.
//! - A PAX `size` overrides the header's; `path`, `linkpath`, `uid` and `gid` override the
//!   header's too (long names are overridden by PAX, as in Go).
//! - GNU sparse entries (the `S` type, or PAX `GNU.sparse.*` records) are refused: OCI layers
//!   never need them, and their maps make the reader invent data (zeros up to a declared size)
//!   that is not in the stream.
//! - Entry types that carry no data (links, devices, directories, fifos) must say size 0: Go
//!   skips no data for them whatever the size says, `tar` skipped the size, and refusing the
//!   layer is the only reading both agree with.

use std::io::{self, Read};

use tar::{EntryType, Header};

use super::{UnpackError, corrupt};

/// Largest PAX header or GNU long name accepted (Go's archive/tar caps them the same).
pub const MAX_SPECIAL: u64 = 1 << 20;

const BLOCK: u64 = 512;

/// One entry: its header, its path and link target with the long-name and PAX overrides
/// applied, its PAX records, and the size of its data.
pub(crate) struct Entry {
    pub(crate) header: Header,
    /// The effective type: a pre-POSIX regular file named with a trailing `/` is a directory.
    pub(crate) kind: EntryType,
    pub(crate) path: Vec<u8>,
    pub(crate) link: Option<Vec<u8>>,
    /// The records of the entry's PAX header, in order.
    pub(crate) pax: Vec<(String, Vec<u8>)>,
    pub(crate) size: u64,
}

impl Entry {
    /// The entry's path as text, for messages.
    pub(crate) fn name(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// The last value of PAX record `key`, if any.
    pub(crate) fn pax_value(&self, key: &str) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// The entries of a tar stream, read in order; the data of the last entry returned is read
/// through [`Archive::data`] before the next is asked for (what is left of it is skipped).
pub(crate) struct Archive<R> {
    inner: R,
    /// Data of the current entry not yet read.
    data_left: u64,
    /// Padding after the current entry's data.
    padding: u64,
    done: bool,
}

/// What precedes an entry: long names and PAX records.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<(String, Vec<u8>)>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

impl<R: Read> Archive<R> {
    pub(crate) fn new(inner: R) -> Archive<R> {
        Archive {
            inner,
            data_left: 0,
            padding: 0,
            done: false,
        }
    }

    /// The rest of the stream, once the end-of-archive block is read.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// The current entry's data.
    pub(crate) fn data(&mut self) -> Data<'_, R> {
        Data { archive: self }
    }

    /// The next entry; `None` at the end-of-archive block (or where the stream ends between
    /// two entries, as the `tar` crate and GNU tar accept).
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>, UnpackError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.data_left + self.padding)?;
        self.data_left = 0;
        self.padding = 0;
        let mut pending = Pending::default();
        loop {
            let Some(header) = self.header()? else {
                self.done = true;
                if !pending.is_empty() {
                    return Err(UnpackError::Corrupt(
                        "the archive ends after a long name or PAX header, before its entry".into(),
                    ));
                }
                return Ok(None);
            };
            let kind = header.entry_type();
            let header_name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
            let size = header.entry_size().map_err(corrupt)?;
            let special = match kind {
                EntryType::XHeader | EntryType::XGlobalHeader => Some("PAX header"),
                EntryType::GNULongName => Some("GNU long name"),
                EntryType::GNULongLink => Some("GNU long link name"),
                _ => None,
            };
            if let Some(what) = special {
                if size > MAX_SPECIAL {
                    return Err(UnpackError::SpecialTooLarge {
                        entry: header_name,
                        what,
                        size,
                        limit: MAX_SPECIAL,
                    });
                }
                let data = self.special(size, &header_name)?;
                let twice = || {
                    UnpackError::Corrupt(format!(
                        "entry {header_name:?}: a second {what} for one entry"
                    ))
                };
                match kind {
                    EntryType::XHeader => {
                        if pending.pax.is_some() {
                            return Err(twice());
                        }
                        pending.pax =
                            Some(parse_pax(&data).map_err(|reason| UnpackError::Pax {
                                entry: header_name.clone(),
                                reason,
                            })?);
                    }
                    // Global records describe the archive, not a file; checked, then dropped.
                    EntryType::XGlobalHeader => {
                        parse_pax(&data).map_err(|reason| UnpackError::Pax {
                            entry: header_name.clone(),
                            reason,
                        })?;
                    }
                    EntryType::GNULongName if pending.long_name.is_some() => return Err(twice()),
                    EntryType::GNULongName => pending.long_name = Some(c_string(data)),
                    _ if pending.long_link.is_some() => return Err(twice()),
                    _ => pending.long_link = Some(c_string(data)),
                }
                continue;
            }
            return self.entry(header, size, pending).map(Some);
        }
    }

    /// Builds the entry `header` starts, with what preceded it, and arms its data.
    fn entry(&mut self, header: Header, size: u64, pending: Pending) -> Result<Entry, UnpackError> {
        let pax = pending.pax.unwrap_or_default();
        let find = |key: &str| {
            pax.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let path = find("path")
            .or(pending.long_name)
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let link = find("linkpath")
            .or(pending.long_link)
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
        let name = String::from_utf8_lossy(&path).into_owned();
        let size = match find("size") {
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| UnpackError::Pax {
                    entry: name.clone(),
                    reason: format!("size {:?} is not a number", String::from_utf8_lossy(&v)),
                })?,
            None => size,
        };
        let mut kind = header.entry_type();
        if kind == EntryType::GNUSparse || pax.iter().any(|(k, _)| k.starts_with("GNU.sparse.")) {
            return Err(UnpackError::Sparse { entry: name });
        }
        // Pre-POSIX archives mark directories by a trailing slash.
        if kind == EntryType::Regular && path.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        let header_only = match kind {
            EntryType::Link => Some("hard link"),
            EntryType::Symlink => Some("symlink"),
            EntryType::Char => Some("character device"),
            EntryType::Block => Some("block device"),
            EntryType::Directory => Some("directory"),
            EntryType::Fifo => Some("fifo"),
            _ => None,
        };
        if let Some(what) = header_only
            && size != 0
        {
            return Err(UnpackError::DataOnHeaderOnly {
                entry: name,
                what,
                size,
            });
        }
        self.data_left = size;
        self.padding = padding(size);
        Ok(Entry {
            header,
            kind,
            path,
            link,
            pax,
            size,
        })
    }

    /// Reads one header block: `None` at an all-zero block or where the stream ends.
    fn header(&mut self) -> Result<Option<Header>, UnpackError> {
        let mut header = Header::new_old();
        let bytes = header.as_mut_bytes();
        let mut read = 0;
        while read < bytes.len() {
            match self.inner.read(&mut bytes[read..]) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(corrupt(e)),
            }
        }
        if read == 0 {
            return Ok(None);
        }
        if read < bytes.len() {
            return Err(UnpackError::Corrupt(format!(
                "the stream ends inside a tar header, after {read} of its 512 bytes"
            )));
        }
        if bytes.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let sum = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .fold(8 * u32::from(b' '), |a, b| a + u32::from(*b));
        let stated = header.cksum().map_err(corrupt)?;
        if sum != stated {
            return Err(UnpackError::Corrupt(format!(
                "entry {:?}: header checksum mismatch",
                String::from_utf8_lossy(&header.path_bytes())
            )));
        }
        Ok(Some(header))
    }

    /// Reads a special entry's `size` bytes (at most [`MAX_SPECIAL`]) and its padding.
    fn special(&mut self, size: u64, name: &str) -> Result<Vec<u8>, UnpackError> {
        // A hint only: the caller has checked `size` against MAX_SPECIAL.
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(corrupt)?;
        if data.len() as u64 != size {
            return Err(UnpackError::Corrupt(format!(
                "entry {name:?} ends after {} of its {size} bytes",
                data.len()
            )));
        }
        self.skip(padding(size))?;
        Ok(data)
    }

    fn skip(&mut self, n: u64) -> Result<(), UnpackError> {
        if n == 0 {
            return Ok(());
        }
        let skipped = io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(corrupt)?;
        if skipped != n {
            return Err(UnpackError::Corrupt(format!(
                "the stream ends inside an entry's data, {} bytes short",
                n - skipped
            )));
        }
        Ok(())
    }
}

/// The current entry's data: at most its size, fewer where the stream ends.
pub(crate) struct Data<'a, R> {
    archive: &'a mut Archive<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let a = &mut *self.archive;
        let want = buf
            .len()
            .min(usize::try_from(a.data_left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = a.inner.read(&mut buf[..want])?;
        a.data_left -= n as u64;
        Ok(n)
    }
}

/// A long name's bytes up to its first NUL (GNU tar writes one after the name).
fn c_string(mut data: Vec<u8>) -> Vec<u8> {
    if let Some(end) = data.iter().position(|b| *b == 0) {
        data.truncate(end);
    }
    data
}

/// Parses PAX records (`<len> <key>=<value>\n`, `len` counting the whole record), strictly.
fn parse_pax(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("a record without a length")?;
        let digits = &data[..space];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || digits.len() > 19 {
            return Err(format!(
                "record length {:?} is not a number",
                String::from_utf8_lossy(&digits[..digits.len().min(20)])
            ));
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or("record length is not a number")?;
        if len <= space + 1 || len > data.len() {
            return Err(format!(
                "record length {len} does not fit the {} bytes left",
                data.len()
            ));
        }
        let record = &data[space + 1..len];
        let Some((b'\n', kv)) = record.split_last() else {
            return Err("a record does not end with a newline".into());
        };
        let eq = kv
            .iter()
            .position(|b| *b == b'=')
            .ok_or("a record without `=`")?;
        let key = std::str::from_utf8(&kv[..eq])
            .ok()
            .filter(|k| !k.is_empty())
            .ok_or("a record with an empty or non-UTF-8 key")?;
        out.push((key.to_owned(), kv[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_parse_by_length() {
        let err = parse_pax(b"13 size=10245\n").unwrap_err();
        assert!(err.contains("newline"), "{err}");
        let ok = parse_pax(b"13 size=1024\n17 path=a b=c/e\xff\n").unwrap();
        assert_eq!(ok[0], ("size".into(), b"1024".to_vec()));
        assert_eq!(ok[1], ("path".into(), b"a b=c/e\xff".to_vec()));
        for bad in [
            &b"\n13 size=1024\n"[..],
            b"13 size=1024\n\0\0\0",
            b"99 size=1\n",
            b"5 a=b\n",
            b"x size=1\n",
            b"7 =abc\n",
            b"7 abcd\n",
        ] {
            assert!(
                parse_pax(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_pax(b"").unwrap().is_empty());
    }
}
