//! A fake VMM and a fake guest agent, so the engine's sandbox logic runs in tests without root,
//! KVM or QEMU (feature `testing`; the crate's own tests have it).
//!
//! [`FakeBackends`] boots "VMs" whose agent stream is one end of a socketpair; the other end is
//! served, on a thread and runtime of its own as a guest would be, by whatever
//! [`proto::Agent`](yard_agent_protocol::Agent) the test gives: [`FakeAgent`], a well-behaved
//! in-memory agent, or a hostile one. So the shim's real agent client, framing and sandbox code
//! run exactly as against a VM. Stopping a fake VM drops its agent's runtime, which closes the
//! guest's end as a VMM's exit would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::sync::{oneshot, watch};
use yard_agent_protocol::ttrpc::r#async::transport::Listener;
use yard_agent_protocol::ttrpc::r#async::{Server, TtrpcContext};
use yard_agent_protocol::ttrpc::{self, Code};
use yard_agent_protocol::{self as proto, READY_BANNER};

use crate::config::Options;
use crate::hypervisor::{
    Accel, Backends, BootVmError, Chosen, Hypervisor, Vm, VmConfig, VmError, VmStatus, VmmExit,
};
use crate::virt::BackendError;

/// A guest agent as the fake VMs serve it.
pub type GuestAgent = Arc<dyn proto::Agent + Send + Sync>;

/// Serves `agent` on `guest` on a thread of its own until `stop` fires (or its sender drops);
/// then the agent's runtime is dropped, which ends every handler and closes the stream.
pub fn serve(
    agent: GuestAgent,
    guest: StdUnixStream,
    stop: oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("fake-guest".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("guest runtime");
            rt.block_on(async move {
                guest.set_nonblocking(true).expect("nonblocking");
                let stream = tokio::net::UnixStream::from_std(guest).expect("register");
                let one = futures::stream::iter([Ok::<_, std::io::Error>(stream)])
                    .chain(futures::stream::pending());
                let mut server = Server::new()
                    .register_service(proto::create_agent(agent))
                    .add_listener(Listener::new(one));
                if server.start().await.is_ok() {
                    let _ = stop.await;
                }
            });
        })
        .expect("spawn the fake guest")
}

/// What a fake VM is doing; tests keep it to watch or crash the VM.
pub struct FakeVmState {
    pub config: VmConfig,
    exit: watch::Sender<Option<VmmExit>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Spare disk slots: the image each holds.
    disks: Mutex<Vec<Option<PathBuf>>>,
    /// Calls of [`Vm::stop`].
    pub stops: std::sync::atomic::AtomicU32,
}

