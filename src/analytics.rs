//! Pull analytics, and the one place requests are accounted. Decides what counts as a pull
//! and which tag and platform it was, keeps label cardinality bounded, and batches per-day
//! counts into the store's analytics db so they outlive a restart.
//!
//! A pull is a GET of an image manifest. An index is not pulled by itself: the GET of one of
//! its children is one pull of the tag the client resolved (remembered per client address
//! and digest, internally only) for the child's platform. Attestation manifests are counted
//! apart. HEAD requests are revalidations, not pulls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::cache::ManifestResult;
use crate::metrics::Metrics;
use crate::oci::{is_index, Digest, Reference, RepoName, Tag};
use crate::store::{RepoKey, Store, StoreError, StoredManifest};

/// How long the tag a client resolved is remembered for its digest GETs.
const RESOLVED_FOR: Duration = Duration::from_secs(600);
/// Bounds on the in-memory attribution maps.
const MAX_RESOLVED: usize = 50_000;
const MAX_CHILDREN: usize = 200_000;

/// Where an index child sits.
#[derive(Clone, Debug)]
struct Child {
    index: Digest,
    platform: String,
    attestation: bool,
}

#[derive(Default)]
struct State {
    /// (client, repository, digest) → the tag the client resolved to that digest.
    resolved: HashMap<(IpAddr, RepoKey, Digest), (Tag, Instant)>,
    /// Child manifest → its index and platform, learned from indexes served.
    children: HashMap<Digest, Child>,
    /// Indexes whose children are learned (each index is parsed once).
    learned: HashSet<Digest>,
    /// (upstream, repository, tag, platform) series given to Prometheus so far.
    series: HashSet<(String, String, String, String)>,
    /// Counter increments not yet written to the analytics db.
    pending: HashMap<String, u64>,
    /// Pulls per (repository, tag, digest) not yet written to the tag history.
    tag_pulls: HashMap<(RepoKey, Tag, Digest), u64>,
}

pub struct Analytics {
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    /// Cap on the repository × tag × platform series of `wharf_pulls_total`.
    max_series: usize,
    state: Mutex<State>,
    /// Blob bytes served, by source, since the last flush (kept off the lock: per chunk).
    bytes_cache: AtomicU64,
    bytes_upstream: AtomicU64,
    /// Hits and misses since the last flush, by [`Traffic`].
    traffic: [AtomicU64; 4],
}

/// Request outcomes counted for the hit ratio.
#[derive(Clone, Copy)]
enum Traffic {
    BlobHits,
    BlobMisses,
    ManifestHits,
    ManifestMisses,
}

impl Traffic {
    const ALL: [Traffic; 4] =
        [Traffic::BlobHits, Traffic::BlobMisses, Traffic::ManifestHits, Traffic::ManifestMisses];

    fn field(self) -> &'static str {
        match self {
            Traffic::BlobHits => "blob_hits",
            Traffic::BlobMisses => "blob_misses",
            Traffic::ManifestHits => "manifest_hits",
            Traffic::ManifestMisses => "manifest_misses",
        }
    }
}

/// A manifest answer, as the API served it.
pub struct ManifestServed<'a> {
    pub client: IpAddr,
    pub upstream: &'a str,
    pub repo: &'a RepoName,
    pub reference: &'a Reference,
    pub digest: &'a Digest,
    pub manifest: &'a StoredManifest,
    pub result: ManifestResult,
    pub head: bool,
}

/// Today (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    day_of(SystemTime::now())
}

fn day_of(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s[..10].to_owned()
}

/// `os/architecture[/variant]` of a platform object.
fn platform_string(p: &serde_json::Value) -> Option<String> {
    let os = p.get("os")?.as_str()?;
    let arch = p.get("architecture")?.as_str()?;
    Some(match p.get("variant").and_then(|v| v.as_str()) {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    })
}

