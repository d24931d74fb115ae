//! Every metric wharf exports, defined in one place. Names carry the `wharf_` prefix and base
//! units; label values are bounded sets (never a digest, a client address or a free string;
//! repository and tag values are capped by the analytics module).

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Handles to all metrics of one server (no globals: two servers can share a process).
pub struct Metrics {
    registry: Registry,
    /// Every metric family name registered, for checks (dashboards, docs).
    names: Vec<&'static str>,
    /// Requests answered, by method, route and status.
    pub http_requests: IntCounterVec,
    /// Time to response headers, by route.
    pub http_duration: HistogramVec,
    /// Pulls (manifest GETs of an image, not an index) by repository, tag and platform.
    pub pulls: IntCounterVec,
    /// Pulls whose series went past `analytics.max_series` and were counted as `other`.
    pub pulls_folded: IntCounter,
    /// GETs of buildx attestation manifests (not pulls).
    pub attestation_fetches: IntCounterVec,
    /// GETs of manifests that refer to another (signatures, SBOMs, attestations with a
    /// `subject`; not pulls), by artifact type.
    pub referrer_fetches: IntCounterVec,
    /// Referrers requests answered, by the source of the list (api, fallback_tag, local)
    /// and result (hit, revalidated, refreshed, stale, miss).
    pub referrers_requests: IntCounterVec,
    /// Manifest requests by result: hit, revalidated, refreshed, stale, miss, error.
    pub manifest_requests: IntCounterVec,
    /// Blob requests by result: hit, miss, joined, error.
    pub blob_requests: IntCounterVec,
    /// Blob bytes sent to clients, by source: cache or upstream (a fill in progress).
    pub blob_bytes_served: IntCounterVec,
    /// Requests wharf sent upstream, by method and status (or `error`).
    pub upstream_requests: IntCounterVec,
    /// Time to upstream response headers.
    pub upstream_duration: HistogramVec,
    /// Upstream failures by kind: connect, timeout, request, status, auth.
    pub upstream_errors: IntCounterVec,
    /// Body bytes received from upstreams.
    pub upstream_bytes: IntCounterVec,
    /// Manifests and blobs a prefetch asked for, by upstream and result (not pulls).
    pub prefetch_manifests: IntCounterVec,
    pub prefetch_blobs: IntCounterVec,
    /// Blob bytes a prefetch brought into the cache (not counting what it found there).
    pub prefetch_bytes: IntCounterVec,
    /// Tag requests answered from cache because the upstream could not answer.
    pub stale_served: IntCounterVec,
    /// Tags answered, with the upstream unreachable or offline, by an older digest of their
    /// history because the newer ones are not whole in the cache.
    pub tag_fallbacks: IntCounterVec,
    /// Upstream content whose sha256 did not match the digest asked for; never cached.
    pub digest_mismatch: IntCounterVec,
    /// Requests that joined an upstream fetch or revalidation already in flight.
    pub coalesced: IntCounter,
    /// Downloads that found another replica fetching the blob and waited for it.
    pub replica_waits: IntCounter,
    /// Downloads filled from the shared bucket (another replica's fetch) instead of the
    /// upstream.
    pub replica_fills: IntCounter,
    /// Blob downloads from upstreams in progress.
    pub inflight_downloads: IntGauge,
    /// Manifests served but not yet stored (their writes run off the response path).
    pub inflight_manifest_writes: IntGauge,
    /// Bytes and number of blobs (manifests included) in the cache, set when scraped.
    pub cache_bytes: IntGauge,
    pub cache_blobs: IntGauge,
    /// The cache's size cap (0: unbounded).
    pub cache_limit: IntGauge,
    /// Blobs removed from the cache, and their bytes, by reason (lru, gc, orphan).
    pub evictions: IntCounterVec,
    pub evicted_bytes: IntCounterVec,
    /// Downloads served to their clients but not stored, by reason (no_room, disk_full).
    pub uncached_downloads: IntCounterVec,
    /// Error responses, by OCI error code.
    pub errors: IntCounterVec,
    /// Client connections open, and the most that are served at once.
    pub connections: IntGauge,
    pub connection_limit: IntGauge,
    /// Connections closed by the server, by reason (idle, write_timeout).
    pub connections_closed: IntCounterVec,
    /// Idle HTTP/1 connections that gave their buffers back until their client sent again.
    pub connections_hibernated: IntCounter,
    /// Failed downstream authentications and refusals, by reason (missing, malformed,
    /// unknown_user, bad_password, forbidden, bad_certificate).
    pub auth_failures: IntCounterVec,
    /// Requests refused because downloads were at their limits, by limit (downloads,
    /// spool_bytes).
    pub downloads_refused: IntCounterVec,
    /// Bytes downloads in flight hold in spool files (counted against
    /// `server.max_spool_bytes`).
    pub spool_bytes: IntGauge,
}

