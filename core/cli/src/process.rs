//! What `yard run` and `yard exec` share: ids, flag checks, and running a created process to
//! its end with stdio, signals and terminal size following the task.

use std::time::Duration;

use anyhow::{Context, bail};
use switchyard_api::containerd::services::tasks::v1 as tasks;

use crate::client::{Client, rpc};
use crate::io;

pub fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

pub fn check_env(env: &[String]) -> anyhow::Result<()> {
    for e in env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => bail!("--env {e:?}: expected KEY=VALUE"),
        }
    }
    Ok(())
}

/// Exit code of a process as a shell would report it (0..=255).
pub fn exit_code(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(255)
}

/// Forwards the signals a shell sends to the task, as `ctr run` does.
fn forward_signals(client: &Client, id: &str, exec_id: &str) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (client, id, exec_id) = (client.clone(), id.to_owned(), exec_id.to_owned());
    tokio::spawn(async move {
        let kinds = [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::quit(),
            SignalKind::user_defined1(),
            SignalKind::user_defined2(),
        ];
        let mut streams: Vec<_> = kinds
            .iter()
            .filter_map(|k| signal(*k).ok().map(|s| (k.as_raw_value(), s)))
            .collect();
        loop {
            let next = futures::future::select_all(
                streams
                    .iter_mut()
                    .map(|(n, s)| Box::pin(async move { s.recv().await.map(|_| *n) })),
            )
            .await
            .0;
            let Some(sig) = next else { return };
            let _ = client
                .tasks()
                .kill(tasks::KillRequest {
                    container_id: id.clone(),
                    exec_id: exec_id.clone(),
                    signal: u32::try_from(sig).unwrap_or(15),
                    all: false,
                })
                .await;
        }
    })
}

/// Keeps the task's pty the size of our terminal.
fn follow_resizes(client: &Client, id: &str, exec_id: &str) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (client, id, exec_id) = (client.clone(), id.to_owned(), exec_id.to_owned());
    tokio::spawn(async move {
        let mut winch = signal(SignalKind::window_change()).ok();
        loop {
            if let Some((width, height)) = io::terminal_size() {
                let _ = client
                    .tasks()
                    .resize_pty(tasks::ResizePtyRequest {
                        container_id: id.clone(),
                        exec_id: exec_id.clone(),
                        width,
                        height,
                    })
                    .await;
            }
            match winch.as_mut() {
                Some(w) => {
                    if w.recv().await.is_none() {
                        return;
                    }
                }
                None => return,
            }
        }
    })
}

/// Whether [`attach_and_run`] sends Start, or the daemon started the process with its Create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Send,
    /// switchyardd answered a Create sent with `switchyard-start` (containerd's answer has no
    /// such header, and the client sends Start then). Wait still returns the exit of a process
    /// that has already ended: the task stays until it is deleted.
    Done,
}

/// Runs a created process to its end: wait, start (unless it is started), copy IO, return the
/// exit status.
pub async fn attach_and_run(
    client: &Client,
    id: &str,
    exec_id: &str,
    fifos: &mut io::Fifos,
    mut closed_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    tty: bool,
    start: Start,
) -> anyhow::Result<u32> {
    let waiter = {
        let mut t = client.tasks();
        let req = tasks::WaitRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        tokio::spawn(async move { t.wait(req).await })
    };
    let _raw = (tty && io::stdin_is_terminal()).then(io::RawTerminal::enable);
    if start == Start::Send {
        client
            .tasks()
            .start(tasks::StartRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })
            .await
            .map_err(rpc(&format!("start {id}")))?;
    }
    let helper = if tty {
        follow_resizes(client, id, exec_id)
    } else {
        forward_signals(client, id, exec_id)
    };
    let closer = {
        let (client, id, exec_id) = (client.clone(), id.to_owned(), exec_id.to_owned());
        tokio::spawn(async move {
            if closed_rx.recv().await.is_some() {
                let _ = client
                    .tasks()
                    .close_io(tasks::CloseIoRequest {
                        container_id: id,
                        exec_id,
                        stdin: true,
                    })
                    .await;
            }
        })
    };
    let status = waiter
        .await
        .context("wait for the task")?
        .map_err(rpc(&format!("wait {id}")))?
        .into_inner()
        .exit_status;
    helper.abort();
    closer.abort();
    fifos.drain(Duration::from_secs(2));
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_must_be_key_value() {
        assert!(check_env(&["A=1".into(), "B=".into()]).is_ok());
        assert!(check_env(&["A".into()]).is_err());
        assert!(check_env(&["=1".into()]).is_err());
    }

    #[test]
    fn exit_codes_saturate() {
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(137), 137);
        assert_eq!(exit_code(1000), 255);
    }
}