impl Analytics {
    pub fn new(metrics: Arc<Metrics>, store: Arc<Store>, max_series: usize) -> Analytics {
        Analytics {
            metrics,
            store,
            max_series,
            state: Mutex::new(State::default()),
            bytes_cache: AtomicU64::new(0),
            bytes_upstream: AtomicU64::new(0),
            traffic: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(st: &mut State, key: String, n: u64) {
        *st.pending.entry(key).or_default() += n;
    }

    /// A manifest request that failed.
    pub fn manifest_failed(&self, upstream: &str, head: bool) {
        let method = if head { "HEAD" } else { "GET" };
        self.metrics.manifest_requests.with_label_values(&[upstream, method, "error"]).inc();
    }

    /// A manifest was served: counts the request, and the pull if it is one.
    pub fn manifest_served(&self, m: ManifestServed<'_>) {
        let method = if m.head { "HEAD" } else { "GET" };
        self.metrics.manifest_requests.with_label_values(&[m.upstream, method, m.result.as_str()]).inc();
        let hit = !matches!(m.result, ManifestResult::Miss | ManifestResult::Refreshed);
        self.traffic(if hit { Traffic::ManifestHits } else { Traffic::ManifestMisses });
        let key = RepoKey::new(m.upstream, m.repo);
        let mut st = self.state();
        if let Reference::Tag(t) = m.reference {
            if st.resolved.len() >= MAX_RESOLVED {
                st.resolved.retain(|_, (_, at)| at.elapsed() < RESOLVED_FOR);
                if st.resolved.len() >= MAX_RESOLVED {
                    st.resolved.clear();
                }
            }
            st.resolved.insert((m.client, key.clone(), m.digest.clone()), (t.clone(), Instant::now()));
        }
        if is_index(&m.manifest.media_type) {
            self.learn_children(&mut st, m.digest, &m.manifest.bytes);
            return;
        }
        if m.head {
            return;
        }
        if let Some(kind) = referrer_kind(m.reference, &m.manifest.bytes) {
            drop(st);
            self.metrics.referrer_fetches.with_label_values(&[m.upstream, &kind]).inc();
            return;
        }
        let resolved_tag = |st: &State, d: &Digest| {
            st.resolved
                .get(&(m.client, key.clone(), d.clone()))
                .filter(|(_, at)| at.elapsed() < RESOLVED_FOR)
                .map(|(t, _)| t.clone())
        };
        let (tag, tagged_digest, platform) = match st.children.get(m.digest).cloned() {
            Some(child) if child.attestation => {
                self.metrics.attestation_fetches.with_label_values(&[m.upstream]).inc();
                return;
            }
            Some(child) => {
                let tag = match m.reference {
                    Reference::Tag(t) => Some(t.clone()),
                    Reference::Digest(_) => resolved_tag(&st, &child.index),
                };
                (tag, child.index, child.platform)
            }
            None => {
                let tag = match m.reference {
                    Reference::Tag(t) => Some(t.clone()),
                    Reference::Digest(d) => resolved_tag(&st, d),
                };
                (tag, m.digest.clone(), self.platform_from_config(&m.manifest.bytes))
            }
        };
        let tag_label = tag.as_ref().map(|t| t.as_str().to_owned()).unwrap_or_else(|| "@digest".to_owned());
        let repo = m.repo.as_str().to_owned();
        Self::count(
            &mut st,
            format!("pull\t{}\t{}\t{repo}\t{tag_label}\t{platform}", today(), m.upstream),
            1,
        );
        if let Some(t) = tag {
            *st.tag_pulls.entry((key, t, tagged_digest)).or_default() += 1;
        }
        let series = (m.upstream.to_owned(), repo, tag_label, platform);
        let (repo_l, tag_l) = if st.series.contains(&series) || st.series.len() < self.max_series {
            st.series.insert(series.clone());
            (series.1.as_str(), series.2.as_str())
        } else {
            self.metrics.pulls_folded.inc();
            ("other", "other")
        };
        self.metrics.pulls.with_label_values(&[m.upstream, repo_l, tag_l, &series.3]).inc();
    }

    /// Remembers the platform of every child of an index.
    fn learn_children(&self, st: &mut State, index: &Digest, bytes: &[u8]) {
        if st.learned.contains(index) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
        let Some(list) = v.get("manifests").and_then(|m| m.as_array()) else { return };
        if st.children.len() + list.len() > MAX_CHILDREN {
            st.children.clear();
            st.learned.clear();
        }
        st.learned.insert(index.clone());
        for m in list {
            let Some(d) = m.get("digest").and_then(|d| d.as_str()).and_then(Digest::parse) else { continue };
            let attestation = m.get("annotations").and_then(|a| a.get("vnd.docker.reference.type")).is_some();
            let platform = m.get("platform").and_then(platform_string).unwrap_or_else(|| "unknown".into());
            st.children.insert(d, Child { index: index.clone(), platform, attestation });
        }
    }

    /// A single-platform image's platform, from its config blob when cached.
    fn platform_from_config(&self, manifest: &[u8]) -> String {
        let config = serde_json::from_slice::<serde_json::Value>(manifest)
            .ok()
            .and_then(|v| v.get("config")?.get("digest")?.as_str().and_then(Digest::parse));
        let platform = config.and_then(|d| {
            // Configs are small: the size check keeps a hostile manifest from making this
            // read a layer.
            if self.store.blob_size(&d).ok()?? > 1 << 20 {
                return None;
            }
            let buf = self.store.read_blob(&d).ok()??;
            platform_string(&serde_json::from_slice(&buf).ok()?)
        });
        platform.unwrap_or_else(|| "unknown".into())
    }

    /// A blob request answered; `result` is hit, miss, joined or error.
    pub fn blob_served(&self, upstream: &str, result: &str) {
        self.metrics.blob_requests.with_label_values(&[upstream, result]).inc();
        match result {
            "hit" => self.traffic(Traffic::BlobHits),
            "miss" | "joined" => self.traffic(Traffic::BlobMisses),
            _ => {}
        }
    }

    fn traffic(&self, t: Traffic) {
        self.traffic[t as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Blob bytes sent to a client, from the cache or from a download in progress.
    pub fn blob_bytes(&self, from_cache: bool, n: u64) {
        let (source, total) =
            if from_cache { ("cache", &self.bytes_cache) } else { ("upstream", &self.bytes_upstream) };
        self.metrics.blob_bytes_served.with_label_values(&[source]).inc_by(n);
        total.fetch_add(n, Ordering::Relaxed);
    }

    /// Writes what was counted since the last flush to the analytics db.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (mut pending, tag_pulls) = {
            let mut st = self.state();
            (std::mem::take(&mut st.pending), std::mem::take(&mut st.tag_pulls))
        };
        let day = today();
        let counted = Traffic::ALL.iter().map(|t| (t.field(), &self.traffic[*t as usize]));
        let bytes = [("bytes_cache", &self.bytes_cache), ("bytes_upstream", &self.bytes_upstream)];
        for (field, total) in bytes.into_iter().chain(counted) {
            let n = total.swap(0, Ordering::Relaxed);
            if n > 0 {
                *pending.entry(format!("traffic\t{day}\t{field}")).or_default() += n;
            }
        }
        self.store.add_counters(&pending)?;
        for ((key, tag, digest), n) in tag_pulls {
            self.store.add_tag_pulls(&key, &tag, &digest, n)?;
        }
        Ok(())
    }
}

impl Analytics {
    /// Drops per-day counts older than `days`; returns how many series went.
    pub fn apply_retention(&self, days: u32) -> Result<usize, StoreError> {
        let first_kept = day_of(SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400));
        self.store.drop_counts_before(&first_kept)
    }
}

/// One row of a top list.
#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub pulls: u64,
}

