//! `yard cri …`: a crictl-like client of Kubernetes' CRI (`runtime.v1`), for any CRI endpoint:
//! containerd's CRI plugin (`--address /run/containerd/containerd.sock`) and switchyardd's.
//! Pods and containers are made from flags rather than crictl's JSON files; `yard cri run`
//! makes a pod and starts one container in it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use switchyard_api::cri::v1 as cri;
use switchyard_api::cri::v1::image_service_client::ImageServiceClient;
use switchyard_api::cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::client::rpc;
use crate::stream::{self, PortPair, Transport};

/// How long one CRI call may take (an image pull excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Subcommand)]
pub enum CriCommand {
    /// The runtime's name and versions.
    Version,
    /// The runtime's conditions and handlers.
    Status,
    /// Make a pod (RunPodSandbox); prints its id.
    Runp(PodArgs),
    /// List pods.
    Pods {
        /// Ids only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// A pod's status.
    Inspectp { pod: String },
    /// Stop pods (their containers and network).
    Stopp {
        #[arg(required = true)]
        pods: Vec<String>,
    },
    /// Remove pods (stopping them first).
    Rmp {
        #[arg(required = true)]
        pods: Vec<String>,
    },
    /// Create a container in a pod; prints its id.
    Create {
        pod: String,
        #[command(flatten)]
        container: ContainerArgs,
    },
    /// Make a pod, create a container in it and start it; prints both ids.
    Run {
        #[command(flatten)]
        pod: PodArgs,
        #[command(flatten)]
        container: ContainerArgs,
    },
    /// Start created containers.
    Start {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Stop containers.
    Stop {
        /// Seconds before the container is killed.
        #[arg(long, short = 't', default_value_t = 10)]
        timeout: i64,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove containers.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List containers (running ones unless --all).
    Ps {
        #[arg(long, short = 'a')]
        all: bool,
        /// Only this pod's.
        #[arg(long, short = 'p')]
        pod: Option<String>,
        /// Ids only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// A container's status.
    Inspect { id: String },
    /// Run a command in a container and wait for it; exits with its status. Without -i and
    /// -t a single call (ExecSync); with either, a session on the runtime's streaming server.
    Exec {
        /// Seconds the command may run (0: no limit; ExecSync only).
        #[arg(long, default_value_t = 0)]
        timeout: i64,
        #[command(flatten)]
        stream: StreamArgs,
        id: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Attach to a container's main process (its stdio); exits with its status.
    Attach {
        #[command(flatten)]
        stream: StreamArgs,
        id: String,
    },
    /// Forward local ports to ports in a pod: `LOCAL:REMOTE` (or `PORT` for both), listening
    /// on 127.0.0.1 until interrupted.
    PortForward {
        #[command(flatten)]
        transport: TransportArg,
        pod: String,
        #[arg(required = true)]
        ports: Vec<PortPair>,
    },
    /// A container's output, from its CRI log file.
    Logs { id: String },
    /// Containers' CPU and memory use.
    Stats { ids: Vec<String> },
    /// List images.
    Images {
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Pull an image.
    Pull { image: String },
    /// Remove images.
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

/// An exec or attach session on the streaming server.
#[derive(Args)]
pub struct StreamArgs {
    /// Send this process's stdin (attach: the container must have been made with -i).
    #[arg(long, short = 'i')]
    stdin: bool,
    /// A terminal (the local one is put in raw mode; attach: the container must have one).
    #[arg(long, short = 't')]
    tty: bool,
    #[command(flatten)]
    transport: TransportArg,
}

/// How a streaming session is carried.
#[derive(Args)]
pub struct TransportArg {
    /// SPDY/3.1 (as kubelet) or WebSocket (as kubectl since Kubernetes 1.30).
    #[arg(long, value_enum, default_value = "spdy")]
    transport: Transport,
    /// For a TLS streaming server (an https:// URL): trust the CA certificates in this PEM file
    /// instead of the system's roots.
    #[arg(long, value_name = "PEM")]
    stream_ca: Option<std::path::PathBuf>,
}

impl TransportArg {
    /// The transport, with `--stream-ca` in effect.
    fn chosen(&self) -> Transport {
        if let Some(ca) = &self.stream_ca {
            crate::stream::http::trust(ca);
        }
        self.transport
    }
}

#[derive(Args)]
pub struct PodArgs {
    /// The pod's name.
    #[arg(id = "pod_name", long = "pod-name", default_value = "yard-pod")]
    name: String,
    /// The pod's Kubernetes namespace.
    #[arg(
        id = "pod_namespace",
        long = "pod-namespace",
        default_value = "default"
    )]
    namespace: String,
    /// The pod's uid (default: a new one).
    #[arg(long)]
    uid: Option<String>,
    /// The RuntimeClass handler (empty: the runtime's default).
    #[arg(long, short = 'r', default_value = "")]
    runtime: String,
    /// The pod's hostname (default: its name).
    #[arg(long)]
    hostname: Option<String>,
    /// Where the pod's container logs go.
    #[arg(long, default_value = "/var/log/pods/yard")]
    log_dir: PathBuf,
    /// Put the pod on the node's network (`hostNetwork: true`: no CNI).
    #[arg(long)]
    host_network: bool,
}

#[derive(Args)]
pub struct ContainerArgs {
    /// The container's name.
    #[arg(long, default_value = "main")]
    name: String,
    /// Environment, `KEY=VALUE` (repeatable).
    #[arg(long, short = 'e')]
    env: Vec<String>,
    /// A host path in the container, `HOST:CONTAINER[:ro]` (repeatable).
    #[arg(long, short = 'v')]
    mount: Vec<String>,
    /// Give the container a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Keep the container's stdin open.
    #[arg(long, short = 'i')]
    stdin: bool,
    image: String,
    /// The command (default: the image's).
    #[arg(last = true)]
    cmd: Vec<String>,
}

struct Cri {
    rs: RuntimeServiceClient<Channel>,
    is: ImageServiceClient<Channel>,
}

/// Runs a `yard cri` command against the CRI endpoint at `address`; the exit status.
pub async fn run(address: &Path, cmd: CriCommand) -> anyhow::Result<u8> {
    let channel = switchyard_api::client::connect(address)
        .await
        .with_context(|| format!("cannot reach a CRI endpoint at {}", address.display()))?;
    let mut c = Cri {
        rs: RuntimeServiceClient::new(channel.clone()),
        is: ImageServiceClient::new(channel),
    };
    Box::pin(c.command(cmd)).await
}

/// A request with the call deadline.
fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

impl Cri {
    async fn command(&mut self, cmd: CriCommand) -> anyhow::Result<u8> {
        match cmd {
            CriCommand::Version => self.version().await?,
            CriCommand::Status => self.status().await?,
            CriCommand::Runp(pod) => {
                let id = self.run_pod(&pod).await?;
                writeln!(std::io::stdout(), "{id}")?;
            }
            CriCommand::Pods { quiet } => self.pods(quiet).await?,
            CriCommand::Inspectp { pod } => self.inspect_pod(&pod).await?,
            CriCommand::Stopp { pods } => {
                for id in pods {
                    let r = cri::StopPodSandboxRequest { pod_sandbox_id: id };
                    self.rs
                        .stop_pod_sandbox(req(r))
                        .await
                        .map_err(rpc("StopPodSandbox"))?;
                }
            }
            CriCommand::Rmp { pods } => {
                for id in pods {
                    let r = cri::RemovePodSandboxRequest { pod_sandbox_id: id };
                    self.rs
                        .remove_pod_sandbox(req(r))
                        .await
                        .map_err(rpc("RemovePodSandbox"))?;
                }
            }
            CriCommand::Create { pod, container } => {
                let container = container_config(&container)?;
                let config = self.pod_config_of(&pod).await?;
                let id = Box::pin(self.create(&pod, &config, container)).await?;
                writeln!(std::io::stdout(), "{id}")?;
            }
            CriCommand::Run { pod, container } => {
                let container = container_config(&container)?;
                let config = pod_config(&pod);
                let pod_id = self.run_pod(&pod).await?;
                let id = Box::pin(self.create(&pod_id, &config, container)).await?;
                self.start(&id).await?;
                writeln!(std::io::stdout(), "{pod_id}\n{id}")?;
            }
            CriCommand::Start { ids } => {
                for id in ids {
                    self.start(&id).await?;
                }
            }
            CriCommand::Stop { timeout, ids } => {
                for id in ids {
                    let r = cri::StopContainerRequest {
                        container_id: id,
                        timeout,
                    };
                    self.rs
                        .stop_container(req(r))
                        .await
                        .map_err(rpc("StopContainer"))?;
                }
            }
            CriCommand::Rm { ids } => {
                for id in ids {
                    let r = cri::RemoveContainerRequest { container_id: id };
                    self.rs
                        .remove_container(req(r))
                        .await
                        .map_err(rpc("RemoveContainer"))?;
                }
            }
            CriCommand::Ps { all, pod, quiet } => self.ps(all, pod, quiet).await?,
            CriCommand::Inspect { id } => self.inspect(&id).await?,
            CriCommand::Exec {
                timeout,
                stream: s,
                id,
                cmd,
            } => {
                if !s.stdin && !s.tty {
                    return self.exec(&id, cmd, timeout).await;
                }
                let r = cri::ExecRequest {
                    container_id: id,
                    cmd,
                    tty: s.tty,
                    stdin: s.stdin,
                    stdout: true,
                    stderr: !s.tty,
                };
                let url = self.rs.exec(req(r)).await.map_err(rpc("Exec"))?;
                return remote_command(&url.into_inner().url, &s).await;
            }
            CriCommand::Attach { stream: s, id } => {
                let r = cri::AttachRequest {
                    container_id: id,
                    stdin: s.stdin,
                    tty: s.tty,
                    stdout: true,
                    stderr: !s.tty,
                };
                let url = self.rs.attach(req(r)).await.map_err(rpc("Attach"))?;
                return remote_command(&url.into_inner().url, &s).await;
            }
            CriCommand::PortForward {
                transport,
                pod,
                ports,
            } => port_forward(self.rs.clone(), transport.chosen(), pod, ports).await?,
            CriCommand::Logs { id } => self.logs(&id).await?,
            CriCommand::Stats { ids } => self.stats(ids).await?,
            CriCommand::Images { quiet } => self.images(quiet).await?,
            CriCommand::Pull { image } => {
                let r = cri::PullImageRequest {
                    image: Some(image_spec(&image)),
                    ..Default::default()
                };
                let mut r = tonic::Request::new(r);
                r.set_timeout(Duration::from_secs(3600));
                let got = self.is.pull_image(r).await.map_err(rpc("PullImage"))?;
                writeln!(std::io::stdout(), "{}", got.into_inner().image_ref)?;
            }
            CriCommand::Rmi { images } => {
                for image in images {
                    let r = cri::RemoveImageRequest {
                        image: Some(image_spec(&image)),
                    };
                    self.is
                        .remove_image(req(r))
                        .await
                        .map_err(rpc("RemoveImage"))?;
                }
            }
        }
        Ok(0)
    }

    async fn version(&mut self) -> anyhow::Result<()> {
        let v = self
            .rs
            .version(req(cri::VersionRequest::default()))
            .await
            .map_err(rpc("Version"))?
            .into_inner();
        writeln!(std::io::stdout(), "Version:  {}", v.version)?;
        writeln!(std::io::stdout(), "RuntimeName:  {}", v.runtime_name)?;
        writeln!(std::io::stdout(), "RuntimeVersion:  {}", v.runtime_version)?;
        writeln!(
            std::io::stdout(),
            "RuntimeApiVersion:  {}",
            v.runtime_api_version
        )?;
        Ok(())
    }

    async fn status(&mut self) -> anyhow::Result<()> {
        let s = self
            .rs
            .status(req(cri::StatusRequest { verbose: false }))
            .await
            .map_err(rpc("Status"))?
            .into_inner();
        for c in s.status.map(|s| s.conditions).unwrap_or_default() {
            let why = [c.reason, c.message]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            writeln!(std::io::stdout(), "{} {} {why}", c.r#type, c.status)?;
        }
        for h in s.runtime_handlers {
            let name = if h.name.is_empty() {
                "(default)"
            } else {
                &h.name
            };
            writeln!(std::io::stdout(), "handler {name}")?;
        }
        Ok(())
    }

    async fn run_pod(&mut self, pod: &PodArgs) -> anyhow::Result<String> {
        std::fs::create_dir_all(&pod.log_dir)
            .with_context(|| format!("create the pod log directory {}", pod.log_dir.display()))?;
        let r = cri::RunPodSandboxRequest {
            config: Some(pod_config(pod)),
            runtime_handler: pod.runtime.clone(),
        };
        Ok(self
            .rs
            .run_pod_sandbox(req(r))
            .await
            .map_err(rpc("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id)
    }

    async fn pod_status(&mut self, pod: &str) -> anyhow::Result<cri::PodSandboxStatusResponse> {
        let r = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_owned(),
            verbose: true,
        };
        Ok(self
            .rs
            .pod_sandbox_status(req(r))
            .await
            .map_err(rpc("PodSandboxStatus"))?
            .into_inner())
    }

    /// The config a pod was made with, as far as CreateContainer needs it: the metadata and
    /// labels from its status, the log directory from the runtime's verbose info where it
    /// gives it (containerd's does).
    async fn pod_config_of(&mut self, pod: &str) -> anyhow::Result<cri::PodSandboxConfig> {
        let st = self.pod_status(pod).await?;
        let status = st.status.unwrap_or_default();
        let log_directory = st
            .info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|v| {
                v.pointer("/config/log_directory")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        Ok(cri::PodSandboxConfig {
            metadata: status.metadata,
            labels: status.labels,
            annotations: status.annotations,
            log_directory,
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        })
    }

    async fn create(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> anyhow::Result<String> {
        let r = cri::CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        Ok(self
            .rs
            .create_container(req(r))
            .await
            .map_err(rpc("CreateContainer"))?
            .into_inner()
            .container_id)
    }

    async fn start(&mut self, id: &str) -> anyhow::Result<()> {
        let r = cri::StartContainerRequest {
            container_id: id.to_owned(),
        };
        self.rs
            .start_container(req(r))
            .await
            .map_err(rpc("StartContainer"))?;
        Ok(())
    }

    async fn pods(&mut self, quiet: bool) -> anyhow::Result<()> {
        let pods = self
            .rs
            .list_pod_sandbox(req(cri::ListPodSandboxRequest::default()))
            .await
            .map_err(rpc("ListPodSandbox"))?
            .into_inner()
            .items;
        if !quiet {
            writeln!(
                std::io::stdout(),
                "{:<13} {:<20} {:<14} {:<12} RUNTIME",
                "POD ID",
                "NAME",
                "STATE",
                "NAMESPACE"
            )?;
        }
        for p in pods {
            if quiet {
                writeln!(std::io::stdout(), "{}", p.id)?;
                continue;
            }
            let m = p.metadata.unwrap_or_default();
            let state = cri::PodSandboxState::try_from(p.state)
                .map_or("UNKNOWN", |s| s.as_str_name())
                .trim_start_matches("SANDBOX_");
            writeln!(
                std::io::stdout(),
                "{:<13} {:<20} {:<14} {:<12} {}",
                short(&p.id),
                m.name,
                state,
                m.namespace,
                p.runtime_handler
            )?;
        }
        Ok(())
    }

    async fn inspect_pod(&mut self, pod: &str) -> anyhow::Result<()> {
        let st = self.pod_status(pod).await?;
        let s = st.status.unwrap_or_default();
        let m = s.metadata.unwrap_or_default();
        let state = cri::PodSandboxState::try_from(s.state).map_or("UNKNOWN", |s| s.as_str_name());
        writeln!(std::io::stdout(), "id: {}", s.id)?;
        writeln!(std::io::stdout(), "name: {}", m.name)?;
        writeln!(std::io::stdout(), "namespace: {}", m.namespace)?;
        writeln!(std::io::stdout(), "uid: {}", m.uid)?;
        writeln!(std::io::stdout(), "state: {state}")?;
        writeln!(std::io::stdout(), "runtime: {}", s.runtime_handler)?;
        writeln!(
            std::io::stdout(),
            "ip: {}",
            s.network.map(|n| n.ip).unwrap_or_default()
        )?;
        Ok(())
    }

    async fn ps(&mut self, all: bool, pod: Option<String>, quiet: bool) -> anyhow::Result<()> {
        let running = cri::ContainerStateValue {
            state: cri::ContainerState::ContainerRunning as i32,
        };
        let filter = cri::ContainerFilter {
            pod_sandbox_id: pod.unwrap_or_default(),
            state: (!all).then_some(running),
            ..Default::default()
        };
        let list = self
            .rs
            .list_containers(req(cri::ListContainersRequest {
                filter: Some(filter),
            }))
            .await
            .map_err(rpc("ListContainers"))?
            .into_inner()
            .containers;
        if !quiet {
            writeln!(
                std::io::stdout(),
                "{:<13} {:<20} {:<18} {:<13} IMAGE",
                "CONTAINER",
                "NAME",
                "STATE",
                "POD ID"
            )?;
        }
        for c in list {
            if quiet {
                writeln!(std::io::stdout(), "{}", c.id)?;
                continue;
            }
            let state = container_state(c.state);
            let image = c.image.map(|i| i.image).unwrap_or_default();
            let name = c.metadata.map(|m| m.name).unwrap_or_default();
            writeln!(
                std::io::stdout(),
                "{:<13} {:<20} {:<18} {:<13} {image}",
                short(&c.id),
                name,
                state,
                short(&c.pod_sandbox_id)
            )?;
        }
        Ok(())
    }

    async fn container_status(&mut self, id: &str) -> anyhow::Result<cri::ContainerStatus> {
        let r = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        Ok(self
            .rs
            .container_status(req(r))
            .await
            .map_err(rpc("ContainerStatus"))?
            .into_inner()
            .status
            .unwrap_or_default())
    }

    async fn inspect(&mut self, id: &str) -> anyhow::Result<()> {
        let s = self.container_status(id).await?;
        writeln!(std::io::stdout(), "id: {}", s.id)?;
        writeln!(
            std::io::stdout(),
            "name: {}",
            s.metadata.map(|m| m.name).unwrap_or_default()
        )?;
        writeln!(std::io::stdout(), "state: {}", container_state(s.state))?;
        writeln!(
            std::io::stdout(),
            "image: {}",
            s.image.map(|i| i.image).unwrap_or_default()
        )?;
        writeln!(std::io::stdout(), "exitCode: {}", s.exit_code)?;
        writeln!(std::io::stdout(), "reason: {}", s.reason)?;
        writeln!(std::io::stdout(), "message: {}", s.message)?;
        writeln!(std::io::stdout(), "logPath: {}", s.log_path)?;
        Ok(())
    }

    async fn exec(&mut self, id: &str, cmd: Vec<String>, timeout: i64) -> anyhow::Result<u8> {
        let r = cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd,
            timeout,
        };
        let mut r = tonic::Request::new(r);
        if timeout > 0 {
            // The command's own limit, and a margin for the call around it.
            let secs = u64::try_from(timeout)
                .unwrap_or(u64::MAX)
                .saturating_add(30);
            r.set_timeout(Duration::from_secs(secs));
        }
        let out = self
            .rs
            .exec_sync(r)
            .await
            .map_err(rpc("ExecSync"))?
            .into_inner();
        std::io::stdout().write_all(&out.stdout)?;
        std::io::stderr().write_all(&out.stderr)?;
        // An exit status a shell can carry: 0-255 as they are, anything else as 255.
        Ok(u8::try_from(out.exit_code).unwrap_or(u8::MAX))
    }

    async fn logs(&mut self, id: &str) -> anyhow::Result<()> {
        let s = self.container_status(id).await?;
        if s.log_path.is_empty() {
            anyhow::bail!("container {id} has no log file");
        }
        let file = std::fs::File::open(&s.log_path)
            .with_context(|| format!("open the log file {}", s.log_path))?;
        let lines = switchyard_api::cri_log::Reader::new(std::io::BufReader::new(file));
        for line in lines {
            let line = line.with_context(|| format!("read the log file {}", s.log_path))?;
            if line.stream == "stderr" {
                writeln!(std::io::stderr(), "{}", line.text)?;
            } else {
                writeln!(std::io::stdout(), "{}", line.text)?;
            }
        }
        Ok(())
    }

    async fn stats(&mut self, ids: Vec<String>) -> anyhow::Result<()> {
        let stats = if ids.is_empty() {
            self.rs
                .list_container_stats(req(cri::ListContainerStatsRequest::default()))
                .await
                .map_err(rpc("ListContainerStats"))?
                .into_inner()
                .stats
        } else {
            let mut out = Vec::new();
            for id in ids {
                let r = cri::ContainerStatsRequest { container_id: id };
                let s = self
                    .rs
                    .container_stats(req(r))
                    .await
                    .map_err(rpc("ContainerStats"))?;
                out.extend(s.into_inner().stats);
            }
            out
        };
        writeln!(
            std::io::stdout(),
            "{:<13} {:<20} {:>16} {:>14}",
            "CONTAINER",
            "NAME",
            "CPU (ns)",
            "MEMORY (B)"
        )?;
        for s in stats {
            let attrs = s.attributes.unwrap_or_default();
            let name = attrs.metadata.map(|m| m.name).unwrap_or_default();
            let cpu = s
                .cpu
                .and_then(|c| c.usage_core_nano_seconds)
                .map_or(0, |v| v.value);
            let mem = s
                .memory
                .and_then(|m| m.working_set_bytes)
                .map_or(0, |v| v.value);
            writeln!(
                std::io::stdout(),
                "{:<13} {:<20} {cpu:>16} {mem:>14}",
                short(&attrs.id),
                name
            )?;
        }
        Ok(())
    }

    async fn images(&mut self, quiet: bool) -> anyhow::Result<()> {
        let images = self
            .is
            .list_images(req(cri::ListImagesRequest::default()))
            .await
            .map_err(rpc("ListImages"))?
            .into_inner()
            .images;
        if !quiet {
            writeln!(
                std::io::stdout(),
                "{:<50} {:<13} {:>12}",
                "IMAGE",
                "IMAGE ID",
                "SIZE"
            )?;
        }
        for i in images {
            if quiet {
                writeln!(std::io::stdout(), "{}", i.id)?;
                continue;
            }
            let id = i.id.trim_start_matches("sha256:");
            let names = if i.repo_tags.is_empty() {
                i.repo_digests
            } else {
                i.repo_tags
            };
            for name in names {
                writeln!(
                    std::io::stdout(),
                    "{name:<50} {:<13} {:>12}",
                    short(id),
                    i.size
                )?;
            }
        }
        Ok(())
    }
}

/// Runs an exec or attach session at `url`, in raw mode while the session has a terminal
/// and stdin is one (restored on every way out: the guard is dropped, and SIGTERM or SIGHUP
/// end the session first).
async fn remote_command(url: &str, args: &StreamArgs) -> anyhow::Result<u8> {
    let s = stream::Session {
        stdin: args.stdin,
        tty: args.tty,
    };
    let _raw = (s.tty && crate::io::stdin_is_terminal()).then(crate::io::RawTerminal::enable);
    let session = async {
        match args.transport.chosen() {
            Transport::Spdy => stream::spdy::remote_command(url, s).await,
            Transport::Websocket => stream::ws::remote_command(url, s).await,
        }
    };
    tokio::select! {
        r = session => r,
        () = stream::stop_signal() => anyhow::bail!("stopped by a signal"),
    }
}

/// PortForward's URL for `pod` and `ports`.
async fn port_forward_url(
    rs: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    ports: Vec<i32>,
) -> anyhow::Result<String> {
    let r = cri::PortForwardRequest {
        pod_sandbox_id: pod.to_owned(),
        port: ports,
    };
    Ok(rs
        .port_forward(req(r))
        .await
        .map_err(rpc("PortForward"))?
        .into_inner()
        .url)
}

/// Where `yard cri port-forward` sends its connections: over SPDY one session for all of
/// them, replaced (with a new PortForward URL: tokens are single-use) once a connection
/// failed or the session ended; over WebSocket a new URL and WebSocket per connection.
///
/// Why a failed connection retires its session: Kubernetes' server (spdystream) hands a
/// session's frames to a few workers by stream id, and a worker that gets data for a stream
/// whose forward already gave up waits for a reader forever, stalling every later stream it
/// is given. Data sent before the failure is known cannot be taken back, so the session goes,
/// as kubectl closes its connection on an error too.
#[derive(Clone)]
struct Forwarder {
    rs: RuntimeServiceClient<Channel>,
    pod: String,
    remote: Vec<i32>,
    spdy: Option<Arc<tokio::sync::Mutex<Option<Arc<stream::spdy::PortForward>>>>>,
}

impl Forwarder {
    /// The current SPDY session, or a new one.
    async fn session(
        &mut self,
        slot: &tokio::sync::Mutex<Option<Arc<stream::spdy::PortForward>>>,
    ) -> anyhow::Result<Arc<stream::spdy::PortForward>> {
        let mut current = slot.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.is_ended()) {
            return Ok(s.clone());
        }
        let url = port_forward_url(&mut self.rs, &self.pod, self.remote.clone()).await?;
        let s = Arc::new(stream::spdy::PortForward::connect(&url).await?);
        *current = Some(s.clone());
        Ok(s)
    }

    async fn forward(mut self, conn: tokio::net::TcpStream, remote: u16) -> anyhow::Result<()> {
        let Some(slot) = self.spdy.clone() else {
            let url = port_forward_url(&mut self.rs, &self.pod, vec![i32::from(remote)]).await?;
            return stream::ws::forward(&url, conn, remote).await;
        };
        let session = self.session(&slot).await?;
        let done = session.forward(conn, remote).await;
        if done.is_err() {
            let mut current = slot.lock().await;
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &session)) {
                *current = None;
            }
            drop(current);
            session.close().await;
        }
        done
    }
}

/// `yard cri port-forward`: a loopback listener per pair, each accepted connection forwarded
/// by a [`Forwarder`], until interrupted; a failed connection's error is printed and the
/// others go on.
async fn port_forward(
    mut rs: RuntimeServiceClient<Channel>,
    transport: Transport,
    pod: String,
    ports: Vec<PortPair>,
) -> anyhow::Result<()> {
    let remote: Vec<i32> = ports.iter().map(|p| i32::from(p.remote)).collect();
    let mut forwarder = Forwarder {
        rs: rs.clone(),
        pod: pod.clone(),
        remote: remote.clone(),
        spdy: (transport == Transport::Spdy).then(Default::default),
    };
    // The pod and ports checked (and over SPDY the session made) before listening.
    match forwarder.spdy.clone() {
        Some(slot) => drop(forwarder.session(&slot).await?),
        None => drop(port_forward_url(&mut rs, &pod, remote).await?),
    }
    let (conns, mut accepted) = tokio::sync::mpsc::channel(16);
    for pair in ports {
        let listener = stream::listen(pair).await?;
        writeln!(
            std::io::stdout(),
            "Forwarding from 127.0.0.1:{} -> {}",
            pair.local,
            pair.remote
        )?;
        let conns = conns.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                if conns.send((conn, pair.remote)).await.is_err() {
                    return;
                }
            }
        });
    }
    std::io::stdout().flush()?;
    let stop = stream::stop_signal();
    tokio::pin!(stop);
    loop {
        let next = tokio::select! {
            c = accepted.recv() => c,
            () = &mut stop => return Ok(()),
        };
        let Some((conn, remote)) = next else {
            return Ok(());
        };
        let forwarder = forwarder.clone();
        tokio::spawn(async move {
            if let Err(e) = forwarder.forward(conn, remote).await {
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
            }
        });
    }
}

fn short(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

fn container_state(state: i32) -> &'static str {
    cri::ContainerState::try_from(state).map_or("UNKNOWN", |s| s.as_str_name())
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// A pod config as crictl's defaults make one.
fn pod_config(pod: &PodArgs) -> cri::PodSandboxConfig {
    let uid = pod
        .uid
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let metadata = cri::PodSandboxMetadata {
        name: pod.name.clone(),
        uid,
        namespace: pod.namespace.clone(),
        attempt: 0,
    };
    let hostname = pod.hostname.as_deref().unwrap_or(&pod.name);
    let mut config = switchyard_api::cri_defaults::pod_config(
        metadata,
        hostname,
        &pod.log_dir.display().to_string(),
    );
    if pod.host_network
        && let Some(ns) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|c| c.namespace_options.as_mut())
    {
        ns.network = cri::NamespaceMode::Node as i32;
    }
    config
}

fn container_config(c: &ContainerArgs) -> anyhow::Result<cri::ContainerConfig> {
    let envs = c
        .env
        .iter()
        .map(|kv| {
            let (key, value) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: not KEY=VALUE"))?;
            Ok(cri::KeyValue {
                key: key.to_owned(),
                value: value.as_bytes().to_vec(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let mounts = c
        .mount
        .iter()
        .map(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            let (host, ctr, readonly) = match parts[..] {
                [host, ctr] => (host, ctr, false),
                [host, ctr, "ro"] => (host, ctr, true),
                [host, ctr, "rw"] => (host, ctr, false),
                _ => anyhow::bail!("--mount {m:?}: not HOST:CONTAINER[:ro]"),
            };
            Ok(cri::Mount {
                container_path: ctr.to_owned(),
                host_path: host.to_owned(),
                readonly,
                ..Default::default()
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: c.name.clone(),
            attempt: 0,
        }),
        image: Some(image_spec(&c.image)),
        command: c.cmd.clone(),
        envs,
        mounts,
        tty: c.tty,
        stdin: c.stdin,
        log_path: format!("{}.log", c.name),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    })
}
