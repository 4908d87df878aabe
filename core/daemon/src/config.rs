//! switchyardd's configuration: strict TOML laid over an embedded default.
//!
//! Parsing is two steps: the file is read into [`ConfigFile`] (every field optional, unknown keys
//! rejected, so TOML errors point at the line), laid over the embedded default, and the result is
//! validated as a whole; validation errors name the key and the offending value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// The only configuration version this switchyardd reads.
pub const VERSION: u32 = 1;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub root: PathBuf,
    pub state: PathBuf,
    pub default_runtime: String,
    pub grpc_address: PathBuf,
    pub ttrpc_address: PathBuf,
    pub shim: ShimConfig,
    pub log_level: String,
    pub runtimes: BTreeMap<String, RuntimeConfig>,
    /// `[images] snapshotter`: `None` picks overlayfs where it works, copies elsewhere.
    pub snapshotter: Option<switchyard_images::snapshot::Driver>,
    /// `[images] registry_config_path`: registry hosts in containerd's `hosts.toml` layout;
    /// `None` pulls from the registry a reference names and nothing else.
    pub registry_config_path: Option<PathBuf>,
    pub cri: CriConfig,
}

/// `[cri]`: Kubernetes' CRI on the daemon's socket (docs/cri.md).
#[derive(Debug, Clone, PartialEq)]
pub struct CriConfig {
    /// Where CNI network configs are read (the first by name is the pod network).
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries are looked up, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The image of the pause container a pod gets on a runtime that needs one (a foreign
    /// runtime; ours hold a pod without a process).
    pub sandbox_image: String,
    /// The static `yard-pause` switchyardd builds the default `sandbox_image` from, when that
    /// is missing from the image store (`cri::pause_image`).
    pub pause_binary: PathBuf,
    /// The streaming server's address (Exec, Attach, PortForward URLs point there).
    pub stream_address: std::net::IpAddr,
    /// Its TCP port; 0 picks a free one at start, as containerd does.
    pub stream_port: u16,
    /// TLS for it: a PEM certificate chain and its private key (both or neither).
    pub stream_tls: Option<StreamTls>,
}

/// The streaming server's certificate and key files (PEM).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShimConfig {
    pub start_timeout: Duration,
    pub delete_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub debug: bool,
}

/// One `[runtimes.NAME]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub runtime_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<toml::Table>,
}

/// The file form: everything optional so a file can set just what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    version: Option<u32>,
    root: Option<PathBuf>,
    state: Option<PathBuf>,
    default_runtime: Option<String>,
    grpc: Option<GrpcFile>,
    ttrpc: Option<TtrpcFile>,
    shim: Option<ShimFile>,
    log: Option<LogFile>,
    images: Option<ImagesFile>,
    cri: Option<CriFile>,
    runtimes: Option<BTreeMap<String, RuntimeConfig>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CriFile {
    cni_conf_dir: Option<PathBuf>,
    cni_bin_dirs: Option<Vec<PathBuf>>,
    sandbox_image: Option<String>,
    pause_binary: Option<PathBuf>,
    stream_address: Option<String>,
    stream_port: Option<u16>,
    stream_tls_cert: Option<PathBuf>,
    stream_tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesFile {
    snapshotter: Option<String>,
    registry_config_path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcFile {
    address: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TtrpcFile {
    address: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShimFile {
    start_timeout_ms: Option<u64>,
    delete_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    debug: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFile {
    level: Option<String>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse config {origin}")]
    Parse {
        origin: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config {origin}: {key} = {value}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        reason: String,
    },
}

/// Longest path a Unix socket address can hold (sun_path less the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Config {
    /// The embedded default.
    pub fn default_config() -> Result<Config, ConfigError> {
        Self::from_layers(DEFAULT_TOML, None, "<embedded default>")
    }

    /// Reads `path` and lays it over the embedded default.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_layers(DEFAULT_TOML, Some(&text), &path.display().to_string())
    }

    /// Parses `text` (as if read from `origin`) over the embedded default.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::from_layers(DEFAULT_TOML, Some(text), origin)
    }

    fn from_layers(base: &str, over: Option<&str>, origin: &str) -> Result<Config, ConfigError> {
        let base: ConfigFile = parse_file(base, "<embedded default>")?;
        let file = match over {
            Some(text) => parse_file(text, origin)?,
            None => ConfigFile::default(),
        };
        let merged = merge(base, file);
        validate(merged, origin)
    }

    /// The runtime used when a container names none.
    pub fn runtime(&self, name: &str) -> Option<&RuntimeConfig> {
        self.runtimes.get(name)
    }
}

fn parse_file(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_owned(),
        source: Box::new(source),
    })
}

