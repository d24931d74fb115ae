//! Real parts end to end: a CNCF distribution registry as the upstream, seeded with skopeo
//! from OCI layouts this test writes, and skopeo pulling through the real wharf binary.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{layout_blobs, layout_top_digest, pull, Registry, Wharf};

/// Layer payload sizes per platform: small, medium, a couple of MiB.
const LAYERS: &[usize] = &[4 * 1024, 300 * 1024, 2 * 1024 * 1024];

fn history_digests(v: &serde_json::Value) -> Vec<String> {
    v["history"]
        .as_array()
        .expect("history array")
        .iter()
        .map(|e| e["digest"].as_str().expect("digest").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_image_pulls_byte_identical_and_history_follows_a_retag() {
    let mut reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let v1 = reg.seed(work.path(), "app-v1", "demo/app:latest", LAYERS);
    let w = Wharf::start(&reg.url(), "");

    // Cold pull through wharf: every digest is the upstream's.
    let out = work.path().join("out1");
    pull(&format!("{}/demo/app:latest", w.host()), &out).expect("cold pull through wharf");
    assert_eq!(layout_top_digest(&out), v1.index);
    assert_eq!(layout_blobs(&out), v1.blobs.iter().cloned().collect::<BTreeSet<_>>());
    let upstream_index = reqwest::Client::new()
        .head(format!("{}/v2/demo/app/manifests/latest", reg.url()))
        .header("accept", common::image::OCI_INDEX)
        .send()
        .await
        .expect("upstream HEAD");
    assert_eq!(upstream_index.headers()["docker-content-digest"], v1.index.as_str());
    assert!(
        w.metric("wharf_blob_requests_total", &[("result", "miss")]).await >= 6.0,
        "layers came through wharf"
    );

    // Warm pull: everything from cache, the tag revalidated.
    let out = work.path().join("out2");
    pull(&format!("{}/demo/app:latest", w.host()), &out).expect("warm pull");
    assert_eq!(layout_top_digest(&out), v1.index);
    assert!(w.metric("wharf_blob_requests_total", &[("result", "hit")]).await >= 6.0, "warm layers are hits");
    assert!(w.metric("wharf_manifest_requests_total", &[("result", "revalidated")]).await >= 1.0);

    // The tag moves upstream; wharf follows and keeps the history.
    let v2 = reg.seed(work.path(), "app-v2", "demo/app:latest", LAYERS);
    let out = work.path().join("out3");
    pull(&format!("{}/demo/app:latest", w.host()), &out).expect("pull after retag");
    assert_eq!(layout_top_digest(&out), v2.index, "the new index is served");
    assert_eq!(layout_blobs(&out), v2.blobs.iter().cloned().collect::<BTreeSet<_>>());
    assert!(w.metric("wharf_manifest_requests_total", &[("result", "refreshed")]).await >= 1.0);

    let h = w.json("/_wharf/history/demo/app/tags/latest").await;
    assert_eq!(h["repository"], "registry.test/demo/app");
    assert_eq!(history_digests(&h), vec![v2.index.clone(), v1.index.clone()], "newest first, both kept");
    assert_eq!(h["history"][0]["current"], true);
    assert_eq!(h["history"][1]["current"], false);
    let same = w.json("/_wharf/history/registry.test/demo/app/tags/latest").await;
    assert_eq!(history_digests(&same), history_digests(&h));

    // The CLI asks the running server (it holds the data dir).
    let out = w.cli(&["history", "demo/app:latest", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cli json");
    assert_eq!(history_digests(&cli), vec![v2.index.clone(), v1.index.clone()]);

    // The upstream goes away: the cached tag and digests are still served.
    reg.stop();
    let out = work.path().join("offline-tag");
    pull(&format!("{}/demo/app:latest", w.host()), &out).expect("offline pull by tag");
    assert_eq!(layout_top_digest(&out), v2.index);
    let out = work.path().join("offline-digest");
    pull(&format!("{}/demo/app@{}", w.host(), v1.index), &out).expect("offline pull of the old digest");
    assert_eq!(layout_top_digest(&out), v1.index);
    assert_eq!(layout_blobs(&out), v1.blobs.iter().cloned().collect::<BTreeSet<_>>());
    assert!(w.metric("wharf_stale_served_total", &[]).await >= 1.0);
    let never = common::pull(&format!("{}/demo/never:latest", w.host()), &work.path().join("never"));
    assert!(never.is_err(), "what was never cached cannot be served offline");

    // With the server stopped, the CLI reads the data dir itself.
    let mut w = w;
    assert!(w.stop().success(), "clean exit on SIGTERM");
    let out = w.cli(&["history", "demo/app:latest"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&v1.index) && text.contains(&v2.index), "{text}");
    assert!(text.lines().any(|l| l.contains(&v2.index) && l.contains("(current)")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_registry_serves_wharfs_data_dir() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "base-1", "demo/base:1.0", LAYERS);
    let mut w = Wharf::start(&reg.url(), "");
    pull(&format!("{}/demo/base:1.0", w.host()), &work.path().join("through")).expect("pull through wharf");
    assert!(w.stop().success(), "clean exit on SIGTERM");

    // A copy of the data dir is a registry root distribution itself can serve.
    let copy = work.path().join("copy");
    let st = Command::new("cp").arg("-a").arg(&w.data).arg(&copy).status().expect("cp");
    assert!(st.success());
    let stock = Registry::serve(&copy, true);
    let out = work.path().join("from-stock");
    pull(&format!("{}/registry.test/demo/base:1.0", stock.addr), &out)
        .expect("stock registry serves the cache");
    assert_eq!(layout_top_digest(&out), img.index);
    assert_eq!(layout_blobs(&out), img.blobs.iter().cloned().collect::<BTreeSet<_>>());

    // A lost index is rebuilt from the tree at start-up: the history is still there.
    // A temp file a crash left behind is cleaned away.
    std::fs::remove_dir_all(w.data.join("wharf/index")).expect("remove index");
    let leftover = w.data.join("wharf/tmp/12345-0");
    std::fs::write(&leftover, b"half a blob").expect("leftover");
    w.restart();
    assert!(!leftover.exists(), "temp files are cleaned at start-up");
    let h = w.json("/_wharf/history/demo/base/tags/1.0").await;
    assert_eq!(history_digests(&h), vec![img.index.clone()]);
    let r = reqwest::Client::new()
        .get(w.url(&format!("/v2/demo/base/manifests/{}", img.index)))
        .header("accept", common::image::OCI_INDEX)
        .send()
        .await
        .expect("cached index");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], common::image::OCI_INDEX);
}
