//! One client per configured upstream registry: requests with timeouts, token and Basic
//! auth, redirects (reqwest drops `Authorization` when a redirect leaves the host), and the
//! mapping of upstream answers to a few kinds the cache can decide on. Knows nothing of the cache.

mod auth;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::{header, Method, StatusCode};
use url::Url;

pub use auth::{parse_challenge, Challenge};
use auth::{Auth, Credential, TokenResponse};

use crate::config::{ConfigError, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, OCI_INDEX};

/// Why the upstream gave no usable answer. `Clone` so coalesced requests share one outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found upstream")]
    NotFound,
    #[error("upstream denied access (HTTP {0})")]
    Denied(u16),
    #[error("upstream is rate limiting (HTTP 429)")]
    RateLimited,
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    #[error("upstream sent an invalid response: {0}")]
    Invalid(String),
    #[error("manifest from upstream is larger than the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge,
    /// A status the API does not give for this request (a 3xx not followed, 405, 400…).
    #[error("upstream answered an unexpected HTTP {0}")]
    Status(u16),
    /// The upstream is configured `offline`: no request was sent.
    #[error("the mirror is offline for {0}")]
    Offline(String),
}

impl UpstreamError {
    /// Whether a cached answer should stand in for this failure (stale-on-error).
    pub fn is_transient(&self) -> bool {
        matches!(self, UpstreamError::RateLimited | UpstreamError::Unavailable(_) | UpstreamError::Offline(_))
    }
}

/// What a manifest HEAD told.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

/// A manifest's bytes as the upstream sent them.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
}