fn merge(base: ConfigFile, over: ConfigFile) -> ConfigFile {
    fn pick<T>(over: Option<T>, base: Option<T>) -> Option<T> {
        over.or(base)
    }
    let base_grpc = base.grpc.unwrap_or_default();
    let over_grpc = over.grpc.unwrap_or_default();
    let base_ttrpc = base.ttrpc.unwrap_or_default();
    let over_ttrpc = over.ttrpc.unwrap_or_default();
    let base_shim = base.shim.unwrap_or_default();
    let over_shim = over.shim.unwrap_or_default();
    let base_log = base.log.unwrap_or_default();
    let over_log = over.log.unwrap_or_default();
    let base_images = base.images.unwrap_or_default();
    let over_images = over.images.unwrap_or_default();
    let base_cri = base.cri.unwrap_or_default();
    let over_cri = over.cri.unwrap_or_default();
    let mut runtimes = base.runtimes.unwrap_or_default();
    runtimes.extend(over.runtimes.unwrap_or_default());
    ConfigFile {
        version: pick(over.version, base.version),
        root: pick(over.root, base.root),
        state: pick(over.state, base.state),
        default_runtime: pick(over.default_runtime, base.default_runtime),
        grpc: Some(GrpcFile {
            address: pick(over_grpc.address, base_grpc.address),
        }),
        ttrpc: Some(TtrpcFile {
            address: pick(over_ttrpc.address, base_ttrpc.address),
        }),
        shim: Some(ShimFile {
            start_timeout_ms: pick(over_shim.start_timeout_ms, base_shim.start_timeout_ms),
            delete_timeout_ms: pick(over_shim.delete_timeout_ms, base_shim.delete_timeout_ms),
            shutdown_timeout_ms: pick(over_shim.shutdown_timeout_ms, base_shim.shutdown_timeout_ms),
            debug: pick(over_shim.debug, base_shim.debug),
        }),
        log: Some(LogFile {
            level: pick(over_log.level, base_log.level),
        }),
        images: Some(ImagesFile {
            snapshotter: pick(over_images.snapshotter, base_images.snapshotter),
            registry_config_path: pick(
                over_images.registry_config_path,
                base_images.registry_config_path,
            ),
        }),
        cri: Some(CriFile {
            cni_conf_dir: pick(over_cri.cni_conf_dir, base_cri.cni_conf_dir),
            cni_bin_dirs: pick(over_cri.cni_bin_dirs, base_cri.cni_bin_dirs),
            sandbox_image: pick(over_cri.sandbox_image, base_cri.sandbox_image),
            pause_binary: pick(over_cri.pause_binary, base_cri.pause_binary),
            stream_address: pick(over_cri.stream_address, base_cri.stream_address),
            stream_port: pick(over_cri.stream_port, base_cri.stream_port),
            stream_tls_cert: pick(over_cri.stream_tls_cert, base_cri.stream_tls_cert),
            stream_tls_key: pick(over_cri.stream_tls_key, base_cri.stream_tls_key),
        }),
        runtimes: Some(runtimes),
    }
}

struct Validator<'a> {
    origin: &'a str,
}

