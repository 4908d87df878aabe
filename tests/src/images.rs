//! Image fixtures: layers, OCI images and artifacts, image indexes, the archive formats
//! (`oci-layout` directory and tar, classic `docker save`), and a real registry
//! (distribution's `docker-registry`) on a private port to push them to, with a forwarder that
//! records which requests reached it ([`RecordingProxy`]).
//!
//! Everything is built in memory and deterministic (fixed mtimes, seeded data), so a digest
//! computed in a test is the same on every run. Layers, images and OCI layouts are
//! `switchyard_images::build`'s (the builder switchyardd makes its sandbox image with), wrapped
//! here so a fixture is a value, not a `Result`. Paths inside layers are relative (`bin/sh`); a
//! leading `/` given to a builder is dropped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use switchyard_images::build::{self, oci_layout_files};
pub use switchyard_images::build::{
    Blob, CREATED, EntryKind, Image, MTIME, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST,
    REF_NAME, TarEntry,
};
pub use switchyard_images::content::sha256_digest;

pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
pub const TITLE: &str = "org.opencontainers.image.title";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes` in hex: what the tests name shared files by.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// Layers: `switchyard_images::build`'s, which fail only on input a fixture never has.

/// A plain (uncompressed) tar of `entries`, in order.
pub fn layer_tar(entries: &[TarEntry]) -> Vec<u8> {
    build::layer_tar(entries).expect("layer tar")
}

/// gzip at the default level.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    build::gzip(bytes).expect("gzip")
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    build::gunzip(bytes).expect("gunzip")
}

/// A tar.gz whose single regular-file entry is named exactly `path` (`../../etc/passwd`,
/// `/etc/shadow`, ...), bypassing the tar crate's path checks. At most 100 bytes (no
/// long-name extension).
pub fn layer_with_raw_path(path: &str, data: &[u8]) -> Vec<u8> {
    assert!(
        path.len() <= 100,
        "raw tar names are limited to 100 bytes: {path}"
    );
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(data.len() as u64);
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(data);
    tar.resize(tar.len().next_multiple_of(512) + 1024, 0);
    gzip(&tar)
}

/// The entries of a tar (plain or gzipped): raw path bytes, as written.
pub fn tar_paths(layer: &[u8]) -> Vec<String> {
    let plain = if layer.starts_with(&[0x1f, 0x8b]) {
        gunzip(layer)
    } else {
        layer.to_vec()
    };
    let mut a = tar::Archive::new(plain.as_slice());
    a.entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect()
}

/// The busybox applets [`busybox_base_layer`] links in `/bin`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "env", "pwd", "sleep", "true", "false", "hostname", "wc",
    "head", "wget",
];

/// The host's busybox-static.
pub fn host_busybox() -> PathBuf {
    crate::busybox_binary()
        .expect("busybox (apt-get install busybox-static)")
        .to_owned()
}

/// A base layer (tar.gz): the host's static busybox as `/bin/busybox` with applet symlinks
/// ([`BUSYBOX_APPLETS`]), `/etc/passwd` and `/etc/group` with `root` and `app` (1000:1000,
/// home `/home/app`), `/tmp` (1777), `/root` (0700), and empty `/proc`, `/sys`, `/dev`,
/// `/run` mount points. Built once per process.
pub fn busybox_base_layer() -> Vec<u8> {
    static LAYER: OnceLock<Vec<u8>> = OnceLock::new();
    LAYER
        .get_or_init(|| {
            let busybox = std::fs::read(host_busybox()).unwrap();
            let mut entries = vec![
                TarEntry::dir("bin", 0o755),
                TarEntry::file("bin/busybox", 0o755, busybox),
            ];
            for a in BUSYBOX_APPLETS {
                entries.push(TarEntry::symlink(&format!("bin/{a}"), "busybox"));
            }
            entries.extend([
                TarEntry::dir("etc", 0o755),
                TarEntry::file(
                    "etc/passwd",
                    0o644,
                    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
                ),
                TarEntry::file("etc/group", 0o644, "root:x:0:\napp:x:1000:\n"),
                TarEntry::dir("home", 0o755),
                TarEntry::dir("home/app", 0o755).owner(1000, 1000),
                TarEntry::dir("root", 0o700),
                TarEntry::dir("tmp", 0o1777),
                TarEntry::dir("proc", 0o555),
                TarEntry::dir("sys", 0o555),
                TarEntry::dir("dev", 0o755),
                TarEntry::dir("run", 0o755),
            ]);
            gzip(&layer_tar(&entries))
        })
        .clone()
}

/// A tar.gz of `files` files of `file_bytes` pseudo-random (incompressible) bytes each, at
/// `data/<seed>/file-<i>`. The same arguments give the same bytes; compressed at the
/// fastest level, since the data does not compress anyway.
pub fn random_layer(seed: u64, files: usize, file_bytes: usize) -> Vec<u8> {
    let mut state = seed ^ 0x5eed_5eed_5eed_5eed;
    let mut entries = vec![
        TarEntry::dir("data", 0o755),
        TarEntry::dir(&format!("data/{seed}"), 0o755),
    ];
    for i in 0..files {
        let mut data = Vec::with_capacity(file_bytes.next_multiple_of(8));
        while data.len() < file_bytes {
            data.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        data.truncate(file_bytes);
        entries.push(TarEntry::file(
            &format!("data/{seed}/file-{i}"),
            0o644,
            data,
        ));
    }
    build::gzip_level(&layer_tar(&entries), flate2::Compression::fast()).expect("gzip")
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Images, artifacts, indexes

/// An OCI image of gzipped `layers` (bottom first) for linux/`arch`; `config` is the image
/// config's `config` object (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`, ...).
pub fn image(layers: Vec<Vec<u8>>, config: Value, arch: &str) -> Image {
    let platform = switchyard_images::Platform {
        os: "linux".to_owned(),
        architecture: arch.to_owned(),
        variant: None,
    };
    build::image(layers, config, &platform).expect("image")
}

