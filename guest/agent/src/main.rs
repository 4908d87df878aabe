//! The Switchyard guest agent: `/init` (PID 1) of the microVM's initramfs. It sets up the
//! guest, then serves the `Agent` ttrpc service (`yard-agent-protocol`) to the vm shim over a
//! virtio-serial port (and vsock where there is one), and runs containers with libcontainer.
//!
//! `yard-agent runtime ...` is the single-threaded helper the agent re-executes for
//! libcontainer's create and exec (see `runtime.rs`).

mod boot;
mod cgroup;
mod channel;
mod container;
mod error;
mod forward;
mod network;
mod reaper;
mod runtime;
mod service;
mod spec;
mod stdio;
mod storage;
mod sys;
mod volumes;
mod zygote;

use std::io::Write;
use std::sync::Arc;

use yard_agent_protocol::ttrpc::r#async::Server;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(runtime::MODE) {
        std::process::exit(runtime::main(&args[2..]));
    }
    if std::process::id() != 1 {
        let _ = writeln!(
            std::io::stderr(),
            "yard-agent: runs as PID 1 of a Switchyard guest (or as `yard-agent runtime ...`)"
        );
        std::process::exit(2);
    }
    let early: Vec<String> = boot::leave_initramfs().into_iter().collect();
    let boot = boot::init(early);
    // Forked while this process has one thread and no logger yet (see zygote.rs).
    let zygote = if boot.zygote { zygote::start() } else { None };
    boot::logging(boot.debug);
    boot::panic_hook();
    for e in &boot.early_errors {
        tracing::warn!("{e}");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        uptime_ms = boot::uptime().as_millis() as u64,
        debug = boot.debug,
        "starting"
    );
    if zygote.is_none() {
        tracing::warn!("no runtime zygote: runtime mode runs by executing the agent");
    }
    let settings = container::Settings {
        debug: boot.debug,
        cpu_bandwidth: boot.cpu_bandwidth,
        zygote: zygote.map(Arc::new),
    };
    let channels = Channels {
        serial: !boot.vsock_only,
        boot_timer: boot.boot_timer,
    };
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(serve(settings, channels)),
        Err(e) => tracing::error!(error = %e, "tokio runtime"),
    }
    // PID 1 must not return; what is left is to end the VM.
    boot::power_off();
}

/// Which channels to serve on, from the kernel command line.
struct Channels {
    serial: bool,
    boot_timer: bool,
}

async fn serve(settings: container::Settings, channels: Channels) {
    let reaper = Arc::new(reaper::Reaper::default());
    tokio::spawn(reaper.clone().run());
    let agent = Arc::new(container::Agent::new(
        settings,
        reaper,
        Arc::new(storage::System),
    ));
    let forwards = Arc::new(forward::Forwards::default());
    let service = || {
        yard_agent_protocol::create_agent(Arc::new(service::Service {
            agent: agent.clone(),
            forwards: forwards.clone(),
        }))
    };
    let mut servers = Vec::new();
    if channels.serial {
        let mut serial = Server::new()
            .register_service(service())
            .add_listener(channel::serial_listener());
        match serial.start().await {
            Ok(()) => servers.push(serial),
            Err(e) => tracing::error!(error = %e, "serve the agent port"),
        }
    }
    if let Some(listener) = channel::vsock_listener() {
        let mut vsock = Server::new()
            .register_service(service())
            .add_listener(listener);
        match vsock.start().await {
            Ok(()) => {
                servers.push(vsock);
                tracing::info!(
                    port = yard_agent_protocol::VSOCK_PORT,
                    uptime_ms = boot::uptime().as_millis() as u64,
                    "ready on vsock"
                );
                if channels.boot_timer
                    && let Err(e) = sys::signal_boot_timer()
                {
                    tracing::warn!(error = %e, "signal the boot timer");
                }
            }
            Err(e) => tracing::error!(error = %e, "serve vsock"),
        }
    }
    if servers.is_empty() {
        return;
    }
    // The servers run in their own tasks; the agent runs until Shutdown reboots the guest.
    std::future::pending::<()>().await;
}
