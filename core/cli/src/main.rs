//! `yard`: run and manage Switchyard tasks from a shell. One module per command group; each
//! is a thin client of switchyardd's gRPC API (`client`).

mod client;
mod cri;
mod events;
mod exec;
mod images;
mod info;
mod io;
mod process;
mod run;
mod spec;
mod stream;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::Client;

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
    #[command(flatten)]
    Client(ClientCommand),
    /// Talk CRI (Kubernetes' runtime API) to the endpoint at --address, as crictl does.
    #[command(subcommand)]
    Cri(cri::CriCommand),
}

/// The commands that speak containerd's client API to switchyardd.
#[derive(Subcommand)]
enum ClientCommand {
    /// Run a command in a new task.
    Run(run::RunArgs),
    /// List containers and their tasks.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a task.
    Kill(tasks::KillArgs),
    /// Remove containers (and their stopped tasks).
    Rm(tasks::RmArgs),
    /// Run another process in a running task.
    Exec(exec::ExecArgs),
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
    Pull(images::PullArgs),
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
    Image(images::ImageCommand),
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
    let command = match cli.command {
        Command::Cri(cmd) => return cri::run(&cli.address, cmd).await,
        Command::Client(command) => command,
    };
    let client = Client::connect(&cli.address, &cli.namespace).await?;
    let done = |()| 0;
    match command {
        ClientCommand::Run(args) => run::run(&client, args).await,
        ClientCommand::Ps { json } => tasks::ps(&client, json).await.map(done),
        ClientCommand::Kill(args) => tasks::kill(&client, args).await.map(done),
        ClientCommand::Rm(args) => Ok(tasks::rm(&client, args).await),
        ClientCommand::Exec(args) => exec::exec(&client, args).await,
        ClientCommand::Events { json, filters } => {
            events::watch(&client, json, filters).await.map(done)
        }
        ClientCommand::Info { json } => info::info(&client, &cli.address, json).await.map(done),
        ClientCommand::Pull(args) => images::pull(&client, args).await.map(done),
        ClientCommand::Images { json, quiet } => images::list(&client, json, quiet).await.map(done),
        ClientCommand::Rmi { names } => images::remove(&client, names).await.map(done),
        ClientCommand::Image(cmd) => cmd.run(&client).await.map(done),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
