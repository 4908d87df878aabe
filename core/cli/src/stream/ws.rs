//! remotecommand and port-forward over WebSocket, as Kubernetes' streaming server
//! (`wsstream`) serves them: every binary message starts with a channel byte.
//!
//! remotecommand: 0 stdin, 1 stdout, 2 stderr, 3 the exit status (JSON `metav1.Status`),
//! 4 terminal size. `v5.channel.k8s.io` adds channel 255, whose message `[255, n]` closes
//! channel `n`: how stdin reaches EOF. With `v4` stdin cannot be closed, so a command that
//! reads to EOF never sees it there (containerd 1.6 and 1.7 offer only v4).
//!
//! port-forward: the ports are query parameters (`?port=80`), one connection per port and
//! WebSocket; port `i` has data channel `2i` and error channel `2i+1`, and the server's first
//! two bytes on each channel are the port, little endian.

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::http::{Conn, Target};
use super::{MAX_STATUS, Output, Session, exit_status, size_message};

use switchyard_api::cri_stream::channel::{CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};
use switchyard_api::cri_stream::{REMOTECOMMAND_V4 as V4, REMOTECOMMAND_V5 as V5};

/// Connects to `target` and opens a WebSocket offering `protocols` (best first); the socket
/// and the protocol the server chose.
async fn connect(
    target: &Target,
    protocols: &[&str],
) -> anyhow::Result<(WebSocketStream<Conn>, String)> {
    let tcp = target.connect().await?;
    let scheme = if target.tls { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{}{}", target.authority, target.path)
        .into_client_request()
        .context("the WebSocket request")?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&protocols.join(", ")).context("the WebSocket protocols")?,
    );
    let (ws, response) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio_tungstenite::client_async(request, tcp),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no WebSocket upgrade within 30s"))?
    .with_context(|| format!("the WebSocket upgrade at {}", target.authority))?;
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !protocols.contains(&chosen.as_str()) {
        anyhow::bail!("the streaming server chose protocol {chosen:?}, not one of {protocols:?}");
    }
    Ok((ws, chosen))
}

fn on(channel: u8, data: &[u8]) -> Message {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    Message::binary(m)
}

/// Runs an exec or attach session at `url`; the remote exit status.
pub async fn remote_command(url: &str, s: Session) -> anyhow::Result<u8> {
    let target = Target::parse(url)?;
    let (ws, version) = connect(&target, &[V5, V4]).await?;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(8);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut tasks = vec![writer];
    if s.stdin {
        let tx = tx.clone();
        let v5 = version == V5;
        let mut chunks = super::stdin_chunks();
        tasks.push(tokio::spawn(async move {
            while let Some(data) = chunks.recv().await {
                if tx.send(on(STDIN, &data)).await.is_err() {
                    return;
                }
            }
            if v5 {
                let _ = tx.send(on(CLOSE, &[STDIN])).await;
            }
        }));
    }
    if s.tty {
        let tx = tx.clone();
        let mut sizes = super::terminal_sizes()?;
        tasks.push(tokio::spawn(async move {
            while let Some(size) = sizes.recv().await {
                if tx.send(on(RESIZE, &size_message(size))).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut status = Vec::new();
    let ended = loop {
        let data = match source.next().await {
            None | Some(Ok(Message::Close(_))) => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(_)) => continue,
        };
        match data.split_first() {
            Some((&STDOUT, rest)) if !rest.is_empty() => {
                Output::Stdout.write(rest).context("write the output")?;
            }
            Some((&STDERR, rest)) if !rest.is_empty() => {
                Output::Stderr.write(rest).context("write the output")?;
            }
            Some((&ERROR, rest)) => {
                if status.len() + rest.len() > MAX_STATUS {
                    anyhow::bail!("the exit status is over {MAX_STATUS} bytes");
                }
                status.extend_from_slice(rest);
            }
            _ => {}
        }
    };
    for t in &tasks {
        t.abort();
    }
    // A server that drops the connection after the status has said all it had to.
    if let Err(e) = ended
        && status.is_empty()
    {
        return Err(e).context("the WebSocket session");
    }
    exit_status(true, &status)
}

/// Forwards one accepted connection to `remote` through a new WebSocket at `url` (a
/// PortForward URL serves one connection per port).
pub async fn forward(url: &str, conn: TcpStream, remote: u16) -> anyhow::Result<()> {
    let target = Target::parse(url)?.with_query(&format!("port={remote}"));
    let (ws, _) = connect(&target, &[V4]).await?;
    let (mut sink, mut source) = ws.split();
    let (mut rd, mut wr) = conn.into_split();
    let local_to_remote = async move {
        let mut buf = vec![0u8; 32 << 10];
        // With no way to half-close a channel, the local EOF is kept to this side: the
        // remote end closes the WebSocket when its connection ends.
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 || sink.send(on(0, &buf[..n])).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let remote_to_local = async move {
        // The two-byte port prefix each channel starts with, still to skip.
        let mut prefix = [2usize; 2];
        let mut error = Vec::new();
        while let Some(Ok(msg)) = source.next().await {
            let Message::Binary(data) = msg else {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
                continue;
            };
            let Some((&channel, rest)) = data.split_first() else {
                continue;
            };
            let Some(skip) = prefix.get_mut(usize::from(channel)) else {
                continue;
            };
            let n = (*skip).min(rest.len());
            *skip -= n;
            let rest = &rest[n..];
            if channel == 0 {
                if wr.write_all(rest).await.is_err() {
                    break;
                }
            } else if error.len() < MAX_STATUS {
                error.extend_from_slice(rest);
            }
        }
        let _ = wr.shutdown().await;
        error
    };
    let error = tokio::select! {
        error = remote_to_local => error,
        () = local_to_remote => Vec::new(),
    };
    if !error.is_empty() {
        anyhow::bail!(
            "forwarding to port {remote}: {}",
            String::from_utf8_lossy(&error).trim()
        );
    }
    Ok(())
}
