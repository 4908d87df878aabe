//! The shim log fifo (`<bundle>/log`): shims write their logs there; switchyardd copies each
//! line into its own log with the task's fields, as containerd copies them to its stderr.
//!
//! A shim writes to the fifo of the bundle it was started in for as long as it lives, which can
//! be longer than that bundle's task (a group's shim serves later tasks and stays warm after
//! its last one): the copy follows the shim, not the task ([`Follower::finish_when`]).

use std::path::Path;

use tokio::io::AsyncReadExt as _;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The longest line copied whole; a longer one is cut (the shim is ours, but its log carries
/// text from guests and images).
const MAX_LINE: usize = 16 * 1024;

/// A running copy of one log fifo. Dropped, it stops at once; [`Follower::finish`] lets it copy
/// what the writers wrote so far first.
pub struct Follower {
    copy: Option<JoinHandle<()>>,
    finish: Option<oneshot::Sender<()>>,
}

impl Follower {
    /// Copies what is in the fifo now, then stops (its writers are gone: all they wrote is
    /// there).
    pub fn finish(self) {
        drop(self.finishing());
    }

    /// Keeps copying until `gone` resolves (the shim exited), then finishes.
    pub fn finish_when(self, gone: impl Future<Output = ()> + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    gone.await;
                    self.finish();
                });
            }
            Err(_) => self.finish(),
        }
    }

    /// Tells the copy to finish; the handle resolves once it has.
    fn finishing(mut self) -> Option<JoinHandle<()>> {
        if let Some(tx) = self.finish.take() {
            let _ = tx.send(());
        }
        self.copy.take()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(copy) = &self.copy
            && self.finish.is_some()
        {
            copy.abort();
        }
    }
}

/// Starts copying the fifo at `path` into switchyardd's log, with the task's fields.
pub fn follow(path: &Path, namespace: &str, id: &str) -> std::io::Result<Follower> {
    let (namespace, id) = (namespace.to_owned(), id.to_owned());
    follow_into(path, move |line| {
        tracing::info!(target: "shim", namespace = %namespace, container_id = %id, "{line}");
    })
}

/// Starts copying the fifo at `path`, each line (at most [`MAX_LINE`] bytes) to `emit`.
fn follow_into(
    path: &Path,
    emit: impl Fn(&str) + Send + Sync + 'static,
) -> std::io::Result<Follower> {
    // Opened read-write so the fifo never reads as EOF between shim writers (a shim that
    // restarts its logger, or none yet): the copy ends when told to.
    let rx = pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    let (finish, mut finished) = oneshot::channel();
    let copy = tokio::spawn(async move {
        let emit_line = |line: &[u8]| {
            let line = String::from_utf8_lossy(line);
            emit(cut(line.trim_end_matches('\r')));
        };
        let mut rx = rx;
        let mut buf = vec![0u8; 64 * 1024];
        let mut lines = Splitter::default();
        loop {
            tokio::select! {
                biased;
                // Cancel-safe: a read that loses the race has read nothing.
                read = rx.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => lines.feed(&buf[..n], &emit_line),
                },
                _ = &mut finished => break,
            }
        }
        // The rest, without waiting: what the pipe has, read with the syscall itself (the
        // reactor may not have seen it yet).
        while let Ok(n) = nix::unistd::read(&rx, &mut buf) {
            if n == 0 {
                break;
            }
            lines.feed(&buf[..n], &emit_line);
        }
        lines.finish(&emit_line);
    });
    Ok(Follower {
        copy: Some(copy),
        finish: Some(finish),
    })
}

/// Splits a byte stream into lines, holding at most [`MAX_LINE`] bytes of one: the rest of a
/// longer line is dropped (the log's text comes partly from guests and images).
#[derive(Default)]
struct Splitter {
    line: Vec<u8>,
    /// Inside a line that was cut: what comes until its end is dropped.
    skipping: bool,
}

impl Splitter {
    fn feed(&mut self, bytes: &[u8], emit: &impl Fn(&[u8])) {
        let mut parts = bytes.split(|b| *b == b'\n').peekable();
        while let Some(part) = parts.next() {
            if !self.skipping {
                let room = MAX_LINE - self.line.len();
                if part.len() > room {
                    self.line.extend_from_slice(&part[..room]);
                    emit(&self.line);
                    self.line.clear();
                    self.skipping = true;
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            // A newline followed this part: the line ends.
            if parts.peek().is_some() {
                self.finish(emit);
            }
        }
    }

    /// The line begun, if any, as a whole line.
    fn finish(&mut self, emit: &impl Fn(&[u8])) {
        if !self.skipping && !self.line.is_empty() {
            emit(&self.line);
        }
        self.line.clear();
        self.skipping = false;
    }
}

/// At most [`MAX_LINE`] bytes of `line`, cut at a character boundary.
fn cut(line: &str) -> &str {
    if line.len() <= MAX_LINE {
        return line;
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn fifo() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        (dir, fifo)
    }

    fn collecting(fifo: &Path) -> (Follower, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        let f = follow_into(fifo, move |l| into.lock().unwrap().push(l.to_owned())).unwrap();
        (f, seen)
    }

    #[tokio::test]
    async fn finish_copies_everything_written_before_it_then_ends() {
        let (_dir, fifo) = fifo();
        let (follower, seen) = collecting(&fifo);
        let long = "x".repeat(MAX_LINE + 10);
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        write!(w, "one\ntwo\n{long}\nlast, without a newline").unwrap();
        // The writer is gone (as a shim that exited) before the copy is told to finish.
        drop(w);
        let copy = follower.finishing().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), copy)
            .await
            .expect("the copy ends once finished")
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.len(),
            4,
            "{:?}",
            seen.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert_eq!(seen[..2], ["one", "two"]);
        assert_eq!(seen[2].len(), MAX_LINE, "a long line is cut");
        assert_eq!(seen[3], "last, without a newline");
    }

    #[test]
    fn lines_across_reads_are_whole_and_a_long_one_is_cut_without_being_held() {
        let seen = std::cell::RefCell::new(Vec::new());
        let emit = |l: &[u8]| {
            seen.borrow_mut()
                .push(String::from_utf8_lossy(l).into_owned())
        };
        let mut s = Splitter::default();
        s.feed(b"par", &emit);
        s.feed(b"ts\n\nx", &emit);
        // A line far longer than MAX_LINE, in pieces: never more than MAX_LINE held.
        for _ in 0..64 {
            s.feed(&[b'x'; 1024], &emit);
            assert!(s.line.len() <= MAX_LINE);
        }
        s.feed(b"x\nafter", &emit);
        s.finish(&emit);
        let seen = seen.into_inner();
        assert_eq!(
            seen.len(),
            3,
            "{:?}",
            seen.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(seen[0], "parts");
        assert_eq!(seen[1].len(), MAX_LINE);
        assert_eq!(seen[2], "after");
    }

    #[tokio::test]
    async fn a_dropped_follower_stops_at_once() {
        let (_dir, fifo) = fifo();
        let (follower, _seen) = collecting(&fifo);
        let copy = follower.copy.as_ref().unwrap().abort_handle();
        drop(follower);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !copy.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the copy still runs");
            tokio::task::yield_now().await;
        }
    }
}
