//! The shim binary's three lives, as containerd runs it:
//! - `start`: start (or find) the shim server for this task's group, print its address;
//! - `delete`: clean up after a shim that is gone, print a `DeleteResponse`;
//! - no action with `-socket`: the server itself, serving the task service until `Shutdown`.
//!
//! Nothing but the address (or the `DeleteResponse`) may reach stdout: containerd reads it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use containerd_shim::Flags;
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::ttrpc::r#async::Server;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;

use crate::bundle::RuntimeOptions;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::events::{Publisher, RemoteSink, timestamp};
use crate::service::{Service, services};
use crate::task::TaskService;

pub use switchyard_base::group::GROUP_ANNOTATIONS;

/// The group a task's shim serves ([`switchyard_base::group::group_of`]): a grouping annotation
/// of the spec, else the runtime's `group` option (from the `options.json` switchyardd writes
/// into the bundle, or from the runtime options `start` is handed on stdin, as containerd does).
pub fn group_from_bundle(bundle: &Path, options: Option<&RuntimeOptions>) -> Option<String> {
    let text = std::fs::read(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let annotations = spec.get("annotations");
    switchyard_base::group::group_of(
        |k| annotations.and_then(|a| a.get(k)).and_then(|v| v.as_str()),
        || group_option(bundle).or_else(|| options.and_then(group_in_options)),
    )
}

/// Whether the bundle's task belongs to a CRI pod (its spec has the sandbox annotation).
fn pod_member(bundle: &Path) -> bool {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&text).is_ok_and(|spec| {
        spec.get("annotations")
            .and_then(|a| a.get(GROUP_ANNOTATIONS[0]))
            .is_some()
    })
}

/// The runtime's `group` option, from the `options.json` switchyardd writes into the bundle:
/// every task of the runtime with that option shares one shim (per namespace).
fn group_option(bundle: &Path) -> Option<String> {
    let text = std::fs::read(bundle.join("options.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("group")?.as_str().map(str::to_owned)
}

/// The `group` key of TOML runtime options. Options that do not parse name no group here;
/// Create refuses them with the error that names the key.
fn group_in_options(options: &RuntimeOptions) -> Option<String> {
    let table: toml::Table = toml::from_str(&options.toml_text().ok()?).ok()?;
    table.get("group")?.as_str().map(str::to_owned)
}

/// Most runtime options `start` reads from stdin.
const MAX_STDIN_OPTIONS: u64 = 1 << 20;

/// The runtime options `start` is handed on stdin: containerd (1.6 on) and switchyardd write
/// the `Any` of the runtime's options there, or give it /dev/null. `None` without options, or
/// when stdin is a terminal (a person running `start` by hand).
fn stdin_options() -> Result<Option<RuntimeOptions>> {
    use std::io::IsTerminal as _;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .take(MAX_STDIN_OPTIONS + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io("read the runtime options on stdin"))?;
    if bytes.len() as u64 > MAX_STDIN_OPTIONS {
        return Err(Error::InvalidArgument(format!(
            "runtime options on stdin: over {MAX_STDIN_OPTIONS} bytes"
        )));
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    let any = Any::parse_from_bytes(&bytes).map_err(|e| {
        Error::InvalidArgument(format!("runtime options on stdin: not a protobuf Any: {e}"))
    })?;
    RuntimeOptions::from_any(Some(&any))
}

fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.strip_prefix("unix://").unwrap_or(address))
}

fn connectable(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// `start`: runs in the bundle directory; prints the address on stdout.
///
/// Unless the group's server already listens there, `start` binds the socket itself and hands
/// it to a new server as descriptor 3, as containerd's Go shims do: the address it prints
/// accepts connections at once (they wait in the socket's backlog), so `start` returns without
/// waiting for the server to come up, and the server's start overlaps with containerd's next
/// steps. A server that dies before it accepts takes the socket with it; the caller's first
/// request then fails.
pub fn start<E: Engine>(engine: &E, flags: &Flags) -> Result<String> {
    let bundle = bundle_dir(flags)?;
    let options = stdin_options()?;
    let group = engine
        .group(&bundle, options.as_ref())
        .unwrap_or_else(|| flags.id.clone());
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let path = socket_path(&address);
    if !(group != flags.id && connectable(&path))
        && let Some(listener) = listen(&path)?
    {
        let exe = std::env::current_exe().map_err(Error::io("find the shim's own binary"))?;
        let mut cmd = Command::new(exe);
        cmd.current_dir(&bundle)
            .args(["-namespace", &flags.namespace, "-id", &flags.id])
            .args(["-address", &flags.address, "-socket", &address])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if !flags.publish_binary.is_empty() {
            cmd.args(["-publish-binary", &flags.publish_binary]);
        }
        if flags.debug {
            cmd.arg("-debug");
        }
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: listener.into(),
            child_fd: crate::sys::LISTENER_FD,
        }])
        .map_err(|_| Error::Internal("the server's descriptors collide".into()))?;
        use std::os::unix::process::CommandExt as _;
        // The server lives on as its own process; nobody here waits for it.
        drop(cmd.spawn().map_err(Error::io("spawn the shim server"))?);
    }
    write_address(&bundle, &address)?;
    Ok(bootstrap(&address))
}