/// The common case: [`busybox_base_layer`] plus `extra` layers (gzipped), with `config`.
pub fn busybox_image(extra: Vec<Vec<u8>>, config: Value) -> Image {
    let mut layers = vec![busybox_base_layer()];
    layers.extend(extra);
    image(layers, config, "amd64")
}

/// A Wasm OCI artifact as the CNCF TAG Runtime spec (and `wasm-to-oci`, runwasi) lay it out:
/// config `application/vnd.wasm.config.v0+json`, one layer
/// `application/vnd.wasm.content.layer.v1+wasm` with the raw module, titled `title`.
pub fn wasm_artifact(module: &[u8], title: &str) -> Image {
    let layer = Blob::new(WASM_LAYER, module.to_vec());
    let config = Blob::json(
        WASM_CONFIG,
        &json!({
            "created": CREATED,
            "author": "switchyard-tests",
            "architecture": "wasm",
            "os": "wasip1",
            "layerDigests": [layer.digest],
        }),
    );
    let mut layer_desc = layer.descriptor();
    layer_desc["annotations"] = json!({ TITLE: title });
    let manifest = build::manifest(&config, vec![layer_desc]);
    Image {
        config,
        layers: vec![layer],
        manifest,
    }
}

/// An OCI image index over `(image, os, arch)` entries.
pub fn index(entries: &[(&Image, &str, &str)]) -> Blob {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(img, os, arch)| {
            let mut d = img.manifest.descriptor();
            d["platform"] = json!({"os": os, "architecture": arch});
            d
        })
        .collect();
    Blob::json(
        OCI_INDEX,
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
    )
}

// ---------------------------------------------------------------------------------------------
// Archives

