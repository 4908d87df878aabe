//! The Wasm runtime's options: shim-wide settings from the runtime's options (switchyardd's
//! `[runtimes.wasm.options]`, or CRI's `ConfigPath`), and per-task settings from the bundle's
//! annotations, which win. Nothing here is read from the image (its environment included): an
//! image author chooses neither limits, nor the address a task listens on, nor its network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::{Error, Result};

/// Annotation prefix for per-task settings (`io.switchyard.wasm.timeout-ms` and so on).
pub const ANNOTATION_PREFIX: &str = "io.switchyard.wasm.";

/// Shim-wide options. The engine is built from the options of the first task a shim process
/// creates; tasks grouped into one shim come from the same runtime, so they agree.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Where compiled artifacts are cached (created if missing; must be root's alone).
    pub cache_dir: PathBuf,
    /// Instance slots in the pooling allocator: the most tasks (plus in-flight HTTP requests)
    /// one shim process runs at once. 0 turns pooling off (on-demand allocation).
    pub max_instances: u32,
    /// Largest linear memory one instance may have, in MiB (a pool slot's size).
    pub max_memory_mib: u64,
    /// Wall-clock limit of a task's run, in ms. 0: none.
    pub timeout_ms: u64,
    /// Wall-clock limit of one HTTP request (the handler's instance, response body included),
    /// in ms. 0: none.
    pub request_timeout_ms: u64,
    /// How long an HTTP client may take to send a request's headers, in ms. 0: none.
    pub header_timeout_ms: u64,
    /// Open HTTP connections per task; a connection beyond it is answered 503 and closed.
    pub max_connections: u32,
    /// Largest module or component accepted, in MiB.
    pub max_module_mib: u64,
    /// Fuel given to each task (or HTTP request); 0 turns fuel metering off.
    pub fuel: u64,
    /// Default listen address (`IP:PORT`) for HTTP components.
    pub http_listen: String,
    /// Let HTTP components listen on ports below 1024.
    pub allow_privileged_ports: bool,
    /// Spec settings the Wasm runtime cannot enforce that Create accepts anyway, by field
    /// (`process.user`, `linux.seccomp`, `linux.resources.blockIO`, ...); `*` accepts all.
    pub allow_unenforced: Vec<String>,
    /// Put every task of this runtime in one shim per namespace (read by `start` from the
    /// bundle's `options.json`; the group annotations win).
    pub group: String,
    /// The host uid the worker runs guests as, in a user namespace of its own where it is uid 0
    /// (each task's root is idmapped to it). 0: no user namespace, the worker stays host uid 0
    /// without capabilities (for task roots on a filesystem that cannot be idmapped).
    pub worker_uid: u32,
    /// The host gid of the worker (0 exactly when `worker_uid` is 0).
    pub worker_gid: u32,
    /// `wasi:sockets` (TCP and UDP) for guests of tasks in a pod, inside the pod's network
    /// namespace. Never for tasks outside a pod (they would be on the shim's network).
    pub sockets: bool,
    /// Outgoing `wasi:http` requests for guests of tasks in a pod, made from inside the pod's
    /// network namespace. Never outside a pod.
    pub outgoing_http: bool,
    /// Sockets one instance may hold open at once (TCP and UDP, accepted connections
    /// included); one more is refused with `new-socket-limit`. Its outgoing HTTP connections
    /// have a budget of the same size of their own (`connection-limit-reached`).
    pub max_sockets: u32,
    /// Longest time an outgoing HTTP request may take to connect, and to wait for each part of
    /// the response, in ms (a guest may ask for less, never more).
    pub outgoing_timeout_ms: u64,
}

/// The worker's default host uid and gid: in the range systemd leaves to no account or container
/// manager (above nspawn's 524288–1879048191, below 2^31, which some tools mishandle).
pub const WORKER_ID: u32 = 2_000_000_000;

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_dir: PathBuf::from("/var/cache/switchyard/wasm"),
            max_instances: 1000,
            max_memory_mib: 256,
            timeout_ms: 3_600_000,
            request_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            max_connections: 512,
            max_module_mib: 64,
            fuel: 0,
            http_listen: "127.0.0.1:8080".into(),
            allow_privileged_ports: false,
            allow_unenforced: Vec::new(),
            group: String::new(),
            worker_uid: WORKER_ID,
            worker_gid: WORKER_ID,
            sockets: true,
            outgoing_http: true,
            max_sockets: 64,
            outgoing_timeout_ms: 30_000,
        }
    }
}

