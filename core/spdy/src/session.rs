//! A SPDY/3.1 session over a byte stream (the upgraded HTTP connection), for both ends of
//! Kubernetes' streaming protocols: streams opened and accepted, their data in order with a
//! FIN, resets, pings answered, and flow control.
//!
//! Two tasks run a session: a reader that parses frames (with [`Config`]'s bounds) and hands
//! each stream's data to its [`RecvHalf`], and a writer that owns the header compression
//! context and writes frames in the order they were queued. A stream whose reader does not
//! keep up stops the session's reader (its queue is bounded), which is how Kubernetes' own
//! implementation (moby/spdystream) applies back-pressure.
//!
//! **Flow control.** That implementation, which every kubelet, API server and kubectl use,
//! neither sends WINDOW_UPDATE nor honours it, and never sends SETTINGS. A sender that waited
//! for its window would stall after 64 KiB against it. So this session always grants window as
//! its reader consumes (harmless to a peer that ignores it), in steps of half a window, and
//! honours the peer's windows
//! from the moment the peer shows that it does flow control by sending SETTINGS, which a
//! SPDY/3.1 endpoint does first. This session sends its SETTINGS first, so two of them keep
//! to the windows both ways.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::frame::{Frame, FrameError, Limits, Parsed, Setting, parse};
use crate::headers::{Compressor, Decompressor, HeaderBlock, HeaderError};

/// SETTINGS id of the initial stream window.
const INITIAL_WINDOW_SIZE: u32 = 7;
/// The window every stream and the session start with (SPDY/3.1 section 2.6.8).
const DEFAULT_WINDOW: u32 = 64 << 10;
/// Window is given back once this much of it was consumed, not per frame. A WINDOW_UPDATE
/// is a write the peer may never read: Kubernetes' servers close the connection right after
/// their last frames, and a close with unread input resets the connection, which can
/// discard those last frames (the exit status) before this side reads them. Small sessions
/// then send nothing after their requests.
const WINDOW_UPDATE_AT: u32 = DEFAULT_WINDOW / 2;
/// RST_STREAM status codes.
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 3;
pub const CANCEL: u32 = 5;
/// GOAWAY status codes.
const GOAWAY_OK: u32 = 0;
const GOAWAY_PROTOCOL_ERROR: u32 = 1;
/// The largest data frame this session writes.
const MAX_DATA: usize = 32 << 10;

/// Which end of the connection this session is: a client opens odd-numbered streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// The bounds a session keeps on what its peer sends.
#[derive(Debug, Clone)]
pub struct Config {
    /// The largest frame accepted.
    pub limits: Limits,
    /// Streams the peer may have open at once; more are refused (`REFUSED_STREAM`).
    pub max_streams: usize,
    /// A decompressed header block's size and pair count.
    pub header_bytes: usize,
    pub header_pairs: u32,
    /// Bytes of data queued for one stream's reader before the session's reader waits (at
    /// least the window this side grants, so a peer that keeps to it never waits).
    pub queued_bytes: usize,
    /// Accepted streams not yet taken by [`Incoming::accept`].
    pub accept_backlog: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits {
                max_frame: 256 << 10,
            },
            max_streams: 32,
            header_bytes: 16 << 10,
            header_pairs: 64,
            queued_bytes: 256 << 10,
            accept_backlog: 16,
        }
    }
}

