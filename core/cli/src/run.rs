//! `yard run`: the container (from an image or a root directory), its task, and its stdio.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use switchyard_api::client::{REMOVE_HEADER, REMOVE_LABEL, START_HEADER, flag, set_flag};
use switchyard_api::containerd::services::containers::v1 as containers;
use switchyard_api::containerd::services::tasks::v1 as tasks;
use switchyard_api::typeurl::{OCI_SPEC, json_any};

use crate::client::{Client, rpc};
use crate::process::{Start, attach_and_run, check_env, exit_code, random_id};
use crate::{images, io, spec};

#[derive(Args)]
pub struct RunArgs {
    /// Runtime name from switchyardd's config (native, vm, wasm, runc), or a runtime type.
    #[arg(long)]
    runtime: Option<String>,
    /// Remove the container when the task exits (it is labelled io.switchyard.rm=true, and
    /// switchyardd removes it at its next start should a crash keep it).
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

pub async fn run(client: &Client, mut a: RunArgs) -> anyhow::Result<u8> {
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
        // Removed with its task below: switchyardd need not wait for the disk to record it.
        labels: if a.rm && !a.detach {
            [(REMOVE_LABEL.to_owned(), "true".to_owned())].into()
        } else {
            Default::default()
        },
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
        let req = tasks::CreateTaskRequest {
            container_id: id.to_owned(),
            terminal: false,
            stdout: stdout.clone(),
            stderr: stdout,
            rootfs: rootfs.to_vec(),
            ..Default::default()
        };
        let started = create_task(client, req, true)
            .await
            .map_err(rpc(&format!("create task {id}")))?;
        if !started {
            client
                .tasks()
                .start(tasks::StartRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                })
                .await
                .map_err(rpc(&format!("start {id}")))?;
        }
        writeln!(std::io::stdout(), "{id}")?;
        return Ok(0);
    }
    let mut fifos = io::Fifos::new(id, a.interactive || a.tty, a.tty)?;
    // The shim opens the fifos during Create and waits for our ends.
    let closed_rx = fifos.start();
    let req = tasks::CreateTaskRequest {
        container_id: id.to_owned(),
        stdin: fifos.stdin_uri(),
        stdout: fifos.stdout_uri(),
        stderr: fifos.stderr_uri(),
        terminal: a.tty,
        rootfs: rootfs.to_vec(),
        ..Default::default()
    };
    // Without a terminal switchyardd starts the task in the same call. With one, `yard` makes
    // the terminal raw first and sends Start itself.
    let created = create_task(client, req, !a.tty)
        .await
        .map_err(rpc(&format!("create task {id}")));
    let started = match created {
        Ok(started) => started,
        Err(e) => {
            fifos.drain(Duration::ZERO);
            return Err(e);
        }
    };
    let start = if started { Start::Done } else { Start::Send };
    let status = attach_and_run(client, id, "", &mut fifos, closed_rx, a.tty, start).await?;
    Ok(exit_code(status))
}

/// Tasks.Create; with `start`, switchyardd is asked to start the task in the same call
/// (`switchyard-start`). True when the answer says it did (containerd's never does: the caller
/// sends Start then).
async fn create_task(
    client: &Client,
    req: tasks::CreateTaskRequest,
    start: bool,
) -> Result<bool, tonic::Status> {
    let mut req = tonic::Request::new(req);
    if start {
        set_flag(req.metadata_mut(), START_HEADER);
    }
    let r = client.tasks().create(req).await?;
    Ok(start && flag(r.metadata(), START_HEADER))
}

/// Best-effort removal of a `--rm` task and container: both in one call to switchyardd
/// (`switchyard-remove-container`), the container on its own where the answer says it is not
/// gone (containerd; or the task's delete failed).
async fn cleanup(client: &Client, id: &str) {
    let mut delete = tonic::Request::new(tasks::DeleteTaskRequest {
        container_id: id.to_owned(),
    });
    set_flag(delete.metadata_mut(), REMOVE_HEADER);
    let removed = client
        .tasks()
        .delete(delete)
        .await
        .is_ok_and(|r| flag(r.metadata(), REMOVE_HEADER));
    if removed {
        return;
    }
    if let Err(e) = client
        .containers()
        .delete(containers::DeleteContainerRequest { id: id.to_owned() })
        .await
        && e.code() != tonic::Code::NotFound
    {
        let _ = writeln!(std::io::stderr(), "yard: remove {id}: {}", e.message());
    }
}
