//! OOM kills of a container, each published once as `/tasks/oom` and before the exit it
//! caused: cgroup v1's `memory.oom_control` eventfd, or cgroup v2's `memory.events` watched
//! with inotify, and a last look when the init exits.
//!
//! The notification and the init's exit are two separate wake-ups; a reactor turn that has
//! both may run the exit first, and a client that reads the task's state between the two
//! events sees a plain SIGKILL (CRI's `Error` instead of `OOMKilled`). So the init's exit
//! settles first ([`OomWatch::settle`]), under the same lock as the watcher, and publishes a
//! kill the watcher has not published yet: the event is queued before `/tasks/exit`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::inotify;
use tokio::io::unix::AsyncFd;
use yard_shim_kit::{Error, Publisher};

/// Under cgroup v1 the eventfd fires on every OOM condition, many times while a task keeps
/// allocating on its way to being killed: one event per episode, which ends after this long
/// without a notification (under load one can last seconds: counting from its start would
/// split it).
const EPISODE_GAP: Duration = Duration::from_secs(1);

pub struct OomWatch {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    id: String,
    publisher: Publisher,
    /// The cgroup's memory directory.
    dir: PathBuf,
    /// v1: the `memory.oom_control` file is held open for the registration's life.
    v1_control: Option<std::fs::File>,
    /// The eventfd (v1) or the inotify instance (v2).
    source: AsyncFd<OwnedFd>,
    state: Mutex<State>,
}

struct State {
    /// The cgroup's `oom_kill` count as far as events were published for it.
    published: u64,
    /// v1: the last notification.
    last_notify: Option<Instant>,
}

impl OomWatch {
    /// Start watching the memory cgroup in `dir` (v2 when `unified`).
    pub fn start(
        dir: PathBuf,
        unified: bool,
        id: String,
        publisher: Publisher,
    ) -> Result<OomWatch, Error> {
        let (source, v1_control) = if unified {
            (watch_v2(&dir)?, None)
        } else {
            let (efd, control) = watch_v1(&dir)?;
            (efd, Some(control))
        };
        let source = yard_shim_kit::sys::readable(source).map_err(Error::io("watch OOM fd"))?;
        let published = kills(&dir, unified).unwrap_or(0);
        let shared = Arc::new(Shared {
            id,
            publisher,
            dir,
            v1_control,
            source,
            state: Mutex::new(State {
                published,
                last_notify: None,
            }),
        });
        let watcher = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(mut guard) = watcher.source.readable().await else {
                    return;
                };
                // Cleared before settle drains the fd: a notification after the drain wakes
                // this loop again.
                guard.clear_ready();
                drop(guard);
                if !watcher.settle() {
                    return;
                }
            }
        });
        Ok(OomWatch { shared, task })
    }

    /// Publish every kill not published yet, now. The init's exit calls this before it is
    /// recorded. False once the cgroup is gone.
    pub fn settle(&self) -> bool {
        self.shared.settle()
    }

    /// Stop watching (the container is being deleted).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for OomWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn settle(&self) -> bool {
        let v1 = self.v1_control.is_some();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let notified = drain(self.source.get_ref());
        // v1's eventfd also fires when the cgroup is removed; v2's memory.events goes with it.
        let Some(count) = kills(&self.dir, !v1).or_else(|| {
            // A v1 kernel older than 4.13 has no count: notifications alone.
            (v1 && self.dir.exists()).then_some(st.published)
        }) else {
            return false;
        };
        // v1 notifies before the kill it announces is counted.
        let episode = v1 && notified && st.last_notify.is_none_or(|t| t.elapsed() >= EPISODE_GAP);
        if notified {
            st.last_notify = Some(Instant::now());
        }
        let publish = if count > st.published {
            st.published = count;
            true
        } else if episode {
            // The kill this notification announces is this event's: counted, it is not
            // published again.
            st.published = count.saturating_add(1);
            true
        } else {
            false
        };
        if publish {
            tracing::info!(id = self.id, kills = count, "OOM in container");
            // Under the lock: whoever settles later (the init's exit) queues behind it.
            self.publisher.oom(&self.id);
        }
        true
    }
}

