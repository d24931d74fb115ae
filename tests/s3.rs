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
    let (a, b, mut c) =
        (replica(&reg.url(), &weed, ""), replica(&reg.url(), &weed, ""), replica(&reg.url(), &weed, ""));

    let pa = work.path().join("pa");
    pull_all(&format!("{}/demo/app:latest", a.host()), &pa).expect("pull through A");
    assert_eq!(common::layout_top_digest(&pa), v1.index);
    a.settled().await;
    for blob in &v1.blobs {
        assert!(weed.exists(&blob_key(blob)).await, "{blob} is in the bucket");
    }
    ranges_come_from_the_bucket(&c, &pa).await;
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
    // What B streamed from the bucket is now in its local tier, verified.
    for blob in &v1.blobs {
        common::wait_for(10, &format!("B's local tier to hold {blob}"), || {
            common::in_tree(&b.data, blob).then_some(())
        });
    }
    assert!(common::damaged_blobs(&b.data).is_empty());
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

    // The secret key is never printed: not by check-config, not in any replica's log.
    let out = std::process::Command::new(common::wharf_bin())
        .arg("check-config")
        .arg(&a.config)
        .output()
        .expect("check-config");
    let effective = common::succeeded(&out, "check-config");
    assert!(effective.contains("\"secret_access_key\": \"<redacted>\""), "{effective}");
    for w in [&a, &b, &c] {
        assert!(!w.log().contains(SECRET_KEY));
    }
    assert!(!effective.contains(SECRET_KEY));

    // An export from a stopped replica with nothing on its own disk: the blobs come from
    // the bucket, verified, and the bundle holds the image whole.
    assert!(c.stop().success());
    std::fs::remove_dir_all(c.data.join("docker/registry/v2/blobs")).expect("empty C's local tier");
    let bundle = work.path().join("v1.tar");
    let out = c.cli(&["export", "-o", bundle.to_str().expect("utf-8"), &format!("demo/app@{}", v1.index)]);
    common::succeeded(&out, "export from the bucket");
    let listed = std::process::Command::new("tar").arg("tf").arg(&bundle).output().expect("tar");
    let names = String::from_utf8_lossy(&listed.stdout).into_owned();
    for blob in common::layout_blobs(&pa) {
        assert!(
            names.contains(&format!("blobs/sha256/{}", blob.trim_start_matches("sha256:"))),
            "{blob} in the bundle"
        );
    }
}

/// Ranged GETs through `w` of the largest blob of layout `pulled`, which only the bucket
/// holds: each answered 206 with the part (a stream cannot be cut by wharf: the store
/// sent just that part), or 416 past the end.
async fn ranges_come_from_the_bucket(w: &Wharf, pulled: &std::path::Path) {
    let blobs = pulled.join("blobs/sha256");
    let layer = common::layout_blobs(pulled)
        .into_iter()
        .max_by_key(|d| std::fs::metadata(blobs.join(d.trim_start_matches("sha256:"))).map_or(0, |m| m.len()))
        .expect("a blob");
    let whole = std::fs::read(blobs.join(layer.trim_start_matches("sha256:"))).expect("blob bytes");
    let len = whole.len();
    assert!(!common::in_tree(&w.data, &layer), "not on the replica's own disk");
    let client = reqwest::Client::new();
    let url = w.url(&format!("/v2/demo/app/blobs/{layer}"));
    for (range, first, last) in [
        ("bytes=100-199".to_owned(), 100, 199),
        ("bytes=-10".to_owned(), len - 10, len - 1),
        (format!("bytes={}-", len - 5), len - 5, len - 1),
    ] {
        let r = client.get(&url).header("range", &range).send().await.expect("ranged GET");
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(r.headers()["content-range"], format!("bytes {first}-{last}/{len}").as_str(), "{range}");
        assert_eq!(r.bytes().await.expect("body").as_ref(), &whole[first..=last], "{range}");
    }
    let r = client.get(&url).header("range", format!("bytes={len}-")).send().await.expect("ranged GET");
    assert_eq!(r.status(), 416, "a range past the end");
    assert!(!common::in_tree(&w.data, &layer), "a part is not kept as the blob");
}

