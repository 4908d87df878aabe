//! Streaming exec and the checks the streaming server makes before handing out a URL: an
//! exec'd process runs as ExecSync's does (the container's process spec with the command,
//! through Tasks.Exec, so every runtime's shim runs it), with its stdio on fifos pumped to and
//! from a streaming session.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard_api::containerd::services::tasks::v1 as tasks_api;
use switchyard_api::containerd::services::tasks::v1::tasks_server::Tasks as _;
use switchyard_api::containerd::v1::types::Status as TaskStatus;
use switchyard_api::cri::v1 as cri;
use switchyard_cni::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tonic::Status;

use super::Cri;

/// The file in a vm pod's bundle naming the vm shim's port-forwarding socket (the shim's
/// `engine::forward::FORWARD_FILE`).
const VM_FORWARD_FILE: &str = "vm-forward";

/// Where a pod's ports are reached.
pub(crate) enum ForwardTarget {
    /// The node's own network (a pod without a network namespace).
    Node,
    /// The pod's network namespace.
    Netns(Netns),
    /// A vm pod: the guest's loopback, through the vm shim's socket and the agent.
    Vm(PathBuf),
}
use super::containers::{Record, in_ns};
use super::sandbox::{SandboxTask, State};
use super::stream::remotecommand::Channels;
use crate::server::tasks::TasksService;

/// How long the output of an exited process may still drain (a child that kept the
/// terminal open does not hold the session).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

impl Cri {
    /// The streaming server (started with the daemon).
    pub(crate) fn streams(&self) -> Result<&super::stream::StreamServer, Status> {
        self.streams
            .get()
            .map(|s| &**s)
            .ok_or_else(|| Status::unavailable("the CRI streaming server is not running"))
    }