/// Writes an OCI image layout into `dir` (created if missing).
pub fn write_oci_layout(dir: &Path, refs: &[(&str, &Image)]) {
    for (rel, bytes) in oci_layout_files(refs) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// The same layout as a tar archive (what `skopeo copy ... oci-archive:` writes; `docker
/// save` from 25 on writes this plus the classic files).
pub fn oci_layout_tar(refs: &[(&str, &Image)]) -> Vec<u8> {
    build::oci_layout_tar(refs).expect("layout tar")
}

/// The classic `docker save` archive (docker 24 and older): `manifest.json`, `<hex>.json`
/// configs, `<id>/layer.tar` (uncompressed) with `<id>/VERSION` and `<id>/json` per layer,
/// and `repositories`. `refs` are `repo:tag` names; one image under several names is written
/// once with all its RepoTags. Layer ids are derived from the chain (parent id + diff_id), as
/// docker's v1 ids are, so a shared base layer is one directory.
pub fn docker_save_tar(refs: &[(&str, &Image)]) -> Vec<u8> {
    let mut files = BTreeMap::new();
    let mut manifest: Vec<Value> = Vec::new();
    let mut by_config: BTreeMap<String, usize> = BTreeMap::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, img) in refs {
        let (repo, tag) = split_repo_tag(name);
        let mut parent: Option<String> = None;
        let mut layer_paths = Vec::new();
        for (i, l) in img.layers.iter().enumerate() {
            let tar = gunzip(&l.bytes);
            let diff_id = sha256_digest(&tar);
            let id = hex(&Sha256::digest(
                format!("{}\n{diff_id}", parent.as_deref().unwrap_or("")).as_bytes(),
            ));
            let mut v1 = json!({"id": id, "created": CREATED, "os": "linux"});
            if let Some(p) = &parent {
                v1["parent"] = json!(p);
            }
            if i + 1 == img.layers.len() {
                let cfg: Value = serde_json::from_slice(&img.config.bytes).unwrap();
                v1["config"] = cfg["config"].clone();
                v1["architecture"] = cfg["architecture"].clone();
            }
            files.insert(format!("{id}/VERSION"), b"1.0".to_vec());
            files.insert(format!("{id}/json"), serde_json::to_vec(&v1).unwrap());
            files.insert(format!("{id}/layer.tar"), tar);
            layer_paths.push(format!("{id}/layer.tar"));
            parent = Some(id);
        }
        let config_file = format!("{}.json", img.config.hex());
        files.insert(config_file.clone(), img.config.bytes.clone());
        if let Some(top) = parent {
            repositories
                .entry(repo.to_owned())
                .or_default()
                .insert(tag.to_owned(), top);
        }
        match by_config.get(&config_file) {
            Some(&i) => manifest[i]["RepoTags"]
                .as_array_mut()
                .unwrap()
                .push(json!(name)),
            None => {
                by_config.insert(config_file.clone(), manifest.len());
                manifest.push(json!({
                    "Config": config_file,
                    "RepoTags": [name],
                    "Layers": layer_paths,
                }));
            }
        }
    }
    files.insert(
        "manifest.json".to_owned(),
        serde_json::to_vec(&manifest).unwrap(),
    );
    files.insert(
        "repositories".to_owned(),
        serde_json::to_vec(&repositories).unwrap(),
    );
    build::files_tar(files).expect("archive")
}

/// `repo:tag` → (repo, tag); the tag is after the last `:` that follows the last `/`
/// (`localhost:5000/a/b:1`); `latest` when there is none.
pub fn split_repo_tag(name: &str) -> (&str, &str) {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].rfind(':') {
        Some(i) => (&name[..slash + i], &name[slash + i + 1..]),
        None => (name, "latest"),
    }
}

// ---------------------------------------------------------------------------------------------
// Registry

/// A distribution v2 registry (`docker-registry`, Debian's package of distribution 2.8) on
/// `127.0.0.1:<free port>`, storing in a temporary directory. Plain HTTP (clients need
/// `--tls-verify=false` or an insecure-registry setting). Killed and reaped on drop.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    agent: ureq::Agent,
    auth: Option<(String, String)>,
}

impl Registry {
    /// A registry without authentication.
    pub fn start() -> Registry {
        Registry::launch(None)
    }

    /// A registry that requires HTTP basic authentication as `user`/`pass` (htpasswd, bcrypt).
    /// Pushes from this handle send the credentials.
    pub fn start_with_auth(user: &str, pass: &str) -> Registry {
        Registry::launch(Some((user.to_owned(), pass.to_owned())))
    }

