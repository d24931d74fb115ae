//! OCI 1.1 through the mirror: the referrers API from each of its sources (the upstream's
//! API, the referrers tag schema on a real distribution 2.8 that has no API, wharf's own
//! cache), its filter, pages, ttl and stale answers; sha512 content.

mod common;

use common::fake::{BlobMode, Fake};
use common::image::{noise, OCI_INDEX, OCI_MANIFEST};
use common::{in_tree, wait_until, Wharf};
use serde_json::{json, Value};

const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";

fn desc(digest: &str, artifact_type: &str) -> Value {
    json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 321, "artifactType": artifact_type})
}

/// GET as a client: (status, headers, JSON body).
async fn get_json(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = reqwest::get(url).await.expect("GET");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let body = r.bytes().await.expect("body");
    (status, headers, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn digests(index: &Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["digest"].as_str().expect("d").to_owned())
        .collect()
}

/// An image manifest on the fake: (digest, bytes).
fn fake_image(fake: &Fake, name: &str, tag: &str) -> String {
    let config = fake.blob(b"{}".to_vec());
    let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": []});
    fake.manifest(name, Some(tag), OCI_MANIFEST, m.to_string().into_bytes())
}

#[tokio::test]
async fn referrers_from_the_upstream_api_are_filtered_paginated_and_cached() {
    let fake = Fake::start().await;
    let subject = fake_image(&fake, "app", "v1");
    let list: Vec<Value> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, s)| desc(&format!("sha256:{}", s.repeat(64)), if i < 2 { SIG } else { SBOM }))
        .collect();
    fake.set_referrers("app", &subject, list.clone());
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/referrers/{subject}"));

    // Cold: both upstream pages are read, the list is served whole, in the upstream's order.
    let (status, h, index) = get_json(&url).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], OCI_INDEX);
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"], Value::Array(list.clone()));
    assert!(h.get("oci-filters-applied").is_none());
    let referrer_calls = |f: &Fake| f.seen().iter().filter(|s| s.path.contains("/referrers/")).count();
    assert_eq!(referrer_calls(&fake), 2, "one GET per upstream page");
    assert_eq!(
        w.metric("wharf_referrers_requests_total", &[("source", "api"), ("result", "miss")]).await,
        1.0
    );

    // Warm (within referrers_ttl, 5 minutes by default): no upstream call.
    let (_, _, again) = get_json(&url).await;
    assert_eq!(again, index);
    assert_eq!(referrer_calls(&fake), 2);
    assert_eq!(
        w.metric("wharf_referrers_requests_total", &[("source", "api"), ("result", "hit")]).await,
        1.0
    );

    // The filter is applied here and said so.
    let (_, h, sigs) = get_json(&format!("{url}?artifactType={SIG}")).await;
    assert_eq!(h["oci-filters-applied"], "artifactType");
    assert_eq!(
        digests(&sigs),
        vec![format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64))]
    );
    let (_, _, none) = get_json(&format!("{url}?artifactType=application/x-none")).await;
    assert_eq!(none["manifests"], json!([]));

    // Pages downstream: n per page and a Link to the next one.
    let r = reqwest::get(format!("{url}?n=2")).await.expect("GET");
    let link = r.headers()["link"].to_str().expect("link").to_owned();
    let first: Value = r.json().await.expect("json");
    assert_eq!(first["manifests"].as_array().map(Vec::len), Some(2));
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    let next = link.trim_start_matches('<').split('>').next().expect("target");
    let r = reqwest::get(w.url(next)).await.expect("GET next");
    assert!(r.headers().get("link").is_none(), "the last page has no next");
    let second: Value = r.json().await.expect("json");
    assert_eq!(digests(&second), vec![format!("sha256:{}", "c".repeat(64))]);
    assert_eq!(referrer_calls(&fake), 2, "pages are cut from the cached list");
}

#[tokio::test]
async fn a_herd_of_referrers_requests_makes_one_upstream_call() {
    let fake = Fake::start().await;
    let subject = fake_image(&fake, "app", "v1");
    fake.set_referrers("app", &subject, vec![desc(&format!("sha256:{}", "d".repeat(64)), SIG)]);
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/referrers/{subject}"));
    let herd: Vec<_> = (0..20).map(|_| tokio::spawn(get_json_owned(url.clone()))).collect();
    for h in herd {
        let (status, index) = h.await.expect("join");
        assert_eq!(status, 200);
        assert_eq!(index["manifests"].as_array().map(Vec::len), Some(1));
    }
    let calls = fake.seen().iter().filter(|s| s.path.contains("/referrers/")).count();
    assert_eq!(calls, 1, "20 concurrent requests share one upstream call");
}

async fn get_json_owned(url: String) -> (u16, Value) {
    let (s, _, v) = get_json(&url).await;
    (s, v)
}

