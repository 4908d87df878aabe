//! The client side of Kubernetes' CRI streaming: what `kubectl exec -it`, `attach` and
//! `port-forward` speak to the URL a runtime's Exec, Attach and PortForward return.
//!
//! Two transports, one shape: [`http`] upgrades an HTTP/1.1 connection to SPDY/3.1 and
//! [`spdy`] runs the remotecommand (`v4.channel.k8s.io`, with `v3`/`v2` accepted) and
//! `portforward.k8s.io` protocols on `switchyard-spdy` sessions; [`ws`] runs the same over
//! WebSocket (`v5.channel.k8s.io`, falling back to `v4`, and the WebSocket port-forward
//! protocol). The local side (stdin, stdout, stderr, terminal size, raw mode) is here, shared.

pub mod http;
pub mod spdy;
pub mod ws;

use std::io::{Read, Write};
use std::net::SocketAddr;

use anyhow::Context;
use tokio::sync::mpsc;

/// Which transport carries a streaming session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// SPDY/3.1 over an upgraded HTTP/1.1 connection (what kubelet and kubectl before 1.30 use).
    Spdy,
    /// WebSocket (`v5.channel.k8s.io`, or `v4` where the server has no v5).
    Websocket,
}

/// What a remotecommand session (exec or attach) carries.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    /// Send this process's stdin (copied until EOF, then the remote stdin is closed).
    pub stdin: bool,
    /// The remote side has a terminal: one output stream, and the terminal size is sent.
    pub tty: bool,
}

/// Bytes of the error stream (a JSON `metav1.Status`) accepted.
const MAX_STATUS: usize = 64 << 10;

/// The exit status a remotecommand error stream carries: empty or `Success` is 0, a
/// `NonZeroExitCode` failure its `ExitCode` cause (255 where a shell cannot carry it), and any
/// other failure an error with the server's message. Before v4 the stream is plain text.
pub fn exit_status(json: bool, status: &[u8]) -> anyhow::Result<u8> {
    let text = String::from_utf8_lossy(status);
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    if !json {
        anyhow::bail!("{text}");
    }
    let v: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("the exit status is not JSON: {text:?}"))?;
    if v["status"] == "Success" {
        return Ok(0);
    }
    if v["reason"] == "NonZeroExitCode" {
        let code = v["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.trim().parse::<i64>().ok());
        if let Some(code) = code {
            return Ok(u8::try_from(code).unwrap_or(u8::MAX));
        }
    }
    let message = v["message"].as_str().unwrap_or(text);
    anyhow::bail!("{message}")
}

/// The local terminal's size as the resize stream carries it.
pub fn size_message((width, height): (u32, u32)) -> Vec<u8> {
    format!("{{\"Width\":{width},\"Height\":{height}}}").into_bytes()
}

/// This process's stdin in chunks, `None` at EOF. A plain thread reads it: a blocking read
/// cannot be cancelled, and tokio's stdin would hold the runtime's shutdown until it returns.
pub fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 << 10];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// The local terminal's size now and at every SIGWINCH, for the resize stream. Ends when the
/// receiver goes.
pub fn terminal_sizes() -> anyhow::Result<mpsc::Receiver<(u32, u32)>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut winch = signal(SignalKind::window_change()).context("watch SIGWINCH")?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            if let Some(size) = crate::io::terminal_size()
                && tx.send(size).await.is_err()
            {
                return;
            }
            tokio::select! {
                got = winch.recv() => if got.is_none() { return },
                () = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}

/// Resolves when this process is asked to stop (SIGTERM or SIGHUP): a session in raw mode
/// ends then, so the terminal is restored.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

/// Where remote output goes.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    Stdout,
    Stderr,
}

impl Output {
    pub fn write(self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(data)?;
                o.flush()
            }
            Output::Stderr => {
                let mut e = std::io::stderr().lock();
                e.write_all(data)?;
                e.flush()
            }
        }
    }
}

/// One `LOCAL:REMOTE` port pair of `yard cri port-forward` (`PORT` alone: the same on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPair {
    pub local: u16,
    pub remote: u16,
}

impl std::str::FromStr for PortPair {
    type Err = String;

    fn from_str(s: &str) -> Result<PortPair, String> {
        let port = |p: &str| -> Result<u16, String> {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        };
        match s.split_once(':') {
            Some((l, r)) => Ok(PortPair {
                local: port(l)?,
                remote: port(r)?,
            }),
            None => {
                let p = port(s)?;
                Ok(PortPair {
                    local: p,
                    remote: p,
                })
            }
        }
    }
}

/// The loopback listener of one forwarded port.
pub async fn listen(pair: PortPair) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], pair.local));
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_come_from_the_error_stream() {
        assert_eq!(exit_status(true, b"").unwrap(), 0);
        assert_eq!(
            exit_status(true, br#"{"metadata":{},"status":"Success"}"#).unwrap(),
            0
        );
        let failed = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_status(true, failed).unwrap(), 3);
        let big = br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"300"}]}}"#;
        assert_eq!(exit_status(true, big).unwrap(), 255);
        let other = br#"{"status":"Failure","message":"container not found"}"#;
        assert_eq!(
            exit_status(true, other).unwrap_err().to_string(),
            "container not found"
        );
        assert_eq!(
            exit_status(false, b"exec failed\n")
                .unwrap_err()
                .to_string(),
            "exec failed"
        );
        assert!(exit_status(true, b"{not json").is_err());
    }

    #[test]
    fn port_pairs_parse_and_bad_ones_are_named() {
        assert_eq!(
            "8080:80".parse::<PortPair>(),
            Ok(PortPair {
                local: 8080,
                remote: 80
            })
        );
        assert_eq!(
            "53".parse::<PortPair>(),
            Ok(PortPair {
                local: 53,
                remote: 53
            })
        );
        assert!("0:80".parse::<PortPair>().unwrap_err().contains("\"0\""));
        assert!("80:x".parse::<PortPair>().unwrap_err().contains("\"x\""));
        assert!("70000".parse::<PortPair>().is_err());
    }

    #[test]
    fn the_resize_message_is_kubernetes_json() {
        assert_eq!(size_message((91, 37)), br#"{"Width":91,"Height":37}"#);
    }
}
