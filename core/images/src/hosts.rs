//! Registry hosts in containerd's `hosts.toml` layout (containerd's `docs/hosts.md`): which
//! endpoints a pull of an image named by registry `namespace` (`registry.k8s.io`,
//! `localhost:5000`) may talk to, in order, and how (scheme, path, TLS roots, headers).
//!
//! The directory holds one subdirectory per registry host: `<dir>/<host>_<port>_`, then
//! `<dir>/<host>:<port>`, for a host with a port; `<dir>/<host>` for one without; else
//! `<dir>/_default`. The first that exists is read, and only it. Its `hosts.toml` lists
//! `[host."<url>"]` endpoints, tried in file order, then the top-level `server` (default: the
//! registry itself). A directory without `hosts.toml` is read as docker's `certs.d`: `*.crt`
//! files are CA roots for the registry itself.
//!
//! Unlike containerd, a file that cannot be parsed refuses the pull, naming the file, line and
//! key; containerd logs it and falls back to the upstream registry, which is exactly what an
//! air-gapped node must not do. Client certificates (`client`, docker's `*.cert`) and `proxy`
//! are refused as unsupported rather than silently ignored. Keys this module does not know are
//! ignored, as containerd does, with a debug log.
//!
//! Everything read is bounded: a `hosts.toml` up to [`MAX_FILE_BYTES`], at most
//! [`MAX_HOSTS`] endpoints, [`MAX_HEADERS`] header values and [`MAX_CA_FILES`] CA files per
//! endpoint, each CA file up to [`MAX_CA_BYTES`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Largest `hosts.toml` read.
pub const MAX_FILE_BYTES: u64 = 64 << 10;
/// Most `[host]` entries in one file.
pub const MAX_HOSTS: usize = 32;
/// Most header values on one endpoint.
pub const MAX_HEADERS: usize = 64;
/// Most CA files on one endpoint.
pub const MAX_CA_FILES: usize = 16;
/// Largest CA file read.
pub const MAX_CA_BYTES: u64 = 1 << 20;
/// Most entries of a host directory looked at for docker's `*.crt` files.
const MAX_DIR_ENTRIES: usize = 256;
/// Longest URL, path or header value taken from a file.
const MAX_STRING: usize = 8 << 10;

/// Why a hosts directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}:{line}: not TOML: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    #[error("{path}:{line}: {key}: not supported by switchyard")]
    Unsupported {
        path: PathBuf,
        line: usize,
        key: String,
    },
    #[error("{path}: client certificates are not supported by switchyard")]
    ClientCertificate { path: PathBuf },
    #[error("CA file {path}: no PEM certificate in it")]
    BadCa { path: PathBuf },
    #[error("registry host {namespace:?} cannot name a hosts directory")]
    Namespace { namespace: String },
}

/// What an endpoint may be used for (containerd's host capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(u8);

impl Capabilities {
    /// Fetch manifests and blobs by digest.
    pub const PULL: Capabilities = Capabilities(1);
    /// Turn a tag into a digest: a trusted operation (a public mirror should not have it).
    pub const RESOLVE: Capabilities = Capabilities(2);
    pub const PUSH: Capabilities = Capabilities(4);
    pub const ALL: Capabilities = Capabilities(7);
    pub const NONE: Capabilities = Capabilities(0);

    pub fn has(self, c: Capabilities) -> bool {
        self.0 & c.0 == c.0
    }

    fn with(self, c: Capabilities) -> Capabilities {
        Capabilities(self.0 | c.0)
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// One place a pull may talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// `host[:port]`.
    pub host: String,
    /// The API root (`/v2`, or what `override_path` kept), without a trailing `/`.
    pub path: String,
    pub capabilities: Capabilities,
    /// CA files (PEM) trusted besides the system's roots.
    pub ca: Vec<PathBuf>,
    pub skip_verify: bool,
    /// Header lines added to every request.
    pub headers: Vec<(String, String)>,
    pub dial_timeout: Option<Duration>,
    /// The file that configured it; `None` for the registry's built-in default.
    pub origin: Option<PathBuf>,
}

impl Endpoint {
    /// The registry `namespace` itself, as a pull without configuration reaches it: HTTPS,
    /// or plain HTTP when asked or on loopback; docker.io's API lives at
    /// registry-1.docker.io.
    pub fn default_for(namespace: &str, plain_http: bool) -> Endpoint {
        let host = if namespace == "docker.io" {
            "registry-1.docker.io".to_owned()
        } else {
            namespace.to_owned()
        };
        let plain = plain_http || crate::pull::is_loopback(namespace);
        Endpoint {
            scheme: if plain { Scheme::Http } else { Scheme::Https },
            host,
            path: "/v2".to_owned(),
            capabilities: Capabilities::ALL,
            ca: Vec::new(),
            skip_verify: false,
            headers: Vec::new(),
            dial_timeout: None,
            origin: None,
        }
    }

