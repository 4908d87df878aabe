//! The OCI runtime spec of a CRI container (CreateContainer), built the way containerd's CRI
//! plugin builds it for a Linux container (`internal/cri/server/container_create*.go`, the spec
//! opts in `internal/cri/opts` and `pkg/oci`), from the request, the pod's config and the image.
//!
//! [`container_spec`] is pure: whatever needs the host or the container's rootfs comes in as
//! data or behind a small trait the caller implements — the pod's namespace and file paths
//! ([`PodNamespaces`], [`PodFiles`]), the image's `/etc/passwd` and `/etc/group`
//! ([`Accounts`]), device nodes ([`HostDevices`]) and facts about the host ([`HostFacts`]).
//! The one exception is a `Localhost` seccomp profile, read from its file. Every value that
//! comes from the request is checked, and an error names the field (`config.mounts[2].
//! container_path: must be absolute`).
//!
//! Where Switchyard differs from containerd, on purpose:
//! - there is no pause process: a pod namespace the caller has no path for ([`PodNamespaces`])
//!   is made new for the container, and the pod's hostname and sysctls go into every
//!   container's spec (containerd puts them in the pause container's);
//! - masked and read-only paths: the request's when it has any, containerd's defaults
//!   otherwise (containerd 2 leaves them empty when the request has none; kubelet always sends
//!   them except for `procMount: Unmasked`, which therefore is not available here);
//! - AppArmor: `localhost/NAME` is set as the process's profile; `runtime/default` sets none,
//!   because switchyardd loads no AppArmor profile of its own (containerd loads
//!   `cri-containerd.apparmor.d`);
//! - annotations: the container's own annotations are passed on (containerd passes only those
//!   a runtime's `container_annotations` lists), under containerd's `io.kubernetes.cri.*` keys,
//!   which always win;
//! - not supported, refused naming the field: user namespaces, ID-mapped and image mounts, CDI
//!   devices, ambient capabilities and systemd cgroup parents.

mod seccomp;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};
use switchyard_api::cri::v1 as cri;
use switchyard_images::RunConfig;

pub use seccomp::default_profile as default_seccomp_profile;

pub use switchyard_base::oci_defaults::{
    DEFAULT_CAPABILITIES, DEFAULT_MASKED_PATHS, DEFAULT_PATH, DEFAULT_READONLY_PATHS,
};

/// Every capability Linux defines (up to `CAP_CHECKPOINT_RESTORE`, 5.9), in bit order: what
/// `ALL` and a privileged container get when the daemon's own set is not known
/// ([`HostFacts::capabilities`]).
pub const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's annotation keys (`internal/cri/annotations`).
pub mod annotations {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const CONTAINER_TYPE_CONTAINER: &str = "container";
    pub const CONTAINER_TYPE_SANDBOX: &str = "sandbox";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
    pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
    pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
    pub const SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
    pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
}

/// containerd's sandbox resource annotations, from the pod's `linux.resources` (the sum of its
/// containers' resources) where kubelet gives them: what a VM runtime sizes the pod's VM from.
fn sandbox_resources(sandbox: &cri::PodSandboxConfig) -> Vec<(&'static str, String)> {
    use self::annotations::*;
    let Some(r) = sandbox.linux.as_ref().and_then(|l| l.resources.as_ref()) else {
        return Vec::new();
    };
    vec![
        (SANDBOX_CPU_PERIOD, r.cpu_period.to_string()),
        (SANDBOX_CPU_QUOTA, r.cpu_quota.to_string()),
        (SANDBOX_CPU_SHARES, r.cpu_shares.to_string()),
        (SANDBOX_MEMORY, r.memory_limit_in_bytes.to_string()),
    ]
}

/// Largest `Localhost` seccomp profile read (Docker's default profile is about 20 KiB).
pub const MAX_SECCOMP_PROFILE_BYTES: u64 = 1 << 20;

/// Why a container's spec could not be made. Every variant but [`SpecError::Assemble`] is the
/// request's fault.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: {what} is not supported by switchyardd")]
    Unsupported { field: String, what: &'static str },
    #[error("{field}: no user {name:?} in the container's /etc/passwd")]
    UnknownUser { field: &'static str, name: String },
    #[error("{field}: no group {name:?} in the container's /etc/group")]
    UnknownGroup { field: &'static str, name: String },
    #[error("{field}: device {}", path.display())]
    Device {
        field: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp profile {}", path.display())]
    SeccompProfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp profile {}: larger than {MAX_SECCOMP_PROFILE_BYTES} bytes", path.display())]
    SeccompProfileTooLarge { path: PathBuf },
    #[error("seccomp profile {}: not an OCI seccomp profile", path.display())]
    SeccompProfileInvalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The assembled spec does not parse as an OCI spec: a bug here, not in the request.
    #[error("assembling the container's OCI spec")]
    Assemble(#[source] serde_json::Error),
}

impl crate::error::Classify for SpecError {
    fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            SpecError::Assemble(_) => Kind::Internal,
            _ => Kind::InvalidArgument,
        }
    }
}

type Result<T> = std::result::Result<T, SpecError>;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A user of the container's `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The container's users and groups, from its rootfs (the caller reads the files).
pub trait Accounts {
    fn user_by_name(&self, name: &str) -> Option<Account>;
    fn user_by_uid(&self, uid: u32) -> Option<Account>;
    fn group_by_name(&self, name: &str) -> Option<u32>;
    /// The gids of the groups that list `user` as a member, except a group named like the
    /// user (containerd's supplemental groups from `/etc/group`).
    fn groups_of(&self, user: &str) -> Vec<u32>;
}

/// Users and groups parsed from the text of `/etc/passwd` and `/etc/group`; empty when the
/// image has neither. Malformed lines are skipped, the first entry of a name or id wins.
#[derive(Debug, Clone, Default)]
pub struct EtcAccounts {
    users: Vec<Account>,
    groups: Vec<(String, u32, Vec<String>)>,
}

impl EtcAccounts {
    pub fn parse(passwd: &str, group: &str) -> EtcAccounts {
        let fields = |line: &str| -> Option<Vec<String>> {
            let line = line.trim_end();
            (!line.is_empty() && !line.starts_with('#'))
                .then(|| line.split(':').map(str::to_owned).collect())
        };
        let users = passwd
            .lines()
            .filter_map(fields)
            .filter_map(|f| {
                Some(Account {
                    name: f.first()?.clone(),
                    uid: f.get(2)?.parse().ok()?,
                    gid: f.get(3)?.parse().ok()?,
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(fields)
            .filter_map(|f| {
                let members = f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                Some((f.first()?.clone(), f.get(2)?.parse().ok()?, members))
            })
            .collect();
        EtcAccounts { users, groups }
    }
}

impl Accounts for EtcAccounts {
    fn user_by_name(&self, name: &str) -> Option<Account> {
        self.users.iter().find(|u| u.name == name).cloned()
    }
    fn user_by_uid(&self, uid: u32) -> Option<Account> {
        self.users.iter().find(|u| u.uid == uid).cloned()
    }
    fn group_by_name(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, gid, _)| *gid)
    }
    fn groups_of(&self, user: &str) -> Vec<u32> {
        self.groups
            .iter()
            .filter(|(n, _, members)| n != user && members.iter().any(|m| m == user))
            .map(|(_, gid, _)| *gid)
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

/// A host device node as `stat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    pub kind: DeviceKind,
    pub major: u64,
    pub minor: u64,
    /// Permission bits.
    pub file_mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Looks host device nodes up (symlinks followed, as containerd resolves them).
pub trait HostDevices {
    fn device(&self, path: &Path) -> std::io::Result<DeviceNode>;
}

/// The host's devices, by `stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SysDevices;

impl HostDevices for SysDevices {
    fn device(&self, path: &Path) -> std::io::Result<DeviceNode> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        let meta = std::fs::metadata(path)?;
        let kind = if meta.file_type().is_char_device() {
            DeviceKind::Char
        } else if meta.file_type().is_block_device() {
            DeviceKind::Block
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a device node",
            ));
        };
        let dev = meta.rdev();
        Ok(DeviceNode {
            kind,
            major: u64::from(rustix::fs::major(dev)),
            minor: u64::from(rustix::fs::minor(dev)),
            file_mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

/// The namespaces of the pod a container joins, where the caller holds them. `network: None`
/// means the node's network (the pod record's netns is `None` exactly then). For IPC, UTS and
/// PID in mode `POD`, `None` gives the container a new namespace (right for the first
/// container of a pod that has no process of its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct PodNamespaces<'a> {
    pub network: Option<&'a Path>,
    pub ipc: Option<&'a Path>,
    pub uts: Option<&'a Path>,
    pub pid: Option<&'a Path>,
    /// The PID namespace of the container `namespace_options.target_id` names (mode TARGET).
    pub target_pid: Option<&'a Path>,
}

/// Host files of the pod bind-mounted into each container (`None`: not mounted).
#[derive(Debug, Clone, Copy, Default)]
pub struct PodFiles<'a> {
    pub hosts: Option<&'a Path>,
    pub resolv_conf: Option<&'a Path>,
    pub hostname: Option<&'a Path>,
    /// The pod's `/dev/shm` directory (a tmpfs the caller mounted); `None` gives each
    /// container a 64 KiB tmpfs of its own, as containerd's default spec.
    pub shm: Option<&'a Path>,
}

/// What the spec depends on about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The node's hostname: `HOSTNAME` of a pod that sets none.
    pub hostname: String,
    /// cgroup v2: unprivileged containers get a cgroup namespace (containerd).
    pub cgroup_v2: bool,
    /// Whether the memory controller limits swap: a memory limit then also limits swap.
    pub swap_controller: bool,
    /// switchyardd's own `oom_score_adj`: no container gets a lower one (containerd's
    /// `restrict_oom_score_adj`, always on here).
    pub oom_score_adj: i32,
    /// switchyardd's own effective capabilities: what `ALL` and a privileged container get, as
    /// containerd gives its own process's set (a container cannot be given more: where the
    /// node's bounding set lacks one, asking for it would fail the container's start). Empty:
    /// not known, [`ALL_CAPABILITIES`].
    pub capabilities: Vec<String>,
}

/// The capability names of a `/proc/<pid>/status` capability mask (hex).
fn capability_names(mask: &str) -> Vec<String> {
    let Ok(bits) = u64::from_str_radix(mask.trim(), 16) else {
        return Vec::new();
    };
    ALL_CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bits & (1 << bit) != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

impl HostFacts {
    /// This host's, read from `/proc` and `/sys` (what cannot be read is taken as absent).
    pub fn read() -> HostFacts {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cgroup_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let swap_controller = if cgroup_v2 {
            // The root has no memory.swap.max; our own cgroup has it when swap is accounted.
            let own = read("/proc/self/cgroup")
                .lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
                .unwrap_or_default();
            Path::new("/sys/fs/cgroup")
                .join(own.trim_start_matches('/'))
                .join("memory.swap.max")
                .exists()
        } else {
            Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        };
        HostFacts {
            hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
            cgroup_v2,
            swap_controller,
            oom_score_adj: read("/proc/self/oom_score_adj").trim().parse().unwrap_or(0),
            capabilities: read("/proc/self/status")
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(capability_names)
                .unwrap_or_default(),
        }
    }
}

/// Everything a container's spec is made of.
pub struct SpecInput<'a> {
    /// The container's id.
    pub id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub sandbox_id: &'a str,
    pub sandbox: &'a cri::PodSandboxConfig,
    /// The image's name as the store knows it (the image-name annotation, unless the request
    /// carries the name the user specified).
    pub image_name: &'a str,
    /// How the image wants to be run (entrypoint, cmd, env, working dir, user).
    pub image: &'a RunConfig,
    pub accounts: &'a dyn Accounts,
    pub devices: &'a dyn HostDevices,
    pub namespaces: PodNamespaces<'a>,
    pub pod_files: PodFiles<'a>,
    /// Where a relative `Localhost` seccomp profile is looked up (containerd reads it relative
    /// to its working directory; kubelet sends absolute paths).
    pub seccomp_profile_root: &'a Path,
    pub host: &'a HostFacts,
    /// The pod's pause container (annotated `container-type: sandbox`, as containerd's), not
    /// one of its containers.
    pub pause: bool,
}

const SC: &str = "config.linux.security_context";

/// A mount of the spec (`mounts[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Mount {
    destination: String,
    #[serde(rename = "type")]
    kind: String,
    source: String,
    options: Vec<String>,
}

impl Mount {
    fn new(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            destination: destination.to_owned(),
            kind: kind.to_owned(),
            source: source.to_owned(),
            options: options.iter().map(|o| (*o).to_owned()).collect(),
        }
    }
}

/// A bind mount asked for: the request's or one of the pod's files.
struct BindRequest {
    field: String,
    host_path: String,
    container_path: String,
    readonly: bool,
    recursive_read_only: bool,
    propagation: i32,
}

/// The OCI runtime spec of the container `input` describes. Its root is `rootfs` relative to
/// the bundle, as containerd's.
pub fn container_spec(input: &SpecInput<'_>) -> Result<oci_spec::runtime::Spec> {
    let config = input.config;
    if input.id.is_empty() {
        return Err(invalid("container id", "empty"));
    }
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or_default();
    if name.is_empty() {
        return Err(invalid("config.metadata.name", "empty"));
    }
    if !config.cdi_devices.is_empty() {
        return Err(SpecError::Unsupported {
            field: "config.CDI_devices".into(),
            what: "CDI",
        });
    }
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    let resources = config.linux.as_ref().and_then(|l| l.resources.as_ref());
    let pod_linux = input.sandbox.linux.clone().unwrap_or_default();
    let pod_sc = pod_linux.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged;
    // containerd: "no privileged container allowed in sandbox".
    if privileged && !pod_sc.privileged {
        return Err(invalid(
            format!("{SC}.privileged"),
            "the pod sandbox is not privileged",
        ));
    }

    let args = process_args(config, input.image)?;
    let hostname = &input.sandbox.hostname;
    let env = environment(input, hostname)?;
    let cwd = working_dir(config, input.image)?;
    let user = user(&sc, input.image, input.accounts)?;
    let capabilities = capabilities(&sc, privileged, &input.host.capabilities)?;
    let ns = namespaces(&sc, input)?;
    let (mounts, rootfs_propagation) = mounts(input, &sc, &ns, privileged)?;
    let (devices, device_rules) = devices(config, input.devices, privileged)?;

    let mut linux = serde_json::Map::new();
    linux.insert("namespaces".into(), json!(ns.entries));
    linux.insert("devices".into(), json!(devices));
    let (masked, readonly): (Vec<String>, Vec<String>) = if privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            paths_or(&sc.masked_paths, DEFAULT_MASKED_PATHS, "masked_paths")?,
            paths_or(&sc.readonly_paths, DEFAULT_READONLY_PATHS, "readonly_paths")?,
        )
    };
    linux.insert("maskedPaths".into(), json!(masked));
    linux.insert("readonlyPaths".into(), json!(readonly));
    if let Some(p) = rootfs_propagation {
        linux.insert("rootfsPropagation".into(), json!(p));
    }
    if !privileged && let Some(profile) = seccomp(&sc, &capabilities, input.seccomp_profile_root)? {
        linux.insert("seccomp".into(), profile);
    }
    let mut linux_resources = json!({"devices": device_rules});
    let mut oom_score_adj = None;
    if let Some(r) = resources {
        resources_into(r, input.host, &mut linux_resources)?;
        oom_score_adj = Some(oom_score(r, input.host)?);
    }
    linux.insert("resources".into(), linux_resources);
    linux.insert(
        "cgroupsPath".into(),
        json!(cgroups_path(&pod_linux, input.id)?),
    );
    let sysctls = sysctls(&pod_linux, &ns)?;
    if !sysctls.is_empty() {
        linux.insert("sysctl".into(), json!(sysctls));
    }

    let mut process = json!({
        "terminal": config.tty,
        "user": user,
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": capabilities,
            "effective": capabilities,
            "permitted": capabilities,
        },
    });
    // Only when set, as containerd writes it (Go's `omitempty`): runc reads an absent value and
    // `false` alike, but a runtime may not (libcontainer 0.7 took `false` for "set" and loaded
    // the seccomp filter after dropping CAP_SYS_ADMIN, which the kernel refuses).
    if sc.no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    if let Some(profile) = apparmor(&sc)? {
        process["apparmorProfile"] = json!(profile);
    }
    if let Some(adj) = oom_score_adj {
        process["oomScoreAdj"] = json!(adj);
    }

    let mut spec = json!({
        "ociVersion": "1.1.0",
        "process": process,
        "root": {"path": "rootfs", "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations(input, name),
        "linux": linux,
    });
    if ns.own_uts && !hostname.is_empty() {
        spec["hostname"] = json!(hostname);
    }
    serde_json::from_value(spec).map_err(SpecError::Assemble)
}

