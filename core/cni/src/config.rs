//! Network configuration as libcni and containerd read it: the files of a conf dir sorted by
//! name, the first valid one is the network; a single-plugin `.conf`/`.json` is wrapped into a
//! list. Only the fields this crate acts on are typed (`cniVersion`, `name`, `plugins[].type`,
//! `plugins[].capabilities`, `disableCheck`); everything else is the plugin's and goes to it
//! untouched, so the parse is not strict about unknown keys.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Where libcni, containerd and kubelet look for network configs.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";

/// A config file larger than this is refused before it is parsed.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The `cniVersion`s this crate speaks. 0.3.x configs run ADD and DEL (DEL without
/// `prevResult`, as the spec had it then); CHECK needs 0.4.0 or later. Debian 12's
/// `containernetworking-plugins` (1.1.1) speak all four.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Error while reading or validating a network config. Every variant names the file, and the
/// field where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading CNI config directory {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: reading", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: missing `{field}`", path.display())]
    Missing { path: PathBuf, field: String },
    #[error("{}: `{field}` {reason}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    /// No file in the directory holds a valid network; `invalid` says why each candidate was
    /// skipped.
    #[error("no valid CNI network config in {} ({} invalid)", dir.display(), invalid.len())]
    NoNetwork {
        dir: PathBuf,
        invalid: Vec<ConfigError>,
    },
}

/// The form of a config file, from its name (libcni's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfKind {
    /// `.conflist`: `{"cniVersion", "name", "plugins": [...]}`.
    List,
    /// `.conf` or `.json`: one plugin's config, which also carries `cniVersion` and `name`.
    Single,
}

impl ConfKind {
    /// The kind of a file from its extension, `None` for a file the conf dir ignores.
    pub fn from_path(path: &Path) -> Option<ConfKind> {
        match path.extension()?.to_str()? {
            "conflist" => Some(ConfKind::List),
            "conf" | "json" => Some(ConfKind::Single),
            _ => None,
        }
    }
}

/// A network: the ordered list of plugins ADD runs (DEL runs it in reverse).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    /// `disableCheck`: CHECK succeeds without calling the plugins.
    pub disable_check: bool,
    pub plugins: Vec<PluginConf>,
    /// The file it was read from (or the label given to [`NetworkList::parse`]).
    pub origin: PathBuf,
}

/// One plugin of a list: its `type` (the binary's file name) and its whole config object.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConf {
    pub plugin_type: String,
    conf: Map<String, Value>,
}

impl PluginConf {
    /// Whether the plugin declares `capabilities: {name: true}`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.conf
            .get("capabilities")
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The names of the capabilities the plugin declares.
    pub fn capabilities(&self) -> impl Iterator<Item = &str> {
        self.conf
            .get("capabilities")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
    }

    /// The config object as written in the file.
    pub fn conf(&self) -> &Map<String, Value> {
        &self.conf
    }
}

impl NetworkList {
    /// Reads and validates one config file; its kind comes from the extension (`.conflist`,
    /// `.conf`, `.json`).
    pub fn from_file(path: &Path) -> Result<NetworkList, ConfigError> {
        let kind = ConfKind::from_path(path).ok_or_else(|| ConfigError::Invalid {
            path: path.to_owned(),
            field: "(file name)".into(),
            reason: "must end in .conflist, .conf or .json".into(),
        })?;
        let bytes = read_bounded(path)?;
        NetworkList::parse(&bytes, kind, path)
    }

