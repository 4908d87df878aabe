//! What this runtime reads from a bundle before libcontainer does: the values libcontainer 0.7
//! would refuse or silently not honour, checked or translated here.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("read {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("write {}", path.display())]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config.json: linux.rootfsPropagation: {0:?} is not one of rprivate, private, rslave, slave, rshared, shared, unbindable"
    )]
    RootfsPropagation(String),
    #[error(
        "config.json: linux.seccomp: this runtime is built without seccomp support, so the filter could not be applied"
    )]
    SeccompUnsupported,
    #[error(
        "config.json: linux.seccomp: SCMP_ACT_NOTIFY has no listener for a process started by exec"
    )]
    SeccompNotifyOnExec,
    #[error(
        "config.json: linux.namespaces: exec into a container with a user namespace is not supported (the process would not join it)"
    )]
    ExecUserNamespace,
}

/// The `linux.rootfsPropagation` libcontainer gets for the spec's value, as runc maps them.
///
/// libcontainer 0.7 accepts only `shared`, `private`, `slave` and `unbindable`, and applies the
/// first three recursively to the container's `/` (`MS_REC`) before it bind-mounts the root
/// there. runc's `rshared`, `rslave` and `rprivate` (what containerd writes) are exactly that, so
/// they map onto them. The plain forms are recursive too here, where runc changes only `/`:
/// every mount below then has the propagation the spec asked for `/`, never the host's (stricter
/// for `private` and `slave`). `runbindable` is refused: the root could then not be bind-mounted
/// (runc fails on it too, later and less clearly). Empty means the default, `rslave`.
pub fn rootfs_propagation(value: Option<&str>) -> Result<Option<&'static str>, SpecError> {
    Ok(match value {
        None | Some("") => None,
        Some("rshared" | "shared") => Some("shared"),
        Some("rslave" | "slave") => Some("slave"),
        Some("rprivate" | "private") => Some("private"),
        Some("unbindable") => Some("unbindable"),
        Some(other) => return Err(SpecError::RootfsPropagation(other.to_owned())),
    })
}

/// Checks the bundle's `config.json` and rewrites what libcontainer would read differently
/// (atomically, only when something changes), before `create` hands the bundle to it.
pub(crate) fn prepare_bundle(bundle: &Path) -> Result<(), SpecError> {
    let path = bundle.join("config.json");
    let mut spec = Spec::load(&path).map_err(|source| SpecError::Load {
        path: path.clone(),
        source,
    })?;
    if !cfg!(feature = "seccomp") && spec.linux().as_ref().is_some_and(|l| l.seccomp().is_some()) {
        // libcontainer without libseccomp only warns and runs the container unfiltered.
        return Err(SpecError::SeccompUnsupported);
    }
    let Some(linux) = spec.linux_mut() else {
        return Ok(());
    };
    let wanted = rootfs_propagation(linux.rootfs_propagation().as_deref())?;
    if linux.rootfs_propagation().as_deref() == wanted {
        return Ok(());
    }
    linux.set_rootfs_propagation(wanted.map(str::to_owned));
    let tmp = bundle.join(".config.json.yard");
    let save = |source| SpecError::Save {
        path: path.clone(),
        source,
    };
    let bytes = serde_json::to_vec(&spec).map_err(|e| save(e.into()))?;
    std::fs::write(&tmp, bytes).map_err(save)?;
    std::fs::rename(&tmp, &path).map_err(save)
}

/// What of the container's spec an exec cannot honour.
pub(crate) fn check_exec(container: &Spec) -> Result<(), SpecError> {
    let user_ns = container
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User));
    if user_ns {
        // libcontainer's tenant joins every namespace of the init but the user namespace: the
        // process would run as the host's root in the container's other namespaces.
        return Err(SpecError::ExecUserNamespace);
    }
    Ok(())
}

