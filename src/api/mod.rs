//! The HTTP surface: parses the route, asks the cache, and builds every client response.

mod body;
mod error;
mod route;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

pub use body::Body;
pub use error::ApiError;
pub use route::{parse as parse_route, Route};

use crate::cache::{read_at, BlobSource, ServedManifest};
use crate::oci::{default_platform_child, is_index, Digest, Reference, RepoName, Tag, OCI_MANIFEST};
use crate::store::RepoKey;
use crate::upstream::Upstream;
use crate::AppState;

/// Bytes per read when serving a stored blob.
const FILE_CHUNK: usize = 256 * 1024;

/// Answers one request. Never fails: errors become OCI error responses.
pub async fn handle(state: AppState, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let route = route::parse(req.uri().path());
    let label = route.as_ref().map(Route::label).unwrap_or("other");
    let span = tracing::info_span!("request", method = %method, route = label, path = %req.uri().path());
    let head = method == Method::HEAD;
    let resp = async {
        if method != Method::GET && method != Method::HEAD {
            return Err(ApiError::Unsupported(format!(
                "{method} is not supported: wharf is a read-only mirror"
            )));
        }
        dispatch(&state, route?, req.headers(), head).await
    }
    .instrument(span.clone())
    .await;
    let mut resp = resp.unwrap_or_else(|e| span.in_scope(|| e.into_response(&state.metrics, head)));
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    let m = &state.metrics;
    m.http_requests.with_label_values(&[method.as_str(), label, resp.status().as_str()]).inc();
    m.http_duration.with_label_values(&[label]).observe(start.elapsed().as_secs_f64());
    resp
}

async fn dispatch(
    state: &AppState,
    route: Route,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Base => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{}"), head)),
        Route::Health => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"), head)),
        Route::Metrics => {
            let mut r = Response::new(body::full(state.metrics.render()));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            Ok(r)
        }
        Route::Manifest { name, reference } => {
            let up = state.default_upstream().clone();
            let res = manifest(state, &up, &name, &reference, headers).await;
            let result = match &res {
                Ok(m) => m.result.as_str(),
                Err(_) => "error",
            };
            let method = if head { "HEAD" } else { "GET" };
            state.metrics.manifest_requests.with_label_values(&[&up.name, method, result]).inc();
            let m = res?;
            state.store().touch(&m.digest);
            tracing::debug!(upstream = %up.name, repository = %name, digest = %m.digest, cache = result, "manifest");
            Ok(manifest_response(&m, head))
        }
        Route::Blob { name, digest } => {
            let up = state.default_upstream().clone();
            let res = if head {
                blob_head(state, &up, &name, &digest).await
            } else {
                blob_get(state, &up, &name, &digest, headers).await
            };
            if res.is_err() {
                state.metrics.blob_requests.with_label_values(&[&up.name, "error"]).inc();
            }
            res
        }
        Route::TagsList { .. } => {
            Err(ApiError::NotFound("tag listing is not served by this version of wharf".into()))
        }
        Route::History { name, tag } => history(state, &name, &tag, head),
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
    state.metrics.blob_requests.with_label_values(&[&up.name, result]).inc();
    let mut r = Response::new(body::empty());
    blob_headers(r.headers_mut(), d, size);
    Ok(r)
}

async fn blob_get(
    state: &AppState,
    up: &Arc<Upstream>,
    name: &RepoName,
    d: &Digest,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let src = state.cache.blob(up, name, d).await.map_err(|e| ApiError::from_cache(e, true))?;
    let result = match &src {
        BlobSource::Cached { .. } => "hit",
        BlobSource::Filling { joined: true, .. } => "joined",
        BlobSource::Filling { .. } => "miss",
    };
    state.metrics.blob_requests.with_label_values(&[&up.name, result]).inc();
    match (src, range) {
        (BlobSource::Cached { file, size }, range) => serve_file(state, file, size, d, range.as_deref()),
        (BlobSource::Filling { fill, .. }, Some(range)) => {
            // A range of an unverified download cannot be vouched for: wait for the whole.
            fill.finished().await.map_err(|e| ApiError::from_cache(e, true))?;
            match state.store().blobs().open(d) {
                Ok(Some(file)) => {
                    let size = file.metadata().map_err(|e| ApiError::Internal(e.to_string()))?.len();
                    serve_file(state, file, size, d, Some(&range))
                }
                Ok(None) => Err(ApiError::BlobUnknown("blob vanished after download".into())),
                Err(e) => Err(ApiError::Internal(e.to_string())),
            }
        }
        (BlobSource::Filling { fill, size, .. }, None) => {
            let (tx, body) = body::channel(4);
            let counter = state.metrics.blob_bytes_served.with_label_values(&["upstream"]);
            fill.stream(tx, move |n| counter.inc_by(n));
            let mut r = Response::new(body);
            blob_headers(r.headers_mut(), d, size);
            Ok(r)
        }
    }
}