/// Bind the server's socket at `path` (its directory made private); `None` when a live server
/// already listens there (another `start` of the group won, or the task's own server runs). A
/// socket nothing listens on is a dead server's: replaced.
fn listen(path: &Path) -> Result<Option<UnixListener>> {
    if let Some(dir) = path.parent() {
        crate::perms::private_dir(dir)?;
    }
    match crate::perms::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse => {
            if connectable(path) {
                return Ok(None);
            }
            let _ = std::fs::remove_file(path);
            crate::perms::bind(path).map(Some)
        }
        Err(e) => Err(e),
    }
}

/// What `start` prints: a plain address (containerd 1.6/1.7, task v2) unless the caller offers
/// task v3 by `MAX_SHIM_VERSION` (switchyardd, containerd 2.x), then containerd's JSON bootstrap.
fn bootstrap(address: &str) -> String {
    let max: u32 = std::env::var("MAX_SHIM_VERSION")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(2);
    if max >= 3 {
        serde_json::json!({"version": 3, "address": address, "protocol": "ttrpc"}).to_string()
    } else {
        address.to_owned()
    }
}

fn bundle_dir(flags: &Flags) -> Result<PathBuf> {
    if flags.bundle.is_empty() {
        std::env::current_dir().map_err(Error::io("current directory (the bundle)"))
    } else {
        Ok(PathBuf::from(&flags.bundle))
    }
}

/// containerd reloads shims after a restart from the bundle's `address` file (0600, written
/// to a temporary file and renamed, as containerd's shims write it).
fn write_address(bundle: &Path, address: &str) -> Result<()> {
    use std::io::Write;
    let path = bundle.join("address");
    let failed = |e| Error::io(format!("write {}", path.display()))(e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".address.")
        .tempfile_in(bundle)
        .map_err(failed)?;
    tmp.write_all(address.as_bytes()).map_err(failed)?;
    tmp.persist(&path).map_err(|e| failed(e.error))?;
    Ok(())
}