/// Completes an exec's process from its container's, the way runc does for `runc exec
/// --process`: capabilities, `noNewPrivileges`, AppArmor profile, SELinux label and rlimits the
/// process does not set are the container's. (Seccomp, cgroup and namespaces are never the
/// process's to choose: see `exec.rs`.) runc's Go types cannot tell an absent
/// `noNewPrivileges` from `false`; here absent means the container's, the stricter reading.
pub(crate) fn inherit(container: &Spec, p: &mut Process) {
    let Some(init) = container.process() else {
        return;
    };
    if p.capabilities().is_none() {
        p.set_capabilities(init.capabilities().clone());
    }
    if p.no_new_privileges().is_none() {
        p.set_no_new_privileges(init.no_new_privileges());
    }
    if p.apparmor_profile().as_deref().is_none_or(str::is_empty) {
        p.set_apparmor_profile(init.apparmor_profile().clone());
    }
    if p.selinux_label().as_deref().is_none_or(str::is_empty) {
        p.set_selinux_label(init.selinux_label().clone());
    }
    if p.rlimits().as_ref().is_none_or(Vec::is_empty) {
        p.set_rlimits(init.rlimits().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_propagation_containerd_writes_is_accepted_as_libcontainer_applies_it() {
        for (given, wanted) in [
            (None, None),
            (Some(""), None),
            (Some("rshared"), Some("shared")),
            (Some("shared"), Some("shared")),
            (Some("rslave"), Some("slave")),
            (Some("slave"), Some("slave")),
            (Some("rprivate"), Some("private")),
            (Some("private"), Some("private")),
            (Some("unbindable"), Some("unbindable")),
        ] {
            assert_eq!(rootfs_propagation(given).unwrap(), wanted, "{given:?}");
        }
        for bad in ["runbindable", "bogus", "Shared"] {
            let e = rootfs_propagation(Some(bad)).unwrap_err().to_string();
            assert!(
                e.starts_with("config.json: linux.rootfsPropagation: ") && e.contains(bad),
                "{e}"
            );
        }
    }

    fn bundle(linux: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "root": {"path": "rootfs"},
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": linux,
        });
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        dir
    }

    #[test]
    fn the_bundle_is_rewritten_only_when_libcontainer_would_read_it_differently() {
        let b = bundle(serde_json::json!({"rootfsPropagation": "rslave"}));
        prepare_bundle(b.path()).unwrap();
        let spec = Spec::load(b.path().join("config.json")).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.rootfs_propagation().as_deref(), Some("slave"));
        assert!(!b.path().join(".config.json.yard").exists());

        let b = bundle(serde_json::json!({"rootfsPropagation": "private"}));
        let before = std::fs::read(b.path().join("config.json")).unwrap();
        prepare_bundle(b.path()).unwrap();
        assert_eq!(std::fs::read(b.path().join("config.json")).unwrap(), before);

        let b = bundle(serde_json::json!({"rootfsPropagation": "runbindable"}));
        let e = prepare_bundle(b.path()).unwrap_err().to_string();
        assert!(e.contains("runbindable"), "{e}");

        let b = bundle(serde_json::json!({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}));
        let r = prepare_bundle(b.path());
        if cfg!(feature = "seccomp") {
            r.unwrap();
        } else {
            assert!(matches!(r, Err(SpecError::SeccompUnsupported)), "{r:?}");
        }
    }

    #[test]
    fn an_exec_into_a_user_namespace_is_refused() {
        let spec = |ns: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.1.0",
                "linux": {"namespaces": ns}
            }))
            .unwrap()
        };
        check_exec(&spec(
            serde_json::json!([{"type": "pid"}, {"type": "mount"}]),
        ))
        .unwrap();
        let e = check_exec(&spec(
            serde_json::json!([{"type": "pid"}, {"type": "user"}]),
        ));
        assert!(matches!(e, Err(SpecError::ExecUserNamespace)), "{e:?}");
    }

    #[test]
    fn an_exec_inherits_what_it_does_not_set_from_its_container() {
        let container: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {
                "args": ["/bin/sleep", "60"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"]},
                "noNewPrivileges": true,
                "apparmorProfile": "yard-test",
                "selinuxLabel": "system_u:system_r:container_t:s0",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 64}]
            }
        }))
        .unwrap();
        let bare: Process = serde_json::from_value(serde_json::json!({
            "args": ["/bin/cat", "/proc/self/status"], "cwd": "/", "user": {"uid": 0, "gid": 0}
        }))
        .unwrap();
        let mut p = bare.clone();
        inherit(&container, &mut p);
        let init = container.process().as_ref().unwrap();
        assert_eq!(p.capabilities(), init.capabilities());
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.apparmor_profile().as_deref(), Some("yard-test"));
        assert_eq!(p.selinux_label(), init.selinux_label());
        assert_eq!(p.rlimits(), init.rlimits());
        assert_eq!(p.args(), bare.args());

        // What the process sets is its own, as with runc.
        let mut own: Process = serde_json::from_value(serde_json::json!({
            "args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": false,
            "apparmorProfile": "other"
        }))
        .unwrap();
        let before = own.clone();
        inherit(&container, &mut own);
        assert_eq!(own.capabilities(), before.capabilities());
        assert_eq!(own.no_new_privileges(), Some(false));
        assert_eq!(own.apparmor_profile().as_deref(), Some("other"));
    }
}
