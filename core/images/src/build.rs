//! Images built in memory: layer tars from a list of entries, an OCI image (config, layers,
//! manifest) over them, and the OCI image layout tar that [`ImageStore::import`] reads.
//! switchyardd builds its default sandbox image this way ([`pause_image`]), and the test kit
//! (`tests/src/images.rs`) builds its fixtures on it.
//!
//! Everything is deterministic: every tar entry has the same mtime, configs the same `created`
//! time, layouts list their files sorted, so the same input gives the same digests on every run
//! and machine. Paths inside layers are relative (`bin/sh`); a leading `/` is dropped.
//!
//! [`ImageStore::import`]: crate::ImageStore::import

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use serde_json::{Value, json};

use crate::content::sha256_digest;
use crate::oci::Platform;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The index annotation that names an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The `created` time written into configs.
pub const CREATED: &str = "2024-01-01T00:00:00Z";
/// The mtime of every tar entry ([`CREATED`]).
pub const MTIME: u64 = 1_704_067_200;

/// Content plus its media type and digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    /// `sha256:<hex>`
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// `value` as compact JSON.
    pub fn json(media_type: &str, value: &Value) -> Blob {
        Blob::new(media_type, value.to_string().into_bytes())
    }

    /// The hex part of the digest.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// An OCI descriptor (mediaType, digest, size).
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// An image (or artifact): config, layers and the manifest that names them.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// The OCI image manifest JSON.
    pub manifest: Blob,
}

impl Image {
    /// The manifest digest, which is what a registry or layout calls the image.
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    /// Config and layers (not the manifest).
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// What one tar entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    /// A hard link to an earlier entry of the same layer (its path).
    Hardlink(String),
}

/// One entry of a layer tar. Build with [`TarEntry::file`] and friends; whiteouts are the
/// empty files OCI layers use (`.wh.<name>`, `.wh..wh..opq`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

impl TarEntry {
    fn new(path: &str, kind: EntryKind, mode: u32) -> TarEntry {
        TarEntry {
            path: path.trim_start_matches('/').to_owned(),
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> TarEntry {
        TarEntry::new(path, EntryKind::File(data.into()), mode)
    }

    pub fn dir(path: &str, mode: u32) -> TarEntry {
        TarEntry::new(path, EntryKind::Dir, mode)
    }

    pub fn symlink(path: &str, target: &str) -> TarEntry {
        TarEntry::new(path, EntryKind::Symlink(target.to_owned()), 0o777)
    }

    /// `path` becomes a hard link to `target` (a path in the same layer, like `bin/busybox`).
    pub fn hardlink(path: &str, target: &str) -> TarEntry {
        let target = target.trim_start_matches('/').to_owned();
        TarEntry::new(path, EntryKind::Hardlink(target), 0o644)
    }

    /// Deletes `path` from the layers below (`dir/.wh.name`).
    pub fn whiteout(path: &str) -> TarEntry {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let wh = match path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{path}"),
        };
        TarEntry::file(&wh, 0o644, Vec::new())
    }

    /// Hides everything the layers below have in `dir` (`dir/.wh..wh..opq`).
    pub fn opaque_whiteout(dir: &str) -> TarEntry {
        let dir = dir.trim_start_matches('/').trim_end_matches('/');
        TarEntry::file(&format!("{dir}/.wh..wh..opq"), 0o644, Vec::new())
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> TarEntry {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

/// A plain (uncompressed) tar of `entries`, in order. Fails on a path tar cannot hold (one
/// with `..`).
pub fn layer_tar(entries: &[TarEntry]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(MTIME);
        match &e.kind {
            EntryKind::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &e.path, data.as_slice())?;
            }
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{}/", e.path), io::empty())?;
            }
            EntryKind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &e.path, target)?;
            }
            EntryKind::Hardlink(target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &e.path, target)?;
            }
        }
    }
    b.into_inner()
}

/// gzip at the default level.
pub fn gzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
    gzip_level(bytes, flate2::Compression::default())
}

pub fn gzip_level(bytes: &[u8], level: flate2::Compression) -> io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
    e.write_all(bytes)?;
    e.finish()
}

pub fn gunzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

/// An OCI image of gzipped `layers` (bottom first) for `platform`. `config` is the image
/// config's `config` object (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`, ...); the
/// diff_ids are computed from the layers. Fails where a layer is not gzip.
pub fn image(layers: Vec<Vec<u8>>, config: Value, platform: &Platform) -> io::Result<Image> {
    let diff_ids = layers
        .iter()
        .map(|l| Ok(sha256_digest(&gunzip(l)?)))
        .collect::<io::Result<Vec<String>>>()?;
    let mut config = json!({
        "created": CREATED,
        "architecture": platform.architecture,
        "os": platform.os,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layers.iter().map(|_| json!({"created": CREATED, "created_by": "switchyard"})).collect::<Vec<_>>(),
    });
    if let Some(v) = &platform.variant {
        config["variant"] = json!(v);
    }
    let config = Blob::json(OCI_CONFIG, &config);
    let layers: Vec<Blob> = layers
        .into_iter()
        .map(|l| Blob::new(OCI_LAYER_GZIP, l))
        .collect();
    let manifest = manifest(&config, layers.iter().map(Blob::descriptor).collect());
    Ok(Image {
        config,
        layers,
        manifest,
    })
}

