//! Storage only: the distribution-layout tree (the truth) and the sled index derived from it.
//! Knows nothing of upstreams or HTTP. All calls block: async callers run writes on the
//! blocking pool.

mod index;
mod tree;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use index::Index;
pub use index::{BlobMeta, Seen, TagMeta};
use tree::{read_link, Tree};

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

/// Where verified blob bytes live. The storage tree implements it; a shared object-store
/// backend would implement the same and leave the rest of the store unchanged.
pub trait BlobStore: Send + Sync {
    /// Size of a stored blob; `None` when absent.
    fn stat(&self, d: &Digest) -> io::Result<Option<u64>>;
    /// Opens a stored blob for reading.
    fn open(&self, d: &Digest) -> io::Result<Option<File>>;
    /// Moves a verified spool file into the store.
    fn persist(&self, spool: &Path, d: &Digest) -> io::Result<()>;
    /// Stores small verified bytes (a manifest).
    fn write(&self, d: &Digest, bytes: &[u8]) -> io::Result<()>;
}

impl BlobStore for Tree {
    fn stat(&self, d: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self, d: &Digest) -> io::Result<Option<File>> {
        match File::open(self.blob_path(d)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn persist(&self, spool: &Path, d: &Digest) -> io::Result<()> {
        Tree::persist(self, spool, d)
    }

    fn write(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        self.write_blob(d, bytes)
    }
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
}

/// What `reindex` found.
#[derive(Debug, Default, Serialize)]
pub struct ReindexStats {
    pub blobs: u64,
    pub manifests: u64,
    pub tags: u64,
    pub history_entries: u64,
}

pub struct Store {
    tree: Tree,
    index: Index,
    /// Last-access times not yet written to the index: reads stay free of index writes,
    /// and `flush_access` writes them in one batch.
    accessed: Mutex<HashMap<Digest, u64>>,
    /// Manifests served recently, so hits skip the disk and the index. Content by digest
    /// is immutable; bounded by bytes.
    manifests: Mutex<ManifestCache>,
    /// Small blobs (configs, small layers) served recently, verified bytes. Bounded.
    small_blobs: Mutex<(HashMap<Digest, Bytes>, usize)>,
    /// (repository, blob) links known to exist, so hits skip a stat. Bounded.
    links: Mutex<std::collections::HashSet<(RepoKey, Digest)>>,
    /// Number and bytes of stored blobs, kept up to date as blobs are added.
    blob_count: AtomicU64,
    blob_bytes: AtomicU64,
    /// Held for the store's lifetime: one process per data dir.
    _lock: File,
}

/// Wall-clock time in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

fn mtime_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

impl Store {
    /// Opens the data dir: takes its lock, cleans temp files, opens the index, and rebuilds
    /// the index from the tree when it is new or cannot be opened (moving a broken one aside).
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let wharf_dir = data_dir.join("wharf");
        fs::create_dir_all(&wharf_dir)?;
        let lock = File::options().create(true).truncate(false).write(true).open(wharf_dir.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(data_dir.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let tree = Tree::open(data_dir)?;
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
        let store = Store {
            tree,
            index,
            accessed: Mutex::new(HashMap::new()),
            manifests: Mutex::new(ManifestCache::default()),
            small_blobs: Mutex::new((HashMap::new(), 0)),
            links: Mutex::new(std::collections::HashSet::new()),
            blob_count: AtomicU64::new(0),
            blob_bytes: AtomicU64::new(0),
            _lock: lock,
        };
        if !store.index.is_built()? {
            let stats = store.reindex()?;
            tracing::info!(?stats, "index built from the storage tree");
        }
        let (n, bytes) = store.index.blob_totals();
        store.blob_count.store(n, Ordering::Relaxed);
        store.blob_bytes.store(bytes, Ordering::Relaxed);
        Ok(store)
    }

    pub fn blobs(&self) -> &dyn BlobStore {
        &self.tree
    }

    /// Size of a stored blob, from the index when it knows, else from the tree.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.tree.stat(d)?)
    }

    /// A new spool file for a download.
    pub fn spool(&self) -> io::Result<(File, PathBuf)> {
        self.tree.spool()
    }

    /// Moves a verified spool file into place and indexes it.
    pub fn commit_blob(&self, spool: &Path, d: &Digest, size: u64) -> Result<(), StoreError> {
        self.tree.persist(spool, d)?;
        self.count_blob(size);
        self.index.put_blob(d, &BlobMeta { size, media_type: None, accessed_ms: now_ms() })?;
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
        Ok(self.index.add_counters(adds)?)
    }

    /// Analytics counters whose key starts with `prefix`.
    pub fn counters(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.index.counters(prefix)?)
    }

    /// Adds `n` pulls of tag `t` while it pointed at `d` to its history.
    pub fn add_tag_pulls(&self, r: &RepoKey, t: &Tag, d: &Digest, n: u64) -> Result<(), StoreError> {
        if let Some(mut s) = self.index.seen(r, t, d)? {
            s.pulls += n;
            self.index.put_seen(r, t, d, &s)?;
        }
        Ok(())
    }

    /// A small blob held in memory (read from the store, so verified).
    pub fn small_blob(&self, d: &Digest) -> Option<Bytes> {
        self.small_blobs.lock().unwrap_or_else(|p| p.into_inner()).0.get(d).cloned()
    }

    /// Keeps a small blob's bytes, read from the store, in memory.
    pub fn remember_small_blob(&self, d: &Digest, bytes: Bytes) {
        let mut guard = self.small_blobs.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Notes that blob `d` was served (written to the index by `flush_access`).
    pub fn touch(&self, d: &Digest) {
        self.accessed.lock().unwrap_or_else(|p| p.into_inner()).insert(d.clone(), now_ms());
    }

    /// Writes the pending last-access times to the index; returns how many.
    pub fn flush_access(&self) -> Result<usize, StoreError> {
        let pending = std::mem::take(&mut *self.accessed.lock().unwrap_or_else(|p| p.into_inner()));
        for (d, t) in &pending {
            if let Some(mut m) = self.index.blob(d)? {
                m.accessed_ms = m.accessed_ms.max(*t);
                self.index.put_blob(d, &m)?;
            }
        }
        Ok(pending.len())
    }

    /// What the index knows of blob `d`.
    pub fn blob_meta(&self, d: &Digest) -> Result<Option<BlobMeta>, StoreError> {
        Ok(self.index.blob(d)?)
    }

    /// Records that `repo` holds blob `d` (distribution needs the link to serve it).
    pub fn link_layer(&self, r: &RepoKey, d: &Digest) -> Result<(), StoreError> {
        let key = (r.clone(), d.clone());
        if self.links.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return Ok(());
        }
        let link = self.tree.layer_link(r, d);
        if !link.exists() {
            self.tree.write_link(&link, d)?;
        }
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links.len() >= MAX_KNOWN_LINKS {
            links.clear();
        }
        links.insert(key);
        Ok(())
    }

    /// A manifest of `repo`, when cached.
    pub fn manifest(&self, r: &RepoKey, d: &Digest) -> Result<Option<StoredManifest>, StoreError> {
        let key = (r.clone(), d.clone());
        if let Some(m) = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).map.get(&key) {
            return Ok(Some(m.clone()));
        }
        let m = self.manifest_from_disk(r, d)?;
        if let Some(m) = &m {
            self.manifests.lock().unwrap_or_else(|p| p.into_inner()).insert(key, m.clone());
        }
        Ok(m)
    }

