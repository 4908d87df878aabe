//! Pulls from OCI distribution registries (through [`crate::registry`], which reads every
//! manifest, config and token with a cap): the manifest (an index resolves to the platform's
//! manifest, whose config must agree), then the config, then the layers in parallel into the
//! content store (resuming an interrupted ingest with a range request), then the unpack into
//! snapshots, and last the image record. Every blob is verified before it is stored; a failed
//! pull leaves no record, and what it stored is collected.

use futures::StreamExt;
use futures::future::BoxFuture;
use oci_client::Reference;
use oci_spec::image::{Descriptor, ImageConfiguration};

use crate::content::{ContentError, sha256_digest};
use crate::hosts::{Endpoint, RegistryHosts};
use crate::oci::{self, INDEX_TYPES, MANIFEST_TYPES, Parsed, Platform};
use crate::registry::{Endpoints, Registry, RegistryError};
use crate::store::{ImageError, ImageRecord, ImageStore, Lease, Progress, Report, Result, Target};

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// The platform to pick out of an index (default: this machine's).
    pub platform: Option<Platform>,
    /// Registry credentials (`docker login`'s user and password or token).
    pub auth: Option<(String, String)>,
    /// Speak HTTP instead of HTTPS (registries on a loopback address always get HTTP).
    pub plain_http: bool,
    /// Layers fetched at once (default 3, as containerd).
    pub concurrency: usize,
    /// Mirrors and per-registry settings in containerd's `hosts.toml` layout; `None` talks to
    /// the registry the reference names and nothing else.
    pub hosts: Option<RegistryHosts>,
}

/// Whether `host[:port]` names this machine (such registries are reached over plain HTTP, as
/// containerd and docker treat them).
pub fn is_loopback(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The endpoints a pull of `r` talks to: those of its registry's `hosts.toml` when a hosts
/// directory is configured, else the registry itself (HTTPS; plain HTTP when asked or on
/// loopback).
fn endpoints(r: &Reference, opts: &PullOptions) -> std::result::Result<Endpoints, ImageError> {
    let namespace = r.registry();
    let list = match &opts.hosts {
        Some(hosts) => hosts.endpoints(namespace, opts.plain_http)?,
        None => {
            // Exactly what pulls did before hosts directories: docker.io at index.docker.io.
            let mut e = Endpoint::default_for(namespace, opts.plain_http);
            e.host = r.resolve_registry().to_owned();
            vec![e]
        }
    };
    let mut clients = Vec::with_capacity(list.len());
    for e in &list {
        let ca = e.load_ca()?;
        let client = Registry::new(e, ca, namespace, r.repository(), opts.auth.clone())
            .map_err(registry_err(r))?;
        clients.push(client);
    }
    Ok(Endpoints::new(namespace, clients))
}

fn registry_err(reference: &Reference) -> impl Fn(RegistryError) -> ImageError + '_ {
    move |e| ImageError::Registry {
        reference: reference.whole(),
        source: Box::new(e),
    }
}

/// The media type a manifest calls itself, else what its shape says.
fn media_type_of(parsed: &Parsed, bytes: &[u8]) -> String {
    let declared = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        });
    declared.unwrap_or_else(|| match parsed {
        Parsed::Index(_) => INDEX_TYPES[0].to_owned(),
        Parsed::Manifest(_) => MANIFEST_TYPES[0].to_owned(),
    })
}

impl ImageStore {
    /// Pulls `reference` into namespace `ns` and unpacks it. The image is named by its full
    /// reference (`docker.io/library/busybox:latest`).
    pub async fn pull(
        &self,
        ns: &str,
        reference: &str,
        opts: &PullOptions,
        report: Report<'_>,
    ) -> Result<ImageRecord> {
        let r: Reference =
            reference
                .parse()
                .map_err(|e: oci_client::ParseError| ImageError::Reference {
                    reference: reference.to_owned(),
                    reason: e.to_string(),
                })?;
        let lease = self.lease();
        let result = self.pull_inner(ns, &r, opts, &lease, report).await;
        drop(lease);
        if result.is_err() {
            // Whatever this pull stored that no image references goes (resumable partial
            // downloads stay in the ingest area).
            let _ = tokio::task::block_in_place(|| self.gc(&|_, _| true));
        }
        result
    }

