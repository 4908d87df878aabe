//! ADD, DEL and CHECK of a network list (CNI spec 1.0, "Execution of Network Configurations"):
//! each plugin gets the `CNI_*` variables and, on stdin, its own config with the list's `name`
//! and `cniVersion`, the `prevResult` and the `runtimeConfig` its `capabilities` ask for.
//!
//! - ADD runs the plugins in order, each one's result the next one's `prevResult`; the last
//!   result is cached. If a plugin fails, DEL runs for it and every plugin before it (in reverse,
//!   with the last good result) so a half-made attachment leaks nothing.
//! - DEL runs the plugins in reverse with the cached result as `prevResult` (0.4.0 and later),
//!   whether or not the netns still exists; the plugins tolerate a missing one, as the spec asks.
//!   Every plugin runs even if one fails, and the first error is returned; the cache entry goes
//!   only when all succeeded, so a retry still has the `prevResult`.
//! - CHECK (0.4.0 and later) runs the plugins in order with the cached result.
//!
//! Calls block (a plugin is a process): an async caller runs them on a blocking thread.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::cache::{CacheEntry, CacheError, ResultCache};
use crate::config::{
    NetworkList, PluginConf, SUPPORTED_VERSIONS, valid_if_name, valid_name, valid_plugin_type,
};
use crate::exec::{ExecError, Exit, Invoker, PluginCall, PluginOutput, ProcessInvoker};
use crate::result::{CniResult, ErrorResult, ResultError};

/// Where Debian's `containernetworking-plugins` installs the plugins.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/cni";

/// How much of a failed plugin's stderr goes into its error.
const STDERR_IN_ERROR: usize = 4096;

/// The CNI command of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of one ADD, DEL or CHECK.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{command} of network {network}: plugin {plugin:?} is not in {dirs}")]
    PluginNotFound {
        command: Command,
        network: String,
        plugin: String,
        dirs: String,
    },
    /// A plugin failed; `source` says how (its own error result, a crash, a timeout).
    #[error("{command} of network {network}: plugin {plugin}")]
    Plugin {
        command: Command,
        network: String,
        plugin: String,
        #[source]
        source: PluginError,
    },
    #[error("CHECK of network {network}: no cached ADD result for {container_id} {if_name}")]
    NoCachedResult {
        network: String,
        container_id: String,
        if_name: String,
    },
    #[error("CHECK of network {network}: needs cniVersion 0.4.0 or later, not {version}")]
    CheckUnsupported { network: String, version: String },
    #[error("{command} of network {network}: result cache")]
    Cache {
        command: Command,
        network: String,
        #[source]
        source: CacheError,
    },
}

/// How one plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin's error result: `code`, `msg`, `details` as it printed them.
    #[error("{msg}{} (code {code})", if details.is_empty() { String::new() } else { format!(": {details}") })]
    Failed {
        code: u32,
        msg: String,
        details: String,
    },
    /// A non-zero exit without an error result on stdout; the start of stderr instead.
    #[error("{exit} without an error result{}", if stderr.is_empty() { String::new() } else { format!(", stderr: {stderr}") })]
    Crashed { exit: Exit, stderr: String },
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("ADD printed no result")]
    NoResult,
    #[error("ADD printed an invalid result")]
    BadResult(#[source] ResultError),
}

/// A port to forward from the host to the pod, as CRI's `PortMapping` gives it (the
/// `portMappings` capability).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// Only this host address; any when `None`.
    pub host_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// What the runtime knows and a plugin may ask for through `capabilities`, sent as
/// `runtimeConfig`. `portMappings` is typed; other capabilities (`bandwidth`, `ipRanges`, `dns`,
/// ...) go through `other` as the JSON the plugin expects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeConfig {
    pub port_mappings: Vec<PortMapping>,
    pub other: BTreeMap<String, Value>,
}

impl RuntimeConfig {
    /// The value of one capability, if the runtime has one for it.
    fn capability(&self, name: &str) -> Option<Value> {
        if name == "portMappings" {
            // CRI leaves `hostPort` 0 for a port it only declares; containerd skips those too.
            let maps = self.port_mappings.iter().filter(|m| m.host_port != 0);
            let list = maps
                .map(|m| {
                    let mut o = json!({
                        "hostPort": m.host_port,
                        "containerPort": m.container_port,
                        "protocol": m.protocol.as_str(),
                    });
                    if let Some(ip) = m.host_ip {
                        o["hostIP"] = ip.to_string().into();
                    }
                    o
                })
                .collect();
            return Some(Value::Array(list));
        }
        self.other.get(name).cloned()
    }
}

