//! What the store reads out of images: manifests and indexes (OCI and Docker schema 2, parsed
//! with `oci-spec`), platform selection, chain ids, Wasm artifacts, and the run configuration
//! (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`) a bundle is made from.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Media types of manifests and indexes a pull accepts.
pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// The CNCF Wasm OCI artifact's layer and config (and the older runwasi module type).
pub const WASM_LAYER_TYPES: [&str; 2] = [
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.w3c.wasm.module.v1+wasm",
];
pub const WASM_CONFIG_TYPE: &str = "application/vnd.wasm.config.v0+json";

/// Largest manifest, index or config read into memory.
pub const MAX_METADATA_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} {digest}: {reason}")]
    Invalid {
        what: &'static str,
        digest: String,
        reason: String,
    },
    #[error(
        "no manifest for platform {wanted} in index {digest} (it has: {})",
        if available.is_empty() { "none".to_owned() } else { available.join(", ") }
    )]
    NoPlatform {
        digest: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("image config {digest} is for platform {found}, not {wanted}")]
    WrongPlatform {
        digest: String,
        found: String,
        wanted: String,
    },
    #[error("layer {digest}: media type {media_type:?} is not a layer this store can unpack")]
    LayerType { digest: String, media_type: String },
}

/// An `os/architecture[/variant]` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This machine's platform, in Go's names (`amd64`, `arm64`), as registries label images.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: (*os).into(),
                    architecture: (*arch).into(),
                    variant: Some((*variant).into()),
                })
            }
            _ => Err(format!("platform {s:?}: expected os/arch[/variant]")),
        }
    }

    fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == arch
            && (self.variant.is_none() || self.variant.as_deref() == variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What a blob of JSON is.
pub enum Parsed {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// Parses a manifest or an index, by media type where known, by shape otherwise.
pub fn parse_manifest(
    digest: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<Parsed, ManifestError> {
    let invalid = |what: &'static str, reason: String| ManifestError::Invalid {
        what,
        digest: digest.to_owned(),
        reason,
    };
    let is_index = if INDEX_TYPES.contains(&media_type) {
        true
    } else if MANIFEST_TYPES.contains(&media_type) {
        false
    } else {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| invalid("manifest", format!("not JSON: {e}")))?;
        if v.get("manifests").is_some() {
            true
        } else if v.get("layers").is_some() {
            false
        } else {
            return Err(invalid(
                "manifest",
                format!("media type {media_type:?} is neither an image manifest nor an index"),
            ));
        }
    };
    if is_index {
        ImageIndex::from_reader(bytes)
            .map(|i| Parsed::Index(Box::new(i)))
            .map_err(|e| invalid("index", e.to_string()))
    } else {
        ImageManifest::from_reader(bytes)
            .map(|m| Parsed::Manifest(Box::new(m)))
            .map_err(|e| invalid("manifest", e.to_string()))
    }
}

/// Picks the manifest for `wanted` out of an index.
pub fn select_platform<'a>(
    digest: &str,
    index: &'a ImageIndex,
    wanted: &Platform,
) -> Result<&'a Descriptor, ManifestError> {
    let mut available = Vec::new();
    for d in index.manifests() {
        match d.platform() {
            Some(p) => {
                let (os, arch) = (p.os().to_string(), p.architecture().to_string());
                if wanted.matches(&os, &arch, p.variant().as_deref()) {
                    return Ok(d);
                }
                available.push(match p.variant() {
                    Some(v) => format!("{os}/{arch}/{v}"),
                    None => format!("{os}/{arch}"),
                });
            }
            // A platform-less entry (a Wasm artifact, a single-image index) fits any platform.
            None => return Ok(d),
        }
    }
    Err(ManifestError::NoPlatform {
        digest: digest.to_owned(),
        wanted: wanted.to_string(),
        available,
    })
}

/// Whether `manifest` is a Wasm artifact (its layers are modules, not tarballs).
pub fn is_wasm_artifact(manifest: &ImageManifest) -> bool {
    manifest.config().media_type().to_string() == WASM_CONFIG_TYPE
        || manifest
            .layers()
            .iter()
            .any(|l| WASM_LAYER_TYPES.contains(&l.media_type().to_string().as_str()))
}

