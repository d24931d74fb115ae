//! Read-through decisions: hit or miss, single-flight, tag revalidation with a HEAD, and
//! stale-on-error. Below the API, above the store and the upstream clients; builds no
//! HTTP responses.

mod fill;
mod flight;
mod lifecycle;
mod referrers;

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

pub use fill::{read_at, Fill};
use flight::Flights;
pub use lifecycle::{GcReport, Lease, Reason};
use lifecycle::{Leases, Policy};
pub use referrers::{Referrers, ReferrersSource};

use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::oci::{is_index, platform_children, stored_media_type, Digest, RepoName, Tag};
use crate::store::{now_ms, BlobRead, RepoKey, Store, StoreError, StoredManifest};
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
    /// A limit of wharf's own is reached (`downloads` or `spool_bytes`); try again later.
    #[error("the mirror is at its limit of {0} for upstream downloads; retry shortly")]
    Busy(&'static str),
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
    /// The upstream is configured offline; answered from the cache.
    Offline,
}

impl ManifestResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ManifestResult::Hit => "hit",
            ManifestResult::Revalidated => "revalidated",
            ManifestResult::Refreshed => "refreshed",
            ManifestResult::Stale => "stale",
            ManifestResult::Miss => "miss",
            ManifestResult::Offline => "offline",
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

/// How a blob request was answered (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobResult {
    /// From the store.
    Hit,
    /// Joined a download another request started.
    Joined,
    /// Started a download.
    Miss,
}

impl BlobResult {
    pub fn as_str(self) -> &'static str {
        match self {
            BlobResult::Hit => "hit",
            BlobResult::Joined => "joined",
            BlobResult::Miss => "miss",
        }
    }
}

/// One byte range a client asked for (`Range: bytes=…`), before the blob's size is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RangeSpec {
    /// `first-` (to the end) or `first-last`.
    From(u64, Option<u64>),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// A [`RangeSpec`] against a blob of known size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ByteRange {
    Whole,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

impl RangeSpec {
    pub fn resolve(self, size: u64) -> ByteRange {
        match self {
            RangeSpec::Suffix(0) => ByteRange::Unsatisfiable,
            RangeSpec::Suffix(_) if size == 0 => ByteRange::Unsatisfiable,
            RangeSpec::Suffix(n) => ByteRange::Part(size.saturating_sub(n), size - 1),
            RangeSpec::From(first, _) if first >= size => ByteRange::Unsatisfiable,
            RangeSpec::From(first, last) => {
                ByteRange::Part(first, last.map_or(size - 1, |l| l.min(size - 1)))
            }
        }
    }
}

/// Where a blob's bytes come from.
pub enum BlobBody {
    /// A stored blob in a local file (read at offsets; `sendfile` works on it). The lease
    /// keeps eviction off it until the response is done with it.
    File { file: File, size: u64, lease: Option<Lease> },
    /// A small blob held in memory.
    Bytes(bytes::Bytes),
    /// A stored blob streamed from the backend: `size` bytes, the whole blob, or with
    /// `part` = (first byte, the blob's size) the range asked for.
    Stream {
        body: std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>,
        size: u64,
        part: Option<(u64, u64)>,
        lease: Lease,
    },
    /// A download in flight: streamed to the client as it arrives.
    Filling { fill: Arc<Fill>, size: Option<u64> },
    /// In the shared bucket, served by it: a presigned URL to redirect the client to.
    Redirect { url: String, size: u64 },
}

/// A blob GET, answered.
pub struct BlobAnswer {
    pub body: BlobBody,
    pub result: BlobResult,
}

/// One page of names (`tags/list`, `_catalog`).
#[derive(Debug, Clone)]
pub struct Listing {
    pub names: Vec<String>,
    pub more: bool,
    /// Answered from the cache because the upstream could not.
    pub from_cache: bool,
}

