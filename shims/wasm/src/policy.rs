//! Which security settings of an OCI spec the Wasm runtime honours. A Wasm task is an
//! instance in a shared worker process, not a process of its own, so most of what a spec asks
//! of a process is either trivially true for a guest (it sees no processes, devices, IPC
//! objects or hostname; it holds no capabilities) or enforced another way (its memory limit on
//! linear memory, its CPU through the worker's cgroup). The rest would silently not happen:
//! Create refuses those, naming the field, unless the runtime option `allow_unenforced` lists
//! it. The table is in docs/security.md.

use oci_spec::runtime::{LinuxCpu, LinuxResources, Spec};
use yard_shim_kit::{Error, Result};

use crate::config::Options;

/// How this task relates to the worker's cgroup (see `cgroup.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuHome {
    /// The worker will run in this task's cgroup: its CPU settings apply.
    Owner,
    /// The worker already runs in another task's cgroup (a group shim).
    Joiner,
    /// The task names no cgroup the shim can place the worker in.
    NoCgroup,
}

/// Refuse what would silently not be enforced. `cpu_home` says where its CPU would be
/// accounted. A network namespace `path` (a pod's) is honoured: a `wasi:http` component's
/// listener is bound in it (`sys::listen_in`).
pub fn check(spec: &Spec, options: &Options, cpu_home: CpuHome) -> Result<()> {
    let mut refused = Vec::new();
    let mut refuse = |field: String, why: &str| {
        if !options.allows_unenforced(&field) {
            refused.push(format!("{field}: {why}"));
        }
    };
    if let Some(p) = spec.process() {
        let u = p.user();
        if u.uid() != 0 {
            refuse(
                "process.user.uid".into(),
                "a Wasm task runs with the worker's identity (root without capabilities), \
                 not as another user",
            );
        }
        if u.gid() != 0 {
            refuse(
                "process.user.gid".into(),
                "a Wasm task runs with the worker's identity (root without capabilities), \
                 not in another group",
            );
        }
        if u.additional_gids()
            .as_ref()
            .is_some_and(|g| g.iter().any(|g| *g != 0))
        {
            refuse(
                "process.user.additionalGids".into(),
                "a Wasm task has no supplementary groups",
            );
        }
        if p.apparmor_profile().as_ref().is_some_and(|s| !s.is_empty()) {
            refuse(
                "process.apparmorProfile".into(),
                "no AppArmor profile is applied to a Wasm task",
            );
        }
        if p.selinux_label().as_ref().is_some_and(|s| !s.is_empty()) {
            refuse(
                "process.selinuxLabel".into(),
                "no SELinux label is applied to a Wasm task",
            );
        }
        for (i, r) in p.rlimits().iter().flatten().enumerate() {
            use oci_spec::runtime::PosixRlimitType as R;
            // A guest has no processes and dumps no core; open files are bounded for the worker
            // as a whole (docs/security.md).
            if !matches!(r.typ(), R::RlimitNofile | R::RlimitNproc | R::RlimitCore) {
                refuse(
                    format!("process.rlimits[{i}]"),
                    &format!("{:?} is not applied to a Wasm instance", r.typ()),
                );
            }
        }
    }
    let Some(linux) = spec.linux() else {
        return finish(refused);
    };
    if linux.sysctl().as_ref().is_some_and(|s| !s.is_empty()) {
        refuse(
            "linux.sysctl".into(),
            "kernel parameters are not set for a Wasm task",
        );
    }
    if linux.seccomp().is_some() {
        refuse(
            "linux.seccomp".into(),
            "a guest's WASI calls are not filtered by a seccomp profile (the worker has its own \
             fixed filter)",
        );
    }
    if linux.mount_label().as_ref().is_some_and(|s| !s.is_empty()) {
        refuse(
            "linux.mountLabel".into(),
            "no SELinux label is applied to a Wasm task's files",
        );
    }
    if linux.intel_rdt().is_some() {
        refuse(
            "linux.intelRdt".into(),
            "cache and memory bandwidth allocation is not applied to a Wasm task",
        );
    }
    for (field, paths) in [
        ("linux.maskedPaths", linux.masked_paths()),
        ("linux.readonlyPaths", linux.readonly_paths()),
    ] {
        for (i, p) in paths.iter().flatten().enumerate() {
            // A guest sees no /proc or /sys: only its root, which the runtime does not mask.
            let pseudo = ["/proc", "/sys"]
                .iter()
                .any(|fs| p == fs || p.strip_prefix(fs).is_some_and(|r| r.starts_with('/')));
            if !pseudo {
                refuse(
                    format!("{field}[{i}]"),
                    &format!("{p} is not masked inside a Wasm task's root"),
                );
            }
        }
    }
    if let Some(r) = linux.resources() {
        resources(r, cpu_home, &mut refuse);
    }
    finish(refused)
}

