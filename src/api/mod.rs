//! The HTTP surface: parses the route, asks the cache, and builds every client response.

pub mod body;
mod error;
mod route;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tracing::Instrument;

pub use body::Body;
pub use error::ApiError;
pub use route::{parse as parse_route, Route};

use crate::analytics::ManifestServed;
use crate::auth::{Access, Identity};
use crate::cache::{read_at, BlobBody, ByteRange, Lease, RangeSpec, ServedManifest};
use crate::oci::{
    default_platform_child, is_index, Digest, Reference, RepoName, Tag, OCI_INDEX, OCI_MANIFEST,
};
use crate::store::RepoKey;
use crate::upstream::Upstream;
use crate::zerocopy::Regions;
use crate::AppState;

/// Blobs (or ranges) up to this size are read inline instead of on the blocking pool.
const INLINE_READ_MAX: u64 = 64 * 1024;

/// The verified client certificate's user name, set on requests of mutual-TLS connections.
#[derive(Clone, Debug)]
pub struct ClientCert(pub Arc<str>);

/// Which listener a request came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Data,
    Admin,
}

/// Answers one request on the registry port. Never fails: errors become OCI error
/// responses.
pub async fn handle(state: AppState, req: Request<Incoming>, client: IpAddr) -> Response<Body> {
    answer(state, req, client, Port::Data).await
}

/// The admin listener (`admin.listen`): `/metrics` and `/_wharf/*`, no registry API.
pub async fn handle_admin(state: AppState, req: Request<Incoming>, client: IpAddr) -> Response<Body> {
    answer(state, req, client, Port::Admin).await
}

async fn answer(state: AppState, req: Request<Incoming>, client: IpAddr, port: Port) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let route = route::parse(req.uri().path());
    let label = route.as_ref().map(Route::label).unwrap_or("other");
    let span = tracing::info_span!("request", method = %method, route = label, uri = %req.uri(), user = tracing::field::Empty);
    let head = method == Method::HEAD;
    let token_route = matches!(route, Ok(Route::Token));
    let resp = async {
        let route = route?;
        let admin_route = route.is_admin();
        match (port, admin_route) {
            (Port::Admin, false) if !matches!(route, Route::Health | Route::Ready) => return Err(ApiError::NotFound(
                "this address serves /metrics and /_wharf/* only; the registry API is on the main listener"
                    .into(),
            )),
            (Port::Data, true) if state.config.admin.listen.is_some() => {
                return Err(ApiError::NotFound("served on the admin listener (admin.listen) only".into()))
            }
            _ => {}
        }
        // The admin actions that change something are POSTs; the registry API is read-only.
        let post = method == Method::POST && matches!(route, Route::Gc | Route::Prefetch { .. });
        if method != Method::GET && method != Method::HEAD && !post {
            return Err(ApiError::Unsupported(format!(
                "{method} is not supported: wharf is a read-only mirror"
            )));
        }
        let identity = identify(&state, &req, client, &route).await?;
        let query = Query::parse(req.uri().query());
        // HTTP/2 multiplexes streams into frames it copies: only HTTP/1 sends blobs zero-copy.
        let zerocopy = match req.version() {
            Version::HTTP_10 | Version::HTTP_11 => req.extensions().get::<Arc<Regions>>(),
            _ => None,
        };
        let ctx =
            Ctx { query: &query, headers: req.headers(), head, client, zerocopy, post, identity };
        dispatch(&state, route, &ctx).await
    }
    .instrument(span.clone())
    .await;
    let mut resp = resp.unwrap_or_else(|e| {
        let challenge = matches!(e, ApiError::Unauthorized(_));
        let mut r = span.in_scope(|| e.into_response(&state.metrics, head));
        if challenge {
            if let Ok(v) = HeaderValue::from_str(&challenge_for(&state, &req, token_route)) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        r
    });
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    let m = &state.metrics;
    m.http_requests.with_label_values(&[method.as_str(), label, resp.status().as_str()]).inc();
    m.http_duration.with_label_values(&[label]).observe(start.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(status = resp.status().as_u16(), "answered"));
    resp
}

