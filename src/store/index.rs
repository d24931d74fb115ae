//! The sled index over the storage tree: blob sizes and media types, tag state and per-tag
//! history with first- and last-seen times. Derived data: `reindex` rebuilds it from the tree.
//! (Pull counts are not derivable: they live in [`super::counters`].)

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::oci::{Digest, Tag};

use super::RepoKey;

/// What the index knows of a stored blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BlobMeta {
    pub size: u64,
    /// Set for manifests: the `Content-Type` they are served with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Unix milliseconds of the last time it was served (0: not since indexing).
    #[serde(default)]
    pub accessed_ms: u64,
}

/// A tag's current digest and when the upstream last confirmed it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TagMeta {
    pub digest: String,
    /// Unix milliseconds of the last successful revalidation (0: never, e.g. after reindex).
    pub checked_ms: u64,
}

/// When wharf saw a tag point at one digest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Seen {
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// A referrers list as the upstream last gave it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReferrersMeta {
    /// Unix milliseconds of the last time the upstream was asked.
    pub checked_ms: u64,
    /// Which source answered: `api`, `fallback_tag` or `local`.
    pub source: String,
    /// The descriptors (empty for `local`: those are read from the subjects at answer time).
    pub manifests: Vec<serde_json::Value>,
}

pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    tags: sled::Tree,
    history: sled::Tree,
    /// `<repo>\t<subject hex>` → [`ReferrersMeta`]: upstream answers, a cache (not derived).
    referrers: sled::Tree,
    /// `<repo>\t<subject hex>\t<referrer hex>` → the referrer's descriptor, for every cached
    /// manifest with a `subject` (derived: reindex rebuilds it).
    subjects: sled::Tree,
}

fn tag_key(r: &RepoKey, t: &Tag) -> String {
    format!("{}\t{}", r.as_str(), t.as_str())
}

/// The history key of (tag, digest): also the key of its pull count in the counters.
pub fn history_key(r: &RepoKey, t: &Tag, d: &Digest) -> String {
    format!("{}\t{}", tag_key(r, t), d.hex())
}

fn subject_key(r: &RepoKey, subject: &Digest, referrer: &Digest) -> String {
    format!("{}\t{}\t{}", r.as_str(), subject.hex(), referrer.hex())
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: impl AsRef<[u8]>) -> sled::Result<Option<T>> {
    Ok(tree.get(key)?.and_then(|v| serde_json::from_slice(&v).ok()))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("index values always serialize")
}

fn put<T: Serialize>(tree: &sled::Tree, key: impl AsRef<[u8]>, v: &T) -> sled::Result<()> {
    tree.insert(key.as_ref(), encode(v))?;
    Ok(())
}

fn tx_get<T: DeserializeOwned>(
    tree: &sled::transaction::TransactionalTree,
    key: &str,
) -> sled::transaction::ConflictableTransactionResult<Option<T>> {
    Ok(tree.get(key.as_bytes())?.and_then(|v| serde_json::from_slice(&v).ok()))
}

impl Index {
    pub fn open(path: &Path) -> sled::Result<Index> {
        // The index is small and hot paths are served from memory elsewhere: a small page
        // cache keeps the process within its memory budget.
        let db = sled::Config::new().path(path).cache_capacity(4 * 1024 * 1024).open()?;
        Ok(Index {
            blobs: db.open_tree("blobs")?,
            tags: db.open_tree("tags")?,
            history: db.open_tree("history")?,
            referrers: db.open_tree("referrers")?,
            subjects: db.open_tree("subjects")?,
            db,
        })
    }

    /// Trees an older index kept analytics in: the counters, and pull counts inside history.
    pub fn legacy_analytics(&self) -> sled::Result<Option<(sled::Tree, sled::Tree)>> {
        if !self.db.tree_names().iter().any(|n| &n[..] == b"counters") {
            return Ok(None);
        }
        Ok(Some((self.db.open_tree("counters")?, self.history.clone())))
    }

    pub fn drop_legacy_analytics(&self) -> sled::Result<()> {
        self.db.drop_tree("counters")?;
        Ok(())
    }

    pub fn blob(&self, d: &Digest) -> sled::Result<Option<BlobMeta>> {
        get(&self.blobs, d.hex())
    }

    pub fn put_blob(&self, d: &Digest, m: &BlobMeta) -> sled::Result<()> {
        put(&self.blobs, d.hex(), m)
    }

