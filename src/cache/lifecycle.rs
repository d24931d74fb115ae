//! The cache's lifecycle: a size cap kept by least-recently-used eviction, pins, garbage
//! collection of blobs no cached manifest refers to, and leases that keep eviction off
//! blobs clients are reading.
//!
//! Eviction is per blob and global by digest: a layer shared by many images is one entry,
//! and goes only when none of them used it recently. Manifests and tag history stay (they
//! are small, and tag revalidation needs them); a layer evicted from under a cached
//! manifest is fetched again when next asked for. All of it runs on the blocking pool, one
//! pass at a time, in small batches, and takes no lock a request needs for longer than one
//! batch's bookkeeping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use globset::GlobSet;
use serde::Serialize;

use crate::config::CacheConfig;
use crate::oci::{references, Digest};
use crate::store::{now_ms, Store, StoreError};

use super::{Cache, CacheError};

/// Blobs deleted per batch: bounds how long one batch's bookkeeping holds anything.
const BATCH: usize = 64;
/// Temp files younger than this are never swept, whatever `min_age` says: a download that
/// waits for its clients before committing leaves its spool untouched for a while.
const SPOOL_MIN_AGE: Duration = Duration::from_secs(3600);

/// Why a blob left the cache (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The size cap (or `min_free`): least recently used first.
    Lru,
    /// No cached manifest refers to it.
    Gc,
    /// Stored but not indexed (a crash between the two, or a file put there by hand).
    Orphan,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Lru => "lru",
            Reason::Gc => "gc",
            Reason::Orphan => "orphan",
        }
    }
}

/// The lifecycle settings, resolved once.
pub struct Policy {
    pub max_size: u64,
    pub min_free: u64,
    pub low_watermark: f64,
    pub min_age: Duration,
    pins: GlobSet,
}

impl Policy {
    pub fn new(c: &CacheConfig) -> Policy {
        let mut b = globset::GlobSetBuilder::new();
        for p in &c.pins {
            // Validated with the configuration.
            if let Ok(g) = globset::GlobBuilder::new(p).literal_separator(false).build() {
                b.add(g);
            }
        }
        Policy {
            max_size: c.max_size.0,
            min_free: c.min_free.0,
            low_watermark: c.low_watermark,
            min_age: c.min_age,
            pins: b.build().unwrap_or_else(|_| GlobSet::empty()),
        }
    }

    fn bounded(&self) -> bool {
        self.max_size > 0 || self.min_free > 0
    }
}

/// Blobs clients are reading now: eviction passes them over.
#[derive(Default)]
pub struct Leases(Mutex<HashMap<Digest, usize>>);

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn take(self: &Arc<Self>, d: &Digest) -> Lease {
        *self.lock().entry(d.clone()).or_default() += 1;
        Lease { leases: self.clone(), digest: d.clone() }
    }

    fn held(&self, d: &Digest) -> bool {
        self.lock().contains_key(d)
    }
}

/// Keeps eviction off one blob while a response reads it; released on drop, whatever way
/// the response ends.
pub struct Lease {
    leases: Arc<Leases>,
    digest: Digest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.leases.lock();
        if let Some(n) = map.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

/// Bytes counted against the cap while a commit stores them; released on drop.
pub struct Reservation {
    cache: Arc<Cache>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.cache.reserved.fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One blob removed (or, in a dry run, that would be).
#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    pub digest: String,
    pub bytes: u64,
    pub reason: Reason,
}

/// Count and bytes for one reason.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    pub blobs: u64,
    pub bytes: u64,
}

/// What a collection did, or would do.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub by_reason: BTreeMap<&'static str, Tally>,
    pub removed: Vec<Removed>,
    /// Stale temp files.
    pub spool_files: u64,
    pub spool_bytes: u64,
    pub cache_bytes_before: u64,
    pub cache_bytes_after: u64,
    pub limit_bytes: u64,
    /// Why nothing was done (another replica holds the shared bucket's collection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl GcReport {
    fn add(&mut self, d: &Digest, bytes: u64, reason: Reason) {
        let t = self.by_reason.entry(reason.as_str()).or_default();
        t.blobs += 1;
        t.bytes += bytes;
        self.removed.push(Removed { digest: d.to_string(), bytes, reason });
    }
}