    async fn pull_inner(
        &self,
        ns: &str,
        r: &Reference,
        opts: &PullOptions,
        lease: &Lease<'_>,
        report: Report<'_>,
    ) -> Result<ImageRecord> {
        let err = registry_err(r);
        let client = endpoints(r, opts)?;
        let accept: Vec<&str> = INDEX_TYPES.iter().chain(&MANIFEST_TYPES).copied().collect();
        let wanted = opts
            .platform
            .clone()
            .unwrap_or_else(|| self.platform().clone());

        // The top manifest (or index), verified against a digest reference.
        let (bytes, source) = match r.digest() {
            Some(d) => client.manifest(d, &accept).await,
            None => client.resolve(r.tag().unwrap_or("latest"), &accept).await,
        }
        .map_err(&err)?;
        report(Progress::Source {
            name: r.whole(),
            url: source.to_owned(),
        });
        let top_digest = sha256_digest(&bytes);
        if let Some(want) = r.digest()
            && want != top_digest
        {
            return Err(ContentError::DigestMismatch {
                expected: want.to_owned(),
                actual: top_digest,
            }
            .into());
        }
        let parsed = oci::parse_manifest(&top_digest, "", &bytes)?;
        let target = Target {
            media_type: media_type_of(&parsed, &bytes),
            digest: top_digest.clone(),
            size: bytes.len() as u64,
        };
        let (manifest_digest, manifest_bytes, manifest) = match parsed {
            Parsed::Manifest(m) => (top_digest.clone(), bytes.clone(), *m),
            Parsed::Index(index) => {
                let d = oci::select_platform(&top_digest, &index, &wanted)?;
                let digest = d.digest().to_string();
                let (b, _) = client.manifest(&digest, &accept).await.map_err(&err)?;
                let actual = sha256_digest(&b);
                if actual != digest {
                    return Err(ContentError::DigestMismatch {
                        expected: digest,
                        actual,
                    }
                    .into());
                }
                match oci::parse_manifest(&digest, d.media_type().as_ref(), &b)? {
                    Parsed::Manifest(m) => (digest, b, *m),
                    Parsed::Index(_) => {
                        return Err(oci::ManifestError::Invalid {
                            what: "index",
                            digest,
                            reason: "nested indexes are not supported".into(),
                        }
                        .into());
                    }
                }
            }
        };

        // The config decides the platform before any layer is fetched.
        let cfg = manifest.config().clone();
        let cfg_bytes = self.fetch_small(&client, r, &cfg, lease).await?;
        if !oci::is_wasm_artifact(&manifest) {
            let digest = cfg.digest().to_string();
            let config = ImageConfiguration::from_reader(cfg_bytes.as_slice()).map_err(|e| {
                oci::ManifestError::Invalid {
                    what: "image config",
                    digest: digest.clone(),
                    reason: e.to_string(),
                }
            })?;
            oci::check_config_platform(&digest, &config, &wanted)?;
            oci::diff_ids(&manifest, Some(&config))?;
        }
        report(Progress::Resolved {
            name: r.whole(),
            digest: manifest_digest.clone(),
            layers: manifest.layers().len() as u64,
            bytes: manifest
                .layers()
                .iter()
                .fold(0u64, |a, l| a.saturating_add(l.size())),
        });

        let concurrency = if opts.concurrency == 0 {
            3
        } else {
            opts.concurrency
        };
        // Boxed futures, not a combinator closure: the pull future must stay `Send` for any
        // lifetime the daemon's task gives it.
        let mut fetches: Vec<BoxFuture<'_, Result<()>>> = Vec::new();
        for l in manifest.layers() {
            fetches.push(Box::pin(self.fetch_layer(&client, r, l, lease, report)));
        }
        // Every fetch runs to its end even when one fails: a sibling cut off mid-stream would
        // leave a partial ingest behind a pull that failed for a reason other than the network.
        let results: Vec<Result<()>> = futures::stream::iter(fetches)
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        #[cfg(debug_assertions)]
        fail::fail_point!("images.pull.fetched");

        // Metadata last: a record only ever names complete content.
        lease.add(&top_digest);
        lease.add(&manifest_digest);
        self.content().put(&manifest_digest, &manifest_bytes)?;
        self.content().put(&top_digest, &bytes)?;
        let platform_str = wanted.to_string();
        let resolved = self.resolve(&target, Some(&wanted))?;
        tokio::task::block_in_place(|| self.unpack(&resolved, lease, report))?;
        #[cfg(debug_assertions)]
        fail::fail_point!("images.pull.unpacked");
        let name = r.whole();
        self.put_record(ns, &name, target, &platform_str)?;
        report(Progress::Stored {
            name: name.clone(),
            digest: top_digest,
        });
        self.get(ns, &name)
    }