    /// The container `id` names, which must be running (containerd refuses an exec into
    /// another as well).
    pub(crate) async fn running_container(&self, id: &str) -> Result<Record, Status> {
        let r = self.containers.find(id)?;
        let running = matches!(
            self.process(&r.id)
                .await
                .and_then(|p| TaskStatus::try_from(p.status).ok()),
            Some(TaskStatus::Running)
        );
        if !running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                r.id
            )));
        }
        Ok(r)
    }

    /// Where a port of pod `pod` is reached. The pod must be ready.
    pub(crate) fn port_forward_target(&self, pod: &str) -> Result<ForwardTarget, Status> {
        let record = self.sandboxes.get(pod).map_err(crate::error::status)?;
        if record.state != State::Ready {
            return Err(Status::failed_precondition(format!(
                "pod {} is not ready",
                record.id
            )));
        }
        if matches!(record.task, SandboxTask::Vm) {
            // The vm shim names its forwarding socket in the pod VM task's bundle.
            let file = self
                .shared
                .tasks
                .bundle_path(super::NAMESPACE, &record.id)
                .join(VM_FORWARD_FILE);
            let socket = std::fs::read_to_string(&file).map_err(|e| {
                Status::failed_precondition(format!(
                    "pod {}: its VM serves no port forwarding ({}: {e})",
                    record.id,
                    file.display()
                ))
            })?;
            return Ok(ForwardTarget::Vm(PathBuf::from(socket.trim_end())));
        }
        match &record.netns {
            None => Ok(ForwardTarget::Node),
            Some(path) => {
                let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                    return Err(Status::internal(format!(
                        "pod {}: netns path {}",
                        record.id,
                        path.display()
                    )));
                };
                Netns::at(dir, &name.to_string_lossy())
                    .map(ForwardTarget::Netns)
                    .map_err(|e| Status::internal(format!("pod {}: {e}", record.id)))
            }
        }
    }

    /// Passes a session's terminal sizes on to the process's pty (Tasks.ResizePty).
    fn resize_pty(
        &self,
        container_id: String,
        exec_id: String,
        mut sizes: mpsc::Receiver<super::stream::remotecommand::TermSize>,
    ) -> tokio::task::JoinHandle<()> {
        let tasks = TasksService(self.shared.clone());
        tokio::spawn(async move {
            while let Some(size) = sizes.recv().await {
                let _ = tasks
                    .resize_pty(in_ns(tasks_api::ResizePtyRequest {
                        container_id: container_id.clone(),
                        exec_id: exec_id.clone(),
                        width: u32::from(size.width),
                        height: u32::from(size.height),
                    }))
                    .await;
            }
        })
    }

    /// The OCI process of an exec of `cmd` in container `r`: the container's own process
    /// with the command and the terminal set.
    pub(crate) async fn exec_process(
        &self,
        r: &Record,
        cmd: &[String],
        tty: bool,
    ) -> Result<prost_types::Any, Status> {
        let c = self
            .shared
            .store
            .run({
                let id = r.id.clone();
                move |s| s.get_container(super::NAMESPACE, &id)
            })
            .await
            .map_err(crate::error::status)?;
        let spec: serde_json::Value = c
            .spec
            .as_ref()
            .and_then(|a| serde_json::from_slice(&a.value).ok())
            .ok_or_else(|| Status::internal("the container's spec"))?;
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = tty.into();
        Ok(switchyard_api::typeurl::json_any(
            switchyard_api::typeurl::OCI_PROCESS,
            serde_json::to_vec(&process).unwrap_or_default(),
        ))
    }

    /// Runs an exec of a streaming session to its end: its exit code. The process is killed
    /// if the client goes away first.
    pub(crate) async fn exec_streaming(
        &self,
        req: &cri::ExecRequest,
        channels: Channels,
    ) -> Result<i32, Status> {
        let r = self.running_container(&req.container_id).await?;
        let exec_id = format!("exec-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.containers.io_dir.join(format!("{}-{exec_id}", r.id));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("{}: {e}", dir.display())))?;
        let result = self
            .exec_streaming_in(&r, &exec_id, &dir, req, channels)
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn exec_streaming_in(
        &self,
        r: &Record,
        exec_id: &str,
        dir: &Path,
        req: &cri::ExecRequest,
        mut ch: Channels,
    ) -> Result<i32, Status> {
        let fifo = |name: &str, on: bool| -> Result<Option<PathBuf>, Status> {
            if !on {
                return Ok(None);
            }
            let p = dir.join(name);
            super::containers::mkfifo(&p)?;
            Ok(Some(p))
        };
        let stdin = fifo("stdin", ch.stdin.is_some())?;
        let stdout = fifo("stdout", ch.stdout.is_some())?;
        let stderr = fifo("stderr", ch.stderr.is_some() && !req.tty)?;
        // Our ends, opened while the shim opens its own (an open waits for the other end).
        let reading = [stdout.clone(), stderr.clone()]
            .map(|p| p.map(|p| tokio::task::spawn_blocking(move || std::fs::File::open(p))));
        let writing = stdin.clone().map(|p| {
            tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(p))
        });
        let unblock = || {
            // Our opens waiting for a shim that never opened its ends.
            use std::os::unix::fs::OpenOptionsExt as _;
            let nonblock = nix::fcntl::OFlag::O_NONBLOCK.bits();
            for p in [&stdout, &stderr].into_iter().flatten() {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nonblock)
                    .open(p);
            }
            if let Some(p) = &stdin {
                let _ = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nonblock)
                    .open(p);
            }
        };
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let tasks = TasksService(self.shared.clone());
        let process = match self.exec_process(r, &req.cmd, req.tty).await {
            Ok(p) => p,
            Err(e) => {
                unblock();
                return Err(e);
            }
        };
        let ids = || (r.id.clone(), exec_id.to_owned());
        let created = tasks
            .exec(in_ns(tasks_api::ExecProcessRequest {
                container_id: r.id.clone(),
                exec_id: exec_id.to_owned(),
                stdin: path(&stdin),
                stdout: path(&stdout),
                stderr: path(&stderr),
                terminal: req.tty,
                spec: Some(process),
            }))
            .await;
        if let Err(e) = created {
            unblock();
            return Err(e);
        }
        let delete = || {
            let (container_id, exec_id) = ids();
            tasks.delete_process(in_ns(tasks_api::DeleteProcessRequest {
                container_id,
                exec_id,
            }))
        };
        let started = tasks
            .start(in_ns(tasks_api::StartRequest {
                container_id: r.id.clone(),
                exec_id: exec_id.to_owned(),
            }))
            .await;
        if let Err(e) = started {
            unblock();
            let _ = delete().await;
            return Err(e);
        }

        // The pumps.
        let [out_open, err_open] = reading;
        let mut output = Vec::new();
        for (open, tx) in [(out_open, ch.stdout.take()), (err_open, ch.stderr.take())] {
            if let (Some(open), Some(tx)) = (open, tx) {
                output.push(tokio::spawn(fifo_to_channel(open, tx)));
            }
        }
        let input = match (writing, ch.stdin.take()) {
            (Some(open), Some(rx)) => {
                let tasks = TasksService(self.shared.clone());
                let (container_id, exec_id) = ids();
                Some(tokio::spawn(async move {
                    channel_to_fifo(open, rx).await;
                    // The end of the client's input: closing our end is not enough for
                    // shims that hold a writer of their own (containerd's runc shim does).
                    let _ = tasks
                        .close_io(in_ns(tasks_api::CloseIoRequest {
                            container_id,
                            exec_id,
                            stdin: true,
                        }))
                        .await;
                }))
            }
            _ => None,
        };
        let resizing = ch.resize.take().map(|rx| {
            let (container_id, exec_id) = ids();
            self.resize_pty(container_id, exec_id, rx)
        });

        let wait = || {
            let (container_id, exec_id) = ids();
            tasks.wait(in_ns(tasks_api::WaitRequest {
                container_id,
                exec_id,
            }))
        };
        let mut gone = ch.gone.clone();
        let exited = tokio::select! {
            w = wait() => w,
            () = async { let _ = gone.wait_for(|g| *g).await; } => {
                tracing::info!(container = %r.id, exec = %exec_id, "streaming client went away: killing its exec");
                let (container_id, exec_id) = ids();
                let _ = tasks
                    .kill(in_ns(tasks_api::KillRequest {
                        container_id,
                        exec_id,
                        signal: nix::sys::signal::Signal::SIGKILL as u32,
                        all: false,
                    }))
                    .await;
                wait().await
            }
        };
        // The output still in the fifos, then the process is the shim's to forget.
        drain(output).await;
        for t in [input, resizing].into_iter().flatten() {
            t.abort();
        }
        let _ = delete().await;
        let exit = exited?.into_inner();
        Ok(i32::try_from(exit.exit_status).unwrap_or(i32::MAX))
    }

    /// CRI Attach's session: the container's output from now on (from its log copier), its
    /// stdin (the fifo's held write end) and terminal size, until the main process ends or
    /// the client goes away (which leaves the process running). The status is its exit code.
    pub(crate) async fn attach(
        &self,
        req: &cri::AttachRequest,
        mut ch: Channels,
    ) -> Result<i32, Status> {
        use switchyard_api::cri_log::Stream as Out;
        let r = self.running_container(&req.container_id).await?;
        if ch.stdin.is_some() && !r.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} was not created with stdin",
                r.id
            )));
        }
        let subscribe = |stream: Out| self.containers.with_log(&r.id, |l| l.attach(stream));
        let mut output = Vec::new();
        for (stream, tx) in [
            (Out::Stdout, ch.stdout.take()),
            (Out::Stderr, ch.stderr.take()),
        ] {
            let Some(tx) = tx else { continue };
            // With a terminal there is one output stream.
            if r.tty && stream == Out::Stderr {
                continue;
            }
            let Some(mut rx) = subscribe(stream) else {
                return Err(Status::failed_precondition(format!(
                    "container {} has no output to attach to",
                    r.id
                )));
            };
            output.push(tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if tx.send(data).await.is_err() {
                        return;
                    }
                }
            }));
        }
        let input = match ch.stdin.take() {
            Some(rx) => {
                let (copy, held) = self
                    .containers
                    .with_log(&r.id, |l| l.stdin())
                    .flatten()
                    .ok_or_else(|| {
                        Status::failed_precondition("the container's stdin is closed")
                    })?;
                let copy =
                    copy.map_err(|e| Status::internal(format!("the container's stdin: {e}")))?;
                let tx = pipe::Sender::from_file(copy)
                    .map_err(|e| Status::internal(format!("the container's stdin: {e}")))?;
                let once = r.stdin_once && !r.tty;
                let tasks = TasksService(self.shared.clone());
                let container_id = r.id.clone();
                Some(tokio::spawn(async move {
                    channel_to_pipe(tx, rx).await;
                    if once {
                        // stdin_once: the session's input ended, so does the container's
                        // (the held end, then CloseIO for shims holding a writer of their own).
                        held.close();
                        let _ = tasks
                            .close_io(in_ns(tasks_api::CloseIoRequest {
                                container_id,
                                exec_id: String::new(),
                                stdin: true,
                            }))
                            .await;
                    }
                }))
            }
            None => None,
        };
        let tasks = TasksService(self.shared.clone());
        let resizing = ch
            .resize
            .take()
            .map(|rx| self.resize_pty(r.id.clone(), String::new(), rx));
        let mut gone = ch.gone.clone();
        let waited = tokio::select! {
            w = tasks.wait(in_ns(tasks_api::WaitRequest {
                container_id: r.id.clone(),
                exec_id: String::new(),
            })) => Some(w),
            () = async { let _ = gone.wait_for(|g| *g).await; } => None,
        };
        for t in [input, resizing].into_iter().flatten() {
            t.abort();
        }
        let Some(waited) = waited else {
            for o in output {
                o.abort();
            }
            return Err(Status::cancelled("the client went away"));
        };
        // The output ends with the process's streams.
        drain(output).await;
        let exit = waited?.into_inner();
        Ok(i32::try_from(exit.exit_status).unwrap_or(i32::MAX))
    }
}

