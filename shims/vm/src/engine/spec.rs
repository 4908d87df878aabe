//! What the vm runtime checks in a container's spec before anything starts: settings it cannot
//! honour are refused here, naming the field, rather than failing (or silently not applying)
//! inside the guest.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Process, Spec};
use yard_shim_kit::start::GROUP_ANNOTATIONS;
use yard_shim_kit::{Error, Result};

use crate::config::Options;

/// Where the source of a bind mount comes from in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindSource {
    /// `/dev/shm`: the pod's shm, a tmpfs in the guest (CRI binds the host's sandbox shm).
    PodShm,
    /// A host file or directory, shared into the guest through the volume share.
    Host { path: PathBuf, readonly: bool },
}

/// One bind mount of the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Index in the spec's `mounts`.
    pub index: usize,
    pub destination: PathBuf,
    pub source: BindSource,
}

impl Bind {
    /// The agent's volume for this mount: the pod's shm, or (for a host path) only the index,
    /// its guest source to be filled in.
    pub fn volume(&self) -> yard_agent_protocol::Volume {
        yard_agent_protocol::Volume {
            mount: self.index as u32,
            pod_shm: self.source == BindSource::PodShm,
            ..Default::default()
        }
    }

    /// `mounts[2] (/srv/data into /data)`, for errors.
    pub fn describe(&self) -> String {
        match &self.source {
            BindSource::PodShm => {
                format!("mounts[{}] ({})", self.index, self.destination.display())
            }
            BindSource::Host { path, .. } => format!(
                "mounts[{}] (host path {} into {})",
                self.index,
                path.display(),
                self.destination.display()
            ),
        }
    }
}

/// Propagation options a bind mount into a VM cannot honour: nothing mounted in the guest ever
/// appears on the host.
const SHARED_PROPAGATION: &[&str] = &["shared", "rshared"];

/// The spec's bind mounts and where the guest gets each; mounts the guest cannot honour are
/// refused, naming them.
pub fn binds(spec: &Spec) -> Result<Vec<Bind>> {
    let mut out = Vec::new();
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let options = m.options().clone().unwrap_or_default();
        if !switchyard_base::mount::is_bind(m.typ().as_deref(), &options) {
            continue;
        }
        let source = m.source().clone().unwrap_or_default();
        if let Some(p) = options
            .iter()
            .find(|o| SHARED_PROPAGATION.contains(&o.as_str()))
        {
            return Err(Error::InvalidArgument(format!(
                "config.json: mounts[{i}]: bind mount of host path {} into {}: {p} \
                 propagation cannot be honoured: mounts made inside the VM never reach the host",
                source.display(),
                m.destination().display()
            )));
        }
        let source = if m.destination() == Path::new("/dev/shm") {
            BindSource::PodShm
        } else if source.is_absolute() {
            BindSource::Host {
                path: source,
                readonly: options.iter().any(|o| o == "ro"),
            }
        } else {
            return Err(Error::InvalidArgument(format!(
                "config.json: mounts[{i}]: bind mount source {:?} is not an absolute path",
                source
            )));
        };
        out.push(Bind {
            index: i,
            destination: m.destination().clone(),
            source,
        });
    }
    Ok(out)
}

/// A namespace the host holds for the pod (containerd's `/var/run/netns/cni-...`, switchyardd's
/// network, IPC and UTS namespaces under its state dir) cannot be joined in the guest. The pod's
/// network namespace becomes the guest's own network: the entry is dropped, so every container
/// of the pod shares it (its loopback, where port forwarding reaches them through the agent), as
/// the containers of a pod share its netns on the host; the VM is the pod's network boundary.
/// Another host-held namespace becomes one of the container's own in the guest. A path under
/// `/proc` names a guest process's namespace (pids are the guest's, so CRI's
/// `/proc/<sandbox pid>/ns/net` is the pod's) and is kept.
pub fn guest_namespaces(spec: &mut Spec) {
    let Some(linux) = spec.linux_mut() else {
        return;
    };
    let Some(namespaces) = linux.namespaces_mut() else {
        return;
    };
    let host_path =
        |ns: &LinuxNamespace| ns.path().as_ref().is_some_and(|p| !p.starts_with("/proc"));
    namespaces.retain(|ns| {
        let pod_network = ns.typ() == LinuxNamespaceType::Network && host_path(ns);
        if pod_network {
            tracing::debug!(path = ?ns.path(), "the pod's network namespace: the guest's own network");
        }
        !pod_network
    });
    for ns in namespaces.iter_mut() {
        if host_path(ns) {
            tracing::debug!(kind = ?ns.typ(), path = ?ns.path(), "a host namespace: the guest makes its own");
            ns.set_path(None);
        }
    }
}

