//! The distribution-spec's pull and content-discovery requests (spec.md "Endpoints":
//! end-1, end-2, end-3, end-8a/b, end-12a/b, and the error-code format), each asked of wharf
//! in front of a real distribution 2.8 upstream, with the status, headers and error codes the
//! spec and its conformance suite expect.

mod common;

use common::image::{sha256, OCI_INDEX, OCI_MANIFEST};
use common::{push, Registry, Wharf};
use serde_json::{json, Value};

const ANNOTATION: &str = "org.opencontainers.conformance.test";
const TYPE_A: &str = "application/vnd.example.type-a";
const TYPE_B: &str = "application/vnd.example.type-b";

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

async fn req(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = client().request(method.parse().expect("method"), url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let (status, h) = (resp.status().as_u16(), resp.headers().clone());
    (status, h, resp.bytes().await.expect("body").to_vec())
}

fn code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("OCI error JSON: {}", String::from_utf8_lossy(body)));
    assert!(v["errors"][0]["message"].is_string(), "errors carry a message");
    v["errors"][0]["code"].as_str().expect("code").to_owned()
}

#[tokio::test]
async fn pull_and_content_discovery_requests_answer_as_the_spec_says() {
    let reg = Registry::start();
    let u = reg.url();
    let repo = "conformance/app";
    // An image (config + layer + manifest under two tags), and two referrers of it.
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_d = push::blob(&u, repo, config).await;
    let layer: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let layer_d = push::blob(&u, repo, &layer).await;
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d, "size": layer.len()}]})
    .to_string()
    .into_bytes();
    let manifest_d = push::manifest(&u, repo, "tagtest0", OCI_MANIFEST, &manifest).await;
    push::manifest(&u, repo, "tagtest1", OCI_MANIFEST, &manifest).await;
    push::blob(&u, repo, b"{}").await;
    let mut descriptors = Vec::new();
    for (i, t) in [TYPE_A, TYPE_B].iter().enumerate() {
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": t,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": manifest_d, "size": manifest.len()},
            "annotations": {ANNOTATION: format!("value-{i}")}})
        .to_string()
        .into_bytes();
        let d = push::manifest(&u, repo, &sha256(&m), OCI_MANIFEST, &m).await;
        descriptors.push(json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "artifactType": t,
            "annotations": {ANNOTATION: format!("value-{i}")}}));
    }
    let fallback = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors});
    let hex = manifest_d.trim_start_matches("sha256:");
    push::manifest(&u, repo, &format!("sha256-{hex}"), OCI_INDEX, fallback.to_string().as_bytes()).await;
    let w = Wharf::start(&u, "");
    let v2 = |p: &str| w.url(&format!("/v2/{repo}/{p}"));
    let dummy = sha256(b"hello world");
    let oci = [("accept", OCI_MANIFEST)];

    // end-1: the API exists.
    let (s, h, _) = req("GET", &w.url("/v2/"), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");

    // end-3: manifests by digest and by tag, HEAD and GET.
    for reference in [manifest_d.as_str(), "tagtest0"] {
        let (s, h, body) = req("HEAD", &v2(&format!("manifests/{reference}")), &oci).await;
        assert_eq!((s, body.len()), (200, 0), "HEAD manifest {reference}");
        assert_eq!(h["docker-content-digest"], manifest_d.as_str());
        assert_eq!(h["content-type"], OCI_MANIFEST);
        assert_eq!(h["content-length"], manifest.len().to_string().as_str());
        let (s, h, body) = req("GET", &v2(&format!("manifests/{reference}")), &oci).await;
        assert_eq!(s, 200, "GET manifest {reference}");
        assert_eq!(body, manifest);
        assert_eq!(h["docker-content-digest"], manifest_d.as_str());
    }
    for reference in [".INVALID_MANIFEST_NAME", "nosuchtag", dummy.as_str()] {
        let (s, _, _) = req("HEAD", &v2(&format!("manifests/{reference}")), &oci).await;
        assert_eq!(s, 404, "HEAD manifest {reference}");
        let (s, _, body) = req("GET", &v2(&format!("manifests/{reference}")), &oci).await;
        assert_eq!((s, code(&body).as_str()), (404, "MANIFEST_UNKNOWN"), "GET manifest {reference}");
    }

    // end-2: blobs, HEAD and GET, whole and ranged; unknown ones are 404 BLOB_UNKNOWN.
    let (s, h, body) = req("HEAD", &v2(&format!("blobs/{layer_d}")), &[]).await;
    assert_eq!((s, body.len()), (200, 0));
    assert_eq!(h["content-length"], layer.len().to_string().as_str());
    assert_eq!(h["docker-content-digest"], layer_d.as_str());
    let (s, h, body) = req("GET", &v2(&format!("blobs/{layer_d}")), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(body, layer);
    assert_eq!(h["docker-content-digest"], layer_d.as_str());
    let (s, h, body) = req("GET", &v2(&format!("blobs/{layer_d}")), &[("range", "bytes=10-19")]).await;
    assert_eq!(s, 206);
    assert_eq!(h["content-range"], format!("bytes 10-19/{}", layer.len()).as_str());
    assert_eq!(body, layer[10..20].to_vec());
    let (s, _, body) = req("GET", &v2(&format!("blobs/{config_d}")), &[]).await;
    assert_eq!((s, body.as_slice()), (200, config.as_slice()));
    let (s, _, _) = req("HEAD", &v2(&format!("blobs/{dummy}")), &[]).await;
    assert_eq!(s, 404);
    let (s, _, body) = req("GET", &v2(&format!("blobs/{dummy}")), &[]).await;
    assert_eq!((s, code(&body).as_str()), (404, "BLOB_UNKNOWN"));

    // end-8a/8b: tags, whole and in pages with a Link; an unknown repository is NAME_UNKNOWN.
    let (s, _, body) = req("GET", &v2("tags/list"), &[]).await;
    assert_eq!(s, 200);
    let tags: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(tags["name"], repo);
    let all: Vec<&str> = tags["tags"].as_array().expect("tags").iter().filter_map(|t| t.as_str()).collect();
    assert!(all.contains(&"tagtest0") && all.contains(&"tagtest1"), "{all:?}");
    let (s, h, body) = req("GET", &v2("tags/list?n=1"), &[]).await;
    assert_eq!(s, 200);
    let first: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(first["tags"].as_array().map(Vec::len), Some(1));
    assert!(h["link"].to_str().expect("link").contains("rel=\"next\""));
    let last = first["tags"][0].as_str().expect("tag");
    let (_, _, body) = req("GET", &v2(&format!("tags/list?n=1&last={last}")), &[]).await;
    let next: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(next["tags"].as_array().map(Vec::len), Some(1));
    assert!(next["tags"][0].as_str().expect("tag") > last, "tags after last, in lexical order");
    let (s, _, body) = req("GET", &w.url("/v2/conformance/nosuchrepo/tags/list"), &[]).await;
    assert_eq!((s, code(&body).as_str()), (404, "NAME_UNKNOWN"));

    // end-12a/12b: referrers, always an index; filtered with the header that says so.
    let (s, h, body) = req("GET", &v2(&format!("referrers/{manifest_d}")), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], OCI_INDEX);
    let index: Value = serde_json::from_slice(&body).expect("index");
    assert_eq!(index["manifests"], Value::Array(descriptors.clone()));
    let (s, h, body) = req("GET", &v2(&format!("referrers/{manifest_d}?artifactType={TYPE_A}")), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["oci-filters-applied"], "artifactType");
    let index: Value = serde_json::from_slice(&body).expect("index");
    assert_eq!(index["manifests"], json!([descriptors[0]]));
    let (s, h, body) = req("GET", &v2(&format!("referrers/{dummy}")), &[]).await;
    assert_eq!((s, h["content-type"].to_str().expect("ct")), (200, OCI_INDEX));
    let index: Value = serde_json::from_slice(&body).expect("index");
    assert_eq!(index["manifests"], json!([]));
    let (s, _, body) = req("GET", &v2("referrers/sha256:totallywrong"), &[]).await;
    assert_eq!((s, code(&body).as_str()), (400, "DIGEST_INVALID"));

    // Error codes: a bad request has an OCI error body; writes are unsupported here.
    let (s, _, body) =
        req("PUT", &v2("manifests/sha256:totallywrong"), &[("content-type", OCI_MANIFEST)]).await;
    assert_eq!(s, 400);
    assert!(["DIGEST_INVALID", "MANIFEST_INVALID", "TAG_INVALID"].contains(&code(&body).as_str()));
    let (s, _, body) = req("GET", &w.url("/v2/Conformance/App/tags/list"), &[]).await;
    assert_eq!((s, code(&body).as_str()), (400, "NAME_INVALID"));
    for (method, path) in [
        ("DELETE", format!("manifests/{manifest_d}")),
        ("DELETE", format!("blobs/{layer_d}")),
        ("POST", "blobs/uploads/".to_owned()),
        ("PUT", "manifests/tagtest0".to_owned()),
    ] {
        let (s, _, body) = req(method, &v2(&path), &[]).await;
        assert_eq!((s, code(&body).as_str()), (405, "UNSUPPORTED"), "{method} {path}");
    }
}
