//! What this runtime reads from a bundle before libcontainer does: the values libcontainer 0.7
//! would refuse or silently not honour, checked or translated here.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxNamespaceType, LinuxSeccomp, LinuxSeccompArgBuilder, LinuxSeccompOperator,
    Mount, Process, Spec,
};

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
        "config.json: linux.seccomp: an SCMP_CMP_MASKED_EQ argument rewritten for libcontainer"
    )]
    SeccompArgument(#[source] oci_spec::OciSpecError),
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

/// Set on a `config.json` this runtime rewrote for libcontainer: the rewrite cannot run twice
/// (a `SCMP_CMP_MASKED_EQ` argument swapped again is back to what libcontainer misreads), so a
/// second `create` on the same bundle finds the mark and leaves the file as it is.
pub const PREPARED_ANNOTATION: &str = "io.switchyard.runtime.prepared-for";
const PREPARED_FOR: &str = "libcontainer-0.7";

/// Checks the bundle's `config.json` and rewrites what libcontainer 0.7 would read differently
/// from runc (atomically, only when something changes, and once), before `create` hands the
/// bundle to it; returns the spec as libcontainer gets it:
/// - `linux.rootfsPropagation`: see [`rootfs_propagation`];
/// - `process.noNewPrivileges: false` is left out. runc reads `false` and absent alike (Go's
///   `bool`): no `no_new_privs`, so the seccomp filter goes on while the init still has
///   `CAP_SYS_ADMIN`. libcontainer loads it that early only when the value is absent; given
///   `false` it loads it after dropping the capabilities, still without `no_new_privs`, which
///   the kernel refuses (`EACCES`, reported by libseccomp as `ECANCELED`) for every container
///   without `CAP_SYS_ADMIN`;
/// - `linux.seccomp`: see [`masked_eq_for_libcontainer`];
/// - `process.env`: `HOME` when it has none, from the `/etc/passwd` the container will see, the
///   root's or a bind mount's (`home.rs`: else libcontainer asks glibc's NSS inside the
///   container, which loads modules from the image).
pub(crate) fn prepare_bundle(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let mut spec = Spec::load(&path).map_err(|source| SpecError::Load {
        path: path.clone(),
        source,
    })?;
    if !cfg!(feature = "seccomp") && spec.linux().as_ref().is_some_and(|l| l.seccomp().is_some()) {
        // libcontainer without libseccomp only warns and runs the container unfiltered.
        return Err(SpecError::SeccompUnsupported);
    }
    let mut changed = false;
    let root = spec.root().as_ref().map(|r| bundle.join(r.path()));
    let mounts = spec.mounts().clone().unwrap_or_default();
    if let (Some(process), Some(root)) = (spec.process_mut(), root) {
        changed |= crate::home::set_home(process, &root, &mounts, bundle);
    }
    // The rest runs once per bundle: a swapped argument swapped again would be wrong.
    if !prepared(&spec)
        && let Some(linux) = spec.linux_mut()
    {
        let wanted = rootfs_propagation(linux.rootfs_propagation().as_deref())?;
        if linux.rootfs_propagation().as_deref() != wanted {
            linux.set_rootfs_propagation(wanted.map(str::to_owned));
            changed = true;
        }
        if let Some(seccomp) = linux.seccomp_mut() {
            changed |= masked_eq_for_libcontainer(seccomp)?;
        }
    }
    if let Some(process) = spec.process_mut()
        && process.no_new_privileges() == Some(false)
    {
        process.set_no_new_privileges(None);
        changed = true;
    }
    if !changed {
        return Ok(spec);
    }
    spec.annotations_mut()
        .get_or_insert_with(Default::default)
        .insert(PREPARED_ANNOTATION.into(), PREPARED_FOR.into());
    let save = |source| SpecError::Save {
        path: path.clone(),
        source,
    };
    let bytes = serde_json::to_vec(&spec).map_err(|e| save(e.into()))?;
    // The rewrite keeps the file's mode: this process runs under the workload's umask (022),
    // and the caller's bundle files are private (0600). A temporary file of its own
    // (`tempfile`, created 0600) is written and renamed over it.
    let mode = std::fs::metadata(&path).map_err(save)?.permissions();
    let mut tmp = tempfile::Builder::new()
        .prefix(".config.json.")
        .tempfile_in(bundle)
        .map_err(save)?;
    {
        use std::io::Write as _;
        tmp.write_all(&bytes).map_err(save)?;
    }
    tmp.as_file().set_permissions(mode).map_err(save)?;
    tmp.persist(&path).map_err(|e| save(e.error))?;
    Ok(spec)
}

/// The host path a bind mount of the spec mounts, a relative source being the bundle's (as runc
/// takes it); `None` for a mount of another kind.
pub(crate) fn bind_source(m: &Mount, bundle: &Path) -> Option<PathBuf> {
    let options = m.options().as_deref().unwrap_or_default();
    if !switchyard_base::mount::is_bind(m.typ().as_deref(), options) {
        return None;
    }
    let src = m.source().clone().unwrap_or_default();
    Some(if src.is_absolute() {
        src
    } else {
        bundle.join(src)
    })
}

/// Whether `prepare_bundle` rewrote this spec (a container made by an older runtime was not).
pub(crate) fn prepared(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(PREPARED_ANNOTATION))
        .is_some_and(|v| v == PREPARED_FOR)
}

