//! The worker: the process that runs a shim's guests, confined (`sandbox.rs`) before it reads
//! its first request. The shim starts it as `containerd-shim-yard-wasm-v1 worker -namespace NS
//! -id ID` with the channel at fd 3 and a pipe for its log on stderr; it serves requests
//! (`ipc.rs`) until the channel closes, then exits. It holds nothing the parent needs to clean
//! up: its mount namespace, the tasks' detached roots and its memory go with it.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use yard_shim_kit::{Error, Result};

use crate::config::Options;
use crate::ipc::{self, Answer, Failure, FromWorker, Request, ToWorker};
use crate::runtime::Runtime;
use crate::task::{Control, Guest, Notify, TaskParts, WasmProcess};

/// The first frame the parent sends: what to build the engine from.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    pub options: Options,
    /// Threads for guests.
    pub threads: usize,
    /// Whether guests may make sockets (the worker is in a pod's network namespace and the
    /// options allow sockets or outgoing HTTP): the seccomp filter lets `socket` through for
    /// IPv4 and IPv6 streams and datagrams only then.
    pub network: bool,
}

/// The worker's argument asking it to run in a user namespace of its own, which the parent maps.
pub const USERNS_FLAG: &str = "-userns";
/// The worker's argument saying the parent placed a pod's network namespace at
/// [`crate::sys::NETNS_FD`] for it to run in.
pub const NETNS_FLAG: &str = "-netns";
/// The frame a worker asked for [`USERNS_FLAG`] sends once it is in its new user namespace.
pub const USERNS_READY: &[u8] = b"userns";

/// Exit statuses of a worker that could not start (the parent logs them).
pub const EXIT_SANDBOX: i32 = 3;
pub const EXIT_CHANNEL: i32 = 4;
pub const EXIT_ENGINE: i32 = 5;

/// `worker` mode. Never returns.
pub fn main(args: &[String]) -> ! {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .with_writer(std::io::stderr)
        .try_init();
    // The empty root is mounted over the working directory its spawner chose: never `/`.
    let scratch = match std::env::current_dir() {
        Ok(d) if d.as_os_str() != "/" => d,
        Ok(_) => exit(
            EXIT_SANDBOX,
            "wasm worker sandbox: the working directory is /: the empty root is mounted over it",
        ),
        Err(e) => exit(
            EXIT_SANDBOX,
            &format!("wasm worker sandbox: the working directory: {e}"),
        ),
    };
    if args.iter().any(|a| a == "--self-test") {
        self_test(&scratch);
    }
    // An idle task holds a descriptor here (four with stdio): a soft limit of 1,024 would stop a
    // group's worker at about a thousand idle tasks. The worker runs no program that could
    // inherit the higher limit (it cannot `execve`).
    if let Err(e) = switchyard_base::limits::raise_nofile_limit() {
        tracing::warn!(error = %e, "wasm worker: cannot raise RLIMIT_NOFILE");
    }
    let chan = match crate::sys::channel() {
        Ok(c) => c,
        Err(e) => exit(
            EXIT_CHANNEL,
            &format!("wasm worker: no channel from the shim: {e}"),
        ),
    };
    // The pod's network first, while the worker is host root (joining a namespace the host's
    // user namespace owns needs that); the confinement then applies inside it.
    if args.iter().any(|a| a == NETNS_FLAG)
        && let Err(e) = crate::sys::enter_inherited_netns()
    {
        exit(
            EXIT_SANDBOX,
            &format!("wasm worker sandbox: join the pod's network namespace: {e}"),
        );
    }
    if let Err(e) = crate::sandbox::isolate(&scratch) {
        exit(EXIT_SANDBOX, &e.to_string());
    }
    let userns = args.iter().any(|a| a == USERNS_FLAG);
    if userns {
        if let Err(e) = crate::sandbox::unshare_user() {
            exit(EXIT_SANDBOX, &e.to_string());
        }
        // The parent maps the namespace when it reads this, then sends Init.
        if let Err(e) = ipc::send(chan.as_fd(), USERNS_READY, &[]) {
            exit(EXIT_CHANNEL, &e.to_string());
        }
    }
    let init: Init = match ipc::recv(chan.as_fd(), ipc::MAX_REQUEST) {
        Ok(Some(f)) => match serde_json::from_slice(&f.body) {
            Ok(i) => i,
            Err(e) => exit(EXIT_CHANNEL, &format!("wasm worker: malformed start: {e}")),
        },
        Ok(None) => std::process::exit(0),
        Err(e) => exit(EXIT_CHANNEL, &e.to_string()),
    };
    if userns && let Err(e) = crate::sandbox::become_mapped_root() {
        exit(EXIT_SANDBOX, &e.to_string());
    }
    if let Err(e) = crate::sandbox::drop_privileges(init.network) {
        exit(EXIT_SANDBOX, &e.to_string());
    }
    let rt = match Runtime::new(init.options, init.threads) {
        Ok(rt) => Arc::new(rt),
        Err(e) => exit(EXIT_ENGINE, &format!("wasm worker: {e}")),
    };
    serve(chan, rt);
    std::process::exit(0)
}