/// Why a session or a stream ended badly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the SPDY session is closed")]
    Closed,
    #[error("SPDY stream {stream} was reset by the peer (status {status})")]
    Reset { stream: u32, status: u32 },
    #[error("SPDY frame: {0}")]
    Frame(#[from] FrameError),
    #[error("SPDY header block: {0}")]
    Header(#[from] HeaderError),
    #[error("SPDY protocol: {0}")]
    Protocol(String),
    #[error("SPDY connection: {0}")]
    Io(String),
}

/// What the reader hands a stream's [`RecvHalf`].
enum Event {
    /// Data, and the queue budget it holds.
    Data(Vec<u8>, u32),
    Fin,
    Reset(u32),
}

/// What the writer writes, in queue order.
enum Out {
    Syn {
        stream: u32,
        headers: HeaderBlock,
        fin: bool,
    },
    Reply {
        stream: u32,
        headers: HeaderBlock,
    },
    Data {
        stream: u32,
        data: Vec<u8>,
        fin: bool,
    },
    Rst {
        stream: u32,
        status: u32,
    },
    Window {
        stream: u32,
        delta: u32,
    },
    Ping(u32),
    Settings(Vec<Setting>),
    GoAway(u32),
}

/// One open stream as the session sees it.
struct Entry {
    events: mpsc::UnboundedSender<Event>,
    /// Bytes the stream's queue may still take.
    budget: Arc<Semaphore>,
    reply: Option<oneshot::Sender<Result<HeaderBlock, SessionError>>>,
    window: Arc<Semaphore>,
    local_fin: bool,
    remote_fin: bool,
    /// Opened by the peer (counts against `max_streams`).
    remote: bool,
}

struct Shared {
    role: Role,
    config: Config,
    streams: Mutex<HashMap<u32, Entry>>,
    out: mpsc::Sender<Out>,
    next_id: AtomicU32,
    /// The peer does flow control (it sent SETTINGS): sends wait for window.
    peer_flow: AtomicBool,
    /// The peer's initial stream window, from its SETTINGS.
    peer_initial: AtomicU32,
    session_window: Semaphore,
    /// Consumed on all streams and not yet given back to the session's window.
    session_unacked: AtomicU32,
    /// Set once the reader stopped: why, `None` for a clean end.
    ended: watch::Sender<Option<Option<SessionError>>>,
    /// The reader task, for [`Session::abort`].
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Shared {
    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Entry>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Queue a WINDOW_UPDATE of `delta` for `stream` (0: the session).
    async fn give_window(&self, stream: u32, delta: u32) {
        let _ = self.out.send(Out::Window { stream, delta }).await;
    }

    /// Forget a stream once both sides finished or it was reset.
    fn forget_if_done(&self, stream: u32) {
        let mut streams = self.streams();
        if streams
            .get(&stream)
            .is_some_and(|e| e.local_fin && e.remote_fin)
        {
            streams.remove(&stream);
        }
    }

    /// Register a stream: its send window, and the queue its [`RecvHalf`] reads.
    fn entry(self: &Arc<Self>, stream: u32, remote: bool) -> (Arc<Semaphore>, RecvHalf) {
        let window = Arc::new(Semaphore::new(
            self.peer_initial.load(Ordering::Relaxed) as usize
        ));
        let (events, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(self.config.queued_bytes.max(1)));
        let recv = RecvHalf {
            stream,
            rx,
            budget: budget.clone(),
            shared: self.clone(),
            done: false,
            unacked: 0,
        };
        self.streams().insert(
            stream,
            Entry {
                events,
                budget,
                reply: None,
                window: window.clone(),
                local_fin: false,
                remote_fin: false,
                remote,
            },
        );
        (window, recv)
    }
}

/// A handle on a session; clones share it.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

/// The streams the peer opens (a server's side); each is already replied to.
pub struct Incoming {
    rx: mpsc::Receiver<Stream>,
}

impl Incoming {
    /// The next stream the peer opened, or `None` once the session ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }
}

/// One stream: the headers it was opened with, and its two directions.
pub struct Stream {
    pub headers: HeaderBlock,
    pub recv: RecvHalf,
    pub send: SendHalf,
    reply: Option<oneshot::Receiver<Result<HeaderBlock, SessionError>>>,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.send.stream
    }

    /// Wait for the peer's SYN_REPLY to a stream this side opened (at once for an accepted
    /// one): its headers, or the reset that refused it.
    pub async fn replied(&mut self) -> Result<HeaderBlock, SessionError> {
        match self.reply.take() {
            None => Ok(HeaderBlock::new()),
            Some(rx) => rx.await.unwrap_or(Err(SessionError::Closed)),
        }
    }

    pub fn split(self) -> (RecvHalf, SendHalf) {
        (self.recv, self.send)
    }
}

/// The data the peer sends on one stream.
pub struct RecvHalf {
    stream: u32,
    rx: mpsc::UnboundedReceiver<Event>,
    budget: Arc<Semaphore>,
    shared: Arc<Shared>,
    done: bool,
    /// Consumed and not yet given back.
    unacked: u32,
}

impl RecvHalf {
    /// The next data, `Ok(None)` after the peer's FIN, an error if the stream was reset or the
    /// session ended before the FIN.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, SessionError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Event::Data(data, held)) => {
                self.budget.add_permits(held as usize);
                // Give the window back as the data is taken (the stream's and the session's),
                // half a window at a time.
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                self.unacked = self.unacked.saturating_add(n);
                if self.unacked >= WINDOW_UPDATE_AT {
                    let delta = std::mem::take(&mut self.unacked);
                    self.shared.give_window(self.stream, delta).await;
                }
                let session = self.shared.session_unacked.fetch_add(n, Ordering::Relaxed);
                if session.saturating_add(n) >= WINDOW_UPDATE_AT {
                    let delta = self.shared.session_unacked.swap(0, Ordering::Relaxed);
                    if delta > 0 {
                        self.shared.give_window(0, delta).await;
                    }
                }
                Ok(Some(data))
            }
            Some(Event::Fin) => {
                self.done = true;
                Ok(None)
            }
            Some(Event::Reset(status)) => {
                self.done = true;
                Err(SessionError::Reset {
                    stream: self.stream,
                    status,
                })
            }
            None => {
                self.done = true;
                Err(self.shared.ended_error())
            }
        }
    }

    /// Everything up to the FIN, refusing more than `max` bytes.
    pub async fn read_to_end(&mut self, max: usize) -> Result<Vec<u8>, SessionError> {
        let mut all = Vec::new();
        while let Some(data) = self.recv().await? {
            if all.len() + data.len() > max {
                return Err(SessionError::Protocol(format!(
                    "stream {} sent more than {max} bytes",
                    self.stream
                )));
            }
            all.extend(data);
        }
        Ok(all)
    }
}