    fn manifest_from_disk(&self, r: &RepoKey, d: &Digest) -> Result<Option<StoredManifest>, StoreError> {
        if !self.tree.revision_link(r, d).exists() {
            return Ok(None);
        }
        let bytes = match fs::read(self.tree.blob_path(d)) {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Cheap at manifest sizes, and no damaged file is ever served as this digest.
        if Digest::of(&bytes) != *d {
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
        match self.tree.stat(d)? {
            Some(n) if n == bytes.len() as u64 => {}
            // A file a crash left short: replace it.
            Some(_) => self.tree.write_blob(d, bytes)?,
            None => {
                self.tree.write_blob(d, bytes)?;
                self.count_blob(bytes.len() as u64);
            }
        }
        self.index.put_blob(
            d,
            &BlobMeta {
                size: bytes.len() as u64,
                media_type: Some(media_type.to_owned()),
                accessed_ms: now_ms(),
            },
        )?;
        let link = self.tree.revision_link(r, d);
        if !link.exists() {
            self.tree.write_link(&link, d)?;
        }
        Ok(())
    }

    pub fn tag(&self, r: &RepoKey, t: &Tag) -> Result<Option<TagMeta>, StoreError> {
        Ok(self.index.tag(r, t)?)
    }

    /// Records that the upstream says `t` points at `d` now. Moves the tag (current link and
    /// history) when it pointed elsewhere; returns whether it moved.
    pub fn record_tag(&self, r: &RepoKey, t: &Tag, d: &Digest, now: u64) -> Result<bool, StoreError> {
        let prev = self.index.tag(r, t)?;
        let moved = prev.as_ref().map(|p| p.digest != d.to_string()).unwrap_or(true);
        if moved {
            let idx = self.tree.tag_index_link(r, t, d);
            if !idx.exists() {
                self.tree.write_link(&idx, d)?;
            }
            self.tree.write_link(&self.tree.tag_current(r, t), d)?;
            if let Some(p) = prev.as_ref().and_then(|p| Digest::parse(&p.digest)) {
                if let Some(mut s) = self.index.seen(r, t, &p)? {
                    s.last_seen_ms = now;
                    self.index.put_seen(r, t, &p, &s)?;
                }
            }
        }
        let seen = match self.index.seen(r, t, d)? {
            Some(s) => Seen { last_seen_ms: now, ..s },
            None => Seen { first_seen_ms: now, last_seen_ms: now, pulls: 0 },
        };
        self.index.put_seen(r, t, d, &seen)?;
        self.index.put_tag(r, t, &TagMeta { digest: d.to_string(), checked_ms: now })?;
        Ok(moved)
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
        let current = self.index.tag(r, t)?.map(|m| m.digest);
        let mut out: Vec<HistoryEntry> = self
            .index
            .history(r, t)?
            .into_iter()
            .map(|(d, s)| HistoryEntry {
                current: current.as_deref() == Some(&d.to_string()),
                pulls: s.pulls,
                digest: d.to_string(),
                first_seen: rfc3339(s.first_seen_ms),
                last_seen: rfc3339(s.last_seen_ms),
                first_seen_ms: s.first_seen_ms,
            })
            .collect();
        out.sort_by(|a, b| b.current.cmp(&a.current).then(b.first_seen_ms.cmp(&a.first_seen_ms)));
        Ok(out)
    }

    /// Rebuilds the index from the tree. History times come from the link files' mtimes:
    /// first seen is when the tag's index link was written, last seen is when the next
    /// digest took over (approximate: the exact times lived only in the old index).
    pub fn reindex(&self) -> Result<ReindexStats, StoreError> {
        // Pull counts are analytics, not derivable from the tree: carried over.
        let pulls = self.index.history_pulls()?;
        self.index.clear()?;
        let mut stats = ReindexStats::default();
        for e in walk_files(&self.tree.blobs_root())? {
            if e.file_name().and_then(|n| n.to_str()) != Some("data") {
                continue;
            }
            let hex = e.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(d) = Digest::parse(&format!("sha256:{hex}")) {
                let size = fs::metadata(&e)?.len();
                self.index.put_blob(&d, &BlobMeta { size, media_type: None, accessed_ms: 0 })?;
                stats.blobs += 1;
            }
        }
        let repos_root = self.tree.repositories();
        for manifests_dir in find_dirs_named(&repos_root, "_manifests")? {
            let Some(repo) = manifests_dir
                .parent()
                .and_then(|p| p.strip_prefix(&repos_root).ok())
                .and_then(|p| p.to_str())
                .and_then(RepoKey::parse)
            else {
                continue;
            };
            for link in walk_files(&manifests_dir.join("revisions/sha256"))? {
                let Some(d) = read_link(&link)? else { continue };
                if let Ok(bytes) = fs::read(self.tree.blob_path(&d)) {
                    if let Some(mt) = manifest_media_type(&bytes) {
                        self.index.put_blob(
                            &d,
                            &BlobMeta { size: bytes.len() as u64, media_type: Some(mt), accessed_ms: 0 },
                        )?;
                        stats.manifests += 1;
                    }
                }
            }
            let tags_dir = manifests_dir.join("tags");
            let Ok(tags) = fs::read_dir(&tags_dir) else {
                continue;
            };
            for tag_dir in tags {
                let tag_dir = tag_dir?.path();
                let Some(tag) = tag_dir.file_name().and_then(|n| n.to_str()).and_then(Tag::parse) else {
                    continue;
                };
                let current_link = tag_dir.join("current/link");
                let Some(current) = read_link(&current_link)? else {
                    continue;
                };
                let mut seen: Vec<(Digest, u64)> = Vec::new();
                for link in walk_files(&tag_dir.join("index/sha256"))? {
                    if let Some(d) = read_link(&link)? {
                        seen.push((d, mtime_ms(&link)));
                    }
                }
                seen.sort_by_key(|(_, t)| *t);
                for (i, (d, first)) in seen.iter().enumerate() {
                    let last = if *d == current {
                        mtime_ms(&current_link).max(*first)
                    } else {
                        seen.get(i + 1).map(|(_, t)| *t).unwrap_or(*first)
                    };
                    self.index.put_seen(
                        &repo,
                        &tag,
                        d,
                        &Seen { first_seen_ms: *first, last_seen_ms: last, pulls: 0 },
                    )?;
                    stats.history_entries += 1;
                }
                // checked_ms 0: the next request revalidates it.
                self.index.put_tag(&repo, &tag, &TagMeta { digest: current.to_string(), checked_ms: 0 })?;
                stats.tags += 1;
            }
        }
        self.index.restore_history_pulls(pulls)?;
        self.index.mark_built()?;
        self.index.flush()?;
        Ok(stats)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_access()?;
        self.index.flush()?;
        Ok(())
    }
}

/// Every file below `root` (none when it does not exist).
fn walk_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Directories named `name` below `root`, not descending into them.
fn find_dirs_named(root: &Path, name: &str) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let e = e?;
            if !e.file_type()?.is_dir() {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if !e.file_name().to_string_lossy().starts_with('_') {
                stack.push(e.path());
            }
        }
    }
    Ok(out)
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
        }
        let idx = dir.path().join("wharf/index");
        fs::remove_dir_all(&idx).expect("rm");
        fs::write(&idx, b"not a sled db").expect("garbage");
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.tag(&r, &t).expect("tag").map(|m| m.digest), Some(d.to_string()));
        assert!(fs::read_dir(dir.path().join("wharf")).expect("ls").any(|e| e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .starts_with("index.broken-")));
    }
}