/// Every digest the image `d` reaches: itself, its children (every platform, attestations)
/// and their configs and layers.
fn reach(store: &Store, d: &Digest, out: &mut HashSet<Digest>) -> Result<(), StoreError> {
    let mut stack = vec![d.clone()];
    while let Some(m) = stack.pop() {
        if !out.insert(m.clone()) {
            continue;
        }
        let Some(stored) = store.manifest_bytes(&m)? else { continue };
        let (children, blobs) = references(&stored.bytes);
        out.extend(blobs);
        stack.extend(children);
    }
    Ok(())
}

impl Cache {
    /// Whether a download of `d` is in flight or a client holds a lease on it.
    fn busy(&self, d: &Digest) -> bool {
        self.leases.held(d) || self.fills.lock().unwrap_or_else(|p| p.into_inner()).contains_key(d)
    }

    /// Every blob a pinned tag's current image reaches: pinned by `cache.pins` or by
    /// `prefetch --pin`.
    fn pinned(&self) -> Result<HashSet<Digest>, StoreError> {
        let mut out = HashSet::new();
        let prefetched = self.store.pins()?;
        if self.policy.pins.is_empty() && prefetched.is_empty() {
            return Ok(out);
        }
        for (repo, tag, d) in self.store.tag_entries()? {
            let name = format!("{}:{}", repo.as_str(), tag.as_str());
            if prefetched.contains(&name) || self.policy.pins.is_match(&name) {
                reach(&self.store, &d, &mut out)?;
            }
        }
        Ok(out)
    }

    fn count_removed(&self, gone: &[(Digest, u64)], reason: Reason) {
        let bytes: u64 = gone.iter().map(|(_, b)| b).sum();
        self.metrics.evictions.with_label_values(&[reason.as_str()]).inc_by(gone.len() as u64);
        self.metrics.evicted_bytes.with_label_values(&[reason.as_str()]).inc_by(bytes);
    }

    /// Bytes stored plus bytes reserved by commits under way.
    fn committed(&self) -> u64 {
        self.store.totals().1 + self.reserved.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Room for a verified download of `incoming` bytes about to be stored: evicts what it
    /// must, then reserves the bytes until the returned guard is dropped (after the
    /// commit), so concurrent commits cannot all pass the same check and overshoot the
    /// cap together. `None`: no room. Blocking; waits for a running pass.
    pub(super) fn reserve_blocking(
        self: &Arc<Self>,
        incoming: u64,
    ) -> Result<Option<Reservation>, StoreError> {
        let _pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
        let fits = self.fits(incoming, false)?
            || (self.policy.bounded() && self.evict_locked(incoming, &mut GcReport::default(), false)?);
        if !fits {
            return Ok(None);
        }
        self.reserved.fetch_add(incoming, std::sync::atomic::Ordering::AcqRel);
        Ok(Some(Reservation { cache: self.clone(), bytes: incoming }))
    }

    /// Whether `incoming` more bytes fit within the cap and the free-space floor now
    /// (`on_disk_later`: the bytes still have to be written, so the file system must hold
    /// them too).
    fn fits(&self, incoming: u64, on_disk_later: bool) -> Result<bool, StoreError> {
        let p = &self.policy;
        if p.max_size > 0 && self.committed() + incoming > p.max_size {
            return Ok(false);
        }
        if p.min_free > 0 {
            if let Some(free) = self.store.free_space()? {
                return Ok(free >= p.min_free + if on_disk_later { incoming } else { 0 });
            }
        }
        Ok(true)
    }

    /// Evicts least-recently-used blobs until `incoming` more bytes fit with room to spare
    /// (down to the low watermark of the cap, and `min_free` free). Blocking. Returns
    /// whether they fit afterwards.
    ///
    /// `before_download`: the bytes are not on disk yet, so the file system must hold
    /// them too, and a pass already running is not waited for (a client waits for its
    /// first byte): what fits now is the answer.
    pub fn make_room_blocking(
        &self,
        incoming: u64,
        report: &mut GcReport,
        before_download: bool,
    ) -> Result<bool, StoreError> {
        if !self.policy.bounded() || (!report.dry_run && self.fits(incoming, before_download)?) {
            return Ok(true);
        }
        let _pass = match self.pass.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if before_download => {
                return self.fits(incoming, before_download)
            }
            Err(std::sync::TryLockError::WouldBlock) => self.pass.lock().unwrap_or_else(|p| p.into_inner()),
        };
        // With a bucket shared by replicas, one of them evicts at a time.
        let Some(_job) = self.store.claim_job("gc")? else {
            return self.fits(incoming, before_download);
        };
        self.store.merge_shared_access(false)?;
        self.evict_locked(incoming, report, before_download)
    }

