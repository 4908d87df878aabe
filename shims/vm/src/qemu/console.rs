//! The guest's serial console (and QEMU's own stdout/stderr, which share the stream): copied to
//! `console.log` up to a cap, then dropped with one marker line, because a guest can print
//! forever; the last lines stay in memory for error messages and [`Vm::console_tail`].
//!
//! A plain thread copies the stream, not a task: the console must drain even while the shim's
//! runtime is busy, or a chatty guest would stall its vCPU on a full socket.
//!
//! [`Vm::console_tail`]: crate::hypervisor::Vm::console_tail

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// `console.log` stops growing here.
pub const LOG_CAP_BYTES: u64 = 1024 * 1024;
/// Lines kept in memory.
pub const TAIL_LINES: usize = 200;
/// A longer line is cut into pieces of this many bytes (in memory only).
const MAX_LINE_BYTES: usize = 1024;

/// A log file with a size cap plus a ring of the last lines. Pure bookkeeping over any writer,
/// so the cap and the ring are unit-tested without a VM.
pub struct BoundedLog<W: Write> {
    out: Option<W>,
    written: u64,
    cap: u64,
    capped: bool,
    lines: VecDeque<Vec<u8>>,
    max_lines: usize,
    partial: Vec<u8>,
}

impl<W: Write> BoundedLog<W> {
    pub fn new(out: Option<W>, cap: u64, max_lines: usize) -> Self {
        BoundedLog {
            out,
            written: 0,
            cap,
            capped: false,
            lines: VecDeque::new(),
            max_lines: max_lines.max(1),
            partial: Vec::new(),
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.write_log(bytes);
        for &b in bytes {
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ => {
                    self.partial.push(b);
                    if self.partial.len() >= MAX_LINE_BYTES {
                        self.end_line();
                    }
                }
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.partial);
        if self.lines.len() == self.max_lines {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn write_log(&mut self, bytes: &[u8]) {
        if self.capped {
            return;
        }
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let room = self.cap.saturating_sub(self.written);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        let mut result = out.write_all(&bytes[..take]);
        self.written += take as u64;
        if take < bytes.len() {
            self.capped = true;
            let marker = format!(
                "\n[switchyard: console.log reached {} bytes; later output is dropped]\n",
                self.cap
            );
            result = result.and_then(|()| out.write_all(marker.as_bytes()));
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "console log write failed; no more console in the log");
            self.out = None;
        }
    }

    /// Bytes written to the log (the marker line not counted).
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn capped(&self) -> bool {
        self.capped
    }

    /// The last `max_lines` lines (a last unterminated line included), control characters
    /// replaced: the text ends up in error messages and logs.
    pub fn tail(&self, max_lines: usize) -> String {
        let partial = (!self.partial.is_empty()).then_some(&self.partial);
        let all: Vec<&Vec<u8>> = self.lines.iter().chain(partial).collect();
        let start = all.len().saturating_sub(max_lines);
        let mut text = String::new();
        for (i, line) in all[start..].iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.extend(String::from_utf8_lossy(line).chars().map(|c| {
                if c.is_control() && c != '\t' {
                    '\u{fffd}'
                } else {
                    c
                }
            }));
        }
        text
    }
}

/// The console of one VM: a [`BoundedLog`] over `console.log`, fed by a copying thread.
pub struct Console {
    log: Mutex<BoundedLog<File>>,
    closed: watch::Sender<bool>,
}

impl Console {
    /// Create (truncate) `path` and start copying `stream` into it until end of file.
    pub fn start(stream: UnixStream, path: &Path) -> io::Result<Arc<Console>> {
        let file = File::create(path)?;
        let console = Arc::new(Console {
            log: Mutex::new(BoundedLog::new(Some(file), LOG_CAP_BYTES, TAIL_LINES)),
            closed: watch::Sender::new(false),
        });
        let copier = Arc::clone(&console);
        std::thread::Builder::new()
            .name("vm-console".into())
            .spawn(move || copier.copy(stream))?;
        Ok(console)
    }

    fn lock(&self) -> MutexGuard<'_, BoundedLog<File>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn copy(&self, mut stream: UnixStream) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.lock().push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "console read failed");
                    break;
                }
            }
        }
        self.closed.send_replace(true);
    }

    pub fn tail(&self, max_lines: usize) -> String {
        self.lock().tail(max_lines)
    }

    /// Wait (at most `limit`) until the VMM's end of the console is closed and everything it
    /// wrote is in: after the VMM exits, its last words (a guest panic) are then in the tail.
    pub async fn drained(&self, limit: Duration) {
        let mut rx = self.closed.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|closed| *closed)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_stops_at_the_cap_with_one_marker_and_the_tail_goes_on() {
        let mut log = BoundedLog::new(Some(Vec::new()), 32, 3);
        log.push(b"0123456789\n0123456789\n");
        assert!(!log.capped());
        log.push(b"abcdefghij\nklm");
        assert!(log.capped());
        log.push(b"n\nlast line\n");
        let out = String::from_utf8(log.out.take().unwrap()).unwrap();
        assert!(
            out.starts_with("0123456789\n0123456789\nabcdefghij\n"),
            "{out}"
        );
        assert_eq!(
            out.matches("[switchyard: console.log reached 32 bytes")
                .count(),
            1
        );
        assert_eq!(log.written(), 32);
        assert_eq!(log.tail(2), "klmn\nlast line");
        assert_eq!(log.tail(10), "abcdefghij\nklmn\nlast line");
    }

    #[test]
    fn tail_includes_the_unfinished_line_and_hides_control_characters() {
        let mut log: BoundedLog<Vec<u8>> = BoundedLog::new(None, 0, 10);
        log.push(b"one\r\ntwo \x1b[0mred\tx\npartial");
        assert_eq!(log.tail(3), "one\ntwo \u{fffd}[0mred\tx\npartial");
        assert_eq!(log.tail(1), "partial");
        assert_eq!(log.tail(0), "");
    }

    #[test]
    fn endless_line_is_cut_and_memory_stays_bounded() {
        let mut log: BoundedLog<Vec<u8>> = BoundedLog::new(None, 0, 4);
        for _ in 0..10_000 {
            log.push(&[b'x'; 100]);
        }
        assert_eq!(log.lines.len(), 4);
        assert!(log.partial.len() < MAX_LINE_BYTES);
        assert!(log.tail(4).len() <= 4 * MAX_LINE_BYTES + 3);
    }

    #[test]
    fn console_thread_copies_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let console = Console::start(ours, &dir.path().join("console.log")).unwrap();
        let mut theirs = theirs;
        theirs.write_all(b"hello\nworld\n").unwrap();
        drop(theirs);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(console.drained(Duration::from_secs(5)));
        assert_eq!(console.tail(5), "hello\nworld");
        let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
        assert_eq!(log, "hello\nworld\n");
    }
}