pub struct Upstream {
    /// The registry host clients use; also the storage prefix of its repositories.
    pub name: String,
    /// Other names clients use for it in `?ns=`.
    aliases: Vec<String>,
    /// Docker Hub: one-segment names mean `library/<name>`.
    pub docker_hub: bool,
    /// Repository filters: deny first, then allow (when any allow pattern is set).
    deny: Vec<(String, globset::GlobMatcher)>,
    allow: Vec<(String, globset::GlobMatcher)>,
    base: Url,
    http: reqwest::Client,
    auth: Auth,
    response_timeout: Duration,
    /// How long a revalidated tag may be served without asking again.
    pub tag_ttl: Duration,
    /// How long a referrers list is served without asking again.
    pub referrers_ttl: Duration,
    referrers_max_pages: usize,
    /// Configured offline: no request is ever sent.
    pub offline: bool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("name", &self.name).field("url", &self.base.as_str()).finish()
    }
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, ConfigError> {
        let invalid = |e: String| ConfigError::Invalid(format!("upstream {}: {e}", cfg.name));
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("wharf/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.idle_timeout)
            .redirect(redirect_policy())
            .danger_accept_invalid_certs(cfg.insecure && cfg.url.scheme() == "https");
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|e| invalid(format!("ca_file {}: {e}", ca.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| invalid(format!("ca_file {}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| invalid(e.to_string()))?;
        let globs = |pats: &[String]| -> Result<Vec<(String, globset::GlobMatcher)>, ConfigError> {
            pats.iter()
                .map(|p| {
                    globset::GlobBuilder::new(p)
                        .literal_separator(true)
                        .build()
                        .map(|g| (p.clone(), g.compile_matcher()))
                        .map_err(|e| invalid(format!("pattern {p:?}: {e}")))
                })
                .collect()
        };
        // The failure series exist at 0 from the start, so a dashboard or an alert reads 0
        // rather than "no data" until the first failure.
        metrics.digest_mismatch.with_label_values(&[&cfg.name]);
        metrics.stale_served.with_label_values(&[&cfg.name]);
        for reason in ["unreachable", "offline"] {
            metrics.tag_fallbacks.with_label_values(&[&cfg.name, reason]);
        }
        for kind in ["connect", "timeout", "request", "status", "auth"] {
            metrics.upstream_errors.with_label_values(&[&cfg.name, kind]);
        }
        let mut base = cfg.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Upstream {
            name: cfg.name.clone(),
            aliases: cfg.aliases.clone(),
            docker_hub: cfg.name == "docker.io"
                || cfg.url.host_str().is_some_and(|h| h.ends_with(".docker.io")),
            deny: globs(&cfg.deny)?,
            allow: globs(&cfg.allow)?,
            base,
            http,
            auth: Auth::new(cfg.username.clone(), cfg.resolved_password()?),
            response_timeout: cfg.response_timeout,
            tag_ttl: cfg.tag_ttl,
            referrers_ttl: cfg.referrers_ttl,
            referrers_max_pages: cfg.referrers_max_pages.max(1),
            offline: cfg.is_offline(),
            metrics,
        })
    }

    /// Whether clients address this upstream as `host`.
    pub fn answers_to(&self, host: &str) -> bool {
        self.name == host || self.aliases.iter().any(|a| a == host)
    }

    /// Checks the repository filters; the error names the rule that refused.
    pub fn check_access(&self, repo: &RepoName) -> Result<(), String> {
        if let Some((p, _)) = self.deny.iter().find(|(_, g)| g.is_match(repo.as_str())) {
            return Err(format!("{}/{} is denied by rule deny = {p:?}", self.name, repo));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|(_, g)| g.is_match(repo.as_str())) {
            return Err(format!("{}/{} matches no allow rule of upstream {}", self.name, repo, self.name));
        }
        Ok(())
    }

    fn url(&self, repo: &RepoName, kind: &str, reference: &str) -> Result<Url, UpstreamError> {
        self.base
            .join(&format!("v2/{}/{kind}/{reference}", repo.as_str()))
            .map_err(|e| UpstreamError::Invalid(e.to_string()))
    }

    /// Sends one request, authenticating as the upstream asks (once), and maps failures.
    /// Tokens are kept per `key` (a repository); `scope` is asked for when the challenge
    /// names none. Returns only 2xx responses.
    async fn send(
        &self,
        method: Method,
        url: Url,
        key: &str,
        scope_default: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut cred = self.auth.credential_for(key);
        for attempt in 0..2 {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            req = self.authenticate(req, cred.as_ref());
            let resp = self.timed(method.as_str(), req).await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.auth.forget(key);
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge);
                cred = match challenge {
                    Some(Challenge::Bearer { realm, service, scope }) => {
                        let scope = scope.unwrap_or_else(|| scope_default.to_owned());
                        Some(self.fetch_token(key, &realm, service.as_deref(), &scope).await?)
                    }
                    Some(Challenge::Basic) => self.auth.use_basic(),
                    None => None,
                };
                if cred.is_some() {
                    continue;
                }
            }
            return self.check(resp);
        }
        Err(UpstreamError::Denied(401))
    }

    fn authenticate(
        &self,
        req: reqwest::RequestBuilder,
        cred: Option<&Credential>,
    ) -> reqwest::RequestBuilder {
        match (cred, self.auth.credentials()) {
            (Some(Credential::Bearer(t)), _) => req.bearer_auth(&t.0),
            (Some(Credential::Basic), Some((u, p))) => req.basic_auth(u, Some(p)),
            _ => req,
        }
    }

    /// Sends with the response timeout and counts the request.
    async fn timed(
        &self,
        method: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        // Every request (registry and token endpoint) passes here: offline, none leaves.
        if self.offline {
            return Err(UpstreamError::Offline(self.name.clone()));
        }
        let start = Instant::now();
        let res = tokio::time::timeout(self.response_timeout, req.send()).await;
        self.metrics
            .upstream_duration
            .with_label_values(&[&self.name])
            .observe(start.elapsed().as_secs_f64());
        match res {
            Ok(Ok(resp)) => {
                self.metrics
                    .upstream_requests
                    .with_label_values(&[&self.name, method, resp.status().as_str()])
                    .inc();
                Ok(resp)
            }
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    "connect"
                } else if e.is_timeout() {
                    "timeout"
                } else {
                    "request"
                };
                self.fail(method, kind);
                Err(UpstreamError::Unavailable(error_chain(&e)))
            }
            Err(_) => {
                self.fail(method, "timeout");
                Err(UpstreamError::Unavailable(format!("no response within {:?}", self.response_timeout)))
            }
        }
    }

    fn fail(&self, method: &str, kind: &str) {
        self.metrics.upstream_requests.with_label_values(&[&self.name, method, "error"]).inc();
        self.metrics.upstream_errors.with_label_values(&[&self.name, kind]).inc();
    }

    fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status != StatusCode::NOT_FOUND {
            self.metrics.upstream_errors.with_label_values(&[&self.name, "status"]).inc();
        }
        Err(match status {
            StatusCode::NOT_FOUND => UpstreamError::NotFound,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => UpstreamError::Denied(status.as_u16()),
            StatusCode::TOO_MANY_REQUESTS => UpstreamError::RateLimited,
            s if s.is_server_error() => UpstreamError::Unavailable(format!("HTTP {}", s.as_u16())),
            s => UpstreamError::Status(s.as_u16()),
        })
    }

    /// Gets a Bearer token for `scope` from the realm the upstream named.
    async fn fetch_token(
        &self,
        key: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Credential, UpstreamError> {
        let mut url = Url::parse(realm).map_err(|e| UpstreamError::Invalid(format!("token realm: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UpstreamError::Invalid("token realm is not http(s)".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.http.get(url);
        if let Some((u, p)) = self.auth.credentials() {
            req = req.basic_auth(u, Some(p));
        }
        let resp = self.timed("GET", req).await?;
        if !resp.status().is_success() {
            self.metrics.upstream_errors.with_label_values(&[&self.name, "auth"]).inc();
            return Err(match resp.status() {
                s if s.is_server_error() => {
                    UpstreamError::Unavailable(format!("token endpoint HTTP {}", s.as_u16()))
                }
                StatusCode::TOO_MANY_REQUESTS => UpstreamError::RateLimited,
                s => UpstreamError::Denied(s.as_u16()),
            });
        }
        let body = read_limited(resp, MAX_TOKEN_BYTES, "token response").await.map_err(|e| match e {
            UpstreamError::TooLarge => {
                UpstreamError::Invalid(format!("token response larger than {MAX_TOKEN_BYTES} bytes"))
            }
            e => e,
        })?;
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Invalid(format!("token response is not a token: {e}")))?;
        self.auth
            .store_token(key, t)
            .ok_or_else(|| UpstreamError::Invalid("token response has no token".into()))
    }

    /// HEAD a manifest: learns the current digest without counting as a pull.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let url = self.url(repo, "manifests", reference)?;
        let resp =
            self.send(Method::HEAD, url, repo.as_str(), &pull_scope(repo), Some(MANIFEST_ACCEPT)).await?;
        let digest =
            resp.headers().get("docker-content-digest").and_then(|h| h.to_str().ok()).and_then(Digest::parse);
        Ok(ManifestHead { digest })
    }

    /// GETs a manifest, refusing bodies over the manifest size limit.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<FetchedManifest, UpstreamError> {
        let url = self.url(repo, "manifests", reference)?;
        let resp =
            self.send(Method::GET, url, repo.as_str(), &pull_scope(repo), Some(MANIFEST_ACCEPT)).await?;
        if resp.content_length().is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
            return Err(UpstreamError::TooLarge);
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let body = read_limited(resp, MAX_MANIFEST_BYTES, "manifest body").await?;
        self.metrics.upstream_bytes.with_label_values(&[&self.name]).inc_by(body.len() as u64);
        Ok(FetchedManifest { bytes: body, content_type })
    }

    /// GETs a blob; the caller streams the body.
    pub async fn get_blob(&self, repo: &RepoName, d: &Digest) -> Result<reqwest::Response, UpstreamError> {
        let url = self.url(repo, "blobs", &d.to_string())?;
        self.send(Method::GET, url, repo.as_str(), &pull_scope(repo), None).await
    }

    /// HEADs a blob: its size, when the upstream says.
    pub async fn head_blob(&self, repo: &RepoName, d: &Digest) -> Result<Option<u64>, UpstreamError> {
        let url = self.url(repo, "blobs", &d.to_string())?;
        let resp = self.send(Method::HEAD, url, repo.as_str(), &pull_scope(repo), None).await?;
        Ok(resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|h| h.to_str().ok())
            .and_then(|s| s.parse().ok()))
    }

    pub fn count_body_bytes(&self, n: u64) {
        self.metrics.upstream_bytes.with_label_values(&[&self.name]).inc_by(n);
    }
}