#[tokio::test]
async fn after_the_ttl_the_list_is_asked_again_and_served_stale_when_the_upstream_fails() {
    let fake = Fake::start().await;
    let subject = fake_image(&fake, "app", "v1");
    let one = desc(&format!("sha256:{}", "1".repeat(64)), SIG);
    fake.set_referrers("app", &subject, vec![one.clone()]);
    let w = Wharf::start(&fake.url(), "referrers_ttl = \"0s\"");
    let url = w.url(&format!("/v2/app/referrers/{subject}"));
    let (_, _, index) = get_json(&url).await;
    assert_eq!(index["manifests"], json!([one]));

    // A signature added upstream is seen at the next request (ttl 0: always asked).
    let two = desc(&format!("sha256:{}", "2".repeat(64)), SBOM);
    fake.set_referrers("app", &subject, vec![one.clone(), two.clone()]);
    let (_, _, index) = get_json(&url).await;
    assert_eq!(index["manifests"], json!([one, two]));
    assert_eq!(w.metric("wharf_referrers_requests_total", &[("result", "refreshed")]).await, 1.0);
    let (_, _, _) = get_json(&url).await;
    assert_eq!(w.metric("wharf_referrers_requests_total", &[("result", "revalidated")]).await, 1.0);

    // The upstream fails: the last list is served, and counted as stale.
    fake.set_referrers_status(Some(503));
    let (status, h, index) = get_json(&url).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], OCI_INDEX);
    assert_eq!(index["manifests"], json!([one, two]));
    assert_eq!(
        w.metric("wharf_referrers_requests_total", &[("source", "api"), ("result", "stale")]).await,
        1.0
    );

    // A digest never asked for while the upstream is down: what the cache knows (nothing).
    let other = format!("sha256:{}", "e".repeat(64));
    let (status, _, index) = get_json(&w.url(&format!("/v2/app/referrers/{other}"))).await;
    assert_eq!(status, 200);
    assert_eq!(index["manifests"], json!([]));
}

#[tokio::test]
async fn an_upstream_without_the_api_or_a_fallback_tag_gives_an_empty_index_never_a_404() {
    let fake = Fake::start().await;
    let subject = fake_image(&fake, "app", "v1");
    fake.set_referrers_status(Some(404));
    let w = Wharf::start(&fake.url(), "");
    let (status, h, index) = get_json(&w.url(&format!("/v2/app/referrers/{subject}"))).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], OCI_INDEX);
    assert_eq!(index, json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}));
    // The referrers API (404), then the fallback tag (404): two upstream calls, then none.
    let tag = format!("sha256-{}", &subject["sha256:".len()..]);
    assert_eq!(fake.count("GET", &format!("/manifests/{tag}")), 1);
    assert_eq!(
        w.metric("wharf_referrers_requests_total", &[("source", "local"), ("result", "miss")]).await,
        1.0
    );
    // An empty answer about a digest wharf does not hold is not kept (any client can make
    // digests up; the index must not grow with them): asked again next time.
    let (status, _, _) = get_json(&w.url(&format!("/v2/app/referrers/{subject}"))).await;
    assert_eq!(status, 200);
    assert_eq!(fake.count("GET", &format!("/manifests/{tag}")), 2);
    // Once the subject is cached, its (empty) answer is kept for referrers_ttl.
    let r = reqwest::get(w.url(&format!("/v2/app/manifests/{subject}"))).await.expect("GET manifest");
    assert_eq!(r.status(), 200);
    w.settled().await;
    for _ in 0..3 {
        let (status, _, index) = get_json(&w.url(&format!("/v2/app/referrers/{subject}"))).await;
        assert_eq!((status, index["manifests"].clone()), (200, json!([])));
    }
    assert_eq!(fake.count("GET", &format!("/manifests/{tag}")), 3);
    // A malformed digest is the client's error.
    let r = reqwest::get(w.url("/v2/app/referrers/sha256:xyz")).await.expect("GET");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["errors"][0]["code"], "DIGEST_INVALID");
}

#[tokio::test]
async fn an_off_host_redirect_of_the_referrers_api_falls_back_to_the_tag_schema() {
    // GHCR answers the referrers API with 303 to another host.
    let fake = Fake::start().await;
    let subject = fake_image(&fake, "app", "v1");
    fake.set_referrers_status(Some(303));
    let sig = desc(&format!("sha256:{}", "5".repeat(64)), SIG);
    let fallback = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sig]});
    let tag = format!("sha256-{}", &subject["sha256:".len()..]);
    fake.manifest("app", Some(&tag), OCI_INDEX, fallback.to_string().into_bytes());
    let w = Wharf::start(&fake.url(), "");
    let (status, _, index) = get_json(&w.url(&format!("/v2/app/referrers/{subject}"))).await;
    assert_eq!(status, 200);
    assert_eq!(index["manifests"], json!([sig]));
    assert_eq!(w.metric("wharf_referrers_requests_total", &[("source", "fallback_tag")]).await, 1.0);
    assert_eq!(fake.count("GET", "/rate-limited"), 0, "the off-host redirect is not followed");
}