/// The `WWW-Authenticate` of a 401: Basic on the token endpoint (it takes credentials),
/// elsewhere Bearer naming the token endpoint as clients reach it, so each client fetches
/// a token with the credentials it has, or anonymously.
fn challenge_for(state: &AppState, req: &Request<Incoming>, token_route: bool) -> String {
    let clean =
        |s: &str| s.chars().filter(|c| !matches!(c, '"' | '\\') && !c.is_control()).collect::<String>();
    let realm = clean(&state.auth.realm);
    if token_route {
        return format!("Basic realm=\"{realm}\"");
    }
    let url = match &state.config.auth.token_realm {
        Some(u) => clean(u),
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .filter(|h| h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c)))
                .unwrap_or("localhost");
            let scheme = if state.config.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{host}/_wharf/token")
        }
    };
    format!("Bearer realm=\"{url}\",service=\"{realm}\"")
}

/// Who sent the request, and whether that identity may use `route` at all (per-repository
/// rules are checked once the repository is resolved). Health is open to everyone.
async fn identify(
    state: &AppState,
    req: &Request<Incoming>,
    client: IpAddr,
    route: &Route,
) -> Result<Identity, ApiError> {
    let auth = &state.auth;
    if matches!(route, Route::Health | Route::Ready) {
        return Ok(Identity::Anonymous);
    }
    let token_route = matches!(route, Route::Token);
    let cert = req.extensions().get::<ClientCert>().map(|c| &c.0);
    let id = match auth.identify(req.headers(), cert).await {
        Ok(id) => id,
        Err(e) => {
            auth.failed(client, e.reason(), true).await;
            return Err(ApiError::Unauthorized(e.to_string()));
        }
    };
    if let Identity::User(user) = &id {
        auth.succeeded(client);
        tracing::Span::current().record("user", &**user);
    }
    let allowed = if token_route {
        // Anyone gets a token for who they are; an anonymous one grants what anonymous has.
        true
    } else if route.is_admin() {
        auth.may_admin(&id)
    } else if matches!(route, Route::Base)
        && id == Identity::Anonymous
        && !req.headers().contains_key(header::AUTHORIZATION)
    {
        // Clients send credentials only after a challenge, and take it from this probe:
        // while some repository needs them, a client that has not been through the token
        // endpoint (with or without credentials) is challenged here.
        !auth.enforced
    } else {
        auth.may_probe(&id)
    };
    if !allowed {
        return Err(ApiError::Unauthorized("authentication required".into()));
    }
    Ok(id)
}

/// What handlers need to know of the request besides its route.
struct Ctx<'a> {
    query: &'a Query,
    headers: &'a HeaderMap,
    head: bool,
    /// Used to tie a client's digest GETs to the tag it resolved (never a label), and to
    /// tell a local client.
    client: IpAddr,
    /// Set on plain-TCP HTTP/1 connections, which can send stored blobs by `sendfile`.
    zerocopy: Option<&'a Arc<Regions>>,
    /// A POST (`/_wharf/gc` and `/_wharf/prefetch` take one).
    post: bool,
    identity: Identity,
}

