//! What the vm runtime checks in a container's spec before anything starts: settings it cannot
//! honour are refused here, naming the field, rather than failing (or silently not applying)
//! inside the guest.

use oci_spec::runtime::{Process, Spec};
use yard_shim_kit::start::GROUP_ANNOTATIONS;
use yard_shim_kit::{Error, Result};

use crate::config::Options;

/// Bind mounts name host paths, which the guest cannot see: refused, naming the mount. (Sharing
/// them into the guest over 9p is future work.)
pub fn host_binds(spec: &Spec) -> Result<()> {
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if bind {
            return Err(Error::InvalidArgument(format!(
                "config.json: mounts[{i}]: bind mount of host path {} into {}: the vm runtime \
                 cannot share host paths with the guest yet",
                m.source()
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                m.destination().display()
            )));
        }
    }
    Ok(())
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
