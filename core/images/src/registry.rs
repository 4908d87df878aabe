//! The OCI distribution API as a pull needs it: manifests by tag or digest, blobs (whole, or
//! from an offset to resume), and the authentication a registry asks for (HTTP basic, or a
//! bearer token from the realm its challenge names).
//!
//! Every body is read with a cap: manifests, indexes, configs and token responses up to
//! [`MAX_METADATA_BYTES`] (a `Content-Length` above it is refused before a byte is read, a
//! stream past it is cut off there), error bodies up to [`MAX_ERROR_BODY`], and metadata
//! requests have a deadline. A registry is untrusted: an endless manifest or token response
//! must not grow the daemon's memory. `oci-client`, which pulls used before, reads every
//! manifest, token and error body whole (`Response::bytes`) with no way to bound it, so this
//! small client replaces it; blobs are streamed to the caller, who checks their size and digest.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, CONTENT_RANGE, HeaderMap, HeaderName, HeaderValue, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Response, StatusCode, Url};

use crate::hosts::{Capabilities, Endpoint, Scheme};
use crate::oci::MAX_METADATA_BYTES;

/// Most of an error response read (for the registry's error codes and message).
pub const MAX_ERROR_BODY: u64 = 64 << 10;
/// How long a manifest, config or token request may take in all.
const METADATA_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long any response may go without sending a byte.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed registry request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request did not complete (connection, TLS, timeout, a body cut short).
    #[error("{url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error(
        "{url}: HTTP {status}{}{}",
        if codes.is_empty() { String::new() } else { format!(" {}", codes.join(", ")) },
        if message.is_empty() { String::new() } else { format!(": {message}") }
    )]
    Status {
        url: String,
        status: u16,
        /// The distribution error codes of its body (`MANIFEST_UNKNOWN`, `DENIED`, …).
        codes: Vec<String>,
        message: String,
    },
    /// A body over its cap.
    #[error("{url}: the response is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    /// An authentication challenge or token response that cannot be used.
    #[error("{url}: authentication: {reason}")]
    Auth { url: String, reason: String },
    #[error("{url}: not a URL")]
    Url { url: String },
    /// The registry's hosts configuration leaves no endpoint that may do this.
    #[error("no configured host of {namespace} may {what}")]
    NoEndpoint {
        namespace: String,
        what: &'static str,
    },
}

impl RegistryError {
    /// Whether the registry says the image or blob does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            RegistryError::Status { status, codes, .. } => {
                *status == 404
                    || codes.iter().any(|c| {
                        matches!(
                            c.as_str(),
                            "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN"
                        )
                    })
            }
            _ => false,
        }
    }

    /// Whether the registry refused our credentials (or their absence).
    pub fn is_unauthorized(&self) -> bool {
        match self {
            RegistryError::Status { status, codes, .. } => {
                matches!(status, 401 | 403)
                    || codes
                        .iter()
                        .any(|c| matches!(c.as_str(), "UNAUTHORIZED" | "DENIED"))
            }
            RegistryError::Auth { .. } => true,
            _ => false,
        }
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

fn http_err(url: &str) -> impl FnOnce(reqwest::Error) -> RegistryError + '_ {
    move |source| RegistryError::Http {
        url: url.to_owned(),
        source,
    }
}

/// What a request carries to authenticate, once the registry asked.
#[derive(Clone)]
enum Auth {
    Basic(String, String),
    Bearer(String),
}

/// One repository at one endpoint (the registry itself or a mirror of it).
pub(crate) struct Registry {
    http: reqwest::Client,
    /// `http(s)://host[:port]/v2/<repository>`.
    base: String,
    /// `?ns=<registry>` when the endpoint is a mirror (containerd's convention), else empty.
    query: String,
    repository: String,
    /// The endpoint's API root, for logs and reports.
    url: String,
    capabilities: Capabilities,
    /// Headers from the endpoint's configuration, on every request.
    headers: HeaderMap,
    /// Plain HTTP (a loopback registry, or asked for): token realms may be plain too.
    plain: bool,
    credentials: Option<(String, String)>,
    auth: Mutex<Option<Auth>>,
}