/// This side's data on one stream. Dropping it without [`SendHalf::finish`] finishes the
/// stream.
pub struct SendHalf {
    stream: u32,
    window: Arc<Semaphore>,
    shared: Arc<Shared>,
    finished: bool,
}

impl SendHalf {
    fn new(stream: u32, window: Arc<Semaphore>, shared: &Arc<Shared>, finished: bool) -> SendHalf {
        SendHalf {
            stream,
            window,
            shared: shared.clone(),
            finished,
        }
    }

    /// Send `data` (in frames of at most 32 KiB, each within the peer's window when the peer
    /// does flow control).
    pub async fn send(&mut self, mut data: &[u8]) -> Result<(), SessionError> {
        if self.finished {
            return Err(SessionError::Protocol(format!(
                "stream {} is already finished",
                self.stream
            )));
        }
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA);
            if self.shared.peer_flow.load(Ordering::Acquire) {
                self.take_window(n).await?;
            }
            self.shared
                .out
                .send(Out::Data {
                    stream: self.stream,
                    data: data[..n].to_vec(),
                    fin: false,
                })
                .await
                .map_err(|_| SessionError::Closed)?;
            data = &data[n..];
        }
        Ok(())
    }

    async fn take_window(&self, n: usize) -> Result<(), SessionError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let mut ended = self.shared.ended.subscribe();
        let wait = async {
            self.window
                .acquire_many(n)
                .await
                .map_err(|_| SessionError::Closed)?
                .forget();
            self.shared
                .session_window
                .acquire_many(n)
                .await
                .map_err(|_| SessionError::Closed)?
                .forget();
            Ok(())
        };
        tokio::select! {
            r = wait => r,
            _ = ended.wait_for(Option::is_some) => Err(self.shared.ended_error()),
        }
    }

    /// Send FIN: this side sends nothing more.
    pub async fn finish(&mut self) -> Result<(), SessionError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.mark_local_fin();
        self.shared
            .out
            .send(Out::Data {
                stream: self.stream,
                data: Vec::new(),
                fin: true,
            })
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Reset the stream (both directions) with `status`.
    pub fn reset(&mut self, status: u32) {
        self.finished = true;
        self.shared.streams().remove(&self.stream);
        let _ = self.shared.out.try_send(Out::Rst {
            stream: self.stream,
            status,
        });
    }

    fn mark_local_fin(&self) {
        if let Some(e) = self.shared.streams().get_mut(&self.stream) {
            e.local_fin = true;
        }
        self.shared.forget_if_done(self.stream);
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        if !self.finished {
            self.mark_local_fin();
            let _ = self.shared.out.try_send(Out::Data {
                stream: self.stream,
                data: Vec::new(),
                fin: true,
            });
        }
    }
}

