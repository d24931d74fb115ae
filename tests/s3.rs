//! Several replicas on one S3 bucket (SeaweedFS, real): what one cached the others serve
//! with the upstream gone, one upstream fetch for a herd spread over them, a killed
//! replica leaves no partial object, redirects to the object store, a stock distribution
//! reading the same bucket, and an object store that goes away.

mod common;

use std::time::Duration;

use common::s3::{blob_key, Weed, ACCESS_KEY, BUCKET, SECRET_KEY};
use common::{skopeo_try, Registry, Wharf};

const LAYERS: &[usize] = &[4096, 300 * 1024];

fn replica(reg_url: &str, weed: &Weed, extra_storage: &str) -> Wharf {
    Wharf::with_config(&format!(
        "[[upstreams]]\nname = \"registry.test\"\nurl = \"{reg_url}\"\ninsecure = true\nresponse_timeout = \"3s\"\n{}",
        weed.storage_toml(extra_storage)
    ))
}

fn pull_all(src: &str, out: &std::path::Path) -> Result<String, String> {
    skopeo_try(&[
        "copy",
        "-q",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{src}"),
        &format!("oci:{}:pulled", out.display()),
    ])
}

async fn history(w: &Wharf, name: &str, tag: &str) -> serde_json::Value {
    let v = w.json(&format!("/_wharf/history/{name}/tags/{tag}")).await;
    // Pulls are counted per replica (Prometheus adds them up); the rest is shared.
    let mut v = v;
    if let Some(entries) = v.get_mut("history").and_then(|h| h.as_array_mut()) {
        for e in entries {
            e.as_object_mut().map(|o| o.remove("pulls"));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_one_replica_cached_is_served_by_the_others_and_by_a_stock_registry_on_the_bucket() {
    let mut reg = Registry::start();
    let weed = Weed::start();
    let work = tempfile::tempdir().expect("tempdir");
    let v1 = reg.seed(work.path(), "v1", "demo/app:latest", LAYERS);
    let (a, b, c) =
        (replica(&reg.url(), &weed, ""), replica(&reg.url(), &weed, ""), replica(&reg.url(), &weed, ""));

    let pa = work.path().join("pa");
    pull_all(&format!("{}/demo/app:latest", a.host()), &pa).expect("pull through A");
    assert_eq!(common::layout_top_digest(&pa), v1.index);
    a.settled().await;
    for blob in &v1.blobs {
        assert!(weed.exists(&blob_key(blob)).await, "{blob} is in the bucket");
    }
    // The tag moves upstream; B sees it (one HEAD), A does not ask again.
    let v2 = reg.seed(work.path(), "v2", "demo/app:latest", LAYERS);
    let r = reqwest::Client::new()
        .head(b.url("/v2/demo/app/manifests/latest"))
        .header("accept", common::image::OCI_INDEX)
        .send()
        .await
        .expect("HEAD through B");
    assert_eq!(r.headers()["docker-content-digest"], v2.index.as_str());

    // The upstream goes away: B and C serve v1, the newest image the bucket holds whole,
    // with every blob, without having pulled anything themselves.
    reg.stop();
    for (w, name) in [(&b, "pb"), (&c, "pc")] {
        let out = work.path().join(name);
        pull_all(&format!("{}/demo/app:latest", w.host()), &out).expect("pull with the upstream down");
        assert_eq!(common::layout_top_digest(&out), v1.index, "{name}");
        assert_eq!(common::layout_blobs(&out), common::layout_blobs(&pa), "{name}: the same blobs");
    }
    // The tag's history is the bucket's: the same on every replica.
    let ha = history(&a, "demo/app", "latest").await;
    assert_eq!(ha["history"].as_array().map(|h| h.len()), Some(2), "{ha}");
    assert_eq!(ha["history"][0]["digest"], v2.index.as_str());
    assert_eq!(ha, history(&b, "demo/app", "latest").await);
    assert_eq!(ha, history(&c, "demo/app", "latest").await);

    // A stock distribution with its S3 driver on the bucket serves the image.
    let dir = work.path().join("dist");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let port = common::free_port();
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  s3:\n    accesskey: {ACCESS_KEY}\n    secretkey: {SECRET_KEY}\n    region: us-east-1\n    regionendpoint: {}\n    bucket: {BUCKET}\n    secure: false\n    v4auth: true\n    forcepathstyle: true\n  maintenance:\n    readonly:\n      enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: test\n",
            weed.endpoint()
        ),
    )
    .expect("config");
    let mut dist = std::process::Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        // Its AWS SDK refuses a custom CA bundle with its own transport; none is needed.
        .env_remove("AWS_CA_BUNDLE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).expect("log"))
        .spawn()
        .expect("docker-registry");
    common::reap_with_me(dist.id());
    let out = work.path().join("pdist");
    // v1's images are whole in the bucket (v2's index is there, not its images).
    let src = format!("127.0.0.1:{port}/registry.test/demo/app@{}", v1.index);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = Err(String::new());
    while std::time::Instant::now() < deadline {
        last = pull_all(&src, &out);
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(e) = last {
        panic!(
            "distribution on the bucket: {e}\n{}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
    }
    assert_eq!(common::layout_top_digest(&out), v1.index);
    assert_eq!(common::layout_blobs(&out), common::layout_blobs(&pa));
    common::stop_child(&mut dist);
}
