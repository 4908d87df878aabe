//! Noticing that a shim process is gone. Shims are not switchyardd's children (they daemonize,
//! and outlive a daemon restart), so exits are watched through a pidfd; where no pid is known
//! the shim is pinged instead.

use std::time::Duration;

use tokio::sync::watch;

use super::bridge::TaskClient;

/// A flag that turns true once the process is gone.
pub type Gone = watch::Receiver<bool>;

/// Watches `pid`; the watcher stops when every receiver is dropped.
pub fn watch_pid(pid: u32) -> Gone {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            () = exited(pid) => { let _ = tx.send(true); }
            () = tx.closed() => {}
        }
    });
    rx
}

async fn exited(pid: u32) {
    // Failing to open means the process is already gone (ESRCH).
    if let Ok(fd) = crate::sys::pidfd::PidFd::open(pid) {
        fd.exited().await;
    }
}

/// Watches a shim whose pid is unknown by pinging it.
pub fn watch_by_ping(client: TaskClient, id: String) -> Gone {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = tx.closed() => return,
            }
            let req = switchyard_api::containerd::task::v2::ConnectRequest { id: id.clone() };
            if let Err(e) = client.connect(req).await
                && e.is_disconnected()
            {
                let _ = tx.send(true);
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notices_exit_of_a_non_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let mut gone = watch_pid(child.id());
        assert!(!*gone.borrow());
        tokio::time::timeout(Duration::from_secs(5), gone.wait_for(|g| *g))
            .await
            .unwrap()
            .unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn an_unknown_pid_is_gone() {
        let mut gone = watch_pid(u32::MAX / 2);
        tokio::time::timeout(Duration::from_secs(5), gone.wait_for(|g| *g))
            .await
            .unwrap()
            .unwrap();
    }
}