/// An error with its sources, for logs (reqwest's top-level message alone hides the cause).
/// Most bytes a token endpoint's answer may have (real ones are a few KiB).
const MAX_TOKEN_BYTES: usize = 256 * 1024;

/// A whole response body of at most `max` bytes; [`UpstreamError::TooLarge`] past it,
/// whatever the headers said.
async fn read_limited(
    resp: reqwest::Response,
    max: usize,
    what: &str,
) -> Result<bytes::Bytes, UpstreamError> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(UpstreamError::TooLarge);
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Unavailable(format!("{what}: {}", error_chain(&e))))?;
        if body.len() + chunk.len() > max {
            return Err(UpstreamError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Redirects are followed (registries send blobs to a CDN on another host: Docker Hub to
/// Cloudflare, GHCR to githubusercontent, quay to S3), at most 5, to http(s) only, and
/// never from https down to http. reqwest drops `Authorization` when one leaves the host.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade =
            attempt.url().scheme() == "http" && attempt.previous().iter().any(|u| u.scheme() == "https");
        let referrers_off_host = attempt.previous().first().is_some_and(|first| {
            first.path().contains("/referrers/") && first.host_str() != attempt.url().host_str()
        });
        if referrers_off_host {
            // GHCR sends the referrers API to a rate-limited web API on another host: taken
            // as "no referrers API here", so the tag schema is asked instead.
            attempt.stop()
        } else if attempt.previous().len() > 5 {
            attempt.error("more than 5 redirects (a redirect loop?)")
        } else if !matches!(attempt.url().scheme(), "http" | "https") {
            attempt.error("redirect to a scheme other than http(s)")
        } else if downgrade {
            attempt.error("redirect from https down to http")
        } else {
            attempt.follow()
        }
    })
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn pull_scope(repo: &RepoName) -> String {
    format!("repository:{}:pull", repo.as_str())
}

/// One page of a listing (`tags/list`, `_catalog`): the JSON body and whether the upstream
/// says there is more (a `Link: <…>; rel="next"` header).
#[derive(Debug, Clone)]
pub struct Page {
    pub body: Bytes,
    pub more: bool,
}

impl Upstream {
    /// `GET /v2/<repo>/tags/list?n=&last=`.
    pub async fn tags_list(
        &self,
        repo: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page, UpstreamError> {
        let url = self.listing_url(&format!("v2/{}/tags/list", repo.as_str()), n, last)?;
        self.page(url, repo.as_str(), &pull_scope(repo)).await
    }

    /// `GET /v2/_catalog?n=&last=`.
    pub async fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Page, UpstreamError> {
        let url = self.listing_url("v2/_catalog", n, last)?;
        self.page(url, "_catalog", "registry:catalog:*").await
    }

    fn listing_url(&self, path: &str, n: Option<usize>, last: Option<&str>) -> Result<Url, UpstreamError> {
        let mut url = self.base.join(path).map_err(|e| UpstreamError::Invalid(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(n) = n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(l) = last {
                q.append_pair("last", l);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        Ok(url)
    }

    async fn page(&self, url: Url, key: &str, scope: &str) -> Result<Page, UpstreamError> {
        let resp = self.send(Method::GET, url, key, scope, Some("application/json")).await?;
        let more = resp
            .headers()
            .get(header::LINK)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|l| l.contains("rel=\"next\""));
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| UpstreamError::Unavailable(format!("listing body: {}", error_chain(&e))))?;
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(UpstreamError::Invalid("listing larger than 4 MiB".into()));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Page { body: body.freeze(), more })
    }

    /// The upstream's referrers API for `d`, every page of it (at most
    /// `referrers_max_pages`, each within the manifest size limit): the descriptors of the
    /// index. `None` when the upstream has no referrers API: it answers 404, 405 or 400,
    /// or sends the request to another host.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Option<Vec<serde_json::Value>>, UpstreamError> {
        let mut url = self.url(repo, "referrers", &d.to_string())?;
        let mut out = Vec::new();
        for _ in 0..self.referrers_max_pages {
            let resp = match self
                .send(Method::GET, url.clone(), repo.as_str(), &pull_scope(repo), Some(OCI_INDEX))
                .await
            {
                Ok(r) => r,
                Err(UpstreamError::NotFound | UpstreamError::Status(300..=399 | 400 | 405))
                    if out.is_empty() =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            };
            let next = next_link(resp.headers()).and_then(|l| url.join(&l).ok());
            let body = read_limited(resp, MAX_MANIFEST_BYTES, "referrers body").await?;
            self.metrics.upstream_bytes.with_label_values(&[&self.name]).inc_by(body.len() as u64);
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| UpstreamError::Invalid(format!("referrers answer is not JSON: {e}")))?;
            let list = v
                .get("manifests")
                .and_then(|m| m.as_array())
                .ok_or_else(|| UpstreamError::Invalid("referrers answer has no manifests list".into()))?;
            out.extend(list.iter().cloned());
            // The next page only from the same registry: it gets this upstream's credentials.
            match next.filter(|n| n.origin() == self.base.origin()) {
                Some(n) => url = n,
                None => return Ok(Some(out)),
            }
        }
        tracing::warn!(upstream = %self.name, repository = %repo, digest = %d, pages = self.referrers_max_pages, "referrers list cut at referrers_max_pages");
        Ok(Some(out))
    }
}

/// The target of a `Link: <…>; rel="next"` header.
fn next_link(h: &header::HeaderMap) -> Option<String> {
    h.get_all(header::LINK).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).find_map(|l| {
        let (target, params) = l.trim().split_once(';')?;
        params
            .contains("rel=\"next\"")
            .then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_owned())
    })
}
