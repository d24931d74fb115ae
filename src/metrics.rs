//! Every metric wharf exports, defined in one place. Names carry the `wharf_` prefix and base
//! units; label values are bounded sets (never a digest, a client address or a free string).

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Handles to all metrics of one server (no globals: two servers can share a process).
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by method, route and status.
    pub http_requests: IntCounterVec,
    /// Time to response headers, by route.
    pub http_duration: HistogramVec,
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
    /// Upstream failures by kind: connect, timeout, status, body, auth.
    pub upstream_errors: IntCounterVec,
    /// Body bytes received from upstreams.
    pub upstream_bytes: IntCounterVec,
    /// Tag requests answered from cache because the upstream could not answer.
    pub stale_served: IntCounterVec,
    /// Upstream content whose sha256 did not match the digest asked for; never cached.
    pub digest_mismatch: IntCounterVec,
    /// Requests that joined an upstream fetch or revalidation already in flight.
    pub coalesced: IntCounter,
    /// Blob downloads from upstreams in progress.
    pub inflight_downloads: IntGauge,
    /// Client errors answered, by OCI error code.
    pub errors: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(0.0005, 2.5, 14).expect("bucket definition is valid");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("metric definition is valid");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let coalesced = IntCounter::new(
            "wharf_coalesced_requests_total",
            "Requests that joined an upstream fetch or revalidation in flight",
        )
        .expect("metric definition is valid");
        r.register(Box::new(coalesced.clone())).expect("metric registered once");
        let inflight = IntGauge::new("wharf_inflight_downloads", "Blob downloads from upstreams in progress")
            .expect("metric definition is valid");
        r.register(Box::new(inflight.clone())).expect("metric registered once");
        let build = IntGauge::with_opts(
            Opts::new("wharf_build_info", "Build information")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("metric definition is valid");
        build.set(1);
        r.register(Box::new(build)).expect("metric registered once");
        Metrics {
            http_requests: counter(
                &r,
                "wharf_http_requests_total",
                "HTTP requests answered",
                &["method", "route", "status"],
            ),
            http_duration: histogram(
                &r,
                "wharf_http_request_duration_seconds",
                "Time to response headers",
                &["route"],
            ),
            manifest_requests: counter(
                &r,
                "wharf_manifest_requests_total",
                "Manifest requests by result",
                &["upstream", "method", "result"],
            ),
            blob_requests: counter(
                &r,
                "wharf_blob_requests_total",
                "Blob requests by result",
                &["upstream", "result"],
            ),
            blob_bytes_served: counter(
                &r,
                "wharf_blob_bytes_served_total",
                "Blob bytes sent to clients",
                &["source"],
            ),
            upstream_requests: counter(
                &r,
                "wharf_upstream_requests_total",
                "Requests sent upstream",
                &["upstream", "method", "status"],
            ),
            upstream_duration: histogram(
                &r,
                "wharf_upstream_request_duration_seconds",
                "Time to upstream response headers",
                &["upstream"],
            ),
            upstream_errors: counter(
                &r,
                "wharf_upstream_errors_total",
                "Upstream failures",
                &["upstream", "kind"],
            ),
            upstream_bytes: counter(
                &r,
                "wharf_upstream_bytes_total",
                "Body bytes received from upstreams",
                &["upstream"],
            ),
            stale_served: counter(
                &r,
                "wharf_stale_served_total",
                "Tags served from cache while the upstream could not answer",
                &["upstream"],
            ),
            digest_mismatch: counter(
                &r,
                "wharf_digest_mismatch_total",
                "Upstream content that did not match its digest",
                &["upstream"],
            ),
            errors: counter(&r, "wharf_errors_total", "Error responses by OCI error code", &["code"]),
            coalesced,
            inflight_downloads: inflight,
            registry: r,
        }
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