/// Whether a spec's CPU settings ask for anything: a weight of 1024 (`shares`, what `ctr` and
/// containerd's default spec write) is the kernel's default, no limit.
pub fn asks_for_cpu(cpu: &LinuxCpu) -> bool {
    let mut cpu = cpu.clone();
    if cpu.shares() == Some(1024) {
        cpu.set_shares(None);
    }
    cpu != LinuxCpu::default()
}

fn resources(r: &LinuxResources, cpu_home: CpuHome, refuse: &mut impl FnMut(String, &str)) {
    if r.cpu().as_ref().is_some_and(asks_for_cpu) {
        match cpu_home {
            CpuHome::Owner => {}
            CpuHome::Joiner => refuse(
                "linux.resources.cpu".into(),
                "this task joins a shim whose worker runs in an earlier task's cgroup; its own \
                 CPU limits cannot apply to it alone",
            ),
            CpuHome::NoCgroup => refuse(
                "linux.resources.cpu".into(),
                "CPU limits need linux.cgroupsPath (an absolute cgroupfs path) for the worker",
            ),
        }
    }
    if r.block_io().is_some() {
        refuse(
            "linux.resources.blockIO".into(),
            "block I/O limits are not applied to a Wasm task",
        );
    }
    if r.network().is_some() {
        refuse(
            "linux.resources.network".into(),
            "network classes and priorities are not applied to a Wasm task",
        );
    }
    if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
        refuse(
            "linux.resources.rdma".into(),
            "RDMA limits are not applied to a Wasm task",
        );
    }
    if r.unified().as_ref().is_some_and(|m| !m.is_empty()) {
        refuse(
            "linux.resources.unified".into(),
            "cgroup v2 settings are not applied to a Wasm task",
        );
    }
}