/// `delete`: the shim is gone; make sure the container is too. Prints a `DeleteResponse`.
pub async fn delete<E: Engine>(engine: &E, flags: &Flags) -> Result<Vec<u8>> {
    let bundle = bundle_dir(flags)?;
    let cleaned = engine.cleanup(&flags.namespace, &flags.id, &bundle).await;
    crate::bundle::unmount_rootfs(&bundle);
    remove_dead_socket(engine, flags, &bundle);
    cleaned?;
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + 9,
        exited_at: MessageField::some(timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    resp.write_to_bytes()
        .map_err(|e| Error::Internal(format!("encode DeleteResponse: {e}")))
}

/// A server killed with -9 leaves its socket behind: remove it, unless a server (a new one of
/// the same group) listens there again. The file is removed only if it is still the one found
/// dead, so a server that has just replaced it keeps its socket.
fn remove_dead_socket<E: Engine>(engine: &E, flags: &Flags, bundle: &Path) {
    // `start` wrote the address it served into the bundle (its group may have come from
    // options only `start` was handed).
    let address = std::fs::read_to_string(bundle.join("address")).unwrap_or_else(|_| {
        let group = engine
            .group(bundle, None)
            .unwrap_or_else(|| flags.id.clone());
        containerd_shim::socket_address(&flags.address, &flags.namespace, &group)
    });
    let path = socket_path(address.trim());
    if let Err(e) = switchyard_base::socket::remove_if_dead(&path) {
        tracing::warn!(socket = %path.display(), error = %e, "remove a dead server's socket");
    }
}

/// How long a new server waits for its first Create before it exits: `start` returned its
/// address to a caller that sends Create at once, unless it died meanwhile.
pub const UNCLAIMED_EXIT: Duration = Duration::from_secs(10);

/// The server's socket as `-socket` names it.
pub fn server_socket(flags: &Flags) -> PathBuf {
    socket_path(&flags.socket)
}

/// The server: listen (on `inherited`, the socket `start` bound, when given), signal
/// readiness by closing stdout (switchyardd, which starts servers itself, waits for it), serve
/// until `Shutdown`.
pub async fn serve<E: Engine>(
    engine: Arc<E>,
    flags: &Flags,
    inherited: Option<UnixListener>,
) -> Result<()> {
    let path = server_socket(flags);
    let listener = match inherited {
        Some(l) => l,
        None => match listen(&path)? {
            Some(l) => l,
            None => {
                // Another server of this group won the race; the caller will use it.
                tracing::info!(socket = %path.display(), "a shim already serves this group");
                release_stdout();
                return Ok(());
            }
        },
    };
    let listener = Listener::try_from(listener).map_err(Error::io("ttrpc listener"))?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let remote = if ttrpc_address.is_empty() {
        None
    } else {
        Some(RemoteSink::connect(&ttrpc_address, &flags.namespace).await?)
    };
    let publisher = match &remote {
        Some(sink) => Publisher::new(sink.clone()),
        None => Publisher::none(),
    };
    let mut tasks = TaskService::new(engine.clone(), &flags.namespace, publisher);
    // A group's server (its socket is not the task's own) may linger for the group's next
    // task; a pod's does not: no task joins a pod after its sandbox is gone.
    let grouped = flags.socket
        != containerd_shim::socket_address(&flags.address, &flags.namespace, &flags.id);
    let pod = || pod_member(Path::new("."));
    if let (true, Some(linger)) = (grouped, engine.idle_exit())
        && !pod()
    {
        tasks = tasks.with_idle_exit(linger);
    }
    let tasks = Arc::new(tasks);
    // Started in its first task's bundle, which goes with that task while the server may
    // serve its group on: everything from here on uses absolute paths, and the processes it
    // runs (the native engine's runtime process calls getcwd) must not inherit a removed
    // directory.
    std::env::set_current_dir("/").map_err(Error::io("change directory to /"))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services(Arc::new(Service::new(tasks.clone()))));
    server
        .start()
        .await
        .map_err(|e| Error::Internal(format!("start ttrpc server: {e}")))?;
    tracing::info!(socket = %path.display(), "serving");
    release_stdout();
    tokio::select! {
        () = tasks.stopped() => {}
        () = tasks.idle_exit() => {}
        () = tasks.unclaimed_for(UNCLAIMED_EXIT) => {
            tracing::warn!(
                after = ?UNCLAIMED_EXIT,
                "no Create reached this shim: its caller is gone; exiting"
            );
        }
    }
    // The socket's name goes first: a shim killed while it exits leaves none behind, and a
    // `start` for this group from now on starts a new server rather than joining this one.
    // The connections made stay until the server's shutdown, which lets each request being
    // handled (the Shutdown that got us here) finish and waits for its reply to be written.
    let _ = std::fs::remove_file(&path);
    let _ = server.shutdown().await;
    engine.shutdown().await;
    if let Some(sink) = remote {
        sink.flush(Duration::from_secs(2)).await;
    }
    tracing::info!("shim exiting");
    Ok(())
}

/// Point stdout at /dev/null: `start` is reading our stdout until it closes.
fn release_stdout() {
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
    }
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// switchyardd starts kit servers itself and names their socket by the same rule
    /// (`switchyardd`'s `server_address` test holds the same vector).
    #[test]
    fn the_server_socket_is_containerds() {
        assert_eq!(
            containerd_shim::socket_address("/run/switchyard/switchyard.sock", "default", "g1"),
            "unix:///run/containerd/s/32078c77e9d1e8d80dcaa4b9d889d4ae79dd3a34a86610c3a63eb1e012368206"
        );
    }

    #[test]
    fn groups_by_annotation_then_option() {
        let dir = std::env::temp_dir().join(format!("kit-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{e}"))
        };
        write("config.json", r#"{"annotations":{}}"#);
        assert_eq!(group_from_bundle(&dir, None), None);
        write("options.json", r#"{"group":"edge","cache_dir":"/x"}"#);
        assert_eq!(group_from_bundle(&dir, None).as_deref(), Some("edge"));
        write(
            "config.json",
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        );
        assert_eq!(group_from_bundle(&dir, None).as_deref(), Some("pod1"));
        write("options.json", r#"{"binary_name":"runc"}"#);
        write(
            "config.json",
            r#"{"annotations":{"io.switchyard.group":""}}"#,
        );
        assert_eq!(group_from_bundle(&dir, None), None);

        // Runtime options handed to `start` (containerd's runtimeoptions.v1.Options): after
        // the annotations and options.json.
        write("config.json", r#"{"annotations":{}}"#);
        std::fs::remove_file(dir.join("options.json")).unwrap_or_else(|e| panic!("{e}"));
        let handed = RuntimeOptions {
            type_url: "runtimeoptions.v1.Options".into(),
            config_body: b"group = \"fns\"\nmax_memory = 1".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            group_from_bundle(&dir, Some(&handed)).as_deref(),
            Some("fns")
        );
        let broken = RuntimeOptions {
            config_body: b"group = ".to_vec(),
            ..handed.clone()
        };
        assert_eq!(group_from_bundle(&dir, Some(&broken)), None);
        write("options.json", r#"{"group":"edge"}"#);
        assert_eq!(
            group_from_bundle(&dir, Some(&handed)).as_deref(),
            Some("edge")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