async fn dispatch(state: &AppState, route: Route, req: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    let (query, headers, head) = (req.query, req.headers, req.head);
    match route {
        Route::Base => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{}"), head)),
        Route::Health => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"), head)),
        Route::Ready => {
            let store = state.store().clone();
            let ready = tokio::task::spawn_blocking(move || store.check_ready())
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            match ready {
                Ok(()) => {
                    Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ready\"}"), head))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "not ready");
                    Err(ApiError::Unavailable(format!("not ready: {e}")))
                }
            }
        }
        Route::Token => {
            let token = state.auth.issue_token(&req.identity);
            let json = serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": crate::auth::TOKEN_TTL.as_secs(),
                "issued_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            });
            let mut r = json_response(StatusCode::OK, Bytes::from(json.to_string()), head);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(r)
        }
        Route::Metrics => {
            let (blobs, bytes) = state.store().totals();
            state.metrics.cache_blobs.set(blobs as i64);
            state.metrics.cache_bytes.set(bytes as i64);
            let mut r = Response::new(body::full(state.metrics.render()));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            Ok(r)
        }
        Route::Manifest { name, reference } => {
            let (up, name) = pullable(state, &name, req)?;
            let m = match manifest(state, &up, &name, &reference, headers).await {
                Ok(m) => m,
                Err(e) => {
                    state.analytics.manifest_failed(&up.name, head);
                    return Err(e);
                }
            };
            state.analytics.manifest_served(ManifestServed {
                client: req.client,
                upstream: &up.name,
                repo: &name,
                reference: &reference,
                digest: &m.digest,
                manifest: &m.manifest,
                result: m.result,
                head,
            });
            tracing::debug!(upstream = %up.name, repository = %name, digest = %m.digest, cache = m.result.as_str(), "manifest");
            Ok(manifest_response(&m, head))
        }
        Route::Blob { name, digest } => {
            let (up, name) = pullable(state, &name, req)?;
            let res = if head {
                blob_head(state, &up, &name, &digest).await
            } else {
                blob_get(state, &up, &name, &digest, req).await
            };
            if res.is_err() {
                state.analytics.blob_served(&up.name, "error");
            }
            res
        }
        Route::TagsList { name: asked } => {
            let (up, name) = pullable(state, &asked, req)?;
            let page = state
                .cache
                .tags_list(&up, &name, query.n, query.last.as_deref())
                .await
                .map_err(|e| ApiError::from_cache(e, false).for_listing())?;
            let json = serde_json::json!({ "name": name.as_str(), "tags": page.names });
            let next = format!("/v2/{}/tags/list", asked.as_str());
            Ok(listing_response(json, &page, &next, query, head))
        }
        Route::Referrers { name: asked, digest } => {
            let (up, name) = pullable(state, &asked, req)?;
            let r = state
                .cache
                .referrers(&up, &name, &digest)
                .await
                .map_err(|e| ApiError::from_cache(e, false))?;
            state
                .metrics
                .referrers_requests
                .with_label_values(&[&up.name, r.source.as_str(), r.result.as_str()])
                .inc();
            tracing::debug!(upstream = %up.name, repository = %name, digest = %digest, source = r.source.as_str(), cache = r.result.as_str(), "referrers");
            let path = format!("/v2/{}/referrers/{digest}", asked.as_str());
            Ok(referrers_response(r.manifests, &path, query, head))
        }
        Route::Catalog => {
            let up = match &query.ns {
                Some(ns) => find_upstream(&state.upstreams, ns)?,
                None => state.default_upstream().clone(),
            };
            let page = state
                .cache
                .catalog(&up, query.n, query.last.as_deref())
                .await
                .map_err(|e| ApiError::from_cache(e, false))?;
            let json = serde_json::json!({ "repositories": page.names });
            Ok(listing_response(json, &page, "/v2/_catalog", query, head))
        }
        Route::History { name, tag } => {
            let (st, ns) = (state.clone(), query.ns.clone());
            tokio::task::spawn_blocking(move || history(&st, &name, &tag, ns.as_deref(), head))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
        }
        Route::Gc => {
            // GET is a dry run: it reports and changes nothing.
            let report = state.cache.collect(!req.post).await.map_err(|e| ApiError::from_cache(e, false))?;
            let json = serde_json::to_vec(&report).map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(json_response(StatusCode::OK, Bytes::from(json), head))
        }
        Route::Prefetch { name: asked, what } => {
            if !req.post {
                return Err(ApiError::Unsupported("a prefetch is a POST".into()));
            }
            let (up, name) = pullable(state, &asked, req)?;
            prefetch(state, &up, &name, &asked, what, req).await
        }
        Route::Stats => {
            // A report reads every per-day series: not on the async workers.
            let (store, top, since) = (state.store().clone(), query.top.unwrap_or(10), query.since.clone());
            let report =
                tokio::task::spawn_blocking(move || crate::analytics::report(&store, top, since.as_deref()))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            let json = serde_json::to_vec(&report).map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(json_response(StatusCode::OK, Bytes::from(json), head))
        }
    }
}

