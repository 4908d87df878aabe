//! Runtime options from `[runtimes.NAME.options]`, encoded the way containerd's CRI plugin
//! hands them to shims: `containerd.runc.v1.Options` for runc-type shims (same keys as in a
//! containerd config, e.g. `BinaryName`, `SystemdCgroup`), and `runtimeoptions.v1.Options`
//! carrying the table as TOML in `config_body` for every other shim.

use prost_types::Any;
use switchyard_api::containerd::runc::v1::Options as RuncOptions;
use switchyard_api::runtimeoptions::v1::Options as GenericOptions;
use switchyard_api::typeurl;

/// Type URL Switchyard's own shims read from `runtimeoptions.v1.Options.type_url`.
pub const SWITCHYARD_OPTIONS_TYPE: &str = "io.switchyard.runtime.v1.Options";

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("unknown option {key} for a runc shim")]
    UnknownKey { key: String },
    #[error("option {key} must be {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error("options cannot be written as TOML")]
    Serialize(#[source] toml::ser::Error),
}

impl OptionsError {
    /// The offending key, for error messages that name it.
    pub fn value(&self) -> String {
        match self {
            OptionsError::UnknownKey { key } | OptionsError::WrongType { key, .. } => key.clone(),
            OptionsError::Serialize(_) => String::new(),
        }
    }
}

/// Whether this is containerd's own runc shim (not Switchyard's: it groups tasks by its own
/// rules, so switchyardd never joins one of its shims without `start`).
pub fn is_containerd_runc(runtime_type: &str) -> bool {
    runtime_type.starts_with("io.containerd.runc.")
}

/// Whether shims of this runtime type are Switchyard's own, built on its shim kit: switchyardd
/// starts their server itself (`-socket`, as their `start` would) instead of running `start`.
pub fn is_kit_shim(runtime_type: &str) -> bool {
    runtime_type.starts_with("io.containerd.yard-")
}

/// Whether a task of this runtime type starts with a process migrated into the task's cgroup:
/// a runc-class runtime's container, or a Wasm task's worker (a new one, or a group's warm
/// worker moving in). switchyardd starts the kernel's wait for that migration as the create
/// begins (`switchyard_base::cgroup::prewarm_migration`).
pub fn migrates_into_task_cgroup(runtime_type: &str) -> bool {
    is_runc(runtime_type) || runtime_type.starts_with("io.containerd.yard-wasm.")
}

/// Whether shims of this runtime type take runc's options (Switchyard's native shim is
/// runc-class and takes them too, e.g. `BinaryName = "runc"`).
pub fn is_runc(runtime_type: &str) -> bool {
    runtime_type.starts_with("io.containerd.runc.")
        || runtime_type.starts_with("io.containerd.yard-native.")
}

/// Encodes a runtime's options table for its shim.
pub fn encode(runtime_type: &str, table: &toml::Table) -> Result<Any, OptionsError> {
    if is_runc(runtime_type) {
        Ok(typeurl::to_any(&runc_options(table)?))
    } else {
        let body = toml::to_string(table).map_err(OptionsError::Serialize)?;
        Ok(typeurl::to_any(&GenericOptions {
            type_url: SWITCHYARD_OPTIONS_TYPE.to_owned(),
            config_path: String::new(),
            config_body: body.into_bytes(),
        }))
    }
}

fn runc_options(table: &toml::Table) -> Result<RuncOptions, OptionsError> {
    let mut o = RuncOptions::default();
    for (key, value) in table {
        let s = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or(OptionsError::WrongType {
                    key: key.clone(),
                    expected: "a string",
                })
        };
        let b = || {
            value.as_bool().ok_or(OptionsError::WrongType {
                key: key.clone(),
                expected: "true or false",
            })
        };
        let n = || {
            value
                .as_integer()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or(OptionsError::WrongType {
                    key: key.clone(),
                    expected: "a non-negative integer",
                })
        };
        // containerd configs spell these in Go's field case; accept the proto names too.
        match key.as_str() {
            "NoPivotRoot" | "no_pivot_root" => o.no_pivot_root = b()?,
            "NoNewKeyring" | "no_new_keyring" => o.no_new_keyring = b()?,
            "ShimCgroup" | "shim_cgroup" => o.shim_cgroup = s()?,
            "IoUid" | "io_uid" => o.io_uid = n()?,
            "IoGid" | "io_gid" => o.io_gid = n()?,
            "BinaryName" | "binary_name" => o.binary_name = s()?,
            "Root" | "root" => o.root = s()?,
            "SystemdCgroup" | "systemd_cgroup" => o.systemd_cgroup = b()?,
            "CriuImagePath" | "criu_image_path" => o.criu_image_path = s()?,
            "CriuWorkPath" | "criu_work_path" => o.criu_work_path = s()?,
            _ => return Err(OptionsError::UnknownKey { key: key.clone() }),
        }
    }
    Ok(o)
}