/// Waits for the output pumps to reach their streams' ends, for at most [`OUTPUT_DRAIN`].
async fn drain(mut output: Vec<tokio::task::JoinHandle<()>>) {
    let drained = async {
        for o in output.iter_mut() {
            let _ = o.await;
        }
    };
    if tokio::time::timeout(OUTPUT_DRAIN, drained).await.is_err() {
        for o in &output {
            o.abort();
        }
    }
}

/// A fifo's data (opened by `open`) to a session channel, until the fifo's EOF.
async fn fifo_to_channel(
    open: tokio::task::JoinHandle<std::io::Result<std::fs::File>>,
    tx: mpsc::Sender<Vec<u8>>,
) {
    let Ok(Ok(file)) = open.await else { return };
    let Ok(mut rx) = pipe::Receiver::from_file(file) else {
        return;
    };
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A session's input to a fifo (opened by `open`), closed at the input's end.
async fn channel_to_fifo(
    open: tokio::task::JoinHandle<std::io::Result<std::fs::File>>,
    rx: mpsc::Receiver<Vec<u8>>,
) {
    let Ok(Ok(file)) = open.await else { return };
    let Ok(tx) = pipe::Sender::from_file(file) else {
        return;
    };
    channel_to_pipe(tx, rx).await;
}

/// A session's input into a pipe, until the input ends.
async fn channel_to_pipe(mut tx: pipe::Sender, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(data) = rx.recv().await {
        if tx.write_all(&data).await.is_err() {
            return;
        }
    }
}