    /// Removes many blobs' entries in one batch.
    pub fn remove_blobs(&self, digests: &[Digest]) -> sled::Result<()> {
        let mut b = sled::Batch::default();
        for d in digests {
            b.remove(d.hex().as_bytes());
        }
        self.blobs.apply_batch(b)
    }

    /// Every indexed blob.
    pub fn blobs(&self) -> impl Iterator<Item = sled::Result<(Digest, BlobMeta)>> + '_ {
        self.blobs.iter().filter_map(|kv| match kv {
            Err(e) => Some(Err(e)),
            Ok((k, v)) => {
                let d = std::str::from_utf8(&k).ok().and_then(Digest::from_hex)?;
                let m = serde_json::from_slice::<BlobMeta>(&v).ok()?;
                Some(Ok((d, m)))
            }
        })
    }

    pub fn tag(&self, r: &RepoKey, t: &Tag) -> sled::Result<Option<TagMeta>> {
        get(&self.tags, tag_key(r, t))
    }

    /// Every tag: (`<repo>\t<tag>`, its state).
    pub fn tags(&self) -> impl Iterator<Item = sled::Result<(String, TagMeta)>> + '_ {
        self.tags.iter().filter_map(|kv| match kv {
            Err(e) => Some(Err(e)),
            Ok((k, v)) => {
                Some(Ok((String::from_utf8(k.to_vec()).ok()?, serde_json::from_slice::<TagMeta>(&v).ok()?)))
            }
        })
    }

    /// Every history entry: (`<repo>\t<tag>\t<hex>`, times).
    pub fn all_history(&self) -> impl Iterator<Item = sled::Result<(String, Seen)>> + '_ {
        self.history.iter().filter_map(|kv| match kv {
            Err(e) => Some(Err(e)),
            Ok((k, v)) => {
                Some(Ok((String::from_utf8(k.to_vec()).ok()?, serde_json::from_slice::<Seen>(&v).ok()?)))
            }
        })
    }

    pub fn seen(&self, r: &RepoKey, t: &Tag, d: &Digest) -> sled::Result<Option<Seen>> {
        get(&self.history, history_key(r, t, d))
    }

    /// Adds what another cache saw of `t` → `d` to the history: the earlier first and the
    /// later last time win.
    pub fn merge_seen(&self, r: &RepoKey, t: &Tag, d: &Digest, s: Seen) -> sled::Result<()> {
        let merged = match self.seen(r, t, d)? {
            Some(o) => Seen {
                first_seen_ms: o.first_seen_ms.min(s.first_seen_ms),
                last_seen_ms: o.last_seen_ms.max(s.last_seen_ms),
            },
            None => s,
        };
        put(&self.history, history_key(r, t, d), &merged)
    }

    /// Records that `t` points at `d` as of `now`, in one transaction: the previous digest's
    /// last-seen time, this digest's history entry and the tag's state change together or
    /// not at all. Returns the previous state.
    pub fn record_tag(&self, r: &RepoKey, t: &Tag, d: &Digest, now: u64) -> sled::Result<Option<TagMeta>> {
        use sled::Transactional;
        let key = tag_key(r, t);
        let this = history_key(r, t, d);
        let res = (&self.tags, &self.history).transaction(|(tags, history)| {
            let prev: Option<TagMeta> = tx_get(tags, &key)?;
            if let Some(p) = prev.as_ref().filter(|p| p.digest != d.to_string()) {
                if let Some(pd) = Digest::parse(&p.digest) {
                    let pk = history_key(r, t, &pd);
                    if let Some(mut s) = tx_get::<Seen>(history, &pk)? {
                        s.last_seen_ms = now;
                        history.insert(pk.as_bytes(), encode(&s))?;
                    }
                }
            }
            let seen = match tx_get::<Seen>(history, &this)? {
                Some(s) => Seen { last_seen_ms: now, ..s },
                None => Seen { first_seen_ms: now, last_seen_ms: now },
            };
            history.insert(this.as_bytes(), encode(&seen))?;
            tags.insert(key.as_bytes(), encode(&TagMeta { digest: d.to_string(), checked_ms: now }))?;
            Ok(prev)
        });
        res.map_err(|e| match e {
            sled::transaction::TransactionError::Storage(e) => e,
            sled::transaction::TransactionError::Abort(()) => {
                sled::Error::Unsupported("tag transaction aborted".into())
            }
        })
    }

    /// Every digest the tag pointed at, in no particular order.
    pub fn history(&self, r: &RepoKey, t: &Tag) -> sled::Result<Vec<(Digest, Seen)>> {
        let prefix = format!("{}\t", tag_key(r, t));
        let mut out = Vec::new();
        for kv in self.history.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let hex = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let (Some(d), Ok(s)) = (Digest::from_hex(&hex), serde_json::from_slice::<Seen>(&v)) {
                out.push((d, s));
            }
        }
        Ok(out)
    }

    pub fn referrers(&self, r: &RepoKey, d: &Digest) -> sled::Result<Option<ReferrersMeta>> {
        get(&self.referrers, format!("{}\t{}", r.as_str(), d.hex()))
    }

    pub fn put_referrers(&self, r: &RepoKey, d: &Digest, m: &ReferrersMeta) -> sled::Result<()> {
        put(&self.referrers, format!("{}\t{}", r.as_str(), d.hex()), m)
    }

    /// Records that `referrer` (described by `desc`) has `subject` as its subject.
    pub fn put_subject(
        &self,
        r: &RepoKey,
        subject: &Digest,
        referrer: &Digest,
        desc: &serde_json::Value,
    ) -> sled::Result<()> {
        put(&self.subjects, subject_key(r, subject, referrer), desc)
    }

    /// Every cached referrer of `subject` in `r`: (its digest, its descriptor).
    pub fn subjects(&self, r: &RepoKey, subject: &Digest) -> sled::Result<Vec<(Digest, serde_json::Value)>> {
        let prefix = format!("{}\t{}\t", r.as_str(), subject.hex());
        let mut out = Vec::new();
        for kv in self.subjects.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let hex = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let (Some(d), Ok(desc)) = (Digest::from_hex(&hex), serde_json::from_slice(&v)) {
                out.push((d, desc));
            }
        }
        Ok(out)
    }

    /// Keys of the tags tree (`<repo>\t<tag>`) that start with `prefix`.
    pub fn tag_keys(&self, prefix: &str) -> sled::Result<Vec<String>> {
        self.tags
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| k.map(|k| String::from_utf8_lossy(&k).into_owned()))
            .collect()
    }

    /// Replaces the whole derived content with `blobs`, `tags`, `history` and `subjects`
    /// (repository, subject, referrer, descriptor). Not atomic: the caller clears the built
    /// mark first and sets it after.
    pub fn replace_all(
        &self,
        blobs: Vec<(Digest, BlobMeta)>,
        tags: Vec<(String, TagMeta)>,
        history: Vec<(String, Seen)>,
        subjects: Vec<(RepoKey, Digest, Digest, serde_json::Value)>,
    ) -> sled::Result<()> {
        self.blobs.clear()?;
        self.tags.clear()?;
        self.history.clear()?;
        self.subjects.clear()?;
        let mut b = sled::Batch::default();
        for (r, s, d, desc) in &subjects {
            b.insert(subject_key(r, s, d).as_bytes(), encode(desc));
        }
        self.subjects.apply_batch(b)?;
        for chunk in blobs.chunks(10_000) {
            let mut b = sled::Batch::default();
            for (d, m) in chunk {
                b.insert(d.hex().as_bytes(), encode(m));
            }
            self.blobs.apply_batch(b)?;
        }
        let mut b = sled::Batch::default();
        for (k, m) in &tags {
            b.insert(k.as_bytes(), encode(m));
        }
        self.tags.apply_batch(b)?;
        let mut b = sled::Batch::default();
        for (k, s) in &history {
            b.insert(k.as_bytes(), encode(s));
        }
        self.history.apply_batch(b)
    }

    pub fn flush(&self) -> sled::Result<usize> {
        self.db.flush()
    }
}

impl Index {
    /// Whether the index was built (by `reindex`) since it was created.
    pub fn is_built(&self) -> sled::Result<bool> {
        Ok(self.db.get("built")?.is_some())
    }

    pub fn mark_built(&self, built: bool) -> sled::Result<()> {
        match built {
            true => self.db.insert("built", &b"1"[..])?,
            false => self.db.remove("built")?,
        };
        self.db.flush()?;
        Ok(())
    }
}