impl Options {
    pub fn from_any(any: Option<&Any>) -> Result<Options> {
        let o: Options = yard_shim_kit::bundle::options_from_any(any)?;
        o.validate()?;
        Ok(o)
    }

    #[cfg(test)]
    pub fn from_toml(text: &str) -> Result<Options> {
        let o: Options = yard_shim_kit::bundle::options_from_toml(text)?;
        o.validate()?;
        Ok(o)
    }

    fn validate(&self) -> Result<()> {
        if self.max_memory_mib == 0 {
            return Err(Error::InvalidArgument(
                "options: max_memory_mib must be at least 1".into(),
            ));
        }
        if self.max_module_mib == 0 {
            return Err(Error::InvalidArgument(
                "options: max_module_mib must be at least 1".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::InvalidArgument(
                "options: max_connections must be at least 1".into(),
            ));
        }
        if self.max_sockets == 0 {
            return Err(Error::InvalidArgument(
                "options: max_sockets must be at least 1 (sockets = false turns sockets off)"
                    .into(),
            ));
        }
        if self.outgoing_timeout_ms == 0 {
            return Err(Error::InvalidArgument(
                "options: outgoing_timeout_ms must be at least 1 (outgoing_http = false turns \
                 outgoing requests off)"
                    .into(),
            ));
        }
        listen_addr(&self.http_listen, "options: http_listen", self, false)?;
        if (self.worker_uid == 0) != (self.worker_gid == 0) {
            return Err(Error::InvalidArgument(format!(
                "options: worker_uid {} and worker_gid {}: both 0 (no user namespace) or neither",
                self.worker_uid, self.worker_gid
            )));
        }
        for (name, id) in [
            ("worker_uid", self.worker_uid),
            ("worker_gid", self.worker_gid),
        ] {
            if id == u32::MAX {
                return Err(Error::InvalidArgument(format!(
                    "options: {name} {id} is not an id (it means \"none\" to the kernel)"
                )));
            }
        }
        Ok(())
    }

    /// Whether a worker serving a pod's network namespace lets guests make sockets at all (the
    /// system calls, for `wasi:sockets` or outgoing `wasi:http`).
    pub fn network(&self) -> bool {
        self.sockets || self.outgoing_http
    }

    /// Whether the worker runs in a user namespace of its own.
    pub fn user_namespace(&self) -> bool {
        self.worker_uid != 0
    }

    /// Largest module in bytes.
    pub fn max_module_bytes(&self) -> u64 {
        self.max_module_mib.saturating_mul(1 << 20)
    }

    /// Whether `field` (`process.user`, `linux.seccomp`, ...) may be set without enforcement.
    pub fn allows_unenforced(&self, field: &str) -> bool {
        self.allow_unenforced.iter().any(|a| {
            a == "*"
                || a == field
                || field
                    .strip_prefix(a.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }
}

/// Per-task settings: the options' defaults, then annotations, then the spec's memory limit.
/// Sent to the worker with the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSettings {
    /// Wall-clock limit of the run (commands).
    pub timeout: Option<Duration>,
    /// Wall-clock limit of one HTTP request.
    pub request_timeout: Option<Duration>,
    /// Time an HTTP client has to send a request's headers.
    pub header_timeout: Option<Duration>,
    /// Open HTTP connections at once.
    pub max_connections: u32,
    pub fuel: Option<u64>,
    /// Linear memory limit in bytes (the spec's `linux.resources.memory.limit`).
    pub memory_limit: Option<u64>,
    pub http_listen: SocketAddr,
    /// What the guest may do on the network (nothing outside a pod).
    pub network: Network,
}

/// A task's network: all off outside a pod; in a pod, the runtime's options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// `wasi:sockets` TCP and UDP.
    pub sockets: bool,
    /// Outgoing `wasi:http` requests.
    pub outgoing_http: bool,
    /// Sockets one instance may hold open at once.
    pub max_sockets: u32,
    /// Bound of an outgoing request's connect and of each wait for its response.
    pub outgoing_timeout: Duration,
}

impl TaskSettings {
    /// `pod`: the task's spec names a network namespace (a pod's): its listener is on every
    /// address of the pod, and its guests get the network the options allow, inside it.
    pub fn new(
        options: &Options,
        annotations: &HashMap<String, String>,
        memory_limit: Option<i64>,
        pod: bool,
    ) -> Result<TaskSettings> {
        let num = |key: &str, default: u64| -> Result<u64> {
            let full = format!("{ANNOTATION_PREFIX}{key}");
            match annotations.get(&full) {
                None => Ok(default),
                Some(v) => v.trim().parse().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "annotations.{full}: {v:?} is not a non-negative integer"
                    ))
                }),
            }
        };
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        let timeout = ms(num("timeout-ms", options.timeout_ms)?);
        let request_timeout = ms(num("request-timeout-ms", options.request_timeout_ms)?);
        let header_timeout = ms(num("header-timeout-ms", options.header_timeout_ms)?);
        let max_connections = num("max-connections", options.max_connections.into())?;
        let max_connections = u32::try_from(max_connections)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "annotations.{ANNOTATION_PREFIX}max-connections: must be 1 to {}",
                    u32::MAX
                ))
            })?;
        let fuel = num("fuel", options.fuel)?;
        if fuel > 0 && options.fuel == 0 {
            return Err(Error::InvalidArgument(format!(
                "annotations.{ANNOTATION_PREFIX}fuel: fuel metering is off in this runtime \
                 (set the runtime option fuel to enable it)"
            )));
        }
        let memory_limit = match memory_limit {
            None => None,
            Some(l) if l < 0 => None, // -1: unlimited
            Some(0) => {
                return Err(Error::InvalidArgument(
                    "linux.resources.memory.limit: 0 leaves no memory for the module".into(),
                ));
            }
            Some(l) => Some(l.unsigned_abs()),
        };
        // A pod's listener binds in the pod's own namespace, where a port below 1024 takes
        // nothing from the host (CRI's containers may listen on 80).
        let key = format!("{ANNOTATION_PREFIX}http-listen");
        let http_listen = match annotations.get(&key) {
            Some(v) => listen_addr(v, &format!("annotations.{key}"), options, pod)?,
            None if pod => {
                let port =
                    listen_addr(&options.http_listen, "options: http_listen", options, pod)?.port();
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port)
            }
            None => listen_addr(&options.http_listen, "options: http_listen", options, pod)?,
        };
        let network = if pod {
            Network {
                sockets: options.sockets,
                outgoing_http: options.outgoing_http,
                max_sockets: options.max_sockets,
                outgoing_timeout: Duration::from_millis(options.outgoing_timeout_ms),
            }
        } else {
            Network::default()
        };
        Ok(TaskSettings {
            timeout,
            request_timeout,
            header_timeout,
            max_connections,
            fuel: (fuel > 0).then_some(fuel),
            memory_limit,
            http_listen,
            network,
        })
    }
}