impl Listing {
    /// An upstream's page. A complete answer (no next page) is sorted and paginated here, as
    /// some registries (distribution 2.8 for tags) ignore `n` and do not sort.
    fn from_upstream(
        page: &crate::upstream::Page,
        field: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Listing {
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap_or_default();
        let mut names: Vec<String> = v[field]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        if page.more {
            return Listing { names, more: true, from_cache: false };
        }
        names.sort();
        Listing { from_cache: false, ..Listing::paginate(names, n, last) }
    }

    /// `n` names after `last` from a sorted list.
    fn paginate(sorted: Vec<String>, n: Option<usize>, last: Option<&str>) -> Listing {
        let start = last.map(|l| sorted.partition_point(|t| t.as_str() <= l)).unwrap_or(0);
        let rest = &sorted[start.min(sorted.len())..];
        let take = n.unwrap_or(rest.len()).min(rest.len());
        Listing { names: rest[..take].to_vec(), more: take < rest.len(), from_cache: true }
    }
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
    /// Referrers lists being asked for upstream.
    referrer_flights: Flights<(RepoKey, Digest), Result<crate::store::ReferrersMeta, CacheError>>,
    /// Size cap, pins and ages for eviction and collection.
    policy: Policy,
    /// Blobs responses are reading: never evicted meanwhile.
    leases: Arc<Leases>,
    /// One eviction or collection pass at a time.
    pass: Mutex<()>,
    /// Bytes of verified downloads being committed, counted against the cap meanwhile.
    reserved: std::sync::atomic::AtomicU64,
    /// Download slots and the spool-byte budget.
    limits: Arc<fill::Limits>,
    /// Longest a download waits for another replica's (`storage.lease_wait`).
    lease_wait: std::time::Duration,
}

/// One manifest write counted in `wharf_inflight_manifest_writes` (which shutdown waits
/// on) until dropped, however its task ends.
struct Writing(prometheus::IntGauge);

impl Writing {
    fn new(gauge: &prometheus::IntGauge) -> Writing {
        gauge.inc();
        Writing(gauge.clone())
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.dec();
    }
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
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        config: &CacheConfig,
        server: &crate::config::ServerConfig,
        storage: &crate::config::StorageConfig,
    ) -> Cache {
        metrics.cache_limit.set(config.max_size.0 as i64);
        Cache {
            limits: Arc::new(fill::Limits::new(server, metrics.spool_bytes.clone())),
            store,
            metrics,
            fills: Mutex::new(HashMap::new()),
            tag_flights: Flights::new(),
            manifest_flights: Flights::new(),
            referrer_flights: Flights::new(),
            policy: Policy::new(config),
            leases: Arc::default(),
            pass: Mutex::new(()),
            reserved: std::sync::atomic::AtomicU64::new(0),
            lease_wait: storage.lease_wait,
        }
    }

