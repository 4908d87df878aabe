//! Imports image archives read as a stream (gzip-compressed or not): OCI image layouts
//! (`oci-layout`, `index.json`, `blobs/sha256/…`: `skopeo copy oci-archive:`, `docker save`
//! since 25) and the classic `docker save` format (`manifest.json`, `<hex>.json` configs,
//! `<id>/layer.tar`), whose images get an OCI manifest made for them. Every blob is verified on
//! the way in; images are recorded only once all their content is stored and unpacked, and a
//! failed import's content is collected.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};

use oci_spec::image::ImageConfiguration;
use serde_json::json;

use crate::content::{ContentError, digest_hex};
use crate::oci::{self, MANIFEST_TYPES};
use crate::store::{ImageError, ImageStore, Lease, Progress, Report, Result, Target, normalize};

const OCI_CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// What an import found in an archive.
#[derive(Default)]
struct Archive {
    index: Option<Vec<u8>>,
    docker_manifest: Option<Vec<u8>>,
    /// Archive path → (digest, size) of files stored as blobs by content (docker format).
    files: HashMap<String, (String, u64)>,
    /// Archive path → the path a symlink entry points at (docker dedups layers with links).
    links: HashMap<String, String>,
}

fn bad(reason: impl Into<String>) -> ImageError {
    ImageError::Import(reason.into())
}

fn clean(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_end_matches('/')
        .to_owned()
}

impl ImageStore {
    /// Imports every image of the archive read from `input` into `ns`; `base_name` names
    /// images the archive only tags (`--name`). Returns the names stored.
    pub fn import(
        &self,
        ns: &str,
        input: impl Read,
        base_name: Option<&str>,
        report: Report<'_>,
    ) -> Result<Vec<String>> {
        let lease = self.lease();
        let r = self.import_inner(ns, input, base_name, &lease, report);
        drop(lease);
        // Failed or not, blobs the archive carried that no image references go (layouts that
        // tools rewrote in place, such as umoci's, keep their old manifests and configs).
        let _ = self.gc(&|_, _| true);
        r
    }

    fn import_inner(
        &self,
        ns: &str,
        input: impl Read,
        base_name: Option<&str>,
        lease: &Lease<'_>,
        report: Report<'_>,
    ) -> Result<Vec<String>> {
        let mut buffered = BufReader::with_capacity(1 << 16, input);
        let head = buffered
            .fill_buf()
            .map_err(|e| bad(format!("read the archive: {e}")))?;
        let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        let archive = self.read_archive(reader, lease, report)?;

        // (name, target) pairs to record.
        let mut images: Vec<(String, Target)> = Vec::new();
        if let Some(index) = &archive.index {
            let v: serde_json::Value = serde_json::from_slice(index)
                .map_err(|e| bad(format!("index.json is not JSON: {e}")))?;
            let manifests = v
                .get("manifests")
                .and_then(|m| m.as_array())
                .ok_or_else(|| bad("index.json has no manifests"))?;
            for (i, m) in manifests.iter().enumerate() {
                let target = Target {
                    media_type: m
                        .get("mediaType")
                        .and_then(|x| x.as_str())
                        .unwrap_or(MANIFEST_TYPES[0])
                        .to_owned(),
                    digest: m
                        .get("digest")
                        .and_then(|x| x.as_str())
                        .ok_or_else(|| bad(format!("index.json: manifests[{i}]: no digest")))?
                        .to_owned(),
                    size: m.get("size").and_then(|x| x.as_u64()).unwrap_or(0),
                };
                let ann = m.get("annotations");
                let name = ann
                    .and_then(|a| a.get("io.containerd.image.name"))
                    .or_else(|| ann.and_then(|a| a.get("org.opencontainers.image.ref.name")))
                    .and_then(|x| x.as_str());
                let name = image_name(name, base_name)
                    .map_err(|e| bad(format!("index.json: manifests[{i}]: {e}")))?;
                images.push((name, target));
            }
        } else if let Some(manifest) = &archive.docker_manifest {
            images = self.docker_images(&archive, manifest, base_name, lease)?;
        } else {
            return Err(bad(
                "not an image archive: it has neither index.json (OCI layout) nor manifest.json (docker save)",
            ));
        }
        if images.is_empty() {
            return Err(bad("the archive names no images"));
        }
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &images {
            if !seen.insert(name) {
                return Err(bad(format!(
                    "two images in the archive would be named {name} (name them apart, or import them separately)"
                )));
            }
        }

        // Check and unpack everything before recording anything.
        let wanted = self.platform().clone();
        let mut resolved = Vec::new();
        for (name, target) in &images {
            lease.add(&target.digest);
            if !self.content().exists(&target.digest) {
                return Err(bad(format!(
                    "image {name}: the archive lacks its manifest {}",
                    target.digest
                )));
            }
            let r = self.resolve(target, Some(&wanted)).map_err(|e| match e {
                ImageError::Content(ContentError::NotFound(d)) => {
                    bad(format!("image {name}: the archive lacks blob {d}"))
                }
                e => e,
            })?;
            if let Some(c) = &r.config {
                oci::check_config_platform(r.manifest.config().digest().as_ref(), c, &wanted)?;
            }
            for (d, expected) in &r.blobs {
                match self.content().size(d) {
                    None => {
                        return Err(bad(format!("image {name}: the archive lacks blob {d}")));
                    }
                    Some(actual) if actual != *expected => {
                        return Err(bad(format!(
                            "image {name}: blob {d} has {actual} bytes, its descriptor says {expected}"
                        )));
                    }
                    Some(_) => {}
                }
            }
            resolved.push(r);
        }
        for r in &resolved {
            self.unpack(r, lease, report)?;
        }
        #[cfg(debug_assertions)]
        fail::fail_point!("images.import.unpacked");
        let mut names = Vec::new();
        for (name, target) in images {
            self.put_record(ns, &name, target.clone(), &wanted.to_string())?;
            report(Progress::Stored {
                name: name.clone(),
                digest: target.digest,
            });
            names.push(name);
        }
        Ok(names)
    }

