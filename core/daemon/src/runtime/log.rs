//! The shim log fifo (`<bundle>/log`): shims write their logs there; switchyardd copies each
//! line into its own log with the task's fields, as containerd copies them to its stderr.

use std::path::Path;

use tokio::io::AsyncBufReadExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// Starts copying the fifo at `path`; abort the handle to stop.
pub fn follow(path: &Path, namespace: &str, id: &str) -> std::io::Result<JoinHandle<()>> {
    // Opened read-write so the fifo never reads as EOF between shim writers (a shim that
    // restarts its logger, or none yet); the task ends when aborted.
    let rx = pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    let (namespace, id) = (namespace.to_owned(), id.to_owned());
    Ok(tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(rx).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "shim", namespace = %namespace, container_id = %id, "{line}");
        }
    }))
}
