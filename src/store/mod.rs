//! Storage only: blob bytes behind one [`BlobBackend`] (the distribution-layout tree is the
//! first), the repository links beside them, the sled index derived from both, and the
//! analytics counters that are not derivable. Knows nothing of upstreams or HTTP. All calls
//! block: async callers run writes on the blocking pool.

mod backend;
mod counters;
mod index;
mod s3;
mod tree;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use backend::{BlobBackend, BlobRead, Listed, Spool};
use counters::Counters;
use index::{history_key, Index};
pub use index::{BlobMeta, ReferrersMeta, Seen, TagMeta};
pub use s3::Lease as SharedLease;
use tree::Tree;

use crate::oci::{manifest_media_type, Digest, RepoName, Tag};

/// A cached repository: `<upstream name>/<repository>`, e.g. `docker.io/library/alpine`.
/// Both parts are validated, so it is safe as a relative path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoKey(String);

impl RepoKey {
    pub fn new(upstream: &str, name: &RepoName) -> RepoKey {
        RepoKey(format!("{upstream}/{}", name.as_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// From the text form; only a valid repository name (upstream component first) parses.
    pub fn parse(s: &str) -> Option<RepoKey> {
        let (up, rest) = s.split_once('/')?;
        RepoName::parse(s)?;
        RepoName::parse(rest)?;
        Some(RepoKey(format!("{up}/{rest}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Io(#[from] io::Error),
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    #[error("data dir {0} is in use by another wharf process")]
    Locked(PathBuf),
}

impl StoreError {
    /// Whether the shared object store could not be reached (or failed): a transient
    /// condition, answered with 503 rather than as wharf's own fault.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Io(e) => e.get_ref().is_some_and(|inner| inner.is::<s3::Unavailable>()),
            _ => false,
        }
    }
}

/// Whether a replica may fetch a blob from its upstream now.
pub enum Claim {
    /// Yes; the lease (with a shared store) keeps other replicas waiting until dropped.
    Mine(Option<SharedLease>),
    /// Another replica is fetching it.
    Elsewhere,
}

/// A manifest as stored: the exact bytes and the media type to serve them with.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    pub bytes: Bytes,
    pub media_type: String,
}

/// Bound on the in-memory manifest cache (manifests are a few KiB each).
const MANIFEST_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Blobs up to this size are kept in memory once served.
pub const SMALL_BLOB_MAX: u64 = 64 * 1024;
/// Bound on the bytes of small blobs kept in memory.
const SMALL_BLOBS_BYTES: usize = 4 * 1024 * 1024;
/// Bound on the known-links set.
const MAX_KNOWN_LINKS: usize = 100_000;

#[derive(Default)]
struct ManifestCache {
    map: HashMap<(RepoKey, Digest), StoredManifest>,
    bytes: usize,
}

impl ManifestCache {
    fn insert(&mut self, key: (RepoKey, Digest), m: StoredManifest) {
        let size = m.bytes.len();
        if size > MANIFEST_CACHE_BYTES / 4 {
            return;
        }
        // Evict arbitrary entries until it fits: hits are what matters, not recency.
        while self.bytes + size > MANIFEST_CACHE_BYTES {
            let Some(k) = self.map.keys().next().cloned() else { break };
            if let Some(old) = self.map.remove(&k) {
                self.bytes -= old.bytes.len();
            }
        }
        if let Some(old) = self.map.insert(key, m) {
            self.bytes -= old.bytes.len();
        }
        self.bytes += size;
    }
}

/// One entry of a tag's history.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    pub digest: String,
    pub first_seen: String,
    pub last_seen: String,
    pub current: bool,
    /// Pulls of the tag while it pointed at this digest.
    pub pulls: u64,
    #[serde(skip)]
    pub first_seen_ms: u64,
    #[serde(skip)]
    pub last_seen_ms: u64,
}

/// What `reindex` found.
#[derive(Debug, Default, Serialize)]
pub struct ReindexStats {
    pub blobs: u64,
    pub manifests: u64,
    pub tags: u64,
    pub history_entries: u64,
}

/// Totals a cleanly closed store leaves for the next open, so start-up needs no scan.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CleanClose {
    blobs: u64,
    bytes: u64,
}

/// What the index holds, without times: `reindex` on a copy of the data dir must give the
/// same as the live index.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct IndexDump {
    /// digest → (size, media type of a manifest).
    pub blobs: std::collections::BTreeMap<String, (u64, Option<String>)>,
    /// `<repo>:<tag>` → current digest.
    pub tags: std::collections::BTreeMap<String, String>,
    /// `<repo>:<tag>` → every digest it pointed at, sorted.
    pub history: std::collections::BTreeMap<String, Vec<String>>,
}

pub struct Store {
    /// Repository links (and, as the filesystem backend, blob bytes): only it builds paths.
    tree: Arc<Tree>,
    /// The one way to blob bytes.
    blobs: Arc<dyn BlobBackend>,
    index: Index,
    /// Analytics that outlive restarts and reindexing.
    counters: Counters,
    /// Last-access times not yet written to the index: reads stay free of index writes,
    /// and `flush_access` writes them in one batch.
    accessed: Mutex<HashMap<Digest, u64>>,
    /// Manifests served recently, so hits skip the disk and the index. Content by digest
    /// is immutable; bounded by bytes.
    manifests: Mutex<ManifestCache>,
    /// Small blobs (configs, small layers) served recently, verified bytes. Bounded.
    small_blobs: Mutex<(HashMap<Digest, Bytes>, usize)>,
    /// (repository, blob) links known to exist, so hits skip a stat. Bounded.
    links: Mutex<HashSet<(RepoKey, Digest)>>,
    /// Number and bytes of indexed blobs (manifests included), kept as they change.
    blob_count: AtomicU64,
    blob_bytes: AtomicU64,
    /// `wharf/clean`: present only between a clean close and the next open.
    clean_path: PathBuf,
    /// `wharf/pins`: tags pinned by `prefetch --pin`, one `<repo>:<tag>` per line. Not
    /// derivable from the tree, so not in the index; the lock orders writers.
    pins_path: PathBuf,
    pins_lock: Mutex<()>,
    /// The bucket, when replicas share one (`storage.backend = "s3"`).
    shared: Option<Arc<s3::Tiered>>,
    /// When this replica last rewrote each tag's current link in the bucket, so that
    /// its time says when the tag was last seen pointing there.
    tag_touched: Mutex<HashMap<(RepoKey, String), u64>>,
    /// Held for the store's lifetime: one process per data dir.
    _lock: File,
}

/// How often a replica rewrites a tag's current link that has not moved.
const TAG_TOUCH_MS: u64 = 60_000;

/// Wall-clock time in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// Whether a process holds the data dir (a running server), without taking it.
pub fn is_locked(data_dir: &Path) -> bool {
    match File::open(data_dir.join("wharf/lock")) {
        Ok(f) => match f.try_lock_shared() {
            Ok(()) => false,
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(_)) => false,
        },
        Err(_) => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens the data dir: takes its lock, cleans temp files, opens the index and the
    /// analytics. The index is rebuilt from the tree when it is new, cannot be opened (a
    /// broken one is moved aside), or the last process did not close cleanly (a crash can
    /// leave the tree and the index one step apart). A clean open reads no entry.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, &crate::config::StorageConfig::default())
    }

