//! Task routing: which shim binary runs a task, from the runtime a container names.
//!
//! A container's runtime is a configured runtime name (`runc`), a runtime type
//! (`io.containerd.runc.v2`, as ctr sends), or an absolute path to a shim binary. Types map to
//! binaries by containerd's rule; binaries are looked up next to switchyardd, then on `PATH`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use prost_types::Any;

use crate::config::{Config, RuntimeConfig};
use crate::error::{Classify, Kind};

/// containerd's `BinaryName`: `io.containerd.NAME.VERSION` → `containerd-shim-NAME-VERSION`.
pub fn binary_name(runtime_type: &str) -> Option<String> {
    let parts: Vec<&str> = runtime_type.split('.').collect();
    if parts.len() < 3 || parts[0].is_empty() {
        return None;
    }
    let (name, version) = (parts[parts.len() - 2], parts[parts.len() - 1]);
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    (ok(name) && ok(version)).then(|| format!("containerd-shim-{name}-{version}"))
}

/// A runtime resolved to the binary that serves it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The configured name, or the runtime string itself when it is not configured.
    pub name: String,
    pub runtime_type: String,
    pub binary: PathBuf,
    /// Options from the configuration, encoded for the shim.
    pub options: Option<Any>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "unknown runtime {runtime:?}: not a configured runtime name ({known}), not a runtime type like io.containerd.runc.v2, and not an absolute path to a shim"
    )]
    Unknown { runtime: String, known: String },
    #[error("runtime {runtime:?}: shim binary {binary} not found (looked in {searched})")]
    BinaryNotFound {
        runtime: String,
        binary: String,
        searched: String,
    },
    #[error("runtime {runtime:?}: shim binary {} is not an executable file", path.display())]
    NotExecutable { runtime: String, path: PathBuf },
    #[error("runtime {runtime:?}: options")]
    Options {
        runtime: String,
        #[source]
        source: super::options::OptionsError,
    },
}

impl Classify for ResolveError {
    fn kind(&self) -> Kind {
        match self {
            ResolveError::Unknown { .. } => Kind::NotFound,
            ResolveError::BinaryNotFound { .. } | ResolveError::NotExecutable { .. } => {
                Kind::FailedPrecondition
            }
            ResolveError::Options { .. } => Kind::InvalidArgument,
        }
    }
}

/// The configured runtimes plus the places shim binaries are looked up.
#[derive(Debug, Clone)]
pub struct Runtimes {
    configured: BTreeMap<String, RuntimeConfig>,
    default: String,
    search: Vec<PathBuf>,
}

/// What `yard info` and `ctr plugins ls` show for one configured runtime.
#[derive(Debug, Clone)]
pub struct RuntimeStatus {
    pub name: String,
    pub runtime_type: String,
    pub is_default: bool,
    pub binary: Result<PathBuf, String>,
    /// The configured options table as JSON (`{}` without options).
    pub options_json: String,
}