/// The query parameters wharf reads.
#[derive(Debug, Default)]
pub struct Query {
    /// `ns=<registry host>`: containerd names the registry a mirror serves.
    pub ns: Option<String>,
    /// Page size of a listing.
    pub n: Option<usize>,
    /// Last name of the previous page of a listing.
    pub last: Option<String>,
    /// Length of the top lists of `/_wharf/stats`.
    pub top: Option<usize>,
    /// First day (`YYYY-MM-DD`) `/_wharf/stats` counts.
    pub since: Option<String>,
    /// `artifactType=` of a referrers request.
    pub artifact_type: Option<String>,
    /// `pin=1` on a prefetch by tag: the tag's image is never evicted.
    pub pin: bool,
}

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        let mut out = Query::default();
        for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            match &*k {
                "ns" => out.ns = Some(v.into_owned()),
                "n" => out.n = v.parse().ok(),
                "last" => out.last = Some(v.into_owned()),
                "top" => out.top = v.parse().ok(),
                "since" => out.since = Some(v.into_owned()),
                "pin" => out.pin = matches!(&*v, "1" | "true"),
                // A media type has no spaces: a `+` a client left unencoded
                // (`…+json`) is a plus, not the space form decoding makes of it.
                "artifactType" => out.artifact_type = Some(v.replace(' ', "+")),
                _ => {}
            }
        }
        out
    }
}

fn find_upstream(upstreams: &[Arc<Upstream>], host: &str) -> Result<Arc<Upstream>, ApiError> {
    upstreams.iter().find(|u| u.answers_to(host)).cloned().ok_or_else(|| {
        ApiError::NameUnknown(format!("no upstream registry {host:?} is configured in this mirror"))
    })
}

/// The upstream and upstream-relative repository a request names, in this order: `?ns=`,
/// a path prefix naming an upstream (`/v2/ghcr.io/org/app/...`), else the default upstream.
/// A first segment that looks like a host (`quay.io`) but names no upstream is refused:
/// wharf never contacts a registry it was not configured for. Docker Hub's one-segment
/// names are its official images (`alpine` is `library/alpine`).
pub fn resolve(
    upstreams: &[Arc<Upstream>],
    name: &RepoName,
    ns: Option<&str>,
) -> Result<(Arc<Upstream>, RepoName), ApiError> {
    let (up, repo) = match (ns, name.as_str().split_once('/')) {
        (Some(ns), _) => (find_upstream(upstreams, ns)?, name.clone()),
        (None, Some((first, rest))) => match upstreams.iter().find(|u| u.answers_to(first)) {
            Some(up) => {
                let rest = RepoName::parse(rest)
                    .ok_or_else(|| ApiError::NameInvalid(format!("invalid repository name {rest:?}")))?;
                (up.clone(), rest)
            }
            None if first.contains('.') || first == "localhost" => {
                return Err(ApiError::NameUnknown(format!(
                    "no upstream registry {first:?} is configured in this mirror"
                )))
            }
            None => (upstreams[0].clone(), name.clone()),
        },
        (None, None) => (upstreams[0].clone(), name.clone()),
    };
    if up.docker_hub && !repo.as_str().contains('/') {
        let official = RepoName::parse(&format!("library/{}", repo.as_str()))
            .ok_or_else(|| ApiError::NameInvalid(format!("invalid repository name {:?}", repo.as_str())))?;
        return Ok((up, official));
    }
    Ok((up, repo))
}

/// [`resolve`], then the access rules for this client, then the upstream's allow/deny
/// rules.
fn pullable(state: &AppState, name: &RepoName, req: &Ctx<'_>) -> Result<(Arc<Upstream>, RepoName), ApiError> {
    let (up, repo) = resolve(&state.upstreams, name, req.query.ns.as_deref())?;
    match state.auth.may_pull(&req.identity, &up.name, repo.as_str()) {
        Access::Allowed => {}
        Access::NeedsCredentials => {
            return Err(ApiError::Unauthorized(format!(
                "authentication required to pull {}/{}",
                up.name,
                repo.as_str()
            )))
        }
        Access::Forbidden => {
            state.auth.refused("forbidden");
            return Err(ApiError::Denied(format!(
                "{} may not pull {}/{}",
                req.identity.name(),
                up.name,
                repo.as_str()
            )));
        }
    }
    up.check_access(&repo).map_err(ApiError::Denied)?;
    Ok((up, repo))
}

/// A listing page, with a `Link` to the next page when there is one.
fn listing_response(
    json: serde_json::Value,
    page: &crate::cache::Listing,
    path: &str,
    query: &Query,
    head: bool,
) -> Response<Body> {
    let mut r = json_response(StatusCode::OK, Bytes::from(json.to_string()), head);
    let h = r.headers_mut();
    h.insert("wharf-source", HeaderValue::from_static(if page.from_cache { "cache" } else { "upstream" }));
    if let (true, Some(last)) = (page.more, page.names.last()) {
        if let Some(v) = next_page_link(path, query, last, None) {
            h.insert(header::LINK, v);
        }
    }
    r
}