fn no_nul(field: impl Fn() -> String, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(invalid(field(), "contains a NUL byte"));
    }
    Ok(())
}

/// containerd's `WithProcessArgs` (Docker's rules): a command replaces the image's entrypoint
/// and drops its cmd; args alone replace the cmd; an entrypoint of `[""]` is none.
fn process_args(config: &cri::ContainerConfig, image: &RunConfig) -> Result<Vec<String>> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone();
        }
        if !(image.entrypoint.len() == 1 && image.entrypoint[0].is_empty()) {
            command = image.entrypoint.clone();
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(invalid(
            "config.command",
            "empty, and the image has no entrypoint or cmd",
        ));
    }
    for (i, a) in command.iter().enumerate() {
        no_nul(|| format!("config.command/args[{i}]"), a)?;
    }
    Ok(command)
}

/// containerd's order: the default `PATH`, `TERM=xterm` for a terminal, `HOSTNAME`, then the
/// image's env and the request's, each replacing an earlier value of its key.
fn environment(input: &SpecInput<'_>, hostname: &str) -> Result<Vec<String>> {
    let mut env = vec![DEFAULT_PATH.to_owned()];
    if input.config.tty {
        env.push("TERM=xterm".to_owned());
    }
    let hostname = if hostname.is_empty() {
        input.host.hostname.as_str()
    } else {
        hostname
    };
    set_env(&mut env, format!("HOSTNAME={hostname}"));
    for e in &input.image.env {
        set_env(&mut env, e.clone());
    }
    for (i, kv) in input.config.envs.iter().enumerate() {
        if kv.key.is_empty() || kv.key.contains('=') || kv.key.contains('\0') {
            return Err(invalid(
                format!("config.envs[{i}].key"),
                format!("{:?} is not a variable name", kv.key),
            ));
        }
        let value = String::from_utf8(kv.value.clone())
            .map_err(|_| invalid(format!("config.envs[{i}].value"), "not UTF-8"))?;
        no_nul(|| format!("config.envs[{i}].value"), &value)?;
        set_env(&mut env, format!("{}={value}", kv.key));
    }
    Ok(env)
}

/// containerd's `replaceOrAppendEnvValues`: `KEY=V` replaces `KEY`'s value or is appended; a
/// bare `KEY` unsets it.
fn set_env(env: &mut Vec<String>, entry: String) {
    let key = entry.split('=').next().unwrap_or_default().to_owned();
    let pos = env
        .iter()
        .position(|e| e.split('=').next() == Some(key.as_str()));
    match (entry.contains('='), pos) {
        (true, Some(i)) => env[i] = entry,
        (true, None) => env.push(entry),
        (false, Some(i)) => {
            env.remove(i);
        }
        (false, None) => {}
    }
}

fn working_dir(config: &cri::ContainerConfig, image: &RunConfig) -> Result<String> {
    let (field, dir) = if !config.working_dir.is_empty() {
        ("config.working_dir", config.working_dir.as_str())
    } else if !image.working_dir.is_empty() {
        ("the image's WorkingDir", image.working_dir.as_str())
    } else {
        return Ok("/".to_owned());
    };
    if !dir.starts_with('/') {
        return Err(invalid(field, format!("{dir:?} is not absolute")));
    }
    no_nul(|| field.to_owned(), dir)?;
    Ok(dir.to_owned())
}

/// A user or group as a request or image names it.
#[derive(Clone, Copy)]
enum Who<'s> {
    Id(u32),
    Name(&'s str),
}

impl<'s> Who<'s> {
    fn parse(s: &'s str) -> Who<'s> {
        s.parse().map_or(Who::Name(s), Who::Id)
    }
}

fn id(field: &str, value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| invalid(field, format!("{value} is not a user or group id")))
}

/// The process's user, as containerd's `WithUser` and `WithAdditionalGIDs` resolve it: the
/// request's `run_as_username`, else `run_as_user` (each with `run_as_group`), else the image's
/// `USER`, else root. A uid alone takes its group from `/etc/passwd` (0 when it has none); a
/// name must be there. Supplementary groups: the user's in `/etc/group` (unless the policy is
/// Strict) and the primary gid, then the request's `supplemental_groups`.
fn user(
    sc: &cri::LinuxContainerSecurityContext,
    image: &RunConfig,
    accounts: &dyn Accounts,
) -> Result<Value> {
    let group = sc
        .run_as_group
        .as_ref()
        .map(|g| id(&format!("{SC}.run_as_group"), g.value))
        .transpose()?
        .map(Who::Id);
    let (user, group, field, group_field): (Who<'_>, Option<Who<'_>>, &'static str, &'static str) =
        if !sc.run_as_username.is_empty() {
            let f = "config.linux.security_context.run_as_username";
            (Who::Name(&sc.run_as_username), group, f, f)
        } else if let Some(u) = &sc.run_as_user {
            let f = "config.linux.security_context.run_as_user";
            (Who::Id(id(f, u.value)?), group, f, f)
        } else if !image.user.is_empty() {
            // containerd ignores run_as_group without a user from the request.
            let (u, g) = match image.user.split_once(':') {
                Some((u, g)) => (u, Some(Who::parse(g))),
                None => (image.user.as_str(), None),
            };
            (Who::parse(u), g, "the image's User", "the image's User")
        } else {
            (Who::Id(0), None, "", "")
        };
    let account = match user {
        Who::Id(uid) => accounts.user_by_uid(uid),
        Who::Name(name) => {
            Some(
                accounts
                    .user_by_name(name)
                    .ok_or_else(|| SpecError::UnknownUser {
                        field,
                        name: name.to_owned(),
                    })?,
            )
        }
    };
    let uid = match user {
        Who::Id(uid) => uid,
        Who::Name(_) => account.as_ref().map_or(0, |a| a.uid),
    };
    let gid = match group {
        Some(Who::Id(gid)) => gid,
        Some(Who::Name(name)) => {
            accounts
                .group_by_name(name)
                .ok_or_else(|| SpecError::UnknownGroup {
                    field: group_field,
                    name: name.to_owned(),
                })?
        }
        None => account.as_ref().map_or(0, |a| a.gid),
    };
    let mut gids: Vec<u32> = Vec::new();
    let strict = sc.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32;
    if !strict {
        if let Some(a) = &account {
            gids = accounts.groups_of(&a.name);
        }
        // containerd (since 1.6.18/1.7.0, CVE-2023-25173): the primary group is listed too.
        if !gids.contains(&gid) {
            gids.insert(0, gid);
        }
    }
    for (i, g) in sc.supplemental_groups.iter().enumerate() {
        let g = id(&format!("{SC}.supplemental_groups[{i}]"), *g)?;
        if !gids.contains(&g) {
            gids.push(g);
        }
    }
    let mut value = json!({"uid": uid, "gid": gid});
    if !gids.is_empty() {
        value["additionalGids"] = json!(gids);
    }
    Ok(value)
}

/// containerd's `WithCapabilities`: `ALL` in add gives every capability and in drop none, then
/// the named ones are added and dropped, upper-cased with a `CAP_` prefix. containerd prefixes
/// every name, so its `CAP_CHOWN` becomes `CAP_CAP_CHOWN`, which the runtime later refuses;
/// here a name that has the prefix keeps it, and a name that is no capability is refused at
/// once. A privileged container has them all. "All" is the daemon's own set (`own`) when
/// known. No inheritable or ambient set (containerd's `WithoutAmbientCaps`).
fn capabilities(
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
    own: &[String],
) -> Result<Vec<String>> {
    let all = || {
        if own.is_empty() {
            ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()
        } else {
            own.to_vec()
        }
    };
    if privileged {
        return Ok(all());
    }
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    let Some(c) = &sc.capabilities else {
        return Ok(caps);
    };
    if !c.add_ambient_capabilities.is_empty() {
        return Err(SpecError::Unsupported {
            field: format!("{SC}.capabilities.add_ambient_capabilities"),
            what: "ambient capabilities",
        });
    }
    let is_all = |s: &String| s.eq_ignore_ascii_case("ALL");
    if c.add_capabilities.iter().any(is_all) {
        caps = all();
    }
    if c.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    let normalize = |list: &str, i: usize, name: &str| -> Result<String> {
        let upper = name.to_ascii_uppercase();
        let cap = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        if !ALL_CAPABILITIES.contains(&cap.as_str()) {
            return Err(invalid(
                format!("{SC}.capabilities.{list}[{i}]"),
                format!("{name:?} is not a capability"),
            ));
        }
        Ok(cap)
    };
    for (i, name) in c.add_capabilities.iter().enumerate() {
        if is_all(name) {
            continue;
        }
        let cap = normalize("add_capabilities", i, name)?;
        if !caps.contains(&cap) {
            caps.push(cap);
        }
    }
    for (i, name) in c.drop_capabilities.iter().enumerate() {
        if is_all(name) {
            continue;
        }
        let cap = normalize("drop_capabilities", i, name)?;
        caps.retain(|c| *c != cap);
    }
    Ok(caps)
}

