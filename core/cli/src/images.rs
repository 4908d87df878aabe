//! `yard pull`, `yard images`, `yard rmi`, `yard image import|prune`: thin clients of the
//! daemon's image service, plus the registry credentials a pull sends (from `--user` with
//! `--password-stdin` or `USER:PASSWORD`, or the docker-style `config.json`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use switchyard_api::switchyard::images::v1 as api;

use crate::client::{Client, rpc};

/// Human-readable bytes (`12.3 MiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// The registry host of a reference, as docker keys its credentials.
fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first.to_owned(),
        _ => "docker.io".to_owned(),
    }
}

/// Credentials for `registry` from a docker-style config (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`): `auths.<registry>.auth` (base64 `user:password`).
fn config_credentials(registry: &str) -> anyhow::Result<Option<(String, String)>> {
    use base64::Engine;
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(h) => Path::new(&h).join(".docker/config.json"),
            None => return Ok(None),
        },
    };
    let Ok(text) = std::fs::read(&path) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let keys: Vec<String> = if registry == "docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![
            registry.to_owned(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    for k in keys {
        let Some(entry) = auths.get(&k) else { continue };
        let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) else {
            continue;
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .with_context(|| format!("{}: auths.{k}.auth is not base64", path.display()))?;
        let s = String::from_utf8(decoded)
            .with_context(|| format!("{}: auths.{k}.auth is not text", path.display()))?;
        let Some((u, p)) = s.split_once(':') else {
            bail!("{}: auths.{k}.auth is not user:password", path.display());
        };
        return Ok(Some((u.to_owned(), p.to_owned())));
    }
    Ok(None)
}

/// Shows a pull's or import's progress: one bar per blob on a terminal, nothing otherwise.
struct Bars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    quiet: bool,
}

impl Bars {
    fn new(quiet: bool) -> Bars {
        let multi = MultiProgress::with_draw_target(if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        Bars {
            multi,
            bars: HashMap::new(),
            quiet,
        }
    }

    fn bar(&mut self, digest: &str, total: u64) -> &ProgressBar {
        let multi = &self.multi;
        self.bars.entry(digest.to_owned()).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(short(digest).to_owned());
            b
        })
    }

    fn update(&mut self, p: &api::Progress) {
        match p.phase.as_str() {
            "fetch" => {
                let b = self.bar(&p.digest, p.total);
                b.set_length(p.total);
                b.set_position(p.current);
            }
            "fetched" | "cached" => {
                let msg = if p.phase == "cached" {
                    "exists"
                } else {
                    "done"
                };
                let b = self.bar(&p.digest, 0);
                if let Some(len) = b.length() {
                    b.set_position(len);
                }
                b.finish_with_message(msg);
            }
            "unpack" => {
                let b = self.bar(&p.digest, 0);
                b.set_message("unpacking");
            }
            // Which endpoint (the registry or a mirror of its hosts.toml) resolved the name.
            "source" if !self.quiet => {
                let _ = self.multi.println(format!("{}: from {}", p.name, p.digest));
            }
            "resolved" if !self.quiet => {
                let _ = self.multi.println(format!(
                    "{}: {} layers, {}",
                    p.name,
                    p.current,
                    bytes(p.total)
                ));
            }
            _ => {}
        }
    }

    fn finish(&self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.finish();
            }
        }
        let _ = self.multi.clear();
    }
}

/// Drains a progress stream; returns the names of the images stored.
async fn follow(
    mut stream: tonic::Streaming<api::Progress>,
    what: &str,
    quiet: bool,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut bars = Bars::new(quiet);
    let mut stored = Vec::new();
    let result = loop {
        match stream.next().await {
            Some(Ok(p)) => {
                if p.phase == "stored" {
                    stored.push((p.name.clone(), p.digest.clone()));
                }
                bars.update(&p);
            }
            Some(Err(s)) => break Err(rpc(what)(s)),
            None => break Ok(()),
        }
    };
    bars.finish();
    result?;
    if stored.is_empty() {
        bail!("{what}: the daemon stored no image");
    }
    Ok(stored)
}