/// Security settings of a process that the guest cannot enforce: it has no LSM.
fn unenforceable_process(p: &Process, prefix: &str, found: &mut Vec<String>) {
    if p.apparmor_profile()
        .as_deref()
        .is_some_and(|s| !s.is_empty())
    {
        found.push(format!("{prefix}apparmorProfile"));
    }
    if p.selinux_label().as_deref().is_some_and(|s| !s.is_empty()) {
        found.push(format!("{prefix}selinuxLabel"));
    }
}

/// The spec's security settings the guest cannot enforce: `linux.seccomp` (the agent is a
/// static binary without libseccomp, and the guest kernel has no seccomp), AppArmor and SELinux
/// labels (no LSM in the guest). The agent drops them; the VM stays the boundary.
pub fn unenforceable(spec: &Spec) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(p) = spec.process() {
        unenforceable_process(p, "process.", &mut found);
    }
    if let Some(linux) = spec.linux() {
        if linux.seccomp().is_some() {
            found.push("linux.seccomp".into());
        }
        if linux
            .mount_label()
            .as_deref()
            .is_some_and(|s| !s.is_empty())
        {
            found.push("linux.mountLabel".into());
        }
    }
    found
}

/// The same for an exec's `process` object.
pub fn unenforceable_exec(p: &Process) -> Vec<String> {
    let mut found = Vec::new();
    unenforceable_process(p, "", &mut found);
    found
}

/// The option that lets a spec with unenforceable settings run anyway.
pub const ALLOW_UNENFORCED: &str = "allow_unenforced_security";

/// Refuses `found` (from [`unenforceable`]) unless the options allow it, which is logged.
pub fn check_enforceable(found: &[String], options: &Options, what: &str, id: &str) -> Result<()> {
    if found.is_empty() {
        return Ok(());
    }
    let list = found.join(", ");
    if options.allow_unenforced_security {
        tracing::warn!(
            container_id = id,
            settings = %list,
            "{what}: not enforced inside the guest ({ALLOW_UNENFORCED} = true); the VM is the \
             boundary"
        );
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{what}: {list}: the vm runtime cannot enforce this inside the guest (no seccomp or LSM \
         there); set {ALLOW_UNENFORCED} = true in the runtime's options to run it with the VM \
         as the only boundary"
    )))
}

