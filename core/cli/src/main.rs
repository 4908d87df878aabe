//! `yard`: run and manage Switchyard tasks from a shell.

mod client;
mod images;
mod io;
mod spec;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use switchyard_api::containerd::services::containers::v1 as containers;
use switchyard_api::containerd::services::events::v1 as events;
use switchyard_api::containerd::services::introspection::v1 as introspection;
use switchyard_api::containerd::services::tasks::v1 as tasks;
use switchyard_api::containerd::v1::types::Status;
use switchyard_api::typeurl::{OCI_PROCESS, OCI_SPEC, json_any};

use crate::client::{Client, rpc};

const DEFAULT_ADDRESS: &str = "/run/switchyard/switchyard.sock";

#[derive(Parser)]
#[command(
    name = "yard",
    version,
    about = "Run containers, microVMs and Wasm tasks on Switchyard"
)]
struct Cli {
    /// switchyardd's socket.
    #[arg(long, global = true, env = "SWITCHYARD_ADDRESS", default_value = DEFAULT_ADDRESS)]
    address: PathBuf,
    /// Namespace to work in.
    #[arg(
        long,
        short = 'n',
        global = true,
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a new task.
    Run(RunArgs),
    /// List containers and their tasks.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a task.
    Kill {
        /// Signal name (TERM, SIGKILL) or number.
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
        /// Signal every process of the task.
        #[arg(long)]
        all: bool,
        /// Signal an exec'd process instead of the task's init process.
        #[arg(long)]
        exec_id: Option<String>,
        id: String,
    },
    /// Remove containers (and their stopped tasks).
    Rm {
        /// Kill a running task first.
        #[arg(long, short = 'f')]
        force: bool,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Run another process in a running task.
    Exec(ExecArgs),
    /// Print events as they happen.
    Events {
        #[arg(long)]
        json: bool,
        /// containerd filters, e.g. 'topic=="/tasks/exit"'; several match any.
        filters: Vec<String>,
    },
    /// The daemon, its runtimes, and whether each runtime's shim is installed.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry (and unpack it).
    Pull {
        /// Image reference, e.g. busybox:1.36 or 127.0.0.1:5000/app:1.
        reference: String,
        /// Platform to pick from a multi-platform image (os/arch[/variant]).
        #[arg(long)]
        platform: Option<String>,
        /// Registry credentials USER:PASSWORD (default: the docker config's, if any).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Use HTTP instead of HTTPS (registries on loopback always use HTTP).
        #[arg(long)]
        plain_http: bool,
        /// No progress bars.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List images with their sizes.
    Images {
        #[arg(long)]
        json: bool,
        /// Names only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Remove images; content and snapshots nothing else uses are collected.
    Rmi {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI layout or `docker save` tarball (gzipped or not; - for stdin).
    Import {
        file: PathBuf,
        /// Name for images the archive only tags (or does not name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List images.
    Ls {
        #[arg(long)]
        json: bool,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Remove images.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Collect content and snapshots no image or container uses.
    Prune,
}

#[derive(Args)]
struct RunArgs {
    /// Runtime name from switchyardd's config (native, vm, wasm, runc), or a runtime type.
    #[arg(long)]
    runtime: Option<String>,
    /// Remove the container when the task exits.
    #[arg(long)]
    rm: bool,
    /// Start the task and return; its output goes to --log, or nowhere.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Allocate a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Keep stdin open and pass it to the task.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(long)]
    cwd: Option<String>,
    /// Container id (default: random).
    #[arg(long)]
    name: Option<String>,
    /// Hostname (default: the container id).
    #[arg(long)]
    hostname: Option<String>,
    /// Share the host's network namespace.
    #[arg(long)]
    net_host: bool,
    /// Mount the rootfs read-only.
    #[arg(long)]
    read_only: bool,
    /// Memory limit: bytes, or with a k, m or g suffix.
    #[arg(long, value_parser = parse_bytes)]
    memory: Option<i64>,
    /// Maximum number of processes and threads in the container.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// Annotation KEY=VALUE (repeatable), e.g. io.switchyard.group=G to share a shim.
    #[arg(long = "annotation", value_parser = parse_annotation)]
    annotations: Vec<(String, String)>,
    /// Write a detached task's stdout and stderr to this file.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Root filesystem directory (instead of an image).
    #[arg(long, conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// Image to run (see yard pull and yard image import).
    #[arg(required_unless_present = "rootfs")]
    image: Option<String>,
    /// Command and arguments (with an image: replaces its Cmd; its Entrypoint stays).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct ExecArgs {
    #[arg(long, short = 't')]
    tty: bool,
    #[arg(long, short = 'i')]
    interactive: bool,
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    #[arg(long)]
    cwd: Option<String>,
    /// Id of the new process (default: random).
    #[arg(long)]
    exec_id: Option<String>,
    id: String,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_bytes(s: &str) -> Result<i64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use k, m or g)")),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: not a byte count"))?;
    n.checked_shl(shift)
        .filter(|v| *v > 0 && v >> shift == n)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

fn parse_annotation(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

fn check_env(env: &[String]) -> anyhow::Result<()> {
    for e in env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => bail!("--env {e:?}: expected KEY=VALUE"),
        }
    }
    Ok(())
}

fn parse_signal(s: &str) -> anyhow::Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    let sig: nix::sys::signal::Signal = name
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown signal {s:?}"))?;
    Ok(sig as u32)
}

fn status_name(status: i32) -> String {
    Status::try_from(status)
        .map(|s| s.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Exit code of a process as a shell would report it (0..=255).
fn exit_code(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(255)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => switchyard_base::exit_with(e.as_ref()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let client = Client::connect(&cli.address, &cli.namespace).await?;
    match cli.command {
        Command::Run(args) => run_task(&client, args).await,
        Command::Ps { json } => ps(&client, json).await.map(|()| 0),
        Command::Kill {
            signal,
            all,
            exec_id,
            id,
        } => {
            let signal = parse_signal(&signal)?;
            client
                .tasks()
                .kill(tasks::KillRequest {
                    container_id: id.clone(),
                    exec_id: exec_id.unwrap_or_default(),
                    signal,
                    all,
                })
                .await
                .map_err(rpc(&format!("kill {id}")))?;
            Ok(0)
        }
        Command::Rm { force, ids } => {
            let mut failed = false;
            for id in ids {
                if let Err(e) = remove(&client, &id, force).await {
                    let _ = writeln!(std::io::stderr(), "yard: {e:#}");
                    failed = true;
                }
            }
            Ok(u8::from(failed))
        }
        Command::Exec(args) => exec(&client, args).await,
        Command::Events { json, filters } => watch_events(&client, json, filters).await.map(|()| 0),
        Command::Info { json } => info(&client, &cli.address, json).await.map(|()| 0),
        Command::Pull {
            reference,
            platform,
            user,
            plain_http,
            quiet,
        } => images::pull(
            &client,
            images::PullArgs {
                reference,
                platform,
                user,
                plain_http,
                quiet,
            },
        )
        .await
        .map(|()| 0),
        Command::Images { json, quiet } | Command::Image(ImageCommand::Ls { json, quiet }) => {
            images::list(&client, json, quiet).await.map(|()| 0)
        }
        Command::Rmi { names } | Command::Image(ImageCommand::Rm { names }) => {
            images::remove(&client, names).await.map(|()| 0)
        }
        Command::Image(ImageCommand::Import { file, name, quiet }) => {
            images::import(&client, &file, name, quiet)
                .await
                .map(|()| 0)
        }
        Command::Image(ImageCommand::Prune) => images::prune(&client).await.map(|()| 0),
    }
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

/// Runs a created process to its end: wait, start, copy IO, return the exit status.
async fn attach_and_run(
    client: &Client,
    id: &str,
    exec_id: &str,
    fifos: &mut io::Fifos,
    mut closed_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    tty: bool,
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
    client
        .tasks()
        .start(tasks::StartRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        })
        .await
        .map_err(rpc(&format!("start {id}")))?;
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

async fn run_task(client: &Client, mut a: RunArgs) -> anyhow::Result<u8> {
    check_env(&a.env)?;
    let id = a.name.clone().unwrap_or_else(random_id);
    let mut from_image = None;
    let rootfs = match (&a.rootfs, &a.image) {
        (Some(dir), _) => {
            if a.command.is_empty() {
                bail!("a command is required with --rootfs (yard run --rootfs DIR -- CMD...)");
            }
            let rootfs =
                std::fs::canonicalize(dir).with_context(|| format!("rootfs {}", dir.display()))?;
            if !rootfs.is_dir() {
                bail!("rootfs {}: not a directory", rootfs.display());
            }
            rootfs
        }
        (None, Some(image)) => {
            let p = images::prepare(client, image, &id, a.runtime.as_deref()).await?;
            if a.runtime.is_none() && p.wasm {
                a.runtime = Some("wasm".to_owned());
            }
            from_image = Some(p);
            PathBuf::from("rootfs")
        }
        (None, None) => bail!("give an image or --rootfs"),
    };
    let (args, env, cwd, user) = match &from_image {
        None => (a.command.clone(), a.env.clone(), a.cwd.clone(), (0, 0)),
        Some(p) => {
            let mut args = p.entrypoint.clone();
            if a.command.is_empty() {
                args.extend(p.cmd.iter().cloned());
            } else {
                args.extend(a.command.iter().cloned());
            }
            if args.is_empty() {
                images::release(client, &id).await;
                bail!(
                    "image {} has no Entrypoint or Cmd: give a command after --",
                    p.image
                );
            }
            let cwd = a
                .cwd
                .clone()
                .or_else(|| (!p.working_dir.is_empty()).then(|| p.working_dir.clone()));
            (args, merge_env(&p.env, &a.env), cwd, (p.uid, p.gid))
        }
    };
    let spec = spec::spec(&spec::SpecOptions {
        namespace: &client.namespace,
        id: &id,
        args: &args,
        env: &env,
        cwd: cwd.as_deref(),
        rootfs: &rootfs,
        user,
        terminal: a.tty,
        hostname: a.hostname.as_deref(),
        net_host: a.net_host,
        read_only: a.read_only,
        memory: a.memory,
        pids_limit: a.pids_limit,
        annotations: &a.annotations,
    });
    let container = containers::Container {
        id: id.clone(),
        runtime: Some(containers::container::Runtime {
            name: a.runtime.clone().unwrap_or_default(),
            options: None,
        }),
        spec: Some(json_any(OCI_SPEC, serde_json::to_vec(&spec)?)),
        image: from_image
            .as_ref()
            .map(|p| p.image.clone())
            .unwrap_or_default(),
        snapshotter: from_image
            .as_ref()
            .map(|p| p.snapshotter.clone())
            .unwrap_or_default(),
        snapshot_key: from_image
            .as_ref()
            .filter(|p| !p.snapshotter.is_empty())
            .map(|_| id.clone())
            .unwrap_or_default(),
        ..Default::default()
    };
    let created = client
        .containers()
        .create(containers::CreateContainerRequest {
            container: Some(container),
        })
        .await
        .map_err(rpc(&format!("create container {id}")));
    if let Err(e) = created {
        if from_image.is_some() {
            images::release(client, &id).await;
        }
        return Err(e);
    }
    let mounts = from_image.map(|p| p.mounts).unwrap_or_default();

    let result = create_and_run(client, &a, &id, &mounts).await;
    // A detached task outlives this command unless it could not start.
    if a.rm && (!a.detach || result.is_err()) {
        cleanup(client, &id).await;
    }
    result
}

/// The image's environment with `--env` values replacing the same keys.
fn merge_env(image: &[String], flags: &[String]) -> Vec<String> {
    let key = |e: &String| {
        e.split_once('=')
            .map(|(k, _)| k.to_owned())
            .unwrap_or_default()
    };
    let overridden: std::collections::HashSet<String> = flags.iter().map(key).collect();
    image
        .iter()
        .filter(|e| !overridden.contains(&key(e)))
        .chain(flags)
        .cloned()
        .collect()
}

async fn create_and_run(
    client: &Client,
    a: &RunArgs,
    id: &str,
    rootfs: &[switchyard_api::containerd::types::Mount],
) -> anyhow::Result<u8> {
    if a.detach {
        let stdout = match &a.log {
            Some(p) => {
                let p = if p.is_absolute() {
                    p.clone()
                } else {
                    std::env::current_dir()?.join(p)
                };
                format!("file://{}", p.display())
            }
            None => String::new(),
        };
        client
            .tasks()
            .create(tasks::CreateTaskRequest {
                container_id: id.to_owned(),
                terminal: false,
                stdout: stdout.clone(),
                stderr: stdout,
                rootfs: rootfs.to_vec(),
                ..Default::default()
            })
            .await
            .map_err(rpc(&format!("create task {id}")))?;
        client
            .tasks()
            .start(tasks::StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            })
            .await
            .map_err(rpc(&format!("start {id}")))?;
        writeln!(std::io::stdout(), "{id}")?;
        return Ok(0);
    }
    let mut fifos = io::Fifos::new(id, a.interactive || a.tty, a.tty)?;
    // The shim opens the fifos during Create and waits for our ends.
    let closed_rx = fifos.start();
    let created = client
        .tasks()
        .create(tasks::CreateTaskRequest {
            container_id: id.to_owned(),
            stdin: fifos.stdin_uri(),
            stdout: fifos.stdout_uri(),
            stderr: fifos.stderr_uri(),
            terminal: a.tty,
            rootfs: rootfs.to_vec(),
            ..Default::default()
        })
        .await
        .map_err(rpc(&format!("create task {id}")));
    if let Err(e) = created {
        fifos.drain(Duration::ZERO);
        return Err(e);
    }
    let status = attach_and_run(client, id, "", &mut fifos, closed_rx, a.tty).await?;
    Ok(exit_code(status))
}

/// Best-effort removal of a `--rm` task and container.
async fn cleanup(client: &Client, id: &str) {
    let _ = client
        .tasks()
        .delete(tasks::DeleteTaskRequest {
            container_id: id.to_owned(),
        })
        .await;
    if let Err(e) = client
        .containers()
        .delete(containers::DeleteContainerRequest { id: id.to_owned() })
        .await
        && e.code() != tonic::Code::NotFound
    {
        let _ = writeln!(std::io::stderr(), "yard: remove {id}: {}", e.message());
    }
}

async fn remove(client: &Client, id: &str, force: bool) -> anyhow::Result<()> {
    let task = client
        .tasks()
        .get(tasks::GetRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        })
        .await;
    match task {
        Ok(t) => {
            let p = t.into_inner().process.unwrap_or_default();
            let stopped = matches!(
                Status::try_from(p.status),
                Ok(Status::Stopped | Status::Created | Status::Unknown)
            );
            if !stopped && p.status != Status::Created as i32 {
                if !force {
                    bail!(
                        "{id}: task is {}; stop it first (yard kill {id}) or use --force",
                        status_name(p.status)
                    );
                }
                let mut waiter = client.tasks();
                let req = tasks::WaitRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                };
                let wait = tokio::spawn(async move { waiter.wait(req).await });
                client
                    .tasks()
                    .kill(tasks::KillRequest {
                        container_id: id.to_owned(),
                        exec_id: String::new(),
                        signal: nix::sys::signal::Signal::SIGKILL as u32,
                        all: true,
                    })
                    .await
                    .map_err(rpc(&format!("kill {id}")))?;
                let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
            }
            client
                .tasks()
                .delete(tasks::DeleteTaskRequest {
                    container_id: id.to_owned(),
                })
                .await
                .map_err(rpc(&format!("delete task {id}")))?;
        }
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(rpc(&format!("task {id}"))(s)),
    }
    client
        .containers()
        .delete(containers::DeleteContainerRequest { id: id.to_owned() })
        .await
        .map_err(rpc(&format!("remove {id}")))?;
    Ok(())
}

async fn exec(client: &Client, a: ExecArgs) -> anyhow::Result<u8> {
    check_env(&a.env)?;
    let container = client
        .containers()
        .get(containers::GetContainerRequest { id: a.id.clone() })
        .await
        .map_err(rpc(&format!("container {}", a.id)))?
        .into_inner()
        .container
        .unwrap_or_default();
    // Start from the container's own process (user, env, capabilities), then apply the flags.
    let spec: serde_json::Value = container
        .spec
        .as_ref()
        .and_then(|s| serde_json::from_slice(&s.value).ok())
        .unwrap_or_default();
    let mut process = spec
        .get("process")
        .cloned()
        .unwrap_or_else(|| spec::process(&[], &[], None, false, (0, 0)));
    process["args"] = serde_json::json!(a.command);
    process["terminal"] = serde_json::json!(a.tty);
    if let Some(cwd) = &a.cwd {
        process["cwd"] = serde_json::json!(cwd);
    }
    if !a.env.is_empty() {
        let mut env: Vec<String> = process["env"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        env.extend(a.env.iter().cloned());
        process["env"] = serde_json::json!(env);
    }
    let exec_id = a.exec_id.clone().unwrap_or_else(random_id);
    let mut fifos = io::Fifos::new(
        &format!("{}-{exec_id}", a.id),
        a.interactive || a.tty,
        a.tty,
    )?;
    let closed_rx = fifos.start();
    let execd = client
        .tasks()
        .exec(tasks::ExecProcessRequest {
            container_id: a.id.clone(),
            stdin: fifos.stdin_uri(),
            stdout: fifos.stdout_uri(),
            stderr: fifos.stderr_uri(),
            terminal: a.tty,
            spec: Some(json_any(OCI_PROCESS, serde_json::to_vec(&process)?)),
            exec_id: exec_id.clone(),
        })
        .await
        .map_err(rpc(&format!("exec in {}", a.id)));
    if let Err(e) = execd {
        fifos.drain(Duration::ZERO);
        return Err(e);
    }
    let status = attach_and_run(client, &a.id, &exec_id, &mut fifos, closed_rx, a.tty).await;
    let _ = client
        .tasks()
        .delete_process(tasks::DeleteProcessRequest {
            container_id: a.id.clone(),
            exec_id,
        })
        .await;
    Ok(exit_code(status?))
}

async fn ps(client: &Client, json: bool) -> anyhow::Result<()> {
    let cs = client
        .containers()
        .list(containers::ListContainersRequest { filters: vec![] })
        .await
        .map_err(rpc("list containers"))?
        .into_inner()
        .containers;
    let ts = client
        .tasks()
        .list(tasks::ListTasksRequest {
            filter: String::new(),
        })
        .await
        .map_err(rpc("list tasks"))?
        .into_inner()
        .tasks;
    let rows: Vec<serde_json::Value> = cs
        .iter()
        .map(|c| {
            let t = ts.iter().find(|t| t.container_id == c.id);
            serde_json::json!({
                "id": c.id,
                "runtime": c.runtime.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
                "status": t.map(|t| status_name(t.status)).unwrap_or_else(|| "no task".to_owned()),
                "pid": t.map(|t| t.pid).unwrap_or(0),
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<28} {:<10} {:>8}",
        "CONTAINER", "RUNTIME", "STATUS", "PID"
    )?;
    for r in rows {
        let pid = r["pid"].as_u64().unwrap_or(0);
        writeln!(
            out,
            "{:<24} {:<28} {:<10} {:>8}",
            r["id"].as_str().unwrap_or_default(),
            r["runtime"].as_str().unwrap_or_default(),
            r["status"].as_str().unwrap_or_default(),
            if pid == 0 {
                "-".to_owned()
            } else {
                pid.to_string()
            }
        )?;
    }
    Ok(())
}

async fn watch_events(client: &Client, json: bool, filters: Vec<String>) -> anyhow::Result<()> {
    let mut stream = client
        .events()
        .subscribe(events::SubscribeRequest { filters })
        .await
        .map_err(rpc("subscribe"))?
        .into_inner();
    while let Some(env) = stream.next().await {
        let env = env.map_err(rpc("events"))?;
        let ts = switchyard_api::events::time(&env.timestamp);
        let event = env.event.as_ref();
        let fields = event.and_then(switchyard_api::events::to_json);
        let mut out = std::io::stdout().lock();
        if json {
            let line = serde_json::json!({
                "timestamp": ts,
                "namespace": env.namespace,
                "topic": env.topic,
                "type": event.map(|e| e.type_url.clone()).unwrap_or_default(),
                "event": fields,
            });
            writeln!(out, "{line}")?;
        } else {
            let text = match fields {
                Some(serde_json::Value::Object(m)) => m
                    .iter()
                    .filter(|(_, v)| !matches!(v, serde_json::Value::String(s) if s.is_empty()))
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => event.map(|e| e.type_url.clone()).unwrap_or_default(),
            };
            writeln!(out, "{ts} {} {} {text}", env.namespace, env.topic)?;
        }
        out.flush()?;
    }
    Ok(())
}

async fn info(client: &Client, address: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let version = client
        .version()
        .version(())
        .await
        .map_err(rpc("version"))?
        .into_inner();
    let server = client
        .introspection()
        .server(())
        .await
        .map_err(rpc("server"))?
        .into_inner();
    let plugins = client
        .introspection()
        .plugins(introspection::PluginsRequest {
            filters: vec!["type==io.switchyard.runtime.v1".to_owned()],
        })
        .await
        .map_err(rpc("plugins"))?
        .into_inner()
        .plugins;
    let runtimes: Vec<serde_json::Value> = plugins
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.id,
                "runtime_type": p.exports.get("runtime_type").cloned().unwrap_or_default(),
                "default": p.exports.get("default").is_some_and(|d| d == "true"),
                "shim": p.exports.get("binary").cloned(),
                "error": p.init_err.as_ref().map(|e| e.message.clone()),
                "vm": vm_fields(&p.exports),
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "address": address.display().to_string(),
            "version": version.version,
            "revision": version.revision,
            "uuid": server.uuid,
            "pid": server.pid,
            "runtimes": runtimes,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "switchyardd {} (pid {}) at {}",
        version.version,
        server.pid,
        address.display()
    )?;
    writeln!(out, "server uuid {}", server.uuid)?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<10} {:<30} {:<8} SHIM",
        "RUNTIME", "TYPE", "DEFAULT"
    )?;
    for r in runtimes {
        let shim = match (r["shim"].as_str(), r["error"].as_str()) {
            (Some(path), _) => path.to_owned(),
            (None, Some(err)) => format!("not available: {err}"),
            _ => "-".to_owned(),
        };
        writeln!(
            out,
            "{:<10} {:<30} {:<8} {}",
            r["name"].as_str().unwrap_or_default(),
            r["runtime_type"].as_str().unwrap_or_default(),
            if r["default"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                ""
            },
            shim
        )?;
    }
    let runtimes_with_vm = plugins
        .iter()
        .filter(|p| p.exports.keys().any(|k| k.starts_with("vm.")));
    for p in runtimes_with_vm {
        writeln!(out)?;
        writeln!(out, "runtime {} (microVM):", p.id)?;
        if let serde_json::Value::Object(m) = vm_fields(&p.exports) {
            for (k, v) in m {
                writeln!(out, "  {k:<28} {}", v.as_str().unwrap_or_default())?;
            }
        }
    }
    Ok(())
}

/// The vm shim's report on this host (`vm.*` exports): backend, accelerator, whether hardware
/// virtualization is there and whether /dev/kvm is PVM, the guest files.
fn vm_fields(exports: &std::collections::HashMap<String, String>) -> serde_json::Value {
    let mut fields: Vec<(&String, &String)> = exports
        .iter()
        .filter(|(k, _)| k.starts_with("vm."))
        .collect();
    if fields.is_empty() {
        return serde_json::Value::Null;
    }
    fields.sort();
    serde_json::Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| {
                (
                    k["vm.".len()..].to_owned(),
                    serde_json::Value::String(v.clone()),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("NOPE").is_err());
    }

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