/// One container's attachment to a network: who it is, where, and with what.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub container_id: String,
    /// The network namespace (`CNI_NETNS`); for DEL it may be gone.
    pub netns: PathBuf,
    /// The interface inside it, `eth0` for a pod.
    pub if_name: String,
    /// `CNI_ARGS`, in order.
    pub args: Vec<(String, String)>,
    pub runtime: RuntimeConfig,
}

impl Attachment {
    pub fn new(container_id: &str, netns: &Path, if_name: &str) -> Attachment {
        Attachment {
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            if_name: if_name.to_owned(),
            args: Vec::new(),
            runtime: RuntimeConfig::default(),
        }
    }

    /// The `CNI_ARGS` containerd's CRI passes for a pod: `IgnoreUnknown=1` (so plugins that do
    /// not know a key still run), `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// `K8S_POD_INFRA_CONTAINER_ID` and, when known, `K8S_POD_UID`.
    pub fn with_pod(mut self, namespace: &str, name: &str, uid: Option<&str>) -> Attachment {
        let arg = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        self.args.push(arg("IgnoreUnknown", "1"));
        self.args.push(arg("K8S_POD_NAMESPACE", namespace));
        self.args.push(arg("K8S_POD_NAME", name));
        self.args
            .push(arg("K8S_POD_INFRA_CONTAINER_ID", &self.container_id));
        if let Some(uid) = uid {
            self.args.push(arg("K8S_POD_UID", uid));
        }
        self
    }

    pub fn with_port_mappings(mut self, maps: Vec<PortMapping>) -> Attachment {
        self.runtime.port_mappings = maps;
        self
    }

    fn validate(&self) -> Result<(), CniError> {
        let bad = |what, value: &str, reason| CniError::InvalidArgument {
            what,
            value: value.to_owned(),
            reason,
        };
        if !valid_name(&self.container_id) {
            return Err(bad(
                "container id",
                &self.container_id,
                "letters, digits, `_`, `.`, `-`, starting with a letter or digit",
            ));
        }
        if !valid_if_name(&self.if_name) {
            return Err(bad(
                "interface name",
                &self.if_name,
                "1 to 15 bytes, not `.` or `..`, without `/`, `:` or spaces",
            ));
        }
        if !self.netns.is_absolute() {
            let shown = self.netns.to_string_lossy();
            return Err(bad("netns path", &shown, "must be absolute"));
        }
        for (k, v) in &self.args {
            if k.is_empty() || k.contains(['=', ';', '\0']) {
                return Err(bad("CNI_ARGS key", k, "non-empty, without `=` or `;`"));
            }
            if v.contains([';', '\0']) {
                return Err(bad("CNI_ARGS value", v, "without `;`"));
            }
        }
        Ok(())
    }

    fn cni_args(&self) -> String {
        let pairs: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(";")
    }
}

/// A list built by hand rather than parsed (its fields are public) gets the parser's checks
/// that matter here: a plugin type is a file name, and there is a plugin.
fn validate_list(net: &NetworkList) -> Result<(), CniError> {
    let bad = |what, value: &str, reason| CniError::InvalidArgument {
        what,
        value: value.to_owned(),
        reason,
    };
    if !valid_name(&net.name) {
        return Err(bad(
            "network name",
            &net.name,
            "letters, digits, `_`, `.`, `-`",
        ));
    }
    if !SUPPORTED_VERSIONS.contains(&net.cni_version.as_str()) {
        return Err(bad("cniVersion", &net.cni_version, "not supported"));
    }
    if net.plugins.is_empty() {
        return Err(bad("network", &net.name, "has no plugins"));
    }
    for p in &net.plugins {
        if !valid_plugin_type(&p.plugin_type) {
            return Err(bad("plugin type", &p.plugin_type, "must be a file name"));
        }
    }
    Ok(())
}

/// The CNI runtime side: where the plugins are, where results are cached, how plugins run.
#[derive(Debug, Clone)]
pub struct Cni {
    bin_dirs: Vec<PathBuf>,
    cache: ResultCache,
    invoker: Arc<dyn Invoker>,
}

