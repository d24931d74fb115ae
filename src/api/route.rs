//! `/v2/…` paths parsed once into typed routes. Multi-segment repository names are split
//! from the end: the last segments say what is asked for, everything before is the name.

use crate::oci::{Digest, Reference, RepoName, Tag};

use super::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: RepoName, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/tags/list`
    TagsList { name: RepoName },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: Digest },
    /// `/v2/_catalog`
    Catalog,
    /// `/_wharf/history/<name>/tags/<tag>`
    History { name: RepoName, tag: Tag },
    /// `/metrics`
    Metrics,
    /// `/_wharf/stats`
    Stats,
    /// `/_wharf/gc`: GET reports what a collection would remove, POST runs one.
    Gc,
    /// `/_wharf/health`
    Health,
    /// `/_wharf/ready`: the index is open and the data dir takes writes.
    Ready,
    /// `/_wharf/token`: a bearer token for the credentials (or certificate) presented.
    Token,
    /// `POST /_wharf/prefetch/<name>/{manifests/<reference>|blobs/<digest>|referrers/<digest>}`:
    /// what a pull would fetch, into the cache, accounted as a prefetch (a blob is not
    /// sent back, only whether it was cached).
    Prefetch { name: RepoName, what: Prefetch },
}

/// What a prefetch request asks the cache to hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Prefetch {
    Manifest(Reference),
    Blob(Digest),
    Referrers(Digest),
}

impl Route {
    /// Routes of the admin surface: on `admin.listen` when it is set, never on the data
    /// port then (health is answered by both).
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Route::Metrics | Route::Stats | Route::Gc | Route::History { .. } | Route::Prefetch { .. }
        )
    }

    /// A short, bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::TagsList { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Catalog => "catalog",
            Route::History { .. } => "history",
            Route::Metrics => "metrics",
            Route::Stats => "stats",
            Route::Gc => "gc",
            Route::Health => "health",
            Route::Ready => "ready",
            Route::Token => "token",
            Route::Prefetch { .. } => "prefetch",
        }
    }
}

fn name(segs: &[&str]) -> Result<RepoName, ApiError> {
    let joined = segs.join("/");
    RepoName::parse(&joined)
        .ok_or_else(|| ApiError::NameInvalid(format!("invalid repository name {joined:?}")))
}

/// Parses a request path (without the query).
pub fn parse(path: &str) -> Result<Route, ApiError> {
    match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        "/v2/_catalog" => return Ok(Route::Catalog),
        "/metrics" => return Ok(Route::Metrics),
        "/_wharf/health" => return Ok(Route::Health),
        "/_wharf/ready" => return Ok(Route::Ready),
        "/_wharf/stats" => return Ok(Route::Stats),
        "/_wharf/gc" => return Ok(Route::Gc),
        "/_wharf/token" => return Ok(Route::Token),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/_wharf/history/") {
        let segs: Vec<&str> = rest.split('/').collect();
        if let [n @ .., "tags", tag] = segs.as_slice() {
            if !n.is_empty() {
                let tag =
                    Tag::parse(tag).ok_or_else(|| ApiError::TagInvalid(format!("invalid tag {tag:?}")))?;
                return Ok(Route::History { name: name(n)?, tag });
            }
        }
        return Err(ApiError::NotFound(format!("no such path {path:?}")));
    }
    if let Some(rest) = path.strip_prefix("/_wharf/prefetch/") {
        return match parse(&format!("/v2/{rest}"))? {
            Route::Manifest { name, reference } => {
                Ok(Route::Prefetch { name, what: Prefetch::Manifest(reference) })
            }
            Route::Blob { name, digest } => Ok(Route::Prefetch { name, what: Prefetch::Blob(digest) }),
            Route::Referrers { name, digest } => {
                Ok(Route::Prefetch { name, what: Prefetch::Referrers(digest) })
            }
            _ => Err(ApiError::NotFound(format!("no such path {path:?}"))),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(ApiError::NotFound(format!("no such path {path:?}")));
    };
    let segs: Vec<&str> = rest.split('/').collect();
    if let Some(i) = segs.windows(2).position(|w| w == ["blobs", "uploads"]) {
        if i > 0 {
            return Err(ApiError::Unsupported("wharf is a read-only mirror: pushes are not accepted".into()));
        }
    }
    match segs.as_slice() {
        [n @ .., "manifests", reference] if !n.is_empty() => {
            let name = name(n)?;
            let reference = Reference::parse(reference).ok_or_else(|| {
                if reference.contains(':') {
                    ApiError::DigestInvalid(format!("invalid digest {reference:?}"))
                } else {
                    // What distribution answers, and the conformance suite asks: no manifest
                    // has that name (a GET names no tag to be invalid).
                    ApiError::ManifestUnknown(format!("no manifest is named {reference:?}: not a valid tag"))
                }
            })?;
            Ok(Route::Manifest { name, reference })
        }
        [n @ .., "blobs", digest] if !n.is_empty() => {
            let name = name(n)?;
            let digest = Digest::parse(digest)
                .ok_or_else(|| ApiError::DigestInvalid(format!("invalid digest {digest:?}")))?;
            Ok(Route::Blob { name, digest })
        }
        [n @ .., "tags", "list"] if !n.is_empty() => Ok(Route::TagsList { name: name(n)? }),
        [n @ .., "referrers", digest] if !n.is_empty() => {
            let name = name(n)?;
            let digest = Digest::parse(digest)
                .ok_or_else(|| ApiError::DigestInvalid(format!("invalid digest {digest:?}")))?;
            Ok(Route::Referrers { name, digest })
        }
        _ => Err(ApiError::NotFound(format!("no such path {path:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_segment_names_parse_from_the_end() {
        let r = parse("/v2/a/manifests/b/manifests/latest").expect("parses");
        assert_eq!(
            r,
            Route::Manifest {
                name: RepoName::parse("a/manifests/b").expect("n"),
                reference: Reference::Tag(Tag::parse("latest").expect("t"))
            }
        );
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(parse(&format!("/v2/x/y/blobs/{d}")), Ok(Route::Blob { .. })));
        assert!(matches!(parse(&format!("/v2/x/y/referrers/{d}")), Ok(Route::Referrers { .. })));
        assert!(matches!(parse("/v2/x/referrers/latest"), Err(ApiError::DigestInvalid(_))));
        assert_eq!(parse("/v2/").expect("base"), Route::Base);
    }

    #[test]
    fn traversal_and_bad_digests_are_refused() {
        for p in [
            "/v2/../etc/manifests/latest",
            "/v2/a/%2e%2e/manifests/x",
            "/v2/a/..%2f/blobs/sha256:00",
            "/v2//manifests/x",
            "/v2/A/manifests/x",
        ] {
            assert!(matches!(parse(p), Err(ApiError::NameInvalid(_))), "{p}");
        }
        assert!(matches!(parse("/v2/a/blobs/sha256:zz"), Err(ApiError::DigestInvalid(_))));
        assert!(matches!(parse("/v2/a/manifests/sha256:..%2f..%2fx"), Err(ApiError::DigestInvalid(_))));
        assert!(matches!(parse("/v2/a/manifests/.bad"), Err(ApiError::ManifestUnknown(_))));
        assert!(matches!(parse("/v2/a/blobs/uploads/"), Err(ApiError::Unsupported(_))));
    }
}