/// A blob response being read.
pub(crate) struct Blob {
    response: Response,
    url: String,
    /// The registry honoured the range: the body starts at the offset asked for.
    pub(crate) partial: bool,
}

impl Blob {
    /// The next piece of the body; `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>> {
        self.response.chunk().await.map_err(http_err(&self.url))
    }
}

/// Encodes `s` for a URL query value (a registry host: letters, digits, `.-_:` pass).
fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Registry {
    /// A client for `repository` of registry `namespace` at `endpoint`, trusting `ca` besides
    /// the system's roots.
    pub(crate) fn new(
        endpoint: &Endpoint,
        ca: Vec<reqwest::Certificate>,
        namespace: &str,
        repository: &str,
        credentials: Option<(String, String)>,
    ) -> Result<Registry> {
        let url = endpoint.url();
        let base = format!("{url}/{repository}");
        let mut builder = reqwest::Client::builder()
            .connect_timeout(endpoint.dial_timeout.unwrap_or(CONNECT_TIMEOUT))
            .read_timeout(READ_TIMEOUT);
        if !ca.is_empty() {
            builder = builder.tls_certs_merge(ca);
        }
        if endpoint.skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(http_err(&base))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &endpoint.headers {
            // Checked when the file was read.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        let mirror = endpoint.is_mirror_of(namespace);
        Ok(Registry {
            http,
            base,
            query: if mirror {
                format!("?ns={}", query_value(namespace))
            } else {
                String::new()
            },
            repository: repository.to_owned(),
            url,
            capabilities: endpoint.capabilities,
            headers,
            plain: endpoint.scheme == Scheme::Http,
            // Credentials given for a registry go to that registry only, never to a mirror.
            credentials: if mirror { None } else { credentials },
            auth: Mutex::new(None),
        })
    }

    /// The endpoint's API root (`https://mirror.example/v2`).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The manifest or index `reference` (a tag or a digest), at most
    /// [`MAX_METADATA_BYTES`].
    pub(crate) async fn manifest(&self, reference: &str, accept: &[&str]) -> Result<Vec<u8>> {
        let url = format!("{}/manifests/{reference}{}", self.base, self.query);
        let mut headers = HeaderMap::new();
        if let Ok(value) = accept.join(", ").parse() {
            headers.insert(ACCEPT, value);
        }
        let response = self.get(&url, headers, Some(METADATA_TIMEOUT)).await?;
        read_capped(&url, response, MAX_METADATA_BYTES).await
    }

    /// A small blob (a config) whole, at most `limit` bytes.
    pub(crate) async fn small_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        let url = format!("{}/blobs/{digest}{}", self.base, self.query);
        let response = self
            .get(&url, HeaderMap::new(), Some(METADATA_TIMEOUT))
            .await?;
        read_capped(&url, response, limit.min(MAX_METADATA_BYTES)).await
    }

    /// A blob, from byte `offset` on if the registry takes the range.
    pub(crate) async fn blob(&self, digest: &str, offset: u64) -> Result<Blob> {
        let url = format!("{}/blobs/{digest}{}", self.base, self.query);
        let mut headers = HeaderMap::new();
        if offset > 0
            && let Ok(value) = format!("bytes={offset}-").parse()
        {
            headers.insert(RANGE, value);
        }
        let response = self.get(&url, headers, None).await?;
        // A 206 for another range than ours is as useless as none.
        let partial = response.status() == StatusCode::PARTIAL_CONTENT
            && response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&format!("bytes {offset}-")));
        Ok(Blob {
            response,
            url,
            partial,
        })
    }

    /// GET `url`, answering one authentication challenge.
    async fn get(
        &self,
        url: &str,
        headers: HeaderMap,
        timeout: Option<Duration>,
    ) -> Result<Response> {
        let mut challenged = false;
        loop {
            let mut request = self
                .http
                .get(url)
                .headers(self.headers.clone())
                .headers(headers.clone());
            if let Some(t) = timeout {
                request = request.timeout(t);
            }
            let auth = self.auth.lock().ok().and_then(|a| a.clone());
            request = match auth {
                Some(Auth::Basic(user, pass)) => request.basic_auth(user, Some(pass)),
                Some(Auth::Bearer(token)) => request.bearer_auth(token),
                None => request,
            };
            let response = request.send().await.map_err(http_err(url))?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                if let Some(challenge) = challenge
                    && self.answer(url, &challenge).await?
                {
                    continue;
                }
            }
            return Err(status_error(url, response).await);
        }
    }

    /// Sets what answers `challenge`; `false` if we have nothing to answer with.
    async fn answer(&self, url: &str, challenge: &str) -> Result<bool> {
        let auth_err = |reason: String| RegistryError::Auth {
            url: url.to_owned(),
            reason,
        };
        let challenges = http_auth::parse_challenges(challenge)
            .map_err(|e| auth_err(format!("bad challenge {challenge:?}: {e}")))?;
        let param = |c: &http_auth::ChallengeRef<'_>, key: &str| {
            c.params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.to_unescaped())
        };
        if let Some(bearer) = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        {
            let realm = param(bearer, "realm")
                .ok_or_else(|| auth_err("a bearer challenge without a realm".into()))?;
            let service = param(bearer, "service");
            let token = self.token(&realm, service.as_deref()).await?;
            if let Ok(mut a) = self.auth.lock() {
                *a = Some(Auth::Bearer(token));
            }
            return Ok(true);
        }
        let basic = challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"));
        match (&self.credentials, basic) {
            (Some((user, pass)), true) => {
                if let Ok(mut a) = self.auth.lock() {
                    *a = Some(Auth::Basic(user.clone(), pass.clone()));
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A pull token from `realm` (distribution's token protocol), read with a cap.
    async fn token(&self, realm: &str, service: Option<&str>) -> Result<String> {
        let auth_err = |reason: String| RegistryError::Auth {
            url: realm.to_owned(),
            reason,
        };
        let mut url = Url::parse(realm).map_err(|_| RegistryError::Url {
            url: realm.to_owned(),
        })?;
        match url.scheme() {
            "https" => {}
            "http" if self.plain => {}
            other => {
                return Err(auth_err(format!(
                    "the token realm's scheme {other:?} is not allowed (https, or http for a \
                     plain-HTTP registry)"
                )));
            }
        }
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("scope", &format!("repository:{}:pull", self.repository));
            if let Some(service) = service {
                query.append_pair("service", service);
            }
        }
        let url = url.to_string();
        let mut request = self
            .http
            .get(&url)
            .headers(self.headers.clone())
            .timeout(METADATA_TIMEOUT);
        if let Some((user, pass)) = &self.credentials {
            request = request.basic_auth(user, Some(pass));
        }
        let response = request.send().await.map_err(http_err(&url))?;
        if !response.status().is_success() {
            return Err(status_error(&url, response).await);
        }
        let body = read_capped(&url, response, MAX_METADATA_BYTES).await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| auth_err(format!("the token response is not JSON: {e}")))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_err("the token response has no token".into()))
    }
}