/// `Link: <path?n=&last=…>; rel="next"`, keeping the client's `n`, `ns` and (for referrers)
/// `artifactType`.
fn next_page_link(path: &str, query: &Query, last: &str, artifact_type: Option<&str>) -> Option<HeaderValue> {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(n) = query.n {
        q.append_pair("n", &n.to_string());
    }
    q.append_pair("last", last);
    if let Some(t) = artifact_type {
        q.append_pair("artifactType", t);
    }
    if let Some(ns) = &query.ns {
        q.append_pair("ns", ns);
    }
    HeaderValue::from_str(&format!("<{path}?{}>; rel=\"next\"", q.finish())).ok()
}

/// Most descriptors in one page of a referrers answer when the client does not ask for `n`
/// (a page stays well within the 4 MiB a client reads of an index).
const REFERRERS_PAGE: usize = 1000;

/// A referrers answer: always an OCI index, filtered by `artifactType` here whatever the
/// upstream did, and paginated (`n`, `last` = the last digest of the previous page) with a
/// `Link` to the next page.
fn referrers_response(
    mut list: Vec<serde_json::Value>,
    path: &str,
    query: &Query,
    head: bool,
) -> Response<Body> {
    if let Some(t) = &query.artifact_type {
        list.retain(|m| m.get("artifactType").and_then(|a| a.as_str()) == Some(t.as_str()));
    }
    let start = query
        .last
        .as_deref()
        .and_then(|l| list.iter().position(|m| m.get("digest").and_then(|d| d.as_str()) == Some(l)))
        .map(|i| i + 1)
        .unwrap_or(0);
    let n = query.n.unwrap_or(REFERRERS_PAGE).clamp(1, REFERRERS_PAGE);
    let page: Vec<serde_json::Value> = list.iter().skip(start).take(n).cloned().collect();
    let more = start + page.len() < list.len();
    let json = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": page });
    let json = Bytes::from(json.to_string());
    let len = json.len();
    let mut r = Response::new(if head { body::empty() } else { body::full(json) });
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if query.artifact_type.is_some() {
        h.insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
    }
    let last = page.last().and_then(|m| m.get("digest")).and_then(|d| d.as_str());
    if let (true, Some(last)) = (more, last) {
        if let Some(v) = next_page_link(path, query, last, query.artifact_type.as_deref()) {
            h.insert(header::LINK, v);
        }
    }
    r
}

/// A prefetch: the cache fetches what a pull would, the same way (verified, single-flight),
/// and the request is counted apart from pulls. A blob answers with its size and whether
/// it was held already, once it is verified, not with its bytes.
async fn prefetch(
    state: &AppState,
    up: &Arc<Upstream>,
    name: &RepoName,
    asked: &RepoName,
    what: route::Prefetch,
    req: &Ctx<'_>,
) -> Result<Response<Body>, ApiError> {
    let m = &state.metrics;
    match what {
        route::Prefetch::Manifest(reference) => {
            let served = manifest(state, up, name, &reference, req.headers).await;
            let result = served.as_ref().map(|s| s.result.as_str()).unwrap_or("error");
            m.prefetch_manifests.with_label_values(&[&up.name, result]).inc();
            let served = served?;
            if let (true, Reference::Tag(t)) = (req.query.pin, &reference) {
                // A pin outlives eviction, so an anonymous remote client could fill the
                // disk with it: pinning takes a signed-in user or a client on this host.
                if !matches!(req.identity, Identity::User(_)) && !req.client.to_canonical().is_loopback() {
                    return Err(ApiError::Denied(
                        "pinning needs a signed-in user or a client on the mirror's own host".into(),
                    ));
                }
                let (store, key, t) = (state.store().clone(), RepoKey::new(&up.name, name), t.clone());
                tokio::task::spawn_blocking(move || store.pin(&key, &t))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            let mut r = manifest_response(&served, false);
            if let Ok(v) = HeaderValue::from_str(served.result.as_str()) {
                r.headers_mut().insert("x-wharf-cache", v);
            }
            Ok(r)
        }
        route::Prefetch::Blob(d) => {
            let answer = state.cache.blob(up, name, &d, None, true).await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    m.prefetch_blobs.with_label_values(&[&up.name, "error"]).inc();
                    return Err(ApiError::from_cache(e, true));
                }
            };
            let size = match &answer.body {
                BlobBody::File { size, .. }
                | BlobBody::Stream { size, .. }
                | BlobBody::Redirect { size, .. } => Some(*size),
                BlobBody::Filling { size, .. } => *size,
                BlobBody::Bytes(b) => Some(b.len() as u64),
            };
            let cached = matches!(answer.result, crate::cache::BlobResult::Hit);
            let result = if cached { "hit" } else { "fetched" };
            m.prefetch_blobs.with_label_values(&[up.name.as_str(), result]).inc();
            if !cached {
                m.prefetch_bytes.with_label_values(&[&up.name]).inc_by(size.unwrap_or(0));
            }
            let json = serde_json::json!({ "digest": d.to_string(), "size": size, "cached": cached });
            Ok(json_response(StatusCode::OK, Bytes::from(json.to_string()), false))
        }
        route::Prefetch::Referrers(d) => {
            let r = state.cache.referrers(up, name, &d).await.map_err(|e| ApiError::from_cache(e, false))?;
            let path = format!("/_wharf/prefetch/{}/referrers/{d}", asked.as_str());
            Ok(referrers_response(r.manifests, &path, req.query, false))
        }
    }
}

