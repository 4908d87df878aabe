//! Reading and checking a bundle's `config.json` before anything is created, so bad input is an
//! InvalidArgument that names the field, and nothing is left behind.
//!
//! This is the one place the OCI spec is parsed in the shim (oci-spec 0.10, the version
//! libcontainer uses); `containerd-shim`'s own oci-spec 0.9 types are never used.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use yard_shim_kit::Error;

pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

pub use yard_shim_kit::bundle::parse_json as parse;

/// The kit reads `config.json` for the shim; this is for the tests of `validate`.
#[cfg(test)]
pub fn load(bundle: &Path) -> Result<Spec, Error> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| invalid(format!("config.json: cannot read {}: {e}", path.display())))?;
    let spec: Spec = parse(&bytes, "config.json")?;
    validate(&spec, bundle)?;
    Ok(spec)
}

fn filesystems() -> Vec<String> {
    std::fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the kernel or libcontainer would otherwise reject late, or with a message that does not
/// say which field is wrong.
pub fn validate(spec: &Spec, bundle: &Path) -> Result<(), Error> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid("config.json: root: missing"))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    if !rootfs.is_dir() {
        return Err(invalid(format!(
            "config.json: root.path: {} does not exist or is not a directory",
            rootfs.display()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("config.json: process: missing"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("config.json: process.args: must not be empty"));
    }
    let Some(linux) = spec.linux() else {
        return Err(invalid("config.json: linux: missing"));
    };
    crate::spec::rootfs_propagation(linux.rootfs_propagation().as_deref())
        .map_err(|e| invalid(e.to_string()))?;
    let known = filesystems();
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(invalid(format!(
                "config.json: mounts[{i}].destination: {} is not an absolute path",
                dest.display()
            )));
        }
        if let Some(src) = crate::spec::bind_source(m, bundle) {
            if !src.exists() {
                return Err(invalid(format!(
                    "config.json: mounts[{i}].source: bind source {} does not exist",
                    src.display()
                )));
            }
        } else if let Some(t) = m.typ().as_deref()
            && !t.is_empty()
            && !known.is_empty()
            && !known.iter().any(|k| k == t)
        {
            return Err(invalid(format!(
                "config.json: mounts[{i}].type: unknown filesystem type {t:?} (not in /proc/filesystems)"
            )));
        }
    }
    Ok(())
}

/// The cgroup the container gets: the spec's `linux.cgroupsPath`, or ours when it names none.
pub fn cgroup_path(spec: &Spec, namespace: &str, id: &str) -> PathBuf {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .unwrap_or_else(|| PathBuf::from(format!("/yard-native/{namespace}/{id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(config).unwrap(),
        )
        .unwrap();
        dir
    }

    fn good() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.1.0",
            "root": {"path": "rootfs"},
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        })
    }

    fn err(config: serde_json::Value) -> String {
        let b = bundle(&config);
        load(b.path()).unwrap_err().to_string()
    }

    #[test]
    fn a_good_spec_loads() {
        let b = bundle(&good());
        load(b.path()).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = good();
        c["linux"]["namespaces"][1]["type"] = "bogus".into();
        let e = err(c);
        assert!(e.contains("linux.namespaces[1].type"), "{e}");

        let mut c = good();
        c["root"]["path"] = "nope".into();
        let e = err(c);
        assert!(e.contains("root.path") && e.contains("nope"), "{e}");

        let mut c = good();
        c["mounts"][0]["destination"] = "proc".into();
        let e = err(c);
        assert!(e.contains("mounts[0].destination"), "{e}");

        let mut c = good();
        c["mounts"][0]["type"] = "nosuchfs".into();
        let e = err(c);
        assert!(
            e.contains("mounts[0].type") && e.contains("nosuchfs"),
            "{e}"
        );

        let mut c = good();
        c["mounts"][0] = serde_json::json!({"destination": "/x", "type": "bind", "source": "/does/not/exist", "options": ["rbind"]});
        let e = err(c);
        assert!(e.contains("mounts[0].source"), "{e}");

        let mut c = good();
        c["linux"]["rootfsPropagation"] = "sideways".into();
        let e = err(c);
        assert!(
            e.contains("linux.rootfsPropagation") && e.contains("sideways"),
            "{e}"
        );
        for value in [
            "rshared", "rslave", "rprivate", "shared", "slave", "private",
        ] {
            let mut c = good();
            c["linux"]["rootfsPropagation"] = value.into();
            load(bundle(&c).path()).unwrap();
        }

        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("config.json"), b"{not json").unwrap();
        let e = load(b.path()).unwrap_err().to_string();
        assert!(e.starts_with("config.json: "), "{e}");
    }
}
