//! Prefetch: fills a wharf's cache from a list of images, through that wharf's own
//! prefetch endpoints (`POST /_wharf/prefetch/…`), so the fetching is the cache's: the same
//! verification and single-flight as pulls (a prefetch never fetches twice what clients are
//! pulling at that moment), counted apart from pulls. This module is the client side: it
//! walks each image (index, the platforms asked for, attestations and referrers) and asks
//! for every manifest and blob, a few at a time.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::oci::{is_attestation, platform_string, split_reference, Digest, Platform, RepoName};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.artifact.manifest.v1+json";

/// One `[[prefetch]]` entry of the configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    /// Image references as users write them (`alpine:3.20`, `ghcr.io/org/app@sha256:…`).
    pub images: Vec<String>,
    /// Platforms of multi-platform images (`linux/amd64`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// The server prefetches the list again this often; absent: only `wharf prefetch`.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub refresh: Option<std::time::Duration>,
    /// Signatures, SBOMs and attestations too (default true).
    #[serde(default = "yes")]
    pub extras: bool,
    /// Pin what is fetched: eviction never takes these tags' current images.
    #[serde(default)]
    pub pin: bool,
}

fn yes() -> bool {
    true
}

/// What to fetch.
#[derive(Clone, Debug)]
pub struct Target {
    pub image: String,
    pub platforms: Vec<Platform>,
    pub extras: bool,
    /// Pin the image (by tag) once fetched.
    pub pin: bool,
}

/// How one image went, for the summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub image: String,
    pub digest: String,
    pub platforms: Vec<String>,
    /// Blob bytes of the image (what was fetched plus what the cache held).
    pub bytes: u64,
    pub fetched_bytes: u64,
    pub cached_bytes: u64,
    pub blobs: usize,
    pub manifests: usize,
    /// `ok`, or why it failed.
    pub result: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.result == "ok"
    }
}

/// Progress as it happens, for bars or log lines.
pub trait Progress: Send + Sync {
    /// Image `i` is resolved: its blobs total `bytes`.
    fn sized(&self, i: usize, image: &str, bytes: u64);
    /// A blob of image `i` is in the cache now.
    fn blob(&self, i: usize, bytes: u64, fetched: bool);
    fn done(&self, i: usize, outcome: &Outcome);
}

/// An image reference split as a pull path needs it: the name and the tag or digest.
pub fn split(image: &str) -> Result<(RepoName, String), String> {
    let (name, reference) = split_reference(image);
    let repo = RepoName::parse(name).ok_or_else(|| format!("invalid repository name {name:?}"))?;
    Ok((repo, reference.unwrap_or("latest").to_owned()))
}

/// How the client proves who it is to a wharf that protects its admin surface.
#[derive(Clone)]
pub enum Credentials {
    Basic(String, String),
    /// A token the server issued (its own scheduled refresh uses one).
    Bearer(String),
}

/// A client of one wharf's prefetch endpoints.
pub struct Client {
    http: reqwest::Client,
    base: String,
    credentials: Option<Credentials>,
}

impl Client {
    /// `base`: the wharf's admin address (or its only one), e.g. `http://127.0.0.1:5000`.
    pub fn new(base: &str, credentials: Option<Credentials>) -> Result<Client, String> {
        let http = reqwest::Client::builder()
            // The server is ours, reached by address: its certificate may name another host.
            .danger_accept_invalid_certs(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client { http, base: base.trim_end_matches('/').to_owned(), credentials })
    }

