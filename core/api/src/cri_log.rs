//! The CRI container log format that kubelet reads and containerd's CRI writes (and
//! switchyardd's does, with [`Splitter`]): one line per chunk,
//! `<RFC 3339 time> <stdout|stderr> <P|F> <text>`, where `P` marks a partial line continued by
//! the next chunk of the same stream and `F` ends a line.

/// One whole line of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The time of the line's last chunk, as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

/// Longest chunk of a line in one record, as containerd splits them: a longer line becomes
/// `P` records of this size and a last `F` one.
pub const MAX_CHUNK: usize = 16 << 10;

/// One output stream of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Turns one stream's bytes into CRI log records: whole lines as `F`, lines longer than
/// [`MAX_CHUNK`] cut into `P` records, a line the stream ends without a newline written as
/// `F` at [`Splitter::finish`]. Holds at most [`MAX_CHUNK`] bytes between calls.
pub struct Splitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl Splitter {
    pub fn new(stream: Stream) -> Self {
        Splitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Adds `bytes` read from the stream; writes the records they complete to `out`, each
    /// stamped with the time now.
    pub fn push(&mut self, bytes: &[u8], out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = MAX_CHUNK - self.pending.len();
            let window = &rest[..rest.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&window[..i]);
                    self.emit(b'F', out)?;
                    rest = &rest[i + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    rest = &rest[window.len()..];
                    if self.pending.len() == MAX_CHUNK {
                        self.emit(b'P', out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The stream ended: a line it left unfinished is written as a whole one.
    pub fn finish(&mut self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.emit(b'F', out)
    }

    fn emit(&mut self, tag: u8, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let mut record = Vec::with_capacity(self.pending.len() + 48);
        record.extend_from_slice(time.as_bytes());
        record.push(b' ');
        record.extend_from_slice(self.stream.as_str().as_bytes());
        record.push(b' ');
        record.push(tag);
        record.push(b' ');
        record.append(&mut self.pending);
        record.push(b'\n');
        // One write per record, so records of two streams sharing a file never interleave.
        out.write_all(&record)
    }
}

/// Most of one record (physical line) of a log file that is looked at; the rest of a longer
/// record is skipped. containerd and switchyardd split lines at 16 KiB.
pub const MAX_RECORD: usize = 64 << 10;
/// Most of one whole line that partial chunks are joined into; a longer line is handed out in
/// pieces of at most this size, as if it had ended there (the rest of the chunk that crosses
/// the limit is dropped).
pub const MAX_LINE: usize = 1 << 20;

/// The whole lines of a CRI log, partial chunks joined per stream. Lines not in the format are
/// skipped; a partial line the log ends in is left out (it has not ended yet).
pub fn parse(text: &str) -> Vec<LogLine> {
    Reader::new(text.as_bytes())
        .collect::<std::io::Result<_>>()
        .unwrap_or_default()
}

/// Reads the whole lines of a CRI log from `inner` one at a time, with the memory of one line
/// (at most [`MAX_RECORD`] per record and [`MAX_LINE`] per joined line), whatever the log's
/// size. Text that is not UTF-8 is replaced, not refused: a container's output is bytes.
pub struct Reader<R> {
    inner: R,
    /// The partial line of each stream seen so far.
    pending: Vec<(String, String)>,
    record: Vec<u8>,
}

impl<R: std::io::BufRead> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            pending: Vec::new(),
            record: Vec::new(),
        }
    }

    /// The next record, without its newline; `None` at the end.
    fn next_record(&mut self) -> std::io::Result<Option<()>> {
        use std::io::{BufRead as _, Read as _};
        self.record.clear();
        let n = (&mut self.inner)
            .take(MAX_RECORD as u64)
            .read_until(b'\n', &mut self.record)?;
        if n == 0 {
            return Ok(None);
        }
        if self.record.last() == Some(&b'\n') {
            self.record.pop();
        } else if n == MAX_RECORD {
            // Skip the rest of an overlong record.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let m = (&mut self.inner)
                    .take(MAX_RECORD as u64)
                    .read_until(b'\n', &mut rest)?;
                if m == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
            }
        }
        Ok(Some(()))
    }

    /// Adds one record; a line when it completes one.
    fn take_record(&mut self) -> Option<LogLine> {
        let record = String::from_utf8_lossy(&self.record);
        let mut parts = record.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !matches!(tag, "P" | "F") {
            return None;
        }
        let chunk = parts.next().unwrap_or("");
        let i = match self.pending.iter().position(|(s, _)| s == stream) {
            Some(i) => i,
            None => {
                self.pending.push((stream.to_owned(), String::new()));
                self.pending.len() - 1
            }
        };
        let text = &mut self.pending[i].1;
        let room = MAX_LINE.saturating_sub(text.len());
        let mut cut = chunk.len().min(room);
        while !chunk.is_char_boundary(cut) {
            cut -= 1;
        }
        text.push_str(&chunk[..cut]);
        if tag == "F" || text.len() >= MAX_LINE || cut < chunk.len() {
            let (stream, text) = self.pending.swap_remove(i);
            return Some(LogLine {
                time: time.to_owned(),
                stream,
                text,
            });
        }
        None
    }
}

impl<R: std::io::BufRead> Iterator for Reader<R> {
    type Item = std::io::Result<LogLine>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_record() {
                Err(e) => return Some(Err(e)),
                Ok(None) => return None,
                Ok(Some(())) => {
                    if let Some(line) = self.take_record() {
                        return Some(Ok(line));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_partial_chunks_per_stream_and_skips_what_is_not_a_log_line() {
        let log = "\
2026-12-04T10:00:00.1Z stdout P hel
2026-12-04T10:00:00.2Z stderr F oops
2026-12-04T10:00:00.3Z stdout F lo
not a log line
2026-12-04T10:00:00.4Z stdout X weird
2026-12-04T10:00:00.5Z stdout F 
2026-12-04T10:00:00.6Z stdout P unfinished";
        let got = parse(log);
        let lines: Vec<(&str, &str)> = got
            .iter()
            .map(|l| (l.stream.as_str(), l.text.as_str()))
            .collect();
        assert_eq!(
            lines,
            [("stderr", "oops"), ("stdout", "hello"), ("stdout", "")]
        );
        assert_eq!(got[1].time, "2026-12-04T10:00:00.3Z");
    }

    #[test]
    fn reads_bytes_that_are_not_utf8_and_bounds_long_lines() {
        let mut log = b"2026-12-04T10:00:00.1Z stdout F a\xffb\n".to_vec();
        let chunk = "x".repeat(16 << 10);
        for _ in 0..(MAX_LINE / chunk.len() + 2) {
            log.extend_from_slice(format!("2026-12-04T10:00:00.2Z stderr P {chunk}\n").as_bytes());
        }
        log.extend_from_slice(b"2026-12-04T10:00:00.3Z stderr F end\n");
        let mut huge = b"2026-12-04T10:00:00.4Z stdout F ".to_vec();
        huge.resize(huge.len() + 3 * MAX_RECORD, b'y');
        huge.push(b'\n');
        log.extend_from_slice(&huge);
        log.extend_from_slice(b"2026-12-04T10:00:00.5Z stdout F after\n");
        let got: Vec<LogLine> = Reader::new(&log[..]).map(Result::unwrap).collect();
        assert_eq!(got[0].text, "a\u{fffd}b");
        assert_eq!(got[1].stream, "stderr");
        assert_eq!(
            got[1].text.len(),
            MAX_LINE,
            "a long line is cut at MAX_LINE"
        );
        assert_eq!(
            got[2].text,
            "x".repeat(2 * chunk.len() - (MAX_LINE % chunk.len())) + "end"
        );
        assert!(got[3].text.len() < MAX_RECORD, "an overlong record is cut");
        assert_eq!(
            got[4].text, "after",
            "the rest of an overlong record is skipped"
        );
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn splitter_writes_what_reader_reads_back() {
        let mut out = Vec::new();
        let mut o = Splitter::new(Stream::Stdout);
        let mut e = Splitter::new(Stream::Stderr);
        o.push(b"hel", &mut out).unwrap();
        e.push(b"oops\n", &mut out).unwrap();
        o.push(b"lo\n\nnext", &mut out).unwrap();
        let long = vec![b'z'; MAX_CHUNK * 2 + 5];
        e.push(&long, &mut out).unwrap();
        e.push(b"\n", &mut out).unwrap();
        o.finish(&mut out).unwrap();
        e.finish(&mut out).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        let tags: Vec<(&str, &str)> = text
            .lines()
            .map(|l| {
                let mut p = l.splitn(4, ' ');
                let _time = p.next();
                (p.next().unwrap(), p.next().unwrap())
            })
            .collect();
        assert_eq!(
            tags,
            [
                ("stderr", "F"),
                ("stdout", "F"),
                ("stdout", "F"),
                ("stderr", "P"),
                ("stderr", "P"),
                ("stderr", "F"),
                ("stdout", "F"),
            ]
        );
        let time = text.split(' ').next().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == "2026-12-04T10:00:00.123456789Z".len(),
            "{time}"
        );
        let lines: Vec<(String, String)> = Reader::new(&out[..])
            .map(|l| l.map(|l| (l.stream, l.text)))
            .collect::<std::io::Result<_>>()
            .unwrap();
        let z = String::from_utf8(long).unwrap();
        assert_eq!(
            lines,
            [
                ("stderr".to_owned(), "oops".to_owned()),
                ("stdout".to_owned(), "hello".to_owned()),
                ("stdout".to_owned(), String::new()),
                ("stderr".to_owned(), z),
                ("stdout".to_owned(), "next".to_owned()),
            ]
        );
    }
}