/// An HTTP listen address: a literal `IP:PORT` (no name lookups in the shim), below 1024 only
/// in a pod or when the runtime allows privileged ports. `what` names the setting in errors.
fn listen_addr(value: &str, what: &str, options: &Options, pod: bool) -> Result<SocketAddr> {
    let addr: SocketAddr = value.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{what}: {value:?} is not an IP:PORT address (like 127.0.0.1:8080)"
        ))
    })?;
    if addr.port() != 0 && addr.port() < 1024 && !options.allow_privileged_ports && !pod {
        return Err(Error::InvalidArgument(format!(
            "{what}: port {} is privileged (below 1024); the runtime option \
             allow_privileged_ports permits it",
            addr.port()
        )));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<TaskSettings>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn defaults_and_toml() {
        assert_eq!(Options::from_toml("").ok(), Some(Options::default()));
        let o = Options::from_toml("max_instances = 2000\ntimeout_ms = 50\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((o.max_instances, o.timeout_ms), (2000, 50));
        let e = Options::from_toml("max_instance = 1\n")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("max_instance")),
            "{e:?}"
        );
        let e = Options::from_toml("timeout_ms = \"x\"\n")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.starts_with("options: ")),
            "{e:?}"
        );
        for (toml, want) in [
            ("max_module_mib = 0", "max_module_mib"),
            ("max_connections = 0", "max_connections"),
            ("http_listen = \"localhost:80\"", "not an IP:PORT"),
            ("http_listen = \"127.0.0.1:80\"", "privileged"),
            ("worker_uid = 0", "worker_uid 0 and worker_gid 2000000000"),
            ("worker_gid = 0", "both 0"),
            (
                "worker_uid = 4294967295",
                "worker_uid 4294967295 is not an id",
            ),
        ] {
            let e = Options::from_toml(toml).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains(want)),
                "{toml}: {e:?}"
            );
        }
        assert!(
            Options::from_toml("http_listen = \"127.0.0.1:80\"\nallow_privileged_ports = true")
                .is_ok()
        );
        let d = Options::default();
        assert!(d.user_namespace() && d.worker_uid == WORKER_ID && d.worker_gid == WORKER_ID);
        let off =
            Options::from_toml("worker_uid = 0\nworker_gid = 0").unwrap_or_else(|e| panic!("{e}"));
        assert!(!off.user_namespace());
    }

    /// Every limit has a default: a run, a request, a client's headers, connections, modules.
    #[test]
    fn defaults_bound_every_task() {
        let o = Options::default();
        let t =
            TaskSettings::new(&o, &HashMap::new(), None, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.timeout, Some(Duration::from_secs(3600)));
        assert_eq!(t.request_timeout, Some(Duration::from_secs(30)));
        assert_eq!(t.header_timeout, Some(Duration::from_secs(10)));
        assert_eq!(t.max_connections, 512);
        assert_eq!(o.max_module_bytes(), 64 << 20);
        assert_eq!(t.http_listen.to_string(), "127.0.0.1:8080");
        assert!(!o.allow_privileged_ports);
    }

    #[test]
    fn task_settings() {
        let o = Options::default();
        let mut ann = HashMap::new();
        ann.insert("io.switchyard.wasm.timeout-ms".to_owned(), "250".to_owned());
        ann.insert(
            "io.switchyard.wasm.request-timeout-ms".to_owned(),
            "0".to_owned(),
        );
        ann.insert(
            "io.switchyard.wasm.http-listen".to_owned(),
            "127.0.0.1:9000".to_owned(),
        );
        ann.insert(
            "io.switchyard.wasm.max-connections".to_owned(),
            "3".to_owned(),
        );
        let t =
            TaskSettings::new(&o, &ann, Some(64 << 20), false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.timeout, Some(Duration::from_millis(250)));
        assert_eq!(t.request_timeout, None);
        assert_eq!(t.max_connections, 3);
        assert_eq!(t.memory_limit, Some(64 << 20));
        assert_eq!(t.http_listen.to_string(), "127.0.0.1:9000");
        ann.insert(
            "io.switchyard.wasm.timeout-ms".to_owned(),
            "soon".to_owned(),
        );
        let e = err(TaskSettings::new(&o, &ann, None, false));
        assert!(
            e.contains("annotations.io.switchyard.wasm.timeout-ms"),
            "{e}"
        );
        ann.clear();
        ann.insert("io.switchyard.wasm.fuel".to_owned(), "10".to_owned());
        assert!(TaskSettings::new(&o, &ann, None, false).is_err());
        ann.clear();
        ann.insert(
            "io.switchyard.wasm.max-connections".to_owned(),
            "0".to_owned(),
        );
        let e = err(TaskSettings::new(&o, &ann, None, false));
        assert!(e.contains("max-connections"), "{e}");
    }

    #[test]
    fn listen_address_from_options_or_annotations_only() {
        let o = Options::default();
        let mut ann = HashMap::new();
        ann.insert(
            "io.switchyard.wasm.http-listen".to_owned(),
            "0.0.0.0:443".to_owned(),
        );
        let e = err(TaskSettings::new(&o, &ann, None, false));
        assert!(
            e.starts_with("annotations.io.switchyard.wasm.http-listen: port 443 is privileged"),
            "{e}"
        );
        let allowed = Options {
            allow_privileged_ports: true,
            ..Options::default()
        };
        let t = TaskSettings::new(&allowed, &ann, None, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.http_listen.port(), 443);
        // Port 0 (any free port) is not privileged.
        ann.insert(
            "io.switchyard.wasm.http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        );
        assert!(TaskSettings::new(&o, &ann, None, false).is_ok());
        ann.insert(
            "io.switchyard.wasm.http-listen".to_owned(),
            "example.invalid:8080".to_owned(),
        );
        let e = err(TaskSettings::new(&o, &ann, None, false));
        assert!(e.contains("not an IP:PORT"), "{e}");
    }

    #[test]
    fn issue18_in_a_pod_the_listener_is_on_every_address_unless_annotated() {
        let o = Options::default();
        let none = HashMap::new();
        let t = TaskSettings::new(&o, &none, None, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.http_listen.to_string(), "127.0.0.1:8080");
        let t = TaskSettings::new(&o, &none, None, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.http_listen.to_string(), "0.0.0.0:8080");
        let mut ann = HashMap::new();
        ann.insert(
            "io.switchyard.wasm.http-listen".to_owned(),
            "127.0.0.1:9000".to_owned(),
        );
        let t = TaskSettings::new(&o, &ann, None, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.http_listen.to_string(), "127.0.0.1:9000");
    }

    /// Issue 20: a pod's port below 1024 is the pod's own (its network namespace); outside a
    /// pod it still needs allow_privileged_ports.
    #[test]
    fn issue20_privileged_ports_are_a_pods_own() {
        let o = Options::default();
        let mut ann = HashMap::new();
        ann.insert(
            "io.switchyard.wasm.http-listen".to_owned(),
            "0.0.0.0:80".to_owned(),
        );
        let t = TaskSettings::new(&o, &ann, None, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.http_listen.to_string(), "0.0.0.0:80");
        let e = err(TaskSettings::new(&o, &ann, None, false));
        assert!(e.contains("port 80 is privileged"), "{e}");
    }

    /// Issue 20: guests get sockets and outgoing HTTP in a pod (each switchable off), never
    /// outside one; the options are checked.
    #[test]
    fn issue20_network_only_in_a_pod_and_switchable() {
        let none = HashMap::new();
        let o = Options::default();
        assert!(o.sockets && o.outgoing_http && o.network());
        let host = TaskSettings::new(&o, &none, None, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(host.network, Network::default());
        assert!(!host.network.sockets && !host.network.outgoing_http);
        let pod = TaskSettings::new(&o, &none, None, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pod.network,
            Network {
                sockets: true,
                outgoing_http: true,
                max_sockets: 64,
                outgoing_timeout: Duration::from_secs(30),
            }
        );
        let off = Options::from_toml("sockets = false\noutgoing_http = false\nmax_sockets = 3")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!off.network());
        let t = TaskSettings::new(&off, &none, None, true).unwrap_or_else(|e| panic!("{e}"));
        assert!(!t.network.sockets && !t.network.outgoing_http);
        let http_only = Options::from_toml("sockets = false").unwrap_or_else(|e| panic!("{e}"));
        assert!(http_only.network());
        let t = TaskSettings::new(&http_only, &none, None, true).unwrap_or_else(|e| panic!("{e}"));
        assert!(!t.network.sockets && t.network.outgoing_http);
        for (toml, want) in [
            ("max_sockets = 0", "options: max_sockets must be at least 1"),
            ("outgoing_timeout_ms = 0", "options: outgoing_timeout_ms"),
            ("sockets = \"yes\"", "sockets"),
            ("socket = true", "socket"),
        ] {
            let e = Options::from_toml(toml).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains(want)),
                "{toml}: {e:?}"
            );
        }
    }

    #[test]
    fn unenforced_allow_list() {
        let o = Options {
            allow_unenforced: vec!["process.user".into(), "linux.resources.blockIO".into()],
            ..Options::default()
        };
        assert!(o.allows_unenforced("process.user"));
        assert!(o.allows_unenforced("process.user.uid"));
        assert!(o.allows_unenforced("linux.resources.blockIO.weight"));
        assert!(!o.allows_unenforced("process.username"));
        assert!(!o.allows_unenforced("linux.seccomp"));
        let all = Options {
            allow_unenforced: vec!["*".into()],
            ..Options::default()
        };
        assert!(all.allows_unenforced("linux.seccomp"));
    }
}