/// Registers metrics and remembers their names.
struct Reg {
    r: Registry,
    names: Vec<&'static str>,
}

impl Reg {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&mut self, name: &'static str, m: M) -> M {
        self.r.register(Box::new(m.clone())).expect("metric registered once");
        self.names.push(name);
        m
    }

    fn counter_vec(&mut self, name: &'static str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(name, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn counter(&mut self, name: &'static str, help: &str) -> IntCounter {
        self.add(name, IntCounter::new(name, help).expect("valid metric"))
    }

    fn gauge(&mut self, name: &'static str, help: &str) -> IntGauge {
        self.add(name, IntGauge::new(name, help).expect("valid metric"))
    }

    fn histogram(&mut self, name: &'static str, help: &str, labels: &[&str]) -> HistogramVec {
        let buckets = exponential_buckets(0.0005, 2.5, 14).expect("valid buckets");
        self.add(
            name,
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric"),
        )
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Reg { r: Registry::new(), names: Vec::new() };
        let build = r.add(
            "wharf_build_info",
            IntGauge::with_opts(
                Opts::new("wharf_build_info", "Build information")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            )
            .expect("valid metric"),
        );
        build.set(1);
        Metrics {
            connections: r.gauge("wharf_connections", "Client connections open"),
            connection_limit: r.gauge("wharf_connection_limit", "Client connections served at once (server.max_connections)"),
            connections_closed: r.counter_vec(
                "wharf_connections_closed_total",
                "Connections closed by the server, by reason",
                &["reason"],
            ),
            connections_hibernated: r.counter(
                "wharf_connections_hibernated_total",
                "Idle HTTP/1 connections that released their buffers until the client sent again",
            ),
            auth_failures: r.counter_vec(
                "wharf_auth_failures_total",
                "Failed downstream authentications and refused pulls, by reason",
                &["reason"],
            ),
            downloads_refused: r.counter_vec(
                "wharf_downloads_refused_total",
                "Requests refused because upstream downloads were at a limit",
                &["limit"],
            ),
            spool_bytes: r.gauge("wharf_spool_bytes", "Bytes of downloads in flight counted against server.max_spool_bytes"),
            http_requests: r.counter_vec(
                "wharf_http_requests_total",
                "HTTP requests answered",
                &["method", "route", "status"],
            ),
            http_duration: r.histogram(
                "wharf_http_request_duration_seconds",
                "Time to response headers",
                &["route"],
            ),
            pulls: r.counter_vec(
                "wharf_pulls_total",
                "Image pulls by repository, tag and platform",
                &["upstream", "repository", "tag", "platform"],
            ),
            pulls_folded: r.counter(
                "wharf_pulls_folded_total",
                "Pulls counted as repository=\"other\" because of analytics.max_series",
            ),
            attestation_fetches: r.counter_vec(
                "wharf_attestation_fetches_total",
                "GETs of attestation manifests (not pulls)",
                &["upstream"],
            ),
            referrer_fetches: r.counter_vec(
                "wharf_referrer_fetches_total",
                "GETs of manifests with a subject: signatures, SBOMs, attestations (not pulls)",
                &["upstream", "artifact_type"],
            ),
            referrers_requests: r.counter_vec(
                "wharf_referrers_requests_total",
                "Referrers lists served, by where the list came from and result",
                &["upstream", "source", "result"],
            ),
            manifest_requests: r.counter_vec(
                "wharf_manifest_requests_total",
                "Manifest requests by result",
                &["upstream", "method", "result"],
            ),
            blob_requests: r.counter_vec(
                "wharf_blob_requests_total",
                "Blob requests by result",
                &["upstream", "result"],
            ),
            blob_bytes_served: r.counter_vec(
                "wharf_blob_bytes_served_total",
                "Blob bytes sent to clients",
                &["source"],
            ),
            upstream_requests: r.counter_vec(
                "wharf_upstream_requests_total",
                "Requests sent upstream",
                &["upstream", "method", "status"],
            ),
            upstream_duration: r.histogram(
                "wharf_upstream_request_duration_seconds",
                "Time to upstream response headers",
                &["upstream"],
            ),
            upstream_errors: r.counter_vec(
                "wharf_upstream_errors_total",
                "Upstream failures",
                &["upstream", "kind"],
            ),
            upstream_bytes: r.counter_vec(
                "wharf_upstream_bytes_total",
                "Body bytes received from upstreams",
                &["upstream"],
            ),
            stale_served: r.counter_vec(
                "wharf_stale_served_total",
                "Tags served from cache while the upstream could not answer",
                &["upstream"],
            ),
            prefetch_manifests: r.counter_vec(
                "wharf_prefetch_manifests_total",
                "Manifests a prefetch asked for, by result (not pulls)",
                &["upstream", "result"],
            ),
            prefetch_blobs: r.counter_vec(
                "wharf_prefetch_blobs_total",
                "Blobs a prefetch asked for: hit (held already) or fetched",
                &["upstream", "result"],
            ),
            prefetch_bytes: r.counter_vec(
                "wharf_prefetch_bytes_total",
                "Blob bytes a prefetch brought into the cache",
                &["upstream"],
            ),
            tag_fallbacks: r.counter_vec(
                "wharf_tag_fallbacks_total",
                "Tags answered by an older digest of their history, the newer ones not whole in the cache, with the upstream unreachable or offline",
                &["upstream", "reason"],
            ),
            digest_mismatch: r.counter_vec(
                "wharf_digest_mismatch_total",
                "Upstream content that did not match its digest",
                &["upstream"],
            ),
            coalesced: r.counter(
                "wharf_coalesced_requests_total",
                "Requests that joined an upstream fetch or revalidation in flight",
            ),
            replica_waits: r.counter(
                "wharf_replica_waits_total",
                "Blob downloads that waited for another replica fetching the same blob",
            ),
            replica_fills: r.counter(
                "wharf_replica_fills_total",
                "Blob downloads filled from the shared bucket instead of the upstream",
            ),
            inflight_downloads: r
                .gauge("wharf_inflight_downloads", "Blob downloads from upstreams in progress"),
            inflight_manifest_writes: r.gauge(
                "wharf_inflight_manifest_writes",
                "Manifests served to clients and not yet written to the store",
            ),
            cache_bytes: r.gauge("wharf_cache_bytes", "Bytes of blobs and manifests in the cache"),
            cache_blobs: r.gauge("wharf_cache_blobs", "Blobs and manifests in the cache"),
            cache_limit: r.gauge("wharf_cache_limit_bytes", "The cache's size cap in bytes (0: unbounded)"),
            evictions: r.counter_vec(
                "wharf_cache_evictions_total",
                "Blobs removed from the cache, by reason (lru: size cap, gc: unreferenced, orphan: not indexed)",
                &["reason"],
            ),
            evicted_bytes: r.counter_vec(
                "wharf_cache_evicted_bytes_total",
                "Bytes of blobs removed from the cache, by reason",
                &["reason"],
            ),
            uncached_downloads: r.counter_vec(
                "wharf_cache_uncached_downloads_total",
                "Downloads streamed to their clients but not stored, by reason (no_room, disk_full)",
                &["reason"],
            ),
            errors: r.counter_vec("wharf_errors_total", "Error responses by OCI error code", &["code"]),
            registry: r.r,
            names: r.names,
        }
    }

    /// The names of every metric family this server exports.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
