//! `yard events`: the daemon's event stream, as text or JSON lines.

use std::io::Write;

use futures::StreamExt;
use switchyard_api::containerd::services::events::v1 as events;

use crate::client::{Client, rpc};

pub async fn watch(client: &Client, json: bool, filters: Vec<String>) -> anyhow::Result<()> {
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