impl Shared {
    fn ended_error(&self) -> SessionError {
        match &*self.ended.borrow() {
            Some(Some(e)) => e.clone(),
            _ => SessionError::Closed,
        }
    }
}

impl Session {
    /// Run a session over `io` (already upgraded): spawns its reader and writer on the current
    /// tokio runtime. The session sends its SETTINGS first.
    pub fn start<IO>(io: IO, role: Role, config: Config) -> (Session, Incoming)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out, out_rx) = mpsc::channel(64);
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog.max(1));
        let (ended, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            role,
            config,
            streams: Mutex::new(HashMap::new()),
            out,
            next_id: AtomicU32::new(if role == Role::Client { 1 } else { 2 }),
            peer_flow: AtomicBool::new(false),
            peer_initial: AtomicU32::new(DEFAULT_WINDOW),
            session_window: Semaphore::new(DEFAULT_WINDOW as usize),
            session_unacked: AtomicU32::new(0),
            ended,
            reader: Mutex::new(None),
        });
        let _ = shared.out.try_send(Out::Settings(vec![Setting {
            flags: 0,
            id: INITIAL_WINDOW_SIZE,
            value: DEFAULT_WINDOW,
        }]));
        tokio::spawn(write_loop(wr, out_rx));
        let reader = shared.clone();
        let task = tokio::spawn(async move {
            let result = read_loop(&reader, rd, accept_tx).await;
            reader.finish(result.err());
        });
        *shared.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        (Session { shared }, Incoming { rx: accept_rx })
    }

    /// Open a stream with `headers` (FIN at once with `fin`: nothing to send on it). The
    /// stream is usable at once; [`Stream::replied`] waits for the peer's answer.
    pub async fn open(&self, headers: HeaderBlock, fin: bool) -> Result<Stream, SessionError> {
        let shared = &self.shared;
        if shared.is_ended() {
            return Err(shared.ended_error());
        }
        let stream = shared.next_id.fetch_add(2, Ordering::Relaxed);
        if stream > 0x7fff_ffff {
            return Err(SessionError::Protocol("stream ids are used up".into()));
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let (window, recv) = shared.entry(stream, false);
        if let Some(e) = shared.streams().get_mut(&stream) {
            e.reply = Some(reply_tx);
            e.local_fin = fin;
        }
        shared
            .out
            .send(Out::Syn {
                stream,
                headers: headers.clone(),
                fin,
            })
            .await
            .map_err(|_| SessionError::Closed)?;
        Ok(Stream {
            headers,
            recv,
            send: SendHalf::new(stream, window, shared, fin),
            reply: Some(reply_rx),
        })
    }

    /// Send GOAWAY and close the connection once what is queued is written.
    pub async fn close(&self) {
        let _ = self.shared.out.send(Out::GoAway(GOAWAY_OK)).await;
    }

    /// Wait until the peer's side of the connection ended: `Ok` at a clean end of the
    /// connection, the session error otherwise.
    pub async fn ended(&self) -> Result<(), SessionError> {
        let mut rx = self.shared.ended.subscribe();
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().flatten(),
            Err(_) => None,
        };
        result.map_or(Ok(()), Err)
    }

    /// End the session now, whatever the peer does: its reader stops, every stream learns it
    /// and the connection is dropped (for a peer that does not close after GOAWAY).
    pub fn abort(&self) {
        let reader = self
            .shared
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(r) = reader {
            r.abort();
        }
        if !self.shared.is_ended() {
            self.shared
                .finish(Some(SessionError::Io("the session was aborted".into())));
        }
    }

    /// Whether the session ended.
    pub fn is_ended(&self) -> bool {
        self.shared.is_ended()
    }
}