    /// [`Store::open`] with the configured backend. With a shared bucket, the link files
    /// and the index are brought up to date with it first.
    pub fn open_with(data_dir: &Path, storage: &crate::config::StorageConfig) -> Result<Store, StoreError> {
        let wharf_dir = data_dir.join("wharf");
        fs::create_dir_all(&wharf_dir)?;
        let lock = File::options().create(true).truncate(false).write(true).open(wharf_dir.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(data_dir.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let mut tree = Tree::open(data_dir)?;
        let bucket = match storage.backend {
            crate::config::StorageBackend::Filesystem => None,
            crate::config::StorageBackend::S3 => Some(Arc::new(s3::Bucket::open(storage)?)),
        };
        if let Some(b) = &bucket {
            tree.set_mirror(b.clone());
        }
        let tree = Arc::new(tree);
        let shared = match bucket {
            Some(b) => Some(Arc::new(s3::Tiered::new(b, tree.clone(), storage.local_max_size.0)?)),
            None => None,
        };
        let blobs: Arc<dyn BlobBackend> = match &shared {
            Some(t) => t.clone(),
            None => tree.clone(),
        };
        let index_path = wharf_dir.join("index");
        let index = match Index::open(&index_path) {
            Ok(i) => i,
            Err(e) => {
                let aside = wharf_dir.join(format!("index.broken-{}", now_ms()));
                tracing::error!(error = %e, moved_to = %aside.display(), "index cannot be opened; rebuilding it from the storage tree");
                fs::rename(&index_path, &aside)?;
                Index::open(&index_path)?
            }
        };
        let counters = Counters::open(&wharf_dir.join("analytics"))?;
        if let Some((old_counters, old_history)) = index.legacy_analytics()? {
            let moved = counters.migrate_from(&old_counters, &old_history)?;
            index.drop_legacy_analytics()?;
            tracing::info!(entries = moved, "moved analytics out of the index into wharf/analytics");
        }
        let clean_path = wharf_dir.join("clean");
        let clean: Option<CleanClose> =
            fs::read(&clean_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if clean_path.exists() {
            // Gone until the next clean close, so a crash from here on is noticed.
            fs::remove_file(&clean_path)?;
            File::open(&wharf_dir)?.sync_all()?;
        }
        let store = Store {
            blobs,
            tree,
            index,
            counters,
            accessed: Mutex::new(HashMap::new()),
            manifests: Mutex::new(ManifestCache::default()),
            small_blobs: Mutex::new((HashMap::new(), 0)),
            links: Mutex::new(HashSet::new()),
            blob_count: AtomicU64::new(0),
            blob_bytes: AtomicU64::new(0),
            clean_path,
            pins_path: wharf_dir.join("pins"),
            pins_lock: Mutex::new(()),
            shared,
            tag_touched: Mutex::new(HashMap::new()),
            _lock: lock,
        };
        match (store.index.is_built()?, clean) {
            (built, _) if store.shared.is_some() => match store.sync() {
                Ok(stats) => tracing::info!(?stats, "index built from the shared bucket"),
                // A replica restarted while the store is down serves what its last run
                // indexed and holds on its own disk; the periodic sync catches up once the
                // store is back. A first start has nothing to serve and fails, so a wrong
                // endpoint, bucket or key shows at once.
                Err(e) if built && e.is_unavailable() => {
                    let (mut blobs, mut bytes) = (0, 0);
                    for entry in store.index.blobs() {
                        let (_, m) = entry?;
                        blobs += 1;
                        bytes += m.size;
                    }
                    store.blob_count.store(blobs, Ordering::Relaxed);
                    store.blob_bytes.store(bytes, Ordering::Relaxed);
                    tracing::warn!(error = %e, blobs, "the shared object store cannot be reached; serving from the last run's index and this replica's own disk until it can");
                }
                Err(e) => return Err(e),
            },
            (true, Some(c)) => {
                store.blob_count.store(c.blobs, Ordering::Relaxed);
                store.blob_bytes.store(c.bytes, Ordering::Relaxed);
            }
            (built, _) => {
                if built {
                    tracing::warn!(
                        "the last run did not close cleanly; checking the index against the storage tree"
                    );
                }
                let stats = store.reindex()?;
                tracing::info!(?stats, "index built from the storage tree");
            }
        }
        Ok(store)
    }

    /// Flushes everything and leaves the totals for the next open. Call once, last.
    pub fn close(&self) -> Result<(), StoreError> {
        self.flush()?;
        let (blobs, bytes) = self.totals();
        let body = serde_json::to_vec(&CleanClose { blobs, bytes }).expect("totals serialize");
        let tmp = self.clean_path.with_extension("tmp");
        fs::write(&tmp, body)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &self.clean_path)?;
        Ok(())
    }

    /// Size of a stored blob.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.blobs.stat(d)?)
    }

    /// Opens a stored blob (see [`BlobBackend::open`]).
    pub fn open_blob(&self, d: &Digest, range: Option<(u64, u64)>) -> Result<Option<BlobRead>, StoreError> {
        Ok(self.blobs.open(d, range)?)
    }

    /// A stored blob as a local file, whatever the backend (a shared bucket's blob is
    /// downloaded and verified first).
    pub fn open_blob_file(&self, d: &Digest) -> Result<Option<(File, u64)>, StoreError> {
        if let Some(t) = &self.shared {
            return Ok(t.open_file(d)?);
        }
        match self.blobs.open(d, None)? {
            Some(BlobRead::File { file, size }) => Ok(Some((file, size))),
            Some(BlobRead::Stream { .. }) => {
                Err(StoreError::Io(io::Error::other(format!("blob {d}: not a local file"))))
            }
            None => Ok(None),
        }
    }

    /// Reads a small stored blob (a config) whole.
    pub fn read_blob(&self, d: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.blobs.read(d)?)
    }