async fn get_blob(w: &Wharf, repo: &str, digest: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(w.url(&format!("/v2/{repo}/blobs/{digest}"))).await.expect("GET blob");
    let status = r.status().as_u16();
    (status, r.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_herd_spread_over_three_replicas_fetches_a_cold_blob_from_the_upstream_once() {
    let reg = Registry::start();
    let weed = Weed::start();
    let digest = common::push::big_blob(&reg.url(), "demo/big", 7, 48 << 20).await;
    // Under a key prefix (distribution's rootdirectory), new to the bucket.
    let prefix = "prefix = \"team-a/cache\"";
    let replicas = [
        replica(&reg.url(), &weed, prefix),
        replica(&reg.url(), &weed, prefix),
        replica(&reg.url(), &weed, prefix),
    ];
    let mut clients = Vec::new();
    for i in 0..30 {
        let url = replicas[i % 3].url(&format!("/v2/demo/big/blobs/{digest}"));
        clients.push(tokio::spawn(async move {
            let r = reqwest::get(url).await.expect("GET");
            let status = r.status().as_u16();
            let body = r.bytes().await.expect("body");
            (status, common::image::sha256(&body))
        }));
    }
    for c in clients {
        let (status, got) = c.await.expect("client");
        assert_eq!(status, 200);
        assert_eq!(got, digest, "every client gets the blob's bytes");
    }
    let gets = reg.blob_gets(&digest);
    let mut waits = 0.0;
    let mut fills = 0.0;
    for w in &replicas {
        w.settled().await;
        waits += w.metric("wharf_replica_waits_total", &[]).await;
        fills += w.metric("wharf_replica_fills_total", &[]).await;
    }
    eprintln!("herd of 30 over 3 replicas: {gets} upstream GET(s); {waits} replica waits, {fills} fills from the bucket");
    assert_eq!(gets, 1, "one upstream GET for the herd across the replicas");
    assert!(fills >= 1.0, "the other replicas filled from the bucket");
    assert!(weed.exists(&format!("team-a/cache/{}", blob_key(&digest))).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_download_leaves_no_object_and_the_others_take_over() {
    let fake = common::fake::Fake::start().await;
    let weed = Weed::start();
    let small = fake.blob(common::image::noise("small", 100 * 1024));
    let big_bytes = common::image::noise("big", 4 << 20);
    let big = fake.blob(big_bytes.clone());
    fake.set_blob_mode(&big, common::fake::BlobMode::GatedAfter(1 << 20));
    // A short lease, so a dead replica's claim lapses within the test.
    let lease = "lease_ttl = \"2s\"";
    let mut a = replica(&fake.url(), &weed, lease);
    let (b, c) = (replica(&fake.url(), &weed, lease), replica(&fake.url(), &weed, lease));
    assert_eq!(get_blob(&a, "demo/app", &small).await, (200, common::image::noise("small", 100 * 1024)));
    a.settled().await;

    // A starts the big download and is killed with a megabyte of it spooled.
    let url = a.url(&format!("/v2/demo/app/blobs/{big}"));
    let stalled = tokio::spawn(async move {
        let r = reqwest::get(url).await?;
        r.bytes().await
    });
    common::wait_until(20, "A to fetch the blob", || async {
        (fake.count("GET", &format!("/blobs/{big}")) == 1).then_some(())
    })
    .await;
    a.kill9();
    assert!(stalled.await.expect("client task").is_err(), "A's client saw its transfer cut");
    assert!(!weed.exists(&blob_key(&big)).await, "no object under the blob's final key");
    assert!(
        weed.keys("_wharf/leases/").await.iter().any(|k| k.ends_with(&big.replace(':', "-"))),
        "A's claim is left behind"
    );

    // B and C serve what A cached; B fetches the big blob once A's claim lapses.
    assert_eq!(get_blob(&b, "demo/app", &small).await.0, 200);
    assert_eq!(get_blob(&c, "demo/app", &small).await.0, 200);
    fake.open_gate();
    let (status, body) = get_blob(&b, "demo/app", &big).await;
    assert_eq!(status, 200);
    assert_eq!(common::image::sha256(&body), big);
    b.settled().await;
    assert!(weed.exists(&blob_key(&big)).await);
    assert_eq!(get_blob(&c, "demo/app", &big).await, (200, big_bytes));
    assert_eq!(fake.count("GET", &format!("/blobs/{big}")), 2, "A's cut fetch and B's");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_gone_from_the_bucket_under_a_replica_that_knew_it_is_fetched_again_whole() {
    let reg = Registry::start();
    let weed = Weed::start();
    let bytes = common::image::noise("gone", 2 << 20);
    let digest = common::push::blob(&reg.url(), "demo/app", &bytes).await;
    // B keeps nothing on its own disk: each of its reads streams from the bucket.
    let (a, b) = (replica(&reg.url(), &weed, ""), replica(&reg.url(), &weed, "local_max_size = \"0\""));
    assert_eq!(get_blob(&a, "demo/app", &digest).await, (200, bytes.clone()));
    a.settled().await;
    assert_eq!(get_blob(&b, "demo/app", &digest).await, (200, bytes.clone()), "B streams it");

    // Another replica's eviction takes it out of the bucket after B's last sync.
    {
        use object_store::ObjectStore;
        weed.client().delete(&object_store::path::Path::from(blob_key(&digest))).await.expect("delete");
    }
    let (status, got) = get_blob(&b, "demo/app", &digest).await;
    assert_eq!(status, 200);
    assert_eq!(got.len(), bytes.len(), "whole, not cut short");
    assert_eq!(common::image::sha256(&got), digest);
    assert_eq!(reg.blob_gets(&digest), 2, "A's fetch and B's fetch again");
    b.settled().await;
    assert!(weed.exists(&blob_key(&digest)).await, "stored in the bucket again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_object_store_leaves_the_local_tier_served_and_answers_503_for_the_rest() {
    let reg = Registry::start();
    let mut weed = Weed::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed_with(work.path(), "v1", "demo/app:latest", LAYERS, false);
    // B keeps nothing on its own disk.
    let (mut a, b) = (replica(&reg.url(), &weed, ""), replica(&reg.url(), &weed, "local_max_size = \"0\""));
    let pa = work.path().join("pa");
    pull_all(&format!("{}/demo/app:latest", a.host()), &pa).expect("pull through A");
    a.settled().await;
    let layers: Vec<String> = img.blobs.iter().filter(|d| !d.is_empty()).cloned().collect();
    assert!(layers.len() >= 2, "{layers:?}");
    // B streams one blob from the bucket, so it knows that one is there.
    let (status, body) = get_blob(&b, "demo/app", &layers[0]).await;
    assert_eq!((status, common::image::sha256(&body)), (200, layers[0].clone()));

    weed.stop();
    // A has every blob in its local tier, and keeps serving them after a crash and a
    // restart while the store is down; B has none of them.
    for restarted in [false, true] {
        if restarted {
            a.kill9();
            a.start_again();
        }
        for d in &layers {
            let (status, body) = get_blob(&a, "demo/app", d).await;
            assert_eq!(status, 200, "A (restarted: {restarted}) serves {d} from its local tier");
            assert_eq!(&common::image::sha256(&body), d);
        }
    }
    // A replica that never reached the store has nothing to serve: it refuses to start,
    // naming the store.
    let fresh = tempfile::tempdir().expect("tempdir");
    let out = common::wharf_cli(&b.config, fresh.path(), &["serve", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success(), "a first start without the store fails");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("object store"), "{err}");
    // B answers 503 both for the blob it streamed before (not a 200 cut short) and for one
    // it never saw.
    for d in &layers[..2] {
        let r = reqwest::get(b.url(&format!("/v2/demo/app/blobs/{d}"))).await.expect("GET");
        assert_eq!(r.status(), 503, "{d}");
        let err: serde_json::Value = r.json().await.expect("OCI error JSON");
        assert_eq!(err["errors"][0]["code"], "UNAVAILABLE", "{err}");
        assert!(err["errors"][0]["message"].as_str().unwrap_or("").contains("object store"), "{err}");
    }
    assert!(b.metric("wharf_http_requests_total", &[("status", "503")]).await >= 2.0);

    // The store comes back: B pulls the image whole, and every object in the bucket holds
    // the bytes its key names.
    weed.start_again();
    let pb = work.path().join("pb");
    pull_all(&format!("{}/demo/app:latest", b.host()), &pb).expect("pull through B");
    assert_eq!(common::layout_top_digest(&pb), img.index);
    assert_eq!(common::layout_blobs(&pb), common::layout_blobs(&pa));
    let client = weed.client();
    for key in weed.keys("docker/registry/v2/blobs/").await {
        use object_store::ObjectStore;
        let bytes = client
            .get(&object_store::path::Path::from(key.as_str()))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        let hex = key.trim_end_matches("/data").rsplit('/').next().expect("hex");
        assert_eq!(common::image::sha256(&bytes), format!("sha256:{hex}"), "{key}");
    }
}

/// The Location of a blob GET through `w`, which must answer 307.
async fn presigned_location(w: &Wharf, digest: &str) -> String {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(w.url(&format!("/v2/library/demo/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 307);
    r.headers()["location"].to_str().expect("location").to_owned()
}

/// A GET of a presigned URL: its status and the sha256 of its body.
async fn get_presigned(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("presigned GET");
    let status = r.status().as_u16();
    (status, common::image::sha256(&r.bytes().await.expect("bytes")))
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_mode_is_followed_by_skopeo_containerd_and_the_docker_daemon() {
    let reg = Registry::start();
    let weed = Weed::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "redir", "library/demo:latest", LAYERS);
    let docker_io = |w: &Weed| {
        Wharf::with_config(&format!(
            "[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n{}",
            reg.url(),
            w.storage_toml("redirect = true\nredirect_ttl = \"2m\"")
        ))
    };
    let (a, b) = (docker_io(&weed), docker_io(&weed));
    // A caches the image (a miss streams through wharf); B then redirects every blob.
    let pa = work.path().join("pa");
    pull_all(&format!("{}/library/demo:latest", a.host()), &pa).expect("pull through A");
    a.settled().await;

    // B answers a presigned URL of the object, which the store serves.
    let loc = presigned_location(&b, &img.blobs[0]).await;
    assert!(loc.starts_with(&format!("{}/", weed.endpoint())) && loc.contains("X-Amz-Signature="), "{loc}");
    assert_eq!(get_presigned(&loc).await, (200, img.blobs[0].clone()));
    // With redirect_endpoint, the URL names the address clients reach the store at and
    // is signed for it (SeaweedFS checks the signature against the Host it is sent to).
    let public = format!("http://localhost:{}", weed.s3_port);
    let c = Wharf::with_config(&format!(
        "[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n{}",
        reg.url(),
        weed.storage_toml(&format!("redirect = true\nredirect_endpoint = \"{public}\""))
    ));
    let loc = presigned_location(&c, &img.blobs[0]).await;
    assert!(loc.starts_with(&format!("{public}/")), "{loc}");
    assert_eq!(get_presigned(&loc).await, (200, img.blobs[0].clone()), "signed for the public endpoint");
    drop(c);

    let pb = work.path().join("pb");
    pull_all(&format!("{}/library/demo:latest", b.host()), &pb).expect("skopeo through B");
    assert_eq!(common::layout_blobs(&pb), common::layout_blobs(&pa));

    let ctd = common::daemons::Containerd::start();
    let hosts = common::daemons::hosts_dir(work.path(), "docker.io", &b);
    let out = ctd.pull_amd64(&hosts, "docker.io/library/demo:latest");
    common::succeeded(&out, "ctr pull through B's redirects");
    let images = String::from_utf8_lossy(&ctd.ctr(&["images", "ls"]).stdout).into_owned();
    assert!(images.contains(&img.index), "{images}");
    drop(ctd);

    let d = common::docker::Dockerd::start(
        &work.path().join("docker"),
        &["--registry-mirror", &format!("http://{}", b.host()), "--insecure-registry", &b.host()],
    );
    let pulled = d.ok(&["pull", "demo:latest"]);
    assert!(pulled.contains(&img.index), "docker pulled through B's redirects: {pulled}");
    drop(d);

    // Every blob B answered was a redirect: the object store served the bytes.
    let redirects = b.metric("wharf_http_requests_total", &[("route", "blob"), ("status", "307")]).await;
    let streamed = b.metric("wharf_http_requests_total", &[("route", "blob"), ("status", "200")]).await;
    eprintln!("B: {redirects} blob redirects, {streamed} blobs streamed");
    assert!(redirects >= 3.0 * 2.0, "skopeo, ctr and docker each followed redirects: {redirects}");
    assert_eq!(streamed, 0.0, "no blob bytes went through B");
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_on_the_bucket_runs_on_one_replica_and_counts_every_replicas_accesses() {
    let reg = Registry::start();
    let weed = Weed::start();
    let work = tempfile::tempdir().expect("tempdir");
    reg.seed_with(work.path(), "old", "demo/old:1", &[300 * 1024], false);
    reg.seed_with(work.path(), "new", "demo/new:1", &[300 * 1024], false);
    // Each image: a 300 KiB layer per platform (two), so one image fits the cap, not two.
    let layers = |seed: &str| -> Vec<String> {
        common::layout_blobs(&work.path().join(seed))
            .into_iter()
            .filter(|d| {
                let hex = d.trim_start_matches("sha256:");
                let len =
                    std::fs::metadata(work.path().join(seed).join("blobs/sha256").join(hex)).map(|m| m.len());
                len.is_ok_and(|n| n > 200 * 1024)
            })
            .collect()
    };
    let (old_layers, new_layers) = (layers("old"), layers("new"));
    assert_eq!((old_layers.len(), new_layers.len()), (2, 2));
    let with_cap = || {
        Wharf::with_config(&format!(
            "[cache]\nmin_age = \"0s\"\nmax_size = \"1MiB\"\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n{}",
            reg.url(),
            weed.storage_toml("")
        ))
    };
    let (a, b) = (with_cap(), with_cap());
    // B caches `old` first; A caches `new` later; then B pulls `old` again (a hit on B
    // only). By what A saw, `old` is the least recently used; by every replica, `new`.
    pull_all(&format!("{}/demo/old:1", b.host()), &work.path().join("p1")).expect("pull old through B");
    b.settled().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // object times have 1 s resolution
    pull_all(&format!("{}/demo/new:1", a.host()), &work.path().join("p2")).expect("pull new through A");
    a.settled().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p3_start = common::unix_ms();
    pull_all(&format!("{}/demo/old:1", b.host()), &work.path().join("p3")).expect("pull old again through B");
    // B writes its accesses in batches every 10 s; one from before this pull may already
    // be there, so wait for the batch that holds this pull's.
    common::wait_until(30, "B's accesses of this pull in the bucket", || async {
        for key in weed.keys("_wharf/access/").await {
            let batch: serde_json::Value = serde_json::from_slice(&weed.get(&key).await?).ok()?;
            if old_layers.iter().all(|l| batch[l.as_str()].as_u64().is_some_and(|t| t >= p3_start)) {
                return Some(());
            }
        }
        None
    })
    .await;

    // Another replica holds the collection lease: A's pass is skipped, nothing removed.
    let lease = weed.client();
    {
        use object_store::ObjectStore;
        lease
            .put(&object_store::path::Path::from("_wharf/leases/gc"), "another".into())
            .await
            .expect("put lease");
    }
    let skipped: serde_json::Value =
        serde_json::from_str(&common::succeeded(&a.cli(&["gc", "--json"]), "gc while another collects"))
            .expect("json");
    assert!(skipped["skipped"].is_string(), "{skipped}");
    assert!(skipped["removed"].as_array().is_some_and(|r| r.is_empty()), "{skipped}");
    {
        use object_store::ObjectStore;
        lease.delete(&object_store::path::Path::from("_wharf/leases/gc")).await.expect("delete lease");
    }

    let report: serde_json::Value =
        serde_json::from_str(&common::succeeded(&a.cli(&["gc", "--json"]), "gc")).expect("json");
    let removed: Vec<&str> =
        report["removed"].as_array().expect("removed").iter().filter_map(|r| r["digest"].as_str()).collect();
    let gone: Vec<&String> = new_layers.iter().filter(|l| removed.contains(&l.as_str())).collect();
    assert!(!gone.is_empty(), "the least recently used anywhere goes: {report}");
    for l in gone {
        assert!(!weed.exists(&blob_key(l)).await, "evicted from the bucket");
    }
    for l in &old_layers {
        assert!(!removed.contains(&l.as_str()), "{report}");
        assert!(weed.exists(&blob_key(l)).await, "B's recent use kept it");
    }
    assert!(report["cache_bytes_before"].as_u64() > Some(1 << 20), "both images counted: {report}");
    assert!(report["cache_bytes_after"].as_u64().unwrap_or(u64::MAX) <= 1 << 20, "{report}");

    // The next collection drops the evicted blobs' times from the bucket's merge of
    // access times, which keeps those it still holds: it does not grow with every blob
    // ever cached.
    common::succeeded(&a.cli(&["gc", "--json"]), "gc again");
    let merged: serde_json::Value =
        serde_json::from_slice(&weed.get("_wharf/access/merged.json").await.expect("merged access times"))
            .expect("json");
    for l in &removed {
        assert!(merged.get(l).is_none(), "{l} evicted, its time dropped: {merged}");
    }
    for l in &old_layers {
        assert!(merged[l.as_str()].as_u64().is_some(), "{l} kept with its time: {merged}");
    }
}