/// Rewrites `seccomp`'s `SCMP_CMP_MASKED_EQ` arguments for libcontainer 0.7, which reads them
/// the other way round; returns whether there were any. The runtime spec and runc take `value`
/// for the mask and `valueTwo` for the datum (`arg & value == valueTwo`); libcontainer hands
/// libseccomp `valueTwo` as the mask. Docker's and containerd's default profiles allow `clone`
/// when `flags & <the namespace flags> == 0`, which libcontainer reads as `flags & 0 == ...`:
/// every `clone`, new namespaces included. Swapped, libseccomp gets what runc gives it.
pub(crate) fn masked_eq_for_libcontainer(seccomp: &mut LinuxSeccomp) -> Result<bool, SpecError> {
    let Some(mut syscalls) = seccomp.syscalls().clone() else {
        return Ok(false);
    };
    let mut changed = false;
    for call in &mut syscalls {
        let Some(mut args) = call.args().clone() else {
            continue;
        };
        for arg in args
            .iter_mut()
            .filter(|a| a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq)
        {
            let (mask, datum) = (arg.value(), arg.value_two().unwrap_or(0));
            *arg = LinuxSeccompArgBuilder::default()
                .index(arg.index())
                .op(arg.op())
                .value(datum)
                .value_two(mask)
                .build()
                .map_err(SpecError::SeccompArgument)?;
            changed = true;
        }
        call.set_args(Some(args));
    }
    if changed {
        seccomp.set_syscalls(Some(syscalls));
    }
    Ok(changed)
}

/// What of the container's spec an exec cannot honour.
pub(crate) fn check_exec(container: &Spec) -> Result<(), SpecError> {
    if has_user_namespace(container) {
        // libcontainer's tenant joins every namespace of the init but the user namespace: the
        // process would run as the host's root in the container's other namespaces.
        return Err(SpecError::ExecUserNamespace);
    }
    Ok(())
}

/// Who loads a seccomp filter, as the kernel's check in `seccomp(2)` sees it: it needs
/// `no_new_privs` or `CAP_SYS_ADMIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterLoader {
    /// A process with `no_new_privs`.
    NoNewPrivs,
    /// The process before its capabilities are dropped: it has this runtime's, or all of them
    /// in the container's own user namespace.
    Runtime { user_ns: bool },
    /// The process after its capabilities are dropped to the container's, without
    /// `no_new_privs`.
    Container { cap_sys_admin: bool },
}

impl FilterLoader {
    /// The container's init under libcontainer 0.7, which loads the filter after dropping the
    /// capabilities when `noNewPrivileges` is there, true or false (`prepare_bundle` leaves
    /// `false` out), and before when it is not.
    pub fn init(spec: &Spec) -> FilterLoader {
        let process = spec.process().as_ref();
        match process.and_then(|p| p.no_new_privileges()) {
            Some(true) => FilterLoader::NoNewPrivs,
            Some(false) => FilterLoader::Container {
                cap_sys_admin: process
                    .and_then(|p| p.capabilities().as_ref())
                    .and_then(|c| c.effective().as_ref())
                    .is_some_and(|e| e.contains(&Capability::SysAdmin)),
            },
            None => FilterLoader::Runtime {
                user_ns: has_user_namespace(spec),
            },
        }
    }

    /// A process started by exec (`workload.rs`): the filter goes on after the capabilities are
    /// dropped with `no_new_privs`, before them without.
    pub fn exec(no_new_privs: bool) -> FilterLoader {
        if no_new_privs {
            FilterLoader::NoNewPrivs
        } else {
            FilterLoader::Runtime { user_ns: false }
        }
    }
}

