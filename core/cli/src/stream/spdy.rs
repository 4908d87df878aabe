//! remotecommand and portforward over SPDY/3.1, in the order and with the headers
//! Kubernetes' client (client-go's `remotecommand` and `portforward`) uses, so any server
//! that serves kubectl serves this.

use anyhow::Context;
use switchyard_api::cri_stream::{PORTFORWARD, REMOTECOMMAND_V4};
use switchyard_spdy::{
    Config, HeaderBlock, RecvHalf, Role, SendHalf, Session as Spdy, SessionError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::{Target, upgrade_spdy};
use super::{MAX_STATUS, Output, Session, exit_status, size_message};

/// remotecommand versions offered, best first. v4 carries the exit status as JSON; v3 adds
/// the resize stream to v2.
const REMOTECOMMAND: &[&str] = &[REMOTECOMMAND_V4, "v3.channel.k8s.io", "v2.channel.k8s.io"];

/// Opens a stream with `headers` and waits for the server's reply.
async fn open(
    spdy: &Spdy,
    headers: &[(&str, &str)],
    fin: bool,
) -> anyhow::Result<(RecvHalf, SendHalf)> {
    let mut h = HeaderBlock::new();
    for (name, value) in headers {
        h.add(name, value);
    }
    let kind = headers.first().map_or("", |(_, v)| *v);
    let mut stream = spdy
        .open(h, fin)
        .await
        .with_context(|| format!("open the {kind} stream"))?;
    stream
        .replied()
        .await
        .with_context(|| format!("the server refused the {kind} stream"))?;
    Ok(stream.split())
}

/// Runs an exec or attach session at `url`; the remote exit status.
pub async fn remote_command(url: &str, s: Session) -> anyhow::Result<u8> {
    let target = Target::parse(url)?;
    let (tcp, version) = upgrade_spdy(&target, REMOTECOMMAND).await?;
    let (spdy, _incoming) = Spdy::start(tcp, Role::Client, Config::default());
    let result = streams(&spdy, &version, s).await;
    spdy.close().await;
    result
}

async fn streams(spdy: &Spdy, version: &str, s: Session) -> anyhow::Result<u8> {
    // Kubernetes' order: error, stdin, stdout, stderr (no terminal), resize (terminal, v3+).
    let (mut error, _error_send) = open(spdy, &[("streamtype", "error")], false).await?;
    let stdin = if s.stdin {
        Some(open(spdy, &[("streamtype", "stdin")], false).await?.1)
    } else {
        None
    };
    // This side sends nothing on the output streams, but keeps them open as kubectl does
    // (the send halves live until the end: dropping one would send a FIN).
    let (stdout, _stdout_send) = open(spdy, &[("streamtype", "stdout")], false).await?;
    let (stderr, _stderr_send) = if s.tty {
        (None, None)
    } else {
        let (r, w) = open(spdy, &[("streamtype", "stderr")], false).await?;
        (Some(r), Some(w))
    };
    let resize = if s.tty && version != "v2.channel.k8s.io" {
        Some(open(spdy, &[("streamtype", "resize")], false).await?.1)
    } else {
        None
    };

    let stdin_task = stdin.map(|mut send| {
        let mut chunks = super::stdin_chunks();
        tokio::spawn(async move {
            while let Some(data) = chunks.recv().await {
                if send.send(&data).await.is_err() {
                    return;
                }
            }
            let _ = send.finish().await;
        })
    });
    let resize_task = match resize {
        Some(mut send) => {
            let mut sizes = super::terminal_sizes()?;
            Some(tokio::spawn(async move {
                while let Some(size) = sizes.recv().await {
                    if send.send(&size_message(size)).await.is_err() {
                        return;
                    }
                }
            }))
        }
        None => None,
    };

    let out = copy_out(stdout, Output::Stdout);
    let err = async {
        match stderr {
            Some(r) => copy_out(r, Output::Stderr).await,
            None => Ok(()),
        }
    };
    let (out, err) = tokio::join!(out, err);
    let status = read_status(&mut error).await;
    for task in [stdin_task, resize_task].into_iter().flatten() {
        task.abort();
    }
    let status = status.context("read the exit status")?;
    out?;
    err?;
    exit_status(version == REMOTECOMMAND_V4, &status)
}

/// The next data of a stream, `None` at its end. Kubernetes' server ends a session by
/// resetting every stream (`CANCEL`) right after its last data, and its own client reads a
/// reset as the end of the stream: so does this one.
async fn next(recv: &mut RecvHalf) -> anyhow::Result<Option<Vec<u8>>> {
    match recv.recv().await {
        Ok(data) => Ok(data),
        Err(SessionError::Reset { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The error stream's content (the exit status), at most [`MAX_STATUS`] bytes.
async fn read_status(recv: &mut RecvHalf) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    while let Some(data) = next(recv).await? {
        if all.len() + data.len() > MAX_STATUS {
            anyhow::bail!("the exit status is over {MAX_STATUS} bytes");
        }
        all.extend(data);
    }
    Ok(all)
}

/// Copies one output stream to this process's `to` until its end.
async fn copy_out(mut recv: RecvHalf, to: Output) -> anyhow::Result<()> {
    while let Some(data) = next(&mut recv).await.context("remote output")? {
        to.write(&data).context("write the output")?;
    }
    Ok(())
}

/// A port-forward session: one SPDY connection, a pair of streams per forwarded connection.
pub struct PortForward {
    spdy: Spdy,
    next_request: std::sync::atomic::AtomicU32,
}

impl PortForward {
    pub async fn connect(url: &str) -> anyhow::Result<PortForward> {
        let target = Target::parse(url)?;
        let (tcp, _) = upgrade_spdy(&target, &[PORTFORWARD]).await?;
        let (spdy, _incoming) = Spdy::start(tcp, Role::Client, Config::default());
        Ok(PortForward {
            spdy,
            next_request: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Whether the session ended (the server went away): no more connections can be
    /// forwarded through it.
    pub fn is_ended(&self) -> bool {
        self.spdy.is_ended()
    }

    /// Ends the session (GOAWAY, then the connection closed), and with it any connection
    /// still forwarded through it.
    pub async fn close(&self) {
        self.spdy.close().await;
    }

    /// Forwards one accepted connection to `remote` in the pod: an error stream (this side
    /// sends nothing on it) and a data stream, copied both ways until the remote side ends or
    /// the local side fails. A message on the error stream is the error.
    pub async fn forward(&self, mut conn: TcpStream, remote: u16) -> anyhow::Result<()> {
        let id = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let port = remote.to_string();
        let headers = |kind| [("streamtype", kind), ("port", &*port), ("requestid", &*id)];
        let (mut error, mut error_send) = open(&self.spdy, &headers("error"), false).await?;
        let _ = error_send.finish().await;
        let errors = tokio::spawn(async move { read_status(&mut error).await });
        let (mut data_recv, mut data_send) = open(&self.spdy, &headers("data"), false).await?;
        let (mut rd, mut wr) = conn.split();
        let remote_to_local = async {
            while let Ok(Some(data)) = next(&mut data_recv).await {
                if wr.write_all(&data).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        let local_to_remote = async {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if data_send.send(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        data_send.reset(switchyard_spdy::session::CANCEL);
                        return;
                    }
                }
            }
            let _ = data_send.finish().await;
            // Half-closed: what the remote side still sends keeps coming.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = remote_to_local => {}
            () = local_to_remote => {}
        }
        let message = errors
            .await
            .context("the error stream's reader")?
            .context("read the error stream")?;
        if !message.is_empty() {
            anyhow::bail!(
                "forwarding to port {remote}: {}",
                String::from_utf8_lossy(&message).trim()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use switchyard_spdy::session::CANCEL;
    use switchyard_spdy::{Incoming, Stream};
    use tokio::net::TcpListener;

    use super::*;

    /// A loopback listener and its streaming URL.
    async fn upgrade_server() -> (String, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/exec/tok", listener.local_addr().unwrap());
        (url, listener)
    }

    /// Accepts one connection, reads the request head and answers `answer`.
    async fn accept_upgrade(listener: &TcpListener, answer: &str) -> (TcpStream, String) {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        tcp.write_all(answer.as_bytes()).await.unwrap();
        (tcp, String::from_utf8(head).unwrap())
    }

    const V4_UPGRADE: &str = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
        Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n";

    async fn accept_n(incoming: &mut Incoming, n: usize) -> Vec<Stream> {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(incoming.accept().await.unwrap());
        }
        all
    }

    #[tokio::test]
    async fn a_session_opens_kubernetes_streams_in_order_and_reads_the_exit_code_through_resets() {
        let (url, listener) = upgrade_server().await;
        let server = tokio::spawn(async move {
            let (tcp, request) = accept_upgrade(&listener, V4_UPGRADE).await;
            let (_session, mut incoming) = Spdy::start(tcp, Role::Server, Config::default());
            let mut streams = accept_n(&mut incoming, 3).await;
            let kinds: Vec<String> = streams
                .iter()
                .map(|s| s.headers.get("streamtype").unwrap_or_default().to_owned())
                .collect();
            let status = br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#;
            streams[0].send.send(status).await.unwrap();
            // As Kubernetes' server ends a session: every stream reset after its last data.
            for s in &mut streams {
                s.send.reset(CANCEL);
            }
            (request, kinds)
        });
        let session = Session {
            stdin: false,
            tty: false,
        };
        assert_eq!(remote_command(&url, session).await.unwrap(), 7);
        let (request, kinds) = server.await.unwrap();
        assert_eq!(kinds, ["error", "stdout", "stderr"]);
        assert!(
            request.starts_with("POST /exec/tok HTTP/1.1\r\n"),
            "{request}"
        );
        for h in [
            "Connection: Upgrade\r\n",
            "Upgrade: SPDY/3.1\r\n",
            "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n",
            "X-Stream-Protocol-Version: v2.channel.k8s.io\r\n",
        ] {
            assert!(request.contains(h), "{h:?} missing from {request}");
        }
    }

    #[tokio::test]
    async fn a_refused_upgrade_is_an_error_with_the_servers_words() {
        let answer = "HTTP/1.1 404 Not Found\r\nContent-Length: 16\r\n\r\ntoken not found\n";
        let (url, listener) = upgrade_server().await;
        let server = tokio::spawn(async move { accept_upgrade(&listener, answer).await });
        let session = Session {
            stdin: false,
            tty: true,
        };
        let e = format!("{:#}", remote_command(&url, session).await.unwrap_err());
        assert!(e.contains("404 Not Found: token not found"), "{e}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_protocol_not_offered_is_refused() {
        let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\
            X-Stream-Protocol-Version: channel.k8s.io\r\n\r\n";
        let (url, listener) = upgrade_server().await;
        let server = tokio::spawn(async move { accept_upgrade(&listener, answer).await });
        let e = PortForward::connect(&url).await.err().unwrap().to_string();
        assert!(e.contains("chose protocol \"channel.k8s.io\""), "{e}");
        server.await.unwrap();
    }
}