impl Cni {
    /// Plugins are looked up in `bin_dirs` in order (`CNI_PATH` lists them too); results are
    /// cached in `cache_dir` (created 0700 on first use). Plugins run under the default
    /// [`crate::exec::Limits`].
    pub fn new(bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> Result<Cni, CniError> {
        for d in &bin_dirs {
            let s = d.to_string_lossy();
            if !d.is_absolute() || s.contains(':') {
                return Err(CniError::InvalidArgument {
                    what: "plugin directory",
                    value: s.into_owned(),
                    reason: "must be absolute, without `:`",
                });
            }
        }
        if !cache_dir.is_absolute() {
            return Err(CniError::InvalidArgument {
                what: "cache directory",
                value: cache_dir.to_string_lossy().into_owned(),
                reason: "must be absolute",
            });
        }
        Ok(Cni {
            bin_dirs,
            cache: ResultCache::new(cache_dir),
            invoker: Arc::new(ProcessInvoker::default()),
        })
    }

    /// Runs plugins through `invoker` instead (other limits, or a test double).
    pub fn with_invoker(mut self, invoker: Arc<dyn Invoker>) -> Cni {
        self.invoker = invoker;
        self
    }

    pub fn cache(&self) -> &ResultCache {
        &self.cache
    }

    /// The cached ADD result of an attachment, if there is one.
    pub fn cached_result(
        &self,
        container_id: &str,
        if_name: &str,
    ) -> Result<Option<CniResult>, CacheError> {
        let Some(entry) = self.cache.read(container_id, if_name)? else {
            return Ok(None);
        };
        let path = self.cache.path(container_id, if_name)?;
        CniResult::from_value(entry.result)
            .map(Some)
            .map_err(|source| CacheError::BadResult { path, source })
    }

    /// ADD: attaches the container to the network and returns the last plugin's result.
    pub fn add(&self, net: &NetworkList, att: &Attachment) -> Result<CniResult, CniError> {
        att.validate()?;
        validate_list(net)?;
        // Every binary first: a missing one fails before anything is set up.
        let binaries = net
            .plugins
            .iter()
            .map(|p| self.find(Command::Add, net, p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut prev: Option<Value> = None;
        let mut result = None;
        for (i, (plugin, binary)) in net.plugins.iter().zip(&binaries).enumerate() {
            let step = self
                .call(Command::Add, net, plugin, binary, att, prev.as_ref())
                .and_then(|out| parse_add_result(&out.stdout));
            match step {
                Ok((value, parsed)) => {
                    if parsed.cni_version != net.cni_version {
                        tracing::warn!(network = %net.name, plugin = %plugin.plugin_type,
                            version = %parsed.cni_version, "plugin answered in another cniVersion");
                    }
                    prev = Some(value);
                    result = Some(parsed);
                }
                Err(source) => {
                    let err = CniError::Plugin {
                        command: Command::Add,
                        network: net.name.clone(),
                        plugin: plugin.plugin_type.clone(),
                        source,
                    };
                    self.roll_back(net, &net.plugins[..=i], &binaries[..=i], att, prev.as_ref());
                    return Err(err);
                }
            }
        }
        let (Some(value), Some(result)) = (prev, result) else {
            // validate_list made sure there is a plugin, so a result.
            return Err(CniError::Plugin {
                command: Command::Add,
                network: net.name.clone(),
                plugin: String::new(),
                source: PluginError::NoResult,
            });
        };
        let entry = CacheEntry::new(
            &att.container_id,
            &att.if_name,
            &net.name,
            &net.cni_version,
            &att.netns,
            value.clone(),
        );
        if let Err(source) = self.cache.write(&entry) {
            // Without the entry a DEL after a restart would lack its prevResult: undo.
            self.roll_back(net, &net.plugins, &binaries, att, Some(&value));
            return Err(CniError::Cache {
                command: Command::Add,
                network: net.name.clone(),
                source,
            });
        }
        tracing::info!(network = %net.name, container_id = %att.container_id,
            if_name = %att.if_name, "CNI ADD done");
        Ok(result)
    }

    /// DEL: detaches the container. Idempotent; the netns may already be gone.
    pub fn del(&self, net: &NetworkList, att: &Attachment) -> Result<(), CniError> {
        att.validate()?;
        validate_list(net)?;
        let (prev, ours) = self.cached_for_del(net, att);
        if let Some(err) = self.del_plugins(net, &net.plugins, att, prev.as_ref(), None) {
            return Err(err);
        }
        if ours {
            self.cache
                .remove(&att.container_id, &att.if_name)
                .map_err(|source| CniError::Cache {
                    command: Command::Del,
                    network: net.name.clone(),
                    source,
                })?;
        }
        tracing::info!(network = %net.name, container_id = %att.container_id,
            if_name = %att.if_name, "CNI DEL done");
        Ok(())
    }

    /// CHECK: asks each plugin whether the attachment is still as ADD made it.
    pub fn check(&self, net: &NetworkList, att: &Attachment) -> Result<(), CniError> {
        att.validate()?;
        validate_list(net)?;
        if version_cmp(&net.cni_version, "0.4.0") == Ordering::Less {
            return Err(CniError::CheckUnsupported {
                network: net.name.clone(),
                version: net.cni_version.clone(),
            });
        }
        if net.disable_check {
            return Ok(());
        }
        let entry = self
            .cache
            .read(&att.container_id, &att.if_name)
            .map_err(|source| CniError::Cache {
                command: Command::Check,
                network: net.name.clone(),
                source,
            })?
            .filter(|e| e.network_name == net.name)
            .ok_or_else(|| CniError::NoCachedResult {
                network: net.name.clone(),
                container_id: att.container_id.clone(),
                if_name: att.if_name.clone(),
            })?;
        for plugin in &net.plugins {
            let binary = self.find(Command::Check, net, plugin)?;
            self.call(
                Command::Check,
                net,
                plugin,
                &binary,
                att,
                Some(&entry.result),
            )
            .map_err(|source| CniError::Plugin {
                command: Command::Check,
                network: net.name.clone(),
                plugin: plugin.plugin_type.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The `prevResult` DEL hands every plugin (the cached ADD result, from 0.4.0 on), and
    /// whether the cache entry is this network's to remove after the DEL. An entry that cannot
    /// be read does not stop a DEL (the plugins cope without `prevResult`) and goes with it; an
    /// entry of another network on the same interface stays.
    fn cached_for_del(&self, net: &NetworkList, att: &Attachment) -> (Option<Value>, bool) {
        let (result, ours) = match self.cache.read(&att.container_id, &att.if_name) {
            Ok(Some(entry)) if entry.network_name == net.name => (Some(entry.result), true),
            Ok(Some(entry)) => {
                tracing::warn!(network = %net.name, cached = %entry.network_name,
                    container_id = %att.container_id, "cached result is of another network");
                (None, false)
            }
            Ok(None) => (None, false),
            Err(e) => {
                tracing::warn!(error = %switchyard_base::chain(&e), "DEL without prevResult");
                (None, true)
            }
        };
        let result = result.filter(|_| version_cmp(&net.cni_version, "0.4.0") != Ordering::Less);
        (result, ours)
    }

    /// DEL of `plugins` in reverse; every one runs, the first error is returned. `binaries`
    /// when already resolved.
    fn del_plugins(
        &self,
        net: &NetworkList,
        plugins: &[PluginConf],
        att: &Attachment,
        prev: Option<&Value>,
        binaries: Option<&[PathBuf]>,
    ) -> Option<CniError> {
        let mut first = None;
        for (i, plugin) in plugins.iter().enumerate().rev() {
            let binary = match binaries.and_then(|b| b.get(i)) {
                Some(b) => Ok(b.clone()),
                None => self.find(Command::Del, net, plugin),
            };
            let res = binary.and_then(|binary| {
                self.call(Command::Del, net, plugin, &binary, att, prev)
                    .map_err(|source| CniError::Plugin {
                        command: Command::Del,
                        network: net.name.clone(),
                        plugin: plugin.plugin_type.clone(),
                        source,
                    })
            });
            if let Err(e) = res {
                tracing::warn!(error = %switchyard_base::chain(&e), container_id = %att.container_id,
                    "CNI DEL");
                first.get_or_insert(e);
            }
        }
        first
    }

    /// After a failed ADD: DEL for the plugins that ran (the failed one included: it may have
    /// made part of its change), with the last good result.
    fn roll_back(
        &self,
        net: &NetworkList,
        plugins: &[PluginConf],
        binaries: &[PathBuf],
        att: &Attachment,
        prev: Option<&Value>,
    ) {
        let prev = prev.filter(|_| version_cmp(&net.cni_version, "0.4.0") != Ordering::Less);
        if let Some(e) = self.del_plugins(net, plugins, att, prev, Some(binaries)) {
            tracing::error!(error = %switchyard_base::chain(&e), container_id = %att.container_id,
                "cleanup after a failed ADD failed; the attachment may leak until the next DEL");
        }
    }

    /// The binary of a plugin: the first `<dir>/<type>` that is an executable file.
    fn find(
        &self,
        command: Command,
        net: &NetworkList,
        plugin: &PluginConf,
    ) -> Result<PathBuf, CniError> {
        use std::os::unix::fs::PermissionsExt;
        for dir in &self.bin_dirs {
            let path = dir.join(&plugin.plugin_type);
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.is_file()
                && meta.permissions().mode() & 0o111 != 0
            {
                return Ok(path);
            }
        }
        Err(CniError::PluginNotFound {
            command,
            network: net.name.clone(),
            plugin: plugin.plugin_type.clone(),
            dirs: self.cni_path().to_string_lossy().into_owned(),
        })
    }

    fn cni_path(&self) -> OsString {
        std::env::join_paths(&self.bin_dirs).unwrap_or_default()
    }

    /// One plugin call; a non-zero exit becomes its error.
    fn call(
        &self,
        command: Command,
        net: &NetworkList,
        plugin: &PluginConf,
        binary: &Path,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<PluginOutput, PluginError> {
        let stdin = plugin_stdin(net, plugin, prev, &att.runtime);
        let env = vec![
            ("CNI_COMMAND", command.as_str().into()),
            ("CNI_CONTAINERID", att.container_id.clone().into()),
            ("CNI_NETNS", att.netns.clone().into_os_string()),
            ("CNI_IFNAME", att.if_name.clone().into()),
            ("CNI_ARGS", att.cni_args().into()),
            ("CNI_PATH", self.cni_path()),
        ];
        tracing::debug!(%command, network = %net.name, plugin = %plugin.plugin_type,
            container_id = %att.container_id, "CNI plugin call");
        let out = self.invoker.invoke(&PluginCall {
            binary,
            env,
            stdin: stdin.as_bytes(),
        })?;
        if out.exit.success() {
            return Ok(out);
        }
        Err(failure(&out))
    }
}

/// The error of a failed call: the error result on stdout, or the exit and stderr.
fn failure(out: &PluginOutput) -> PluginError {
    if let Ok(e) = serde_json::from_slice::<ErrorResult>(&out.stdout) {
        return PluginError::Failed {
            code: e.code,
            msg: e.msg,
            details: e.details,
        };
    }
    let end = out.stderr.len().min(STDERR_IN_ERROR);
    PluginError::Crashed {
        exit: out.exit,
        stderr: String::from_utf8_lossy(&out.stderr[..end])
            .trim()
            .to_owned(),
    }
}

fn parse_add_result(stdout: &[u8]) -> Result<(Value, CniResult), PluginError> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Err(PluginError::NoResult);
    }
    let value: Value =
        serde_json::from_slice(stdout).map_err(|e| PluginError::BadResult(ResultError::Json(e)))?;
    let parsed = CniResult::from_value(value.clone()).map_err(PluginError::BadResult)?;
    Ok((value, parsed))
}

/// A plugin's stdin: its config with the list's `name` and `cniVersion`, the `prevResult`, and
/// `runtimeConfig` for the capabilities it declares and the runtime has values for (libcni's
/// `buildOneConfig` and `injectRuntimeConfig`).
pub(crate) fn plugin_stdin(
    net: &NetworkList,
    plugin: &PluginConf,
    prev: Option<&Value>,
    rt: &RuntimeConfig,
) -> String {
    let mut conf: Map<String, Value> = plugin.conf().clone();
    conf.insert("name".into(), net.name.clone().into());
    conf.insert("cniVersion".into(), net.cni_version.clone().into());
    match prev {
        Some(p) => {
            conf.insert("prevResult".into(), p.clone());
        }
        None => {
            conf.remove("prevResult");
        }
    }
    let mut runtime = Map::new();
    for cap in plugin.capabilities() {
        match rt.capability(cap) {
            Some(v) => {
                runtime.insert(cap.to_owned(), v);
            }
            None => tracing::debug!(capability = cap, plugin = %plugin.plugin_type,
                "no runtime value for a capability"),
        }
    }
    if !runtime.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    Value::Object(conf).to_string()
}

/// Orders `a.b.c` versions (only ever [`crate::config::SUPPORTED_VERSIONS`] here).
fn version_cmp(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
#[path = "invoke_tests.rs"]
mod tests;
