//! The OCI spec as the host sends it, parsed once (a bad field is named in the error), and
//! rewritten for the guest: the rootfs is the agent's overlay, and what cannot exist in the guest
//! is left out (seccomp: no libseccomp in a static agent and no CONFIG_SECCOMP; AppArmor and
//! SELinux labels: no LSM; hooks: they name host binaries).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, RootBuilder, Spec};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Parses JSON, naming the field that is wrong: `spec: process.args: invalid type ...`.
fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            Error::InvalidArgument(format!("{what}: {}", e.inner()))
        } else {
            Error::InvalidArgument(format!("{what}: {path}: {}", e.inner()))
        }
    })
}

pub fn parse(bytes: &[u8]) -> Result<Spec> {
    let spec: Spec = parse_json(bytes, "spec")?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("spec: process: missing".into()))?;
    check_process(process, "spec: process")?;
    Ok(spec)
}

/// An exec's `process` object.
pub fn parse_process(bytes: &[u8]) -> Result<Process> {
    let mut p: Process = parse_json(bytes, "process")?;
    check_process(&p, "process")?;
    strip_process(&mut p);
    Ok(p)
}

fn check_process(p: &Process, what: &str) -> Result<()> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "{what}.args: must not be empty"
        )));
    }
    if !p.cwd().is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{what}.cwd: {:?} is not an absolute path",
            p.cwd()
        )));
    }
    Ok(())
}

fn strip_process(p: &mut Process) {
    if p.apparmor_profile().is_some() {
        tracing::debug!("no AppArmor in the guest: process.apparmorProfile dropped");
        p.set_apparmor_profile(None);
    }
    if p.selinux_label().is_some() {
        tracing::debug!("no SELinux in the guest: process.selinuxLabel dropped");
        p.set_selinux_label(None);
    }
}

/// The container's cgroup when the spec names none, or names a systemd slice (no systemd here).
pub fn default_cgroup(id: &str) -> PathBuf {
    PathBuf::from(format!("/yard/{id}"))
}

/// The spec the runtime gets, and facts the agent keeps.
#[derive(Debug)]
pub struct Guest {
    pub spec: Spec,
    pub terminal: bool,
    pub cgroups_path: PathBuf,
    /// `net.*` sysctls of a container that shares the guest's own network (a pod's container:
    /// no network namespace in its spec), taken out of the spec, which the runtime would refuse
    /// ("not allowed in host network namespace"); the guest's network is the pod's, so they are
    /// its settings and the agent applies them ([`apply_net_sysctls`]).
    pub net_sysctls: Vec<(String, String)>,
}

/// The longest sysctl value taken.
const MAX_SYSCTL_VALUE: usize = 4096;

/// A sysctl name as the kernel has them under `/proc/sys`: dot-separated words of letters,
/// digits, `_` and `-`.
fn sysctl_path(key: &str) -> Option<PathBuf> {
    let words: Vec<&str> = key.split('.').collect();
    let good = words.len() > 1
        && words.iter().all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    good.then(|| Path::new("/proc/sys").join(words.join("/")))
}