#[derive(Args)]
pub struct PullArgs {
    /// Image reference, e.g. busybox:1.36 or 127.0.0.1:5000/app:1.
    reference: String,
    /// Platform to pick from a multi-platform image (os/arch[/variant]).
    #[arg(long)]
    platform: Option<String>,
    /// Registry credentials: USER with --password-stdin, or USER:PASSWORD (seen by other
    /// users in the process list; a warning says so). Default: the docker config's, if any.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Read the registry password from stdin (one line), as `docker login` does.
    #[arg(long, requires = "user")]
    password_stdin: bool,
    /// Use HTTP instead of HTTPS (registries on loopback always use HTTP).
    #[arg(long)]
    plain_http: bool,
    /// No progress bars.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import an OCI layout or `docker save` tarball (gzipped or not; - for stdin).
    Import {
        file: PathBuf,
        /// Name for images the archive only tags (or does not name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List images.
    Ls {
        #[arg(long)]
        json: bool,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Remove images.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Collect content and snapshots no image or container uses.
    Prune,
}

impl ImageCommand {
    pub async fn run(self, client: &Client) -> anyhow::Result<()> {
        match self {
            ImageCommand::Import { file, name, quiet } => import(client, &file, name, quiet).await,
            ImageCommand::Ls { json, quiet } => list(client, json, quiet).await,
            ImageCommand::Rm { names } => remove(client, names).await,
            ImageCommand::Prune => prune(client).await,
        }
    }
}

/// The longest password `--password-stdin` takes.
const MAX_PASSWORD: u64 = 64 << 10;

/// The password on `input` (`--password-stdin`): everything up to the end, less one trailing
/// line end, as `docker login --password-stdin` takes it.
fn read_password(input: impl Read) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    input
        .take(MAX_PASSWORD + 1)
        .read_to_end(&mut bytes)
        .context("--password-stdin: read stdin")?;
    if bytes.len() as u64 > MAX_PASSWORD {
        bail!("--password-stdin: more than {MAX_PASSWORD} bytes on stdin");
    }
    let mut password =
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("--password-stdin: not text"))?;
    for end in ["\n", "\r"] {
        if password.ends_with(end) {
            password.truncate(password.len() - end.len());
        }
    }
    if password.is_empty() {
        bail!("--password-stdin: stdin is empty");
    }
    Ok(password)
}

/// The credentials a pull sends: `--user` (with `--password-stdin`, or USER:PASSWORD), else
/// the docker config's for the reference's registry.
fn credentials(a: &PullArgs) -> anyhow::Result<(String, String)> {
    match (&a.user, a.password_stdin) {
        (Some(u), true) => {
            if u.contains(':') {
                bail!("--user {u:?}: give only the user name with --password-stdin");
            }
            Ok((u.clone(), read_password(std::io::stdin().lock())?))
        }
        (Some(u), false) => {
            let Some((user, password)) = u.split_once(':') else {
                bail!("--user {u:?}: expected USER:PASSWORD, or USER with --password-stdin");
            };
            let _ = writeln!(
                std::io::stderr(),
                "yard: warning: a password given on the command line can be read by other users \
                 of this machine (ps, /proc) and stays in shell history; use --password-stdin"
            );
            Ok((user.to_owned(), password.to_owned()))
        }
        (None, _) => Ok(config_credentials(&registry_of(&a.reference))?.unwrap_or_default()),
    }
}

pub async fn pull(client: &Client, a: PullArgs) -> anyhow::Result<()> {
    let (username, password) = credentials(&a)?;
    let stream = client
        .images()
        .pull(api::PullRequest {
            reference: a.reference.clone(),
            platform: a.platform.unwrap_or_default(),
            username,
            password,
            plain_http: a.plain_http,
        })
        .await
        .map_err(rpc(&format!("pull {}", a.reference)))?
        .into_inner();
    let stored = follow(stream, &format!("pull {}", a.reference), a.quiet).await?;
    let mut out = std::io::stdout();
    for (name, digest) in stored {
        writeln!(out, "{name} {digest}")?;
    }
    Ok(())
}