/// A manifest, negotiated against the client's `Accept` as distribution does: an index the
/// client cannot read is answered with its linux/amd64 child; an OCI manifest the client
/// cannot read is unknown to it.
async fn manifest(
    state: &AppState,
    up: &Arc<Upstream>,
    name: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
) -> Result<ServedManifest, ApiError> {
    let cache = &state.cache;
    let m = match reference {
        Reference::Tag(t) => cache.manifest_by_tag(up, name, t).await,
        Reference::Digest(d) => cache.manifest_by_digest(up, name, d).await,
    }
    .map_err(|e| ApiError::from_cache(e, false))?;
    let mt = m.manifest.media_type.as_str();
    if accepts(headers, mt) {
        return Ok(m);
    }
    if is_index(mt) {
        let child = default_platform_child(&m.manifest.bytes).ok_or_else(|| {
            ApiError::ManifestUnknown(format!(
                "{mt} found, but the client does not accept it and it has no linux/amd64 image"
            ))
        })?;
        let c =
            cache.manifest_by_digest(up, name, &child).await.map_err(|e| ApiError::from_cache(e, false))?;
        if accepts(headers, &c.manifest.media_type) {
            return Ok(ServedManifest { result: m.result, ..c });
        }
        return Err(ApiError::ManifestUnknown(format!(
            "{} found, but the client does not accept it",
            c.manifest.media_type
        )));
    }
    if mt == OCI_MANIFEST {
        return Err(ApiError::ManifestUnknown(
            "OCI manifest found, but accept header does not support OCI manifests".into(),
        ));
    }
    Ok(m)
}

/// Whether the client's `Accept` headers admit `media_type` (no `Accept` admits anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(',') {
            let t = part.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == media_type || t == "*/*" || t == "application/*" {
                return true;
            }
        }
    }
    !any
}

fn manifest_response(m: &ServedManifest, head: bool) -> Response<Body> {
    let bytes = &m.manifest.bytes;
    let mut r = Response::new(if head { body::empty() } else { body::full(bytes.clone()) });
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&m.manifest.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    digest_headers(h, &m.digest);
    r
}

fn digest_headers(h: &mut HeaderMap, d: &Digest) {
    let s = d.to_string();
    if let (Ok(dv), Ok(etag)) = (HeaderValue::from_str(&s), HeaderValue::from_str(&format!("\"{s}\""))) {
        h.insert("docker-content-digest", dv);
        h.insert(header::ETAG, etag);
    }
}

fn blob_headers(h: &mut HeaderMap, d: &Digest, len: Option<u64>) {
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    digest_headers(h, d);
}

async fn blob_head(
    state: &AppState,
    up: &Arc<Upstream>,
    name: &RepoName,
    d: &Digest,
) -> Result<Response<Body>, ApiError> {
    let (size, cached) =
        state.cache.blob_size(up, name, d).await.map_err(|e| ApiError::from_cache(e, true))?;
    let result = if cached { "hit" } else { "miss" };
    state.analytics.blob_served(&up.name, result);
    let mut r = Response::new(body::empty());
    blob_headers(r.headers_mut(), d, size);
    Ok(r)
}

