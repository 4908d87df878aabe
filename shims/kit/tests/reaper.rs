//! The reaper with real child processes. Its own test binary: the reaper runs `waitpid(-1)`,
//! which would collect the children of any other test in the same process.

use std::time::{Duration, Instant};

use rustix::process::{Signal, pidfd_send_signal};
use yard_shim_kit::reaper::{self, Mark, Reaper};

const DEADLINE: Duration = Duration::from_secs(10);

/// Wait until the reaper has collected something since `mark`.
async fn reaped_since(reaper: &Reaper, mark: Mark) {
    let deadline = Instant::now() + DEADLINE;
    while reaper.mark() <= mark {
        assert!(Instant::now() < deadline, "nothing reaped in {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn(script: &str) -> u32 {
    let child = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    // The reaper, not the std handle, collects it.
    let pid = child.id();
    drop(child);
    pid
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("not within {DEADLINE:?}"))
}

#[tokio::test]
async fn exits_signals_late_askers_and_pidfds() {
    let reaper = reaper::start().unwrap_or_else(|e| panic!("start the reaper: {e}"));

    // An exit code and a deadly signal, each asked for after the child was reaped.
    let mark = reaper.mark();
    let ok = spawn("exit 7");
    reaped_since(reaper, mark).await;
    assert_eq!(within(reaper.wait(ok, mark)).await.status, 7);
    let mark = reaper.mark();
    let killed = spawn("kill -9 $$");
    reaped_since(reaper, mark).await;
    assert_eq!(within(reaper.wait(killed, mark)).await.status, 137);

    // Signalled by pidfd while alive; once reaped, no pidfd is handed out for its pid.
    let mark = reaper.mark();
    let sleeper = spawn("exec sleep 100");
    let fd = reaper
        .pidfd(sleeper, mark)
        .unwrap_or_else(|| panic!("no pidfd for a live child"));
    pidfd_send_signal(&fd, Signal::TERM).unwrap_or_else(|e| panic!("pidfd_send_signal: {e}"));
    assert_eq!(within(reaper.wait(sleeper, mark)).await.status, 128 + 15);
    assert!(
        reaper.pidfd(sleeper, mark).is_none(),
        "pidfd for a reaped pid"
    );
    // The old pidfd names the reaped process, never whoever gets its pid next.
    assert_eq!(
        pidfd_send_signal(&fd, Signal::TERM),
        Err(rustix::io::Errno::SRCH)
    );

    // An exit kept from before a mark is not handed to a later process with the same pid: a
    // waiter with a later mark gets the next exit of that pid, not the kept one.
    let later = reaper.mark();
    let wait = reaper.wait(ok, later);
    tokio::pin!(wait);
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut wait)
            .await
            .is_err(),
        "an old exit was handed to a waiter that started later"
    );
}
