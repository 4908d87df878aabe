//! Port forwarding into the VM, host side. switchyardd's CRI streaming server forwards a vm
//! pod's port through a unix socket in the sandbox's state directory ([`SOCKET`], root-only as
//! the directory is; its path is written to each container's bundle as [`FORWARD_FILE`]). Per
//! connection the client writes the port (two bytes, big-endian); the shim asks the agent to
//! connect to that port on the guest's loopback, where the pod's containers listen, and answers
//! one line, `ok` or `error: <why>`; from then on the socket carries the connection's bytes,
//! pumped through the agent as a process's stdio is (WriteConnection, long-poll
//! ReadConnection).
//!
//! When one direction ends, the other gets [`GRACE`] to finish before the guest connection is
//! closed, as containerd's own port forwarding does: a client that went away leaves no
//! connection in the guest. At most [`MAX_CONNECTIONS`](proto::MAX_CONNECTIONS) are served at
//! once; the listener and its connections end with the sandbox.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use yard_agent_protocol as proto;

use super::process::{EmptyReads, READ_CHUNK};
use crate::agent::{Agent, Read, bounded};

/// The socket's name in the sandbox's state directory.
pub const SOCKET: &str = "forward.sock";
/// Each container's bundle names the socket (its absolute path), for switchyardd.
pub const FORWARD_FILE: &str = "vm-forward";
/// How long one direction may go on after the other ended.
pub const GRACE: Duration = Duration::from_secs(1);
/// How long a client may take to send the port.
const HEADER_TIME: Duration = Duration::from_secs(10);
/// The largest piece of client data sent to the guest in one call.
const WRITE_CHUNK: usize = 32 << 10;

/// Binds the socket in `state_dir`, for root only.
pub fn listen(state_dir: &Path) -> io::Result<UnixListener> {
    let path = state_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `listener` until the task is aborted (the sandbox stops), which ends every
/// connection it serves.
pub async fn serve(listener: UnixListener, agent: Agent) {
    let slots = Arc::new(tokio::sync::Semaphore::new(proto::MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next() => continue,
        };
        let sock = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "port forwarding: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let mut sock = sock;
            let msg = format!(
                "error: {} forwarded connections are open already\n",
                proto::MAX_CONNECTIONS
            );
            let _ = sock.write_all(msg.as_bytes()).await;
            continue;
        };
        let agent = agent.clone();
        conns.spawn(async move {
            connection(&agent, sock).await;
            drop(slot);
        });
    }
}

async fn connection(agent: &Agent, mut sock: UnixStream) {
    let mut port = [0u8; 2];
    match tokio::time::timeout(HEADER_TIME, sock.read_exact(&mut port)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let port = u16::from_be_bytes(port);
    let id = match agent.dial_loopback(port).await {
        Ok(id) => id,
        Err(e) => {
            let why = bounded(&e.to_string()).replace('\n', " ");
            let _ = sock.write_all(format!("error: {why}\n").as_bytes()).await;
            return;
        }
    };
    if sock.write_all(b"ok\n").await.is_err() {
        let _ = agent.close_connection(id, false).await;
        return;
    }
    tracing::debug!(port, id, "forwarding a connection into the guest");
    let (mut rd, mut wr) = sock.into_split();
    let up = async {
        let mut buf = vec![0u8; WRITE_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = agent.close_connection(id, true).await;
                    break;
                }
                Ok(n) => {
                    if agent.write_connection(id, buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    };
    let down = async {
        let mut empty = EmptyReads::default();
        loop {
            match agent.read_connection(id, READ_CHUNK).await {
                Ok(read) if !empty.allow(agent, "ReadConnection", &read) => break,
                Ok(Read::Data(data)) => {
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Ok(Read::Empty) => {}
                Ok(Read::Eof) | Err(_) => break,
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut up => { let _ = tokio::time::timeout(GRACE, &mut down).await; }
        () = &mut down => { let _ = tokio::time::timeout(GRACE, &mut up).await; }
    }
    // Closing also ends a read still waiting in the guest.
    let _ = agent.close_connection(id, false).await;
}