/// Moves the `net.*` sysctls out of a spec that has no network namespace.
fn take_net_sysctls(linux: &mut oci_spec::runtime::Linux) -> Result<Vec<(String, String)>> {
    let own_network = linux.namespaces().as_ref().is_some_and(|ns| {
        ns.iter()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
    });
    let Some(sysctl) = linux.sysctl_mut().as_mut().filter(|_| !own_network) else {
        return Ok(Vec::new());
    };
    let mut keys: Vec<String> = sysctl
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let value = sysctl.remove(&key).unwrap_or_default();
        if sysctl_path(&key).is_none() {
            return Err(Error::InvalidArgument(format!(
                "linux.sysctl: {key:?} is not a sysctl name"
            )));
        }
        if value.len() > MAX_SYSCTL_VALUE || value.contains('\n') {
            return Err(Error::InvalidArgument(format!(
                "linux.sysctl.{key}: a value of one line, at most {MAX_SYSCTL_VALUE} bytes"
            )));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Writes `sysctls` ([`Guest::net_sysctls`]) in the agent's, which is the guest's, network.
pub fn apply_net_sysctls(sysctls: &[(String, String)]) -> Result<()> {
    for (key, value) in sysctls {
        let path = sysctl_path(key).ok_or_else(|| {
            Error::InvalidArgument(format!("linux.sysctl: {key:?} is not a sysctl name"))
        })?;
        std::fs::write(&path, value.as_bytes()).map_err(Error::io(format!(
            "linux.sysctl.{key}: write {}",
            path.display()
        )))?;
    }
    Ok(())
}

/// Rewrites `spec` for the guest; `rootfs` is the overlay; `cpu_bandwidth` says whether the
/// kernel has cpu.max (a quota is dropped with a warning otherwise: failing every container that
/// has a CPU limit would be worse).
pub fn for_guest(mut spec: Spec, id: &str, rootfs: &Path, cpu_bandwidth: bool) -> Result<Guest> {
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let root = RootBuilder::default()
        .path(rootfs)
        .readonly(readonly)
        .build()
        .map_err(|e| Error::Internal(format!("root: {e}")))?;
    spec.set_root(Some(root));
    if spec.hooks().is_some() {
        tracing::debug!(container_id = id, "hooks dropped: they name host binaries");
        spec.set_hooks(None);
    }
    let mut terminal = false;
    if let Some(p) = spec.process_mut() {
        strip_process(p);
        terminal = p.terminal().unwrap_or(false);
    }
    let mut cgroups_path = default_cgroup(id);
    let net_sysctls;
    if let Some(linux) = spec.linux_mut() {
        if linux.seccomp().is_some() {
            tracing::debug!(
                container_id = id,
                "no seccomp in the guest: linux.seccomp dropped"
            );
            linux.set_seccomp(None);
        }
        if linux.mount_label().is_some() {
            linux.set_mount_label(None);
        }
        net_sysctls = take_net_sysctls(linux)?;
        match linux.cgroups_path() {
            Some(p) if p.is_absolute() && !p.to_string_lossy().contains(':') => {
                // Below the root and nowhere else: `/` or `..` would let removal and
                // signals reach every process in the guest, the agent's helpers included.
                let confined = p.components().count() > 1
                    && p.components().all(|c| {
                        matches!(
                            c,
                            std::path::Component::RootDir | std::path::Component::Normal(_)
                        )
                    });
                if !confined {
                    return Err(Error::InvalidArgument(format!(
                        "linux.cgroupsPath: {} is not a cgroup below the root",
                        p.display()
                    )));
                }
                cgroups_path = p.clone();
            }
            _ => {
                linux.set_cgroups_path(Some(cgroups_path.clone()));
            }
        }
        if !cpu_bandwidth
            && let Some(cpu) = linux
                .resources_mut()
                .as_mut()
                .and_then(|r| r.cpu_mut().as_mut())
            && cpu.quota().is_some_and(|q| q > 0)
        {
            tracing::warn!(
                container_id = id,
                "the guest kernel has no CPU bandwidth control: linux.resources.cpu.quota ignored"
            );
            cpu.set_quota(None);
            cpu.set_period(None);
        }
    } else {
        return Err(Error::InvalidArgument("spec: linux: missing".into()));
    }
    Ok(Guest {
        spec,
        terminal,
        cgroups_path,
        net_sysctls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNC_LIKE: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["/bin/uname", "-r"],
                    "env": ["PATH=/bin"], "cwd": "/", "apparmorProfile": "docker-default"},
        "root": {"path": "rootfs", "readonly": true},
        "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}],
                  "cgroupsPath": "system.slice:yard:abc",
                  "resources": {"cpu": {"quota": 50000, "period": 100000}},
                  "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}
    }"#;

    #[test]
    fn net_sysctls_of_a_container_on_the_guests_network_are_the_agents_to_apply() {
        let with = |namespaces: &str, sysctl: &str| {
            parse(
                format!(
                    r#"{{"ociVersion":"1.0.2","process":{{"args":["/bin/sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                        "linux":{{"namespaces":[{namespaces}],"sysctl":{{{sysctl}}}}}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let sysctls = r#""net.ipv4.ping_group_range":"0 2147483647","kernel.shm_rmid_forced":"1""#;
        // No network namespace: the net.* one is taken out, the rest stays for the runtime.
        let g = for_guest(
            with(r#"{"type":"pid"}"#, sysctls),
            "c",
            Path::new("/r"),
            true,
        )
        .unwrap();
        assert_eq!(
            g.net_sysctls,
            vec![(
                "net.ipv4.ping_group_range".to_owned(),
                "0 2147483647".to_owned()
            )]
        );
        let kept = g.spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            vec!["kernel.shm_rmid_forced"]
        );
        // A network namespace of its own: the runtime sets them there.
        let g = for_guest(
            with(r#"{"type":"network"}"#, sysctls),
            "c",
            Path::new("/r"),
            true,
        )
        .unwrap();
        assert!(g.net_sysctls.is_empty());
        assert_eq!(
            g.spec
                .linux()
                .as_ref()
                .unwrap()
                .sysctl()
                .as_ref()
                .unwrap()
                .len(),
            2
        );
        // Names that are not sysctls never become paths.
        for bad in [
            r#""net.../x":"1""#,
            r#""net.ipv4/../../x":"1""#,
            r#""net.":"1""#,
        ] {
            let e = for_guest(with(r#"{"type":"pid"}"#, bad), "c", Path::new("/r"), true)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("linux.sysctl: "), "{e}");
        }
        let e = for_guest(
            with("", r#""net.core.somaxconn":"1\n2""#),
            "c",
            Path::new("/r"),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("linux.sysctl.net.core.somaxconn: "), "{e}");
        assert_eq!(
            sysctl_path("net.ipv4.conf.eth0.forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0/forwarding")
        );
    }

    #[test]
    fn the_guest_spec_points_at_the_overlay_and_drops_host_only_parts() {
        let spec = parse(RUNC_LIKE.as_bytes()).unwrap();
        let g = for_guest(spec, "abc", Path::new("/run/yard/c/abc/rootfs"), false).unwrap();
        let root = g.spec.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/run/yard/c/abc/rootfs"));
        assert_eq!(root.readonly(), Some(true));
        assert!(g.spec.hooks().is_none());
        let linux = g.spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_none());
        assert_eq!(g.cgroups_path, Path::new("/yard/abc"));
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/yard/abc"))
        );
        let cpu = linux.resources().as_ref().unwrap().cpu().as_ref().unwrap();
        assert_eq!(cpu.quota(), None);
        let p = g.spec.process().as_ref().unwrap();
        assert!(p.apparmor_profile().is_none());
        assert!(!g.terminal);
    }

    #[test]
    fn an_absolute_cgroup_path_is_kept() {
        let text = RUNC_LIKE.replace("system.slice:yard:abc", "/switchyard/default/abc");
        let g = for_guest(
            parse(text.as_bytes()).unwrap(),
            "abc",
            Path::new("/r"),
            true,
        )
        .unwrap();
        assert_eq!(g.cgroups_path, Path::new("/switchyard/default/abc"));
        for bad in ["/", "/yard/../.."] {
            let text = RUNC_LIKE.replace("system.slice:yard:abc", bad);
            let e = for_guest(
                parse(text.as_bytes()).unwrap(),
                "abc",
                Path::new("/r"),
                true,
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(e.contains("linux.cgroupsPath"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_malformed_spec_names_the_field() {
        let cases = [
            (
                r#"{"ociVersion":"1.0.2","process":{"args":5,"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "spec: process.args: ",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "spec: process.args: must not be empty",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":["/bin/sh"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"bogus"}]}}"#,
                "spec: linux.namespaces[0].type: ",
            ),
            ("not json", "spec: "),
            (r#"{"ociVersion":"1.0.2"}"#, "spec: process: missing"),
        ];
        for (text, want) in cases {
            match parse(text.as_bytes()) {
                Err(Error::InvalidArgument(m)) => assert!(m.starts_with(want), "{m} vs {want}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_exec_process_is_checked_and_stripped() {
        let p = parse_process(
            br#"{"args":["/bin/echo","hi"],"cwd":"/","user":{"uid":0,"gid":0},"selinuxLabel":"x"}"#,
        )
        .unwrap();
        assert!(p.selinux_label().is_none());
        assert!(matches!(
            parse_process(br#"{"args":["/bin/echo"],"cwd":"rel","user":{"uid":0,"gid":0}}"#),
            Err(Error::InvalidArgument(m)) if m.starts_with("process.cwd")
        ));
    }
}