impl FakeVmState {
    /// The VMM ends with `exit` (first end wins): the guest's agent goes with it.
    pub fn end(&self, exit: VmmExit) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        self.exit.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(exit);
            true
        });
    }

    /// The guest crashes (the VMM dies on its own).
    pub fn crash(&self) {
        self.end(VmmExit::Signal(9));
    }

    pub fn ended(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Resolves once the VM has ended.
    pub async fn wait_ended(&self) {
        let mut rx = self.exit.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// The spare disks' images.
    pub fn disks(&self) -> Vec<Option<PathBuf>> {
        self.disks.lock().unwrap().clone()
    }
}

struct FakeVm {
    state: Arc<FakeVmState>,
    agent: Option<tokio::net::UnixStream>,
}

#[async_trait]
impl Vm for FakeVm {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn take_agent_stream(&mut self) -> Option<tokio::net::UnixStream> {
        self.agent.take()
    }

    fn boot_time(&self) -> Duration {
        Duration::ZERO
    }

    fn accel(&self) -> Accel {
        self.state.config.accel
    }

    fn console_tail(&self, _max_lines: usize) -> String {
        String::new()
    }

    async fn status(&self) -> Result<VmStatus, VmError> {
        match self.state.ended() {
            true => Err(VmError::Exited),
            false => Ok(VmStatus {
                state: "running".into(),
                running: true,
            }),
        }
    }

    async fn stop(&self, _grace: Duration) {
        self.state
            .stops
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.end(VmmExit::Code(0))).await;
    }

    async fn exited(&self) {
        self.state.wait_ended().await;
    }

    fn exit_status(&self) -> Option<VmmExit> {
        *self.state.exit.borrow()
    }

    async fn attach_disk(&self, image: &Path) -> Result<String, VmError> {
        let mut disks = self.state.disks.lock().unwrap();
        if disks.is_empty() {
            return Err(VmError::Unsupported("disk attach"));
        }
        let Some(i) = disks.iter().position(Option::is_none) else {
            return Err(VmError::NoFreeDisk { slots: disks.len() });
        };
        disks[i] = Some(image.to_owned());
        Ok(format!("/dev/vd{}", char::from(b'b' + i as u8)))
    }

    async fn detach_disk(&self, device: &str) -> Result<(), VmError> {
        let mut disks = self.state.disks.lock().unwrap();
        let slot = device
            .strip_prefix("/dev/vd")
            .and_then(|l| l.bytes().next())
            .map(|b| usize::from(b.wrapping_sub(b'b')))
            .filter(|i| disks.get(*i).is_some_and(Option::is_some))
            .ok_or_else(|| VmError::UnknownDisk(device.to_owned()))?;
        disks[slot] = None;
        Ok(())
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        let state = self.state.clone();
        // Joins the guest's thread: not on an async thread.
        let _ = std::thread::spawn(move || state.end(VmmExit::Signal(9))).join();
    }
}

struct Inner {
    name: &'static str,
    shares_files: bool,
    spare_disks: usize,
    agent: GuestAgent,
    vms: Mutex<Vec<Arc<FakeVmState>>>,
    fail_boot: Mutex<Option<String>>,
}

/// Fake backends: every sandbox boots a fake VM serving the same agent.
#[derive(Clone)]
pub struct FakeBackends(Arc<Inner>);

impl FakeBackends {
    /// Like QEMU: later containers' images go through the 9p share.
    pub fn sharing(agent: GuestAgent) -> FakeBackends {
        FakeBackends::new("fake-qemu", true, 0, agent)
    }

    /// Like the built-in VMM: no share, `spare_disks` disks for later containers.
    pub fn with_disks(agent: GuestAgent, spare_disks: usize) -> FakeBackends {
        FakeBackends::new("fake-builtin", false, spare_disks, agent)
    }

    fn new(
        name: &'static str,
        shares_files: bool,
        spare_disks: usize,
        agent: GuestAgent,
    ) -> FakeBackends {
        FakeBackends(Arc::new(Inner {
            name,
            shares_files,
            spare_disks,
            agent,
            vms: Mutex::new(Vec::new()),
            fail_boot: Mutex::new(None),
        }))
    }

    /// The VMs booted so far, oldest first.
    pub fn vms(&self) -> Vec<Arc<FakeVmState>> {
        self.0.vms.lock().unwrap().clone()
    }

    /// The next boots fail as a guest that exits during boot would, with `console`.
    pub fn fail_boots(&self, console: Option<&str>) {
        *self.0.fail_boot.lock().unwrap() = console.map(str::to_owned);
    }
}

#[async_trait]
impl Backends for FakeBackends {
    async fn choose(&self, _options: &Options) -> Result<Chosen, BackendError> {
        Ok(Chosen {
            hypervisor: Box::new(FakeHypervisor(self.0.clone())),
            accel: Accel::Tcg,
        })
    }
}