    fn launch(auth: Option<(String, String)>) -> Registry {
        let binary = crate::which("docker-registry")
            .expect("docker-registry on PATH (apt-get install docker-registry)");
        let dir = tempfile::Builder::new()
            .prefix("switchyard-registry-")
            .tempdir()
            .unwrap();
        let auth_section = match &auth {
            Some((user, pass)) => {
                let hash = bcrypt::hash(pass, 5).unwrap();
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: switchyard-tests\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        // The port is picked by binding :0 and released before the registry binds it, so
        // another process can take it in between; then the registry exits and we retry.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: 127.0.0.1:{port}\n\
                     {auth_section}",
                    dir.path().join("storage").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let host = format!("127.0.0.1:{port}");
            let up = crate::eventually(Duration::from_secs(20), || {
                if child.try_wait().ok().flatten().is_some() {
                    return true;
                }
                let url = format!("http://{host}/v2/");
                matches!(
                    http(&agent, auth.as_ref(), "GET", &url, None, &[]),
                    Ok((200, _, _))
                )
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return Registry {
                    child,
                    port,
                    dir,
                    agent,
                    auth,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        }
        panic!("docker-registry did not come up; its log:\n{last_log}");
    }

    /// The registry process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT/repo:tag`, the name pull clients take.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host())
    }

    /// The registry's storage root (`docker/registry/v2/...` inside).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Uploads a blob (monolithic: POST an upload, PUT its location with the digest),
    /// unless the repository already has it.
    pub fn push_blob(&self, repo: &str, blob: &Blob) {
        let head = format!("/v2/{repo}/blobs/{}", blob.digest);
        if matches!(self.request("HEAD", &head, None, &[]), Ok((200, _, _))) {
            return;
        }
        let (status, location, body) = self
            .request("POST", &format!("/v2/{repo}/blobs/uploads/"), None, &[])
            .unwrap_or_else(|e| panic!("POST upload for {repo}: {e}"));
        assert_eq!(status, 202, "POST upload for {repo}: {}", text(&body));
        let location = location.expect("upload Location");
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", blob.digest);
        let (status, _, body) = self
            .request("PUT", &url, Some("application/octet-stream"), &blob.bytes)
            .unwrap_or_else(|e| panic!("PUT blob {}: {e}", blob.digest));
        assert_eq!(
            status,
            201,
            "PUT blob {} to {repo}: {}",
            blob.digest,
            text(&body)
        );
    }

    /// PUTs a manifest or index under `reference` (a tag or its digest), with its media
    /// type as Content-Type. The blobs it names must be there already.
    pub fn push_manifest(&self, repo: &str, reference: &str, manifest: &Blob) {
        let (status, _, body) = self
            .request(
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                Some(&manifest.media_type),
                &manifest.bytes,
            )
            .unwrap_or_else(|e| panic!("PUT manifest {repo}:{reference}: {e}"));
        assert_eq!(
            status,
            201,
            "PUT manifest {repo}:{reference}: {}",
            text(&body)
        );
    }

    /// Pushes an image's blobs and its manifest as `repo:tag`.
    pub fn push(&self, repo: &str, tag: &str, image: &Image) {
        for b in image.blobs() {
            self.push_blob(repo, b);
        }
        self.push_manifest(repo, tag, &image.manifest);
    }

    /// Pushes `images` by digest and then `index` (naming them) as `repo:tag`.
    pub fn push_index(&self, repo: &str, tag: &str, index: &Blob, images: &[&Image]) {
        for img in images {
            self.push(repo, img.digest(), img);
        }
        self.push_manifest(repo, tag, index);
    }

    /// GET `path` (like `/v2/busybox/manifests/1`) with `Accept` for OCI and docker
    /// manifests and indexes: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let (status, _, body) = self
            .request("GET", path, None, &[])
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (status, body)
    }

    /// Corrupts a stored blob in place (every byte of it inverted, length kept), so it no
    /// longer matches `digest`. Blobs are stored once per registry, so this affects every
    /// repository that shares the blob.
    pub fn tamper_blob(&self, digest: &str) {
        let hex = digest.trim_start_matches("sha256:");
        let path = self
            .storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        for b in &mut bytes {
            *b = !*b;
        }
        std::fs::write(&path, bytes).unwrap();
    }

    /// One HTTP request to the registry: (status, Location, body). `path` may be a full URL
    /// (upload locations are).
    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(u16, Option<String>, Vec<u8>), ureq::Error> {
        let url = if path.starts_with("http://") {
            path.to_owned()
        } else {
            format!("http://{}{path}", self.host())
        };
        let (status, location, body) = http(
            &self.agent,
            self.auth.as_ref(),
            method,
            &url,
            content_type,
            body,
        )?;
        let location = location.map(|l| {
            if l.starts_with('/') {
                format!("http://{}{l}", self.host())
            } else {
                l
            }
        });
        Ok((status, location, body))
    }
}

type Response = (u16, Option<String>, Vec<u8>);

/// One HTTP request: (status, Location as sent, body). Accepts OCI and docker manifests
/// and indexes; sends basic auth when given.
fn http(
    agent: &ureq::Agent,
    auth: Option<&(String, String)>,
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response, ureq::Error> {
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header(
            "Accept",
            [
                OCI_MANIFEST,
                OCI_INDEX,
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
            ]
            .join(", "),
        );
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    if let Some((user, pass)) = auth {
        req = req.header(
            "Authorization",
            format!("Basic {}", base64(format!("{user}:{pass}").as_bytes())),
        );
    }
    let req = req.body(body.to_vec()).unwrap();
    let mut resp = agent.run(req)?;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = if method == "HEAD" {
        Vec::new()
    } else {
        resp.body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()?
    };
    Ok((status, location, body))
}

/// A second `docker-registry` serving a [`Registry`]'s storage over HTTPS (what was pushed to
/// the plain one is pulled here). Killed and reaped on drop.
pub struct TlsRegistry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRegistry {
    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Serves this registry's storage over HTTPS with `cert` and `key` (PEM files), on a port
    /// of its own: up once it accepts connections.
    pub fn serve_tls(&self, cert: &Path, key: &Path) -> TlsRegistry {
        let binary = crate::which("docker-registry").expect("docker-registry on PATH");
        let dir = tempfile::Builder::new()
            .prefix("switchyard-registry-tls-")
            .tempdir()
            .unwrap();
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = dead_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                    self.storage_dir().display(),
                    cert.display(),
                    key.display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let up = crate::eventually(Duration::from_secs(20), || {
                child.try_wait().ok().flatten().is_some()
                    || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return TlsRegistry {
                    child,
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        }
        panic!("docker-registry (TLS) did not come up; its log:\n{last_log}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A recording forwarder

/// A loopback HTTP/1.1 forwarder to `upstream` (a [`Registry`]'s `host()`) that records the
/// request line of everything it forwards, so a test sees which endpoint a client talked to
/// and for what. One request per connection: it asks upstream to close after the answer and
/// copies the answer back until then. Requests with a body are not supported (pulls send
/// none). Stops on drop.
pub struct RecordingProxy {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RecordingProxy {
    pub fn start(upstream: &str) -> RecordingProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (rq, st, up) = (requests.clone(), stop.clone(), upstream.to_owned());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (rq, up) = (rq.clone(), up.clone());
                std::thread::spawn(move || forward(conn, &up, &rq));
            }
        });
        RecordingProxy {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The request lines forwarded so far (`GET /v2/app/manifests/1?ns=... HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Forwards one request on `client` to `upstream` and the answer back.
fn forward(mut client: std::net::TcpStream, upstream: &str, log: &std::sync::Mutex<Vec<String>>) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) if head.len() < 64 << 10 => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let Some(request_line) = lines.next() else {
        return;
    };
    log.lock().unwrap().push(request_line.to_owned());
    let mut out = format!("{request_line}\r\n");
    for l in lines {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    let Ok(mut up) = std::net::TcpStream::connect(upstream) else {
        return;
    };
    if up.write_all(out.as_bytes()).is_err() {
        return;
    }
    let _ = std::io::copy(&mut up, &mut client);
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback port nothing listens on (bound, then released): connections are refused.
pub fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
