//! `yard exec`: another process in a running task, starting from the container's own process.

use std::time::Duration;

use clap::Args;
use switchyard_api::containerd::services::containers::v1 as containers;
use switchyard_api::containerd::services::tasks::v1 as tasks;
use switchyard_api::typeurl::{OCI_PROCESS, json_any};

use crate::client::{Client, rpc};
use crate::process::{Start, attach_and_run, check_env, exit_code, random_id};
use crate::{io, spec};

#[derive(Args)]
pub struct ExecArgs {
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

pub async fn exec(client: &Client, a: ExecArgs) -> anyhow::Result<u8> {
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
    let status = attach_and_run(
        client,
        &a.id,
        &exec_id,
        &mut fifos,
        closed_rx,
        a.tty,
        Start::Send,
    )
    .await;
    let _ = client
        .tasks()
        .delete_process(tasks::DeleteProcessRequest {
            container_id: a.id.clone(),
            exec_id,
        })
        .await;
    Ok(exit_code(status?))
}