    fn read_archive(
        &self,
        reader: impl Read,
        lease: &Lease<'_>,
        report: Report<'_>,
    ) -> Result<Archive> {
        let mut a = Archive::default();
        // The same tar reader as layers: special entries capped, one idea of where headers are.
        let mut tar = crate::unpack::archive::Archive::new(reader);
        let corrupt = |e: std::io::Error| bad(format!("the archive is truncated or corrupt: {e}"));
        let refused = |e: crate::unpack::UnpackError| bad(format!("the archive: {e}"));
        let mut saw_file = false;
        while let Some(header) = tar.next_entry().map_err(refused)? {
            let path = clean(&header.name());
            let kind = header.kind;
            let mut entry = tar.data();
            if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = &header.link {
                    let t = String::from_utf8_lossy(target).into_owned();
                    let resolved = if kind.is_symlink() {
                        resolve_relative(&path, &t)
                    } else {
                        clean(&t)
                    };
                    a.links.insert(path, resolved);
                }
                continue;
            }
            if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
                continue;
            }
            let size = header.size;
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                let digest = format!("sha256:{hex}");
                digest_hex(&digest)
                    .map_err(|_| bad(format!("{path}: not named by a sha256 digest")))?;
                lease.add(&digest);
                if self.content().exists(&digest) {
                    report(Progress::Fetched {
                        digest,
                        cached: true,
                    });
                    continue;
                }
                let mut ingest = self.content().ingest(Some(&digest), Some(size))?;
                if ingest.offset() > 0 {
                    ingest.discard();
                    ingest = self.content().ingest(Some(&digest), Some(size))?;
                }
                if let Err(e) = copy_into(&mut entry, &mut ingest) {
                    // An import has no resume: its partial blob goes.
                    ingest.discard();
                    return Err(match e {
                        CopyError::Read(e) => corrupt(e),
                        CopyError::Write(e) => e.into(),
                    });
                }
                ingest.commit().map_err(|e| commit_error(&path, e))?;
                report(Progress::Fetched {
                    digest,
                    cached: false,
                });
            } else if path == "index.json" || path == "manifest.json" {
                if size > oci::MAX_METADATA_BYTES {
                    return Err(bad(format!("{path}: {size} bytes is too large")));
                }
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf).map_err(corrupt)?;
                if path == "index.json" {
                    a.index = Some(buf);
                } else {
                    a.docker_manifest = Some(buf);
                }
            } else if path.ends_with(".json") && !path.contains('/') || path.ends_with("/layer.tar")
            {
                // docker save: configs and layers are named by ids, not digests.
                let mut ingest = self.content().ingest(None, Some(size))?;
                copy_into(&mut entry, &mut ingest).map_err(|e| match e {
                    CopyError::Read(e) => corrupt(e),
                    CopyError::Write(e) => e.into(),
                })?;
                // Leased before it is named, so a collection running meanwhile keeps it.
                lease.add(&ingest.digest());
                let digest = ingest.commit().map_err(|e| commit_error(&path, e))?;
                report(Progress::Fetched {
                    digest: digest.clone(),
                    cached: false,
                });
                a.files.insert(path, (digest, size));
            }
            saw_file = true;
        }
        if !saw_file {
            return Err(bad("the archive is empty"));
        }
        // tar stops quietly at a truncated header block; a layout must still be complete, so
        // missing pieces are reported by the checks that follow.
        Ok(a)
    }

    fn docker_images(
        &self,
        a: &Archive,
        manifest: &[u8],
        base_name: Option<&str>,
        lease: &Lease<'_>,
    ) -> Result<Vec<(String, Target)>> {
        let entries: Vec<serde_json::Value> = serde_json::from_slice(manifest)
            .map_err(|e| bad(format!("manifest.json: not a docker save manifest: {e}")))?;
        let file = |p: &str| -> Result<(String, u64)> {
            let p = clean(p);
            let p = a.links.get(&p).cloned().unwrap_or(p);
            a.files
                .get(&p)
                .cloned()
                .ok_or_else(|| bad(format!("manifest.json names {p}, which the archive lacks")))
        };
        let mut out = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let cfg_path = e
                .get("Config")
                .and_then(|c| c.as_str())
                .ok_or_else(|| bad(format!("manifest.json: [{i}]: no Config")))?;
            let (cfg_digest, cfg_size) = file(cfg_path)?;
            let cfg_bytes = self.content().read(&cfg_digest, oci::MAX_METADATA_BYTES)?;
            ImageConfiguration::from_reader(cfg_bytes.as_slice())
                .map_err(|err| bad(format!("{cfg_path}: not an image config: {err}")))?;
            let mut layers = Vec::new();
            for l in e
                .get("Layers")
                .and_then(|l| l.as_array())
                .ok_or_else(|| bad(format!("manifest.json: [{i}]: no Layers")))?
            {
                let p = l
                    .as_str()
                    .ok_or_else(|| bad(format!("manifest.json: [{i}]: a layer is not a path")))?;
                let (digest, size) = file(p)?;
                layers.push(json!({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size}));
            }
            let m = json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPES[0],
                "config": {"mediaType": OCI_CONFIG_TYPE, "digest": cfg_digest, "size": cfg_size},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&m).map_err(|e| bad(e.to_string()))?;
            let digest = crate::content::sha256_digest(&bytes);
            lease.add(&digest);
            self.content().put(&digest, &bytes)?;
            let target = Target {
                media_type: MANIFEST_TYPES[0].into(),
                digest,
                size: bytes.len() as u64,
            };
            let tags: Vec<&str> = e
                .get("RepoTags")
                .and_then(|t| t.as_array())
                .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            if tags.is_empty() {
                let name = base_name.ok_or_else(|| {
                    bad(format!(
                        "manifest.json: [{i}] has no RepoTags: name it with --name"
                    ))
                })?;
                out.push((normalize(name)?, target));
            } else {
                for t in tags {
                    out.push((normalize(t)?, target.clone()));
                }
            }
        }
        Ok(out)
    }
}