    /// A new spool file for a download.
    pub fn spool(&self) -> io::Result<Spool> {
        self.blobs.spool()
    }

    /// Free space for blobs, when the backend is bounded.
    pub fn free_space(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.blobs.free_space()?)
    }

    /// Stores a verified, fsynced spool file and indexes it.
    pub fn commit_blob(&self, spool: &Path, d: &Digest, size: u64) -> Result<(), StoreError> {
        self.blobs.put_spool(spool, d)?;
        let old = self.index.blob(d)?;
        self.index.put_blob(d, &BlobMeta { size, media_type: None, accessed_ms: now_ms() })?;
        if old.is_none() {
            self.count_blob(size);
        }
        Ok(())
    }

    fn count_blob(&self, size: u64) {
        self.blob_count.fetch_add(1, Ordering::Relaxed);
        self.blob_bytes.fetch_add(size, Ordering::Relaxed);
    }

    /// Number and total bytes of stored blobs (manifests included).
    pub fn totals(&self) -> (u64, u64) {
        (self.blob_count.load(Ordering::Relaxed), self.blob_bytes.load(Ordering::Relaxed))
    }

    /// Adds to analytics counters (kept across restarts and reindexing).
    pub fn add_counters(&self, adds: &HashMap<String, u64>) -> Result<(), StoreError> {
        Ok(self.counters.add(adds)?)
    }

    /// Analytics counters whose key starts with `prefix`.
    pub fn counters(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.counters.get(prefix)?)
    }

    /// Drops per-day analytics of days before `first_kept` (`YYYY-MM-DD`).
    pub fn drop_counts_before(&self, first_kept: &str) -> Result<usize, StoreError> {
        Ok(self.counters.drop_days_before(first_kept)?)
    }

    /// Adds `n` pulls of tag `t` while it pointed at `d` to its history.
    pub fn add_tag_pulls(&self, r: &RepoKey, t: &Tag, d: &Digest, n: u64) -> Result<(), StoreError> {
        Ok(self.counters.add_tag_pulls(&history_key(r, t, d), n)?)
    }

    /// A small blob held in memory (read from the store, so verified).
    pub fn small_blob(&self, d: &Digest) -> Option<Bytes> {
        lock(&self.small_blobs).0.get(d).cloned()
    }

    /// Keeps a small blob's bytes, read from the store, in memory.
    pub fn remember_small_blob(&self, d: &Digest, bytes: Bytes) {
        let mut guard = lock(&self.small_blobs);
        let (map, total) = &mut *guard;
        while *total + bytes.len() > SMALL_BLOBS_BYTES {
            let Some(k) = map.keys().next().cloned() else { break };
            if let Some(old) = map.remove(&k) {
                *total -= old.len();
            }
        }
        *total += bytes.len();
        if let Some(old) = map.insert(d.clone(), bytes) {
            *total -= old.len();
        }
    }

    /// Notes that blob `d` was used (written to the index by `flush_access`).
    pub fn touch(&self, d: &Digest) {
        lock(&self.accessed).insert(d.clone(), now_ms());
    }

    /// Writes the pending last-access times to the index; returns how many.
    pub fn flush_access(&self) -> Result<usize, StoreError> {
        let pending = std::mem::take(&mut *lock(&self.accessed));
        self.merge_access(&pending)?;
        if let (Some(t), false) = (&self.shared, pending.is_empty()) {
            // The replica that evicts reads every replica's accesses.
            if let Err(e) = t.bucket().put_accesses(&pending) {
                tracing::warn!(error = %e, blobs = pending.len(), "writing last-access times to the shared bucket failed");
            }
        }
        Ok(pending.len())
    }

    fn merge_access(&self, times: &HashMap<Digest, u64>) -> Result<(), StoreError> {
        for (d, t) in times {
            if let Some(mut m) = self.index.blob(d)? {
                if *t > m.accessed_ms {
                    m.accessed_ms = *t;
                    self.index.put_blob(d, &m)?;
                }
            }
        }
        Ok(())
    }

    /// Takes every replica's last-access times from the shared bucket into the index, so
    /// eviction here sees what was used anywhere. Nothing without a bucket. With
    /// `synced` (the index was just synced with the bucket), the times of blobs the index
    /// does not hold are dropped from the bucket's merge: those blobs are gone.
    pub fn merge_shared_access(&self, synced: bool) -> Result<(), StoreError> {
        let Some(t) = &self.shared else { return Ok(()) };
        let times = t.bucket().collect_accesses(|d| !synced || !matches!(self.index.blob(d), Ok(None)))?;
        self.merge_access(&times)
    }

    /// What the index knows of blob `d`.
    pub fn blob_meta(&self, d: &Digest) -> Result<Option<BlobMeta>, StoreError> {
        Ok(self.index.blob(d)?)
    }

    /// Every indexed blob, with last-access times not yet flushed taken into account.
    pub fn blob_entries(&self) -> Result<Vec<(Digest, BlobMeta)>, StoreError> {
        let pending = lock(&self.accessed).clone();
        let mut out = Vec::new();
        for e in self.index.blobs() {
            let (d, mut m) = e?;
            if let Some(t) = pending.get(&d) {
                m.accessed_ms = m.accessed_ms.max(*t);
            }
            out.push((d, m));
        }
        Ok(out)
    }

    /// Every tag and its current digest.
    pub fn tag_entries(&self) -> Result<Vec<(RepoKey, Tag, Digest)>, StoreError> {
        let mut out = Vec::new();
        for e in self.index.tags() {
            let (k, m) = e?;
            let Some((r, t)) = k.split_once('\t') else { continue };
            if let (Some(r), Some(t), Some(d)) = (RepoKey::parse(r), Tag::parse(t), Digest::parse(&m.digest))
            {
                out.push((r, t, d));
            }
        }
        Ok(out)
    }

    /// Stored blobs the index does not know (a crash between storing and indexing, or
    /// files put there by hand), stored before `before_ms`.
    pub fn unindexed_blobs(&self, before_ms: u64) -> Result<Vec<Listed>, StoreError> {
        let mut listed = Vec::new();
        self.blobs.list(&mut |l| {
            if l.stored_ms < before_ms {
                listed.push(l)
            }
        })?;
        let mut out = Vec::new();
        for l in listed {
            if self.index.blob(&l.digest)?.is_none() {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// Removes temp files older than `before_ms` (unless `dry_run`): (bytes, files).
    pub fn sweep_spools(&self, before_ms: u64, dry_run: bool) -> Result<(u64, u64), StoreError> {
        Ok(self.blobs.sweep_spools(before_ms, dry_run)?)
    }

    /// Deletes blobs, their index entries and in-memory copies. `blobs` carries the sizes
    /// the caller read from the index (`None`: not indexed), so deleting needs no lookup.
    /// Returns what was deleted, with sizes. Their `_layers` links go with
    /// [`Store::unlink_layers`], once per pass.
    pub fn delete_blobs(&self, blobs: &[(Digest, Option<u64>)]) -> Result<Vec<(Digest, u64)>, StoreError> {
        let mut gone = Vec::new();
        let mut indexed = Vec::new();
        for (d, indexed_size) in blobs {
            let deleted = self.blobs.delete(d)?;
            if let Some(size) = indexed_size {
                self.blob_count.fetch_sub(1, Ordering::Relaxed);
                self.blob_bytes
                    .fetch_sub((*size).min(self.blob_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                indexed.push(d.clone());
            }
            if let Some(size) = deleted.or(*indexed_size) {
                gone.push((d.clone(), size));
            }
        }
        // One index batch; a crash before it leaves entries for missing files, which the
        // unclean start's rebuild drops.
        self.index.remove_blobs(&indexed)?;
        {
            let mut small = lock(&self.small_blobs);
            let mut accessed = lock(&self.accessed);
            for (d, _) in &gone {
                if let Some(b) = small.0.remove(d) {
                    small.1 -= b.len();
                }
                accessed.remove(d);
            }
        }
        Ok(gone)
    }

    /// Removes every repository's `_layers` link to deleted blobs, so a stock registry
    /// reading the tree never lists a layer whose data is gone. One walk of the
    /// repositories: call it once for a whole pass of deletions.
    pub fn unlink_layers(&self, digests: &[Digest]) -> Result<(), StoreError> {
        let hexes: HashSet<&str> = digests.iter().map(|d| d.hex()).collect();
        if !hexes.is_empty() {
            lock(&self.links).retain(|(_, d)| !hexes.contains(d.hex()));
            self.tree.remove_layer_links(&hexes)?;
        }
        Ok(())
    }

    /// Records that `repo` holds blob `d` (distribution needs the link to serve it).
    pub fn link_layer(&self, r: &RepoKey, d: &Digest) -> Result<(), StoreError> {
        let key = (r.clone(), d.clone());
        if lock(&self.links).contains(&key) {
            return Ok(());
        }
        self.tree.link_layer(r, d)?;
        let mut links = lock(&self.links);
        if links.len() >= MAX_KNOWN_LINKS {
            links.clear();
        }
        links.insert(key);
        Ok(())
    }

    /// A manifest of `repo`, when cached.
    pub fn manifest(&self, r: &RepoKey, d: &Digest) -> Result<Option<StoredManifest>, StoreError> {
        let key = (r.clone(), d.clone());
        if let Some(m) = lock(&self.manifests).map.get(&key) {
            return Ok(Some(m.clone()));
        }
        if !self.tree.has_revision(r, d) {
            return Ok(None);
        }
        let m = self.manifest_bytes(d)?;
        if let Some(m) = &m {
            lock(&self.manifests).insert(key, m.clone());
        }
        Ok(m)
    }

    /// Serves a verified manifest of `repo` from memory until [`Store::put_manifest`] has
    /// stored it.
    pub fn stage_manifest(&self, r: &RepoKey, d: &Digest, m: StoredManifest) {
        lock(&self.manifests).insert((r.clone(), d.clone()), m);
    }

    /// Forgets a staged manifest whose write failed.
    pub fn unstage_manifest(&self, r: &RepoKey, d: &Digest) {
        let mut cache = lock(&self.manifests);
        if let Some(old) = cache.map.remove(&(r.clone(), d.clone())) {
            cache.bytes -= old.bytes.len();
        }
    }

    /// A stored manifest by digest, whichever repository holds it; checked against its
    /// digest (cheap at manifest sizes, and no damaged file is ever served as this digest).
    pub fn manifest_bytes(&self, d: &Digest) -> Result<Option<StoredManifest>, StoreError> {
        let Some(bytes) = self.blobs.read(d)? else { return Ok(None) };
        let bytes = Bytes::from(bytes);
        if !d.matches(&bytes) {
            tracing::warn!(digest = %d, "stored manifest does not match its digest; fetching it again");
            return Ok(None);
        }
        let media_type = match self.index.blob(d)?.and_then(|m| m.media_type) {
            Some(mt) => mt,
            None => match manifest_media_type(&bytes) {
                Some(mt) => mt,
                None => return Ok(None),
            },
        };
        Ok(Some(StoredManifest { bytes, media_type }))
    }

    /// Stores verified manifest bytes for `repo`.
    pub fn put_manifest(
        &self,
        r: &RepoKey,
        d: &Digest,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(), StoreError> {
        match self.blobs.stat(d)? {
            Some(n) if n == bytes.len() as u64 => {}
            // A file a crash left short: replace it.
            _ => self.blobs.put_bytes(d, bytes)?,
        }
        let old = self.index.blob(d)?;
        self.index.put_blob(
            d,
            &BlobMeta {
                size: bytes.len() as u64,
                media_type: Some(media_type.to_owned()),
                accessed_ms: now_ms(),
            },
        )?;
        if old.is_none() {
            self.count_blob(bytes.len() as u64);
        }
        self.tree.link_revision(r, d)?;
        if let Some((subject, desc)) = crate::oci::referrer_of(bytes, d, media_type) {
            self.index.put_subject(r, &subject, d, &desc)?;
        }
        Ok(())
    }

    /// The first blob (config, layer) a manifest names that is not stored; `None` when the
    /// image is whole.
    pub fn missing_blob(&self, manifest: &[u8]) -> Result<Option<Digest>, StoreError> {
        for b in crate::oci::references(manifest).1 {
            if self.blob_size(&b)?.is_none() {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// Tags pinned by `prefetch --pin`, as `<repo>:<tag>`.
    pub fn pins(&self) -> Result<HashSet<String>, StoreError> {
        match fs::read_to_string(&self.pins_path) {
            Ok(s) => Ok(s.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Pins tag `t` of `r`: its current image is never evicted. Returns whether it is new.
    pub fn pin(&self, r: &RepoKey, t: &Tag) -> Result<bool, StoreError> {
        let _one_writer = self.pins_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut pins = self.pins()?;
        if !pins.insert(format!("{}:{}", r.as_str(), t.as_str())) {
            return Ok(false);
        }
        let mut lines: Vec<String> = pins.into_iter().collect();
        lines.sort();
        let tmp = self.pins_path.with_extension("new");
        let mut f = File::create(&tmp)?;
        io::Write::write_all(&mut f, format!("{}\n", lines.join("\n")).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.pins_path)?;
        Ok(true)
    }

    /// Whether replicas share a bucket.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Brings the local link files and the index up to date with the shared bucket (what
    /// other replicas stored); nothing without one.
    pub fn sync(&self) -> Result<ReindexStats, StoreError> {
        if self.shared.is_none() {
            return Ok(ReindexStats::default());
        }
        self.tree.pull_links("repositories/")?;
        let stats = self.reindex()?;
        lock(&self.links).clear();
        Ok(stats)
    }

    /// Whether this replica may fetch blob `d` from its upstream now (always, without a
    /// shared bucket).
    pub fn claim_download(&self, d: &Digest) -> Result<Claim, StoreError> {
        match &self.shared {
            None => Ok(Claim::Mine(None)),
            Some(t) => Ok(match t.bucket().claim(d)? {
                Some(lease) => Claim::Mine(Some(lease)),
                None => Claim::Elsewhere,
            }),
        }
    }

    /// The lease of a job one replica at a time runs (eviction); `Ok(None)` when another
    /// holds it. Without a shared bucket the caller's own lock is enough.
    pub fn claim_job(&self, name: &str) -> Result<Option<Option<SharedLease>>, StoreError> {
        match &self.shared {
            None => Ok(Some(None)),
            Some(t) => Ok(t.bucket().claim_job(name)?.map(Some)),
        }
    }

    /// Forgets what is known of blob `d`'s place in a shared bucket, which was found
    /// without it (another replica evicted it since the last sync).
    pub fn forget_stored_size(&self, d: &Digest) {
        if let Some(t) = &self.shared {
            t.forget_known(d);
        }
    }

    /// Blob `d` from the shared bucket, asking it afresh (another replica's download may
    /// have just finished); `None` when it is not there or there is no bucket.
    pub fn shared_blob(&self, d: &Digest) -> Result<Option<BlobRead>, StoreError> {
        let Some(t) = &self.shared else { return Ok(None) };
        if t.in_bucket(d)?.is_none() {
            return Ok(None);
        }
        Ok(t.open(d, None)?)
    }

    /// A presigned URL of blob `d` in the bucket, when redirects are on and it is there.
    pub fn blob_redirect(&self, d: &Digest) -> Result<Option<(String, u64)>, StoreError> {
        let Some(t) = self.shared.as_ref().filter(|t| t.bucket().redirects()) else { return Ok(None) };
        let Some(size) = t.stat(d)? else { return Ok(None) };
        Ok(t.bucket().presigned(d)?.map(|u| (u, size)))
    }

    /// Whether the store can serve and cache now: the index answers a read and the data
    /// dir takes a write (a full or read-only disk, or a lost mount, says why).
    pub fn check_ready(&self) -> Result<(), StoreError> {
        self.index.is_built()?;
        self.tree.probe_write()?;
        Ok(())
    }

    /// The referrers list the upstream last gave for `d` in `r`.
    pub fn referrers(&self, r: &RepoKey, d: &Digest) -> Result<Option<ReferrersMeta>, StoreError> {
        Ok(self.index.referrers(r, d)?)
    }

    pub fn put_referrers(&self, r: &RepoKey, d: &Digest, m: &ReferrersMeta) -> Result<(), StoreError> {
        Ok(self.index.put_referrers(r, d, m)?)
    }

    /// Descriptors of the cached manifests of `r` whose subject is `d`, by digest (those
    /// evicted since are left out).
    pub fn local_referrers(&self, r: &RepoKey, d: &Digest) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut out = Vec::new();
        for (referrer, desc) in self.index.subjects(r, d)? {
            if self.holds_manifest(r, &referrer)? {
                out.push(desc);
            }
        }
        Ok(out)
    }

    /// Whether `r` holds manifest `d` (staged, or linked with its data on disk), without
    /// reading or hashing it.
    pub fn holds_manifest(&self, r: &RepoKey, d: &Digest) -> Result<bool, StoreError> {
        if lock(&self.manifests).map.contains_key(&(r.clone(), d.clone())) {
            return Ok(true);
        }
        Ok(self.tree.has_revision(r, d) && self.blobs.stat(d)?.is_some())
    }

    pub fn tag(&self, r: &RepoKey, t: &Tag) -> Result<Option<TagMeta>, StoreError> {
        Ok(self.index.tag(r, t)?)
    }

    /// Records that the upstream says `t` points at `d` now: the tree's links first (the
    /// truth), then the index's tag state and history in one transaction. Returns whether
    /// the tag moved.
    pub fn record_tag(&self, r: &RepoKey, t: &Tag, d: &Digest, now: u64) -> Result<bool, StoreError> {
        let prev = self.index.tag(r, t)?;
        let moved = prev.as_ref().map(|p| p.digest != d.to_string()).unwrap_or(true);
        let touch = self.shared.is_some() && {
            let mut touched = lock(&self.tag_touched);
            let k = (r.clone(), t.as_str().to_owned());
            let due = touched.get(&k).is_none_or(|at| now.saturating_sub(*at) >= TAG_TOUCH_MS);
            if due || moved {
                if touched.len() >= MAX_KNOWN_LINKS {
                    touched.clear();
                }
                touched.insert(k, now);
            }
            due
        };
        if moved || touch {
            self.tree.link_tag(r, t, d)?;
        }
        self.index.record_tag(r, t, d, now)?;
        Ok(moved)
    }

    /// Adds a tag's history as another cache saw it (an imported bundle): each digest's
    /// link in the tree, then its times in the index. Does not move the tag.
    pub fn import_history(
        &self,
        r: &RepoKey,
        t: &Tag,
        seen: &[(Digest, u64, u64)],
    ) -> Result<(), StoreError> {
        for (d, first, last) in seen {
            self.tree.link_tag_history(r, t, d)?;
            self.index.merge_seen(r, t, d, index::Seen { first_seen_ms: *first, last_seen_ms: *last })?;
        }
        Ok(())
    }

    /// Tags of `r` the cache knows, sorted.
    pub fn tags(&self, r: &RepoKey) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}\t", r.as_str());
        let mut tags: Vec<String> =
            self.index.tag_keys(&prefix)?.into_iter().map(|k| k[prefix.len()..].to_owned()).collect();
        tags.sort();
        Ok(tags)
    }

    /// Repositories of `upstream` with at least one cached tag, sorted, without the prefix.
    pub fn repositories(&self, upstream: &str) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{upstream}/");
        let mut repos: Vec<String> = self
            .index
            .tag_keys(&prefix)?
            .into_iter()
            .filter_map(|k| k[prefix.len()..].split('\t').next().map(str::to_owned))
            .collect();
        repos.sort();
        repos.dedup();
        Ok(repos)
    }

    /// Every digest `t` pointed at, newest first.
    pub fn history(&self, r: &RepoKey, t: &Tag) -> Result<Vec<HistoryEntry>, StoreError> {
        if self.shared.is_some() {
            return self.shared_history(r, t);
        }
        let current = self.index.tag(r, t)?.map(|m| m.digest);
        let mut out = Vec::new();
        for (d, s) in self.index.history(r, t)? {
            out.push(HistoryEntry {
                current: current.as_deref() == Some(&d.to_string()),
                pulls: self.counters.tag_pulls(&history_key(r, t, &d))?,
                digest: d.to_string(),
                first_seen: rfc3339(s.first_seen_ms),
                last_seen: rfc3339(s.last_seen_ms),
                last_seen_ms: s.last_seen_ms,
                first_seen_ms: s.first_seen_ms,
            });
        }
        out.sort_by(|a, b| b.current.cmp(&a.current).then(b.first_seen_ms.cmp(&a.first_seen_ms)));
        Ok(out)
    }

    /// A tag's history as the bucket's links tell it, the same on every replica: each
    /// digest was first seen when its index link was written, and last seen when the tag
    /// moved on (the next digest's first time) or, for the current one, when a replica
    /// last rewrote the current link.
    fn shared_history(&self, r: &RepoKey, t: &Tag) -> Result<Vec<HistoryEntry>, StoreError> {
        self.tree.pull_links(&self.tree.tag_dir_rel(r, t))?;
        let Some(links) = self.tree.tag_links(r, t)? else { return Ok(Vec::new()) };
        let mut seen = links.seen.clone();
        seen.sort_by_key(|(d, at)| (*at, d.to_string()));
        let mut out = Vec::new();
        for (i, (d, first)) in seen.iter().enumerate() {
            let current = *d == links.current;
            let last = match (current, seen.get(i + 1)) {
                (true, _) | (false, None) => links.current_ms.max(*first),
                (false, Some((_, next))) => *next,
            };
            out.push(HistoryEntry {
                current,
                pulls: self.counters.tag_pulls(&history_key(r, t, d))?,
                digest: d.to_string(),
                first_seen: rfc3339(*first),
                last_seen: rfc3339(last),
                first_seen_ms: *first,
                last_seen_ms: last,
            });
        }
        out.sort_by(|a, b| b.current.cmp(&a.current).then(b.first_seen_ms.cmp(&a.first_seen_ms)));
        Ok(out)
    }

    /// Rebuilds the index from the tree. Times the old index knew are kept for entries that
    /// are still there (last access, history first/last seen); others come from the files'
    /// mtimes (a tag's index link is written when the tag first points at a digest, and the
    /// next digest's link when it moves on). Analytics are not touched.
    pub fn reindex(&self) -> Result<ReindexStats, StoreError> {
        self.index.mark_built(false)?;
        let mut stats = ReindexStats::default();
        let mut blobs: HashMap<Digest, BlobMeta> = HashMap::new();
        let mut listed = Vec::new();
        self.blobs.list(&mut |l| listed.push(l))?;
        for l in listed {
            let old = self.index.blob(&l.digest)?.map(|m| m.accessed_ms).filter(|t| *t > 0);
            let meta = BlobMeta { size: l.size, media_type: None, accessed_ms: old.unwrap_or(l.stored_ms) };
            blobs.insert(l.digest, meta);
            stats.blobs += 1;
        }
        let (revisions, tag_links) = self.tree.manifest_links()?;
        let mut manifests = HashSet::new();
        // Each manifest is read once; what it refers to as a subject, by digest.
        let mut referring: HashMap<Digest, (Digest, serde_json::Value)> = HashMap::new();
        let mut subjects = Vec::new();
        for (repo, d) in revisions {
            let Some(meta) = blobs.get_mut(&d) else { continue };
            if meta.media_type.is_none() {
                if let Some(m) = self.manifest_bytes(&d)? {
                    if let Some(r) = crate::oci::referrer_of(&m.bytes, &d, &m.media_type) {
                        referring.insert(d.clone(), r);
                    }
                    meta.media_type = Some(m.media_type);
                    manifests.insert(d.clone());
                }
            }
            if let Some((subject, desc)) = referring.get(&d) {
                subjects.push((repo, subject.clone(), d, desc.clone()));
            }
        }
        stats.manifests = manifests.len() as u64;
        let (mut tags, mut history) = (Vec::new(), Vec::new());
        for mut tl in tag_links {
            tl.seen.sort_by_key(|(_, t)| *t);
            for (i, (d, first)) in tl.seen.iter().enumerate() {
                let last = if *d == tl.current {
                    tl.current_ms.max(*first)
                } else {
                    tl.seen.get(i + 1).map(|(_, t)| *t).unwrap_or(*first)
                };
                let seen = match self.index.seen(&tl.repo, &tl.tag, d)? {
                    Some(old) => old,
                    None => Seen { first_seen_ms: *first, last_seen_ms: last },
                };
                history.push((history_key(&tl.repo, &tl.tag, d), seen));
                stats.history_entries += 1;
            }
            // checked_ms 0: the next request revalidates it.
            let key = format!("{}\t{}", tl.repo.as_str(), tl.tag.as_str());
            tags.push((key, TagMeta { digest: tl.current.to_string(), checked_ms: 0 }));
            stats.tags += 1;
        }
        let (n, bytes) = blobs.values().fold((0, 0), |(n, b), m| (n + 1, b + m.size));
        self.index.replace_all(blobs.into_iter().collect(), tags, history, subjects)?;
        self.blob_count.store(n, Ordering::Relaxed);
        self.blob_bytes.store(bytes, Ordering::Relaxed);
        lock(&self.manifests).map.clear();
        lock(&self.links).clear();
        self.index.mark_built(true)?;
        Ok(stats)
    }

    /// What the index holds, without times (for comparing an index with a rebuilt one).
    pub fn dump(&self) -> Result<IndexDump, StoreError> {
        let mut out = IndexDump::default();
        for e in self.index.blobs() {
            let (d, m) = e?;
            out.blobs.insert(d.to_string(), (m.size, m.media_type));
        }
        for e in self.index.tags() {
            let (k, m) = e?;
            out.tags.insert(k.replacen('\t', ":", 1), m.digest);
        }
        for e in self.index.all_history() {
            let (k, _) = e?;
            if let Some((tag, hex)) = k.rsplit_once('\t') {
                if let Some(d) = Digest::from_hex(hex) {
                    out.history.entry(tag.replacen('\t', ":", 1)).or_default().push(d.to_string());
                }
            }
        }
        out.history.values_mut().for_each(|v| v.sort());
        Ok(out)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_access()?;
        self.index.flush()?;
        self.counters.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> RepoKey {
        RepoKey::new("docker.io", &RepoName::parse("library/alpine").expect("valid"))
    }

    #[test]
    fn tag_history_survives_a_reindex() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (r, t) = (repo(), Tag::parse("latest").expect("tag"));
        let (a, b) = (Digest::of(b"{\"config\":{}}"), Digest::of(b"{\"config\":{},\"x\":1}"));
        store.put_manifest(&r, &a, b"{\"config\":{}}", crate::oci::OCI_MANIFEST).expect("put a");
        store.put_manifest(&r, &b, b"{\"config\":{},\"x\":1}", crate::oci::OCI_MANIFEST).expect("put b");
        assert!(store.record_tag(&r, &t, &a, 1_000).expect("tag a"));
        assert!(!store.record_tag(&r, &t, &a, 2_000).expect("same digest"));
        assert!(store.record_tag(&r, &t, &b, 3_000).expect("tag b"));
        let h = store.history(&r, &t).expect("history");
        assert_eq!(
            h.iter().map(|e| e.digest.clone()).collect::<Vec<_>>(),
            vec![b.to_string(), a.to_string()]
        );
        assert!(h[0].current && !h[1].current);

        store.reindex().expect("reindex");
        let h = store.history(&r, &t).expect("history after reindex");
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].digest, b.to_string());
        assert_eq!(store.tag(&r, &t).expect("tag").map(|m| m.digest), Some(b.to_string()));
        let m = store.manifest(&r, &a).expect("read").expect("cached");
        assert_eq!(m.media_type, crate::oci::OCI_MANIFEST);
    }

    #[test]
    fn last_access_is_batched_into_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let d = Digest::of(b"{\"config\":{}}");
        store.put_manifest(&repo(), &d, b"{\"config\":{}}", crate::oci::OCI_MANIFEST).expect("put");
        let before = store.blob_meta(&d).expect("meta").expect("indexed").accessed_ms;
        store.touch(&d);
        assert_eq!(
            store.blob_meta(&d).expect("meta").expect("indexed").accessed_ms,
            before,
            "no index write on read"
        );
        assert_eq!(store.flush_access().expect("flush"), 1);
        assert!(store.blob_meta(&d).expect("meta").expect("indexed").accessed_ms >= before);
        assert_eq!(store.flush_access().expect("flush"), 0);
    }

    #[test]
    fn a_clean_close_leaves_the_totals_and_an_unclean_one_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Digest::of(b"{\"config\":{}}");
        {
            let store = Store::open(dir.path()).expect("open");
            store.put_manifest(&repo(), &d, b"{\"config\":{}}", crate::oci::OCI_MANIFEST).expect("put");
            assert_eq!(store.totals(), (1, 13));
            store.close().expect("close");
        }
        assert!(dir.path().join("wharf/clean").exists());
        {
            let store = Store::open(dir.path()).expect("reopen");
            assert!(!dir.path().join("wharf/clean").exists(), "taken at open, so a crash is noticed");
            assert_eq!(store.totals(), (1, 13), "from the clean close");
            // A blob stored behind the index's back, then no clean close (a crash).
            store.blobs.put_bytes(&Digest::of(b"12345"), b"12345").expect("put");
        }
        let store = Store::open(dir.path()).expect("reopen after a crash");
        assert_eq!(store.totals(), (2, 18), "rebuilt from the tree");
        assert_eq!(store.dump().expect("dump").blobs.len(), 2);
    }

    #[test]
    fn a_tag_move_and_its_history_are_one_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (r, t) = (repo(), Tag::parse("1").expect("tag"));
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        store.index.record_tag(&r, &t, &a, 10).expect("a");
        let prev = store.index.record_tag(&r, &t, &b, 20).expect("b");
        assert_eq!(prev.map(|p| p.digest), Some(a.to_string()));
        assert_eq!(store.index.seen(&r, &t, &a).expect("seen a").map(|s| s.last_seen_ms), Some(20));
        assert_eq!(store.index.seen(&r, &t, &b).expect("seen b").map(|s| s.first_seen_ms), Some(20));
        assert_eq!(store.index.tag(&r, &t).expect("tag").map(|m| m.checked_ms), Some(20));
    }

    #[test]
    fn a_second_process_cannot_open_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _s = Store::open(dir.path()).expect("open");
        assert!(is_locked(dir.path()));
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked(_))));
    }

    #[test]
    fn a_broken_index_is_rebuilt_from_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, t) = (repo(), Tag::parse("1.0").expect("tag"));
        let d = Digest::of(b"{\"manifests\":[]}");
        {
            let store = Store::open(dir.path()).expect("open");
            store.put_manifest(&r, &d, b"{\"manifests\":[]}", crate::oci::OCI_INDEX).expect("put");
            store.record_tag(&r, &t, &d, 5).expect("tag");
            let counts = HashMap::from([(
                "pull\t2026-12-01\tdocker.io\tlibrary/alpine\t1.0\tlinux/amd64".to_owned(),
                7,
            )]);
            store.add_counters(&counts).expect("count");
            store.add_tag_pulls(&r, &t, &d, 3).expect("tag pulls");
            store.close().expect("close");
        }
        let idx = dir.path().join("wharf/index");
        fs::remove_dir_all(&idx).expect("rm");
        fs::write(&idx, b"not a sled db").expect("garbage");
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.tag(&r, &t).expect("tag").map(|m| m.digest), Some(d.to_string()));
        // Analytics are not derivable, and live apart: they survive the index's loss.
        assert_eq!(store.counters("pull\t").expect("counters").iter().map(|(_, n)| n).sum::<u64>(), 7);
        assert_eq!(store.history(&r, &t).expect("history")[0].pulls, 3);
        assert!(fs::read_dir(dir.path().join("wharf")).expect("ls").any(|e| e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .starts_with("index.broken-")));
    }
}
