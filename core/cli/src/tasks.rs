//! `yard ps`, `yard kill`, `yard rm`: the tasks and containers of a namespace.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use switchyard_api::containerd::services::containers::v1 as containers;
use switchyard_api::containerd::services::tasks::v1 as tasks;
use switchyard_api::containerd::v1::types::Status;

use crate::client::{Client, rpc};

#[derive(Args)]
pub struct KillArgs {
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
}

#[derive(Args)]
pub struct RmArgs {
    /// Kill a running task first.
    #[arg(long, short = 'f')]
    force: bool,
    #[arg(required = true)]
    ids: Vec<String>,
}

pub async fn kill(client: &Client, a: KillArgs) -> anyhow::Result<()> {
    let signal = parse_signal(&a.signal)?;
    client
        .tasks()
        .kill(tasks::KillRequest {
            container_id: a.id.clone(),
            exec_id: a.exec_id.unwrap_or_default(),
            signal,
            all: a.all,
        })
        .await
        .map_err(rpc(&format!("kill {}", a.id)))?;
    Ok(())
}

/// Removes each container in turn; returns 1 if any could not be removed (each is reported).
pub async fn rm(client: &Client, a: RmArgs) -> u8 {
    let mut failed = false;
    for id in a.ids {
        if let Err(e) = remove(client, &id, a.force).await {
            let _ = writeln!(std::io::stderr(), "yard: {e:#}");
            failed = true;
        }
    }
    u8::from(failed)
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

pub async fn ps(client: &Client, json: bool) -> anyhow::Result<()> {
    // Streamed, one container per message, as containerd's own client lists them: a container
    // record carries its OCI spec, so 10,000 of them are larger than one message may be.
    let mut stream = client
        .containers()
        .list_stream(containers::ListContainersRequest { filters: vec![] })
        .await
        .map_err(rpc("list containers"))?
        .into_inner();
    let mut cs = Vec::new();
    while let Some(m) = stream.message().await.map_err(rpc("list containers"))? {
        cs.extend(m.container);
    }
    let ts: HashMap<String, _> = client
        .tasks()
        .list(tasks::ListTasksRequest {
            filter: String::new(),
        })
        .await
        .map_err(rpc("list tasks"))?
        .into_inner()
        .tasks
        .into_iter()
        .map(|t| (t.container_id.clone(), t))
        .collect();
    let rows: Vec<serde_json::Value> = cs
        .iter()
        .map(|c| {
            let t = ts.get(&c.id);
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
}