/// The container's namespaces and what follows from them.
struct Namespaces {
    entries: Vec<Value>,
    host_network: bool,
    host_ipc: bool,
    /// The container has a UTS namespace other than the host's (so it gets the hostname).
    own_uts: bool,
}

fn mode(value: i32, field: &str) -> Result<cri::NamespaceMode> {
    cri::NamespaceMode::try_from(value)
        .map_err(|_| invalid(field, format!("{value} is not a namespace mode")))
}

/// containerd's `WithPodNamespaces`, with the paths the caller holds for the pod: network from
/// the pod; IPC and PID per mode (POD: the pod's, CONTAINER: new, NODE: the host's, TARGET: the
/// target container's PID namespace); UTS the pod's, or the host's with the host's network; a
/// new mount namespace; a cgroup namespace on cgroup v2 unless privileged.
fn namespaces(
    sc: &cri::LinuxContainerSecurityContext,
    input: &SpecInput<'_>,
) -> Result<Namespaces> {
    let opts = sc.namespace_options.clone().unwrap_or_default();
    let f = |name: &str| format!("{SC}.namespace_options.{name}");
    if let Some(userns) = &opts.userns_options
        && mode(userns.mode, &f("userns_options.mode"))? != cri::NamespaceMode::Node
    {
        return Err(SpecError::Unsupported {
            field: f("userns_options"),
            what: "a user namespace",
        });
    }
    let p = &input.namespaces;
    let ns = |kind: &str, path: Option<&Path>| match path {
        Some(path) => json!({"type": kind, "path": path}),
        None => json!({"type": kind}),
    };
    let mut entries = Vec::new();
    match mode(opts.pid, &f("pid"))? {
        cri::NamespaceMode::Pod => entries.push(ns("pid", p.pid)),
        cri::NamespaceMode::Container => entries.push(ns("pid", None)),
        cri::NamespaceMode::Node => {}
        cri::NamespaceMode::Target => {
            let Some(target) = p.target_pid else {
                return Err(invalid(
                    f("target_id"),
                    format!(
                        "no PID namespace found for target container {:?}",
                        opts.target_id
                    ),
                ));
            };
            entries.push(ns("pid", Some(target)));
        }
    }
    let host_ipc = match mode(opts.ipc, &f("ipc"))? {
        cri::NamespaceMode::Pod => {
            entries.push(ns("ipc", p.ipc));
            false
        }
        cri::NamespaceMode::Container => {
            entries.push(ns("ipc", None));
            false
        }
        cri::NamespaceMode::Node => true,
        cri::NamespaceMode::Target => {
            return Err(invalid(
                f("ipc"),
                "TARGET applies to the PID namespace only",
            ));
        }
    };
    let host_network = p.network.is_none();
    if !host_network {
        entries.push(ns("uts", p.uts));
    }
    entries.push(ns("mount", None));
    if let Some(netns) = p.network {
        entries.push(ns("network", Some(netns)));
    }
    if input.host.cgroup_v2 && !sc.privileged {
        entries.push(ns("cgroup", None));
    }
    Ok(Namespaces {
        entries,
        host_network,
        host_ipc,
        own_uts: !host_network,
    })
}

/// `path` cleaned as Go's `filepath.Clean` cleans an absolute path without `..`.
fn clean(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn check_path(field: &str, path: &str, container_side: bool) -> Result<()> {
    if path.is_empty() {
        return Err(invalid(field, "empty"));
    }
    if !path.starts_with('/') {
        return Err(invalid(field, format!("{path:?} must be absolute")));
    }
    no_nul(|| field.to_owned(), path)?;
    if container_side && path.split('/').any(|c| c == "..") {
        return Err(invalid(field, format!("{path:?} must not contain \"..\"")));
    }
    Ok(())
}

/// containerd's mounts (`WithMounts`): its default spec's less `/run`, plus `/sys/fs/cgroup`
/// read-only, then the request's bind mounts and the pod's files sorted by depth. A default
/// whose destination a bind mount takes is dropped, and every default under `/dev` when `/dev`
/// itself is bound. Returns the mounts and the rootfs propagation they need.
fn mounts(
    input: &SpecInput<'_>,
    sc: &cri::LinuxContainerSecurityContext,
    ns: &Namespaces,
    privileged: bool,
) -> Result<(Vec<Mount>, Option<&'static str>)> {
    let config = input.config;
    let mut binds: Vec<BindRequest> = Vec::new();
    for (i, m) in config.mounts.iter().enumerate() {
        let f = |name: &str| format!("config.mounts[{i}].{name}");
        check_path(&f("container_path"), &m.container_path, true)?;
        check_path(&f("host_path"), &m.host_path, false)?;
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(SpecError::Unsupported {
                field: f("uidMappings"),
                what: "an ID-mapped mount",
            });
        }
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(SpecError::Unsupported {
                field: f("image"),
                what: "an image volume",
            });
        }
        if m.recursive_read_only {
            if !m.readonly {
                return Err(invalid(
                    f("recursive_read_only"),
                    "a recursively read-only mount must be read-only",
                ));
            }
            if m.propagation != cri::MountPropagation::PropagationPrivate as i32 {
                return Err(invalid(
                    f("recursive_read_only"),
                    "a recursively read-only mount must have private propagation",
                ));
            }
        }
        binds.push(BindRequest {
            field: format!("config.mounts[{i}]"),
            host_path: m.host_path.clone(),
            container_path: m.container_path.clone(),
            readonly: m.readonly,
            recursive_read_only: m.recursive_read_only,
            propagation: m.propagation,
        });
    }
    let requested: Vec<String> = binds.iter().map(|b| clean(&b.container_path)).collect();
    // The pod's files, unless the request mounts something there (containerd's
    // linuxContainerMounts), read-only when the container's root is.
    let pf = &input.pod_files;
    let host_shm = Path::new("/dev/shm");
    let shm = if ns.host_ipc { Some(host_shm) } else { pf.shm };
    let mut pod_binds = Vec::new();
    for (dest, host, readonly) in [
        ("/etc/hostname", pf.hostname, sc.readonly_rootfs),
        ("/etc/hosts", pf.hosts, sc.readonly_rootfs),
        ("/etc/resolv.conf", pf.resolv_conf, sc.readonly_rootfs),
        ("/dev/shm", shm, false),
    ] {
        let Some(host) = host else { continue };
        if requested.iter().any(|r| r == dest) {
            continue;
        }
        pod_binds.push(BindRequest {
            field: format!("the pod's {dest}"),
            host_path: host.display().to_string(),
            container_path: dest.to_owned(),
            readonly,
            recursive_read_only: false,
            propagation: cri::MountPropagation::PropagationPrivate as i32,
        });
    }
    // The request's first, then the pod's, sorted by the number of path components so a
    // parent is mounted before what is under it (containerd sorts the same list).
    binds.extend(pod_binds);
    binds.sort_by_key(|b| clean(&b.container_path).split('/').count());

    let taken: Vec<String> = binds.iter().map(|b| clean(&b.container_path)).collect();
    let dev_taken = taken.iter().any(|t| t == "/dev");
    let ro = if privileged { "rw" } else { "ro" };
    let defaults = [
        Mount::new("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        Mount::new(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        Mount::new(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        Mount::new(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        Mount::new(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        Mount::new("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", ro]),
        Mount::new(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", ro],
        ),
    ];
    let mut out: Vec<Mount> = defaults
        .into_iter()
        .filter(|m| {
            !taken.contains(&m.destination) && (!dev_taken || !m.destination.starts_with("/dev/"))
        })
        .collect();
    let mut rootfs_propagation: Option<&'static str> = None;
    for b in binds {
        let mut options = vec!["rbind".to_owned()];
        match cri::MountPropagation::try_from(b.propagation) {
            // runc's and youki's rootfs propagation is rprivate already.
            Ok(cri::MountPropagation::PropagationPrivate) => options.push("rprivate".into()),
            Ok(cri::MountPropagation::PropagationBidirectional) => {
                options.push("rshared".into());
                rootfs_propagation = Some("rshared");
            }
            Ok(cri::MountPropagation::PropagationHostToContainer) => {
                options.push("rslave".into());
                if rootfs_propagation.is_none() {
                    rootfs_propagation = Some("rslave");
                }
            }
            Err(_) => {
                return Err(invalid(
                    format!("{}.propagation", b.field),
                    format!("{} is not a mount propagation", b.propagation),
                ));
            }
        }
        options.push(if b.readonly { "ro" } else { "rw" }.into());
        if b.recursive_read_only {
            options.push("rro".into());
        }
        out.push(Mount {
            destination: b.container_path,
            kind: "bind".into(),
            source: b.host_path,
            options,
        });
    }
    Ok((out, rootfs_propagation))
}

/// containerd's `WithDevices`: each device node as the host has it, at the container path,
/// with a cgroup rule allowing the requested permissions; every other device is denied
/// (the runtime adds its default nodes). A privileged container may use every device.
fn devices(
    config: &cri::ContainerConfig,
    host: &dyn HostDevices,
    privileged: bool,
) -> Result<(Vec<Value>, Vec<Value>)> {
    let mut nodes = Vec::new();
    let mut rules = vec![json!({"allow": false, "access": "rwm"})];
    for (i, d) in config.devices.iter().enumerate() {
        let f = |name: &str| format!("config.devices[{i}].{name}");
        check_path(&f("container_path"), &d.container_path, true)?;
        check_path(&f("host_path"), &d.host_path, false)?;
        if d.permissions.is_empty() || !d.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm'))
        {
            return Err(invalid(
                f("permissions"),
                format!("{:?} is not a combination of r, w and m", d.permissions),
            ));
        }
        let node = host
            .device(Path::new(&d.host_path))
            .map_err(|source| SpecError::Device {
                field: f("host_path"),
                path: PathBuf::from(&d.host_path),
                source,
            })?;
        let kind = match node.kind {
            DeviceKind::Char => "c",
            DeviceKind::Block => "b",
        };
        nodes.push(json!({
            "path": d.container_path,
            "type": kind,
            "major": node.major,
            "minor": node.minor,
            "fileMode": node.file_mode,
            "uid": node.uid,
            "gid": node.gid,
        }));
        rules.push(json!({
            "allow": true,
            "type": kind,
            "major": node.major,
            "minor": node.minor,
            "access": d.permissions,
        }));
    }
    if privileged {
        rules = vec![json!({"allow": true, "access": "rwm"})];
    }
    Ok((nodes, rules))
}

fn paths_or(given: &[String], defaults: &[&str], name: &str) -> Result<Vec<String>> {
    if given.is_empty() {
        return Ok(defaults.iter().map(|p| (*p).to_owned()).collect());
    }
    for (i, p) in given.iter().enumerate() {
        check_path(&format!("{SC}.{name}[{i}]"), p, true)?;
    }
    Ok(given.to_vec())
}

/// A seccomp or AppArmor profile as CRI asks for it.
#[derive(Debug, PartialEq, Eq)]
enum Profile {
    Unconfined,
    RuntimeDefault,
    Localhost(String),
}

const LOCALHOST_PREFIX: &str = "localhost/";