/// What `wharf stats` and `/_wharf/stats` show.
#[derive(Debug, Serialize)]
pub struct Report {
    pub since: Option<String>,
    pub pulls: u64,
    pub top_images: Vec<Row>,
    pub top_tags: Vec<Row>,
    pub platforms: Vec<Row>,
    pub pulls_per_day: BTreeMap<String, u64>,
    /// Share of blob and manifest requests answered without fetching upstream.
    pub cache_hit_ratio: Option<f64>,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
    /// Bytes clients got from the cache instead of the upstream.
    pub bytes_saved: u64,
}

fn top(map: HashMap<String, u64>, n: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = map.into_iter().map(|(name, pulls)| Row { name, pulls }).collect();
    rows.sort_by(|a, b| b.pulls.cmp(&a.pulls).then(a.name.cmp(&b.name)));
    rows.truncate(n);
    rows
}

/// Aggregates the persisted counters (from `since`, a `YYYY-MM-DD` day, on).
pub fn report(store: &Store, n: usize, since: Option<&str>) -> Result<Report, StoreError> {
    let (mut images, mut tags, mut platforms) = (HashMap::new(), HashMap::new(), HashMap::new());
    let mut per_day = BTreeMap::new();
    let mut total = 0;
    for (k, count) in store.counters("pull\t")? {
        let f: Vec<&str> = k.split('\t').collect();
        let [_, day, up, repo, tag, platform] = f.as_slice() else { continue };
        if since.is_some_and(|s| *day < s) {
            continue;
        }
        total += count;
        *images.entry(format!("{up}/{repo}")).or_default() += count;
        *tags.entry(format!("{up}/{repo}:{tag}")).or_default() += count;
        *platforms.entry((*platform).to_owned()).or_default() += count;
        *per_day.entry((*day).to_owned()).or_default() += count;
    }
    let mut traffic: HashMap<String, u64> = HashMap::new();
    for (k, count) in store.counters("traffic\t")? {
        let f: Vec<&str> = k.split('\t').collect();
        let [_, day, field] = f.as_slice() else { continue };
        if since.is_some_and(|s| *day < s) {
            continue;
        }
        *traffic.entry((*field).to_owned()).or_default() += count;
    }
    let get = |f: &str| traffic.get(f).copied().unwrap_or(0);
    let hits = get("blob_hits") + get("manifest_hits");
    let all = hits + get("blob_misses") + get("manifest_misses");
    Ok(Report {
        since: since.map(str::to_owned),
        pulls: total,
        top_images: top(images, n),
        top_tags: top(tags, n),
        platforms: top(platforms, usize::MAX),
        pulls_per_day: per_day,
        cache_hit_ratio: (all > 0).then(|| hits as f64 / all as f64),
        bytes_from_cache: get("bytes_cache"),
        bytes_from_upstream: get("bytes_upstream"),
        bytes_saved: get("bytes_cache"),
    })
}

