//! Sessions against each other and against a raw peer that behaves as Kubernetes' Go
//! implementation does (no SETTINGS, no WINDOW_UPDATE), over in-memory pipes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchyard_spdy::session::{CANCEL, REFUSED_STREAM};
use switchyard_spdy::{
    Compressor, Config, Decompressor, Frame, HeaderBlock, Limits, Parsed, Role, Session,
    SessionError, parse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn pair(config: Config) -> (Session, Session, switchyard_spdy::Incoming) {
    let (a, b) = tokio::io::duplex(64 << 10);
    let (client, _) = Session::start(a, Role::Client, Config::default());
    let (server, incoming) = Session::start(b, Role::Server, config);
    (client, server, incoming)
}

fn headers(kind: &str) -> HeaderBlock {
    let mut h = HeaderBlock::new();
    h.add("streamType", kind);
    h
}

#[tokio::test]
async fn a_stream_carries_data_both_ways_and_ends_with_fin() {
    let (client, _server, mut incoming) = pair(Config::default());
    let mut opened = client.open(headers("stdin"), false).await.unwrap();
    let mut accepted = incoming.accept().await.unwrap();
    assert_eq!(accepted.headers.get("streamtype"), Some("stdin"));
    assert!(opened.replied().await.unwrap().is_empty());

    opened.send.send(b"ping").await.unwrap();
    opened.send.finish().await.unwrap();
    assert_eq!(accepted.recv.read_to_end(1 << 20).await.unwrap(), b"ping");
    accepted.send.send(b"pong").await.unwrap();
    accepted.send.finish().await.unwrap();
    assert_eq!(opened.recv.read_to_end(1 << 20).await.unwrap(), b"pong");
}

#[tokio::test]
async fn a_sender_keeps_to_the_window_of_a_peer_that_does_flow_control() {
    let (client, _server, mut incoming) = pair(Config::default());
    let opened = client.open(headers("stdout"), true).await.unwrap();
    let accepted = incoming.accept().await.unwrap();
    let (mut recv, _) = opened.split();
    let (_, mut send) = accepted.split();
    let big = vec![7u8; 128 << 10];
    let sender = tokio::spawn(async move {
        send.send(&big).await.unwrap();
        send.finish().await.unwrap();
    });
    // Nothing is read yet: the sender cannot get past the 64 KiB window.
    let stalled = tokio::time::timeout(Duration::from_millis(300), async {
        while !sender.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(stalled.is_err(), "128 KiB went into a 64 KiB window");
    // Reading gives the window back, and the rest comes.
    let all = recv.read_to_end(2 << 20).await.unwrap();
    assert_eq!(all.len(), 128 << 10);
    sender.await.unwrap();
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_and_a_reset_reaches_the_other_side() {
    let config = Config {
        max_streams: 2,
        ..Config::default()
    };
    let (client, _server, mut incoming) = pair(config);
    let mut first = client.open(headers("a"), false).await.unwrap();
    let mut second = client.open(headers("b"), false).await.unwrap();
    let mut third = client.open(headers("c"), false).await.unwrap();
    first.replied().await.unwrap();
    second.replied().await.unwrap();
    assert_eq!(
        third.replied().await.unwrap_err(),
        SessionError::Reset {
            stream: third.id(),
            status: REFUSED_STREAM
        }
    );
    let mut a = incoming.accept().await.unwrap();
    a.send.reset(CANCEL);
    assert_eq!(
        first.recv.recv().await.unwrap_err(),
        SessionError::Reset {
            stream: first.id(),
            status: CANCEL
        }
    );
}

#[tokio::test]
async fn garbage_ends_the_session_with_an_error_and_its_streams_learn_it() {
    let (raw, b) = tokio::io::duplex(64 << 10);
    let (server, _incoming) = Session::start(b, Role::Server, Config::default());
    let mut raw = raw;
    // A control frame of version 2.
    raw.write_all(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 0])
        .await
        .unwrap();
    let err = server.ended().await.unwrap_err();
    assert!(err.to_string().contains("version 2"), "{err}");
    assert!(server.open(headers("x"), false).await.is_err());
}

#[tokio::test]
async fn an_oversized_frame_is_refused_from_its_header() {
    let (mut raw, b) = tokio::io::duplex(64 << 10);
    let config = Config {
        limits: Limits { max_frame: 1024 },
        ..Config::default()
    };
    let (server, _incoming) = Session::start(b, Role::Server, config);
    // A data frame claiming 16 MiB - 1.
    raw.write_all(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let err = server.ended().await.unwrap_err();
    assert!(err.to_string().contains("over the limit"), "{err}");
}

/// A peer that writes and reads raw frames, as moby/spdystream does: no SETTINGS, no
/// WINDOW_UPDATE.
struct Raw {
    io: DuplexStream,
    z: Compressor,
    unz: Decompressor,
    buf: Vec<u8>,
}

impl Raw {
    fn new(io: DuplexStream) -> Raw {
        Raw {
            io,
            z: Compressor::new().unwrap(),
            unz: Decompressor::new(1 << 16, 64),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    async fn syn(&mut self, stream: u32, kind: &str) {
        let headers = self.z.compress(&headers(kind)).unwrap();
        self.send(Frame::SynStream {
            stream,
            associated: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers,
        })
        .await;
    }

    async fn next(&mut self) -> Frame {
        loop {
            match parse(&self.buf, &Limits::default()).unwrap() {
                Parsed::Frame(f, n) => {
                    self.buf.drain(..n);
                    if let Frame::SynReply { headers, .. } | Frame::SynStream { headers, .. } = &f {
                        self.unz.decompress(headers).unwrap();
                    }
                    return f;
                }
                Parsed::Ignored(n) => {
                    self.buf.drain(..n);
                }
                Parsed::Incomplete => {
                    let n = self.io.read_buf(&mut self.buf).await.unwrap();
                    assert!(n > 0, "the session closed the connection");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_peer_without_flow_control_gets_everything_and_its_pings_answered() {
    let (io, b) = tokio::io::duplex(64 << 10);
    let (_server, mut incoming) = Session::start(b, Role::Server, Config::default());
    let mut raw = Raw::new(io);
    raw.syn(1, "stdout").await;
    raw.send(Frame::Ping { id: 1 }).await;
    let accepted = incoming.accept().await.unwrap();
    let (_, mut send) = accepted.split();
    let sender = tokio::spawn(async move {
        send.send(&vec![1u8; 1 << 20]).await.unwrap();
        send.finish().await.unwrap();
    });
    let (mut got, mut replied, mut pong) = (0usize, false, false);
    loop {
        match raw.next().await {
            Frame::Settings { .. } | Frame::WindowUpdate { .. } => {}
            Frame::SynReply { stream: 1, .. } => replied = true,
            Frame::Ping { id: 1 } => pong = true,
            Frame::Data {
                stream: 1,
                fin,
                data,
            } => {
                got += data.len();
                if fin {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(replied && pong);
    assert_eq!(got, 1 << 20);
    sender.await.unwrap();
}

#[tokio::test]
async fn a_client_refuses_streams_the_server_opens_and_ids_must_grow() {
    let (io, b) = tokio::io::duplex(64 << 10);
    let (server, _incoming) = Session::start(b, Role::Server, Config::default());
    let mut raw = Raw::new(io);
    raw.syn(3, "a").await;
    raw.syn(1, "b").await;
    let err = server.ended().await.unwrap_err();
    assert!(err.to_string().contains("stream id 1"), "{err}");

    let (a, io) = tokio::io::duplex(64 << 10);
    let (_client, _) = Session::start(a, Role::Client, Config::default());
    let mut raw = Raw::new(io);
    raw.syn(2, "pushed").await;
    loop {
        match raw.next().await {
            Frame::RstStream { stream, status } => {
                assert_eq!((stream, status), (2, REFUSED_STREAM));
                break;
            }
            Frame::Settings { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_fin_arrives_after_the_receiving_side_finished_its_own_half() {
    let (client, _server, mut incoming) = pair(Config::default());
    let opened = client.open(headers("stdin"), false).await.unwrap();
    let accepted = incoming.accept().await.unwrap();
    let (_, mut client_send) = opened.split();
    let (mut server_recv, mut server_send) = accepted.split();
    server_send.finish().await.unwrap();
    client_send.send(b"one\ntwo\n").await.unwrap();
    client_send.finish().await.unwrap();
    let all = tokio::time::timeout(Duration::from_secs(10), server_recv.read_to_end(1 << 20))
        .await
        .expect("the FIN never came");
    assert_eq!(all.unwrap(), b"one\ntwo\n");
}

#[tokio::test]
async fn abort_ends_a_session_whose_peer_never_closes() {
    let (_raw, b) = tokio::io::duplex(64 << 10);
    let (server, _incoming) = Session::start(b, Role::Server, Config::default());
    server.close().await;
    // The raw peer keeps the connection open and says nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), server.ended())
            .await
            .is_err()
    );
    server.abort();
    let ended = tokio::time::timeout(Duration::from_secs(10), server.ended())
        .await
        .expect("abort ended the session");
    assert!(ended.unwrap_err().to_string().contains("aborted"));
}

/// A client that reads a server's small output writes nothing after its own frames: a
/// Kubernetes server closes the connection right after its last frames, and input it never
/// read would reset the connection (which can discard those frames before they are read).
/// Window comes back once half a window was read, for the stream and for the session.
#[tokio::test]
async fn window_is_given_back_by_half_windows_not_per_frame() {
    let (a, io) = tokio::io::duplex(256 << 10);
    let (client, _) = Session::start(a, Role::Client, Config::default());
    let mut raw = Raw::new(io);
    let opened = client.open(headers("stdout"), false).await.unwrap();
    let (mut recv, mut send) = opened.split();
    let data = |fin, data: Vec<u8>| Frame::Data {
        stream: 1,
        fin,
        data,
    };
    // Frames until this side's FIN on stream `fin_on`, and the window updates among them.
    async fn updates_until_fin(raw: &mut Raw, fin_on: u32) -> Vec<(u32, u32)> {
        let mut updates = Vec::new();
        loop {
            match raw.next().await {
                Frame::WindowUpdate { stream, delta } => updates.push((stream, delta)),
                Frame::Data {
                    stream, fin: true, ..
                } if stream == fin_on => {
                    updates.sort_unstable();
                    return updates;
                }
                Frame::Settings { .. } | Frame::SynStream { .. } | Frame::Data { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    // Small output: read, then this side's FIN; no update before it.
    for chunk in [&b"got hello\n"[..], b"stdin closed\n"] {
        raw.send(data(false, chunk.to_vec())).await;
        assert_eq!(recv.recv().await.unwrap().as_deref(), Some(chunk));
    }
    let (_recv2, mut send2) = client.open(headers("stdin"), false).await.unwrap().split();
    send.finish().await.unwrap();
    assert_eq!(updates_until_fin(&mut raw, 1).await, vec![]);

    // 40 KiB more on stream 1 (23 bytes read before): one update each once over half a
    // window, for all that was read.
    raw.send(data(false, vec![7u8; 20 << 10])).await;
    raw.send(data(true, vec![7u8; 20 << 10])).await;
    let got = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(got.len(), 40 << 10);
    // Stream 3 ends this side's half; its FIN follows the updates in the queue.
    send2.finish().await.unwrap();
    let read = 23 + (40 << 10);
    assert_eq!(
        updates_until_fin(&mut raw, 3).await,
        vec![(0, read), (1, read)]
    );
}