/// A profile from its structured field `{SC}.<name>` or, when that is unset, the deprecated
/// string `{SC}.<deprecated_name>`.
fn profile(
    name: &str,
    structured: Option<&cri::SecurityProfile>,
    deprecated_name: &str,
    deprecated: &str,
    unset: Profile,
) -> Result<Profile> {
    let field = format!("{SC}.{name}");
    if let Some(p) = structured {
        return match cri::security_profile::ProfileType::try_from(p.profile_type) {
            Ok(cri::security_profile::ProfileType::Unconfined) => Ok(Profile::Unconfined),
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => Ok(Profile::RuntimeDefault),
            Ok(cri::security_profile::ProfileType::Localhost) => {
                let name = p
                    .localhost_ref
                    .strip_prefix(LOCALHOST_PREFIX)
                    .unwrap_or(&p.localhost_ref);
                if name.is_empty() {
                    return Err(invalid(format!("{field}.localhost_ref"), "empty"));
                }
                Ok(Profile::Localhost(name.to_owned()))
            }
            Err(_) => Err(invalid(
                format!("{field}.profile_type"),
                format!("{} is not a profile type", p.profile_type),
            )),
        };
    }
    match deprecated {
        "" => Ok(unset),
        "unconfined" => Ok(Profile::Unconfined),
        "runtime/default" | "docker/default" => Ok(Profile::RuntimeDefault),
        s => match s.strip_prefix(LOCALHOST_PREFIX) {
            Some(name) if !name.is_empty() => Ok(Profile::Localhost(name.to_owned())),
            _ => Err(invalid(
                format!("{SC}.{deprecated_name}"),
                format!("{s:?} is not unconfined, runtime/default or localhost/<profile>"),
            )),
        },
    }
}

/// containerd's seccomp: none when unset (its default `unset_seccomp_profile = ""`) or
/// Unconfined; the default profile for RuntimeDefault; a Localhost profile read from its file.
#[allow(deprecated)] // `seccomp_profile_path`: older kubelets still send it
fn seccomp(
    sc: &cri::LinuxContainerSecurityContext,
    capabilities: &[String],
    root: &Path,
) -> Result<Option<Value>> {
    let p = profile(
        "seccomp",
        sc.seccomp.as_ref(),
        "seccomp_profile_path",
        &sc.seccomp_profile_path,
        Profile::Unconfined,
    )?;
    Ok(match p {
        Profile::Unconfined => None,
        Profile::RuntimeDefault => Some(seccomp::default_profile(capabilities)),
        Profile::Localhost(path) => Some(localhost_seccomp(&root.join(path))?),
    })
}

fn localhost_seccomp(path: &Path) -> Result<Value> {
    let io = |source| SpecError::SeccompProfile {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_SECCOMP_PROFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SECCOMP_PROFILE_BYTES {
        return Err(SpecError::SeccompProfileTooLarge {
            path: path.to_owned(),
        });
    }
    let bad = |source| SpecError::SeccompProfileInvalid {
        path: path.to_owned(),
        source,
    };
    let profile: oci_spec::runtime::LinuxSeccomp = serde_json::from_slice(&bytes).map_err(bad)?;
    serde_json::to_value(profile).map_err(bad)
}

/// AppArmor: `localhost/NAME` names the process's profile (privileged or not, as asked);
/// `runtime/default` (also the unset default) and `unconfined` set none (module doc).
#[allow(deprecated)] // `apparmor_profile`: older kubelets still send it
fn apparmor(sc: &cri::LinuxContainerSecurityContext) -> Result<Option<String>> {
    let p = profile(
        "apparmor",
        sc.apparmor.as_ref(),
        "apparmor_profile",
        &sc.apparmor_profile,
        Profile::RuntimeDefault,
    )?;
    Ok(match p {
        Profile::Localhost(name) => Some(name),
        Profile::RuntimeDefault | Profile::Unconfined => None,
    })
}

fn non_negative(field: &str, v: i64) -> Result<i64> {
    if v < 0 {
        return Err(invalid(field, format!("{v} is negative")));
    }
    Ok(v)
}

fn cpuset(field: &str, v: &str) -> Result<()> {
    if !v
        .chars()
        .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
    {
        return Err(invalid(field, format!("{v:?} is not a CPU or node list")));
    }
    Ok(())
}

/// containerd's `WithResources`: what is set (non-zero) is passed on; a memory limit without a
/// swap limit also limits swap (no swapping) where the controller can.
fn resources_into(
    r: &cri::LinuxContainerResources,
    host: &HostFacts,
    out: &mut Value,
) -> Result<()> {
    resources_at("config.linux.resources", r, host, out)
}

/// [`resources_into`] with errors naming the fields under `prefix` (UpdateContainerResources'
/// `linux`).
pub(super) fn resources_at(
    prefix: &str,
    r: &cri::LinuxContainerResources,
    host: &HostFacts,
    out: &mut Value,
) -> Result<()> {
    let f = |name: &str| format!("{prefix}.{name}");
    let mut cpu = serde_json::Map::new();
    if r.cpu_period != 0 {
        cpu.insert(
            "period".into(),
            json!(non_negative(&f("cpu_period"), r.cpu_period)?),
        );
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_shares != 0 {
        cpu.insert(
            "shares".into(),
            json!(non_negative(&f("cpu_shares"), r.cpu_shares)?),
        );
    }
    if !r.cpuset_cpus.is_empty() {
        cpuset(&f("cpuset_cpus"), &r.cpuset_cpus)?;
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpuset(&f("cpuset_mems"), &r.cpuset_mems)?;
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        out["cpu"] = Value::Object(cpu);
    }
    let mut memory = serde_json::Map::new();
    let limit = non_negative(&f("memory_limit_in_bytes"), r.memory_limit_in_bytes)?;
    if limit != 0 {
        memory.insert("limit".into(), json!(limit));
        if r.memory_swap_limit_in_bytes == 0 && host.swap_controller {
            memory.insert("swap".into(), json!(limit));
        }
    }
    if r.memory_swap_limit_in_bytes != 0 && host.swap_controller {
        if r.memory_swap_limit_in_bytes < -1 {
            return Err(invalid(
                f("memory_swap_limit_in_bytes"),
                format!("{} is neither a limit nor -1", r.memory_swap_limit_in_bytes),
            ));
        }
        memory.insert("swap".into(), json!(r.memory_swap_limit_in_bytes));
    }
    if !memory.is_empty() {
        out["memory"] = Value::Object(memory);
    }
    let mut hugepages = Vec::new();
    for (i, h) in r.hugepage_limits.iter().enumerate() {
        if h.page_size.is_empty() || !h.page_size.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid(
                f(&format!("hugepage_limits[{i}].page_size")),
                format!("{:?} is not a page size", h.page_size),
            ));
        }
        hugepages.push(json!({"pageSize": h.page_size, "limit": h.limit}));
    }
    if !hugepages.is_empty() {
        out["hugepageLimits"] = json!(hugepages);
    }
    if !r.unified.is_empty() {
        for key in r.unified.keys() {
            if key.is_empty() || key.contains('/') || key.starts_with('.') {
                return Err(invalid(
                    f("unified"),
                    format!("{key:?} is not a cgroup v2 file"),
                ));
            }
        }
        let unified: BTreeMap<&String, &String> = r.unified.iter().collect();
        out["unified"] = json!(unified);
    }
    Ok(())
}

/// containerd's `WithOOMScoreAdj` with `restrict_oom_score_adj`: never below the daemon's own.
fn oom_score(r: &cri::LinuxContainerResources, host: &HostFacts) -> Result<i32> {
    let adj = i32::try_from(r.oom_score_adj)
        .ok()
        .filter(|a| (-1000..=1000).contains(a))
        .ok_or_else(|| {
            invalid(
                "config.linux.resources.oom_score_adj",
                format!("{} is outside -1000..=1000", r.oom_score_adj),
            )
        })?;
    Ok(adj.max(host.oom_score_adj))
}

/// `<cgroup_parent>/<id>` (cgroupfs) as containerd's `getCgroupsPath`; `/k8s.io/<id>` without a
/// parent (containerd's namespaced default).
fn cgroups_path(pod: &cri::LinuxPodSandboxConfig, id: &str) -> Result<String> {
    let parent = &pod.cgroup_parent;
    if parent.is_empty() {
        return Ok(format!("/{}/{id}", super::NAMESPACE));
    }
    let field = "sandbox_config.linux.cgroup_parent";
    if parent.ends_with(".slice") {
        return Err(SpecError::Unsupported {
            field: field.into(),
            what: "a systemd cgroup parent (the cgroup driver is cgroupfs)",
        });
    }
    check_path(field, parent, true)?;
    Ok(format!("{}/{id}", parent.trim_end_matches('/')))
}

/// The pod's sysctls (kubelet's and runc's rules): only namespaced ones, and only for a
/// namespace the container does not share with the host: `net.*` needs the pod's network,
/// `kernel.shm*`, `kernel.msg*`, `kernel.sem` and `fs.mqueue.*` its IPC namespace.
fn sysctls(pod: &cri::LinuxPodSandboxConfig, ns: &Namespaces) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (key, value) in &pod.sysctls {
        let field = format!("sandbox_config.linux.sysctls[{key:?}]");
        let dotted = key.replace('/', ".");
        let ipc = dotted.starts_with("kernel.shm")
            || dotted.starts_with("kernel.msg")
            || dotted == "kernel.sem"
            || dotted.starts_with("fs.mqueue.");
        let net = dotted.starts_with("net.");
        if !ipc && !net {
            return Err(invalid(field, "not a namespaced sysctl"));
        }
        if net && ns.host_network {
            return Err(invalid(field, "not allowed with the host's network"));
        }
        if ipc && ns.host_ipc {
            return Err(invalid(field, "not allowed with the host's IPC namespace"));
        }
        no_nul(|| field.clone(), value)?;
        out.insert(key.clone(), value.clone());
    }
    Ok(out)
}

/// The spec of a `vm` pod's sandbox task: no process (the vm shim boots the pod's VM for it,
/// with nothing in it), containerd's sandbox annotations over the pod's, the pod's cgroup, and
/// the pod's `linux.resources` (the sum of its containers' limits), from which the shim sizes
/// the VM. The network namespace is the pod's, for the VM's network once it has one.
pub fn pod_vm_spec(
    pod_id: &str,
    sandbox: &cri::PodSandboxConfig,
    netns: Option<&Path>,
    host: &HostFacts,
) -> Result<oci_spec::runtime::Spec> {
    use self::annotations::*;
    let pod_linux = sandbox.linux.clone().unwrap_or_default();
    let mut resources = json!({});
    if let Some(r) = &pod_linux.resources {
        resources_at("sandbox_config.linux.resources", r, host, &mut resources)?;
    }
    let mut annotations: BTreeMap<String, String> = sandbox
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta = sandbox.metadata.clone().unwrap_or_default();
    for (k, v) in [
        (SANDBOX_ID, pod_id),
        (SANDBOX_NAMESPACE, meta.namespace.as_str()),
        (SANDBOX_UID, meta.uid.as_str()),
        (SANDBOX_NAME, meta.name.as_str()),
        (CONTAINER_TYPE, CONTAINER_TYPE_SANDBOX),
    ] {
        annotations.insert(k.to_owned(), v.to_owned());
    }
    for (k, v) in sandbox_resources(sandbox) {
        annotations.insert(k.to_owned(), v);
    }
    let mut linux = json!({
        "resources": resources,
        "cgroupsPath": cgroups_path(&pod_linux, pod_id)?,
    });
    if let Some(path) = netns {
        linux["namespaces"] = json!([{"type": "network", "path": path}]);
    }
    let mut spec = json!({
        "ociVersion": "1.1.0",
        "root": {"path": "rootfs", "readonly": true},
        "annotations": annotations,
        "linux": linux,
    });
    if !sandbox.hostname.is_empty() {
        no_nul(|| "sandbox_config.hostname".into(), &sandbox.hostname)?;
        spec["hostname"] = json!(sandbox.hostname);
    }
    serde_json::from_value(spec).map_err(SpecError::Assemble)
}