/// Whether the container has a user namespace (its init is root there, with every capability).
pub(crate) fn has_user_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User))
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
            "process": {
                "args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                "env": ["HOME=/root"]
            },
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
        let entries: Vec<_> = std::fs::read_dir(b.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(entries, ["config.json"], "a temporary file is left");

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

    /// A process without `HOME` gets it in the bundle from the root's `/etc/passwd` (`home.rs`),
    /// once: a second create of the same bundle finds it there.
    #[test]
    fn a_missing_home_is_written_into_the_bundle_once() {
        let b = bundle(serde_json::json!({}));
        let path = b.path().join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
        std::fs::write(&path, spec.to_string()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        // Not 0600, which a new file has anyway.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::create_dir_all(b.path().join("rootfs/etc")).unwrap();
        std::fs::write(
            b.path().join("rootfs/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
        )
        .unwrap();
        let got = prepare_bundle(b.path()).unwrap();
        let env = got.process().as_ref().and_then(|p| p.env().clone());
        assert_eq!(
            env.as_deref(),
            Some(&["PATH=/bin".to_owned(), "HOME=/root".to_owned()][..])
        );
        assert!(prepared(&Spec::load(&path).unwrap()));
        let written = std::fs::read(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "the rewrite changed the file's mode");
        prepare_bundle(b.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), written, "rewritten twice");
    }

    // Issue 19: switchyardd's CRI wrote `noNewPrivileges: false`, and libcontainer then loaded
    // RuntimeDefault's filter after dropping CAP_SYS_ADMIN: the kernel refused it (ECANCELED).
    #[test]
    fn issue19_no_new_privileges_false_reaches_libcontainer_as_absent() {
        for (given, wanted) in [(Some(false), None), (Some(true), Some(true)), (None, None)] {
            let dir = tempfile::tempdir().unwrap();
            let mut process = serde_json::json!({
                "args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                "env": ["HOME=/root"]
            });
            if let Some(v) = given {
                process["noNewPrivileges"] = v.into();
            }
            let spec = serde_json::json!({
                "ociVersion": "1.1.0", "root": {"path": "rootfs"}, "process": process,
            });
            let path = dir.path().join("config.json");
            std::fs::write(&path, spec.to_string()).unwrap();
            let before = std::fs::read(&path).unwrap();
            prepare_bundle(dir.path()).unwrap();
            let after = Spec::load(&path).unwrap();
            let p = after.process().as_ref().unwrap();
            assert_eq!(p.no_new_privileges(), wanted, "{given:?}");
            if given == wanted {
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    before,
                    "rewritten for {given:?}"
                );
            }
        }
    }

    // Issue 19: containerd's and switchyardd's RuntimeDefault allow `clone` only when
    // `flags & 0x7E020000 == 0`; libcontainer read that as `flags & 0 == ...`.
    #[cfg(feature = "seccomp")]
    #[test]
    fn issue19_masked_eq_reaches_libcontainer_as_runc_reads_it_and_only_once() {
        let b = bundle(serde_json::json!({"seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0x7E02_0000_u64, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                          {"index": 1, "value": 0xff, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }}));
        let args = |spec: &Spec| -> Vec<(u64, Option<u64>)> {
            let linux = spec.linux().as_ref().unwrap();
            let calls = linux
                .seccomp()
                .as_ref()
                .unwrap()
                .syscalls()
                .clone()
                .unwrap();
            calls
                .iter()
                .flat_map(|c| c.args().clone().unwrap())
                .map(|a| (a.value(), a.value_two()))
                .collect()
        };
        let swapped = vec![(0, Some(0x7E02_0000)), (8, None), (0, Some(0xff))];
        let spec = prepare_bundle(b.path()).unwrap();
        assert_eq!(args(&spec), swapped);
        assert!(prepared(&spec));
        let on_disk = Spec::load(b.path().join("config.json")).unwrap();
        assert_eq!(on_disk, spec);
        // A second create on the same bundle must not swap them back.
        assert_eq!(args(&prepare_bundle(b.path()).unwrap()), swapped);
    }

    #[test]
    fn who_loads_the_filter_follows_libcontainers_order() {
        let spec = |process: serde_json::Value, ns: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.1.0", "process": process, "linux": {"namespaces": ns}
            }))
            .unwrap()
        };
        let base = serde_json::json!({"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"effective": ["CAP_KILL"]}});
        let with = |key: &str, v: serde_json::Value| {
            let mut p = base.clone();
            p[key] = v;
            p
        };
        let pid = serde_json::json!([{"type": "pid"}]);
        let user = serde_json::json!([{"type": "pid"}, {"type": "user"}]);
        let cases = [
            (base.clone(), &pid, FilterLoader::Runtime { user_ns: false }),
            (base.clone(), &user, FilterLoader::Runtime { user_ns: true }),
            (
                with("noNewPrivileges", true.into()),
                &pid,
                FilterLoader::NoNewPrivs,
            ),
            (
                with("noNewPrivileges", false.into()),
                &pid,
                FilterLoader::Container {
                    cap_sys_admin: false,
                },
            ),
        ];
        for (process, ns, wanted) in cases {
            assert_eq!(
                FilterLoader::init(&spec(process.clone(), ns.clone())),
                wanted,
                "{process}"
            );
        }
        let mut admin = with("noNewPrivileges", false.into());
        admin["capabilities"]["effective"] = serde_json::json!(["CAP_SYS_ADMIN"]);
        assert_eq!(
            FilterLoader::init(&spec(admin, pid.clone())),
            FilterLoader::Container {
                cap_sys_admin: true
            }
        );
        assert_eq!(FilterLoader::exec(true), FilterLoader::NoNewPrivs);
        assert_eq!(
            FilterLoader::exec(false),
            FilterLoader::Runtime { user_ns: false }
        );
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
