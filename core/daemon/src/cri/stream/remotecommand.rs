//! Kubernetes' remotecommand protocol (exec and attach), independent of its transport: a
//! transport ([`super::spdy`], [`super::ws`]) turns its streams into [`Channels`], the process
//! side runs with them, and the transport sends the [`status`] at the end.

use std::sync::Arc;

use http::StatusCode;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use serde::Deserialize;
use switchyard_api::cri::v1 as cri;
use tokio::sync::{mpsc, watch};

use super::{Upgrade, plain, upgrade_of};
use crate::cri::Cri;

/// The largest resize message accepted (a JSON object of two numbers).
pub(crate) const MAX_RESIZE: usize = 256;
/// Chunks queued between a transport and the process side, each way.
pub(crate) const QUEUE: usize = 16;

/// What a session runs.
pub enum Target {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
}

/// The streams a session has, from its CRI request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Target {
    pub(crate) fn wanted(&self) -> Wanted {
        match self {
            Target::Exec(r) => Wanted {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
            Target::Attach(r) => Wanted {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
        }
    }
}

/// A terminal size, as the client sends it (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The process side's view of a session.
pub struct Channels {
    /// The client's input; closed at its end (EOF).
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    pub stderr: Option<mpsc::Sender<Vec<u8>>>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
    /// Becomes true when the client went away: the process is then stopped.
    pub gone: watch::Receiver<bool>,
}

/// How a session ended, for its status.
pub enum Outcome {
    Exited(i32),
    Failed(String),
}

/// Answer an exec or attach request: upgrade to the transport it asks for, then run it.
pub fn serve(
    cri: Arc<Cri>,
    target: Target,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    match upgrade_of(&req) {
        Some(Upgrade::Spdy) => super::spdy::remotecommand(cri, target, req),
        Some(Upgrade::WebSocket) => super::ws::remotecommand(cri, target, req),
        None => plain(
            StatusCode::BAD_REQUEST,
            "a streaming request upgrades to SPDY/3.1 or websocket".into(),
        ),
    }
}

/// Run the session's process with `channels`.
pub(crate) async fn run(cri: &Cri, target: &Target, channels: Channels) -> Outcome {
    let result = match target {
        Target::Exec(r) => cri.exec_streaming(r, channels).await,
        Target::Attach(r) => cri.attach(r, channels).await,
    };
    match result {
        Ok(code) => Outcome::Exited(code),
        Err(e) => Outcome::Failed(e.message().to_owned()),
    }
}

/// The final status (a Kubernetes `metav1.Status`), as the error stream carries it in v4.
pub fn status(target: &Target, outcome: &Outcome) -> Vec<u8> {
    let v = match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => {
            let what = match target {
                Target::Exec(r) => format!("error executing command {:?}", r.cmd),
                Target::Attach(_) => "the attached process exited".to_owned(),
            };
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: {what}, exit code {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
        }
        Outcome::Failed(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Terminal sizes from a resize stream's bytes: concatenated JSON objects. Each call takes
/// what `buf` holds whole and leaves a partial object; an object that cannot be a size, or a
/// partial one over [`MAX_RESIZE`] bytes, is an error.
pub(crate) fn take_sizes(buf: &mut Vec<u8>) -> Result<Vec<TermSize>, String> {
    let mut sizes = Vec::new();
    let mut used = 0;
    {
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<TermSize>();
        loop {
            match it.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    used = it.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(format!("resize: {e}")),
                None => {
                    used = it.byte_offset();
                    break;
                }
            }
        }
    }
    buf.drain(..used);
    if buf.len() > MAX_RESIZE {
        return Err(format!("resize: a message of over {MAX_RESIZE} bytes"));
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_come_whole_from_a_byte_stream() {
        let mut buf = br#"{"Width":80,"Height":24}{"Width":1"#.to_vec();
        let sizes = take_sizes(&mut buf).unwrap();
        assert_eq!(
            sizes,
            [TermSize {
                width: 80,
                height: 24
            }]
        );
        buf.extend(br#"00,"Height":50} "#);
        let sizes = take_sizes(&mut buf).unwrap();
        assert_eq!(
            sizes,
            [TermSize {
                width: 100,
                height: 50
            }]
        );
        let mut bad = br#"{"Width":-1,"Height":2}"#.to_vec();
        assert!(take_sizes(&mut bad).unwrap_err().starts_with("resize:"));
        let mut long = vec![b' '; 10];
        long.extend(b"{\"Width\":");
        long.extend(vec![b'1'; 300]);
        assert!(take_sizes(&mut long).is_err());
    }

    #[test]
    fn the_status_carries_the_exit_code_as_kubernetes_reads_it() {
        let t = Target::Exec(cri::ExecRequest {
            cmd: vec!["sh".into()],
            ..Default::default()
        });
        let ok: serde_json::Value =
            serde_json::from_slice(&status(&t, &Outcome::Exited(0))).unwrap();
        assert_eq!(ok["status"], "Success");
        let three: serde_json::Value =
            serde_json::from_slice(&status(&t, &Outcome::Exited(3))).unwrap();
        assert_eq!(three["reason"], "NonZeroExitCode");
        assert_eq!(three["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(three["details"]["causes"][0]["message"], "3");
        let failed: serde_json::Value =
            serde_json::from_slice(&status(&t, &Outcome::Failed("no".into()))).unwrap();
        assert_eq!(failed["message"], "no");
    }
}