/// Whether an image is for the wasm runtime: a Wasm artifact (by media types), an image whose
/// program (the first of `Entrypoint`, else of `Cmd`) is a `.wasm` file, or an image built for
/// the `wasm` architecture. The store, the daemon's routing and `yard run` all take this one
/// answer (as [`crate::store::Resolved::wasm`] and [`RunConfig::wasm`]).
pub fn is_for_wasm(manifest: &ImageManifest, config: Option<&ImageConfiguration>) -> bool {
    if is_wasm_artifact(manifest) {
        return true;
    }
    let Some(config) = config else {
        return false;
    };
    let program = config.config().as_ref().and_then(|c| {
        c.entrypoint()
            .as_ref()
            .and_then(|e| e.first())
            .or_else(|| c.cmd().as_ref().and_then(|c| c.first()))
    });
    program.is_some_and(|p| p.ends_with(".wasm")) || config.architecture().to_string() == "wasm"
}

/// Whether a layer's media type is a tarball this store unpacks.
pub fn is_tar_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// The layers' identities in the snapshot store: the config's diff ids for tarball layers,
/// the blob digests for Wasm modules (which are stored as they are).
pub fn diff_ids(
    manifest: &ImageManifest,
    config: Option<&ImageConfiguration>,
) -> Result<Vec<String>, ManifestError> {
    if is_wasm_artifact(manifest) {
        // A module is stored as a file named by its title, not unpacked: its identity covers
        // both, and cannot equal a tarball layer's diff id.
        return Ok(manifest
            .layers()
            .iter()
            .map(|l| {
                let id = format!("wasm\0{}\0{}", l.digest(), wasm_module_name(l));
                format!("sha256:{:x}", Sha256::digest(id.as_bytes()))
            })
            .collect());
    }
    let cfg_digest = manifest.config().digest().to_string();
    let Some(config) = config else {
        return Err(ManifestError::Invalid {
            what: "image config",
            digest: cfg_digest,
            reason: "missing".into(),
        });
    };
    let ids = config.rootfs().diff_ids();
    if ids.len() != manifest.layers().len() {
        return Err(ManifestError::Invalid {
            what: "image config",
            digest: cfg_digest,
            reason: format!(
                "{} diff ids for {} layers",
                ids.len(),
                manifest.layers().len()
            ),
        });
    }
    for l in manifest.layers() {
        let mt = l.media_type().to_string();
        if !is_tar_layer(&mt) {
            return Err(ManifestError::LayerType {
                digest: l.digest().to_string(),
                media_type: mt,
            });
        }
    }
    Ok(ids.clone())
}

/// The OCI ChainIDs of a layer stack: `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => format!(
                "sha256:{:x}",
                Sha256::digest(format!("{parent} {d}").as_bytes())
            ),
        };
        out.push(next);
    }
    out
}

/// Checks an image config's platform against `wanted`.
pub fn check_config_platform(
    digest: &str,
    config: &ImageConfiguration,
    wanted: &Platform,
) -> Result<(), ManifestError> {
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if wanted.matches(&os, &arch, config.variant().as_deref()) {
        return Ok(());
    }
    Err(ManifestError::WrongPlatform {
        digest: digest.to_owned(),
        found: format!("{os}/{arch}"),
        wanted: wanted.to_string(),
    })
}

/// The module file name a Wasm layer gets in its snapshot: the layer's
/// `org.opencontainers.image.title` if it is a plain file name, else `module.wasm`.
pub fn wasm_module_name(layer: &Descriptor) -> String {
    layer
        .annotations()
        .as_ref()
        .and_then(|a| a.get("org.opencontainers.image.title"))
        .filter(|t| {
            !t.is_empty()
                && *t != "."
                && *t != ".."
                && !t.contains('/')
                && !t.contains('\0')
                && t.len() <= 255
        })
        .cloned()
        .unwrap_or_else(|| "module.wasm".into())
}

/// How an image wants to be run: what a bundle takes from the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    /// The config's `User`, unresolved (`name`, `uid`, `uid:gid`, `name:group`).
    pub user: String,
    /// Whether the image is for the wasm runtime ([`is_for_wasm`]).
    pub wasm: bool,
}