/// The container belongs to a group or pod whose other containers join its VM later: only
/// then does a backend that shares files boot the VM with the share.
pub fn grouped(spec: &Spec, options: &Options) -> bool {
    let annotated = spec.annotations().as_ref().is_some_and(|a| {
        GROUP_ANNOTATIONS
            .iter()
            .any(|k| a.get(*k).is_some_and(|v| !v.is_empty()))
    });
    annotated || !options.group.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    const PROCESS: &str =
        r#""process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#;

    #[test]
    fn unenforceable_settings_are_named_and_refused_unless_allowed() {
        assert!(
            unenforceable(&spec(&format!("{{\"ociVersion\":\"1.0.2\",{PROCESS}}}"))).is_empty()
        );
        let s = spec(
            r#"{"ociVersion": "1.0.2",
                "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                            "apparmorProfile": "docker-default",
                            "selinuxLabel": ""},
                "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}"#,
        );
        let found = unenforceable(&s);
        assert_eq!(found, ["process.apparmorProfile", "linux.seccomp"]);
        let mut options = Options::default();
        let e = check_enforceable(&found, &options, "config.json", "c1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("config.json: process.apparmorProfile, linux.seccomp: ")
                && e.contains("allow_unenforced_security = true"),
            "{e}"
        );
        options.allow_unenforced_security = true;
        assert!(check_enforceable(&found, &options, "config.json", "c1").is_ok());
    }

    #[test]
    fn binds_are_planned_and_shared_propagation_is_refused() {
        let s = spec(&format!(
            r#"{{"ociVersion":"1.0.2",{PROCESS},"mounts":[
                {{"destination":"/proc","type":"proc","source":"proc"}},
                {{"destination":"/dev/shm","type":"bind","source":"/run/c/shm","options":["rbind","ro"]}},
                {{"destination":"/etc/hosts","type":"bind","source":"/var/c/hosts","options":["rbind","rprivate","ro"]}},
                {{"destination":"/data","source":"/srv","options":["rbind","rslave","rw"]}}]}}"#
        ));
        let b = binds(&s).unwrap();
        assert_eq!(
            b.iter()
                .map(|b| (b.index, b.source.clone()))
                .collect::<Vec<_>>(),
            [
                (1, BindSource::PodShm),
                (
                    2,
                    BindSource::Host {
                        path: "/var/c/hosts".into(),
                        readonly: true
                    }
                ),
                (
                    3,
                    BindSource::Host {
                        path: "/srv".into(),
                        readonly: false
                    }
                ),
            ]
        );
        let s = spec(&format!(
            r#"{{"ociVersion":"1.0.2",{PROCESS},"mounts":[
                {{"destination":"/mnt","type":"bind","source":"/srv/bidi","options":["rbind","rshared","rw"]}}]}}"#
        ));
        let e = binds(&s).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.starts_with("config.json: mounts[0]: bind mount of host path /srv/bidi into /mnt: rshared propagation"),
            "{e}"
        );
    }

    #[test]
    fn the_pods_network_namespace_is_the_guests_network() {
        let mut s = spec(&format!(
            r#"{{"ociVersion":"1.0.2",{PROCESS},"linux":{{"namespaces":[
                {{"type":"network","path":"/var/run/netns/cni-1"}},
                {{"type":"ipc","path":"/proc/42/ns/ipc"}},
                {{"type":"uts","path":"/run/switchyard/utsns/p1"}},
                {{"type":"mount"}}]}}}}"#
        ));
        guest_namespaces(&mut s);
        let ns = s.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        // The pod's network is the guest's own: no network namespace is made.
        assert_eq!(ns.len(), 3, "{ns:?}");
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        assert_eq!(ns[0].path().as_deref(), Some(Path::new("/proc/42/ns/ipc")));
        assert_eq!(ns[1].path(), &None, "a host-held UTS namespace");
        assert_eq!(ns[2].path(), &None);
        // A network namespace without a path (a task outside a pod) stays the container's own.
        let mut s = spec(&format!(
            r#"{{"ociVersion":"1.0.2",{PROCESS},"linux":{{"namespaces":[{{"type":"network"}}]}}}}"#
        ));
        guest_namespaces(&mut s);
        let ns = s.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0].typ(), LinuxNamespaceType::Network);
        let mut s = spec(&format!(
            r#"{{"ociVersion":"1.0.2",{PROCESS},"linux":{{"namespaces":[
                {{"type":"network","path":"/proc/42/ns/net"}}]}}}}"#
        ));
        guest_namespaces(&mut s);
        let ns = s.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        assert_eq!(ns[0].path().as_deref(), Some(Path::new("/proc/42/ns/net")));
    }

    #[test]
    fn groups_come_from_annotations_or_the_option() {
        let plain = spec(&format!("{{\"ociVersion\":\"1.0.2\",{PROCESS}}}"));
        let mut options = Options::default();
        assert!(!grouped(&plain, &options));
        for key in GROUP_ANNOTATIONS {
            let s = spec(&format!(
                "{{\"ociVersion\":\"1.0.2\",{PROCESS},\"annotations\":{{\"{key}\":\"p\"}}}}"
            ));
            assert!(grouped(&s, &options), "{key}");
        }
        let empty = spec(&format!(
            "{{\"ociVersion\":\"1.0.2\",{PROCESS},\"annotations\":{{\"io.switchyard.group\":\"\"}}}}"
        ));
        assert!(!grouped(&empty, &options));
        options.group = "edge".into();
        assert!(grouped(&plain, &options));
    }
}
