//! The Wasm runtime's options: shim-wide settings from the runtime's options (switchyardd's
//! `[runtimes.wasm.options]`, or CRI's `ConfigPath`), and per-task settings from the bundle's
//! annotations, which win.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::{Error, Result};

/// Annotation prefix for per-task settings (`io.switchyard.wasm.timeout-ms` and so on).
pub const ANNOTATION_PREFIX: &str = "io.switchyard.wasm.";
/// Environment variable (in the spec's `process.env`) that can carry the HTTP listen address,
/// for clients that cannot set annotations (containerd 1.6's `ctr run`).
pub const LISTEN_ENV: &str = "SWITCHYARD_HTTP_LISTEN";

/// Shim-wide options. The engine is built from the options of the first task a shim process
/// creates; tasks grouped into one shim come from the same runtime, so they agree.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Where compiled artifacts are cached (created if missing).
    pub cache_dir: PathBuf,
    /// Instance slots in the pooling allocator: the most tasks (plus in-flight HTTP requests)
    /// one shim process runs at once. 0 turns pooling off (on-demand allocation).
    pub max_instances: u32,
    /// Largest linear memory one instance may have, in MiB (a pool slot's size).
    pub max_memory_mib: u64,
    /// Default wall-clock limit for a task's run (or one HTTP request), in ms. 0: none.
    pub timeout_ms: u64,
    /// Fuel given to each task (or HTTP request); 0 turns fuel metering off.
    pub fuel: u64,
    /// Default listen address for HTTP components.
    pub http_listen: String,
    /// Put every task of this runtime in one shim per namespace (read by `start` from the
    /// bundle's `options.json`; the group annotations win).
    pub group: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_dir: PathBuf::from("/var/cache/switchyard/wasm"),
            max_instances: 1000,
            max_memory_mib: 256,
            timeout_ms: 0,
            fuel: 0,
            http_listen: "127.0.0.1:8080".into(),
            group: String::new(),
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
        Ok(())
    }
}

/// Per-task settings: the options' defaults, then annotations, then the spec's memory limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSettings {
    pub timeout: Option<Duration>,
    pub fuel: Option<u64>,
    /// Linear memory limit in bytes (the spec's `linux.resources.memory.limit`).
    pub memory_limit: Option<u64>,
    pub http_listen: String,
}

impl TaskSettings {
    pub fn new(
        options: &Options,
        annotations: &HashMap<String, String>,
        env: &[(String, String)],
        memory_limit: Option<i64>,
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
        let timeout_ms = num("timeout-ms", options.timeout_ms)?;
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
        let http_listen = annotations
            .get(&format!("{ANNOTATION_PREFIX}http-listen"))
            .cloned()
            .or_else(|| {
                env.iter()
                    .find(|(k, _)| k == LISTEN_ENV)
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| options.http_listen.clone());
        Ok(TaskSettings {
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
            fuel: (fuel > 0).then_some(fuel),
            memory_limit,
            http_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn task_settings() {
        let o = Options::default();
        let mut ann = HashMap::new();
        ann.insert("io.switchyard.wasm.timeout-ms".to_owned(), "250".to_owned());
        let env = vec![(LISTEN_ENV.to_owned(), "127.0.0.1:9000".to_owned())];
        let t = TaskSettings::new(&o, &ann, &env, Some(64 << 20)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.timeout, Some(Duration::from_millis(250)));
        assert_eq!(t.memory_limit, Some(64 << 20));
        assert_eq!(t.http_listen, "127.0.0.1:9000");
        ann.insert(
            "io.switchyard.wasm.timeout-ms".to_owned(),
            "soon".to_owned(),
        );
        let e = TaskSettings::new(&o, &ann, &[], None)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("annotations.io.switchyard.wasm.timeout-ms")));
        ann.clear();
        ann.insert("io.switchyard.wasm.fuel".to_owned(), "10".to_owned());
        assert!(TaskSettings::new(&o, &ann, &[], None).is_err());
    }
}
