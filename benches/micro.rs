//! Micro-benchmarks of the per-request hot paths: path parsing, upstream resolution,
//! index and in-memory cache lookups, digest hashing. `cargo bench --bench micro`.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use wharf::api::{parse_route, resolve, Query};
use wharf::config::UpstreamConfig;
use wharf::metrics::Metrics;
use wharf::oci::{Digest, RepoName, Tag, OCI_MANIFEST};
use wharf::store::{RepoKey, Store};
use wharf::upstream::Upstream;

fn routing(c: &mut Criterion) {
    let path = format!("/v2/library/alpine/blobs/sha256:{}", "ab".repeat(32));
    c.bench_function("parse_route blob", |b| b.iter(|| parse_route(black_box(&path))));
    c.bench_function("parse_route manifest by tag", |b| {
        b.iter(|| parse_route(black_box("/v2/ghcr.io/org/team/app/manifests/v1.2.3")))
    });
    c.bench_function("query ns", |b| b.iter(|| Query::parse(black_box(Some("ns=docker.io")))));
    let metrics = Arc::new(Metrics::new());
    let url = |u: &str| url::Url::parse(u).expect("url");
    let upstreams: Vec<Arc<Upstream>> =
        [("docker.io", "https://registry-1.docker.io"), ("ghcr.io", "https://ghcr.io")]
            .iter()
            .map(|(n, u)| {
                Arc::new(Upstream::new(&UpstreamConfig::new(n, url(u)), metrics.clone()).expect("upstream"))
            })
            .collect();
    let name = RepoName::parse("ghcr.io/org/app").expect("name");
    c.bench_function("resolve prefix", |b| b.iter(|| resolve(&upstreams, black_box(&name), None)));
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let key = RepoKey::new("docker.io", &RepoName::parse("library/alpine").expect("name"));
    let manifest = br#"{"schemaVersion":2,"config":{"digest":"sha256:00"},"layers":[]}"#;
    let d = Digest::of(manifest);
    store.put_manifest(&key, &d, manifest, OCI_MANIFEST).expect("put");
    let tag = Tag::parse("latest").expect("tag");
    store.record_tag(&key, &tag, &d, 1).expect("tag");
    c.bench_function("store manifest hit", |b| b.iter(|| store.manifest(black_box(&key), black_box(&d))));
    c.bench_function("store tag lookup (sled)", |b| b.iter(|| store.tag(black_box(&key), black_box(&tag))));
    let small = Digest::of(b"small");
    store.remember_small_blob(&small, bytes::Bytes::from_static(b"small"));
    c.bench_function("store small blob hit", |b| b.iter(|| store.small_blob(black_box(&small))));
    c.bench_function("store link_layer known", |b| {
        b.iter(|| store.link_layer(black_box(&key), black_box(&d)))
    });
    let four_k = vec![7u8; 4096];
    c.bench_function("sha256 4 KiB", |b| b.iter(|| Digest::of(black_box(&four_k))));
}

criterion_group!(benches, routing, store);
criterion_main!(benches);