/// An OCI image manifest naming `config` and the layers `layers` describes (descriptors, which
/// may carry annotations).
pub fn manifest(config: &Blob, layers: Vec<Value>) -> Blob {
    Blob::json(
        OCI_MANIFEST,
        &json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers,
        }),
    )
}

/// Kubernetes' pause image around `binary` (a static executable): `/pause` (0755) alone in
/// one layer, its entrypoint, run as 65535:65535 as the upstream image is.
pub fn pause_image(binary: Vec<u8>, platform: &Platform) -> io::Result<Image> {
    let layer = gzip(&layer_tar(&[TarEntry::file("pause", 0o755, binary)])?)?;
    image(
        vec![layer],
        json!({"Entrypoint": ["/pause"], "User": "65535:65535"}),
        platform,
    )
}

/// The files of an OCI image layout (relative path, bytes): `oci-layout`, `index.json`
/// naming each image by `org.opencontainers.image.ref.name` = the given name, and every blob
/// once under `blobs/sha256/`.
pub fn oci_layout_files(refs: &[(&str, &Image)]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert(
        "oci-layout".to_owned(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let mut manifests = Vec::new();
    for (name, img) in refs {
        let mut d = img.manifest.descriptor();
        d["annotations"] = json!({ REF_NAME: name });
        manifests.push(d);
        for b in img.blobs().chain([&img.manifest]) {
            files.insert(format!("blobs/sha256/{}", b.hex()), b.bytes.clone());
        }
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    files.insert("index.json".to_owned(), index.to_string().into_bytes());
    files
}

/// The same layout as a tar archive (what `skopeo copy ... oci-archive:` writes; `docker
/// save` from 25 on writes this plus the classic files).
pub fn oci_layout_tar(refs: &[(&str, &Image)]) -> io::Result<Vec<u8>> {
    files_tar(oci_layout_files(refs))
}

/// A tar of `files` (relative path → bytes) with their directories, regular files 0644.
pub fn files_tar(files: BTreeMap<String, Vec<u8>>) -> io::Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    for rel in files.keys() {
        let mut p = rel.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_owned());
            p = parent;
        }
    }
    let mut entries: Vec<TarEntry> = dirs.iter().map(|d| TarEntry::dir(d, 0o755)).collect();
    entries.extend(files.into_iter().map(|(p, b)| TarEntry::file(&p, 0o644, b)));
    layer_tar(&entries)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pause_image_is_one_executable_run_as_65535_and_deterministic() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        let img = pause_image(b"\x7fELF...".to_vec(), &p).unwrap();
        assert_eq!(
            img.digest(),
            pause_image(b"\x7fELF...".to_vec(), &p).unwrap().digest()
        );
        let cfg: Value = serde_json::from_slice(&img.config.bytes).unwrap();
        assert_eq!(cfg["config"]["Entrypoint"], json!(["/pause"]));
        assert_eq!(cfg["config"]["User"], json!("65535:65535"));
        assert_eq!(
            (&cfg["os"], &cfg["architecture"], &cfg["variant"]),
            (&json!("linux"), &json!("arm64"), &json!("v8"))
        );
        assert_eq!(img.layers.len(), 1);
        let tar = gunzip(&img.layers[0].bytes).unwrap();
        assert_eq!(
            cfg["rootfs"]["diff_ids"],
            json!([sha256_digest(&tar)]),
            "diff_id is the plain tar's"
        );
        let mut a = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, u32, Vec<u8>)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let mode = e.header().mode().unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, mode, data)
            })
            .collect();
        assert_eq!(entries, [("pause".into(), 0o755, b"\x7fELF...".to_vec())]);
    }

    #[test]
    fn a_layout_names_each_image_and_holds_every_blob_once() {
        let img = pause_image(vec![1, 2, 3], &Platform::host()).unwrap();
        let files = oci_layout_files(&[("a.example/p:1", &img), ("a.example/p:2", &img)]);
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let names: Vec<&Value> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| &m["annotations"][REF_NAME])
            .collect();
        assert_eq!(names, [&json!("a.example/p:1"), &json!("a.example/p:2")]);
        for b in img.blobs().chain([&img.manifest]) {
            assert_eq!(files[&format!("blobs/sha256/{}", b.hex())], b.bytes);
        }
        assert_eq!(files.len(), 2 + 3, "oci-layout, index.json and three blobs");
    }

    #[test]
    fn a_path_tar_cannot_hold_is_an_error_not_a_panic() {
        assert!(layer_tar(&[TarEntry::file("../x", 0o644, b"x".to_vec())]).is_err());
        assert!(image(vec![b"not gzip".to_vec()], json!({}), &Platform::host()).is_err());
    }
}