    /// `scheme://host/path`.
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme.as_str(), self.host, self.path)
    }

    /// Whether this endpoint stands in for `namespace` (a mirror) rather than being it.
    pub fn is_mirror_of(&self, namespace: &str) -> bool {
        self.host != namespace
            && !(namespace == "docker.io"
                && matches!(
                    self.host.as_str(),
                    "registry-1.docker.io" | "index.docker.io"
                ))
    }

    /// The CA files' certificates, each file read up to [`MAX_CA_BYTES`].
    pub fn load_ca(&self) -> Result<Vec<reqwest::Certificate>, HostsError> {
        let mut out = Vec::new();
        for path in &self.ca {
            let pem = read_capped(path, MAX_CA_BYTES)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| HostsError::BadCa { path: path.clone() })?;
            out.extend(certs);
        }
        Ok(out)
    }
}

/// A directory in containerd's `hosts.toml` layout (`[images] registry_config_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHosts {
    dir: PathBuf,
}

impl RegistryHosts {
    pub fn new(dir: impl Into<PathBuf>) -> RegistryHosts {
        RegistryHosts { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The endpoints for registry `namespace`, in the order a pull tries them. Read afresh
    /// each time, so an edit takes effect at the next pull, as in containerd.
    pub fn endpoints(
        &self,
        namespace: &str,
        plain_http: bool,
    ) -> Result<Vec<Endpoint>, HostsError> {
        let Some(dir) = self.host_dir(namespace)? else {
            return Ok(vec![Endpoint::default_for(namespace, plain_http)]);
        };
        tracing::debug!(dir = %dir.display(), namespace, "registry host directory");
        let file = dir.join("hosts.toml");
        let text = match read_capped(&file, MAX_FILE_BYTES) {
            Ok(b) => Some(b),
            Err(HostsError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        match text {
            Some(b) if !b.is_empty() => {
                let text = String::from_utf8(b).map_err(|_| HostsError::Parse {
                    path: file.clone(),
                    line: 1,
                    message: "not UTF-8".into(),
                })?;
                parse(&file, &text, namespace, plain_http)
            }
            // As containerd: no (or an empty) hosts.toml reads the directory as docker's
            // certs.d.
            _ => cert_files(&dir, namespace, plain_http),
        }
    }

    /// Parses every `hosts.toml` in the directory and reads the CA files they name: what
    /// `switchyardd config check` runs. Returns the host directories checked.
    pub fn check(&self) -> Result<Vec<String>, HostsError> {
        let read_err = |source| HostsError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .map_err(read_err)?
            .take(MAX_DIR_ENTRIES)
        {
            let entry = entry.map_err(read_err)?;
            if !entry.path().is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            // The namespace a directory stands for only matters for the default server.
            let namespace = match name.strip_suffix('_').and_then(|n| n.rsplit_once('_')) {
                Some((h, p)) if !h.is_empty() => format!("{h}:{p}"),
                _ => name.clone(),
            };
            let endpoints = if name == "_default" {
                self.endpoints_in(&entry.path(), "_default")?
            } else {
                self.endpoints_in(&entry.path(), &namespace)?
            };
            for e in &endpoints {
                e.load_ca()?;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    fn endpoints_in(&self, dir: &Path, namespace: &str) -> Result<Vec<Endpoint>, HostsError> {
        let file = dir.join("hosts.toml");
        match read_capped(&file, MAX_FILE_BYTES) {
            Ok(b) if !b.is_empty() => {
                let text = String::from_utf8(b).map_err(|_| HostsError::Parse {
                    path: file.clone(),
                    line: 1,
                    message: "not UTF-8".into(),
                })?;
                parse(&file, &text, namespace, false)
            }
            Ok(_) => cert_files(dir, namespace, false),
            Err(HostsError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                cert_files(dir, namespace, false)
            }
            Err(e) => Err(e),
        }
    }

    /// containerd's lookup: `host_port_`, `host:port` (or just `host`), `_default`.
    fn host_dir(&self, namespace: &str) -> Result<Option<PathBuf>, HostsError> {
        if namespace.is_empty()
            || namespace.starts_with('.')
            || namespace.contains(['/', '\0'])
            || namespace.len() > 255
        {
            return Err(HostsError::Namespace {
                namespace: namespace.to_owned(),
            });
        }
        let mut candidates = Vec::new();
        if let Some(i) = namespace.rfind(':')
            && i > 0
        {
            candidates.push(format!("{}_{}_", &namespace[..i], &namespace[i + 1..]));
        }
        candidates.push(namespace.to_owned());
        candidates.push("_default".to_owned());
        for c in candidates {
            let p = self.dir.join(&c);
            match std::fs::metadata(&p) {
                Ok(_) => return Ok(Some(p)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(HostsError::Read { path: p, source }),
            }
        }
        Ok(None)
    }
}

fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, HostsError> {
    let read_err = |source| HostsError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(read_err)?;
    if buf.len() as u64 > limit {
        return Err(HostsError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(buf)
}

/// Docker's `certs.d` layout: `*.crt` are CA roots for the registry itself; client
/// certificates (`*.cert`, `*.key`) are refused.
fn cert_files(dir: &Path, namespace: &str, plain_http: bool) -> Result<Vec<Endpoint>, HostsError> {
    let read_err = |source| HostsError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::default_for(namespace, plain_http);
    let mut names = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.take(MAX_DIR_ENTRIES) {
                let entry = entry.map_err(read_err)?;
                if entry.path().is_dir() {
                    continue;
                }
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {}
        Err(e) => return Err(read_err(e)),
    }
    names.sort();
    for name in names {
        if name.ends_with(".cert") || name.ends_with(".key") {
            return Err(HostsError::ClientCertificate {
                path: dir.join(name),
            });
        }
        if name.ends_with(".crt") && endpoint.ca.len() < MAX_CA_FILES {
            endpoint.ca.push(dir.join(name));
        }
    }
    endpoint.origin = Some(dir.to_owned());
    Ok(vec![endpoint])
}

/// Where an error points: the file and the line of a byte offset in it.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn invalid(&self, offset: usize, key: &str, reason: impl Into<String>) -> HostsError {
        HostsError::Invalid {
            path: self.path.to_owned(),
            line: self.line(offset),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, offset: usize, key: &str) -> HostsError {
        HostsError::Unsupported {
            path: self.path.to_owned(),
            line: self.line(offset),
            key: key.to_owned(),
        }
    }
}

/// The fields a `[host]` table and the top level share.
#[derive(Default)]
struct Settings {
    capabilities: Option<Capabilities>,
    ca: Vec<PathBuf>,
    skip_verify: bool,
    headers: Vec<(String, String)>,
    override_path: bool,
    dial_timeout: Option<Duration>,
}

/// Parses `text` (the `hosts.toml` at `path`) into endpoints for `namespace`.
pub fn parse(
    path: &Path,
    text: &str,
    namespace: &str,
    plain_http: bool,
) -> Result<Vec<Endpoint>, HostsError> {
    let src = Source { path, text };
    let doc = DeTable::parse(text).map_err(|e| HostsError::Parse {
        path: path.to_owned(),
        line: e.span().map_or(1, |s| src.line(s.start)),
        message: e.message().trim().to_owned(),
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let doc = doc.get_ref();
    let mut server: Option<(String, usize)> = None;
    let mut hosts: Vec<(&Spanned<std::borrow::Cow<'_, str>>, &Spanned<DeValue<'_>>)> = Vec::new();
    let mut top = Settings::default();
    for (key, value) in doc.iter() {
        let k = key.get_ref().as_ref();
        match k {
            "server" => {
                let s = string(&src, k, value)?;
                server = Some((s.to_owned(), value.span().start));
            }
            "host" => {
                let table = value
                    .get_ref()
                    .as_table()
                    .ok_or_else(|| src.invalid(value.span().start, k, "expected a table"))?;
                if table.len() > MAX_HOSTS {
                    return Err(src.invalid(
                        value.span().start,
                        k,
                        format!("more than {MAX_HOSTS} hosts"),
                    ));
                }
                hosts.extend(table.iter());
            }
            _ => setting(&src, base, &mut top, "", k, value)?,
        }
    }
    // The order hosts appear in the file (the table itself is sorted by key): containerd
    // tries them in file order.
    hosts.sort_by_key(|(k, _)| k.span().start);
    let mut out = Vec::new();
    for (key, value) in hosts {
        let url = key.get_ref().as_ref();
        let name = format!("host.{url:?}");
        let table = value
            .get_ref()
            .as_table()
            .ok_or_else(|| src.invalid(value.span().start, &name, "expected a table"))?;
        let mut s = Settings::default();
        for (k, v) in table.iter() {
            setting(
                &src,
                base,
                &mut s,
                &format!("{name}."),
                k.get_ref().as_ref(),
                v,
            )?;
        }
        out.push(endpoint(&src, key.span().start, &name, url, s, path)?);
    }
    let root = match server {
        Some((url, at)) => endpoint(&src, at, "server", &url, top, path)?,
        None => {
            let mut e = Endpoint::default_for(namespace, plain_http);
            e.capabilities = top.capabilities.unwrap_or(Capabilities::ALL);
            e.ca = top.ca;
            e.skip_verify = top.skip_verify;
            e.headers = top.headers;
            e.dial_timeout = top.dial_timeout;
            if top.override_path {
                e.path = String::new();
            }
            e.origin = Some(path.to_owned());
            e
        }
    };
    out.push(root);
    Ok(out)
}

fn string<'a>(
    src: &Source<'_>,
    key: &str,
    v: &'a Spanned<DeValue<'_>>,
) -> Result<&'a str, HostsError> {
    let s = v
        .get_ref()
        .as_str()
        .ok_or_else(|| src.invalid(v.span().start, key, "expected a string"))?;
    if s.len() > MAX_STRING {
        return Err(src.invalid(
            v.span().start,
            key,
            format!("longer than {MAX_STRING} bytes"),
        ));
    }
    Ok(s)
}

/// A string or an array of strings.
fn strings<'a>(
    src: &Source<'_>,
    key: &str,
    v: &'a Spanned<DeValue<'_>>,
    max: usize,
) -> Result<Vec<&'a str>, HostsError> {
    match v.get_ref() {
        DeValue::String(_) => Ok(vec![string(src, key, v)?]),
        DeValue::Array(a) => {
            if a.len() > max {
                return Err(src.invalid(v.span().start, key, format!("more than {max} values")));
            }
            a.iter().map(|e| string(src, key, e)).collect()
        }
        _ => Err(src.invalid(
            v.span().start,
            key,
            "expected a string or an array of strings",
        )),
    }
}

fn setting(
    src: &Source<'_>,
    base: &Path,
    s: &mut Settings,
    prefix: &str,
    k: &str,
    v: &Spanned<DeValue<'_>>,
) -> Result<(), HostsError> {
    let key = format!("{prefix}{k}");
    let at = v.span().start;
    match k {
        "capabilities" => {
            let mut caps = Capabilities::NONE;
            for c in strings(src, &key, v, 8)? {
                caps = caps.with(match c.to_ascii_lowercase().as_str() {
                    "pull" => Capabilities::PULL,
                    "resolve" => Capabilities::RESOLVE,
                    "push" => Capabilities::PUSH,
                    _ => {
                        return Err(src.invalid(
                            at,
                            &key,
                            format!("unknown capability {c:?} (pull, resolve or push)"),
                        ));
                    }
                });
            }
            // As containerd: an empty list is every capability.
            s.capabilities = Some(if caps == Capabilities::NONE {
                Capabilities::ALL
            } else {
                caps
            });
        }
        "ca" => {
            s.ca = strings(src, &key, v, MAX_CA_FILES)?
                .into_iter()
                .map(|p| base.join(p))
                .collect();
        }
        "skip_verify" => {
            s.skip_verify = v
                .get_ref()
                .as_bool()
                .ok_or_else(|| src.invalid(at, &key, "expected true or false"))?;
        }
        "override_path" => {
            s.override_path = v
                .get_ref()
                .as_bool()
                .ok_or_else(|| src.invalid(at, &key, "expected true or false"))?;
        }
        "header" => {
            let table = v
                .get_ref()
                .as_table()
                .ok_or_else(|| src.invalid(at, &key, "expected a table"))?;
            for (name, value) in table.iter() {
                let name = name.get_ref().as_ref();
                let hkey = format!("{key}.{name}");
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(src.invalid(at, &hkey, "not a header name"));
                }
                for value in strings(src, &hkey, value, MAX_HEADERS)? {
                    if reqwest::header::HeaderValue::from_str(value).is_err() {
                        return Err(src.invalid(at, &hkey, "not a header value"));
                    }
                    if s.headers.len() == MAX_HEADERS {
                        return Err(src.invalid(
                            at,
                            &key,
                            format!("more than {MAX_HEADERS} header values"),
                        ));
                    }
                    s.headers.push((name.to_owned(), value.to_owned()));
                }
            }
        }
        "dial_timeout" => {
            let text = string(src, &key, v)?;
            s.dial_timeout = Some(go_duration(text).ok_or_else(|| {
                src.invalid(
                    at,
                    &key,
                    format!("{text:?} is not a duration like \"500ms\" or \"2s\""),
                )
            })?);
        }
        "client" | "proxy" => return Err(src.unsupported(at, &key)),
        _ => tracing::debug!(file = %src.path.display(), key, "unknown key in hosts.toml ignored"),
    }
    Ok(())
}

/// A `[host."<url>"]` key or `server`: a URL, `https://` when it names no scheme (containerd
/// prefixes whatever does not start with `http`; a scheme other than http or https is refused
/// here rather than read as a host name).
fn endpoint(
    src: &Source<'_>,
    at: usize,
    key: &str,
    raw: &str,
    s: Settings,
    path: &Path,
) -> Result<Endpoint, HostsError> {
    if raw.len() > MAX_STRING {
        return Err(src.invalid(at, key, format!("longer than {MAX_STRING} bytes")));
    }
    let full = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("https://{raw}")
    };
    let url = reqwest::Url::parse(&full)
        .map_err(|e| src.invalid(at, key, format!("{raw:?} is not a URL: {e}")))?;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err(src.invalid(at, key, format!("scheme {other:?}: expected http or https")));
        }
    };
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(src.invalid(at, key, format!("{raw:?} names no host")));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(src.invalid(at, key, "credentials do not go in the URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(src.invalid(at, key, "a query or fragment is not allowed"));
    }
    let host = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    // containerd's rule: the path is cleaned, and gets `/v2` unless it ends so or
    // `override_path` says the URL already is the API root.
    let mut api = clean_path(url.path());
    if !s.override_path && !api.ends_with("/v2") {
        api.push_str("/v2");
    }
    Ok(Endpoint {
        scheme,
        host,
        path: api,
        capabilities: s.capabilities.unwrap_or(Capabilities::ALL),
        ca: s.ca,
        skip_verify: s.skip_verify,
        headers: s.headers,
        dial_timeout: s.dial_timeout,
        origin: Some(path.to_owned()),
    })
}

/// `/a//b/./c/` → `/a/b/c`; `/` → ``.
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.iter().map(|s| format!("/{s}")).collect()
}

/// Go's `time.ParseDuration` for what a dial timeout needs: decimal numbers with `ns`, `us`,
/// `ms`, `s`, `m` or `h`, concatenated (`1m30s`).
fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() || rest.len() > 64 {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total = total.checked_add(Duration::try_from_secs_f64(number * scale).ok()?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str, ns: &str) -> Vec<Endpoint> {
        parse(Path::new("/etc/hosts.d/x/hosts.toml"), text, ns, false).unwrap()
    }

    fn parse_err(text: &str) -> String {
        let e = parse(
            Path::new("/etc/hosts.d/x/hosts.toml"),
            text,
            "x.example",
            false,
        )
        .unwrap_err();
        e.to_string()
    }

    #[test]
    fn hosts_come_in_file_order_then_the_server() {
        let e = parse_ok(
            r#"
server = "https://registry-1.docker.io"

[host."https://zz-mirror.example"]
  capabilities = ["pull"]
[host."http://aa-mirror.example:5000"]
  capabilities = ["pull", "resolve"]
  ca = "mirror.crt"
  [host."http://aa-mirror.example:5000".header]
    x-one = "1"
    x-two = ["a", "b"]
[host."https://mm.example/sub"]
"#,
            "docker.io",
        );
        let urls: Vec<String> = e.iter().map(Endpoint::url).collect();
        assert_eq!(
            urls,
            [
                "https://zz-mirror.example/v2",
                "http://aa-mirror.example:5000/v2",
                "https://mm.example/sub/v2",
                "https://registry-1.docker.io/v2",
            ]
        );
        assert_eq!(e[0].capabilities, Capabilities::PULL);
        assert!(!e[0].capabilities.has(Capabilities::RESOLVE));
        assert!(e[1].capabilities.has(Capabilities::RESOLVE));
        assert!(!e[1].capabilities.has(Capabilities::PUSH));
        assert_eq!(e[2].capabilities, Capabilities::ALL);
        assert_eq!(e[1].scheme, Scheme::Http);
        assert_eq!(e[1].ca, [PathBuf::from("/etc/hosts.d/x/mirror.crt")]);
        assert_eq!(
            e[1].headers,
            [
                ("x-one".to_owned(), "1".to_owned()),
                ("x-two".to_owned(), "a".to_owned()),
                ("x-two".to_owned(), "b".to_owned()),
            ]
        );
        assert!(e[0].is_mirror_of("docker.io"));
        assert!(!e[3].is_mirror_of("docker.io"));
        // Where pulls without a hosts directory reach docker.io: not a mirror either (no `ns`,
        // and the pull's credentials go there).
        let mut hub = e[3].clone();
        hub.host = "index.docker.io".into();
        assert!(!hub.is_mirror_of("docker.io"));
    }

    #[test]
    fn the_server_defaults_to_the_registry_itself() {
        let e = parse_ok("[host.\"https://m.example\"]\n", "registry.k8s.io");
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].url(), "https://registry.k8s.io/v2");
        let e = parse_ok("capabilities = [\"pull\"]\n", "docker.io");
        assert_eq!(e[0].url(), "https://registry-1.docker.io/v2");
        assert_eq!(e[0].capabilities, Capabilities::PULL);
        let e = parse_ok("skip_verify = true\n", "127.0.0.1:5000");
        assert_eq!(e[0].url(), "http://127.0.0.1:5000/v2");
        assert!(e[0].skip_verify);
    }

    #[test]
    fn server_without_scheme_is_https_and_paths_follow_containerd() {
        let e = parse_ok("server = \"mirror.example:8443\"\n", "x.example");
        assert_eq!(e[0].url(), "https://mirror.example:8443/v2");
        let e = parse_ok("server = \"http://m.example/v2/\"\n", "x.example");
        assert_eq!(e[0].url(), "http://m.example/v2");
        let e = parse_ok(
            "[host.\"https://m.example/v2/upstream\"]\noverride_path = true\n",
            "x.example",
        );
        assert_eq!(e[0].url(), "https://m.example/v2/upstream");
        let e = parse_ok(
            "server = \"https://m.example\"\noverride_path = true\n",
            "x",
        );
        assert_eq!(e[0].url(), "https://m.example");
    }

    #[test]
    fn bad_files_name_the_file_line_and_key() {
        let e = parse_err(
            "server = \"https://m.example\"\n[host.\"https://a\"]\ncapabilities = [\"fetch\"]\n",
        );
        assert!(e.contains("/etc/hosts.d/x/hosts.toml:3"), "{e}");
        assert!(e.contains("host.\"https://a\".capabilities"), "{e}");
        assert!(e.contains("fetch"), "{e}");
        let e = parse_err("skip_verify = \"yes\"\n");
        assert!(e.contains(":1: skip_verify: expected true or false"), "{e}");
        let e = parse_err("server = \"ftp://m.example\"\n");
        assert!(e.contains("server") && e.contains("ftp"), "{e}");
        let e = parse_err("[host.\"https://a\"]\nclient = \"/c.pem\"\n");
        assert!(e.contains("client: not supported"), "{e}");
        let e = parse_err("server = \n");
        assert!(e.contains("hosts.toml:1: not TOML"), "{e}");
        let e = parse_err("[header]\n\"bad header\" = \"x\"\n");
        assert!(e.contains("header.bad header: not a header name"), "{e}");
        let e = parse_err("dial_timeout = \"soon\"\n");
        assert!(e.contains("dial_timeout"), "{e}");
        let e = parse_err("server = \"https://u:p@m.example\"\n");
        assert!(e.contains("credentials"), "{e}");
    }

    #[test]
    fn unknown_keys_are_ignored_as_containerd_does() {
        let e = parse_ok("future_key = 1\n[host.\"https://a\"]\nother = true\n", "x");
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn counts_are_capped() {
        let mut text = String::new();
        for i in 0..=MAX_HOSTS {
            text.push_str(&format!("[host.\"https://m{i}.example\"]\n"));
        }
        assert!(parse_err(&text).contains("more than 32 hosts"));
    }

    #[test]
    fn durations_as_go_writes_them() {
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("5"), None);
        assert_eq!(go_duration("-1s"), None);
        assert_eq!(go_duration(""), None);
    }

    #[test]
    fn directories_are_looked_up_as_containerd_does() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = RegistryHosts::new(dir.path());
        // Nothing configured: the registry itself.
        let e = hosts.endpoints("registry.k8s.io", false).unwrap();
        assert_eq!(e, [Endpoint::default_for("registry.k8s.io", false)]);

        let write = |name: &str, text: &str| {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("hosts.toml"), text).unwrap();
        };
        write("_default", "server = \"https://default.example\"\n");
        let e = hosts.endpoints("registry.k8s.io", false).unwrap();
        assert_eq!(e[0].url(), "https://default.example/v2");