impl Shared {
    /// The reader stopped: every stream learns it, and the writer closes the connection.
    fn finish(&self, error: Option<SessionError>) {
        if let Some(e) = &error {
            let _ = self.out.try_send(Out::GoAway(GOAWAY_PROTOCOL_ERROR));
            tracing::debug!(error = %e, "SPDY session ended");
        }
        self.ended.send_replace(Some(error));
        // Dropping the entries closes every stream's queue: its reader sees the end.
        self.streams().clear();
        self.session_window.close();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    mut rd: R,
    accept: mpsc::Sender<Stream>,
) -> Result<(), SessionError> {
    let limits = shared.config.limits;
    let mut headers = Decompressor::new(shared.config.header_bytes, shared.config.header_pairs);
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut last_remote = 0u32;
    loop {
        match parse(&buf, &limits)? {
            Parsed::Incomplete => {
                if buf.capacity() - buf.len() < 16 << 10 {
                    buf.reserve(64 << 10);
                }
                let n = rd
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| SessionError::Io(e.to_string()))?;
                if n == 0 {
                    if buf.is_empty() {
                        return Ok(());
                    }
                    return Err(SessionError::Io(format!(
                        "connection closed inside a frame ({} bytes of it read)",
                        buf.len()
                    )));
                }
            }
            Parsed::Ignored(n) => {
                buf.drain(..n);
            }
            Parsed::Frame(frame, n) => {
                buf.drain(..n);
                handle(shared, frame, &mut headers, &mut last_remote, &accept).await?;
            }
        }
    }
}

async fn handle(
    shared: &Arc<Shared>,
    frame: Frame,
    decompressor: &mut Decompressor,
    last_remote: &mut u32,
    accept: &mpsc::Sender<Stream>,
) -> Result<(), SessionError> {
    match frame {
        Frame::SynStream {
            stream,
            fin,
            headers,
            ..
        } => {
            // Every header block is decompressed, to keep the shared zlib context in step.
            let headers = decompressor.decompress(&headers)?;
            let peer_parity = if shared.role == Role::Server { 1 } else { 0 };
            if stream % 2 != peer_parity || stream <= *last_remote {
                return Err(SessionError::Protocol(format!(
                    "SYN_STREAM with stream id {stream} (the last was {last_remote})"
                )));
            }
            *last_remote = stream;
            let open = shared.streams().values().filter(|e| e.remote).count();
            if shared.role == Role::Client || open >= shared.config.max_streams {
                queue(
                    shared,
                    Out::Rst {
                        stream,
                        status: REFUSED_STREAM,
                    },
                )
                .await;
                return Ok(());
            }
            let (window, recv) = shared.entry(stream, true);
            let accepted = Stream {
                headers,
                recv,
                send: SendHalf::new(stream, window, shared, false),
                reply: None,
            };
            queue(
                shared,
                Out::Reply {
                    stream,
                    headers: HeaderBlock::new(),
                },
            )
            .await;
            if fin {
                remote_fin(shared, stream);
            }
            if let Err(mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s)) =
                accept.try_send(accepted)
            {
                let mut send = s.send;
                send.reset(REFUSED_STREAM);
            }
        }
        Frame::SynReply {
            stream,
            fin,
            headers,
        } => {
            let headers = decompressor.decompress(&headers)?;
            let reply = shared
                .streams()
                .get_mut(&stream)
                .and_then(|e| e.reply.take());
            if let Some(reply) = reply {
                let _ = reply.send(Ok(headers));
            }
            if fin {
                remote_fin(shared, stream);
            }
        }
        Frame::Headers { headers, .. } => {
            decompressor.decompress(&headers)?;
        }
        Frame::Data { stream, fin, data } => {
            let entry = shared
                .streams()
                .get(&stream)
                .map(|e| (e.events.clone(), e.budget.clone()));
            let Some((events, budget)) = entry else {
                // A stream already reset or finished here: what is in flight is dropped.
                return Ok(());
            };
            if !data.is_empty() {
                // Waits while the stream's reader is behind: back-pressure on the session.
                let most = shared.config.queued_bytes.max(1);
                let n = u32::try_from(data.len().min(most)).unwrap_or(u32::MAX);
                tokio::select! {
                    permit = budget.acquire_many(n) => {
                        if let Ok(p) = permit {
                            p.forget();
                            let _ = events.send(Event::Data(data, n));
                        }
                    }
                    () = events.closed() => {}
                }
            }
            if fin {
                remote_fin(shared, stream);
            }
        }
        Frame::RstStream { stream, status } => {
            let entry = shared.streams().remove(&stream);
            if let Some(mut e) = entry {
                if let Some(reply) = e.reply.take() {
                    let _ = reply.send(Err(SessionError::Reset { stream, status }));
                }
                let _ = e.events.send(Event::Reset(status));
                e.window.close();
            }
        }
        Frame::Settings { entries, .. } => {
            for s in entries {
                if s.id == INITIAL_WINDOW_SIZE {
                    shared.peer_initial.store(s.value, Ordering::Relaxed);
                }
            }
            shared.peer_flow.store(true, Ordering::Release);
        }
        Frame::Ping { id } => {
            // The peer's pings (the other parity) are echoed; this side sends none.
            let ours = if shared.role == Role::Client { 1 } else { 0 };
            if id % 2 != ours {
                queue(shared, Out::Ping(id)).await;
            }
        }
        Frame::GoAway { .. } => {
            tracing::debug!("SPDY peer sent GOAWAY");
        }
        Frame::WindowUpdate { stream, delta } => {
            let delta = delta as usize;
            if stream == 0 {
                if shared.session_window.available_permits() + delta <= Semaphore::MAX_PERMITS {
                    shared.session_window.add_permits(delta);
                }
            } else if let Some(e) = shared.streams().get(&stream)
                && e.window.available_permits() + delta <= Semaphore::MAX_PERMITS
            {
                e.window.add_permits(delta);
            }
        }
    }
    Ok(())
}