    /// Fetches a small blob (a config) into memory and the store.
    async fn fetch_small(
        &self,
        client: &Endpoints,
        r: &Reference,
        d: &Descriptor,
        lease: &Lease<'_>,
    ) -> Result<Vec<u8>> {
        let digest = d.digest().to_string();
        lease.add(&digest);
        if self.content().exists(&digest) {
            return Ok(self.content().read(&digest, oci::MAX_METADATA_BYTES)?);
        }
        if d.size() > oci::MAX_METADATA_BYTES {
            return Err(ContentError::TooLarge {
                digest,
                size: d.size(),
                limit: oci::MAX_METADATA_BYTES,
            }
            .into());
        }
        let buf = client
            .small_blob(&digest, d.size())
            .await
            .map_err(registry_err(r))?;
        self.content().put(&digest, &buf)?;
        Ok(buf)
    }

    /// Fetches one layer into the content store, resuming an earlier partial download.
    async fn fetch_layer(
        &self,
        client: &Endpoints,
        r: &Reference,
        l: &Descriptor,
        lease: &Lease<'_>,
        report: Report<'_>,
    ) -> Result<()> {
        let digest = l.digest().to_string();
        let size = l.size();
        lease.add(&digest);
        if self.content().exists(&digest) {
            report(Progress::Fetched {
                digest,
                cached: true,
            });
            return Ok(());
        }
        let mut ingest = self.content().ingest(Some(&digest), Some(size))?;
        if ingest.offset() == size {
            // Complete but never committed (a crash before the rename): verify it as it is;
            // bad bytes are dropped and the next pull starts over.
            ingest.commit()?;
            report(Progress::Fetched {
                digest,
                cached: true,
            });
            return Ok(());
        }
        let mut blob = client
            .blob(&digest, ingest.offset())
            .await
            .map_err(registry_err(r))?;
        if ingest.offset() > 0 {
            if blob.partial {
                tracing::info!(%digest, offset = ingest.offset(), "resuming a layer download");
            } else {
                // The registry ignored the range: start over.
                ingest.discard();
                ingest = self.content().ingest(Some(&digest), Some(size))?;
            }
        }
        let mut last = 0u64;
        loop {
            let chunk = match blob.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                // An interrupted transfer: the ingest stays for a resume.
                Err(e) => return Err(registry_err(r)(e)),
            };
            if ingest.offset() + chunk.len() as u64 > size {
                ingest.discard();
                return Err(ContentError::SizeMismatch {
                    digest,
                    expected: size,
                    actual: size + 1,
                }
                .into());
            }
            ingest.write_all(&chunk)?;
            if ingest.offset() - last >= 1 << 18 || ingest.offset() == size {
                last = ingest.offset();
                report(Progress::Fetch {
                    digest: digest.clone(),
                    current: last,
                    total: size,
                });
            }
        }
        // Size and digest are checked here; bad bytes are dropped.
        ingest.commit()?;
        report(Progress::Fetched {
            digest,
            cached: false,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_hosts_directory_a_pull_reaches_the_named_registry_only() {
        let r: Reference = "busybox:1".parse().unwrap();
        let e = endpoints(&r, &PullOptions::default()).unwrap();
        assert_eq!(e.urls(), ["https://index.docker.io/v2"]);
        let r: Reference = "127.0.0.1:5000/app:1".parse().unwrap();
        let e = endpoints(&r, &PullOptions::default()).unwrap();
        assert_eq!(e.urls(), ["http://127.0.0.1:5000/v2"]);
        let r: Reference = "registry.k8s.io/pause:3.10".parse().unwrap();
        let plain = PullOptions {
            plain_http: true,
            ..PullOptions::default()
        };
        assert_eq!(
            endpoints(&r, &plain).unwrap().urls(),
            ["http://registry.k8s.io/v2"]
        );
    }

    #[test]
    fn loopback_registries() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("docker.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