async fn blob_get(
    state: &AppState,
    up: &Arc<Upstream>,
    name: &RepoName,
    d: &Digest,
    req: &Ctx<'_>,
) -> Result<Response<Body>, ApiError> {
    let range = req.headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let spec = range.as_deref().and_then(parse_range_spec);
    let answer = state
        .cache
        .blob(up, name, d, spec, range.is_some())
        .await
        .map_err(|e| ApiError::from_cache(e, true))?;
    state.analytics.blob_served(&up.name, answer.result.as_str());
    let from_cache = answer.result == crate::cache::BlobResult::Hit;
    match answer.body {
        BlobBody::File { file, size, lease } => {
            let src = Source::File(file, lease);
            serve_file(state, src, size, d, range.as_deref(), req.zerocopy, from_cache)
        }
        BlobBody::Bytes(bytes) => {
            let size = bytes.len() as u64;
            serve_file(state, Source::Bytes(bytes), size, d, range.as_deref(), None, from_cache)
        }
        BlobBody::Stream { body, size, part, lease } => {
            if part.is_none() && spec.is_some_and(|s| s.resolve(size) == ByteRange::Unsatisfiable) {
                return Err(ApiError::RangeNotSatisfiable(size));
            }
            // The backend cut the range only if it could; a client asking for part of a
            // blob may be sent all of it (200), which every registry client handles.
            let analytics = state.analytics.clone();
            let counted = futures_util::StreamExt::map(body, move |chunk| {
                let _held = &lease;
                if let Ok(c) = &chunk {
                    analytics.blob_bytes(true, c.len() as u64);
                }
                chunk
            });
            let mut r = Response::new(body::stream(counted));
            blob_headers(r.headers_mut(), d, Some(size));
            if let Some((first, whole)) = part {
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                content_range(r.headers_mut(), first, size, whole);
            }
            Ok(r)
        }
        BlobBody::Redirect { url, .. } => {
            // The bucket serves the bytes; the URL is valid for `storage.redirect_ttl`.
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            let loc = HeaderValue::from_str(&url).map_err(|e| ApiError::Internal(e.to_string()))?;
            r.headers_mut().insert(header::LOCATION, loc);
            r.headers_mut().insert(
                "docker-content-digest",
                HeaderValue::from_str(&d.to_string()).map_err(|e| ApiError::Internal(e.to_string()))?,
            );
            Ok(r)
        }
        BlobBody::Filling { fill, size } => {
            // Each client of a download holds at most one chunk queued: herds stay small.
            let (tx, body) = body::channel(1);
            let analytics = state.analytics.clone();
            fill.stream(tx, req.zerocopy.cloned(), move |n| analytics.blob_bytes(false, n));
            let mut r = Response::new(body);
            blob_headers(r.headers_mut(), d, size);
            Ok(r)
        }
    }
}

/// A `Range: bytes=…` header's one range; `None` serves everything (several ranges, or
/// one we cannot parse).
fn parse_range_spec(h: &str) -> Option<RangeSpec> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse::<u64>().ok().map(RangeSpec::Suffix);
    }
    let first = a.parse::<u64>().ok()?;
    if b.is_empty() {
        return Some(RangeSpec::From(first, None));
    }
    match b.parse::<u64>() {
        Ok(last) if last >= first => Some(RangeSpec::From(first, Some(last))),
        _ => None,
    }
}

fn parse_range(h: Option<&str>, size: u64) -> ByteRange {
    h.and_then(parse_range_spec).map_or(ByteRange::Whole, |s| s.resolve(size))
}

fn content_range(h: &mut HeaderMap, first: u64, len: u64, whole: u64) {
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{}", first, first + len - 1, whole)) {
        h.insert(header::CONTENT_RANGE, v);
    }
}

/// Stored bytes to serve: a file (with the lease that keeps it from eviction while it is
/// read), or a small blob held in memory.
enum Source {
    File(std::fs::File, Option<Lease>),
    Bytes(Bytes),
}