/// `options.json` for the bundle: runc's shim reads it back in `start` and `delete` (shim
/// cgroup, runc root), in the JSON form Go writes for its options struct.
pub fn runc_options_json(any: &Any) -> Option<Vec<u8>> {
    let o: RuncOptions = typeurl::from_any(any)?.ok()?;
    let v = serde_json::json!({
        "no_pivot_root": o.no_pivot_root,
        "no_new_keyring": o.no_new_keyring,
        "shim_cgroup": o.shim_cgroup,
        "io_uid": o.io_uid,
        "io_gid": o.io_gid,
        "binary_name": o.binary_name,
        "root": o.root,
        "systemd_cgroup": o.systemd_cgroup,
        "criu_image_path": o.criu_image_path,
        "criu_work_path": o.criu_work_path,
    });
    serde_json::to_vec(&v).ok()
}

/// `options.json` for a Switchyard shim's bundle: the options table as JSON, so the shim can
/// read it in `start`, before any request (the `group` option puts every task of the runtime
/// in one shim).
pub fn generic_options_json(any: &Any) -> Option<Vec<u8>> {
    let o: GenericOptions = typeurl::from_any(any)?.ok()?;
    let table: toml::Table = toml::from_str(std::str::from_utf8(&o.config_body).ok()?).ok()?;
    serde_json::to_vec(&table).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    /// Switchyard's shims get their server started directly; a VM task gets no migration
    /// prewarm (its own cgroup work would wait for it).
    #[test]
    fn which_runtimes_are_started_directly_and_prewarmed() {
        let ours = [
            "io.containerd.yard-native.v1",
            "io.containerd.yard-vm.v1",
            "io.containerd.yard-wasm.v1",
        ];
        assert!(ours.iter().all(|t| is_kit_shim(t)));
        assert!(!is_kit_shim("io.containerd.runc.v2"));
        for t in [ours[0], ours[2], "io.containerd.runc.v2"] {
            assert!(migrates_into_task_cgroup(t), "{t}");
        }
        assert!(!migrates_into_task_cgroup(ours[1]));
    }

    #[test]
    fn runc_options_use_containerd_keys() {
        let any = encode(
            "io.containerd.runc.v2",
            &table("BinaryName = \"/usr/sbin/runc\"\nSystemdCgroup = true\nIoUid = 7\n"),
        )
        .unwrap();
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        let o: RuncOptions = typeurl::from_any(&any).unwrap().unwrap();
        assert_eq!(o.binary_name, "/usr/sbin/runc");
        assert!(o.systemd_cgroup);
        assert_eq!(o.io_uid, 7);
        let json: serde_json::Value =
            serde_json::from_slice(&runc_options_json(&any).unwrap()).unwrap();
        assert_eq!(json["binary_name"], "/usr/sbin/runc");
    }

    #[test]
    fn bad_runc_options_name_the_key() {
        let e = encode("io.containerd.runc.v2", &table("Nope = 1")).unwrap_err();
        assert_eq!(e.value(), "Nope");
        let e = encode("io.containerd.runc.v2", &table("SystemdCgroup = \"yes\"")).unwrap_err();
        assert!(e.to_string().contains("true or false"));
    }

    #[test]
    fn other_shims_get_the_table_as_toml() {
        let any = encode(
            "io.containerd.yard-vm.v1",
            &table("vcpus = 2\nmemory_mib = 512"),
        )
        .unwrap();
        assert_eq!(any.type_url, "runtimeoptions.v1.Options");
        let o: GenericOptions = typeurl::from_any(&any).unwrap().unwrap();
        assert_eq!(o.type_url, SWITCHYARD_OPTIONS_TYPE);
        let json: serde_json::Value =
            serde_json::from_slice(&generic_options_json(&any).unwrap()).unwrap();
        assert!(json.is_object(), "{json}");
        let back: toml::Table =
            toml::from_str(std::str::from_utf8(&o.config_body).unwrap()).unwrap();
        assert_eq!(back["vcpus"].as_integer(), Some(2));
    }
}
