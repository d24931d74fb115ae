//! Read-through decisions: hit or miss, single-flight, tag revalidation with a HEAD, and
//! stale-on-error. Below the API, above the store and the upstream clients; builds no
//! HTTP responses.

mod fill;
mod flight;

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

pub use fill::{read_at, Fill};
use flight::Flights;

use crate::metrics::Metrics;
use crate::oci::{
    is_index, manifest_media_type, Digest, RepoName, Tag, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX,
    OCI_MANIFEST,
};
use crate::store::{now_ms, RepoKey, Store, StoreError, StoredManifest};
use crate::upstream::{Upstream, UpstreamError};

/// Why the cache could not answer. `Clone`, so joined requests share one outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream sent {got} for {want}; not cached")]
    DigestMismatch { want: Digest, got: Digest },
    #[error("{0}")]
    Store(Arc<StoreError>),
    #[error("upstream sent a manifest of unknown type")]
    UnknownManifestType,
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        CacheError::Store(Arc::new(e))
    }
}

/// How a manifest request was answered (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestResult {
    /// From cache without asking upstream (a digest, or a tag within its ttl).
    Hit,
    /// The upstream confirmed the cached digest.
    Revalidated,
    /// The tag moved upstream; the new manifest was fetched.
    Refreshed,
    /// The upstream could not answer; the last known digest was served.
    Stale,
    /// Not cached before; fetched.
    Miss,
}

impl ManifestResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ManifestResult::Hit => "hit",
            ManifestResult::Revalidated => "revalidated",
            ManifestResult::Refreshed => "refreshed",
            ManifestResult::Stale => "stale",
            ManifestResult::Miss => "miss",
        }
    }
}

/// A manifest ready to serve.
#[derive(Clone, Debug)]
pub struct ServedManifest {
    pub digest: Digest,
    pub manifest: StoredManifest,
    pub result: ManifestResult,
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    Cached {
        file: File,
        size: u64,
    },
    /// A download in flight; `joined` when another request started it.
    Filling {
        fill: Arc<Fill>,
        size: Option<u64>,
        joined: bool,
    },
}

/// What a tag revalidation found.
#[derive(Clone, Debug)]
struct Revalidation {
    digest: Digest,
    moved: bool,
}

pub struct Cache {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Blob downloads in flight, by digest (blobs are shared across repositories).
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Tag revalidations in flight: one upstream HEAD per tag at a time.
    tag_flights: Flights<(RepoKey, Tag), Result<Revalidation, CacheError>>,
    /// Manifest fetches by digest in flight.
    manifest_flights: Flights<(RepoKey, Digest), Result<(), CacheError>>,
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Internal(e.to_string()))?
        .map_err(CacheError::from)
}

impl Cache {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Cache {
        Cache {
            store,
            metrics,
            fills: Mutex::new(HashMap::new()),
            tag_flights: Flights::new(),
            manifest_flights: Flights::new(),
        }
    }

    /// A manifest by tag: revalidated upstream with a HEAD unless checked within the tag's
    /// ttl; the last known digest when the upstream cannot answer.
    pub async fn manifest_by_tag(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        tag: &Tag,
    ) -> Result<ServedManifest, CacheError> {
        let key = RepoKey::new(&up.name, name);
        let known = self.store.tag(&key, tag)?;
        let cached = match &known {
            Some(m) => match Digest::parse(&m.digest) {
                Some(d) => self.store.manifest(&key, &d)?.map(|man| (d, man, m.checked_ms)),
                None => None,
            },
            None => None,
        };
        if let Some((d, man, checked)) = &cached {
            if now_ms().saturating_sub(*checked) < up.tag_ttl.as_millis() as u64 {
                return Ok(ServedManifest {
                    digest: d.clone(),
                    manifest: man.clone(),
                    result: ManifestResult::Hit,
                });
            }
        }
        let res = self
            .tag_flights
            .run(
                (key.clone(), tag.clone()),
                || self.metrics.coalesced.inc(),
                || self.clone().revalidate(up.clone(), name.clone(), key.clone(), tag.clone()),
            )
            .await;
        match res {
            Ok(rev) => {
                let manifest = self.store.manifest(&key, &rev.digest)?.ok_or(UpstreamError::NotFound)?;
                let result = match (&cached, rev.moved) {
                    (None, _) => ManifestResult::Miss,
                    (Some(_), true) => ManifestResult::Refreshed,
                    (Some(_), false) => ManifestResult::Revalidated,
                };
                Ok(ServedManifest { digest: rev.digest, manifest, result })
            }
            Err(CacheError::Upstream(e)) if e.is_transient() => match cached {
                Some((digest, manifest, _)) => {
                    self.metrics.stale_served.with_label_values(&[&up.name]).inc();
                    tracing::warn!(upstream = %up.name, repository = %name, tag = %tag, digest = %digest, error = %e, "upstream cannot answer; serving the last known digest");
                    Ok(ServedManifest { digest, manifest, result: ManifestResult::Stale })
                }
                None => Err(e.into()),
            },
            Err(e) => Err(e),
        }
    }