impl Runtimes {
    pub fn new(config: &Config) -> Self {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned));
        Self::with_search(config, exe_dir, std::env::var_os("PATH"))
    }

    pub fn with_search(config: &Config, exe_dir: Option<PathBuf>, path: Option<OsString>) -> Self {
        let mut search: Vec<PathBuf> = exe_dir.into_iter().collect();
        if let Some(path) = path {
            search.extend(std::env::split_paths(&path).filter(|p| p.is_absolute()));
        }
        Self {
            configured: config.runtimes.clone(),
            default: config.default_runtime.clone(),
            search,
        }
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Resolves a container's runtime (empty: the default runtime).
    pub fn resolve(&self, runtime: &str) -> Result<Resolved, ResolveError> {
        let runtime = if runtime.is_empty() {
            self.default.as_str()
        } else {
            runtime
        };
        if let Some(rc) = self.configured.get(runtime) {
            return self.resolve_configured(runtime, rc);
        }
        if Path::new(runtime).is_absolute() {
            let path = PathBuf::from(runtime);
            check_executable(runtime, &path)?;
            return Ok(Resolved {
                name: runtime.to_owned(),
                runtime_type: runtime.to_owned(),
                binary: path,
                options: None,
            });
        }
        if let Some((name, rc)) = self
            .configured
            .iter()
            .find(|(_, rc)| rc.runtime_type == runtime)
        {
            return self.resolve_configured(name, rc);
        }
        if let Some(binary) = binary_name(runtime) {
            return Ok(Resolved {
                name: runtime.to_owned(),
                runtime_type: runtime.to_owned(),
                binary: self.find(runtime, &binary)?,
                options: None,
            });
        }
        Err(ResolveError::Unknown {
            runtime: runtime.to_owned(),
            known: self
                .configured
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn resolve_configured(&self, name: &str, rc: &RuntimeConfig) -> Result<Resolved, ResolveError> {
        let binary = match &rc.path {
            Some(path) => {
                if !path.exists() {
                    return Err(ResolveError::BinaryNotFound {
                        runtime: name.to_owned(),
                        binary: path.display().to_string(),
                        searched: format!("runtimes.{name}.path"),
                    });
                }
                check_executable(name, path)?;
                path.clone()
            }
            None => {
                // Validated at config load; a type without a binary name cannot get here.
                let file = binary_name(&rc.runtime_type).unwrap_or_default();
                self.find(name, &file)?
            }
        };
        let options = rc
            .options
            .as_ref()
            .map(|t| super::options::encode(&rc.runtime_type, t))
            .transpose()
            .map_err(|source| ResolveError::Options {
                runtime: name.to_owned(),
                source,
            })?;
        Ok(Resolved {
            name: name.to_owned(),
            runtime_type: rc.runtime_type.clone(),
            binary,
            options,
        })
    }

    fn find(&self, runtime: &str, file: &str) -> Result<PathBuf, ResolveError> {
        for dir in &self.search {
            let candidate = dir.join(file);
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
        }
        Err(ResolveError::BinaryNotFound {
            runtime: runtime.to_owned(),
            binary: file.to_owned(),
            searched: if self.search.is_empty() {
                "nowhere: no PATH".to_owned()
            } else {
                self.search
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            },
        })
    }

    /// Every configured runtime and whether its shim is installed.
    pub fn status(&self) -> Vec<RuntimeStatus> {
        self.configured
            .iter()
            .map(|(name, rc)| RuntimeStatus {
                name: name.clone(),
                runtime_type: rc.runtime_type.clone(),
                is_default: *name == self.default,
                binary: self
                    .resolve_configured(name, rc)
                    .map(|r| r.binary)
                    .map_err(|e| crate::error::chain(&e)),
                options_json: rc
                    .options
                    .as_ref()
                    .and_then(|t| serde_json::to_string(t).ok())
                    .unwrap_or_else(|| "{}".to_owned()),
            })
            .collect()
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn check_executable(runtime: &str, path: &Path) -> Result<(), ResolveError> {
    if is_executable_file(path) {
        Ok(())
    } else {
        Err(ResolveError::NotExecutable {
            runtime: runtime.to_owned(),
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names_follow_containerd() {
        assert_eq!(
            binary_name("io.containerd.runc.v2").as_deref(),
            Some("containerd-shim-runc-v2")
        );
        assert_eq!(
            binary_name("io.containerd.yard-native.v1").as_deref(),
            Some("containerd-shim-yard-native-v1")
        );
        assert_eq!(binary_name("runc"), None);
        assert_eq!(binary_name("io.containerd.runc."), None);
        assert_eq!(binary_name("io.containerd.ru/nc.v2"), None);
    }

    fn fake_shim(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn runtimes(dir: &Path, extra: &str) -> Runtimes {
        let config = Config::parse(extra, "t.toml").unwrap();
        Runtimes::with_search(&config, Some(dir.to_owned()), None)
    }

    #[test]
    fn resolves_names_types_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let runc = fake_shim(dir.path(), "containerd-shim-runc-v2");
        let native = fake_shim(dir.path(), "containerd-shim-yard-native-v1");
        let rts = runtimes(
            dir.path(),
            "[runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n[runtimes.runc.options]\nSystemdCgroup = false\n",
        );
        let r = rts.resolve("runc").unwrap();
        assert_eq!(r.binary, runc);
        assert!(r.options.is_some());
        // ctr names the type; the configured entry (and its options) still applies.
        let r = rts.resolve("io.containerd.runc.v2").unwrap();
        assert_eq!(r.name, "runc");
        assert!(r.options.is_some());
        // The default runtime.
        assert_eq!(rts.resolve("").unwrap().binary, native);
        // An absolute path is a shim binary.
        assert_eq!(rts.resolve(runc.to_str().unwrap()).unwrap().binary, runc);
    }

    #[test]
    fn unknown_and_missing_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let rts = runtimes(dir.path(), "");
        let e = rts.resolve("nosuch").unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound);
        assert!(e.to_string().contains("\"nosuch\""), "{e}");
        let e = rts.resolve("vm").unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        assert!(e.to_string().contains("containerd-shim-yard-vm-v1"), "{e}");
        let rts = runtimes(
            dir.path(),
            "[runtimes.x]\nruntime_type = \"io.containerd.x.v1\"\npath = \"/nonexistent/shim\"\n",
        );
        let e = rts.resolve("x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/shim"), "{e}");
        let status = rts.status();
        let x = status.iter().find(|s| s.name == "x").unwrap();
        assert!(x.binary.is_err());
    }
}
