//! `switchyardd`: run the daemon, print its default configuration, or (as a shim's
//! `-publish-binary`) publish one event.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyardd::config::{Config, DEFAULT_TOML};

#[derive(Parser)]
#[command(
    name = "switchyardd",
    version,
    about = "Switchyard daemon: containerd's API, routing tasks to shims by runtime type"
)]
struct Cli {
    /// Configuration file, laid over the embedded default (see `switchyardd config default`).
    #[arg(long, short = 'c', global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); overrides the config's log.level.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// gRPC address, for `publish` (shims pass the address they were given).
    #[arg(long, global = true)]
    address: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        what: ConfigCmd,
    },
    /// Publish an event read from stdin (a protobuf Any), as containerd's `publish` does.
    Publish {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the embedded default configuration.
    Default,
    /// Check a configuration (--config, or the default) and print where it puts things.
    Check,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default_config()?,
    })
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            // libcgroups logs each controller it finds missing, at every read of a pod's cgroup.
            "{level},h2=info,hyper=info,hyper_util=info,tower=info,tonic=info,libcgroups=error"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn publish(address: PathBuf, topic: String, namespace: String) -> anyhow::Result<()> {
    use prost::Message;
    use switchyard_api::containerd::services::events::v1::{
        PublishRequest, events_client::EventsClient,
    };
    let mut payload = Vec::new();
    std::io::stdin()
        .read_to_end(&mut payload)
        .context("read event from stdin")?;
    let event = prost_types::Any::decode(payload.as_slice()).context("decode event")?;
    let channel = switchyard_api::client::connect(&address)
        .await
        .with_context(|| format!("connect to {}", address.display()))?;
    let ns = switchyard_api::client::WithNamespace::new(&namespace)
        .with_context(|| format!("namespace {namespace:?}"))?;
    EventsClient::with_interceptor(channel, ns)
        .publish(PublishRequest {
            topic,
            event: Some(event),
        })
        .await
        .map_err(|s| anyhow::anyhow!("publish: {}", s.message()))?;
    Ok(())
}

/// A user error prints `error: a: b: c` and exits 1 (never anyhow's backtrace).
fn main() -> std::process::ExitCode {
    // Before anything is created: nothing the daemon writes is readable by other users unless
    // it says so (docs/operations.md). Shims start with 022 (`sys::spawn::SHIM_UMASK`) and set
    // their own.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    switchyardd::sys::spawn::raise_nofile_limit();
    switchyard_base::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    match cli.command {
        Some(Command::Config {
            what: ConfigCmd::Default,
        }) => {
            std::io::stdout().write_all(DEFAULT_TOML.as_bytes())?;
            Ok(())
        }
        Some(Command::Config {
            what: ConfigCmd::Check,
        }) => {
            let c = load_config(cli.config.as_ref())?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "ok: root {} state {} api {} events {}",
                c.root.display(),
                c.state.display(),
                c.grpc_address.display(),
                c.ttrpc_address.display()
            )?;
            for (name, r) in &c.runtimes {
                let default = if *name == c.default_runtime {
                    " (default)"
                } else {
                    ""
                };
                writeln!(out, "runtime {name}: {}{default}", r.runtime_type)?;
            }
            if let Some(dir) = &c.registry_config_path {
                if dir.exists() {
                    let hosts = switchyard_images::RegistryHosts::new(dir);
                    let names = hosts.check().with_context(|| {
                        format!("images.registry_config_path {}", dir.display())
                    })?;
                    writeln!(
                        out,
                        "registry hosts {}: {}",
                        dir.display(),
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(" ")
                        }
                    )?;
                } else {
                    writeln!(
                        out,
                        "registry hosts {}: no such directory (pulls go to the registry each image names)",
                        dir.display()
                    )?;
                }
            }
            Ok(())
        }
        Some(Command::Publish { topic, namespace }) => {
            let address = cli.address.context("publish needs --address")?;
            rt.block_on(publish(address, topic, namespace))
        }
        None => {
            let config = load_config(cli.config.as_ref())?;
            init_logging(cli.log_level.as_deref().unwrap_or(&config.log_level));
            let armed = switchyardd::failpoints::install()?;
            if !armed.is_empty() {
                tracing::warn!(points = ?armed, "failpoints armed ({})", switchyardd::failpoints::ENV);
            }
            std::panic::set_hook(Box::new(|info| {
                tracing::error!(panic = %info, "switchyardd panicked");
            }));
            Ok(rt.block_on(switchyardd::daemon::run(config, shutdown_signal()))?)
        }
    }
}