struct FakeHypervisor(Arc<Inner>);

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        self.0.name
    }

    fn shares_files(&self) -> bool {
        self.0.shares_files
    }

    async fn boot(&self, cfg: VmConfig) -> Result<Box<dyn Vm>, BootVmError> {
        if let Some(console) = self.0.fail_boot.lock().unwrap().clone() {
            return Err(BootVmError::ExitedDuringBoot {
                status: VmmExit::Code(1),
                console,
            });
        }
        for (path, is) in [(&cfg.kernel, "kernel"), (&cfg.initrd, "initrd")] {
            if path.as_os_str().is_empty() {
                return Err(BootVmError::Io {
                    what: is,
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
        }
        let (host, guest) = StdUnixStream::pair().map_err(BootVmError::io("socketpair"))?;
        // The agent writes its banner before any frame; the backend reads it (here: already).
        let mut banner = vec![0u8; READY_BANNER.len()];
        {
            use std::io::{Read, Write};
            (&guest)
                .write_all(READY_BANNER)
                .map_err(BootVmError::io("banner"))?;
            (&host)
                .read_exact(&mut banner)
                .map_err(BootVmError::io("banner"))?;
        }
        host.set_nonblocking(true)
            .map_err(BootVmError::io("nonblocking"))?;
        let host = tokio::net::UnixStream::from_std(host).map_err(BootVmError::io("register"))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = serve(self.0.agent.clone(), guest, stop_rx);
        let state = Arc::new(FakeVmState {
            config: cfg,
            exit: watch::channel(None).0,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
            disks: Mutex::new(vec![None; self.0.spare_disks]),
            stops: Default::default(),
        });
        self.0.vms.lock().unwrap().push(state.clone());
        Ok(Box::new(FakeVm {
            state,
            agent: Some(host),
        }))
    }
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// A process of the fake guest. `sleep ...` runs until signalled; anything else prints its
/// arguments after the first (like `echo`) and exits 0.
#[derive(Debug, Default)]
struct FakeProcess {
    pid: u32,
    args: Vec<String>,
    started: bool,
    stdout: VecDeque<u8>,
    exit: Option<u32>,
}

#[derive(Debug, Default)]
struct FakeContainer {
    storage: proto::Storage,
    volumes: Vec<proto::Volume>,
    spec: serde_json::Value,
    processes: HashMap<String, FakeProcess>,
    oom_kills: u64,
}

#[derive(Debug, Default)]
struct Guest {
    /// `ConfigureNetwork` calls, in order.
    networks: Vec<proto::NetworkConfig>,
    containers: HashMap<String, FakeContainer>,
    next_pid: u32,
    ooms: VecDeque<String>,
    removed: Vec<String>,
    shutdowns: u32,
    /// `WriteFile`'s copies: name → (content, mode).
    files: HashMap<String, (Vec<u8>, u32)>,
    /// How many `WriteFile` calls wrote (not removed) a copy.
    file_writes: u32,
    /// `WriteDir`'s copies: name → the tree's entries.
    trees: HashMap<String, Vec<proto::DirEntry>>,
}

/// A well-behaved in-memory agent: it keeps the protocol the way the real one does.
#[derive(Default)]
pub struct FakeAgent {
    guest: Mutex<Guest>,
    /// Bumped on every change, for the long polls.
    tick: watch::Sender<u64>,
}

fn args_of(process_json: &[u8]) -> ttrpc::Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(process_json)
        .map_err(|e| status(Code::INVALID_ARGUMENT, format!("process: {e}")))?;
    let args: Vec<String> = v["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if args.is_empty() {
        return Err(status(
            Code::INVALID_ARGUMENT,
            "process.args: must not be empty",
        ));
    }
    Ok(args)
}

impl FakeAgent {
    pub fn new() -> Arc<FakeAgent> {
        Arc::new(FakeAgent::default())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Guest) -> T) -> T {
        let r = f(&mut self.guest.lock().unwrap());
        self.tick.send_modify(|t| *t += 1);
        r
    }

    /// Waits until `f` gives a value, re-checking after every change.
    async fn until<T>(&self, mut f: impl FnMut(&mut Guest) -> Option<T>) -> T {
        let mut rx = self.tick.subscribe();
        loop {
            if let Some(v) = f(&mut self.guest.lock().unwrap()) {
                return v;
            }
            let _ = rx.changed().await;
        }
    }

    /// The containers the guest runs now.
    pub fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .guest
            .lock()
            .unwrap()
            .containers
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// The storage container `id` was created with.
    pub fn storage(&self, id: &str) -> Option<proto::Storage> {
        self.guest
            .lock()
            .unwrap()
            .containers
            .get(id)
            .map(|c| c.storage.clone())
    }

    /// The volumes and the spec container `id` was created with.
    pub fn created(&self, id: &str) -> Option<(Vec<proto::Volume>, serde_json::Value)> {
        self.guest
            .lock()
            .unwrap()
            .containers
            .get(id)
            .map(|c| (c.volumes.clone(), c.spec.clone()))
    }

    pub fn removed(&self) -> Vec<String> {
        self.guest.lock().unwrap().removed.clone()
    }

    pub fn shutdowns(&self) -> u32 {
        self.guest.lock().unwrap().shutdowns
    }

    /// The `ConfigureNetwork` calls the guest took, in order.
    pub fn networks(&self) -> Vec<proto::NetworkConfig> {
        self.guest.lock().unwrap().networks.clone()
    }

    /// The copy `name` the host wrote with `WriteFile`: content and mode.
    pub fn file(&self, name: &str) -> Option<(Vec<u8>, u32)> {
        self.guest.lock().unwrap().files.get(name).cloned()
    }

    /// The copies (files and directories) the guest holds now, by name.
    pub fn files(&self) -> Vec<String> {
        let g = self.guest.lock().unwrap();
        let mut names: Vec<String> = g.files.keys().chain(g.trees.keys()).cloned().collect();
        names.sort();
        names
    }

    /// The copied directory `name`: each entry's path and its content (a file's data, a
    /// symlink's target, or `/` for a directory).
    pub fn tree(&self, name: &str) -> Option<Vec<(String, String)>> {
        self.guest.lock().unwrap().trees.get(name).map(|t| {
            t.iter()
                .map(|e| {
                    let what = if e.dir {
                        "/".to_owned()
                    } else if !e.symlink.is_empty() {
                        format!("-> {}", e.symlink)
                    } else {
                        String::from_utf8_lossy(&e.data).into_owned()
                    };
                    (e.path.clone(), what)
                })
                .collect()
        })
    }

    /// How many times the host wrote a copy.
    pub fn file_writes(&self) -> u32 {
        self.guest.lock().unwrap().file_writes
    }

    /// The OOM killer hits container `id` (counted if the guest runs it) and the agent reports
    /// it on `WaitOom`.
    pub fn oom(&self, id: &str) {
        self.with(|g| {
            if let Some(c) = g.containers.get_mut(id) {
                c.oom_kills += 1;
            }
            g.ooms.push_back(id.to_owned());
        });
    }

    fn process<'a>(g: &'a mut Guest, c: &str, e: &str) -> ttrpc::Result<&'a mut FakeProcess> {
        g.containers
            .get_mut(c)
            .and_then(|c| c.processes.get_mut(e))
            .ok_or_else(|| status(Code::NOT_FOUND, format!("process {c}/{e:?} not found")))
    }
}