pub async fn import(
    client: &Client,
    file: &Path,
    name: Option<String>,
    quiet: bool,
) -> anyhow::Result<()> {
    let mut input: Box<dyn Read + Send> = if file == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<api::ImportRequest>(8);
    let first_name = name.unwrap_or_default();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = input.read(&mut buf).context("read the archive")?;
            if n == 0 && !first {
                return Ok(());
            }
            buf.truncate(n);
            let msg = api::ImportRequest {
                data: buf,
                name: if first {
                    first_name.clone()
                } else {
                    String::new()
                },
            };
            first = false;
            if tx.blocking_send(msg).is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let what = format!("import {}", file.display());
    let stream = client
        .images()
        .import(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(rpc(&what))?
        .into_inner();
    let stored = follow(stream, &what, quiet).await;
    reader.await.context("archive reader")??;
    let mut out = std::io::stdout();
    for (name, digest) in stored? {
        writeln!(out, "{name} {digest}")?;
    }
    Ok(())
}

pub async fn list(client: &Client, json_out: bool, quiet: bool) -> anyhow::Result<()> {
    let r = client
        .images()
        .list(api::ListImagesRequest {})
        .await
        .map_err(rpc("list images"))?
        .into_inner();
    let usage = r.usage.unwrap_or_default();
    let mut out = std::io::stdout();
    if json_out {
        let images: Vec<_> = r
            .images
            .iter()
            .map(|i| {
                json!({
                    "name": i.name, "digest": i.digest, "media_type": i.media_type,
                    "manifest": i.manifest, "platform": i.platform, "size": i.size,
                    "unpacked": i.unpacked, "layers": i.layers, "wasm": i.wasm,
                    "created": i.created_at.as_ref().map(|t| t.seconds),
                    "problem": (!i.problem.is_empty()).then_some(&i.problem),
                })
            })
            .collect();
        let v = json!({
            "images": images,
            "usage": {
                "blobs": usage.blobs, "blob_bytes": usage.blob_bytes,
                "snapshots": usage.snapshots, "snapshot_bytes": usage.snapshot_bytes,
                "snapshotter": usage.snapshotter,
            }
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    if quiet {
        for i in &r.images {
            writeln!(out, "{}", i.name)?;
        }
        return Ok(());
    }
    let w = r
        .images
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{:<w$}  {:<12}  {:<11}  {:>10}  {:>10}  KIND",
        "NAME", "DIGEST", "PLATFORM", "SIZE", "UNPACKED"
    )?;
    for i in &r.images {
        let kind = if !i.problem.is_empty() {
            format!("broken: {}", i.problem)
        } else if i.wasm {
            "wasm".to_owned()
        } else {
            "container".to_owned()
        };
        writeln!(
            out,
            "{:<w$}  {:<12}  {:<11}  {:>10}  {:>10}  {kind}",
            i.name,
            short(&i.digest),
            i.platform,
            bytes(i.size),
            bytes(i.unpacked),
        )?;
    }
    writeln!(
        out,
        "store: {} blobs, {}; {} snapshots ({}), {}",
        usage.blobs,
        bytes(usage.blob_bytes),
        usage.snapshots,
        usage.snapshotter,
        bytes(usage.snapshot_bytes)
    )?;
    Ok(())
}

pub async fn remove(client: &Client, names: Vec<String>) -> anyhow::Result<()> {
    let r = client
        .images()
        .remove(api::RemoveImagesRequest { names })
        .await
        .map_err(rpc("remove images"))?
        .into_inner();
    let mut out = std::io::stdout();
    for n in &r.removed {
        writeln!(out, "removed {n}")?;
    }
    print_collected(r.collected.unwrap_or_default())
}

pub async fn prune(client: &Client) -> anyhow::Result<()> {
    let r = client
        .images()
        .prune(api::PruneRequest {})
        .await
        .map_err(rpc("prune images"))?
        .into_inner();
    print_collected(r)
}

fn print_collected(r: api::PruneResponse) -> anyhow::Result<()> {
    writeln!(
        std::io::stdout(),
        "collected {} blobs ({}), {} snapshots, {} container roots",
        r.blobs,
        bytes(r.blob_bytes),
        r.snapshots,
        r.active
    )?;
    Ok(())
}

/// Makes container `id`'s root from `image` for `runtime`.
pub async fn prepare(
    client: &Client,
    image: &str,
    id: &str,
    runtime: Option<&str>,
) -> anyhow::Result<api::PrepareResponse> {
    Ok(client
        .images()
        .prepare(api::PrepareRequest {
            image: image.to_owned(),
            key: id.to_owned(),
            rootfs: String::new(),
            runtime: runtime.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(rpc(&format!("image {image}")))?
        .into_inner())
}

/// Removes a root [`prepare`] made for a container that was never created.
pub async fn release(client: &Client, id: &str) {
    let _ = client
        .images()
        .release(api::ReleaseRequest { key: id.to_owned() })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_and_sizes() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/busybox:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("ghcr.io/a/b"), "ghcr.io");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn passwords_from_stdin() {
        let read = |s: &str| read_password(s.as_bytes());
        assert_eq!(read("s3cret\n").unwrap(), "s3cret");
        assert_eq!(read("s3cret\r\n").unwrap(), "s3cret");
        assert_eq!(read("s3cret").unwrap(), "s3cret");
        assert_eq!(
            read("a b:c\n\n").unwrap(),
            "a b:c\n",
            "only one line end goes"
        );
        assert!(read("").unwrap_err().to_string().contains("empty"));
        assert!(read("\n").is_err());
        let huge = "x".repeat(MAX_PASSWORD as usize + 1);
        assert!(read(&huge).unwrap_err().to_string().contains("more than"));
    }
}