fn serve_file(
    state: &AppState,
    src: Source,
    size: u64,
    d: &Digest,
    range: Option<&str>,
    zerocopy: Option<&Arc<Regions>>,
    from_cache: bool,
) -> Result<Response<Body>, ApiError> {
    let (start, len, status) = match parse_range(range, size) {
        ByteRange::Whole => (0, size, StatusCode::OK),
        ByteRange::Part(a, b) => (a, b - a + 1, StatusCode::PARTIAL_CONTENT),
        ByteRange::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable(size)),
    };
    let body = match src {
        Source::Bytes(b) => {
            state.analytics.blob_bytes(from_cache, len);
            body::full(b.slice(start as usize..(start + len) as usize))
        }
        Source::File(file, _lease) if len <= INLINE_READ_MAX => {
            // Small and almost always in the page cache: one positional read costs less
            // than handing the response to the blocking pool.
            let bytes = read_at(&file, start, len as usize).map_err(|e| ApiError::Internal(e.to_string()))?;
            state.analytics.blob_bytes(from_cache, len);
            body::full(bytes)
        }
        Source::File(file, lease) => {
            let analytics = state.analytics.clone();
            // The lease lives as long as the body that reads the file.
            let on_chunk = move |n| {
                let _held = &lease;
                analytics.blob_bytes(from_cache, n)
            };
            match zerocopy {
                Some(regions) => body::mapped(regions, file, start, len, on_chunk)
                    .map_err(|e| ApiError::Internal(format!("mapping a stored blob: {e}")))?,
                None => body::file(file, start, len, on_chunk),
            }
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    blob_headers(h, d, Some(len));
    if status == StatusCode::PARTIAL_CONTENT {
        content_range(h, start, len, size);
    }
    Ok(r)
}

fn json_response(status: StatusCode, json: Bytes, head: bool) -> Response<Body> {
    let len = json.len();
    let mut r = Response::new(if head { body::empty() } else { body::full(json) });
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// `/_wharf/history/<name>/tags/<tag>`: `<name>` is resolved as a pull would resolve it.
fn history(
    state: &AppState,
    name: &RepoName,
    tag: &Tag,
    ns: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let (up, repo) = resolve(&state.upstreams, name, ns)?;
    let key = RepoKey::new(&up.name, &repo);
    let entries = state.store().history(&key, tag).map_err(|e| ApiError::Internal(e.to_string()))?;
    if entries.is_empty() {
        return Err(ApiError::ManifestUnknown(format!("no history for {}:{tag}", key.as_str())));
    }
    let json = serde_json::json!({ "repository": key.as_str(), "tag": tag.as_str(), "history": entries });
    Ok(json_response(StatusCode::OK, Bytes::from(json.to_string()), head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_http_says() {
        assert_eq!(parse_range(None, 10), ByteRange::Whole);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), ByteRange::Part(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), ByteRange::Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), ByteRange::Part(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), ByteRange::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), ByteRange::Part(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), ByteRange::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 10), ByteRange::Whole);
    }

    proptest::proptest! {
        #![proptest_config(crate::parse_props::config())]

        #[test]
        fn any_range_header_is_whole_a_part_inside_the_blob_or_unsatisfiable(
            h in proptest::prop_oneof![
                proptest::prelude::any::<String>(),
                proptest::string::string_regex("bytes ?= ?-?[0-9]{0,22} ?-? ?[0-9]{0,22}(,[0-9]{0,3}-[0-9]{0,3})?").expect("regex"),
            ],
            size in proptest::prop_oneof![proptest::prelude::Just(0u64), 1u64..10_000, proptest::prelude::any::<u64>()],
        ) {
            match parse_range(Some(&h), size) {
                ByteRange::Part(a, b) => proptest::prop_assert!(a <= b && b < size, "{h:?} of {size}: {a}-{b}"),
                ByteRange::Whole | ByteRange::Unsatisfiable => {}
            }
        }

        #[test]
        fn any_accept_header_is_read_without_panicking(values in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), 0..4)) {
            let mut h = HeaderMap::new();
            for v in values {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.append(header::ACCEPT, v);
                }
            }
            let _ = accepts(&h, OCI_MANIFEST);
        }
    }

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, OCI_MANIFEST), "no Accept admits anything");
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        );
        assert!(!accepts(&h, OCI_MANIFEST));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json; q=0.5"),
        );
        assert!(accepts(&h, OCI_MANIFEST));
    }
}