/// Reads what is pending on a non-blocking eventfd or inotify fd; whether there was any.
fn drain(fd: &OwnedFd) -> bool {
    let mut any = false;
    let mut buf = [0u8; 1024];
    while let Ok(n) = rustix::io::read(fd.as_fd(), &mut buf) {
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

/// The cgroup's count of OOM kills: `oom_kill` in v2's `memory.events` or v1's
/// `memory.oom_control`.
fn kills(dir: &Path, unified: bool) -> Option<u64> {
    let file = if unified {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

fn watch_v1(dir: &Path) -> Result<(OwnedFd, std::fs::File), Error> {
    use std::io::Write as _;
    let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
        .map_err(|e| Error::io("eventfd")(e.into()))?;
    let control = std::fs::File::open(dir.join("memory.oom_control")).map_err(Error::io(
        format!("open {}/memory.oom_control", dir.display()),
    ))?;
    let line = format!("{} {}", efd.as_raw_fd(), control.as_raw_fd());
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.event_control"))
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(Error::io(format!(
            "register OOM eventfd in {}",
            dir.display()
        )))?;
    Ok((efd, control))
}

fn watch_v2(dir: &Path) -> Result<OwnedFd, Error> {
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .map_err(|e| Error::io("inotify")(e.into()))?;
    inotify::add_watch(
        &fd,
        dir.join("memory.events"),
        inotify::WatchFlags::MODIFY | inotify::WatchFlags::DELETE_SELF,
    )
    .map_err(|e| Error::io(format!("watch {}/memory.events", dir.display()))(e.into()))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use yard_shim_kit::events::Event;

    use super::*;

    fn skip(reason: &str) {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_ALL").is_none_or(|v| v != "1"),
            "{reason}"
        );
        eprintln!("skipped: {reason}");
    }

    /// A memory cgroup of its own (directly under the hierarchy's root), removed on drop.
    struct TestCgroup(PathBuf);

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            // The pipeline the OOM kill broke may still be exiting (or not killed yet): the
            // kit's removal kills what is left and waits until the cgroup can go.
            if let Some(name) = self.0.file_name() {
                yard_shim_kit::cgroup::remove(&Path::new("/").join(name), "oom-test");
            }
        }
    }

    /// The race this module exists for: the process is killed and reaped before the watcher
    /// ran (the runtime is blocked in `wait`); the exit's settle publishes the kill, once, and
    /// the watcher, when it runs, does not publish it again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_kill_is_published_once_by_whoever_settles_first() {
        if !rustix::process::geteuid().is_root() {
            return skip("needs root (a memory cgroup of its own)");
        }
        let unified = super::super::cgroups::unified();
        let root = if unified {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/memory")
        };
        if unified
            && !std::fs::read_to_string(root.join("cgroup.subtree_control"))
                .unwrap_or_default()
                .contains("memory")
        {
            return skip("the cgroup v2 root does not delegate the memory controller");
        }
        let cg = TestCgroup(root.join(format!("yard-oom-test-{}", std::process::id())));
        std::fs::create_dir(&cg.0).unwrap_or_else(|e| panic!("{}: {e}", cg.0.display()));
        let limits: &[&str] = if unified {
            &["memory.max", "memory.swap.max"]
        } else {
            &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        };
        for (i, file) in limits.iter().enumerate() {
            let value = if unified && i == 1 { "0" } else { "16777216" };
            let path = cg.0.join(file);
            // Swap accounting may be off: then there is no swap limit to set.
            if path.exists() {
                std::fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
        let (publisher, mut rx) = yard_shim_kit::events::channel();
        let watch = OomWatch::start(cg.0.clone(), unified, "c1".into(), publisher)
            .unwrap_or_else(|e| panic!("{e}"));
        let procs = cg.0.join("cgroup.procs");
        let status = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec /bin/sh -c 'x=$(head -c 100000000 /dev/zero | tr \"\\0\" a)'",
                procs.display()
            ))
            .status()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        assert!(
            kills(&cg.0, unified).unwrap_or(0) > 0,
            "no OOM kill: {status:?}"
        );
        assert_eq!(status.signal(), Some(9), "{status:?}");
        assert!(rx.try_recv().is_err(), "the watcher ran during the wait");

        assert!(watch.settle());
        assert!(
            matches!(rx.try_recv(), Ok(Event::Oom(e)) if e.container_id == "c1"),
            "settle published no OOM"
        );
        // The watcher's turn: its notification was taken by the settle.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        assert!(watch.settle());
        assert!(rx.try_recv().is_err(), "a second OOM event for one kill");
        let dir = cg.0.clone();
        drop(cg);
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}