/// The day of a unix time, for tests that need a date.
/// Artifact types counted as referrer fetches: the label of a manifest that refers to
/// another (signature, SBOM, attestation), which is no pull of an image. Such a manifest
/// has a `subject`, or is fetched by a cosign tag (`sha256-<hex>.sig`, `.att`, `.sbom`). The
/// label is its artifact type (or config media type) when it is one cosign, notation,
/// in-toto or the sigstore bundle use, else `other`: the label set stays bounded.
fn referrer_kind(reference: &Reference, bytes: &[u8]) -> Option<String> {
    let cosign_tag = matches!(reference, Reference::Tag(t)
        if t.as_str().starts_with("sha256-") && [".sig", ".att", ".sbom"].iter().any(|s| t.as_str().ends_with(s)));
    let has_subject = memchr::memmem::find(bytes, b"\"subject\"").is_some();
    if !cosign_tag && !has_subject {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if !cosign_tag && v.get("subject").is_none() {
        return None;
    }
    let known = |t: &&str| {
        [
            "application/vnd.dev.cosign",
            "application/vnd.dev.sigstore",
            "application/vnd.in-toto",
            "application/vnd.cncf.notary",
            "application/spdx",
            "application/vnd.cyclonedx",
        ]
        .iter()
        .any(|p| t.starts_with(p))
    };
    let candidates = [
        v.get("artifactType").and_then(|a| a.as_str()),
        v.get("config").and_then(|c| c.get("mediaType")).and_then(|m| m.as_str()),
        v.get("layers").and_then(|l| l.get(0)).and_then(|l| l.get("mediaType")).and_then(|m| m.as_str()),
    ];
    let kind = candidates.into_iter().flatten().find(known).unwrap_or("other").to_owned();
    Some(kind)
}

#[cfg(test)]
fn day_for_unix_secs(secs: u64) -> String {
    day_of(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrers_are_told_apart_from_images_with_a_bounded_label() {
        let d = Digest::of(b"x");
        let by_digest = Reference::Digest(d.clone());
        let subject = serde_json::json!({"mediaType": "m", "digest": d.to_string(), "size": 1});
        let sig = serde_json::json!({"artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json", "subject": subject});
        assert_eq!(
            referrer_kind(&by_digest, sig.to_string().as_bytes()).as_deref(),
            Some("application/vnd.dev.sigstore.bundle.v0.3+json")
        );
        let odd = serde_json::json!({"artifactType": "application/x-anything-at-all", "subject": subject});
        assert_eq!(referrer_kind(&by_digest, odd.to_string().as_bytes()).as_deref(), Some("other"));
        let image = serde_json::json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{"mediaType": "x", "annotations": {"note": "\"subject\" in a string"}}]});
        assert_eq!(referrer_kind(&by_digest, image.to_string().as_bytes()), None);
        let cosign = serde_json::json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json"}]});
        let tag = Reference::Tag(Tag::parse(&format!("sha256-{}.sig", d.hex())).expect("tag"));
        assert_eq!(
            referrer_kind(&tag, cosign.to_string().as_bytes()).as_deref(),
            Some("application/vnd.dev.cosign.simplesigning.v1+json")
        );
        assert_eq!(
            referrer_kind(&Reference::Tag(Tag::parse("v1").expect("tag")), cosign.to_string().as_bytes()),
            None
        );
    }

    #[test]
    fn days_and_platforms_format() {
        assert_eq!(day_for_unix_secs(0), "1970-01-01");
        assert_eq!(day_for_unix_secs(1_795_392_000), "2026-11-23");
        let p = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert_eq!(platform_string(&p).as_deref(), Some("linux/arm64/v8"));
        let p = serde_json::json!({"os": "linux", "architecture": "amd64"});
        assert_eq!(platform_string(&p).as_deref(), Some("linux/amd64"));
    }
}
