//! `yard info`: the daemon, its runtimes, and whether each runtime's shim is installed.

use std::io::Write;

use switchyard_api::containerd::services::introspection::v1 as introspection;

use crate::client::{Client, rpc};

pub async fn info(client: &Client, address: &std::path::Path, json: bool) -> anyhow::Result<()> {
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
    let cri = cri_status(client).await;
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "address": address.display().to_string(),
            "version": version.version,
            "revision": version.revision,
            "uuid": server.uuid,
            "pid": server.pid,
            "runtimes": runtimes,
            "cri": cri,
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
    writeln!(out)?;
    match cri.get("error") {
        Some(e) => writeln!(
            out,
            "CRI: not served here: {}",
            e.as_str().unwrap_or_default()
        )?,
        None => {
            writeln!(
                out,
                "CRI: unix://{} (kubelet --container-runtime-endpoint)",
                address.display()
            )?;
            let handlers: Vec<&str> = cri["handlers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str())
                .map(|h| if h.is_empty() { "(default)" } else { h })
                .collect();
            writeln!(out, "  handlers: {}", handlers.join(", "))?;
            for c in cri["conditions"].as_array().into_iter().flatten() {
                let ok = c["status"].as_bool().unwrap_or(false);
                let mut line = format!(
                    "  {}: {}",
                    c["type"].as_str().unwrap_or_default(),
                    if ok { "yes" } else { "no" }
                );
                if !ok {
                    line.push_str(&format!(
                        " ({}: {})",
                        c["reason"].as_str().unwrap_or_default(),
                        c["message"].as_str().unwrap_or_default()
                    ));
                }
                writeln!(out, "{line}")?;
            }
        }
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

/// CRI's status on the same socket: the handlers and the runtime and network conditions (CNI
/// state), or why it cannot be asked.
async fn cri_status(client: &Client) -> serde_json::Value {
    use switchyard_api::cri::v1 as cri;
    match client
        .cri_runtime()
        .status(cri::StatusRequest { verbose: false })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            serde_json::json!({
                "handlers": r.runtime_handlers.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
                "conditions": r.status.map(|s| s.conditions).unwrap_or_default().iter().map(|c| {
                    serde_json::json!({
                        "type": c.r#type,
                        "status": c.status,
                        "reason": c.reason,
                        "message": c.message,
                    })
                }).collect::<Vec<_>>(),
            })
        }
        Err(e) => serde_json::json!({ "error": e.message() }),
    }
}