fn finish(refused: Vec<String>) -> Result<()> {
    if refused.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{} (the Wasm runtime cannot enforce {}; the runtime option allow_unenforced lists \
         fields to accept anyway)",
        refused.join("; "),
        if refused.len() == 1 { "it" } else { "them" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The spec `ctr run` (containerd's default Unix spec) sends.
    fn ctr_spec() -> Value {
        json!({
            "ociVersion": "1.1.0",
            "process": {
                "user": {"uid": 0, "gid": 0, "additionalGids": [0]},
                "args": ["/app.wasm"], "cwd": "/", "noNewPrivileges": true,
                "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                                 "permitted": ["CAP_CHOWN"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
            },
            "root": {"path": "rootfs"},
            "linux": {
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "cgroupsPath": "/default/t1",
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                               {"type": "mount"}, {"type": "network"}],
                "maskedPaths": ["/proc/acpi", "/proc/kcore", "/sys/firmware", "/proc/scsi"],
                "readonlyPaths": ["/proc/bus", "/proc/sys", "/proc/sysrq-trigger"]
            }
        })
    }

    fn check_json(v: &Value, o: &Options, home: CpuHome) -> Result<()> {
        let spec: Spec = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}"));
        check(&spec, o, home)
    }

    fn refused(v: &Value, home: CpuHome) -> String {
        check_json(v, &Options::default(), home)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_of_ctr_yard_and_cri_pass() {
        let o = Options::default();
        let mut v = ctr_spec();
        assert!(check_json(&v, &o, CpuHome::Owner).is_ok());
        // yard run: a memory and pids limit, its own cgroup.
        v["linux"]["resources"]["memory"] = json!({"limit": 33554432});
        v["linux"]["resources"]["pids"] = json!({"limit": 10});
        assert!(check_json(&v, &o, CpuHome::Owner).is_ok());
        // CRI: CPU shares and quota in the task's own cgroup, OOM score, joined namespaces.
        v["linux"]["resources"]["cpu"] = json!({"shares": 2, "quota": 50000, "period": 100000});
        v["process"]["oomScoreAdj"] = json!(1000);
        v["linux"]["namespaces"][4] = json!({"type": "network", "path": "/var/run/netns/x"});
        assert!(check_json(&v, &o, CpuHome::Owner).is_ok());
    }

    #[test]
    fn unenforceable_settings_are_refused_by_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("/process/user/uid", json!(1000), "process.user.uid: "),
            ("/process/user/gid", json!(1000), "process.user.gid: "),
            (
                "/process/user/additionalGids",
                json!([0, 27]),
                "process.user.additionalGids: ",
            ),
            (
                "/process/apparmorProfile",
                json!("cri-containerd.apparmor.d"),
                "process.apparmorProfile: ",
            ),
            (
                "/process/selinuxLabel",
                json!("system_u:system_r:container_t:s0"),
                "process.selinuxLabel: ",
            ),
            (
                "/process/rlimits",
                json!([{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1},
                                        {"type": "RLIMIT_CPU", "hard": 1, "soft": 1}]),
                "process.rlimits[1]: ",
            ),
            (
                "/linux/seccomp",
                json!({"defaultAction": "SCMP_ACT_ERRNO"}),
                "linux.seccomp: ",
            ),
            (
                "/linux/sysctl",
                json!({"net.ipv4.ip_forward": "1"}),
                "linux.sysctl: ",
            ),
            (
                "/linux/mountLabel",
                json!("system_u:object_r:container_file_t:s0"),
                "linux.mountLabel: ",
            ),
            (
                "/linux/maskedPaths",
                json!(["/proc/kcore", "/etc/secret"]),
                "linux.maskedPaths[1]: /etc/secret",
            ),
            (
                "/linux/readonlyPaths",
                json!(["/data"]),
                "linux.readonlyPaths[0]: /data",
            ),
            (
                "/linux/resources/blockIO",
                json!({"weight": 100}),
                "linux.resources.blockIO: ",
            ),
            (
                "/linux/resources/unified",
                json!({"memory.high": "1M"}),
                "linux.resources.unified: ",
            ),
        ];
        for (pointer, value, want) in cases {
            let mut v = ctr_spec();
            let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
            if let Some(obj) = v.pointer_mut(parent).and_then(Value::as_object_mut) {
                obj.insert(key.to_owned(), value);
            }
            let e = refused(&v, CpuHome::Owner);
            assert!(e.starts_with(want), "{pointer}: {e}");
            assert!(e.contains("allow_unenforced"), "{e}");
        }
    }

    #[test]
    fn cpu_limits_need_the_workers_cgroup() {
        let mut v = ctr_spec();
        v["linux"]["resources"]["cpu"] = json!({"quota": 50000, "period": 100000});
        assert!(refused(&v, CpuHome::Owner).is_empty());
        let e = refused(&v, CpuHome::Joiner);
        assert!(e.starts_with("linux.resources.cpu: this task joins"), "{e}");
        let e = refused(&v, CpuHome::NoCgroup);
        assert!(e.starts_with("linux.resources.cpu: CPU limits need"), "{e}");
        // An empty cpu object asks for nothing, nor does the default weight that ctr and
        // containerd's default spec write; another weight is a setting.
        v["linux"]["resources"]["cpu"] = json!({});
        assert!(refused(&v, CpuHome::Joiner).is_empty());
        v["linux"]["resources"]["cpu"] = json!({"shares": 1024});
        assert!(refused(&v, CpuHome::Joiner).is_empty());
        v["linux"]["resources"]["cpu"] = json!({"shares": 2});
        let e = refused(&v, CpuHome::Joiner);
        assert!(e.starts_with("linux.resources.cpu: this task joins"), "{e}");
    }

    #[test]
    fn issue18_a_pods_network_namespace_is_accepted() {
        // The HTTP listener is bound in it (a pod's IP reaches the component).
        let mut v = ctr_spec();
        v["linux"]["namespaces"][4] = json!({"type": "network", "path": "/var/run/netns/pod"});
        assert!(check_json(&v, &Options::default(), CpuHome::Owner).is_ok());
    }

    #[test]
    fn the_runtime_option_accepts_named_fields() {
        let mut v = ctr_spec();
        v["process"]["user"]["uid"] = json!(1000);
        v["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ERRNO"});
        let some = Options {
            allow_unenforced: vec!["process.user".into()],
            ..Options::default()
        };
        let e = check_json(&v, &some, CpuHome::Owner)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("linux.seccomp: "), "{e}");
        assert!(!e.contains("process.user"), "{e}");
        let both = Options {
            allow_unenforced: vec!["process.user".into(), "linux.seccomp".into()],
            ..Options::default()
        };
        assert!(check_json(&v, &both, CpuHome::Owner).is_ok());
    }
}
