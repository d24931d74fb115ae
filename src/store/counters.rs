//! Pull analytics that outlive restarts: per-day counters and pulls per tag history entry.
//! Not derivable from the tree, so kept in a database of their own (`wharf/analytics`) that
//! `reindex` never touches. Bounded: per-day series older than the retention are dropped.

use std::path::Path;

/// Per-day counter keys start with `<kind>\t<YYYY-MM-DD>\t`.
const DAILY_KINDS: [&str; 2] = ["pull\t", "traffic\t"];

pub struct Counters {
    db: sled::Db,
    /// `u64` little-endian counts by key (`pull\t<day>\t…`, `traffic\t<day>\t…`).
    counters: sled::Tree,
    /// Pulls of a tag while it pointed at a digest, by `<repo>\t<tag>\t<hex>`.
    tag_pulls: sled::Tree,
}

fn add(tree: &sled::Tree, key: &[u8], n: u64) -> sled::Result<()> {
    tree.update_and_fetch(key, |old| {
        let v = old.and_then(|o| <[u8; 8]>::try_from(o).ok()).map(u64::from_le_bytes).unwrap_or(0);
        Some((v + n).to_le_bytes().to_vec())
    })?;
    Ok(())
}

fn decode(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map(u64::from_le_bytes).unwrap_or(0)
}

impl Counters {
    pub fn open(path: &Path) -> sled::Result<Counters> {
        let db = sled::Config::new().path(path).cache_capacity(1024 * 1024).open()?;
        Ok(Counters { counters: db.open_tree("counters")?, tag_pulls: db.open_tree("tag_pulls")?, db })
    }

    /// Adds to counters.
    pub fn add<'a>(&self, adds: impl IntoIterator<Item = (&'a String, &'a u64)>) -> sled::Result<()> {
        for (k, n) in adds {
            add(&self.counters, k.as_bytes(), *n)?;
        }
        Ok(())
    }

    /// Counters whose key starts with `prefix`.
    pub fn get(&self, prefix: &str) -> sled::Result<Vec<(String, u64)>> {
        self.counters
            .scan_prefix(prefix.as_bytes())
            .map(|kv| kv.map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), decode(&v))))
            .collect()
    }

    pub fn add_tag_pulls(&self, history_key: &str, n: u64) -> sled::Result<()> {
        add(&self.tag_pulls, history_key.as_bytes(), n)
    }

    pub fn tag_pulls(&self, history_key: &str) -> sled::Result<u64> {
        Ok(self.tag_pulls.get(history_key.as_bytes())?.map(|v| decode(&v)).unwrap_or(0))
    }

    /// Drops per-day counts of days before `first_kept` (`YYYY-MM-DD`); returns how many.
    pub fn drop_days_before(&self, first_kept: &str) -> sled::Result<usize> {
        let mut dropped = 0;
        for kind in DAILY_KINDS {
            let mut old = Vec::new();
            for k in self.counters.scan_prefix(kind.as_bytes()).keys() {
                let k = k?;
                let day = k.get(kind.len()..kind.len() + 10).unwrap_or_default();
                if day < first_kept.as_bytes() {
                    old.push(k);
                }
            }
            let mut batch = sled::Batch::default();
            for k in &old {
                batch.remove(k);
            }
            self.counters.apply_batch(batch)?;
            dropped += old.len();
        }
        Ok(dropped)
    }

    /// Takes over the counters an older index kept beside its derived data.
    pub fn migrate_from(&self, old_counters: &sled::Tree, old_history: &sled::Tree) -> sled::Result<usize> {
        let mut moved = 0;
        for kv in old_counters.iter() {
            let (k, v) = kv?;
            add(&self.counters, &k, decode(&v))?;
            moved += 1;
        }
        for kv in old_history.iter() {
            let (k, v) = kv?;
            let pulls = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|s| s.get("pulls").and_then(|p| p.as_u64()))
                .unwrap_or(0);
            if pulls > 0 {
                add(&self.tag_pulls, &k, pulls)?;
                moved += 1;
            }
        }
        self.db.flush()?;
        old_counters.clear()?;
        Ok(moved)
    }

    pub fn flush(&self) -> sled::Result<usize> {
        self.db.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_day_counts_older_than_the_retention_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Counters::open(dir.path()).expect("open");
        let keys: Vec<String> = [
            "pull\t2025-01-01\tdocker.io\tlibrary/alpine\tlatest\tlinux/amd64",
            "pull\t2026-11-30\tdocker.io\tlibrary/alpine\tlatest\tlinux/amd64",
            "traffic\t2025-06-30\tblob_hits",
            "traffic\t2026-12-01\tblob_hits",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        c.add(keys.iter().map(|k| (k, &3))).expect("add");
        c.add_tag_pulls("docker.io/library/alpine\tlatest\tabc", 2).expect("pulls");
        assert_eq!(c.drop_days_before("2025-11-01").expect("drop"), 2);
        let left: Vec<String> = c.get("").expect("get").into_iter().map(|(k, _)| k).collect();
        assert_eq!(left, vec![keys[1].clone(), keys[3].clone()]);
        assert_eq!(c.tag_pulls("docker.io/library/alpine\tlatest\tabc").expect("pulls"), 2, "not per day");
    }
}