type R<T> = ttrpc::Result<T>;

#[async_trait]
impl proto::Agent for FakeAgent {
    async fn hello(&self, _: &TtrpcContext, _: proto::HelloRequest) -> R<proto::HelloResponse> {
        Ok(proto::HelloResponse {
            agent_version: "fake".into(),
            kernel_release: "6.1.0-fake".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            ..Default::default()
        })
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: proto::CreateContainerRequest,
    ) -> R<proto::Empty> {
        let spec: serde_json::Value = serde_json::from_slice(&req.spec)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("spec: {e}")))?;
        let args = args_of(spec["process"].to_string().as_bytes())?;
        self.with(|g| {
            if g.containers.contains_key(&req.container_id) {
                return Err(status(Code::ALREADY_EXISTS, "container exists"));
            }
            // As the real agent: a copy must have been written before the container binds it.
            if let Some(v) = req.volumes.iter().find(|v| {
                !v.copied.is_empty()
                    && !g.files.contains_key(&v.copied)
                    && !g.trees.contains_key(&v.copied)
            }) {
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "volumes: copied: {:?}: the host wrote no such file",
                        v.copied
                    ),
                ));
            }
            g.next_pid += 1;
            let init = FakeProcess {
                pid: g.next_pid,
                args,
                ..Default::default()
            };
            g.containers.insert(
                req.container_id.clone(),
                FakeContainer {
                    storage: req.storage.clone().unwrap_or_default(),
                    volumes: req.volumes.clone(),
                    spec,
                    processes: HashMap::from([(String::new(), init)]),
                    oom_kills: 0,
                },
            );
            Ok(proto::Empty::default())
        })
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: proto::ExecProcessRequest,
    ) -> R<proto::Empty> {
        let args = args_of(&req.process)?;
        self.with(|g| {
            g.next_pid += 1;
            let pid = g.next_pid;
            let c = g
                .containers
                .get_mut(&req.container_id)
                .ok_or_else(|| status(Code::NOT_FOUND, "no such container"))?;
            c.processes.insert(
                req.exec_id.clone(),
                FakeProcess {
                    pid,
                    args,
                    ..Default::default()
                },
            );
            Ok(proto::Empty::default())
        })
    }

    async fn start_process(
        &self,
        _: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> R<proto::StartProcessResponse> {
        self.with(|g| {
            let p = FakeAgent::process(g, &req.container_id, &req.exec_id)?;
            if p.started {
                return Err(status(Code::FAILED_PRECONDITION, "already started"));
            }
            p.started = true;
            if !p.args[0].ends_with("sleep") {
                let line = format!("{}\n", p.args[1..].join(" "));
                p.stdout.extend(line.as_bytes());
                p.exit = Some(0);
            }
            Ok(proto::StartProcessResponse {
                pid: p.pid,
                ..Default::default()
            })
        })
    }

    async fn signal_process(&self, _: &TtrpcContext, req: proto::SignalRequest) -> R<proto::Empty> {
        self.with(|g| {
            let c = g
                .containers
                .get_mut(&req.container_id)
                .ok_or_else(|| status(Code::NOT_FOUND, "no such container"))?;
            for (id, p) in &mut c.processes {
                if (req.all || *id == req.exec_id) && p.started && p.exit.is_none() {
                    p.exit = Some(128 + req.signal);
                }
            }
            Ok(proto::Empty::default())
        })
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> R<proto::WaitResponse> {
        self.until(
            |g| match FakeAgent::process(g, &req.container_id, &req.exec_id) {
                Ok(p) => p.exit.map(|status| {
                    Ok(proto::WaitResponse {
                        status,
                        ..Default::default()
                    })
                }),
                Err(e) => Some(Err(e)),
            },
        )
        .await
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: proto::ReadRequest,
    ) -> R<proto::ReadResponse> {
        self.until(|g| {
            let p = match FakeAgent::process(g, &req.container_id, &req.exec_id) {
                Ok(p) => p,
                Err(e) => return Some(Err(e)),
            };
            let n = p.stdout.len().min(req.len as usize);
            if n > 0 {
                return Some(Ok(proto::ReadResponse {
                    data: p.stdout.drain(..n).collect(),
                    ..Default::default()
                }));
            }
            p.exit.map(|_| {
                Ok(proto::ReadResponse {
                    eof: true,
                    ..Default::default()
                })
            })
        })
        .await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: proto::ReadRequest,
    ) -> R<proto::ReadResponse> {
        self.until(
            |g| match FakeAgent::process(g, &req.container_id, &req.exec_id) {
                Ok(p) => p.exit.map(|_| {
                    Ok(proto::ReadResponse {
                        eof: true,
                        ..Default::default()
                    })
                }),
                Err(e) => Some(Err(e)),
            },
        )
        .await
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: proto::WriteRequest,
    ) -> R<proto::WriteResponse> {
        Ok(proto::WriteResponse {
            len: req.data.len() as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &TtrpcContext, _: proto::ProcessRequest) -> R<proto::Empty> {
        Ok(proto::Empty::default())
    }

    async fn list_pids(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> R<proto::PidsResponse> {
        self.with(|g| {
            let c = g
                .containers
                .get(&req.container_id)
                .ok_or_else(|| status(Code::NOT_FOUND, "no such container"))?;
            let mut pids: Vec<u32> = c
                .processes
                .values()
                .filter(|p| p.started && p.exit.is_none())
                .map(|p| p.pid)
                .collect();
            pids.sort_unstable();
            Ok(proto::PidsResponse {
                pids,
                ..Default::default()
            })
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> R<proto::StatsResponse> {
        self.with(|g| {
            let c = g
                .containers
                .get(&req.container_id)
                .ok_or_else(|| status(Code::NOT_FOUND, "no such container"))?;
            Ok(proto::StatsResponse {
                oom_kills: c.oom_kills,
                memory_usage_bytes: 1 << 20,
                ..Default::default()
            })
        })
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> R<proto::Empty> {
        Ok(proto::Empty::default())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        _: proto::ContainerRequest,
    ) -> R<proto::Empty> {
        Ok(proto::Empty::default())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> R<proto::Empty> {
        self.with(|g| match g.containers.remove(&req.container_id) {
            Some(_) => {
                g.removed.push(req.container_id.clone());
                Ok(proto::Empty::default())
            }
            None => Err(status(Code::NOT_FOUND, "no such container")),
        })
    }

    async fn write_file(&self, _: &TtrpcContext, req: proto::WriteFileRequest) -> R<proto::Empty> {
        if req.data.len() > proto::MAX_COPIED_FILE {
            return Err(status(Code::INVALID_ARGUMENT, "data: too large"));
        }
        self.with(|g| {
            if req.remove {
                g.files.remove(&req.name);
                g.trees.remove(&req.name);
            } else {
                g.file_writes += 1;
                g.files
                    .insert(req.name.clone(), (req.data.clone(), req.mode));
            }
        });
        Ok(proto::Empty::default())
    }

    async fn write_dir(&self, _: &TtrpcContext, req: proto::WriteDirRequest) -> R<proto::Empty> {
        self.with(|g| {
            g.file_writes += 1;
            g.trees.insert(req.name.clone(), req.entries.clone());
        });
        Ok(proto::Empty::default())
    }

    async fn wait_oom(&self, _: &TtrpcContext, _: proto::Empty) -> R<proto::OomEvent> {
        self.until(|g| {
            g.ooms.pop_front().map(|id| {
                Ok(proto::OomEvent {
                    container_id: id,
                    ..Default::default()
                })
            })
        })
        .await
    }

    async fn shutdown(&self, _: &TtrpcContext, _: proto::Empty) -> R<proto::Empty> {
        self.with(|g| g.shutdowns += 1);
        Ok(proto::Empty::default())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: proto::NetworkConfig,
    ) -> R<proto::Empty> {
        if !g_containers_empty(self) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "ConfigureNetwork after a container",
            ));
        }
        self.with(|g| g.networks.push(req));
        Ok(proto::Empty::default())
    }
}

fn g_containers_empty(a: &FakeAgent) -> bool {
    a.guest.lock().unwrap().containers.is_empty()
}

/// `runtimeoptions.v1.Options` carrying `toml` as its body, as switchyardd sends a runtime's
/// options.
pub fn options_any(toml: &str) -> yard_shim_kit::protos::protobuf::well_known_types::any::Any {
    let mut value = vec![0x1a];
    let mut len = toml.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            value.push(byte);
            break;
        }
        value.push(byte | 0x80);
    }
    value.extend_from_slice(toml.as_bytes());
    yard_shim_kit::protos::protobuf::well_known_types::any::Any {
        type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
        value,
        ..Default::default()
    }
}

/// A file that passes for an EROFS image (its superblock magic at 1024): enough for the
/// engine, which hands it to the (fake) VM unread.
pub fn fake_erofs_image(path: &Path) {
    let mut data = vec![0u8; 4096];
    data[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
    std::fs::write(path, data).unwrap();
}

/// A minimal OCI spec running `args`, with `annotations` and the extra top-level JSON members
/// in `extra` (e.g. `"linux": {...}`).
pub fn spec_json(args: &[&str], annotations: &[(&str, &str)], extra: &str) -> String {
    let args = serde_json::to_string(args).unwrap();
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let ann = serde_json::Value::Object(ann);
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(",{extra}")
    };
    format!(
        r#"{{"ociVersion": "1.0.2", "process": {{"args": {args}, "cwd": "/", "env": [], "user": {{"uid": 0, "gid": 0}}}},
            "root": {{"path": "rootfs"}}, "annotations": {ann}{extra}}}"#
    )
}

/// A test's containers: bundles, images and output files under one directory.
pub struct Bundles {
    pub dir: PathBuf,
    /// The runtime options every container gets: the image cache (and shares) in `dir`.
    pub options: String,
}

impl Bundles {
    pub fn new(dir: &Path) -> Bundles {
        Bundles {
            dir: dir.to_owned(),
            options: format!("cache_dir = \"{}\"\n", dir.join("cache").display()),
        }
    }

    /// The create request for container `id` of `spec` (see [`spec_json`]), whose rootfs is a
    /// prebuilt image and whose stdout and stderr go to files in its bundle.
    pub fn request(
        &self,
        id: &str,
        spec: &str,
        events: yard_shim_kit::Publisher,
    ) -> yard_shim_kit::CreateRequest {
        let bundle = self.dir.join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(bundle.join("config.json"), spec).unwrap();
        let image = bundle.join("image.erofs");
        fake_erofs_image(&image);
        let (spec, config) = yard_shim_kit::bundle::read_spec(&bundle).unwrap();
        yard_shim_kit::CreateRequest {
            namespace: "test".into(),
            id: id.to_owned(),
            bundle: bundle.clone(),
            spec: Box::new(spec),
            config,
            rootfs: yard_shim_kit::Rootfs::Mounts(vec![
                yard_shim_kit::protos::types::mount::Mount {
                    type_: "erofs".into(),
                    source: image.display().to_string(),
                    ..Default::default()
                },
            ]),
            mounted: Vec::new(),
            stdio: yard_shim_kit::stdio::StdioSpec {
                stdin: String::new(),
                stdout: format!("file://{}", bundle.join("stdout").display()),
                stderr: format!("file://{}", bundle.join("stderr").display()),
                terminal: false,
            },
            options: Some(options_any(&self.options)),
            events,
        }
    }

    /// What container `id` wrote to its stdout file.
    pub fn stdout(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(id).join("stdout")).unwrap_or_default()
    }
}

/// containerd's event service, collecting what shims publish: `(topic, container id)` of every
/// `/tasks/oom`, and the topic alone for anything else.
pub struct EventsServer {
    pub address: PathBuf,
    received: Arc<Mutex<Vec<(String, String)>>>,
    _server: Server,
}

struct Collector(Arc<Mutex<Vec<(String, String)>>>);

#[async_trait]
impl yard_shim_kit::protos::shim_async::Events for Collector {
    async fn forward(
        &self,
        _: &TtrpcContext,
        req: yard_shim_kit::protos::shim::events::ForwardRequest,
    ) -> ttrpc::Result<yard_shim_kit::protos::types::empty::Empty> {
        use yard_shim_kit::protos::protobuf::Message as _;
        let env = req.envelope.unwrap_or_default();
        let id = match env.topic.as_str() {
            yard_shim_kit::protos::topics::TASK_OOM_EVENT_TOPIC => {
                yard_shim_kit::protos::events::task::TaskOOM::parse_from_bytes(
                    &env.event.unwrap_or_default().value,
                )
                .map(|e| e.container_id)
                .unwrap_or_default()
            }
            _ => String::new(),
        };
        self.0.lock().unwrap().push((env.topic, id));
        Ok(Default::default())
    }
}

impl EventsServer {
    /// Serves on `<dir>/events.sock`, on the caller's runtime.
    pub async fn start(dir: &Path) -> EventsServer {
        let address = dir.join("events.sock");
        let received = Arc::new(Mutex::new(Vec::new()));
        let service =
            yard_shim_kit::protos::shim_async::create_events(Arc::new(Collector(received.clone())));
        let mut server = Server::new()
            .bind(&format!("unix://{}", address.display()))
            .expect("bind the events socket")
            .register_service(service);
        server.start().await.expect("serve events");
        EventsServer {
            address,
            received,
            _server: server,
        }
    }

    /// A publisher to it, as the kit connects one.
    pub async fn publisher(&self) -> yard_shim_kit::Publisher {
        let sink =
            yard_shim_kit::events::RemoteSink::connect(&self.address.display().to_string(), "test")
                .await
                .expect("connect the publisher");
        yard_shim_kit::Publisher::new(sink)
    }

    /// The container ids of the OOM events received so far.
    pub fn ooms(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == yard_shim_kit::protos::topics::TASK_OOM_EVENT_TOPIC)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

/// Records the volume share's host mounts instead of making them; a source that does not
/// exist fails as `mount(2)` would.
#[derive(Default)]
pub struct RecordingBinder {
    calls: Mutex<Vec<String>>,
}

impl RecordingBinder {
    pub fn new() -> Arc<RecordingBinder> {
        Arc::new(RecordingBinder::default())
    }

    /// `bind SOURCE TARGET [ro]` and `unbind TARGET`, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl crate::engine::volumes::Binder for RecordingBinder {
    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> std::io::Result<()> {
        std::fs::metadata(source)?;
        let ro = if readonly { " ro" } else { "" };
        self.calls.lock().unwrap().push(format!(
            "bind {} {}{ro}",
            source.display(),
            target.display()
        ));
        Ok(())
    }

    fn unbind(&self, target: &Path) -> std::io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unbind {}", target.display()));
        Ok(())
    }

    fn mounted_under(&self, _dir: &Path) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Records pod networks instead of making them: `attach NETNS` and `detach NETNS`, in order.
/// Attaching a namespace whose name starts with `bad` fails as one whose `eth0` has no
/// address; one whose name starts with `empty` has no `eth0` (no device).
#[derive(Default)]
pub struct RecordingPlumber {
    calls: Mutex<Vec<String>>,
}

impl RecordingPlumber {
    pub fn new() -> Arc<RecordingPlumber> {
        Arc::new(RecordingPlumber::default())
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// The configuration every attached pod network gets.
    pub fn config(hostname: Option<String>) -> proto::NetworkConfig {
        proto::NetworkConfig {
            interfaces: vec![proto::Interface {
                name: "eth0".into(),
                mac: vec![0x0a, 0x58, 10, 88, 0, 7],
                mtu: 1500,
                addresses: vec!["10.88.0.7/16".into()],
                ..Default::default()
            }],
            hostname: hostname.unwrap_or_default(),
            ..Default::default()
        }
    }
}

impl crate::engine::net::Plumber for RecordingPlumber {
    fn attach(
        &self,
        netns: &Path,
        hostname: Option<String>,
    ) -> yard_shim_kit::Result<Option<crate::engine::net::PodNet>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("attach {}", netns.display()));
        if netns
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("bad"))
        {
            return Err(yard_shim_kit::Error::FailedPrecondition(format!(
                "pod network namespace {}: eth0 has no IPv4 and no IPv6 address",
                netns.display()
            )));
        }
        if netns
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("empty"))
        {
            return Ok(None);
        }
        let tap = std::fs::File::open("/dev/null").map_err(yard_shim_kit::Error::io("tap"))?;
        Ok(Some(crate::engine::net::PodNet {
            netns: netns.to_owned(),
            device: crate::hypervisor::NetDevice {
                tap: Arc::new(tap.into()),
                mac: [0x0a, 0x58, 10, 88, 0, 7],
                mtu: 1500,
            },
            config: Self::config(hostname),
            eth: 2,
        }))
    }

    fn detach(&self, net: &crate::engine::net::PodNet) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("detach {}", net.netns.display()));
    }
}