fn exit(code: i32, msg: &str) -> ! {
    tracing::error!("{msg}");
    std::process::exit(code)
}

/// `worker --self-test` (root): confine this process as a worker is, then report what it can
/// still do that it should not. Exit 0 when the confinement holds.
fn self_test(scratch: &std::path::Path) -> ! {
    if let Err(e) =
        crate::sandbox::isolate(scratch).and_then(|()| crate::sandbox::drop_privileges(false))
    {
        exit(EXIT_SANDBOX, &e.to_string());
    }
    let bad = crate::sandbox::self_test();
    for b in &bad {
        tracing::error!("self-test: {b}");
    }
    std::process::exit(if bad.is_empty() { 0 } else { 1 })
}

/// The sending half of the channel, shared by the request handlers and the tasks.
struct Out {
    chan: Mutex<OwnedFd>,
}

impl Out {
    fn send(&self, msg: &FromWorker) {
        let chan = self.chan.lock().unwrap_or_else(|p| p.into_inner());
        // A parent that is gone is noticed by the reader (end of stream); nothing to do here.
        if let Err(e) = ipc::send_json(chan.as_fd(), msg, &[]) {
            tracing::debug!(error = %e, "send to the shim");
        }
    }
}

impl Notify for Out {
    fn exited(&self, task: &str, status: u32) {
        self.send(&FromWorker::Exited {
            task: task.to_owned(),
            status,
        });
    }

    fn oom(&self, task: &str) {
        self.send(&FromWorker::Oom {
            task: task.to_owned(),
        });
    }
}

struct Served {
    rt: Arc<Runtime>,
    out: Arc<Out>,
    tasks: Mutex<HashMap<String, Arc<WasmProcess>>>,
}

/// Read requests until the parent closes the channel; each is handled on the guest runtime.
fn serve(chan: OwnedFd, rt: Arc<Runtime>) {
    let send = match chan.try_clone() {
        Ok(s) => s,
        Err(e) => exit(EXIT_CHANNEL, &format!("wasm worker: dup the channel: {e}")),
    };
    let served = Arc::new(Served {
        rt: rt.clone(),
        out: Arc::new(Out {
            chan: Mutex::new(send),
        }),
        tasks: Mutex::new(HashMap::new()),
    });
    loop {
        let frame = match ipc::recv(chan.as_fd(), ipc::MAX_REQUEST) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "wasm worker: reading from the shim");
                return;
            }
        };
        let req: Request = match serde_json::from_slice(&frame.body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "wasm worker: malformed request");
                return;
            }
        };
        if frame.truncated {
            // The kernel could not install every descriptor the shim sent: this worker is at
            // its open-file limit. The request fails alone; the worker and its tasks go on.
            drop(frame.fds);
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            let limit = limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
            tracing::warn!(%limit, "wasm worker: a request's descriptors did not fit");
            let failure = Failure::Internal(format!(
                "the wasm worker cannot take the request's file descriptors: it has reached its \
                 open-file limit (RLIMIT_NOFILE {limit}); remove idle tasks of its group or \
                 raise the limit"
            ));
            served.out.send(&FromWorker::Reply {
                id: req.id,
                result: Err(failure),
            });
            continue;
        }
        let s = served.clone();
        rt.guests.spawn(async move {
            let result = s.handle(req.msg, frame.fds).await.map_err(Into::into);
            s.out.send(&FromWorker::Reply { id: req.id, result });
        });
    }
}