    /// Parses and validates a config; `origin` names it in errors.
    pub fn parse(bytes: &[u8], kind: ConfKind, origin: &Path) -> Result<NetworkList, ConfigError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|source| ConfigError::Json {
            path: origin.to_owned(),
            source,
        })?;
        let v = Validator { path: origin };
        let Value::Object(top) = value else {
            return Err(v.invalid("(top level)", "must be a JSON object"));
        };
        let cni_version = v.string(&top, "cniVersion", "cniVersion")?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(v.invalid(
                "cniVersion",
                format!(
                    "is {cni_version:?}, supported: {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = v.string(&top, "name", "name")?;
        if !valid_name(&name) {
            return Err(v.invalid(
                "name",
                format!(
                    "is {name:?}: letters, digits, `_`, `.`, `-`, starting with a letter or digit"
                ),
            ));
        }
        let (plugins, disable_check) = match kind {
            ConfKind::Single => (vec![v.plugin(top.clone(), "type")?], false),
            ConfKind::List => {
                let list = match top.get("plugins") {
                    None => return Err(v.missing("plugins")),
                    Some(Value::Array(list)) if list.is_empty() => {
                        return Err(v.invalid("plugins", "is empty"));
                    }
                    Some(Value::Array(list)) => list,
                    Some(_) => return Err(v.invalid("plugins", "must be an array")),
                };
                let plugins = list
                    .iter()
                    .enumerate()
                    .map(|(i, p)| match p {
                        Value::Object(conf) => {
                            v.plugin(conf.clone(), &format!("plugins[{i}].type"))
                        }
                        _ => Err(v.invalid(&format!("plugins[{i}]"), "must be an object")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let disable_check = match top.get("disableCheck") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    // libcni also takes the strings.
                    Some(Value::String(s)) if s == "true" => true,
                    Some(Value::String(s)) if s == "false" => false,
                    Some(_) => return Err(v.invalid("disableCheck", "must be true or false")),
                };
                (plugins, disable_check)
            }
        };
        Ok(NetworkList {
            name,
            cni_version,
            disable_check,
            plugins,
            origin: origin.to_owned(),
        })
    }
}

/// The network of a conf dir: its `*.conflist`, `*.conf` and `*.json` files sorted by name, the
/// first that is valid. Invalid files are logged and skipped (kubelet's and cnitool's rule); if
/// none is valid the error lists why each was skipped.
pub fn load_dir(dir: &Path) -> Result<NetworkList, ConfigError> {
    let read_dir_err = |source| ConfigError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_err)? {
        let path = entry.map_err(read_dir_err)?.path();
        // A symlink to a file counts, as in libcni.
        if ConfKind::from_path(&path).is_some() && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut invalid = Vec::new();
    for path in files {
        match NetworkList::from_file(&path) {
            Ok(list) => {
                tracing::debug!(network = %list.name, path = %path.display(), "CNI network config");
                return Ok(list);
            }
            Err(err) => {
                tracing::warn!(error = %switchyard_base::chain(&err), "skipping CNI config");
                invalid.push(err);
            }
        }
    }
    Err(ConfigError::NoNetwork {
        dir: dir.to_owned(),
        invalid,
    })
}

/// Reads a file of at most [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    // One byte more than the cap tells a file at the cap from a larger one, even if it grows
    // while being read.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    Ok(bytes)
}

/// libcni's rule for network names and container ids: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub(crate) fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The kernel's rule for interface names (`dev_valid_name`), `IFNAMSIZ` included.
pub(crate) fn valid_if_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// A plugin type names a file in the plugin directories, never a path.
pub(crate) fn valid_plugin_type(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\0'])
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn missing(&self, field: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.to_owned(),
            field: field.to_owned(),
        }
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// A required, non-empty string; `shown` is the field's name in errors.
    fn string(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        shown: &str,
    ) -> Result<String, ConfigError> {
        match obj.get(key) {
            None => Err(self.missing(shown)),
            Some(Value::String(s)) if s.is_empty() => Err(self.invalid(shown, "is empty")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.invalid(shown, "must be a string")),
        }
    }

    fn plugin(&self, conf: Map<String, Value>, shown: &str) -> Result<PluginConf, ConfigError> {
        let plugin_type = self.string(&conf, "type", shown)?;
        if !valid_plugin_type(&plugin_type) {
            return Err(self.invalid(
                shown,
                format!("is {plugin_type:?}: must be a file name, without `/` or `..`"),
            ));
        }
        if let Some(caps) = conf.get("capabilities")
            && !caps.is_object()
        {
            let field = shown.replace("type", "capabilities");
            return Err(self.invalid(&field, "must be an object"));
        }
        Ok(PluginConf { plugin_type, conf })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_base::chain;

    const LIST: &str = r#"{
        "cniVersion": "1.0.0", "name": "yardnet",
        "plugins": [
            {"type": "bridge", "bridge": "yard0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}}
        ]
    }"#;

    fn write(dir: &Path, name: &str, body: &str) {
        fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn parses_a_conflist() {
        let l =
            NetworkList::parse(LIST.as_bytes(), ConfKind::List, Path::new("x.conflist")).unwrap();
        assert_eq!(l.name, "yardnet");
        assert_eq!(l.cni_version, "1.0.0");
        assert!(!l.disable_check);
        let types: Vec<_> = l.plugins.iter().map(|p| p.plugin_type.as_str()).collect();
        assert_eq!(types, ["bridge", "portmap"]);
        assert!(l.plugins[1].has_capability("portMappings"));
        assert!(!l.plugins[1].has_capability("bandwidth"));
        assert_eq!(
            l.plugins[1].capabilities().collect::<Vec<_>>(),
            ["portMappings"]
        );
        assert_eq!(l.plugins[0].conf()["bridge"], "yard0");
    }

    #[test]
    fn a_single_conf_is_wrapped_into_a_list() {
        let conf =
            r#"{"cniVersion": "0.4.0", "name": "single", "type": "bridge", "isGateway": true}"#;
        let l =
            NetworkList::parse(conf.as_bytes(), ConfKind::Single, Path::new("10.conf")).unwrap();
        assert_eq!(l.name, "single");
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].plugin_type, "bridge");
        assert_eq!(l.plugins[0].conf()["isGateway"], true);
    }

    fn err(body: &str, kind: ConfKind) -> String {
        chain(&NetworkList::parse(body.as_bytes(), kind, Path::new("/c/net.conflist")).unwrap_err())
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let l = ConfKind::List;
        assert!(
            err("{", l).starts_with("/c/net.conflist: not valid JSON: "),
            "{}",
            err("{", l)
        );
        assert_eq!(
            err("[]", l),
            "/c/net.conflist: `(top level)` must be a JSON object"
        );
        assert_eq!(
            err(r#"{"name": "n", "plugins": []}"#, l),
            "/c/net.conflist: missing `cniVersion`"
        );
        assert_eq!(
            err(r#"{"cniVersion": "1.0.0", "plugins": []}"#, l),
            "/c/net.conflist: missing `name`"
        );
        assert_eq!(
            err(r#"{"cniVersion": "1.0.0", "name": 3}"#, l),
            "/c/net.conflist: `name` must be a string"
        );
        assert_eq!(
            err(r#"{"cniVersion": "0.2.0", "name": "n"}"#, l),
            "/c/net.conflist: `cniVersion` is \"0.2.0\", supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0"
        );
        assert_eq!(
            err(r#"{"cniVersion": "1.0.0", "name": "n"}"#, l),
            "/c/net.conflist: missing `plugins`"
        );
        assert_eq!(
            err(r#"{"cniVersion": "1.0.0", "name": "n", "plugins": []}"#, l),
            "/c/net.conflist: `plugins` is empty"
        );
        assert_eq!(
            err(
                r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}, {}]}"#,
                l
            ),
            "/c/net.conflist: missing `plugins[1].type`"
        );
        assert_eq!(
            err(
                r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}, 7]}"#,
                l
            ),
            "/c/net.conflist: `plugins[1]` must be an object"
        );
        assert_eq!(
            err(
                r#"{"cniVersion": "1.0.0", "name": "n/x", "plugins": [{"type": "a"}]}"#,
                l
            ),
            "/c/net.conflist: `name` is \"n/x\": letters, digits, `_`, `.`, `-`, starting with a letter or digit"
        );
        assert_eq!(
            err(
                r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a", "capabilities": 1}]}"#,
                l
            ),
            "/c/net.conflist: `plugins[0].capabilities` must be an object"
        );
        assert_eq!(
            err(r#"{"cniVersion": "1.0.0", "name": "n"}"#, ConfKind::Single),
            "/c/net.conflist: missing `type`"
        );
    }

    #[test]
    fn plugin_types_that_are_paths_are_refused() {
        for t in ["../bin/sh", "/usr/bin/true", "a/b", "..", ".", ""] {
            let body = format!(
                r#"{{"cniVersion": "1.0.0", "name": "n", "plugins": [{{"type": {}}}]}}"#,
                serde_json::to_string(t).unwrap()
            );
            let e = err(&body, ConfKind::List);
            assert!(
                e.starts_with("/c/net.conflist: `plugins[0].type` "),
                "{t}: {e}"
            );
        }
    }

    #[test]
    fn load_dir_takes_the_first_valid_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "README", "not a config");
        write(dir.path(), "05-broken.conflist", "{");
        write(
            dir.path(),
            "20-second.conf",
            r#"{"cniVersion": "1.0.0", "name": "second", "type": "bridge"}"#,
        );
        write(dir.path(), "10-first.conflist", LIST);
        let l = load_dir(dir.path()).unwrap();
        assert_eq!(l.name, "yardnet");
        assert_eq!(l.origin, dir.path().join("10-first.conflist"));

        fs::remove_file(dir.path().join("10-first.conflist")).unwrap();
        let l = load_dir(dir.path()).unwrap();
        assert_eq!(l.name, "second");
        assert_eq!(l.plugins.len(), 1);
    }

    #[test]
    fn load_dir_without_a_valid_file_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(matches!(&e, ConfigError::NoNetwork { invalid, .. } if invalid.is_empty()));

        write(
            dir.path(),
            "00.json",
            r#"{"cniVersion": "1.0.0", "name": "n"}"#,
        );
        let e = load_dir(dir.path()).unwrap_err();
        let ConfigError::NoNetwork { invalid, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(invalid.len(), 1);
        assert_eq!(
            chain(&invalid[0]),
            format!("{}: missing `type`", dir.path().join("00.json").display())
        );

        let e = load_dir(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(e, ConfigError::ReadDir { .. }));
    }

    #[test]
    fn a_file_over_the_cap_is_refused_unparsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.conflist");
        let mut body = String::from(r#"{"cniVersion": "1.0.0", "name": "n", "pad": ""#);
        body.push_str(&" ".repeat(MAX_CONFIG_BYTES as usize));
        body.push_str(r#"", "plugins": [{"type": "a"}]}"#);
        fs::write(&path, body).unwrap();
        let e = NetworkList::from_file(&path).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::TooLarge {
                    limit: MAX_CONFIG_BYTES,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn disable_check_takes_bools_and_libcnis_strings() {
        for (v, want) in [("true", true), ("\"true\"", true), ("false", false)] {
            let body = format!(
                r#"{{"cniVersion": "1.0.0", "name": "n", "disableCheck": {v}, "plugins": [{{"type": "a"}}]}}"#
            );
            let l = NetworkList::parse(body.as_bytes(), ConfKind::List, Path::new("x")).unwrap();
            assert_eq!(l.disable_check, want);
        }
    }
}
