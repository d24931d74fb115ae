//! Referrers lists (`/v2/<name>/referrers/<digest>`): what refers to a manifest by its
//! `subject` (signatures, SBOMs, attestations). Three sources, asked in order: the upstream's
//! referrers API; the referrers tag schema (`sha256-<hex>`) when the upstream has no API;
//! and the manifests with that subject wharf has cached, when neither exists. A list is
//! kept like a tag: served within `referrers_ttl`, asked again after, and the last one
//! served while the upstream cannot answer.

use std::sync::Arc;

use serde_json::Value;

use super::{blocking, Cache, CacheError, ManifestResult};
use crate::oci::{valid_descriptor, Digest, RepoName};
use crate::store::{now_ms, ReferrersMeta, RepoKey};
use crate::upstream::{Upstream, UpstreamError};

/// Where a referrers list came from (the `source` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferrersSource {
    /// The upstream's referrers API.
    Api,
    /// The upstream's `sha256-<hex>` tag (the referrers tag schema).
    FallbackTag,
    /// Manifests with that subject in wharf's cache.
    Local,
}

impl ReferrersSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ReferrersSource::Api => "api",
            ReferrersSource::FallbackTag => "fallback_tag",
            ReferrersSource::Local => "local",
        }
    }

    fn parse(s: &str) -> ReferrersSource {
        match s {
            "api" => ReferrersSource::Api,
            "fallback_tag" => ReferrersSource::FallbackTag,
            _ => ReferrersSource::Local,
        }
    }
}

/// A referrers list ready to serve (unfiltered).
#[derive(Clone, Debug)]
pub struct Referrers {
    pub manifests: Vec<Value>,
    pub source: ReferrersSource,
    pub result: ManifestResult,
}

impl Cache {
    /// The referrers of `d` in `name`: from cache within the upstream's `referrers_ttl`,
    /// else asked again (one upstream call for any number of concurrent requests); the
    /// last list, or the cached manifests' subjects, when the upstream cannot answer.
    pub async fn referrers(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepoName,
        d: &Digest,
    ) -> Result<Referrers, CacheError> {
        let key = RepoKey::new(&up.name, name);
        let known = self.store.referrers(&key, d)?;
        if let Some(k) = &known {
            if now_ms().saturating_sub(k.checked_ms) < up.referrers_ttl.as_millis() as u64 {
                return self.referrers_answer(&key, d, k, ManifestResult::Hit);
            }
        }
        let res = self
            .referrer_flights
            .run(
                (key.clone(), d.clone()),
                || self.metrics.coalesced.inc(),
                || self.clone().fetch_referrers(up.clone(), name.clone(), key.clone(), d.clone()),
            )
            .await;
        match res {
            Ok(meta) => {
                let result = match &known {
                    None => ManifestResult::Miss,
                    Some(k) if k.source == meta.source && k.manifests == meta.manifests => {
                        ManifestResult::Revalidated
                    }
                    Some(_) => ManifestResult::Refreshed,
                };
                self.referrers_answer(&key, d, &meta, result)
            }
            // An upstream that refuses us is told to the client; any other failure is
            // answered with what the cache knows, as a tag is.
            Err(CacheError::Upstream(e)) if !matches!(e, UpstreamError::Denied(_)) => {
                self.metrics.stale_served.with_label_values(&[&up.name]).inc();
                tracing::warn!(upstream = %up.name, repository = %name, digest = %d, error = %e, "upstream cannot list referrers; serving what the cache knows");
                let meta = known.unwrap_or(ReferrersMeta {
                    checked_ms: 0,
                    source: ReferrersSource::Local.as_str().to_owned(),
                    manifests: Vec::new(),
                });
                self.referrers_answer(&key, d, &meta, ManifestResult::Stale)
            }
            Err(e) => Err(e),
        }
    }

    fn referrers_answer(
        &self,
        key: &RepoKey,
        d: &Digest,
        meta: &ReferrersMeta,
        result: ManifestResult,
    ) -> Result<Referrers, CacheError> {
        let source = ReferrersSource::parse(&meta.source);
        let manifests = match source {
            ReferrersSource::Local => self.store.local_referrers(key, d)?,
            _ => meta.manifests.clone(),
        };
        Ok(Referrers { manifests, source, result })
    }

    /// Asks the upstream: its referrers API, else the fallback tag; records the answer.
    async fn fetch_referrers(
        self: Arc<Self>,
        up: Arc<Upstream>,
        name: RepoName,
        key: RepoKey,
        d: Digest,
    ) -> Result<ReferrersMeta, CacheError> {
        let (source, listed) = match up.referrers(&name, &d).await? {
            Some(list) => (ReferrersSource::Api, list),
            None => match up.get_manifest(&name, d.fallback_tag().as_str()).await {
                Ok(m) => {
                    let v: Value = serde_json::from_slice(&m.bytes).map_err(|e| {
                        UpstreamError::Invalid(format!("referrers tag {} is not JSON: {e}", d.fallback_tag()))
                    })?;
                    let list = v.get("manifests").and_then(|l| l.as_array()).ok_or_else(|| {
                        UpstreamError::Invalid(format!("referrers tag {} is not an index", d.fallback_tag()))
                    })?;
                    (ReferrersSource::FallbackTag, list.clone())
                }
                Err(UpstreamError::NotFound) => (ReferrersSource::Local, Vec::new()),
                Err(e) => return Err(e.into()),
            },
        };
        let total = listed.len();
        let manifests: Vec<Value> = listed.into_iter().filter(valid_descriptor).collect();
        if manifests.len() < total {
            tracing::warn!(upstream = %up.name, repository = %name, digest = %d, dropped = total - manifests.len(), "referrers entries that are not descriptors were left out");
        }
        let meta = ReferrersMeta { checked_ms: now_ms(), source: source.as_str().to_owned(), manifests };
        // An empty list is kept only for a subject wharf holds: asking about digests of
        // nothing (any client can make them up) must not grow the index.
        let keep = !meta.manifests.is_empty() || self.store.holds_manifest(&key, &d)?;
        if keep {
            let (store, m) = (self.store.clone(), meta.clone());
            blocking(move || store.put_referrers(&key, &d, &m)).await?;
        }
        Ok(meta)
    }
}