impl RunConfig {
    /// What the config says; `wasm` is left for [`is_for_wasm`], which also sees the manifest.
    pub fn from_image(config: &ImageConfiguration) -> RunConfig {
        let mut rc = RunConfig::default();
        if let Some(c) = config.config() {
            rc.entrypoint = c.entrypoint().clone().unwrap_or_default();
            rc.cmd = c.cmd().clone().unwrap_or_default();
            rc.env = c.env().clone().unwrap_or_default();
            rc.working_dir = c.working_dir().clone().unwrap_or_default();
            rc.user = c.user().clone().unwrap_or_default();
        }
        rc
    }

    /// A Wasm artifact's: run its (first) module.
    pub fn wasm_artifact(manifest: &ImageManifest) -> RunConfig {
        let module = manifest
            .layers()
            .iter()
            .find(|l| WASM_LAYER_TYPES.contains(&l.media_type().to_string().as_str()))
            .map(wasm_module_name)
            .unwrap_or_else(|| "module.wasm".into());
        RunConfig {
            entrypoint: vec![format!("/{module}")],
            wasm: true,
            working_dir: "/".into(),
            ..RunConfig::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = format!("sha256:{:x}", Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(c[1], want);
    }

    #[test]
    fn wasm_layer_ids_cover_the_module_name_and_never_equal_its_digest() {
        let manifest = |title: &str| -> ImageManifest {
            serde_json::from_value(serde_json::json!({
                "schemaVersion": 2,
                "config": {"mediaType": WASM_CONFIG_TYPE, "digest": format!("sha256:{}", "c".repeat(64)), "size": 2},
                "layers": [{"mediaType": WASM_LAYER_TYPES[0], "digest": format!("sha256:{}", "d".repeat(64)), "size": 8,
                            "annotations": {"org.opencontainers.image.title": title}}]
            }))
            .unwrap()
        };
        let a = diff_ids(&manifest("a.wasm"), None).unwrap();
        let b = diff_ids(&manifest("b.wasm"), None).unwrap();
        assert_ne!(a, b, "same module, other name: other snapshot");
        assert_ne!(a[0], format!("sha256:{}", "d".repeat(64)));
        assert_eq!(
            RunConfig::wasm_artifact(&manifest("b.wasm")).entrypoint,
            ["/b.wasm"]
        );
        assert_eq!(
            wasm_module_name(&manifest("../x").layers()[0]),
            "module.wasm"
        );
    }

    #[test]
    fn one_decision_routes_images_to_wasm() {
        let manifest: ImageManifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{}", "c".repeat(64)), "size": 2},
            "layers": []
        }))
        .unwrap();
        let config = |arch: &str, cfg: serde_json::Value| -> ImageConfiguration {
            serde_json::from_value(serde_json::json!({
                "architecture": arch, "os": "linux", "config": cfg,
                "rootfs": {"type": "layers", "diff_ids": []}
            }))
            .unwrap()
        };
        let cases = [
            (
                "amd64",
                serde_json::json!({"Entrypoint": ["/app.wasm"]}),
                true,
            ),
            (
                "amd64",
                serde_json::json!({"Cmd": ["/app.wasm", "x"]}),
                true,
            ),
            // The program is the entrypoint's; a module as its argument is not a Wasm image.
            (
                "amd64",
                serde_json::json!({"Entrypoint": ["/bin/sh"], "Cmd": ["a.wasm"]}),
                false,
            ),
            ("amd64", serde_json::json!({"Cmd": ["/bin/sh"]}), false),
            ("wasm", serde_json::json!({"Cmd": ["/run"]}), true),
        ];
        for (arch, cfg, want) in cases {
            let c = config(arch, cfg.clone());
            assert_eq!(is_for_wasm(&manifest, Some(&c)), want, "{arch} {cfg}");
        }
        assert!(!is_for_wasm(&manifest, None));
    }

    #[test]
    fn platform_selection_names_what_exists() {
        let index: ImageIndex = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": MANIFEST_TYPES[0], "digest": format!("sha256:{}", "1".repeat(64)), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": MANIFEST_TYPES[0], "digest": format!("sha256:{}", "2".repeat(64)), "size": 10,
                 "platform": {"os": "linux", "architecture": "amd64"}}
            ]
        }))
        .unwrap();
        let amd = Platform::parse("linux/amd64").unwrap();
        assert_eq!(select_platform("x", &index, &amd).unwrap().size(), 10);
        let e = select_platform("x", &index, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux/s390x") && e.contains("linux/arm64/v8"),
            "{e}"
        );
        assert!(Platform::parse("linux").is_err());
    }
}
