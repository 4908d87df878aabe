//! A byte stream that refuses oversized ttrpc frames from the guest before ttrpc allocates for
//! them.
//!
//! ttrpc (0.10) reads a frame's 10-byte header (length: u32 big-endian, stream id: u32, type,
//! flags) and then allocates the whole announced length (up to its 4 MiB limit) for the body;
//! its limit is a constant. So the host hands ttrpc this wrapper instead of the raw stream: it
//! follows the frame boundaries in the bytes that pass and fails the read that completes a
//! header announcing more than the cap, recording why in the agent's [`Health`]. ttrpc then
//! drops the connection and every pending call fails, which the sandbox turns into a teardown.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Health;

const HEADER_LEN: usize = 10;

/// Where the reader is in the frame sequence.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; HEADER_LEN],
    /// Header bytes seen of the current frame.
    have: usize,
    /// Body bytes still to pass before the next header.
    body_left: u64,
}

impl Framing {
    /// Follows `bytes`; the length of the first header over `max`, if any.
    fn scan(&mut self, mut bytes: &[u8], max: u32) -> Result<(), u32> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = usize::try_from(self.body_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                bytes = &bytes[skip..];
                self.body_left -= skip as u64;
                continue;
            }
            let take = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == HEADER_LEN {
                self.have = 0;
                let [a, b, c, d, ..] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]);
                if len > max {
                    return Err(len);
                }
                self.body_left = u64::from(len);
            }
        }
        Ok(())
    }
}

/// `inner` with frames from the guest capped at `max` bytes; writes pass through.
pub struct FrameLimit<S> {
    inner: S,
    max: u32,
    framing: Framing,
    health: Health,
    failed: bool,
}

impl<S> FrameLimit<S> {
    pub fn new(inner: S, max: u32, health: Health) -> Self {
        FrameLimit {
            inner,
            max,
            framing: Framing::default(),
            health,
            failed: false,
        }
    }
}

fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the guest agent sent an oversized frame",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.failed {
            return Poll::Ready(Err(refused()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
        if let Err(len) = me.framing.scan(&buf.filled()[before..], me.max) {
            me.failed = true;
            me.health
                .violated(format!("a frame of {len} bytes (at most {} taken)", me.max));
            return Poll::Ready(Err(refused()));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameLimit<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32) -> Vec<u8> {
        let mut h = len.to_be_bytes().to_vec();
        h.extend_from_slice(&[0, 0, 0, 1, 2, 0]);
        h
    }

    #[test]
    fn follows_frames_split_anywhere() {
        let mut stream = Vec::new();
        for len in [0u32, 5, 100, 16] {
            stream.extend(header(len));
            stream.extend(std::iter::repeat_n(7u8, len as usize));
        }
        stream.extend(header(17));
        for chunk in [1, 3, 10, 11, 64, stream.len()] {
            let mut f = Framing::default();
            let r = stream
                .chunks(chunk)
                .try_for_each(|c| f.scan(c, 16).map_err(|l| (chunk, l)));
            // Only the 100-byte frame is over the cap.
            assert_eq!(r, Err((chunk, 100)), "chunk {chunk}");
        }
        let mut f = Framing::default();
        let ok: Vec<u8> = [header(16), vec![1; 16], header(0), header(3), vec![9; 3]].concat();
        for b in ok.chunks(1) {
            assert_eq!(f.scan(b, 16), Ok(()));
        }
        assert_eq!((f.have, f.body_left), (0, 0));
    }
}