#[tokio::test]
async fn sha512_blobs_and_manifests_are_verified_and_stored_under_blobs_sha512() {
    use sha2::{Digest as _, Sha512};
    let sha512 = |b: &[u8]| format!("sha512:{}", hex::encode(Sha512::digest(b)));
    let fake = Fake::start().await;
    let layer = noise("sha512-layer", 300_000);
    let d_layer = sha512(&layer);
    fake.blob_as(&d_layer, layer.clone());
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha512(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": d_layer, "size": layer.len()}]})
    .to_string()
    .into_bytes();
    let d_manifest = sha512(&manifest);
    fake.manifest_as("app", &d_manifest, OCI_MANIFEST, manifest.clone());
    // Wrong bytes under a sha512 digest.
    let bad = sha512(b"what it should be");
    fake.blob_as(&bad, noise("not it", 70_000));
    let w = Wharf::start(&fake.url(), "");

    let r = reqwest::get(w.url(&format!("/v2/app/manifests/{d_manifest}"))).await.expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d_manifest.as_str());
    assert_eq!(r.bytes().await.expect("body").to_vec(), manifest);
    let r = reqwest::get(w.url(&format!("/v2/app/blobs/{d_layer}"))).await.expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d_layer.as_str());
    assert_eq!(sha512(&r.bytes().await.expect("body")), d_layer);
    w.settled().await;
    let hex = &d_layer["sha512:".len()..];
    let data = w.data.join(format!("docker/registry/v2/blobs/sha512/{}/{hex}/data", &hex[..2]));
    assert_eq!(std::fs::read(&data).expect("stored under blobs/sha512"), layer);

    // From cache with the upstream gone: the blob and the manifest.
    fake.set_blob_mode(&d_layer, BlobMode::Wrong(vec![0; 10]));
    let r = reqwest::get(w.url(&format!("/v2/app/blobs/{d_layer}"))).await.expect("GET");
    assert_eq!(sha512(&r.bytes().await.expect("body")), d_layer);
    assert_eq!(fake.count("GET", &format!("/blobs/{d_layer}")), 1);

    // Bytes that do not match a sha512 digest are never served whole nor cached.
    let got = match reqwest::get(w.url(&format!("/v2/app/blobs/{bad}"))).await {
        Ok(r) if r.status() == 200 => r.bytes().await.map(|b| sha512(&b)).ok(),
        _ => None,
    };
    assert_ne!(got.as_deref(), Some(bad.as_str()));
    wait_until(20, "the mismatch to be counted", || async {
        (w.metric("wharf_digest_mismatch_total", &[]).await >= 1.0).then_some(())
    })
    .await;
    w.settled().await;
    assert!(!in_tree(&w.data, &bad));
    // An algorithm the image-spec does not register is refused.
    let r = reqwest::get(w.url(&format!("/v2/app/blobs/sha384:{}", "a".repeat(96)))).await.expect("GET");
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn a_manifest_of_a_media_type_wharf_does_not_know_is_served_as_the_upstream_sent_it() {
    let fake = Fake::start().await;
    let custom = "application/x-custom.manifest+json";
    // Nothing in the bytes says what they are: only the upstream's Content-Type does.
    let bytes = br#"{"schemaVersion":2,"parts":[]}"#.to_vec();
    let d = fake.manifest("odd/thing", Some("v1"), custom, bytes.clone());
    let w = Wharf::start(&fake.url(), "");
    for reference in ["v1", d.as_str()] {
        let r = reqwest::get(w.url(&format!("/v2/odd/thing/manifests/{reference}"))).await.expect("GET");
        assert_eq!(r.status(), 200, "{reference}");
        assert_eq!(r.headers()["content-type"], custom);
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
        assert_eq!(r.bytes().await.expect("body").to_vec(), bytes);
    }
    // From the cache, after a restart, with its media type.
    w.settled().await;
    let mut w = w;
    w.restart();
    fake.set_manifest_fault(common::fake::ManifestFault::Status(503));
    let r = reqwest::get(w.url(&format!("/v2/odd/thing/manifests/{d}"))).await.expect("GET");
    assert_eq!(r.headers()["content-type"], custom);
    assert_eq!(r.bytes().await.expect("body").to_vec(), bytes);
}

#[tokio::test]
async fn an_upstream_list_longer_than_referrers_max_pages_is_cut_there() {
    let fake = Fake::start().await;
    let subject = fake_image(&fake, "app", "v1");
    let list: Vec<Value> =
        (0..5).map(|i| desc(&format!("sha256:{}", i.to_string().repeat(64)), SIG)).collect();
    fake.set_referrers("app", &subject, list.clone());
    let w = Wharf::start(&fake.url(), "referrers_max_pages = 2");
    let (status, _, index) = get_json(&w.url(&format!("/v2/app/referrers/{subject}"))).await;
    assert_eq!(status, 200);
    assert_eq!(index["manifests"], Value::Array(list[..4].to_vec()), "two pages of two");
    assert_eq!(fake.seen().iter().filter(|s| s.path.contains("/referrers/")).count(), 2);
}