/// A byte range asked for with `Range: bytes=…`.
#[derive(Debug, PartialEq)]
enum ByteRange {
    /// Serve everything (no header, several ranges, or one we cannot parse).
    Whole,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(h: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return ByteRange::Whole;
    };
    if spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return ByteRange::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return match b.parse::<u64>() {
            Ok(0) => ByteRange::Unsatisfiable,
            Ok(_) if size == 0 => ByteRange::Unsatisfiable,
            Ok(n) => ByteRange::Part(size.saturating_sub(n), size - 1),
            Err(_) => ByteRange::Whole,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return ByteRange::Whole;
    };
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(size.saturating_sub(1)),
            _ => return ByteRange::Whole,
        }
    };
    if start >= size {
        ByteRange::Unsatisfiable
    } else {
        ByteRange::Part(start, end)
    }
}

fn serve_file(
    state: &AppState,
    file: std::fs::File,
    size: u64,
    d: &Digest,
    range: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let (start, len, status) = match parse_range(range, size) {
        ByteRange::Whole => (0, size, StatusCode::OK),
        ByteRange::Part(a, b) => (a, b - a + 1, StatusCode::PARTIAL_CONTENT),
        ByteRange::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable(size)),
    };
    let (tx, body) = body::channel(4);
    let counter = state.metrics.blob_bytes_served.with_label_values(&["cache"]);
    // One blocking task per response (not per chunk) reads the file into the channel.
    tokio::task::spawn_blocking(move || {
        let mut off = start;
        let end = start + len;
        while off < end {
            let n = (end - off).min(FILE_CHUNK as u64) as usize;
            let chunk = read_at(&file, off, n);
            let ok = chunk.is_ok();
            if let Ok(c) = &chunk {
                counter.inc_by(c.len() as u64);
            }
            if tx.blocking_send(chunk).is_err() || !ok {
                return;
            }
            off += n as u64;
        }
    });
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    blob_headers(h, d, Some(len));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{}", start, start + len - 1, size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
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

/// `/_wharf/history/<name>/tags/<tag>`: `<name>` may start with an upstream's name.
fn history(state: &AppState, name: &RepoName, tag: &Tag, head: bool) -> Result<Response<Body>, ApiError> {
    let key = state.repo_key(name);
    let entries = state.store().history(&key, tag).map_err(|e| ApiError::Internal(e.to_string()))?;
    if entries.is_empty() {
        return Err(ApiError::ManifestUnknown(format!("no history for {}:{tag}", key.as_str())));
    }
    let json = serde_json::json!({ "repository": key.as_str(), "tag": tag.as_str(), "history": entries });
    Ok(json_response(StatusCode::OK, Bytes::from(json.to_string()), head))
}

/// The cached repository `name` denotes: `<upstream>/<repo>` when it starts with a
/// configured upstream's name, else a repository of the default upstream.
pub fn repo_key(upstreams: &[Arc<Upstream>], name: &RepoName) -> RepoKey {
    if let Some((first, rest)) = name.as_str().split_once('/') {
        if let (Some(up), Some(rest)) = (upstreams.iter().find(|u| u.name == first), RepoName::parse(rest)) {
            return RepoKey::new(&up.name, &rest);
        }
    }
    RepoKey::new(&upstreams[0].name, name)
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