    /// [`Cache::make_room_blocking`]'s work, with the pass lock held by the caller.
    fn evict_locked(
        &self,
        incoming: u64,
        report: &mut GcReport,
        before_download: bool,
    ) -> Result<bool, StoreError> {
        let p = &self.policy;
        let target = match p.max_size {
            0 => u64::MAX,
            max => ((max as f64 * p.low_watermark) as u64).saturating_sub(incoming),
        };
        let pinned = self.pinned()?;
        // A dry run's earlier steps removed nothing: count them as gone.
        let listed: HashSet<String> = report.removed.iter().map(|r| r.digest.clone()).collect();
        let listed_bytes: u64 = report.removed.iter().map(|r| r.bytes).sum();
        let too_young = now_ms().saturating_sub(p.min_age.as_millis() as u64);
        let mut candidates: Vec<(u64, Digest, u64)> = self
            .store
            .blob_entries()?
            .into_iter()
            .filter(|(d, m)| {
                m.media_type.is_none()
                    && m.accessed_ms <= too_young
                    && !pinned.contains(d)
                    && !listed.contains(&d.to_string())
            })
            .map(|(d, m)| (m.accessed_ms, d, m.size))
            .collect();
        candidates.sort_unstable();
        let mut total = self.committed().saturating_sub(listed_bytes);
        let mut free = match p.min_free {
            0 => None,
            _ => self.store.free_space()?.map(|f| f + listed_bytes),
        };
        let floor = p.min_free + if before_download { incoming } else { 0 };
        let enough = |total: u64, free: Option<u64>| total <= target && free.is_none_or(|f| f >= floor);
        let mut queue = candidates.into_iter();
        let mut deleted = Vec::new();
        while !enough(total, free) {
            let (mut t, mut f) = (total, free);
            let mut batch = Vec::new();
            while batch.len() < BATCH && !enough(t, f) {
                let Some((_, d, size)) = queue.next() else { break };
                if self.busy(&d) {
                    continue;
                }
                t = t.saturating_sub(size);
                f = f.map(|f| f + size);
                batch.push((d, size));
            }
            if batch.is_empty() {
                break;
            }
            let gone = match report.dry_run {
                true => batch,
                false => self
                    .store
                    .delete_blobs(&batch.into_iter().map(|(d, n)| (d, Some(n))).collect::<Vec<_>>())?,
            };
            for (d, bytes) in &gone {
                report.add(d, *bytes, Reason::Lru);
                total = total.saturating_sub(*bytes);
                free = free.map(|f| f + bytes);
            }
            if !report.dry_run {
                self.count_removed(&gone, Reason::Lru);
                deleted.extend(gone.into_iter().map(|(d, _)| d));
                total = self.committed();
                free = match p.min_free {
                    0 => None,
                    _ => self.store.free_space()?,
                };
            }
        }
        if report.dry_run {
            return Ok(enough(total, free));
        }
        self.store.unlink_layers(&deleted)?;
        let fits = self.fits(incoming, before_download)?;
        if !fits {
            tracing::warn!(
                incoming,
                cache_bytes = self.store.totals().1,
                "eviction could not make room: what is left is pinned, in use or younger than cache.min_age"
            );
        }
        Ok(fits)
    }