    /// Blob downloads not yet stored (or failed).
    pub fn downloads_in_flight(&self) -> usize {
        self.fills.lock().unwrap_or_else(|p| p.into_inner()).len()
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
                self.store.touch(d);
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
                || {
                    let first_sight = known.is_none();
                    self.clone().revalidate(up.clone(), name.clone(), key.clone(), tag.clone(), first_sight)
                },
            )
            .await;
        let res = res.inspect(|rev| self.store.touch(&rev.digest));
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
            Err(CacheError::Upstream(e)) if e.is_transient() => {
                let offline = matches!(e, UpstreamError::Offline(_));
                let Some((digest, manifest, older)) = self.without_upstream(&key, tag, cached)? else {
                    return Err(e.into());
                };
                self.store.touch(&digest);
                if older {
                    let reason = if offline { "offline" } else { "unreachable" };
                    self.metrics.tag_fallbacks.with_label_values(&[&up.name, reason]).inc();
                    tracing::warn!(upstream = %up.name, repository = %name, tag = %tag, digest = %digest, reason, "the tag's newest digest is not whole in the cache; the last known digest is an older one that is");
                }
                if offline {
                    return Ok(ServedManifest { digest, manifest, result: ManifestResult::Offline });
                }
                self.metrics.stale_served.with_label_values(&[&up.name]).inc();
                tracing::warn!(upstream = %up.name, repository = %name, tag = %tag, digest = %digest, error = %e, "upstream cannot answer; serving the last known digest");
                Ok(ServedManifest { digest, manifest, result: ManifestResult::Stale })
            }
            Err(e) => Err(e),
        }
    }

    /// What a tag resolves to when the upstream cannot be asked: the newest digest of its
    /// history that the cache can serve whole for at least one platform, so a HEAD that
    /// learned a new digest (and only its index) does not break pulls of the tag; else the
    /// last known digest. The flag says an older digest was chosen.
    fn without_upstream(
        &self,
        key: &RepoKey,
        tag: &Tag,
        last: Option<(Digest, StoredManifest, u64)>,
    ) -> Result<Option<(Digest, StoredManifest, bool)>, CacheError> {
        let last_digest = last.as_ref().map(|(d, _, _)| d.clone());
        for entry in self.store.history(key, tag)? {
            let Some(d) = Digest::parse(&entry.digest) else { continue };
            let Some(m) = self.store.manifest(key, &d)? else { continue };
            if self.servable(key, &m)? {
                let older = last_digest.as_ref().is_some_and(|l| *l != d);
                return Ok(Some((d, m, older)));
            }
        }
        Ok(last.map(|(d, m, _)| (d, m, false)))
    }

    /// Whether the cache holds an image whole (its config and layers), or, for an index,
    /// one of its platform images whole.
    fn servable(&self, key: &RepoKey, m: &StoredManifest) -> Result<bool, CacheError> {
        if !is_index(&m.media_type) {
            return Ok(self.store.missing_blob(&m.bytes)?.is_none());
        }
        for child in platform_children(&m.bytes) {
            if let Some(c) = self.store.manifest(key, &child)? {
                if !is_index(&c.media_type) && self.store.missing_blob(&c.bytes)?.is_none() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// One upstream HEAD for the tag; fetches the manifest when the digest is new to us. A
    /// tag never seen before is fetched with one GET by tag instead: the manifest is needed
    /// whatever the HEAD would say, and it costs the same against a pull limit.
    async fn revalidate(
        self: Arc<Self>,
        up: Arc<Upstream>,
        name: RepoName,
        key: RepoKey,
        tag: Tag,
        first_sight: bool,
    ) -> Result<Revalidation, CacheError> {
        let said = match first_sight {
            true => None,
            false => up.head_manifest(&name, tag.as_str()).await?.digest,
        };
        let digest = match said {
            Some(d) => {
                if self.store.manifest(&key, &d)?.is_none() {
                    self.fetch_manifest(&up, &name, &key, &d).await?;
                }
                d
            }
            None => {
                // A new tag, or an upstream that does not say the digest on HEAD: GET by
                // tag and hash it.
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
        self.store.touch(d);
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
        let got = Digest::of_with(d.algorithm(), &m.bytes);
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
        let media_type =
            stored_media_type(content_type.as_deref(), &bytes).ok_or(CacheError::UnknownManifestType)?;
        // Served from memory at once; stored (fsync, rename, links) off the response path,
        // so a cold pull waits for no disk flush. A crash before it is stored loses nothing
        // stored: the next request fetches it again.
        let m = StoredManifest { bytes: bytes.clone(), media_type: media_type.clone() };
        self.store.stage_manifest(key, d, m);
        let writing = Writing::new(&self.metrics.inflight_manifest_writes);
        let (store, key, d) = (self.store.clone(), key.clone(), d.clone());
        tokio::spawn(async move {
            let (s, k, dg) = (store.clone(), key.clone(), d.clone());
            let res = blocking(move || s.put_manifest(&k, &dg, &bytes, &media_type)).await;
            drop(writing);
            if let Err(e) = res {
                store.unstage_manifest(&key, &d);
                tracing::warn!(repository = %key.as_str(), digest = %d, error = %e, "storing a manifest failed; it is fetched again when next asked for");
            }
        });
        Ok(())
    }

    /// Stores in progress: blob downloads and manifest writes (shutdown waits for them).
    pub fn writes_in_flight(&self) -> usize {
        self.downloads_in_flight() + self.metrics.inflight_manifest_writes.get().max(0) as usize
    }

    /// A blob to GET: the stored blob, or a download in flight (started if need be). With
    /// `verified` (the client asked for part of it), a download is waited for until
    /// verified and its spool served: a range of unverified bytes cannot be vouched for.
    /// A stored blob the backend streams is cut to `range` there; a local file is cut by
    /// the caller.
    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        d: &Digest,
        range: Option<RangeSpec>,
        verified: bool,
    ) -> Result<BlobAnswer, CacheError> {
        let key = RepoKey::new(&up.name, name);
        let mut slot = None;
        let mut looked_again = false;
        loop {
            match self.cached_blob(&key, d, range)? {
                Some(BlobBody::Stream { mut body, size, part, lease }) => {
                    // The answer's status goes out with the backend's first bytes: a blob
                    // another replica evicted since this one last synced is fetched again,
                    // and a store that fails is an error, instead of a 200 cut short.
                    let first = match futures_util::StreamExt::next(&mut body).await {
                        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound && !looked_again => {
                            tracing::info!(digest = %d, "a blob known to be stored is gone from the store; fetching it again");
                            self.store.forget_stored_size(d);
                            looked_again = true;
                            continue;
                        }
                        Some(Err(e)) => return Err(StoreError::Io(e).into()),
                        first => first,
                    };
                    let body =
                        Box::pin(futures_util::StreamExt::chain(futures_util::stream::iter(first), body));
                    let body = BlobBody::Stream { body, size, part, lease };
                    return Ok(BlobAnswer { body, result: BlobResult::Hit });
                }
                Some(body) => return Ok(BlobAnswer { body, result: BlobResult::Hit }),
                None => {}
            }
            let (fill, joined) = match self.join_or_start_fill(up, name, &key, d, &mut slot)? {
                fill::Joined::Fill(f, joined) => (f, joined),
                // Stored between our look and the lock: serve it from the store.
                fill::Joined::Stored => continue,
                fill::Joined::NeedsSlot => {
                    slot = Some(self.download_slot().await?);
                    continue;
                }
            };
            let result = if joined {
                self.metrics.coalesced.inc();
                BlobResult::Joined
            } else {
                BlobResult::Miss
            };
            self.store.touch(d);
            if verified {
                let (file, size) = fill.verified().await?;
                return Ok(BlobAnswer { body: BlobBody::File { file, size, lease: None }, result });
            }
            let size = fill.ready().await?;
            return Ok(BlobAnswer { body: BlobBody::Filling { fill, size }, result });
        }
    }

    /// Waits up to `server.download_wait` for one of `server.max_inflight_downloads`.
    async fn download_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, CacheError> {
        let slots = self.limits.downloads.clone();
        match tokio::time::timeout(self.limits.wait, slots.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                self.metrics.downloads_refused.with_label_values(&["downloads"]).inc();
                Err(CacheError::Busy("downloads"))
            }
        }
    }

    /// Records that `key` holds the blob being served. A failed write (a shared bucket
    /// that is down) is logged, not passed on: the bytes are there to serve, and the link
    /// is written again on a later hit.
    fn link_served(&self, key: &RepoKey, d: &Digest) {
        if let Err(e) = self.store.link_layer(key, d) {
            tracing::warn!(repository = %key.as_str(), digest = %d, error = %e, "recording a repository's blob link failed");
        }
    }

    fn cached_blob(
        &self,
        key: &RepoKey,
        d: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<Option<BlobBody>, CacheError> {
        if let Some((url, size)) = self.store.blob_redirect(d)? {
            self.link_served(key, d);
            self.store.touch(d);
            return Ok(Some(BlobBody::Redirect { url, size }));
        }
        if let Some(bytes) = self.store.small_blob(d) {
            self.link_served(key, d);
            self.store.touch(d);
            return Ok(Some(BlobBody::Bytes(bytes)));
        }
        // Leased before it is opened, so eviction cannot slip in between.
        let lease = self.leases.take(d);
        // A backend that streams the blob cuts the part asked for (a local file is opened
        // whole); which part needs the size, which the store knows without reading.
        let part = match range {
            Some(r) => match self.store.blob_size(d)?.map(|size| (r.resolve(size), size)) {
                Some((ByteRange::Part(first, last), size)) => Some((first, last - first + 1, size)),
                _ => None,
            },
            None => None,
        };
        match self.store.open_blob(d, part.map(|(first, len, _)| (first, len)))? {
            Some(BlobRead::File { file, size }) => {
                self.link_served(key, d);
                self.store.touch(d);
                if size <= crate::store::SMALL_BLOB_MAX {
                    if let Ok(bytes) = read_at(&file, 0, size as usize) {
                        self.store.remember_small_blob(d, bytes.clone());
                        return Ok(Some(BlobBody::Bytes(bytes)));
                    }
                }
                Ok(Some(BlobBody::File { file, size, lease: Some(lease) }))
            }
            Some(BlobRead::Stream { body, size }) => {
                self.link_served(key, d);
                self.store.touch(d);
                let part = part.filter(|(_, len, _)| *len == size).map(|(first, _, whole)| (first, whole));
                Ok(Some(BlobBody::Stream { body, size, part, lease }))
            }
            None => Ok(None),
        }
    }

    /// A blob's size for HEAD: from the store, a fill in flight, or an upstream HEAD
    /// (a HEAD does not start a download). Also whether it is cached.
    pub async fn blob_size(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        d: &Digest,
    ) -> Result<(Option<u64>, bool), CacheError> {
        if let Some(size) = self.store.blob_size(d)? {
            self.link_served(&RepoKey::new(&up.name, name), d);
            self.store.touch(d);
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

    /// A page of a repository's tags: the upstream's when it answers, else what the cache
    /// knows. Returns the names, whether more follow, and whether they came from the cache.
    pub async fn tags_list(
        &self,
        up: &Upstream,
        name: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Listing, CacheError> {
        match up.tags_list(name, n, last).await {
            Ok(page) => Ok(Listing::from_upstream(&page, "tags", n, last)),
            Err(e) if e.is_transient() => {
                let key = RepoKey::new(&up.name, name);
                let tags = self.store.tags(&key)?;
                if tags.is_empty() {
                    return Err(e.into());
                }
                Ok(Listing::paginate(tags, n, last))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A page of the upstream's catalog, or of the repositories the cache knows when the
    /// upstream cannot or will not list them (many registries offer no catalog).
    pub async fn catalog(
        &self,
        up: &Upstream,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Listing, CacheError> {
        match up.catalog(n, last).await {
            Ok(page) => Ok(Listing::from_upstream(&page, "repositories", n, last)),
            Err(e) => {
                tracing::debug!(upstream = %up.name, error = %e, "catalog from cache");
                Ok(Listing::paginate(self.store.repositories(&up.name)?, n, last))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_paginate_after_last() {
        let all: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p = Listing::paginate(all.clone(), Some(2), None);
        assert_eq!((p.names.clone(), p.more), (vec!["a".to_string(), "b".to_string()], true));
        let p = Listing::paginate(all.clone(), Some(2), Some("b"));
        assert_eq!((p.names.clone(), p.more), (vec!["c".to_string(), "d".to_string()], false));
        let p = Listing::paginate(all, None, Some("zz"));
        assert!(p.names.is_empty() && !p.more);
    }
}