async fn queue(shared: &Shared, out: Out) {
    let _ = shared.out.send(out).await;
}

fn remote_fin(shared: &Shared, stream: u32) {
    if let Some(e) = shared.streams().get_mut(&stream) {
        let _ = e.events.send(Event::Fin);
        e.remote_fin = true;
    }
    shared.forget_if_done(stream);
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Out>) {
    let mut compressor = match Compressor::new() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "SPDY header compression");
            return;
        }
    };
    let mut bytes = Vec::with_capacity(64 << 10);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut closing = false;
        // Write what is queued, then flush once.
        while let Some(out) = next {
            closing |= matches!(out, Out::GoAway(_));
            if let Err(e) = encode(out, &mut compressor, &mut bytes) {
                tracing::warn!(error = %e, "SPDY frame not written");
            }
            next = if bytes.len() < 256 << 10 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        bytes.clear();
        if closing {
            let _ = wr.shutdown().await;
            return;
        }
    }
    let _ = wr.shutdown().await;
}

fn encode(out: Out, z: &mut Compressor, bytes: &mut Vec<u8>) -> Result<(), SessionError> {
    let frame = match out {
        Out::Syn {
            stream,
            headers,
            fin,
        } => Frame::SynStream {
            stream,
            associated: 0,
            priority: 0,
            slot: 0,
            fin,
            unidirectional: false,
            headers: z.compress(&headers)?,
        },
        Out::Reply { stream, headers } => Frame::SynReply {
            stream,
            fin: false,
            headers: z.compress(&headers)?,
        },
        Out::Data { stream, data, fin } => Frame::Data { stream, fin, data },
        Out::Rst { stream, status } => Frame::RstStream { stream, status },
        Out::Window { stream, delta } => Frame::WindowUpdate { stream, delta },
        Out::Ping(id) => Frame::Ping { id },
        Out::Settings(entries) => Frame::Settings {
            clear: false,
            entries,
        },
        Out::GoAway(status) => Frame::GoAway {
            last_good: 0,
            status,
        },
    };
    frame.encode(bytes)?;
    Ok(())
}