/// The container's annotations under containerd's (`DefaultCRIAnnotations`), which win.
fn annotations(input: &SpecInput<'_>, name: &str) -> BTreeMap<String, String> {
    use self::annotations::*;
    let mut out: BTreeMap<String, String> = input
        .config
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta = input.sandbox.metadata.clone().unwrap_or_default();
    let image = input
        .config
        .image
        .as_ref()
        .map(|i| i.user_specified_image.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(input.image_name);
    for (k, v) in [
        (SANDBOX_ID, input.sandbox_id),
        (SANDBOX_NAMESPACE, meta.namespace.as_str()),
        (SANDBOX_UID, meta.uid.as_str()),
        (SANDBOX_NAME, meta.name.as_str()),
        (CONTAINER_NAME, name),
        (IMAGE_NAME, image),
        (
            CONTAINER_TYPE,
            if input.pause {
                CONTAINER_TYPE_SANDBOX
            } else {
                CONTAINER_TYPE_CONTAINER
            },
        ),
    ] {
        out.insert(k.to_owned(), v.to_owned());
    }
    if input.pause {
        for (k, v) in sandbox_resources(input.sandbox) {
            out.insert(k.to_owned(), v);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, deprecated)]
mod tests {
    //! Each test says which containerd (or kubelet) behaviour it holds the module to.

    use super::*;

    /// `/dev/fuse` (10:229) and `/dev/sda` (8:0), as a host has them.
    struct FakeDevices;
    impl HostDevices for FakeDevices {
        fn device(&self, path: &Path) -> std::io::Result<DeviceNode> {
            match path.to_str() {
                Some("/dev/fuse") => Ok(DeviceNode {
                    kind: DeviceKind::Char,
                    major: 10,
                    minor: 229,
                    file_mode: 0o666,
                    uid: 0,
                    gid: 0,
                }),
                Some("/dev/sda") => Ok(DeviceNode {
                    kind: DeviceKind::Block,
                    major: 8,
                    minor: 0,
                    file_mode: 0o660,
                    uid: 0,
                    gid: 6,
                }),
                _ => Err(std::io::ErrorKind::NotFound.into()),
            }
        }
    }

    fn accounts() -> EtcAccounts {
        EtcAccounts::parse(
            "root:x:0:0:root:/root:/bin/sh\n\
             # a comment\n\
             daemon:x:1:1::/:/sbin/nologin\n\
             app:x:1000:1000:App:/home/app:/bin/sh\n\
             broken line\n",
            "root:x:0:\n\
             daemon:x:1:\n\
             app:x:1000:app\n\
             audio:x:29:app,daemon\n\
             video:x:44:app\n\
             wheel:x:10:root\n",
        )
    }

    fn host() -> HostFacts {
        HostFacts {
            hostname: "node-1".into(),
            cgroup_v2: true,
            swap_controller: true,
            oom_score_adj: -999,
            capabilities: Vec::new(),
        }
    }

    fn pod() -> cri::PodSandboxConfig {
        let mut p = switchyard_api::cri_defaults::pod_config(
            cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            },
            "web-pod",
            "/var/log/pods/x",
        );
        p.linux.as_mut().unwrap().cgroup_parent = "/kubepods/besteffort/poduid-1".into();
        p
    }

    fn container() -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                resources: None,
            }),
            ..Default::default()
        }
    }

    fn image() -> RunConfig {
        RunConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into(), "--port=80".into()],
            env: vec!["PATH=/image/bin".into(), "LANG=C.UTF-8".into()],
            working_dir: "/srv".into(),
            user: String::new(),
            wasm: false,
        }
    }

    /// What a test varies.
    struct Case {
        config: cri::ContainerConfig,
        sandbox: cri::PodSandboxConfig,
        image: RunConfig,
        namespaces: PodNamespaces<'static>,
        pod_files: PodFiles<'static>,
        host: HostFacts,
        seccomp_root: PathBuf,
    }

    impl Case {
        fn new() -> Case {
            Case {
                config: container(),
                sandbox: pod(),
                image: image(),
                namespaces: PodNamespaces {
                    network: Some(Path::new("/run/switchyard/netns/p1")),
                    ipc: Some(Path::new("/proc/42/ns/ipc")),
                    uts: Some(Path::new("/proc/42/ns/uts")),
                    pid: None,
                    target_pid: None,
                },
                pod_files: PodFiles {
                    hosts: Some(Path::new("/var/lib/switchyard/cri/p1/hosts")),
                    resolv_conf: Some(Path::new("/var/lib/switchyard/cri/p1/resolv.conf")),
                    hostname: Some(Path::new("/var/lib/switchyard/cri/p1/hostname")),
                    shm: Some(Path::new("/run/switchyard/cri/p1/shm")),
                },
                host: host(),
                seccomp_root: PathBuf::from("/var/lib/kubelet/seccomp"),
            }
        }

        fn sc(&mut self) -> &mut cri::LinuxContainerSecurityContext {
            self.config
                .linux
                .as_mut()
                .unwrap()
                .security_context
                .as_mut()
                .unwrap()
        }

        fn ns(&mut self) -> &mut cri::NamespaceOption {
            self.sc().namespace_options.as_mut().unwrap()
        }

        fn try_build(&self) -> Result<Value> {
            let accounts = accounts();
            let spec = container_spec(&SpecInput {
                id: "c1",
                config: &self.config,
                sandbox_id: "p1",
                sandbox: &self.sandbox,
                image_name: "registry.test/library/busybox:1.36",
                image: &self.image,
                accounts: &accounts,
                devices: &FakeDevices,
                namespaces: self.namespaces,
                pod_files: self.pod_files,
                seccomp_profile_root: &self.seccomp_root,
                host: &self.host,
                pause: false,
            })?;
            Ok(serde_json::to_value(&spec).unwrap())
        }

        fn build(&self) -> Value {
            self.try_build().unwrap()
        }

        fn error(&self) -> String {
            let e = self.try_build().expect_err("the spec should be refused");
            switchyard_base::chain(&e)
        }
    }

    /// oci-spec keeps capabilities in sets: compare them sorted.
    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn sort_capabilities(spec: &mut Value) {
        for set in ["bounding", "effective", "permitted"] {
            let caps = &mut spec["process"]["capabilities"][set];
            *caps = json!(sorted(strings(caps)));
        }
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    }

    fn mount<'v>(spec: &'v Value, dest: &str) -> Option<&'v Value> {
        spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dest)
    }

    fn namespace<'v>(spec: &'v Value, kind: &str) -> Option<&'v Value> {
        spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == kind)
    }

    // containerd's WithProcessArgs (Docker's rules for command and args).
    #[test]
    fn command_replaces_the_entrypoint_and_drops_cmd_args_replace_cmd() {
        let mut c = Case::new();
        assert_eq!(
            strings(&c.build()["process"]["args"]),
            ["/entry", "serve", "--port=80"]
        );
        c.config.args = vec!["debug".into()];
        assert_eq!(strings(&c.build()["process"]["args"]), ["/entry", "debug"]);
        c.config.args.clear();
        c.config.command = vec!["/bin/sh".into()];
        assert_eq!(strings(&c.build()["process"]["args"]), ["/bin/sh"]);
        c.config.args = vec!["-c".into(), "true".into()];
        assert_eq!(
            strings(&c.build()["process"]["args"]),
            ["/bin/sh", "-c", "true"]
        );

        // An entrypoint of [""] is none.
        let mut c = Case::new();
        c.image.entrypoint = vec![String::new()];
        assert_eq!(
            strings(&c.build()["process"]["args"]),
            ["serve", "--port=80"]
        );
        // Nothing to run: containerd's "no command specified".
        c.image.cmd.clear();
        assert!(
            c.error().starts_with("config.command: empty"),
            "{}",
            c.error()
        );
    }

    // containerd: default PATH, TERM=xterm (WithTTY), HOSTNAME, then image env, then CRI envs,
    // each replacing the key's earlier value.
    #[test]
    fn env_is_path_term_hostname_image_then_request() {
        let mut c = Case::new();
        c.config.tty = true;
        c.config.envs = vec![
            cri::KeyValue {
                key: "LANG".into(),
                value: "de_DE.UTF-8".into(),
            },
            cri::KeyValue {
                key: "EXTRA".into(),
                value: "a=b".into(),
            },
        ];
        let spec = c.build();
        assert_eq!(
            strings(&spec["process"]["env"]),
            [
                "PATH=/image/bin",
                "TERM=xterm",
                "HOSTNAME=web-pod",
                "LANG=de_DE.UTF-8",
                "EXTRA=a=b"
            ]
        );
        assert_eq!(spec["process"]["terminal"], true);

        // Without a pod hostname, the node's (containerd's os.Hostname()).
        let mut c = Case::new();
        c.sandbox.hostname.clear();
        c.image.env.clear();
        assert_eq!(
            strings(&c.build()["process"]["env"]),
            [DEFAULT_PATH, "HOSTNAME=node-1"]
        );

        c.config.envs = vec![cri::KeyValue {
            key: "A=B".into(),
            value: "x".into(),
        }];
        assert!(
            c.error().starts_with("config.envs[0].key:"),
            "{}",
            c.error()
        );
    }

    #[test]
    fn set_env_replaces_appends_and_unsets() {
        let mut env = vec!["A=1".to_owned(), "B=2".to_owned()];
        set_env(&mut env, "A=3".into());
        set_env(&mut env, "C=4".into());
        set_env(&mut env, "B".into());
        assert_eq!(env, ["A=3", "C=4"]);
    }

    // containerd: the request's working_dir, else the image's, else the spec default "/".
    #[test]
    fn working_dir_request_then_image_then_root() {
        let mut c = Case::new();
        assert_eq!(c.build()["process"]["cwd"], "/srv");
        c.config.working_dir = "/work".into();
        assert_eq!(c.build()["process"]["cwd"], "/work");
        c.config.working_dir.clear();
        c.image.working_dir.clear();
        assert_eq!(c.build()["process"]["cwd"], "/");
        c.config.working_dir = "work".into();
        assert_eq!(c.error(), "config.working_dir: \"work\" is not absolute");
    }

    // containerd's WithUser/WithUserID/WithUsername and WithAdditionalGIDs (+ the primary gid,
    // CVE-2023-25173) then WithSupplementalGroups.
    #[test]
    fn users_resolve_like_containerd() {
        let mut c = Case::new();
        // No user anywhere: root, with root's groups.
        assert_eq!(
            c.build()["process"]["user"],
            json!({"uid": 0, "gid": 0, "additionalGids": [0, 10]})
        );
        // A uid alone takes its passwd group, and the groups listing the user.
        c.sc().run_as_user = Some(cri::Int64Value { value: 1000 });
        assert_eq!(
            c.build()["process"]["user"],
            json!({"uid": 1000, "gid": 1000, "additionalGids": [1000, 29, 44]})
        );
        // An unknown uid is fine: group 0.
        c.sc().run_as_user = Some(cri::Int64Value { value: 4242 });
        assert_eq!(
            c.build()["process"]["user"],
            json!({"uid": 4242, "gid": 0, "additionalGids": [0]})
        );
        // run_as_group and supplemental groups.
        c.sc().run_as_group = Some(cri::Int64Value { value: 7 });
        c.sc().supplemental_groups = vec![7, 100];
        assert_eq!(
            c.build()["process"]["user"],
            json!({"uid": 4242, "gid": 7, "additionalGids": [7, 100]})
        );
        // Strict: only the request's groups.
        c.sc().supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32;
        c.sc().supplemental_groups = vec![100];
        assert_eq!(
            c.build()["process"]["user"],
            json!({"uid": 4242, "gid": 7, "additionalGids": [100]})
        );
        c.sc().run_as_user = Some(cri::Int64Value { value: -1 });
        assert_eq!(
            c.error(),
            "config.linux.security_context.run_as_user: -1 is not a user or group id"
        );

        // A name is resolved through the image's passwd; one that is not there is refused.
        let mut c = Case::new();
        c.sc().run_as_username = "app".into();
        assert_eq!(c.build()["process"]["user"]["uid"], 1000);
        c.sc().run_as_username = "nobody".into();
        assert_eq!(
            c.error(),
            "config.linux.security_context.run_as_username: no user \"nobody\" in the \
             container's /etc/passwd"
        );

        // The image's USER "name:group" when the request names none.
        let mut c = Case::new();
        c.image.user = "app:audio".into();
        assert_eq!(
            c.build()["process"]["user"],
            json!({"uid": 1000, "gid": 29, "additionalGids": [29, 44]})
        );
        c.image.user = "app:nogroup".into();
        assert_eq!(
            c.error(),
            "the image's User: no group \"nogroup\" in the container's /etc/group"
        );
        c.image.user = "1:1".into();
        assert_eq!(c.build()["process"]["user"]["uid"], 1);
        // The request's user wins over the image's.
        c.sc().run_as_user = Some(cri::Int64Value { value: 1000 });
        assert_eq!(c.build()["process"]["user"]["gid"], 1000);
    }

    // containerd's default spec mounts less /run, /sys/fs/cgroup read-only (WithMounts), and the
    // pod's hostname, hosts, resolv.conf and /dev/shm as bind mounts (linuxContainerMounts).
    #[test]
    fn default_mounts_and_the_pods_files() {
        let c = Case::new();
        let spec = c.build();
        let dests: Vec<&str> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/etc/hostname",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/dev/shm"
            ]
        );
        assert_eq!(
            mount(&spec, "/sys").unwrap()["options"],
            json!(["nosuid", "noexec", "nodev", "ro"])
        );
        assert_eq!(
            mount(&spec, "/sys/fs/cgroup").unwrap(),
            &json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                    "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
        );
        assert_eq!(
            mount(&spec, "/dev/shm").unwrap(),
            &json!({"destination": "/dev/shm", "type": "bind", "source": "/run/switchyard/cri/p1/shm",
                    "options": ["rbind", "rprivate", "rw"]})
        );
        assert_eq!(
            mount(&spec, "/etc/hosts").unwrap()["options"],
            json!(["rbind", "rprivate", "rw"])
        );
        assert_eq!(spec["hostname"], "web-pod");

        // Read-only root: the pod's files read-only too, /dev/shm not.
        let mut c = Case::new();
        c.sc().readonly_rootfs = true;
        let spec = c.build();
        assert_eq!(spec["root"], json!({"path": "rootfs", "readonly": true}));
        for f in ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"] {
            assert_eq!(mount(&spec, f).unwrap()["options"][2], "ro", "{f}");
        }
        assert_eq!(mount(&spec, "/dev/shm").unwrap()["options"][2], "rw");

        // No pod shm directory: the default 64k tmpfs; host IPC: the host's /dev/shm.
        let mut c = Case::new();
        c.pod_files.shm = None;
        assert_eq!(mount(&c.build(), "/dev/shm").unwrap()["type"], "tmpfs");
        c.ns().ipc = cri::NamespaceMode::Node as i32;
        assert_eq!(mount(&c.build(), "/dev/shm").unwrap()["source"], "/dev/shm");
    }

    // containerd's WithMounts: rbind, propagation option and rootfs propagation, ro/rw, rro;
    // a requested destination replaces the default and the pod's file; sorted by depth.
    #[test]
    fn requested_mounts() {
        let mut c = Case::new();
        let m = |host: &str, dest: &str| cri::Mount {
            host_path: host.into(),
            container_path: dest.into(),
            ..Default::default()
        };
        c.config.mounts = vec![
            cri::Mount {
                readonly: true,
                propagation: cri::MountPropagation::PropagationHostToContainer as i32,
                ..m("/var/lib/kubelet/pods/x/volumes/cfg", "/etc/app/conf")
            },
            cri::Mount {
                readonly: true,
                recursive_read_only: true,
                ..m("/data", "/data")
            },
            m("/var/lib/kubelet/pods/x/etc-hosts", "/etc/hosts"),
        ];
        let spec = c.build();
        assert_eq!(
            mount(&spec, "/etc/app/conf").unwrap(),
            &json!({"destination": "/etc/app/conf", "type": "bind",
                    "source": "/var/lib/kubelet/pods/x/volumes/cfg",
                    "options": ["rbind", "rslave", "ro"]})
        );
        assert_eq!(
            mount(&spec, "/data").unwrap()["options"],
            json!(["rbind", "rprivate", "ro", "rro"])
        );
        assert_eq!(
            mount(&spec, "/etc/hosts").unwrap()["source"],
            "/var/lib/kubelet/pods/x/etc-hosts"
        );
        let hosts = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["destination"] == "/etc/hosts")
            .count();
        assert_eq!(hosts, 1);
        assert_eq!(spec["linux"]["rootfsPropagation"], "rslave");
        // The request's mounts, then the pod's, in depth order (a stable sort here).
        let binds: Vec<&str> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "bind")
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            binds,
            [
                "/data",
                "/etc/hosts",
                "/etc/hostname",
                "/etc/resolv.conf",
                "/dev/shm",
                "/etc/app/conf"
            ]
        );

        // Bidirectional: rshared, and the root becomes rshared.
        c.config.mounts[1] = cri::Mount {
            propagation: cri::MountPropagation::PropagationBidirectional as i32,
            ..m("/mnt/shared", "/shared")
        };
        let spec = c.build();
        assert_eq!(mount(&spec, "/shared").unwrap()["options"][1], "rshared");
        assert_eq!(spec["linux"]["rootfsPropagation"], "rshared");

        // A requested /sys/fs/cgroup replaces containerd's read-only cgroup mount.
        let mut c = Case::new();
        c.config.mounts = vec![m("/sys/fs/cgroup", "/sys/fs/cgroup")];
        let spec = c.build();
        assert_eq!(mount(&spec, "/sys/fs/cgroup").unwrap()["type"], "bind");

        // /dev requested: every default under /dev goes.
        let mut c = Case::new();
        c.pod_files.shm = None;
        c.config.mounts = vec![m("/dev", "/dev")];
        let spec = c.build();
        assert!(mount(&spec, "/dev/pts").is_none());
        assert_eq!(mount(&spec, "/dev").unwrap()["type"], "bind");
    }

    #[test]
    fn bad_mounts_are_refused_naming_the_field() {
        let mut c = Case::new();
        let ok = cri::Mount {
            host_path: "/a".into(),
            container_path: "/a".into(),
            ..Default::default()
        };
        c.config.mounts = vec![ok.clone(), ok.clone(), ok.clone()];
        c.config.mounts[2].container_path = "rel".into();
        assert_eq!(
            c.error(),
            "config.mounts[2].container_path: \"rel\" must be absolute"
        );
        c.config.mounts[2] = ok.clone();
        c.config.mounts[1].host_path = "x/y".into();
        assert_eq!(
            c.error(),
            "config.mounts[1].host_path: \"x/y\" must be absolute"
        );
        c.config.mounts[1] = ok.clone();
        c.config.mounts[0].container_path = "/a/../etc".into();
        assert!(c.error().starts_with("config.mounts[0].container_path:"));
        // containerd: recursive read-only needs read-only and private propagation.
        c.config.mounts[0] = cri::Mount {
            recursive_read_only: true,
            ..ok.clone()
        };
        assert_eq!(
            c.error(),
            "config.mounts[0].recursive_read_only: a recursively read-only mount must be read-only"
        );
        c.config.mounts[0] = cri::Mount {
            recursive_read_only: true,
            readonly: true,
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            ..ok.clone()
        };
        assert!(c.error().contains("private propagation"));
        c.config.mounts[0] = cri::Mount {
            propagation: 9,
            ..ok.clone()
        };
        assert_eq!(
            c.error(),
            "config.mounts[0].propagation: 9 is not a mount propagation"
        );
        c.config.mounts[0] = cri::Mount {
            uid_mappings: vec![cri::IdMapping::default()],
            ..ok
        };
        assert!(c.error().contains("ID-mapped mount is not supported"));
    }

    // containerd's WithDevices: the host node at the container path and a cgroup allow rule.
    #[test]
    fn devices_become_nodes_and_cgroup_rules() {
        let mut c = Case::new();
        c.config.devices = vec![
            cri::Device {
                container_path: "/dev/fuse".into(),
                host_path: "/dev/fuse".into(),
                permissions: "rwm".into(),
            },
            cri::Device {
                container_path: "/dev/xvda".into(),
                host_path: "/dev/sda".into(),
                permissions: "r".into(),
            },
        ];
        let spec = c.build();
        assert_eq!(
            spec["linux"]["devices"],
            json!([
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666, "uid": 0, "gid": 0},
                {"path": "/dev/xvda", "type": "b", "major": 8, "minor": 0, "fileMode": 0o660, "uid": 0, "gid": 6}
            ])
        );
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
                {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "r"}
            ])
        );
        c.config.devices[1].permissions = "rx".into();
        assert!(c.error().starts_with("config.devices[1].permissions:"));
        c.config.devices[1].permissions = "r".into();
        c.config.devices[1].host_path = "/dev/nope".into();
        assert!(
            c.error()
                .starts_with("config.devices[1].host_path: device /dev/nope: "),
            "{}",
            c.error()
        );
    }

    #[test]
    fn sys_devices_stats_a_real_node() {
        let null = SysDevices.device(Path::new("/dev/null")).unwrap();
        assert_eq!(
            (null.kind, null.major, null.minor),
            (DeviceKind::Char, 1, 3)
        );
        assert!(SysDevices.device(Path::new("/")).is_err());
    }

    // containerd's WithPodNamespaces: network/IPC/UTS the pod's, PID per mode, a new mount
    // namespace, cgroupns on cgroup v2 unless privileged.
    #[test]
    fn namespaces_follow_the_modes() {
        let mut c = Case::new();
        let spec = c.build();
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "mount"},
                {"type": "network", "path": "/run/switchyard/netns/p1"},
                {"type": "cgroup"}
            ])
        );
        assert_eq!(spec["hostname"], "web-pod");

        // POD pid with the pod's path; TARGET with the target's.
        c.ns().pid = cri::NamespaceMode::Pod as i32;
        c.namespaces.pid = Some(Path::new("/proc/42/ns/pid"));
        assert_eq!(
            namespace(&c.build(), "pid").unwrap()["path"],
            "/proc/42/ns/pid"
        );
        c.ns().pid = cri::NamespaceMode::Target as i32;
        c.ns().target_id = "c0".into();
        assert!(
            c.error()
                .contains("target_id: no PID namespace found for target container \"c0\"")
        );
        c.namespaces.target_pid = Some(Path::new("/proc/77/ns/pid"));
        assert_eq!(
            namespace(&c.build(), "pid").unwrap()["path"],
            "/proc/77/ns/pid"
        );

        // Host network, PID and IPC: none of those namespaces, no UTS one, no hostname.
        let mut c = Case::new();
        c.namespaces.network = None;
        c.ns().pid = cri::NamespaceMode::Node as i32;
        c.ns().ipc = cri::NamespaceMode::Node as i32;
        c.host.cgroup_v2 = false;
        let spec = c.build();
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "mount"}]));
        assert!(spec.get("hostname").is_none());

        // User namespaces are refused.
        let mut c = Case::new();
        c.ns().userns_options = Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        });
        assert!(
            c.error()
                .contains("userns_options: a user namespace is not supported")
        );
    }

    // containerd's WithPrivileged (+ WithHostDevices' WithAllDevicesAllowed): every capability,
    // no seccomp, AppArmor or masked paths, sysfs and cgroupfs writable, every device allowed;
    // refused in a pod that is not privileged.
    #[test]
    fn privileged() {
        let mut c = Case::new();
        c.sc().privileged = true;
        c.sc().seccomp = Some(cri::SecurityProfile::default());
        c.sc().capabilities = Some(cri::Capability {
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        assert_eq!(
            c.error(),
            "config.linux.security_context.privileged: the pod sandbox is not privileged"
        );
        c.sandbox
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .privileged = true;
        let spec = c.build();
        assert_eq!(
            strings(&spec["process"]["capabilities"]["bounding"]).len(),
            ALL_CAPABILITIES.len()
        );
        assert!(spec["linux"].get("seccomp").is_none());
        assert_eq!(spec["linux"]["maskedPaths"], json!([]));
        assert_eq!(spec["linux"]["readonlyPaths"], json!([]));
        assert_eq!(mount(&spec, "/sys").unwrap()["options"][3], "rw");
        assert_eq!(mount(&spec, "/sys/fs/cgroup").unwrap()["options"][4], "rw");
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([{"allow": true, "access": "rwm"}])
        );
        assert!(namespace(&spec, "cgroup").is_none());
    }

    // As containerd's: "all" is the daemon's own effective set where the node's bounding set
    // lacks some (here CAP_SYS_RESOURCE, bit 24), for a privileged container and for ALL.
    #[test]
    fn all_capabilities_are_the_daemons_own() {
        let own = capability_names("000001fffeffffff");
        assert_eq!(own.len(), ALL_CAPABILITIES.len() - 1);
        assert!(!own.iter().any(|c| c == "CAP_SYS_RESOURCE"), "{own:?}");
        assert!(capability_names("not hex").is_empty());
        let mut c = Case::new();
        c.host.capabilities = own.clone();
        c.sc().capabilities = Some(cri::Capability {
            add_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        let caps =
            |c: &Case, set: &str| sorted(strings(&c.build()["process"]["capabilities"][set]));
        assert_eq!(caps(&c, "bounding"), sorted(own.clone()));
        c.sc().capabilities = None;
        c.sc().privileged = true;
        c.sandbox
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .privileged = true;
        assert_eq!(caps(&c, "effective"), sorted(own));
    }

    // containerd's WithCapabilities: ALL in add/drop first, then names (CAP_ added, upper case).
    #[test]
    fn capabilities_add_and_drop() {
        let mut c = Case::new();
        let caps = |c: &Case| sorted(strings(&c.build()["process"]["capabilities"]["effective"]));
        let defaults = sorted(
            DEFAULT_CAPABILITIES
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        );
        assert_eq!(caps(&c), defaults);
        let mut spec = c.build();
        sort_capabilities(&mut spec);
        let sets = &spec["process"]["capabilities"];
        assert_eq!(sets["bounding"], sets["permitted"]);
        assert_eq!(sets["bounding"], sets["effective"]);
        assert!(sets.get("inheritable").is_none() && sets.get("ambient").is_none());
        c.sc().capabilities = Some(cri::Capability {
            add_capabilities: vec!["net_admin".into(), "CAP_SYS_TIME".into()],
            drop_capabilities: vec!["MKNOD".into(), "cap_net_raw".into()],
            ..Default::default()
        });
        let got = caps(&c);
        assert!(got.contains(&"CAP_NET_ADMIN".to_owned()));
        assert!(got.contains(&"CAP_SYS_TIME".to_owned()));
        assert!(!got.contains(&"CAP_MKNOD".to_owned()));
        assert!(!got.contains(&"CAP_NET_RAW".to_owned()));
        assert_eq!(got.len(), DEFAULT_CAPABILITIES.len());

        c.sc().capabilities = Some(cri::Capability {
            add_capabilities: vec!["NET_BIND_SERVICE".into()],
            drop_capabilities: vec!["all".into()],
            ..Default::default()
        });
        assert_eq!(caps(&c), ["CAP_NET_BIND_SERVICE"]);
        c.sc().capabilities = Some(cri::Capability {
            add_capabilities: vec!["ALL".into()],
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        });
        assert_eq!(caps(&c).len(), ALL_CAPABILITIES.len() - 1);
        c.sc().capabilities = Some(cri::Capability {
            add_capabilities: vec!["CHOWN".into(), "FLY".into()],
            ..Default::default()
        });
        assert_eq!(
            c.error(),
            "config.linux.security_context.capabilities.add_capabilities[1]: \"FLY\" is not a \
             capability"
        );
    }

    // containerd 2 takes the request's masked/readonly paths; without any, the defaults here.
    #[test]
    fn masked_and_readonly_paths() {
        let mut c = Case::new();
        let spec = c.build();
        assert_eq!(strings(&spec["linux"]["maskedPaths"]), DEFAULT_MASKED_PATHS);
        assert_eq!(
            strings(&spec["linux"]["readonlyPaths"]),
            DEFAULT_READONLY_PATHS
        );
        c.sc().masked_paths = vec!["/proc/kcore".into()];
        c.sc().readonly_paths = vec!["/proc/sys".into()];
        let spec = c.build();
        assert_eq!(spec["linux"]["maskedPaths"], json!(["/proc/kcore"]));
        assert_eq!(spec["linux"]["readonlyPaths"], json!(["/proc/sys"]));
        c.sc().masked_paths = vec!["proc".into()];
        assert!(
            c.error()
                .starts_with("config.linux.security_context.masked_paths[0]:")
        );
    }

    // sputil.GenerateSeccompSecurityProfile / GenerateSeccompSpecOpts.
    #[test]
    fn seccomp_profiles() {
        let mut c = Case::new();
        // Unset: unconfined (containerd's default unset_seccomp_profile).
        assert!(c.build()["linux"].get("seccomp").is_none());
        // RuntimeDefault (the proto's zero value).
        c.sc().seccomp = Some(cri::SecurityProfile::default());
        let s = c.build()["linux"]["seccomp"].clone();
        assert_eq!(s["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(s["defaultErrnoRet"], 1);
        let allowed: Vec<String> = strings(&s["syscalls"][0]["names"]);
        for call in ["read", "write", "execve", "futex", "openat"] {
            assert!(allowed.contains(&call.to_owned()), "{call}");
        }
        for call in [
            "mount",
            "reboot",
            "kexec_load",
            "ptrace",
            "unshare",
            "setns",
        ] {
            let anywhere = s["syscalls"].as_array().unwrap().iter().any(|r| {
                r["action"] == "SCMP_ACT_ALLOW" && strings(&r["names"]).contains(&call.to_owned())
            });
            assert!(
                !anywhere,
                "{call} must not be allowed without its capability"
            );
        }
        // Without CAP_SYS_ADMIN: clone only without namespace flags, clone3 ENOSYS.
        let clone = s["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"] == json!(["clone"]))
            .unwrap();
        assert_eq!(clone["args"][0]["value"], seccomp::CLONE_NAMESPACE_FLAGS);
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        let clone3 = s["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"] == json!(["clone3"]))
            .unwrap();
        assert_eq!(clone3["errnoRet"], 38);
        // CAP_SYS_ADMIN unlocks its calls and plain clone.
        c.sc().capabilities = Some(cri::Capability {
            add_capabilities: vec!["SYS_ADMIN".into()],
            ..Default::default()
        });
        let s = c.build()["linux"]["seccomp"].clone();
        assert!(
            s["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| strings(&r["names"]).contains(&"mount".to_owned()))
        );
        assert!(
            !s["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["names"] == json!(["clone3"]))
        );

        // The deprecated strings.
        let mut c = Case::new();
        c.sc().seccomp_profile_path = "runtime/default".into();
        assert!(c.build()["linux"].get("seccomp").is_some());
        c.sc().seccomp_profile_path = "docker/default".into();
        assert!(c.build()["linux"].get("seccomp").is_some());
        c.sc().seccomp_profile_path = "unconfined".into();
        assert!(c.build()["linux"].get("seccomp").is_none());
        c.sc().seccomp_profile_path = "strict".into();
        assert!(
            c.error()
                .starts_with("config.linux.security_context.seccomp_profile_path:")
        );
        // Unconfined structured.
        c.sc().seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        });
        assert!(c.build()["linux"].get("seccomp").is_none());
    }

    // containerd's WithNoNewPrivileges: `noNewPrivileges` is written only when it is true.
    #[test]
    fn issue19_no_new_privileges_is_left_out_unless_set() {
        let mut c = Case::new();
        c.sc().seccomp = Some(cri::SecurityProfile::default());
        assert!(
            c.build()["process"].get("noNewPrivileges").is_none(),
            "containerd leaves out false"
        );
        c.sc().no_new_privs = true;
        assert_eq!(c.build()["process"]["noNewPrivileges"], true);
    }

    // seccomp.WithProfile: a Localhost profile is the file's OCI seccomp JSON.
    #[test]
    fn localhost_seccomp_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let profile = json!({
            "defaultAction": "SCMP_ACT_LOG",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        std::fs::write(dir.path().join("audit.json"), profile.to_string()).unwrap();
        std::fs::write(dir.path().join("bad.json"), "{\"defaultAction\": 3}").unwrap();
        std::fs::write(
            dir.path().join("big.json"),
            vec![b' '; MAX_SECCOMP_PROFILE_BYTES as usize + 1],
        )
        .unwrap();
        let mut c = Case::new();
        c.seccomp_root = dir.path().to_owned();
        let localhost = |r: &str| {
            Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: r.into(),
            })
        };
        // Relative to the profile root, absolute as is, "localhost/" prefix tolerated.
        c.sc().seccomp = localhost("audit.json");
        assert_eq!(c.build()["linux"]["seccomp"], profile);
        let abs = dir.path().join("audit.json").display().to_string();
        c.sc().seccomp = localhost(&format!("localhost/{abs}"));
        assert_eq!(c.build()["linux"]["seccomp"], profile);
        c.sc().seccomp = None;
        c.sc().seccomp_profile_path = format!("localhost/{abs}");
        assert_eq!(c.build()["linux"]["seccomp"], profile);

        c.sc().seccomp = localhost("missing.json");
        let missing = dir.path().join("missing.json");
        assert!(
            c.error()
                .starts_with(&format!("seccomp profile {}: ", missing.display())),
            "{}",
            c.error()
        );
        c.sc().seccomp = localhost("bad.json");
        assert!(c.error().contains("bad.json: not an OCI seccomp profile: "));
        c.sc().seccomp = localhost("big.json");
        assert!(c.error().contains("big.json: larger than 1048576 bytes"));
        c.sc().seccomp = localhost("");
        assert_eq!(
            c.error(),
            "config.linux.security_context.seccomp.localhost_ref: empty"
        );
    }

    // AppArmor: localhost/NAME is the process's profile; runtime/default and unconfined none.
    #[test]
    fn apparmor_profiles() {
        let mut c = Case::new();
        assert!(c.build()["process"].get("apparmorProfile").is_none());
        c.sc().apparmor = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "localhost/k8s-nginx".into(),
        });
        assert_eq!(c.build()["process"]["apparmorProfile"], "k8s-nginx");
        c.sc().apparmor = None;
        c.sc().apparmor_profile = "localhost/k8s-web".into();
        assert_eq!(c.build()["process"]["apparmorProfile"], "k8s-web");
        c.sc().apparmor_profile = "runtime/default".into();
        assert!(c.build()["process"].get("apparmorProfile").is_none());
        c.sc().apparmor_profile = "bogus".into();
        assert!(
            c.error()
                .starts_with("config.linux.security_context.apparmor_profile: \"bogus\" is not"),
            "{}",
            c.error()
        );
    }

    // containerd's WithResources and WithOOMScoreAdj (restrict_oom_score_adj).
    #[test]
    fn resources_and_oom_score() {
        let mut c = Case::new();
        let spec = c.build();
        assert!(spec["process"].get("oomScoreAdj").is_none());
        assert!(spec["linux"]["resources"].get("memory").is_none());
        c.config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 128 << 20,
            oom_score_adj: -1000,
            cpuset_cpus: "0-1".into(),
            cpuset_mems: "0".into(),
            hugepage_limits: vec![cri::HugepageLimit {
                page_size: "2MB".into(),
                limit: 0,
            }],
            unified: [("memory.high".to_owned(), "100M".to_owned())].into(),
            memory_swap_limit_in_bytes: 0,
        });
        let spec = c.build();
        let r = &spec["linux"]["resources"];
        assert_eq!(
            r["cpu"],
            json!({"period": 100_000, "quota": 50_000, "shares": 512, "cpus": "0-1", "mems": "0"})
        );
        // Swap limited to the memory limit: no swapping by default.
        assert_eq!(r["memory"], json!({"limit": 128 << 20, "swap": 128 << 20}));
        assert_eq!(
            r["hugepageLimits"],
            json!([{"pageSize": "2MB", "limit": 0}])
        );
        assert_eq!(r["unified"], json!({"memory.high": "100M"}));
        // -1000 asked, the daemon runs at -999: -999.
        assert_eq!(spec["process"]["oomScoreAdj"], -999);

        let res = |c: &mut Case| {
            c.config
                .linux
                .as_mut()
                .unwrap()
                .resources
                .as_mut()
                .unwrap()
                .clone()
        };
        let mut r = res(&mut c);
        r.oom_score_adj = 1000;
        r.memory_swap_limit_in_bytes = -1;
        c.config.linux.as_mut().unwrap().resources = Some(r.clone());
        let spec = c.build();
        assert_eq!(spec["process"]["oomScoreAdj"], 1000);
        assert_eq!(spec["linux"]["resources"]["memory"]["swap"], -1);
        c.host.swap_controller = false;
        assert!(
            c.build()["linux"]["resources"]["memory"]
                .get("swap")
                .is_none()
        );

        r.oom_score_adj = 1001;
        c.config.linux.as_mut().unwrap().resources = Some(r.clone());
        assert_eq!(
            c.error(),
            "config.linux.resources.oom_score_adj: 1001 is outside -1000..=1000"
        );
        r.oom_score_adj = 0;
        r.cpuset_cpus = "all".into();
        c.config.linux.as_mut().unwrap().resources = Some(r.clone());
        assert!(c.error().starts_with("config.linux.resources.cpuset_cpus:"));
        r.cpuset_cpus.clear();
        r.memory_limit_in_bytes = -5;
        c.config.linux.as_mut().unwrap().resources = Some(r);
        assert_eq!(
            c.error(),
            "config.linux.resources.memory_limit_in_bytes: -5 is negative"
        );
    }

    // containerd's getCgroupsPath (cgroupfs) and its namespaced default.
    /// A `vm` pod's sandbox task: no process, the pod's cgroup and limits (the VM's size).
    #[test]
    fn pod_vm_spec_has_no_process_and_carries_the_pods_limits() {
        let c = Case::new();
        let mut pod = c.sandbox.clone();
        pod.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            cpu_quota: 150_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        });
        let spec = pod_vm_spec("p1", &pod, Some(Path::new("/run/netns/p1")), &c.host).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        assert!(v.get("process").is_none() || v["process"].is_null(), "{v}");
        assert_eq!(
            v["annotations"]["io.kubernetes.cri.container-type"],
            "sandbox"
        );
        assert_eq!(v["annotations"]["io.kubernetes.cri.sandbox-id"], "p1");
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 150_000);
        assert_eq!(
            v["annotations"]["io.kubernetes.cri.sandbox-cpu-quota"],
            "150000"
        );
        assert_eq!(
            v["annotations"]["io.kubernetes.cri.sandbox-memory"],
            "134217728"
        );
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 128 << 20);
        assert_eq!(
            v["linux"]["cgroupsPath"],
            "/kubepods/besteffort/poduid-1/p1"
        );
        assert_eq!(v["linux"]["namespaces"][0]["path"], "/run/netns/p1");
        pod.linux
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .memory_limit_in_bytes = -5;
        let e = pod_vm_spec("p1", &pod, None, &c.host)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sandbox_config.linux.resources.memory_limit_in_bytes"),
            "{e}"
        );
    }

    #[test]
    fn cgroups_path_under_the_pods_parent() {
        let mut c = Case::new();
        assert_eq!(
            c.build()["linux"]["cgroupsPath"],
            "/kubepods/besteffort/poduid-1/c1"
        );
        c.sandbox.linux.as_mut().unwrap().cgroup_parent.clear();
        assert_eq!(c.build()["linux"]["cgroupsPath"], "/k8s.io/c1");
        c.sandbox.linux.as_mut().unwrap().cgroup_parent = "kubepods-besteffort.slice".into();
        assert!(c.error().contains("systemd cgroup parent"));
    }

    // kubelet's namespaced sysctls, refused where the namespace is the host's (runc too).
    #[test]
    fn sysctls_only_namespaced_and_not_on_host_namespaces() {
        let mut c = Case::new();
        let set = |c: &mut Case, k: &str| {
            c.sandbox.linux.as_mut().unwrap().sysctls = [(k.to_owned(), "1".to_owned())].into();
        };
        set(&mut c, "net.ipv4.ip_unprivileged_port_start");
        assert_eq!(
            c.build()["linux"]["sysctl"],
            json!({"net.ipv4.ip_unprivileged_port_start": "1"})
        );
        set(&mut c, "kernel.shm_rmid_forced");
        assert!(
            c.build()["linux"]["sysctl"]
                .get("kernel.shm_rmid_forced")
                .is_some()
        );
        set(&mut c, "fs/mqueue/msg_max");
        assert!(
            c.build()["linux"]["sysctl"]
                .get("fs/mqueue/msg_max")
                .is_some()
        );
        set(&mut c, "vm.swappiness");
        assert!(
            c.error()
                .ends_with("\"vm.swappiness\"]: not a namespaced sysctl"),
            "{}",
            c.error()
        );

        c.namespaces.network = None;
        set(&mut c, "net.core.somaxconn");
        assert!(c.error().ends_with("not allowed with the host's network"));
        c.ns().ipc = cri::NamespaceMode::Node as i32;
        set(&mut c, "kernel.msgmax");
        assert!(
            c.error()
                .ends_with("not allowed with the host's IPC namespace")
        );
    }

    // containerd's DefaultCRIAnnotations for a container, over the request's annotations.
    #[test]
    fn annotations_are_containerds_over_the_requests() {
        let mut c = Case::new();
        c.config.annotations = [
            ("team".to_owned(), "web".to_owned()),
            (annotations::SANDBOX_ID.to_owned(), "spoofed".to_owned()),
        ]
        .into();
        let a = c.build()["annotations"].clone();
        assert_eq!(
            a,
            json!({
                "team": "web",
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "p1",
                "io.kubernetes.cri.sandbox-name": "web",
                "io.kubernetes.cri.sandbox-namespace": "default",
                "io.kubernetes.cri.sandbox-uid": "uid-1",
                "io.kubernetes.cri.container-name": "app",
                "io.kubernetes.cri.image-name": "registry.test/library/busybox:1.36",
            })
        );
        c.config.image = Some(cri::ImageSpec {
            user_specified_image: "busybox".into(),
            ..Default::default()
        });
        assert_eq!(c.build()["annotations"][annotations::IMAGE_NAME], "busybox");
    }

    // What containerd takes and a runtime would choke on is refused here, naming the field.
    #[test]
    fn hostile_values_are_refused_naming_the_field() {
        let mut c = Case::new();
        c.config.args = vec!["ok".into(), "a\0b".into()];
        assert_eq!(c.error(), "config.command/args[2]: contains a NUL byte");
        let mut c = Case::new();
        c.config.envs = vec![cri::KeyValue {
            key: "K".into(),
            value: vec![0xff, 0xfe],
        }];
        assert_eq!(c.error(), "config.envs[0].value: not UTF-8");
        let mut c = Case::new();
        c.config.metadata = None;
        assert_eq!(c.error(), "config.metadata.name: empty");
        let mut c = Case::new();
        c.config.cdi_devices = vec![cri::CdiDevice {
            name: "example/gpu=0".into(),
        }];
        assert_eq!(
            c.error(),
            "config.CDI_devices: CDI is not supported by switchyardd"
        );
        let mut c = Case::new();
        c.sc().capabilities = Some(cri::Capability {
            add_ambient_capabilities: vec!["NET_BIND_SERVICE".into()],
            ..Default::default()
        });
        assert!(c.error().contains("ambient capabilities is not supported"));
        let mut c = Case::new();
        c.ns().ipc = 7;
        assert_eq!(
            c.error(),
            "config.linux.security_context.namespace_options.ipc: 7 is not a namespace mode"
        );
        let mut c = Case::new();
        c.config.devices = vec![cri::Device {
            container_path: "dev/fuse".into(),
            host_path: "/dev/fuse".into(),
            permissions: "rw".into(),
        }];
        assert_eq!(
            c.error(),
            "config.devices[0].container_path: \"dev/fuse\" must be absolute"
        );
    }

    // The request's errors are InvalidArgument at the gRPC edge; only a bug is Internal.
    #[test]
    fn errors_classify_as_invalid_argument() {
        use crate::error::{Classify as _, Kind};
        let mut c = Case::new();
        c.config.working_dir = "x".into();
        let e = c.try_build().unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument);
        let bug = SpecError::Assemble(serde_json::from_str::<Value>("{").unwrap_err());
        assert_eq!(bug.kind(), Kind::Internal);
    }

    #[test]
    fn host_facts_read_this_host() {
        let facts = HostFacts::read();
        assert!((-1000..=1000).contains(&facts.oom_score_adj));
        assert!(!facts.hostname.is_empty());
    }

    #[test]
    fn etc_accounts_parse_like_libcontainer_user() {
        let a = accounts();
        assert_eq!(
            a.user_by_name("app"),
            Some(Account {
                name: "app".into(),
                uid: 1000,
                gid: 1000
            })
        );
        assert_eq!(a.user_by_uid(1).unwrap().name, "daemon");
        assert_eq!(a.group_by_name("video"), Some(44));
        assert_eq!(a.groups_of("app"), [29, 44]);
        assert!(a.user_by_name("broken line").is_none());
        let none = EtcAccounts::default();
        assert!(none.user_by_uid(0).is_none());
    }

    /// What kubelet sends for a busybox container with a command, env, a hostPath volume, a
    /// terminal, `capabilities.drop: [NET_RAW]`, RuntimeDefault seccomp and limits: the spec
    /// parses back as an OCI spec and has what libcontainer requires filled in.
    #[test]
    fn a_kubelet_request_makes_a_spec_libcontainer_accepts() {
        let mut c = Case::new();
        c.image = RunConfig {
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..RunConfig::default()
        };
        c.config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "box".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "sha256:abc".into(),
                user_specified_image: "busybox:1.36".into(),
                ..Default::default()
            }),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo hi; sleep 3600".into()],
            envs: vec![cri::KeyValue {
                key: "GREETING".into(),
                value: "hi".into(),
            }],
            mounts: vec![
                cri::Mount {
                    container_path: "/data".into(),
                    host_path: "/var/lib/data".into(),
                    ..Default::default()
                },
                cri::Mount {
                    container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                    host_path: "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/kube-api-access".into(),
                    readonly: true,
                    ..Default::default()
                },
                cri::Mount {
                    container_path: "/dev/termination-log".into(),
                    host_path: "/var/lib/kubelet/pods/uid-1/containers/box/0".into(),
                    ..Default::default()
                },
            ],
            labels: [("io.kubernetes.container.name".to_owned(), "box".to_owned())].into(),
            annotations: [("io.kubernetes.container.restartCount".to_owned(), "0".to_owned())].into(),
            log_path: "box/0.log".into(),
            tty: true,
            stdin: true,
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 20_000,
                    cpu_shares: 204,
                    memory_limit_in_bytes: 64 << 20,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        drop_capabilities: vec!["NET_RAW".into()],
                        ..Default::default()
                    }),
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    run_as_user: Some(cri::Int64Value { value: 1000 }),
                    masked_paths: DEFAULT_MASKED_PATHS.iter().map(|p| (*p).to_owned()).collect(),
                    readonly_paths: DEFAULT_READONLY_PATHS.iter().map(|p| (*p).to_owned()).collect(),
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    apparmor: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let mut spec = c.build();
        let text = serde_json::to_string_pretty(&spec).unwrap();
        let parsed: oci_spec::runtime::Spec = serde_json::from_str(&text).unwrap();

        let process = parsed.process().as_ref().unwrap();
        assert_eq!(
            process.args().as_ref().unwrap(),
            &["sh", "-c", "echo hi; sleep 3600"]
        );
        assert!(process.cwd().is_absolute());
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(process.user().uid(), 1000);
        assert_eq!(process.oom_score_adj(), Some(1000));
        let env = process.env().as_ref().unwrap();
        assert!(env.contains(&"GREETING=hi".to_owned()));
        assert!(env.contains(&"HOSTNAME=web-pod".to_owned()));
        let caps = process.capabilities().as_ref().unwrap();
        let bounding = caps.bounding().as_ref().unwrap();
        assert!(!bounding.contains(&oci_spec::runtime::Capability::NetRaw));
        assert!(bounding.contains(&oci_spec::runtime::Capability::Chown));
        assert_eq!(parsed.root().as_ref().unwrap().path(), Path::new("rootfs"));
        assert_eq!(parsed.hostname().as_deref(), Some("web-pod"));
        for m in parsed.mounts().as_ref().unwrap() {
            assert!(m.destination().is_absolute(), "{m:?}");
            assert!(m.typ().as_ref().is_some_and(|t| !t.is_empty()), "{m:?}");
            assert!(
                m.source()
                    .as_ref()
                    .is_some_and(|s| !s.as_os_str().is_empty()),
                "{m:?}"
            );
        }
        let linux = parsed.linux().as_ref().unwrap();
        let seccomp = linux.seccomp().as_ref().unwrap();
        assert_eq!(
            seccomp.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert!(
            !seccomp.architectures().as_ref().unwrap().is_empty() || !cfg!(target_arch = "x86_64")
        );
        for rule in seccomp.syscalls().as_ref().unwrap() {
            assert!(!rule.names().is_empty());
        }
        let resources = linux.resources().as_ref().unwrap();
        assert_eq!(resources.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(resources.cpu().as_ref().unwrap().quota(), Some(20_000));
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kubepods/besteffort/poduid-1/c1"))
        );
        for ns in linux.namespaces().as_ref().unwrap() {
            if let Some(path) = ns.path() {
                assert!(path.is_absolute());
            }
        }
        assert_eq!(
            parsed.annotations().as_ref().unwrap()[annotations::IMAGE_NAME],
            "busybox:1.36"
        );
        // The JSON a shim writes to config.json round-trips unchanged.
        let mut again = serde_json::to_value(&parsed).unwrap();
        sort_capabilities(&mut again);
        sort_capabilities(&mut spec);
        assert_eq!(again, spec);
    }
}