        write("registry.k8s.io", "server = \"https://k8s.example\"\n");
        let e = hosts.endpoints("registry.k8s.io", false).unwrap();
        assert_eq!(e[0].url(), "https://k8s.example/v2");

        // host:port: `host_port_` first, then `host:port`.
        write("reg.example:5000", "server = \"https://colon.example\"\n");
        let e = hosts.endpoints("reg.example:5000", false).unwrap();
        assert_eq!(e[0].url(), "https://colon.example/v2");
        write(
            "reg.example_5000_",
            "server = \"https://underscore.example\"\n",
        );
        let e = hosts.endpoints("reg.example:5000", false).unwrap();
        assert_eq!(e[0].url(), "https://underscore.example/v2");

        // A directory without hosts.toml is docker's certs.d: CA roots for the registry.
        std::fs::create_dir_all(dir.path().join("certs.example")).unwrap();
        std::fs::write(dir.path().join("certs.example/ca.crt"), "x").unwrap();
        let e = hosts.endpoints("certs.example", false).unwrap();
        assert_eq!(e[0].url(), "https://certs.example/v2");
        assert_eq!(e[0].ca, [dir.path().join("certs.example/ca.crt")]);
        std::fs::write(dir.path().join("certs.example/client.cert"), "x").unwrap();
        let err = hosts
            .endpoints("certs.example", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client.cert") && err.contains("not supported"),
            "{err}"
        );

        // A CA file that holds no certificate is refused naming it; `check` reads them all.
        write("ca.example", "ca = \"bad.pem\"\n");
        std::fs::write(dir.path().join("ca.example/bad.pem"), "not pem").unwrap();
        let err = hosts.check().unwrap_err().to_string();
        assert!(err.contains("bad.pem"), "{err}");
        std::fs::remove_dir_all(dir.path().join("ca.example")).unwrap();
        std::fs::remove_dir_all(dir.path().join("certs.example")).unwrap();
        let names = hosts.check().unwrap();
        assert!(names.contains(&"_default".to_owned()), "{names:?}");

        // A bad file refuses the pull instead of falling back to the registry.
        write("registry.k8s.io", "server = [\n");
        let err = hosts
            .endpoints("registry.k8s.io", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("registry.k8s.io/hosts.toml"), "{err}");

        assert!(hosts.endpoints("../etc", false).is_err());
    }
}
