//! Without the upstream: a tag resolves to the newest digest of its history that the cache
//! holds whole (not blindly to the last one a HEAD saw), and an `offline` mirror never
//! contacts its upstream and says so when it lacks something.

mod common;

use common::{skopeo_try, Registry, Wharf};

const LAYERS: &[usize] = &[2048, 64 * 1024];

const INDEX_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A single-platform pull (linux/amd64), as a node does it: the index, one image, its blobs.
fn pull_amd64(src: &str, out: &std::path::Path) -> Result<String, String> {
    skopeo_try(&[
        "copy",
        "-q",
        "--override-os",
        "linux",
        "--override-arch",
        "amd64",
        "--src-tls-verify=false",
        &format!("docker://{src}"),
        &format!("oci:{}:pulled", out.display()),
    ])
}

async fn manifest(w: &Wharf, reference: &str, method: reqwest::Method) -> reqwest::Response {
    reqwest::Client::new()
        .request(method, w.url(&format!("/v2/demo/app/manifests/{reference}")))
        .header("accept", INDEX_ACCEPT)
        .send()
        .await
        .expect("manifest request")
}

fn digest_of(r: &reqwest::Response) -> String {
    r.headers().get("docker-content-digest").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_falls_back_to_the_newest_image_the_cache_holds_whole_and_offline_never_asks_upstream() {
    let mut reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let v1 = reg.seed(work.path(), "v1", "demo/app:latest", LAYERS);
    let data = work.path().join("cache");
    let upstream = |url: &str, offline: bool| {
        format!("[[upstreams]]\nname = \"registry.test\"\nurl = \"{url}\"\ninsecure = true\noffline = {offline}\n")
    };
    let mut w = Wharf::with_config_at(&upstream(&reg.url(), false), Some(data.clone()));

    // A node pulls v1; the tag then moves upstream and an update checker only HEADs it:
    // wharf learns v2 and caches its index, none of its images.
    pull_amd64(&format!("{}/demo/app:latest", w.host()), &work.path().join("p1")).expect("pull v1");
    let v2 = reg.seed(work.path(), "v2", "demo/app:latest", LAYERS);
    let head = manifest(&w, "latest", reqwest::Method::HEAD).await;
    assert_eq!(head.status(), 200);
    assert_eq!(digest_of(&head), v2.index, "the HEAD saw the move");

    // The upstream goes away: the tag answers v1, whole in the cache, and pulls work.
    reg.stop();
    let r = manifest(&w, "latest", reqwest::Method::GET).await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r), v1.index, "the newest image the cache holds whole");
    let p2 = work.path().join("p2");
    pull_amd64(&format!("{}/demo/app:latest", w.host()), &p2).expect("pull with the upstream down");
    assert_eq!(common::layout_top_digest(&p2), v1.images[0], "v1's linux/amd64 image");
    let fallbacks = [("upstream", "registry.test"), ("reason", "unreachable")];
    assert!(w.metric("wharf_tag_fallbacks_total", &fallbacks).await >= 2.0);
    assert!(w.metric("wharf_stale_served_total", &[("upstream", "registry.test")]).await >= 2.0);
    // By digest, v2's index is still served: it is cached.
    assert_eq!(manifest(&w, &v2.index, reqwest::Method::GET).await.status(), 200);
    assert!(w.stop().success());

    // Offline, with the registry running again (and now serving v2 whole): never asked.
    let reg = Registry::serve(&reg.root, true);
    let mut w = Wharf::with_config_at(&upstream(&reg.url(), true), Some(data.clone()));
    let r = manifest(&w, "latest", reqwest::Method::GET).await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r), v1.index);
    let p3 = work.path().join("p3");
    pull_amd64(&format!("{}/demo/app:latest", w.host()), &p3).expect("pull offline");
    assert_eq!(common::layout_top_digest(&p3), v1.images[0]);
    let offline = [("upstream", "registry.test"), ("reason", "offline")];
    assert!(w.metric("wharf_tag_fallbacks_total", &offline).await >= 1.0);
    assert!(w.metric("wharf_manifest_requests_total", &[("result", "offline")]).await >= 1.0);

    // What it lacks: 404 with an OCI error that says the mirror is offline.
    for (path, code) in [
        ("/v2/demo/app/manifests/other".to_owned(), "MANIFEST_UNKNOWN"),
        (format!("/v2/demo/app/manifests/{}", v2.images[0]), "MANIFEST_UNKNOWN"),
        (
            format!(
                "/v2/demo/app/blobs/{}",
                v2.blobs.iter().find(|b| !v1.blobs.contains(b)).expect("new blob")
            ),
            "BLOB_UNKNOWN",
        ),
        ("/v2/demo/other/tags/list".to_owned(), "NAME_UNKNOWN"),
    ] {
        let r = reqwest::get(w.url(&path)).await.expect("request");
        assert_eq!(r.status(), 404, "{path}");
        let v: serde_json::Value = r.json().await.expect("OCI error JSON");
        assert_eq!(v["errors"][0]["code"], code, "{path}");
        let message = v["errors"][0]["message"].as_str().expect("message");
        assert!(message.contains("offline"), "{path}: {message}");
    }
    let tags: serde_json::Value =
        reqwest::get(w.url("/v2/demo/app/tags/list")).await.expect("tags").json().await.expect("json");
    assert_eq!(tags["tags"], serde_json::json!(["latest"]), "tags from the cache");

    assert_eq!(reg.requests("/v2/demo/"), 0, "the offline mirror sent the registry nothing");
    assert_eq!(w.metric("wharf_upstream_requests_total", &[("upstream", "registry.test")]).await, 0.0);
    assert!(w.stop().success());
}