    /// One upstream HEAD for the tag; fetches the manifest when the digest is new to us.
    async fn revalidate(
        self: Arc<Self>,
        up: Arc<Upstream>,
        name: RepoName,
        key: RepoKey,
        tag: Tag,
    ) -> Result<Revalidation, CacheError> {
        let head = up.head_manifest(&name, tag.as_str()).await?;
        let digest = match head.digest {
            Some(d) => {
                if self.store.manifest(&key, &d)?.is_none() {
                    self.fetch_manifest(&up, &name, &key, &d).await?;
                }
                d
            }
            None => {
                // The upstream does not say the digest on HEAD: GET by tag and hash it.
                let m = up.get_manifest(&name, tag.as_str()).await?;
                let d = Digest::of(&m.bytes);
                self.store_manifest(&key, &d, m.bytes, m.content_type).await?;
                d
            }
        };
        let (store, d, t) = (self.store.clone(), digest.clone(), tag.clone());
        let moved = blocking(move || store.record_tag(&key, &t, &d, now_ms())).await?;
        if moved {
            tracing::info!(upstream = %up.name, repository = %name, tag = %tag, digest = %digest, "tag moved");
        }
        Ok(Revalidation { digest, moved })
    }

    /// A manifest by digest: immutable, so any cached copy is served as is.
    pub async fn manifest_by_digest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        d: &Digest,
    ) -> Result<ServedManifest, CacheError> {
        let key = RepoKey::new(&up.name, name);
        if let Some(manifest) = self.store.manifest(&key, d)? {
            return Ok(ServedManifest { digest: d.clone(), manifest, result: ManifestResult::Hit });
        }
        self.manifest_flights
            .run(
                (key.clone(), d.clone()),
                || self.metrics.coalesced.inc(),
                || async { self.fetch_manifest(up, name, &key, d).await },
            )
            .await?;
        let manifest = self.store.manifest(&key, d)?.ok_or(UpstreamError::NotFound)?;
        Ok(ServedManifest { digest: d.clone(), manifest, result: ManifestResult::Miss })
    }

    /// GETs a manifest by digest, verifies it and stores it.
    async fn fetch_manifest(
        &self,
        up: &Upstream,
        name: &RepoName,
        key: &RepoKey,
        d: &Digest,
    ) -> Result<(), CacheError> {
        let m = up.get_manifest(name, &d.to_string()).await?;
        let got = Digest::of(&m.bytes);
        if got != *d {
            self.metrics.digest_mismatch.with_label_values(&[&up.name]).inc();
            tracing::warn!(upstream = %up.name, repository = %name, want = %d, got = %got, "manifest does not match its digest; not cached");
            return Err(CacheError::DigestMismatch { want: d.clone(), got });
        }
        self.store_manifest(key, d, m.bytes, m.content_type).await
    }

    async fn store_manifest(
        &self,
        key: &RepoKey,
        d: &Digest,
        bytes: bytes::Bytes,
        content_type: Option<String>,
    ) -> Result<(), CacheError> {
        let known = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];
        let media_type = match content_type {
            Some(ct) if known.contains(&ct.as_str()) || ct.starts_with("application/vnd.") => ct,
            _ => manifest_media_type(&bytes).ok_or(CacheError::UnknownManifestType)?,
        };
        let (store, key, d) = (self.store.clone(), key.clone(), d.clone());
        blocking(move || store.put_manifest(&key, &d, &bytes, &media_type)).await
    }

    /// A blob to GET: the stored file, or a download in flight (started if need be).
    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        d: &Digest,
    ) -> Result<BlobSource, CacheError> {
        let key = RepoKey::new(&up.name, name);
        loop {
            if let Some(src) = self.cached_blob(&key, d)? {
                return Ok(src);
            }
            match self.join_or_start_fill(up, name, &key, d)? {
                Some((fill, joined)) => {
                    if joined {
                        self.metrics.coalesced.inc();
                    }
                    let size = fill.ready().await?;
                    return Ok(BlobSource::Filling { fill, size, joined });
                }
                // Stored between our look and the lock: serve it from the store.
                None => continue,
            }
        }
    }

    fn cached_blob(&self, key: &RepoKey, d: &Digest) -> Result<Option<BlobSource>, CacheError> {
        match self.store.blobs().open(d).map_err(StoreError::from)? {
            Some(file) => {
                let size = file.metadata().map_err(StoreError::from)?.len();
                self.store.link_layer(key, d)?;
                self.store.touch(d);
                Ok(Some(BlobSource::Cached { file, size }))
            }
            None => Ok(None),
        }
    }

    /// A blob's size for HEAD: from the store, a fill in flight, or an upstream HEAD
    /// (a HEAD does not start a download).
    pub async fn blob_size(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        d: &Digest,
    ) -> Result<(Option<u64>, bool), CacheError> {
        if let Some(size) = self.store.blob_size(d)? {
            self.store.link_layer(&RepoKey::new(&up.name, name), d)?;
            return Ok((Some(size), true));
        }
        let inflight = self.fills.lock().unwrap_or_else(|p| p.into_inner()).get(d).cloned();
        if let Some(fill) = inflight {
            if let Ok(Some(size)) = fill.ready().await {
                return Ok((Some(size), false));
            }
        }
        Ok((up.head_blob(name, d).await?, false))
    }

    /// Whether an index (or list) type is stored; used for Accept negotiation.
    pub fn is_index(media_type: &str) -> bool {
        is_index(media_type)
    }
}