/// The endpoints of one pull, in the order they are tried: a request goes to the first that
/// has the capability it needs and moves on to the next on any failure (no connection, an
/// error status, an authentication that failed, an oversized answer), as containerd's
/// resolver and fetcher do. A body that breaks off mid-stream is not retried elsewhere: the
/// layer's ingest stays for the next pull to resume.
pub(crate) struct Endpoints {
    namespace: String,
    list: Vec<Registry>,
}

impl Endpoints {
    pub(crate) fn new(namespace: &str, list: Vec<Registry>) -> Endpoints {
        Endpoints {
            namespace: namespace.to_owned(),
            list,
        }
    }

    /// The endpoints' API roots, in order.
    #[cfg(test)]
    pub(crate) fn urls(&self) -> Vec<&str> {
        self.list.iter().map(Registry::url).collect()
    }

    /// Tries `f` on each endpoint with `need`, in order: the first success and the endpoint
    /// that gave it, or the most telling failure (an error status over a "not found" over
    /// no answer, as containerd ranks them).
    async fn each<'a, T, F, Fut>(
        &'a self,
        need: Capabilities,
        what: &'static str,
        f: F,
    ) -> Result<(T, &'a Registry)>
    where
        F: Fn(&'a Registry) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let candidates: Vec<&Registry> = self
            .list
            .iter()
            .filter(|r| r.capabilities.has(need))
            .collect();
        let mut worst: Option<(u8, RegistryError)> = None;
        let last = candidates.len().saturating_sub(1);
        for (i, r) in candidates.into_iter().enumerate() {
            match f(r).await {
                Ok(v) => return Ok((v, r)),
                Err(e) => {
                    let rank = match &e {
                        RegistryError::Status { .. } if e.is_not_found() => 2,
                        RegistryError::Status { .. } | RegistryError::TooLarge { .. } => 3,
                        _ => 1,
                    };
                    if i < last {
                        tracing::info!(host = r.url(), error = %switchyard_base::chain(&e), "trying the next host");
                    }
                    if worst.as_ref().is_none_or(|(w, _)| rank > *w) {
                        worst = Some((rank, e));
                    }
                }
            }
        }
        Err(worst.map_or_else(
            || RegistryError::NoEndpoint {
                namespace: self.namespace.clone(),
                what,
            },
            |(_, e)| e,
        ))
    }

    /// A manifest or index by tag, from an endpoint trusted to resolve; returns the
    /// endpoint's URL with it.
    pub(crate) async fn resolve(&self, tag: &str, accept: &[&str]) -> Result<(Vec<u8>, &str)> {
        let (b, r) = self
            .each(Capabilities::RESOLVE, "resolve a tag", |r| {
                r.manifest(tag, accept)
            })
            .await?;
        Ok((b, r.url()))
    }

    /// A manifest or index by digest (the caller checks the digest).
    pub(crate) async fn manifest(&self, digest: &str, accept: &[&str]) -> Result<(Vec<u8>, &str)> {
        let (b, r) = self
            .each(Capabilities::PULL, "pull", |r| r.manifest(digest, accept))
            .await?;
        Ok((b, r.url()))
    }

    pub(crate) async fn small_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        Ok(self
            .each(Capabilities::PULL, "pull", |r| r.small_blob(digest, limit))
            .await?
            .0)
    }

    pub(crate) async fn blob(&self, digest: &str, offset: u64) -> Result<Blob> {
        Ok(self
            .each(Capabilities::PULL, "pull", |r| r.blob(digest, offset))
            .await?
            .0)
    }
}

