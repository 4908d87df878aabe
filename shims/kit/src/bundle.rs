//! What every shim reads from a bundle: `config.json` parsed with the path of a bad field in the
//! error, the rootfs mounts containerd asks for, and the runtime options a non-runc shim gets
//! (containerd's `runtimeoptions.v1.Options`: a TOML body or a config file path).
//!
//! The task state machine reads `config.json` and mounts the rootfs once per Create, so engines
//! get a parsed spec and a rootfs and never re-read the bundle.

use std::path::{Path, PathBuf};

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::types::mount::Mount;
use oci_spec::runtime::Spec;

use crate::error::{Error, Result};

/// Parse JSON with the path of any bad field in the error (`config.json: process.args: ...`).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Error::InvalidArgument(format!("{what}: {inner}"))
        } else {
            Error::InvalidArgument(format!("{what}: {path}: {inner}"))
        }
    })
}

/// Read and parse the bundle's `config.json` (oci-spec 0.10). Returns the spec and the bytes
/// as read. Errors are InvalidArgument naming the file or the field.
pub fn read_spec(bundle: &Path) -> Result<(Spec, Vec<u8>)> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::InvalidArgument(format!("config.json: cannot read {}: {e}", path.display()))
    })?;
    let spec = parse_json(&bytes, "config.json")?;
    Ok((spec, bytes))
}

/// Mount what containerd asks for as the rootfs (snapshotter mounts) onto `bundle/rootfs`.
/// Returns the mount point when something was mounted (the caller unmounts it on delete).
pub fn mount_rootfs(bundle: &Path, mounts: &[Mount]) -> Result<Option<PathBuf>> {
    match mounts {
        [] => Ok(None),
        [m] => {
            let target = bundle.join("rootfs");
            std::fs::create_dir_all(&target)
                .map_err(Error::io(format!("create {}", target.display())))?;
            let fs_type = (!m.type_.is_empty()).then_some(m.type_.as_str());
            let source = (!m.source.is_empty()).then_some(m.source.as_str());
            containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, &target).map_err(
                |e| {
                    Error::InvalidArgument(format!("rootfs: mount {} ({}): {e}", m.source, m.type_))
                },
            )?;
            Ok(Some(target))
        }
        _ => Err(Error::InvalidArgument(
            "rootfs: more than one mount is not supported".into(),
        )),
    }
}

/// Undo [`mount_rootfs`] for a bundle whose mount point is not known (`<shim> delete` after a
/// dead shim); a rootfs that is not a mount point is left alone.
pub fn unmount_rootfs(bundle: &Path) {
    let rootfs = bundle.join("rootfs");
    if is_mountpoint(&rootfs) {
        unmount(&rootfs);
    }
}

/// Detach the mount at `target` (what [`mount_rootfs`] returned). Processes still inside keep
/// it until they leave; nothing is left once they have.
pub fn unmount(target: &Path) {
    match rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
        // EINVAL: not a mount point (any more); ENOENT: gone with the bundle.
        Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!(target = %target.display(), error = %e, "unmount rootfs"),
    }
}

/// Whether `path` is a mount point (listed in this process's mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    text.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_ref()))
}

/// The runtime options a Switchyard shim (other than the runc-class native shim) is given:
/// containerd's `runtimeoptions.v1.Options`, as switchyardd and containerd's CRI plugin send it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub type_url: String,
    /// A TOML file to read the options from (CRI's `ConfigPath`).
    pub config_path: String,
    /// The options themselves, as TOML (switchyardd's `[runtimes.NAME.options]`).
    pub config_body: Vec<u8>,
}

impl RuntimeOptions {
    /// Decode `runtimeoptions.v1.Options`; `None` for another message type or no options.
    pub fn from_any(any: Option<&Any>) -> Result<Option<RuntimeOptions>> {
        let Some(any) = any else { return Ok(None) };
        if !any.type_url.ends_with("runtimeoptions.v1.Options") {
            return Ok(None);
        }
        decode_runtime_options(&any.value).map(Some).ok_or_else(|| {
            Error::InvalidArgument("options: malformed runtimeoptions.v1.Options".into())
        })
    }

    /// The TOML text: the body if there is one, else the file at `config_path`.
    pub fn toml_text(&self) -> Result<String> {
        if !self.config_body.is_empty() {
            return String::from_utf8(self.config_body.clone())
                .map_err(|_| Error::InvalidArgument("options: config_body is not UTF-8".into()));
        }
        if self.config_path.is_empty() {
            return Ok(String::new());
        }
        std::fs::read_to_string(&self.config_path).map_err(|e| {
            Error::InvalidArgument(format!("options: config_path {}: {e}", self.config_path))
        })
    }
}

/// A shim's own options from the runtime options `Any`: the defaults without options, else the
/// TOML parsed strictly (the message names the key: "options: unknown field `vcpu`").
/// Validation of the values is the caller's.
pub fn options_from_any<T: serde::de::DeserializeOwned + Default>(any: Option<&Any>) -> Result<T> {
    let Some(ro) = RuntimeOptions::from_any(any)? else {
        return Ok(T::default());
    };
    options_from_toml(&ro.toml_text()?)
}

/// See [`options_from_any`].
pub fn options_from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text)
        .map_err(|e| Error::InvalidArgument(format!("options: {}", e.to_string().trim())))
}

/// The rootfs folder a spec's `root.path` names (relative to the bundle), which must exist.
pub fn rootfs_dir(bundle: &Path, root_path: Option<&Path>) -> Result<PathBuf> {
    let root =
        root_path.ok_or_else(|| Error::InvalidArgument("config.json: root: missing".into()))?;
    let rootfs = if root.is_absolute() {
        root.to_path_buf()
    } else {
        bundle.join(root)
    };
    if !rootfs.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "config.json: root.path: {} is not a directory",
            rootfs.display()
        )));
    }
    Ok(rootfs)
}

/// The three length-delimited fields of `runtimeoptions.v1.Options` (1 type_url, 2 config_path,
/// 3 config_body); other fields are skipped.
fn decode_runtime_options(mut b: &[u8]) -> Option<RuntimeOptions> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut o = RuntimeOptions::default();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let (value, rest) = (b.get(..len)?, b.get(len..)?);
                b = rest;
                match key >> 3 {
                    1 => o.type_url = String::from_utf8(value.to_vec()).ok()?,
                    2 => o.config_path = String::from_utf8(value.to_vec()).ok()?,
                    3 => o.config_body = value.to_vec(),
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, u8::try_from(value.len()).unwrap_or(0)];
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn runtime_options_decode() {
        let mut bytes = field(1, b"io.switchyard.runtime.v1.Options");
        bytes.extend(field(3, b"timeout_ms = 5\n"));
        bytes.extend([0x20, 0x96, 0x01]); // field 4, varint 150: skipped
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: bytes,
            ..Default::default()
        };
        let o = RuntimeOptions::from_any(Some(&any))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("decoded nothing"));
        assert_eq!(o.type_url, "io.switchyard.runtime.v1.Options");
        assert_eq!(o.toml_text().unwrap_or_default(), "timeout_ms = 5\n");
    }

    #[test]
    fn runtime_options_reject_garbage() {
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x0a, 0x50, b'x'],
            ..Default::default()
        };
        let e = RuntimeOptions::from_any(Some(&any))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("options: malformed runtimeoptions.v1.Options")
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert!(matches!(RuntimeOptions::from_any(Some(&other)), Ok(None)));
    }
}