/// The image name for an index entry's ref annotation: a full reference as it is, a bare tag
/// appended to `base` (`--name`).
fn image_name(annotation: Option<&str>, base: Option<&str>) -> std::result::Result<String, String> {
    let n = match (annotation, base) {
        (Some(a), Some(b)) if !a.contains(['/', ':', '@']) => format!("{b}:{a}"),
        (Some(a), _) => a.to_owned(),
        (None, Some(b)) => b.to_owned(),
        (None, None) => {
            return Err(
                "no image name (org.opencontainers.image.ref.name): name it with --name".into(),
            );
        }
    };
    normalize(&n).map_err(|e| e.to_string())
}

/// A symlink's target as an archive path.
fn resolve_relative(path: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn commit_error(path: &str, e: ContentError) -> ImageError {
    match e {
        ContentError::DigestMismatch { expected, actual } => bad(format!(
            "{path}: content hashes to {actual}, not {expected} (tampered or corrupt blob)"
        )),
        ContentError::SizeMismatch {
            expected, actual, ..
        } => bad(format!(
            "{path}: {actual} of {expected} bytes: the archive is truncated"
        )),
        e => e.into(),
    }
}

enum CopyError {
    Read(std::io::Error),
    Write(ContentError),
}

fn copy_into(
    r: &mut impl Read,
    w: &mut crate::content::Ingest,
) -> std::result::Result<(), CopyError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).map_err(CopyError::Read)?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_links() {
        assert_eq!(
            image_name(Some("1"), Some("busybox")).unwrap(),
            "docker.io/library/busybox:1"
        );
        assert_eq!(
            image_name(Some("127.0.0.1:5000/a/b:2"), Some("x")).unwrap(),
            "127.0.0.1:5000/a/b:2"
        );
        assert!(image_name(None, None).is_err());
        assert_eq!(
            resolve_relative("abc/layer.tar", "../def/layer.tar"),
            "def/layer.tar"
        );
    }
}