/// Reads `response`'s body, refusing one over `limit` bytes (by its `Content-Length` before
/// reading, or as soon as the bytes pass it).
async fn read_capped(url: &str, mut response: Response, limit: u64) -> Result<Vec<u8>> {
    let too_large = || RegistryError::TooLarge {
        url: url.to_owned(),
        limit,
    };
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_err(url))? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error for a failed response, with the distribution error codes of (at most
/// [`MAX_ERROR_BODY`] bytes of) its body.
async fn status_error(url: &str, mut response: Response) -> RegistryError {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = usize::try_from(MAX_ERROR_BODY)
            .unwrap_or(usize::MAX)
            .saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() as u64 >= MAX_ERROR_BODY {
            break;
        }
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: String,
        #[serde(default)]
        message: String,
    }
    let (codes, message) = match serde_json::from_slice::<Envelope>(&body) {
        Ok(e) => (
            e.errors.iter().map(|e| e.code.clone()).collect(),
            e.errors
                .iter()
                .map(|e| e.message.as_str())
                .filter(|m| !m.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Err(_) => (Vec::new(), String::new()),
    };
    RegistryError::Status {
        url: url.to_owned(),
        status,
        codes,
        message: message.chars().take(512).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{Capabilities, Endpoint};

    fn endpoints(list: &[(&str, Capabilities)]) -> Endpoints {
        let regs = list
            .iter()
            .map(|(host, caps)| {
                let mut e = Endpoint::default_for("registry.example", false);
                e.host = (*host).to_owned();
                e.capabilities = *caps;
                Registry::new(&e, Vec::new(), "registry.example", "app", None).unwrap()
            })
            .collect();
        Endpoints::new("registry.example", regs)
    }

    fn status(url: &str, status: u16) -> RegistryError {
        RegistryError::Status {
            url: url.to_owned(),
            status,
            codes: Vec::new(),
            message: String::new(),
        }
    }

    #[tokio::test]
    async fn hosts_are_tried_in_order_with_the_capability_asked_for() {
        let e = endpoints(&[
            ("pull-only", Capabilities::PULL),
            ("down", Capabilities::ALL),
            ("server", Capabilities::ALL),
        ]);
        let tried = Mutex::new(Vec::new());
        let (v, r) = e
            .each(Capabilities::RESOLVE, "resolve a tag", |r| {
                let url = r.url().to_owned();
                tried.lock().unwrap().push(url.clone());
                async move {
                    if url.contains("down") {
                        Err(status(&url, 503))
                    } else {
                        Ok(1)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(v, 1);
        assert_eq!(r.url(), "https://server/v2");
        assert_eq!(
            *tried.lock().unwrap(),
            ["https://down/v2", "https://server/v2"]
        );
        // Content by digest: the pull-only mirror first.
        let (_, r) = e
            .each(Capabilities::PULL, "pull", |_| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(r.url(), "https://pull-only/v2");
    }

    #[tokio::test]
    async fn the_most_telling_failure_is_reported() {
        let e = endpoints(&[
            ("a", Capabilities::ALL),
            ("b", Capabilities::ALL),
            ("c", Capabilities::ALL),
        ]);
        let err = e
            .each(Capabilities::PULL, "pull", |r| {
                let url = r.url().to_owned();
                async move {
                    Err::<(), _>(match url.as_str() {
                        "https://a/v2" => RegistryError::Url { url },
                        "https://b/v2" => status(&url, 404),
                        _ => status(&url, 500),
                    })
                }
            })
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("https://c/v2: HTTP 500"), "{err}");
        // Not found beats no answer.
        let e2 = endpoints(&[("a", Capabilities::ALL), ("b", Capabilities::ALL)]);
        let err = e2
            .each(Capabilities::PULL, "pull", |r| {
                let url = r.url().to_owned();
                async move {
                    Err::<(), _>(if url.contains("//a") {
                        status(&url, 404)
                    } else {
                        RegistryError::Url { url }
                    })
                }
            })
            .await
            .err()
            .unwrap();
        assert!(err.is_not_found(), "{err}");
        // Nothing may resolve: say so.
        let e3 = endpoints(&[("a", Capabilities::PULL)]);
        let err = e3
            .each(Capabilities::RESOLVE, "resolve a tag", |_| async { Ok(()) })
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "no configured host of registry.example may resolve a tag"
        );
    }

    #[test]
    fn a_mirror_gets_the_ns_parameter_and_no_credentials() {
        let creds = Some(("u".to_owned(), "p".to_owned()));
        let mut m = Endpoint::default_for("registry.k8s.io", false);
        m.host = "mirror.example".into();
        let r = Registry::new(&m, Vec::new(), "registry.k8s.io", "pause", creds.clone()).unwrap();
        assert_eq!(r.query, "?ns=registry.k8s.io");
        assert!(r.credentials.is_none());
        let own = Endpoint::default_for("docker.io", false);
        let r = Registry::new(&own, Vec::new(), "docker.io", "library/busybox", creds).unwrap();
        assert_eq!(r.query, "");
        assert!(r.credentials.is_some());
        assert_eq!(r.base, "https://registry-1.docker.io/v2/library/busybox");
    }
}
