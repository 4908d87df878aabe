//! A minimal QMP client: enough for `quit` and `query-status`.
//!
//! QMP stays in capabilities-negotiation mode until the first command, and QEMU emits no events
//! in that mode, so negotiating lazily keeps unread events from piling up in a monitor nobody
//! reads. Events that arrive once negotiated are skipped.

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    #[error("QMP error {class}: {desc}")]
    Command { class: String, desc: String },
}

pub struct Qmp {
    stream: BufReader<UnixStream>,
    negotiated: bool,
}

impl Qmp {
    pub fn new(stream: UnixStream) -> Qmp {
        Qmp {
            stream: BufReader::new(stream),
            negotiated: false,
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim_end().to_owned()))
    }

    async fn negotiate(&mut self) -> Result<(), QmpError> {
        if self.negotiated {
            return Ok(());
        }
        let greeting = self.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        self.negotiated = true;
        self.call("qmp_capabilities").await.map(drop)
    }

    async fn call(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command }).to_string();
        request.push('\n');
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        loop {
            let mut reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(reply.to_string()));
        }
    }

    /// Run `command` (without arguments) and return its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        self.negotiate().await?;
        self.call(command).await
    }

    /// `quit`: QEMU exits at once. It may close the socket before answering, which is success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit").await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted QMP server: the greeting, then canned replies per line received.
    async fn fake_qemu(stream: UnixStream, replies: Vec<&'static str>) {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        for reply in replies {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_once_skips_events_and_reports_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = tokio::spawn(fake_qemu(
            b,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"RTC_CHANGE\"}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n",
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\n",
            ],
        ));
        let mut qmp = Qmp::new(a);
        let status = qmp.execute("query-status").await.unwrap();
        assert_eq!(status["status"], "running");
        let err = qmp.execute("bogus").await.unwrap_err();
        assert_eq!(err.to_string(), "QMP error CommandNotFound: nope");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn quit_accepts_a_closed_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = tokio::spawn(fake_qemu(b, vec!["{\"return\": {}}\n"]));
        let mut qmp = Qmp::new(a);
        qmp.quit().await.unwrap();
        server.await.unwrap();
    }
}