impl Validator<'_> {
    fn invalid(&self, key: &str, value: impl std::fmt::Display, reason: &str) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.to_owned(),
            value: value.to_string(),
            reason: reason.to_owned(),
        }
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.invalid(key, "(missing)", "required"))
    }

    fn absolute(&self, key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(self.invalid(key, quoted(&path), "must be an absolute path"))
        }
    }

    fn socket(&self, key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
        let path = self.absolute(key, path)?;
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(self.invalid(
                key,
                quoted(&path),
                &format!("a Unix socket path is at most {MAX_SOCKET_PATH} bytes"),
            ));
        }
        Ok(path)
    }

    fn timeout(&self, key: &str, ms: Option<u64>) -> Result<Duration, ConfigError> {
        let ms = self.required(key, ms)?;
        if ms == 0 {
            return Err(self.invalid(key, ms, "must be greater than 0"));
        }
        Ok(Duration::from_millis(ms))
    }
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn validate(file: ConfigFile, origin: &str) -> Result<Config, ConfigError> {
    let v = Validator { origin };
    let version = v.required("version", file.version)?;
    if version != VERSION {
        return Err(v.invalid(
            "version",
            version,
            &format!("this switchyardd reads version {VERSION}"),
        ));
    }
    let root = v.absolute("root", v.required("root", file.root)?)?;
    let state = v.absolute("state", v.required("state", file.state)?)?;
    let grpc = file.grpc.unwrap_or_default();
    let grpc_address = v.socket("grpc.address", v.required("grpc.address", grpc.address)?)?;
    let ttrpc_address = match file.ttrpc.unwrap_or_default().address {
        Some(p) if !p.as_os_str().is_empty() => v.socket("ttrpc.address", p)?,
        _ => {
            let mut s = grpc_address.clone().into_os_string();
            s.push(".ttrpc");
            v.socket("ttrpc.address", PathBuf::from(s))?
        }
    };
    if ttrpc_address == grpc_address {
        return Err(v.invalid(
            "ttrpc.address",
            quoted(&ttrpc_address),
            "must differ from grpc.address",
        ));
    }
    let shim = file.shim.unwrap_or_default();
    let shim = ShimConfig {
        start_timeout: v.timeout("shim.start_timeout_ms", shim.start_timeout_ms)?,
        delete_timeout: v.timeout("shim.delete_timeout_ms", shim.delete_timeout_ms)?,
        shutdown_timeout: v.timeout("shim.shutdown_timeout_ms", shim.shutdown_timeout_ms)?,
        debug: shim.debug.unwrap_or(false),
    };
    let log_level = v.required("log.level", file.log.unwrap_or_default().level)?;
    if !matches!(
        log_level.as_str(),
        "error" | "warn" | "info" | "debug" | "trace"
    ) {
        return Err(v.invalid(
            "log.level",
            format!("{log_level:?}"),
            "expected one of error, warn, info, debug, trace",
        ));
    }
    use switchyard_images::snapshot::Driver;
    let images = file.images.unwrap_or_default();
    let registry_config_path = match images.registry_config_path {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(v.absolute("images.registry_config_path", p)?),
        None => None,
    };
    let snapshotter = match images.snapshotter.as_deref() {
        None | Some("auto") => None,
        Some("overlayfs") => Some(Driver::Overlay),
        Some("copy") => Some(Driver::Copy),
        Some(other) => {
            return Err(v.invalid(
                "images.snapshotter",
                format!("{other:?}"),
                "expected \"auto\", \"overlayfs\" or \"copy\"",
            ));
        }
    };
    let cri = file.cri.unwrap_or_default();
    let cri = CriConfig {
        cni_conf_dir: v.absolute(
            "cri.cni_conf_dir",
            v.required("cri.cni_conf_dir", cri.cni_conf_dir)?,
        )?,
        cni_bin_dirs: v
            .required("cri.cni_bin_dirs", cri.cni_bin_dirs)?
            .into_iter()
            .map(|d| v.absolute("cri.cni_bin_dirs", d))
            .collect::<Result<_, _>>()?,
        sandbox_image: {
            let image = v.required("cri.sandbox_image", cri.sandbox_image)?;
            if image.is_empty() || image.len() > 255 || image.chars().any(char::is_whitespace) {
                return Err(v.invalid(
                    "cri.sandbox_image",
                    format!("{image:?}"),
                    "an image reference (at most 255 characters, no spaces)",
                ));
            }
            image
        },
        pause_binary: v.absolute(
            "cri.pause_binary",
            v.required("cri.pause_binary", cri.pause_binary)?,
        )?,
        stream_address: {
            let a = v.required("cri.stream_address", cri.stream_address)?;
            a.parse().map_err(|_| {
                v.invalid(
                    "cri.stream_address",
                    format!("{a:?}"),
                    "an IP address (127.0.0.1 keeps the streaming server on the node)",
                )
            })?
        },
        stream_port: v.required("cri.stream_port", cri.stream_port)?,
        stream_tls: match (cri.stream_tls_cert, cri.stream_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(StreamTls {
                cert: v.absolute("cri.stream_tls_cert", cert)?,
                key: v.absolute("cri.stream_tls_key", key)?,
            }),
            (Some(cert), None) => {
                return Err(v.invalid(
                    "cri.stream_tls_key",
                    "(missing)",
                    &format!("required with cri.stream_tls_cert ({})", quoted(&cert)),
                ));
            }
            (None, Some(key)) => {
                return Err(v.invalid(
                    "cri.stream_tls_cert",
                    "(missing)",
                    &format!("required with cri.stream_tls_key ({})", quoted(&key)),
                ));
            }
        },
    };
    let runtimes = file.runtimes.unwrap_or_default();
    for (name, rt) in &runtimes {
        let key = |k: &str| format!("runtimes.{name}.{k}");
        if !crate::ident::is_valid(name) {
            return Err(v.invalid(
                &format!("runtimes.{name}"),
                format!("{name:?}"),
                "a runtime name is letters, digits and single '.', '_' or '-' between them",
            ));
        }
        if crate::runtime::resolve::binary_name(&rt.runtime_type).is_none() {
            return Err(v.invalid(
                &key("runtime_type"),
                format!("{:?}", rt.runtime_type),
                "expected io.containerd.NAME.VERSION (e.g. io.containerd.runc.v2)",
            ));
        }
        if let Some(path) = &rt.path {
            v.absolute(&key("path"), path.clone())?;
        }
        if let Some(options) = &rt.options {
            crate::runtime::options::encode(&rt.runtime_type, options)
                .map_err(|e| v.invalid(&key("options"), e.value(), &e.to_string()))?;
        }
    }
    let default_runtime = v.required("default_runtime", file.default_runtime)?;
    if !runtimes.contains_key(&default_runtime) {
        return Err(v.invalid(
            "default_runtime",
            format!("{default_runtime:?}"),
            "no such runtime under [runtimes]",
        ));
    }
    Ok(Config {
        root,
        state,
        default_runtime,
        grpc_address,
        ttrpc_address,
        shim,
        log_level,
        runtimes,
        snapshotter,
        registry_config_path,
        cri,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_complete() {
        let c = Config::default_config().unwrap();
        assert_eq!(c.default_runtime, "native");
        assert_eq!(c.grpc_address, Path::new("/run/switchyard/switchyard.sock"));
        assert_eq!(
            c.ttrpc_address,
            Path::new("/run/switchyard/switchyard.sock.ttrpc")
        );
        let types: Vec<_> = c
            .runtimes
            .values()
            .map(|r| r.runtime_type.as_str())
            .collect();
        assert!(types.contains(&"io.containerd.runc.v2"));
        assert!(types.contains(&"io.containerd.yard-native.v1"));
        assert!(types.contains(&"io.containerd.yard-vm.v1"));
        assert!(types.contains(&"io.containerd.yard-wasm.v1"));
    }

    #[test]
    fn file_overrides_default_and_keeps_the_rest() {
        let c = Config::parse(
            "root = \"/tmp/r\"\n[grpc]\naddress = \"/tmp/s.sock\"\n[runtimes.extra]\nruntime_type = \"io.containerd.extra.v1\"\npath = \"/opt/x\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.root, Path::new("/tmp/r"));
        assert_eq!(c.state, Path::new("/run/switchyard"));
        assert_eq!(c.ttrpc_address, Path::new("/tmp/s.sock.ttrpc"));
        assert!(c.runtimes.contains_key("runc"));
        assert_eq!(
            c.runtimes["extra"].path.as_deref(),
            Some(Path::new("/opt/x"))
        );
    }

    fn err(text: &str) -> String {
        crate::error::chain(&Config::parse(text, "bad.toml").unwrap_err())
    }

    #[test]
    fn snapshotter_is_checked() {
        let e = err("[images]\nsnapshotter = \"zfs\"\n");
        assert!(e.contains("images.snapshotter") && e.contains("zfs"), "{e}");
        let c = Config::parse("[images]\nsnapshotter = \"copy\"\n", "x.toml").unwrap();
        assert_eq!(
            c.snapshotter,
            Some(switchyard_images::snapshot::Driver::Copy)
        );
        assert_eq!(Config::parse("", "x.toml").unwrap().snapshotter, None);
    }

    #[test]
    fn stream_tls_takes_both_files_or_neither() {
        assert_eq!(Config::default_config().unwrap().cri.stream_tls, None);
        let c = Config::parse(
            "[cri]\nstream_tls_cert = \"/etc/s.pem\"\nstream_tls_key = \"/etc/k.pem\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(
            c.cri.stream_tls,
            Some(StreamTls {
                cert: "/etc/s.pem".into(),
                key: "/etc/k.pem".into()
            })
        );
        let e = err("[cri]\nstream_tls_cert = \"/etc/s.pem\"\n");
        assert!(
            e.contains("cri.stream_tls_key") && e.contains("/etc/s.pem"),
            "{e}"
        );
        let e = err("[cri]\nstream_tls_key = \"/etc/k.pem\"\n");
        assert!(e.contains("cri.stream_tls_cert"), "{e}");
        let e = err("[cri]\nstream_tls_cert = \"s.pem\"\nstream_tls_key = \"/k\"\n");
        assert!(
            e.contains("cri.stream_tls_cert") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn sandbox_image_has_a_default_and_is_checked() {
        assert_eq!(
            Config::default_config().unwrap().cri.sandbox_image,
            "switchyard.local/pause:3.10"
        );
        let c = Config::parse("[cri]\nsandbox_image = \"example/pause:1\"\n", "x.toml").unwrap();
        assert_eq!(c.cri.sandbox_image, "example/pause:1");
        for bad in ["", "a b"] {
            let e = err(&format!("[cri]\nsandbox_image = \"{bad}\"\n"));
            assert!(e.contains("cri.sandbox_image"), "{e}");
        }
    }

    #[test]
    fn pause_binary_has_a_default_and_is_absolute() {
        let c = Config::default_config().unwrap();
        assert_eq!(
            c.cri.pause_binary,
            Path::new("/usr/local/lib/switchyard/yard-pause")
        );
        let c = Config::parse("[cri]\npause_binary = \"/opt/yard-pause\"\n", "x.toml").unwrap();
        assert_eq!(c.cri.pause_binary, Path::new("/opt/yard-pause"));
        let e = err("[cri]\npause_binary = \"yard-pause\"\n");
        assert!(
            e.contains("cri.pause_binary = \"yard-pause\"") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn registry_config_path_is_optional_and_absolute() {
        assert_eq!(Config::default_config().unwrap().registry_config_path, None);
        let c = Config::parse(
            "[images]\nregistry_config_path = \"/etc/containerd/certs.d\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(
            c.registry_config_path.as_deref(),
            Some(Path::new("/etc/containerd/certs.d"))
        );
        let e = err("[images]\nregistry_config_path = \"certs.d\"\n");
        assert!(
            e.contains("images.registry_config_path = \"certs.d\"") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = err("version = 1\nroots = \"/x\"\n");
        assert!(e.contains("bad.toml"), "{e}");
        assert!(e.contains("roots"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn malformed_toml_is_refused() {
        let e = err("root = \n");
        assert!(e.contains("parse config bad.toml"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = err("version = 2\n");
        assert!(e.contains("version = 2"), "{e}");
        let e = err("root = \"relative\"\n");
        assert!(e.contains("root = \"relative\""), "{e}");
        assert!(e.contains("absolute"), "{e}");
        let e = err("default_runtime = \"nosuch\"\n");
        assert!(e.contains("default_runtime = \"nosuch\""), "{e}");
        let e = err("[runtimes.x]\nruntime_type = \"runc\"\n");
        assert!(e.contains("runtimes.x.runtime_type = \"runc\""), "{e}");
        let e = err("[shim]\nstart_timeout_ms = 0\n");
        assert!(e.contains("shim.start_timeout_ms = 0"), "{e}");
        let e = err("[log]\nlevel = \"loud\"\n");
        assert!(e.contains("log.level"), "{e}");
        let long = format!("[grpc]\naddress = \"/{}\"\n", "a".repeat(120));
        assert!(err(&long).contains("grpc.address"));
    }

    #[test]
    fn runtime_table_rejects_unknown_keys_and_bad_runc_options() {
        let e = err("[runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\nbinary = \"x\"\n");
        assert!(e.contains("binary"), "{e}");
        let e = err(
            "[runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n[runtimes.runc.options]\nNoSuchOption = true\n",
        );
        assert!(e.contains("runtimes.runc.options"), "{e}");
        assert!(e.contains("NoSuchOption"), "{e}");
    }
}
