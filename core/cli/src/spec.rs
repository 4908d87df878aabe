//! The OCI runtime spec `yard run` sends for a rootfs directory: containerd's default Linux
//! spec (namespaces, mounts, capabilities, masked paths), adjusted by the command's flags.

use std::path::Path;

use serde_json::{Value, json};

pub use switchyard_base::oci_defaults::DEFAULT_PATH;
use switchyard_base::oci_defaults::{
    DEFAULT_CAPABILITIES as CAPS, DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS,
};

/// What a `yard run` asks for.
#[derive(Debug, Clone)]
pub struct SpecOptions<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub args: &'a [String],
    /// `KEY=VALUE` entries, checked by the caller.
    pub env: &'a [String],
    pub cwd: Option<&'a str>,
    pub rootfs: &'a Path,
    /// The process's uid and gid.
    pub user: (u32, u32),
    pub terminal: bool,
    pub hostname: Option<&'a str>,
    pub net_host: bool,
    pub read_only: bool,
    /// Memory limit in bytes (`linux.resources.memory.limit`).
    pub memory: Option<i64>,
    /// Maximum number of tasks (`linux.resources.pids.limit`).
    pub pids_limit: Option<i64>,
    /// `KEY=VALUE` annotations, checked by the caller.
    pub annotations: &'a [(String, String)],
}

/// The process part, reused by `yard exec`.
pub fn process(
    args: &[String],
    env: &[String],
    cwd: Option<&str>,
    terminal: bool,
    user: (u32, u32),
) -> Value {
    let mut envs: Vec<String> = Vec::new();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        envs.push(DEFAULT_PATH.to_owned());
    }
    if terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
        envs.push("TERM=xterm".to_owned());
    }
    envs.extend(env.iter().cloned());
    json!({
        "terminal": terminal,
        "user": {"uid": user.0, "gid": user.1},
        "args": args,
        "env": envs,
        "cwd": cwd.unwrap_or("/"),
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

pub fn spec(o: &SpecOptions<'_>) -> Value {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if !o.net_host {
        namespaces.push(json!({"type": "network"}));
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
    ];
    if o.net_host {
        // Share the host's name resolution as containerd's WithHostResolvconf does.
        for f in ["/etc/resolv.conf", "/etc/hosts"] {
            if Path::new(f).exists() {
                mounts.push(json!({"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro"]}));
            }
        }
    }
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(limit) = o.memory {
        resources["memory"] = json!({"limit": limit});
    }
    if let Some(limit) = o.pids_limit {
        resources["pids"] = json!({"limit": limit});
    }
    let annotations: serde_json::Map<String, Value> = o
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "ociVersion": "1.1.0",
        "annotations": annotations,
        "process": process(o.args, o.env, o.cwd, o.terminal, o.user),
        "root": {"path": o.rootfs.display().to_string(), "readonly": o.read_only},
        "hostname": o.hostname.unwrap_or(o.id),
        "mounts": mounts,
        "linux": {
            "resources": resources,
            "cgroupsPath": format!("/switchyard/{}/{}", o.namespace, o.id),
            "namespaces": namespaces,
            "maskedPaths": DEFAULT_MASKED_PATHS,
            "readonlyPaths": DEFAULT_READONLY_PATHS
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_reflects_flags() {
        let args = vec!["/bin/echo".to_owned(), "hi".to_owned()];
        let env = vec!["A=1".to_owned()];
        let s = spec(&SpecOptions {
            namespace: "default",
            id: "t1",
            args: &args,
            env: &env,
            cwd: Some("/tmp"),
            rootfs: Path::new("/r"),
            user: (0, 0),
            terminal: true,
            hostname: None,
            net_host: true,
            read_only: false,
            memory: Some(64 << 20),
            pids_limit: None,
            annotations: &[],
        });
        assert_eq!(s["process"]["args"][1], "hi");
        assert_eq!(s["process"]["cwd"], "/tmp");
        let envs: Vec<&str> = s["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(envs.contains(&"A=1"));
        assert!(envs.contains(&"TERM=xterm"));
        assert!(envs.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(s["root"]["path"], "/r");
        assert_eq!(s["hostname"], "t1");
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert!(s["linux"]["resources"].get("pids").is_none());
        assert_eq!(s["linux"]["cgroupsPath"], "/switchyard/default/t1");
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(!ns.contains(&"network"));
        assert!(ns.contains(&"pid"));
    }
}