impl Served {
    fn task(&self, id: &str) -> Result<Arc<WasmProcess>> {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id}: not in this wasm worker")))
    }

    async fn handle(&self, msg: ToWorker, fds: Vec<OwnedFd>) -> Result<Answer> {
        match msg {
            ToWorker::Load {
                digest,
                component,
                what,
            } => {
                let mut artifact = Vec::new();
                let mut file = std::fs::File::from(
                    fds.into_iter()
                        .next()
                        .ok_or_else(|| Error::Internal("load: no artifact".into()))?,
                );
                file.rewind()
                    .and_then(|_| file.read_to_end(&mut artifact))
                    .map_err(Error::io("read the compiled artifact"))?;
                let rt = self.rt.clone();
                let loaded = self
                    .rt
                    .guests
                    .spawn_blocking(move || rt.load(&digest, component, &artifact, &what))
                    .await
                    .map_err(|e| Error::Internal(format!("load task: {e}")))??;
                Ok(Answer::Loaded(loaded))
            }
            ToWorker::Create {
                task,
                digest,
                guest,
            } => {
                let guest = *guest;
                let [root, stdin, stdout, stderr]: [OwnedFd; 4] = fds
                    .try_into()
                    .map_err(|_| Error::Internal("create: want 4 descriptors".into()))?;
                let prepared = self.rt.prepared(&digest).ok_or_else(|| {
                    Error::Internal(format!("create: module {digest} is not loaded"))
                })?;
                let memory_limit = guest.settings.memory_limit.unwrap_or(0);
                let g = Guest {
                    id: task.clone(),
                    args: guest.args,
                    env: guest.env,
                    root: Mutex::new(Some(root)),
                    readonly: guest.readonly,
                    cwd: guest.cwd,
                    settings: guest.settings,
                    control: Arc::new(Control::default()),
                    memory_limit: Arc::new(AtomicU64::new(memory_limit)),
                    memory_used: Arc::new(AtomicU64::new(0)),
                    stderr: Default::default(),
                    stdout: Default::default(),
                };
                let p = WasmProcess::new(TaskParts {
                    runtime: self.rt.clone(),
                    prepared,
                    guest: g,
                    stdin: stdin.into(),
                    stdout: stdout.into(),
                    stderr: stderr.into(),
                    notify: self.out.clone(),
                });
                let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
                if tasks.contains_key(&task) {
                    return Err(Error::FailedPrecondition(format!(
                        "task {task}: already in this wasm worker"
                    )));
                }
                tasks.insert(task, p);
                Ok(Answer::Done)
            }
            ToWorker::Start { task } => {
                self.task(&task)?.start(fds.into_iter().next()).await?;
                Ok(Answer::Done)
            }
            ToWorker::Kill { task, signal } => {
                self.task(&task)?.kill(signal)?;
                Ok(Answer::Done)
            }
            ToWorker::Pause { task } => {
                self.task(&task)?.pause(true);
                Ok(Answer::Done)
            }
            ToWorker::Resume { task } => {
                self.task(&task)?.pause(false);
                Ok(Answer::Done)
            }
            ToWorker::Update { task, memory_limit } => {
                self.task(&task)?.update(memory_limit);
                Ok(Answer::Done)
            }
            ToWorker::Stats { task } => {
                let (used, limit) = self.task(&task)?.stats();
                Ok(Answer::Stats { used, limit })
            }
            ToWorker::Delete { task } => {
                let t = self.task(&task)?;
                t.delete().await;
                self.tasks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&task);
                Ok(Answer::Done)
            }
        }
    }
}
