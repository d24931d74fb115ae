//! The one place errors become OCI error JSON with a status code, a log line and a metric.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::cache::CacheError;
use crate::metrics::Metrics;
use crate::upstream::UpstreamError;

use super::body::{full, Body};

/// What a client refused for wharf's own limits is told to wait before it retries.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    NameInvalid(String),
    NameUnknown(String),
    DigestInvalid(String),
    TagInvalid(String),
    ManifestUnknown(String),
    ManifestInvalid(String),
    BlobUnknown(String),
    Unsupported(String),
    Denied(String),
    Unauthorized(String),
    TooManyRequests(String),
    /// Wharf's own limits (downloads, spool bytes) are reached: 503 with `Retry-After`.
    Busy(String),
    Unavailable(String),
    BadGateway(String),
    RangeNotSatisfiable(u64),
    NotFound(String),
    Internal(String),
}

#[derive(Serialize)]
struct Body_<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'a str,
    message: &'a str,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            ApiError::NameUnknown(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            ApiError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            ApiError::TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            ApiError::ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            ApiError::ManifestInvalid(_) => (StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID"),
            ApiError::BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            ApiError::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            ApiError::Denied(_) => (StatusCode::FORBIDDEN, "DENIED"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "TOOMANYREQUESTS"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "UNKNOWN"),
            ApiError::RangeNotSatisfiable(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            // No route: an OCI code all the same, as the spec's error format requires one.
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::RangeNotSatisfiable(size) => {
                format!("range not satisfiable for a blob of {size} bytes")
            }
            ApiError::NameInvalid(m)
            | ApiError::NameUnknown(m)
            | ApiError::DigestInvalid(m)
            | ApiError::TagInvalid(m)
            | ApiError::ManifestUnknown(m)
            | ApiError::ManifestInvalid(m)
            | ApiError::BlobUnknown(m)
            | ApiError::Unsupported(m)
            | ApiError::Denied(m)
            | ApiError::Unauthorized(m)
            | ApiError::Busy(m)
            | ApiError::TooManyRequests(m)
            | ApiError::Unavailable(m)
            | ApiError::BadGateway(m)
            | ApiError::NotFound(m)
            | ApiError::Internal(m) => m.clone(),
        }
    }

    /// A cache failure for a manifest (`blob == false`) or blob request.
    pub fn from_cache(e: CacheError, blob: bool) -> ApiError {
        match e {
            CacheError::Upstream(UpstreamError::NotFound) if blob => {
                ApiError::BlobUnknown("blob unknown to the upstream registry".into())
            }
            CacheError::Upstream(UpstreamError::NotFound) => {
                ApiError::ManifestUnknown("manifest unknown to the upstream registry".into())
            }
            CacheError::Upstream(UpstreamError::Offline(up)) if blob => ApiError::BlobUnknown(format!(
                "the mirror is offline for {up} and this blob is not in its cache"
            )),
            CacheError::Upstream(UpstreamError::Offline(up)) => ApiError::ManifestUnknown(format!(
                "the mirror is offline for {up} and this image is not in its cache"
            )),
            CacheError::Upstream(UpstreamError::TooLarge) => {
                ApiError::ManifestInvalid(UpstreamError::TooLarge.to_string())
            }
            CacheError::Upstream(e @ UpstreamError::Denied(_)) => ApiError::Denied(e.to_string()),
            CacheError::Upstream(e @ UpstreamError::RateLimited) => ApiError::TooManyRequests(e.to_string()),
            CacheError::Upstream(e @ UpstreamError::Unavailable(_)) => ApiError::Unavailable(e.to_string()),
            CacheError::Upstream(e @ (UpstreamError::Invalid(_) | UpstreamError::Status(_))) => {
                ApiError::BadGateway(e.to_string())
            }
            e @ (CacheError::DigestMismatch { .. } | CacheError::UnknownManifestType) => {
                ApiError::BadGateway(e.to_string())
            }
            e @ CacheError::Busy(_) => ApiError::Busy(e.to_string()),
            CacheError::Store(e) if e.is_unavailable() => ApiError::Unavailable(e.to_string()),
            e @ (CacheError::Store(_) | CacheError::Internal(_)) => ApiError::Internal(e.to_string()),
        }
    }

    /// For a listing, an unknown upstream repository is an unknown name.
    pub fn for_listing(self) -> ApiError {
        match self {
            ApiError::ManifestUnknown(m) if m.starts_with("the mirror is offline") => {
                ApiError::NameUnknown(m.replace("this image", "this repository"))
            }
            ApiError::ManifestUnknown(_) => {
                ApiError::NameUnknown("repository unknown to the upstream registry".into())
            }
            e => e,
        }
    }

    /// The OCI error response; logs the detail once and counts the code.
    pub fn into_response(self, metrics: &Metrics, head: bool) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let message = self.message();
        metrics.errors.with_label_values(&[code]).inc();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), code, message = %message, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), code, message = %message, "request refused");
        }
        let json = serde_json::to_vec(&Body_ { errors: [Entry { code, message: &message }] })
            .expect("error JSON always serializes");
        let len = json.len();
        let mut resp = Response::new(if head { super::body::empty() } else { full(json) });
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let ApiError::RangeNotSatisfiable(size) = self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        if let ApiError::Busy(_) = self {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        resp
    }
}
