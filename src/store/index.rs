//! The sled index over the storage tree: blob sizes and media types, tag state and per-tag
//! history with first- and last-seen times. Derived data: `reindex` rebuilds it from the tree.

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
    /// Pulls of the tag while it pointed here.
    #[serde(default)]
    pub pulls: u64,
}

pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    tags: sled::Tree,
    history: sled::Tree,
    /// Analytics counters (`u64` little-endian). Not derived from the tree: kept by reindex.
    counters: sled::Tree,
}

fn tag_key(r: &RepoKey, t: &Tag) -> String {
    format!("{}\t{}", r.as_str(), t.as_str())
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: impl AsRef<[u8]>) -> sled::Result<Option<T>> {
    Ok(tree.get(key)?.and_then(|v| serde_json::from_slice(&v).ok()))
}

fn put<T: Serialize>(tree: &sled::Tree, key: impl AsRef<[u8]>, v: &T) -> sled::Result<()> {
    let bytes = serde_json::to_vec(v).expect("index values always serialize");
    tree.insert(key.as_ref(), bytes)?;
    Ok(())
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
            counters: db.open_tree("counters")?,
            db,
        })
    }

    pub fn blob(&self, d: &Digest) -> sled::Result<Option<BlobMeta>> {
        get(&self.blobs, d.hex())
    }

    pub fn put_blob(&self, d: &Digest, m: &BlobMeta) -> sled::Result<()> {
        put(&self.blobs, d.hex(), m)
    }

    pub fn tag(&self, r: &RepoKey, t: &Tag) -> sled::Result<Option<TagMeta>> {
        get(&self.tags, tag_key(r, t))
    }

    pub fn put_tag(&self, r: &RepoKey, t: &Tag, m: &TagMeta) -> sled::Result<()> {
        put(&self.tags, tag_key(r, t), m)
    }

    pub fn seen(&self, r: &RepoKey, t: &Tag, d: &Digest) -> sled::Result<Option<Seen>> {
        get(&self.history, format!("{}\t{}", tag_key(r, t), d.hex()))
    }

    pub fn put_seen(&self, r: &RepoKey, t: &Tag, d: &Digest, s: &Seen) -> sled::Result<()> {
        put(&self.history, format!("{}\t{}", tag_key(r, t), d.hex()), s)
    }

    /// Every digest the tag pointed at, in no particular order.
    pub fn history(&self, r: &RepoKey, t: &Tag) -> sled::Result<Vec<(Digest, Seen)>> {
        let prefix = format!("{}\t", tag_key(r, t));
        let mut out = Vec::new();
        for kv in self.history.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let hex = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let (Some(d), Ok(s)) =
                (Digest::parse(&format!("sha256:{hex}")), serde_json::from_slice::<Seen>(&v))
            {
                out.push((d, s));
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

    /// Adds to counters.
    pub fn add_counters<'a>(
        &self,
        adds: impl IntoIterator<Item = (&'a String, &'a u64)>,
    ) -> sled::Result<()> {
        for (k, n) in adds {
            self.counters.update_and_fetch(k.as_bytes(), |old| {
                let v = old.and_then(|o| <[u8; 8]>::try_from(o).ok()).map(u64::from_le_bytes).unwrap_or(0);
                Some((v + n).to_le_bytes().to_vec())
            })?;
        }
        Ok(())
    }

    /// Counters whose key starts with `prefix`.
    pub fn counters(&self, prefix: &str) -> sled::Result<Vec<(String, u64)>> {
        self.counters
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                kv.map(|(k, v)| {
                    let n = <[u8; 8]>::try_from(&*v).map(u64::from_le_bytes).unwrap_or(0);
                    (String::from_utf8_lossy(&k).into_owned(), n)
                })
            })
            .collect()
    }

    /// Number and total size of indexed blobs.
    pub fn blob_totals(&self) -> (u64, u64) {
        self.blobs
            .iter()
            .values()
            .filter_map(|v| v.ok().and_then(|v| serde_json::from_slice::<BlobMeta>(&v).ok()))
            .fold((0, 0), |(n, b), m| (n + 1, b + m.size))
    }

    /// Pull counts recorded in tag histories, by history key.
    pub fn history_pulls(&self) -> sled::Result<Vec<(sled::IVec, u64)>> {
        let mut out = Vec::new();
        for kv in self.history.iter() {
            let (k, v) = kv?;
            if let Ok(s) = serde_json::from_slice::<Seen>(&v) {
                if s.pulls > 0 {
                    out.push((k, s.pulls));
                }
            }
        }
        Ok(out)
    }

    /// Puts pull counts back on the history entries that still exist.
    pub fn restore_history_pulls(&self, pulls: Vec<(sled::IVec, u64)>) -> sled::Result<()> {
        for (k, n) in pulls {
            if let Some(mut s) = self.history.get(&k)?.and_then(|v| serde_json::from_slice::<Seen>(&v).ok()) {
                s.pulls = n;
                put(&self.history, &k, &s)?;
            }
        }
        Ok(())
    }

    pub fn clear(&self) -> sled::Result<()> {
        self.blobs.clear()?;
        self.tags.clear()?;
        self.history.clear()
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

    pub fn mark_built(&self) -> sled::Result<()> {
        self.db.insert("built", &b"1"[..])?;
        Ok(())
    }
}