    /// A full collection: blobs no cached manifest refers to, blobs the index does not
    /// know, stale temp files, then eviction down to the cap. Blocking.
    pub fn collect_blocking(&self, dry_run: bool) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            dry_run,
            cache_bytes_before: self.store.totals().1,
            limit_bytes: self.policy.max_size,
            ..Default::default()
        };
        {
            let _pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
            // With a bucket shared by replicas, one of them collects at a time, knowing
            // what all of them stored.
            let Some(_job) = self.store.claim_job("gc")? else {
                report.skipped = Some("another replica is collecting the shared bucket".into());
                return Ok(report);
            };
            let synced = self.store.is_shared();
            if synced {
                self.store.sync()?;
                report.cache_bytes_before = self.store.totals().1;
            }
            self.store.flush_access()?;
            self.store.merge_shared_access(synced)?;
            let too_young = now_ms().saturating_sub(self.policy.min_age.as_millis() as u64);
            let entries = self.store.blob_entries()?;
            let mut referenced = HashSet::new();
            for (d, m) in &entries {
                if m.media_type.is_some() {
                    if let Some(stored) = self.store.manifest_bytes(d)? {
                        let (children, blobs) = references(&stored.bytes);
                        referenced.extend(children);
                        referenced.extend(blobs);
                    }
                }
            }
            let unreferenced: Vec<(Digest, u64, bool)> = entries
                .into_iter()
                .filter(|(d, m)| {
                    m.media_type.is_none()
                        && m.accessed_ms <= too_young
                        && !referenced.contains(d)
                        && !self.busy(d)
                })
                .map(|(d, m)| (d, m.size, true))
                .collect();
            self.remove(unreferenced, Reason::Gc, &mut report)?;
            let orphans: Vec<(Digest, u64, bool)> = self
                .store
                .unindexed_blobs(too_young.min(now_ms()))?
                .into_iter()
                .filter(|l| !self.busy(&l.digest))
                .map(|l| (l.digest, l.size, false))
                .collect();
            self.remove(orphans, Reason::Orphan, &mut report)?;
            let spool_age = self.policy.min_age.max(SPOOL_MIN_AGE).as_millis() as u64;
            let (bytes, files) = self.store.sweep_spools(now_ms().saturating_sub(spool_age), dry_run)?;
            report.spool_bytes = bytes;
            report.spool_files = files;
        }
        if dry_run {
            // What eviction would take after the collection above.
            let freed: u64 = report.removed.iter().map(|r| r.bytes).sum();
            let over = self.policy.max_size > 0
                && report.cache_bytes_before.saturating_sub(freed) > self.policy.max_size;
            if over || (self.policy.min_free > 0 && !self.fits(0, false)?) {
                self.make_room_blocking(0, &mut report, false)?;
            }
        } else if !self.fits(0, false)? {
            self.make_room_blocking(0, &mut report, false)?;
        }
        let freed: u64 = report.removed.iter().map(|r| r.bytes).sum();
        report.cache_bytes_after = match dry_run {
            true => report.cache_bytes_before.saturating_sub(freed),
            false => self.store.totals().1,
        };
        Ok(report)
    }

    /// Removes `blobs` (digest, size, whether indexed) in batches, counted under `reason`.
    fn remove(
        &self,
        blobs: Vec<(Digest, u64, bool)>,
        reason: Reason,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let mut deleted = Vec::new();
        for batch in blobs.chunks(BATCH) {
            let gone = match report.dry_run {
                true => batch.iter().map(|(d, n, _)| (d.clone(), *n)).collect(),
                false => self.store.delete_blobs(
                    &batch
                        .iter()
                        .map(|(d, n, indexed)| (d.clone(), indexed.then_some(*n)))
                        .collect::<Vec<_>>(),
                )?,
            };
            for (d, bytes) in &gone {
                report.add(d, *bytes, reason);
            }
            if !report.dry_run {
                self.count_removed(&gone, reason);
                deleted.extend(gone.into_iter().map(|(d, _)| d));
            }
        }
        self.store.unlink_layers(&deleted)?;
        Ok(())
    }

    /// [`Cache::collect_blocking`] on a thread of its own at a lower CPU priority (nice
    /// 10): a collection is background work, and on a small machine it would otherwise
    /// take CPU time from the requests it runs beside. (Not the blocking pool: an
    /// unprivileged process cannot raise a thread's priority back.)
    pub async fn collect(self: &Arc<Self>, dry_run: bool) -> Result<GcReport, CacheError> {
        let cache = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("wharf-gc".into())
            .spawn(move || {
                let tid = rustix::thread::gettid();
                if let Err(e) = rustix::process::setpriority_process(Some(tid), 10) {
                    tracing::debug!(error = %e, "collection runs at normal priority");
                }
                let _ = tx.send(cache.collect_blocking(dry_run));
            })
            .map_err(|e| CacheError::Internal(format!("starting a collection thread: {e}")))?;
        rx.await
            .map_err(|_| CacheError::Internal("the collection thread ended early".into()))?
            .map_err(CacheError::from)
    }

    /// [`Cache::make_room_blocking`] on the blocking pool; whether the bytes fit.
    pub(super) async fn make_room(
        self: &Arc<Self>,
        incoming: u64,
        before_download: bool,
    ) -> Result<bool, CacheError> {
        if !self.policy.bounded() {
            return Ok(true);
        }
        let cache = self.clone();
        super::blocking(move || cache.make_room_blocking(incoming, &mut GcReport::default(), before_download))
            .await
    }
}