    async fn post(&self, name: &RepoName, tail: &str) -> Result<reqwest::Response, String> {
        let url = format!("{}/_wharf/prefetch/{}/{tail}", self.base, name.as_str());
        let mut req = self.http.post(url).header("accept", ACCEPT);
        match &self.credentials {
            Some(Credentials::Basic(u, p)) => req = req.basic_auth(u, Some(p)),
            Some(Credentials::Bearer(t)) => req = req.bearer_auth(t),
            None => {}
        }
        let resp = req.send().await.map_err(|e| crate::upstream::error_chain(&e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = body["errors"][0]["message"].as_str().unwrap_or("");
        let code = body["errors"][0]["code"].as_str().unwrap_or("");
        Err(format!("{tail}: HTTP {} {code} {msg}", status.as_u16()).trim().to_owned())
    }

    /// A manifest into the cache: its digest, media type and bytes.
    async fn manifest(
        &self,
        name: &RepoName,
        reference: &str,
        pin: bool,
    ) -> Result<(Digest, String, bytes::Bytes), String> {
        let pin = if pin { "?pin=1" } else { "" };
        let resp = self.post(name, &format!("manifests/{reference}{pin}")).await?;
        let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let digest = header("docker-content-digest").and_then(|d| Digest::parse(&d)).ok_or("no digest")?;
        let media_type = header("content-type").unwrap_or_default();
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok((digest, media_type, bytes))
    }

    /// A blob into the cache: its size and whether the cache held it already.
    async fn blob(&self, name: &RepoName, d: &Digest) -> Result<(u64, bool), String> {
        let resp = self.post(name, &format!("blobs/{d}")).await?;
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        Ok((v["size"].as_u64().unwrap_or(0), v["cached"].as_bool().unwrap_or(false)))
    }

    async fn referrers(&self, name: &RepoName, d: &Digest) -> Result<Vec<Digest>, String> {
        let resp = self.post(name, &format!("referrers/{d}")).await?;
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        Ok(v["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Digest::parse(m["digest"].as_str()?))
            .collect())
    }
}

fn is_index(media_type: &str, v: &Value) -> bool {
    crate::oci::is_index(media_type) || (v.get("manifests").is_some() && v.get("layers").is_none())
}

/// Blobs (digest, size) an image manifest names.
fn blobs_of(v: &Value) -> Vec<(Digest, u64)> {
    let mut out = Vec::new();
    let mut take = |d: &Value| {
        if let Some(dg) = d["digest"].as_str().and_then(Digest::parse) {
            out.push((dg, d["size"].as_u64().unwrap_or(0)));
        }
    };
    if v.get("config").is_some() {
        take(&v["config"]);
    }
    for field in ["layers", "blobs"] {
        for d in v[field].as_array().into_iter().flatten() {
            take(d);
        }
    }
    out
}

/// Walks one image: every manifest first (so its size is known), then its blobs.
async fn one(
    client: &Client,
    i: usize,
    t: &Target,
    blob_slots: &tokio::sync::Semaphore,
    progress: &dyn Progress,
) -> Outcome {
    let mut out = Outcome { image: t.image.clone(), ..Default::default() };
    match walk(client, i, t, blob_slots, progress, &mut out).await {
        Ok(()) => out.result = "ok".into(),
        Err(e) => out.result = e,
    }
    progress.done(i, &out);
    out
}

async fn walk(
    client: &Client,
    i: usize,
    t: &Target,
    blob_slots: &tokio::sync::Semaphore,
    progress: &dyn Progress,
    out: &mut Outcome,
) -> Result<(), String> {
    let (name, reference) = split(&t.image)?;
    // The pin is asked for once the image is whole: a failed prefetch pins nothing.
    let (top, media_type, bytes) = client.manifest(&name, &reference, false).await?;
    out.digest = top.to_string();
    out.manifests += 1;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{top}: {e}"))?;
    let mut images: Vec<Value> = Vec::new();
    let mut subjects = vec![top.clone()];
    if is_index(&media_type, &v) {
        let entries = v["manifests"].as_array().cloned().unwrap_or_default();
        let mut chosen = Vec::new();
        for e in &entries {
            if is_attestation(e) {
                continue;
            }
            if !t.platforms.is_empty() && !t.platforms.iter().any(|p| p.matches(&e["platform"])) {
                continue;
            }
            if let Some(d) = e["digest"].as_str() {
                chosen.push(d.to_owned());
                out.platforms.push(platform_string(&e["platform"]));
            }
        }
        if chosen.is_empty() {
            return Err(format!("{top}: no platform asked for is in the index"));
        }
        let attestations: Vec<String> = match t.extras {
            false => Vec::new(),
            true => entries
                .iter()
                .filter(|e| {
                    e.pointer("/annotations/vnd.docker.reference.digest")
                        .and_then(Value::as_str)
                        .is_some_and(|of| chosen.iter().any(|c| c == of))
                })
                .filter_map(|e| e["digest"].as_str().map(str::to_owned))
                .collect(),
        };
        for d in chosen.iter().chain(&attestations) {
            let (cd, _, cb) = client.manifest(&name, d, false).await?;
            out.manifests += 1;
            images.push(serde_json::from_slice(&cb).map_err(|e| format!("{d}: {e}"))?);
            subjects.push(cd);
        }
    } else {
        images.push(v);
    }
    if t.extras {
        // Signatures, SBOMs and attestations that name the image or a platform of it.
        for s in subjects {
            for r in client.referrers(&name, &s).await? {
                let (_, _, rb) = client.manifest(&name, &r.to_string(), false).await?;
                out.manifests += 1;
                images.push(serde_json::from_slice(&rb).map_err(|e| format!("{r}: {e}"))?);
            }
        }
    }
    let mut blobs: Vec<(Digest, u64)> = images.iter().flat_map(blobs_of).collect();
    let mut seen = std::collections::HashSet::new();
    blobs.retain(|(d, _)| seen.insert(d.clone()));
    out.blobs = blobs.len();
    out.bytes = blobs.iter().map(|(_, s)| s).sum();
    progress.sized(i, &t.image, out.bytes);
    let results: Vec<Result<(u64, bool), String>> = stream::iter(blobs)
        .map(|(d, _)| {
            let name = name.clone();
            async move {
                let _slot = blob_slots.acquire().await.map_err(|e| e.to_string())?;
                let r = client.blob(&name, &d).await?;
                progress.blob(i, r.0, !r.1);
                Ok(r)
            }
        })
        // The semaphore, shared by every image, is what bounds the requests in flight.
        .buffer_unordered(64)
        .collect()
        .await;
    let mut first_err = None;
    for r in results {
        match r {
            Ok((size, true)) => out.cached_bytes += size,
            Ok((size, false)) => out.fetched_bytes += size,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if t.pin && !reference.contains(':') {
        client.manifest(&name, &reference, true).await?;
    }
    Ok(())
}

/// The targets of the configuration's `[[prefetch]]` entries (those with a `refresh`
/// only, for the server's schedule).
pub fn configured(entries: &[PrefetchConfig], scheduled_only: bool) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| !scheduled_only || e.refresh.is_some()) {
        let platforms = e
            .platforms
            .iter()
            .map(|p| {
                Platform::parse(p)
                    .ok_or_else(|| format!("prefetch platform {p:?}: expected os/arch[/variant]"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.extend(e.images.iter().map(|i| Target {
            image: i.clone(),
            platforms: platforms.clone(),
            extras: e.extras,
            pin: e.pin,
        }));
    }
    Ok(out)
}

/// Progress nobody watches (the server's scheduled refresh logs the outcomes).
pub struct Quiet;

impl Progress for Quiet {
    fn sized(&self, _: usize, _: &str, _: u64) {}
    fn blob(&self, _: usize, _: u64, _: bool) {}
    fn done(&self, _: usize, _: &Outcome) {}
}

/// Prefetches every target, at most `concurrency` blobs at once; one outcome per target,
/// in order.
pub async fn run(
    client: Arc<Client>,
    targets: &[Target],
    concurrency: usize,
    progress: Arc<dyn Progress>,
) -> Vec<Outcome> {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut outcomes: Vec<(usize, Outcome)> = stream::iter(targets.iter().cloned().enumerate())
        .map(|(i, t)| {
            let (client, slots, progress) = (client.clone(), slots.clone(), progress.clone());
            async move { (i, one(&client, i, &t, &slots, progress.as_ref()).await) }
        })
        .buffer_unordered(concurrency.clamp(1, 8))
        .collect()
        .await;
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, o)| o).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_into_name_and_reference() {
        let (n, r) = split("alpine").expect("ok");
        assert_eq!((n.as_str(), r.as_str()), ("alpine", "latest"));
        assert!(split("localhost:5000/app").is_err(), "a host:port is not a repository path");
        let hex = "a".repeat(64);
        let (n, r) = split(&format!("ghcr.io/org/app@sha256:{hex}")).expect("ok");
        assert_eq!((n.as_str(), r), ("ghcr.io/org/app", format!("sha256:{hex}")));
        assert!(split("UPPER:1").is_err());
    }
}
