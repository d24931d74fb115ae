//! Faults a real registry will not produce on demand, injected by an in-test upstream,
//! against the real wharf binary.

mod common;

use common::fake::{BlobMode, Fake, ManifestFault};
use common::image::{noise, sha256, OCI_INDEX, OCI_MANIFEST};
use common::{tree_listing, wait_until, Wharf};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// GETs a URL and reads the whole body; `Err` when the transfer was cut.
async fn get_all(url: &str) -> Result<(StatusCode, Vec<u8>), String> {
    let resp = client().get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    Ok((status, body.to_vec()))
}

/// The OCI error code of an error response.
async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.expect("OCI error JSON");
    v["errors"][0]["code"].as_str().expect("code").to_owned()
}

/// Sends a request line byte for byte (no client-side path normalisation).
async fn raw(w: &Wharf, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(w.addr).await.expect("connect");
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A fake upstream holding `app:latest`, a small image manifest; returns its digest too.
async fn fake_with_latest() -> (Fake, String) {
    let fake = Fake::start().await;
    let m = fake.manifest(
        "app",
        Some("latest"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[]}"#.to_vec(),
    );
    (fake, m)
}

fn blob_file(w: &Wharf, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    w.data.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
}

/// Waits until blob `digest` is in the store and its download is over (links written):
/// clients get a blob's last byte once it is verified, and it is stored after.
async fn stored(w: &Wharf, digest: &str) {
    wait_until(10, "the blob stored", || async { blob_file(w, digest).exists().then_some(()) }).await;
    w.settled().await;
}

fn spool_files(w: &Wharf) -> usize {
    std::fs::read_dir(w.data.join("wharf/tmp")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_bytes_are_never_cached_or_served_complete() {
    let fake = Fake::start().await;
    let good = noise("wrong", 300_000);
    let d = fake.blob(good.clone());
    let mut evil = good.clone();
    evil[250_000] ^= 0xff;
    // The client is already reading when the bad bytes stream in, so it would see them all
    // unless wharf holds the tail back until the digest is checked.
    fake.set_blob_mode(&d, BlobMode::WrongGatedAfter(evil, 64 * 1024));
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/blobs/{d}"));
    let client_task = tokio::spawn({
        let url = url.clone();
        async move { get_all(&url).await }
    });
    wait_until(20, "the client to be streaming", || async {
        (w.metric("wharf_blob_requests_total", &[("result", "miss")]).await >= 1.0).then_some(())
    })
    .await;
    fake.open_gate();
    // Either the transfer is cut (Err) or it must not look complete.
    if let Ok((status, body)) = client_task.await.expect("task") {
        assert!(!(status.is_success() && body.len() == good.len()), "a bad blob must never arrive complete");
    }
    assert!(!blob_file(&w, &d).exists(), "unverified bytes were cached");
    assert_eq!(w.metric("wharf_digest_mismatch_total", &[]).await, 1.0);
    assert_eq!(spool_files(&w), 0, "the spool file is deleted");

    fake.set_blob_mode(&d, BlobMode::Normal);
    let (status, body) = get_all(&url).await.expect("good bytes now");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), d);
    stored(&w, &d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_blob_is_fetched_once_for_concurrent_clients() {
    let fake = Fake::start().await;
    let bytes = noise("herd", 4 << 20);
    let d = fake.blob(bytes);
    fake.set_blob_mode(&d, BlobMode::GatedAfter(64 * 1024));
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/blobs/{d}"));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let url = url.clone();
        clients.push(tokio::spawn(async move { get_all(&url).await }));
    }
    // Release the upstream only once every client has joined the one download.
    wait_until(30, "32 clients on the blob", || async {
        (w.metric("wharf_coalesced_requests_total", &[]).await >= 31.0).then_some(())
    })
    .await;
    fake.open_gate();
    for c in clients {
        let (status, body) = c.await.expect("task").expect("complete transfer");
        assert_eq!(status, 200);
        assert_eq!(sha256(&body), d, "every client gets the right bytes");
    }
    assert_eq!(fake.count("GET", &d), 1, "exactly one upstream GET");
    assert_eq!(w.metric("wharf_blob_requests_total", &[("result", "miss")]).await, 1.0);
    assert_eq!(w.metric("wharf_blob_requests_total", &[("result", "joined")]).await, 31.0);
    stored(&w, &d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tag_revalidations_share_one_upstream_head() {
    let (fake, m) = fake_with_latest().await;
    let w = Wharf::start(&fake.url(), "");
    let url = w.url("/v2/app/manifests/latest");
    assert_eq!(get_all(&url).await.expect("warm").0, 200);
    fake.set_manifest_fault(ManifestFault::GatedHead);
    let heads_before = fake.count("HEAD", "/manifests/latest");
    let mut clients = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        clients.push(tokio::spawn(async move { client().get(&url).send().await }));
    }
    wait_until(30, "16 revalidations to meet", || async {
        (w.metric("wharf_coalesced_requests_total", &[]).await >= 15.0).then_some(())
    })
    .await;
    fake.open_gate();
    for c in clients {
        let r = c.await.expect("task").expect("response");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], m.as_str());
    }
    assert_eq!(fake.count("HEAD", "/manifests/latest") - heads_before, 1, "one upstream HEAD for 16 clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_fetched_cached_and_refreshed() {
    let fake = Fake::start().await;
    fake.require_tokens(60);
    fake.manifest(
        "org/app",
        Some("1"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[],"n":1}"#.to_vec(),
    );
    fake.manifest(
        "org/app",
        Some("2"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[],"n":2}"#.to_vec(),
    );
    let w = Wharf::start(&fake.url(), "");
    assert_eq!(get_all(&w.url("/v2/org/app/manifests/1")).await.expect("get").0, 200);
    assert_eq!(fake.tokens_issued(), 1);
    assert_eq!(get_all(&w.url("/v2/org/app/manifests/2")).await.expect("get").0, 200);
    assert_eq!(fake.tokens_issued(), 1, "the token is reused for the same repository");
    let token_req = fake.seen().into_iter().find(|s| s.path == "/token").expect("token request");
    assert!(token_req.authorization.is_none(), "anonymous token request");

    fake.revoke_tokens();
    assert_eq!(get_all(&w.url("/v2/org/app/manifests/1")).await.expect("get").0, 200);
    assert_eq!(fake.tokens_issued(), 2, "a refused token is replaced");

    // A token that expires is replaced without the upstream having to refuse it.
    fake.require_tokens(1);
    fake.revoke_tokens();
    assert_eq!(get_all(&w.url("/v2/org/app/manifests/1")).await.expect("get").0, 200);
    let issued = fake.tokens_issued();
    let refused_before = fake.count("HEAD", "/manifests/1");
    wait_until(15, "the short-lived token to be renewed", || async {
        assert_eq!(get_all(&w.url("/v2/org/app/manifests/1")).await.expect("get").0, 200);
        (fake.tokens_issued() > issued).then_some(())
    })
    .await;
    let heads =
        fake.seen().into_iter().filter(|s| s.method == "HEAD" && s.path.ends_with("/manifests/1")).count();
    assert!(heads > refused_before);
    assert!(!w.log().contains("tok-"), "tokens never reach the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_blob_gets_no_authorization_header() {
    let fake = Fake::start().await;
    fake.require_tokens(60);
    let bytes = noise("cdn", 100_000);
    let d = fake.blob(bytes);
    fake.set_blob_mode(&d, BlobMode::RedirectToLocalhost);
    let w = Wharf::start(&fake.url(), "");
    let (status, body) = get_all(&w.url(&format!("/v2/org/app/blobs/{d}"))).await.expect("blob");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), d);
    let seen = fake.seen();
    let registry = seen
        .iter()
        .find(|s| s.path.ends_with(&format!("/blobs/{d}")) && s.authorization.is_some())
        .expect("authorized blob GET");
    assert!(registry.authorization.as_deref().is_some_and(|a| a.starts_with("Bearer ")));
    let cdn = seen.iter().find(|s| s.path == format!("/cdn/{d}")).expect("followed the redirect");
    assert!(cdn.host.starts_with("localhost"), "went to the other host");
    assert_eq!(cdn.authorization, None, "no upstream credentials sent to another host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_is_served_stale_when_upstream_fails() {
    let (fake, m) = fake_with_latest().await;
    fake.manifest(
        "app",
        Some("never-cached"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[],"x":1}"#.to_vec(),
    );
    let w = Wharf::start(&fake.url(), "response_timeout = \"1s\"");
    let url = w.url("/v2/app/manifests/latest");
    assert_eq!(get_all(&url).await.expect("warm").0, 200);

    for (i, fault) in [
        ManifestFault::Status(429),
        ManifestFault::Status(500),
        ManifestFault::Status(503),
        ManifestFault::Stall,
    ]
    .into_iter()
    .enumerate()
    {
        fake.set_manifest_fault(fault.clone());
        let r = client().get(&url).send().await.expect("response");
        assert_eq!(r.status(), 200, "{fault:?}: stale served");
        assert_eq!(r.headers()["docker-content-digest"], m.as_str());
        assert_eq!(w.metric("wharf_stale_served_total", &[]).await, (i + 1) as f64, "{fault:?} counted");
    }
    assert!(w.log().contains("serving the last known digest"));

    fake.set_manifest_fault(ManifestFault::Status(429));
    let r = client().get(w.url("/v2/app/manifests/never-cached")).send().await.expect("response");
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    fake.set_manifest_fault(ManifestFault::Status(500));
    let r = client().get(w.url("/v2/app/manifests/never-cached")).send().await.expect("response");
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");

    fake.set_manifest_fault(ManifestFault::None);
    let r = client().get(w.url("/v2/app/manifests/missing")).send().await.expect("response");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_mid_blob_leaves_nothing_cached() {
    let fake = Fake::start().await;
    let bytes = noise("cut", 1 << 20);
    let d = fake.blob(bytes);
    fake.set_blob_mode(&d, BlobMode::CutAfter(300_000));
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/blobs/{d}"));
    // Either the transfer is cut (Err) or it must not look complete.
    if let Ok((status, body)) = get_all(&url).await {
        assert!(!(status.is_success() && body.len() == 1 << 20), "a cut blob must not arrive complete");
    }
    assert!(!blob_file(&w, &d).exists());
    assert_eq!(spool_files(&w), 0);
    fake.set_blob_mode(&d, BlobMode::Normal);
    let (status, body) = get_all(&url).await.expect("retry works");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), d);
    assert_eq!(fake.count("GET", &d), 2, "the cut download was not remembered as good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_on_cached_blobs() {
    let fake = Fake::start().await;
    let bytes = noise("range", 1000);
    let d = fake.blob(bytes.clone());
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/blobs/{d}"));
    assert_eq!(get_all(&url).await.expect("warm").1, bytes);

    let r = client().get(&url).header("range", "bytes=10-19").send().await.expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/1000");
    assert_eq!(r.headers()["content-length"], "10");
    assert_eq!(r.bytes().await.expect("body").to_vec(), bytes[10..20].to_vec());

    let r = client().get(&url).header("range", "bytes=-5").send().await.expect("suffix");
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.expect("body").to_vec(), bytes[995..].to_vec());

    let r = client().get(&url).header("range", "bytes=1000-").send().await.expect("beyond");
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000");

    let r = client().head(&url).send().await.expect("head");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(r.headers()["etag"], format!("\"{d}\"").as_str());
    assert_eq!(fake.count("GET", &d), 1, "ranges are served from cache");
}

/// Stored blobs over 64 KiB go out as slices of a file mapping, sent with sendfile on
/// plain HTTP/1 and copied on HTTP/2: byte-exact across chunk boundaries, at unaligned
/// offsets, and with requests before and after on the same keep-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_cached_blobs_are_byte_exact_over_http1_and_http2() {
    let fake = Fake::start().await;
    let bytes = noise("large", 9 * 1024 * 1024 + 4097);
    let d = fake.blob(bytes.clone());
    let w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/blobs/{d}"));
    assert_eq!(get_all(&url).await.expect("fill").1, bytes);

    let h1 = reqwest::Client::builder().http1_only().pool_max_idle_per_host(1).build().expect("client");
    for _ in 0..2 {
        let r = h1.get(&url).send().await.expect("cached GET");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], bytes.len().to_string().as_str());
        assert_eq!(sha256(&r.bytes().await.expect("body")), d);
        let r = h1.get(w.url("/v2/")).send().await.expect("small request on the same connection");
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.expect("body"), "{}");
    }
    // A range starting off a page boundary and crossing a 4 MiB chunk boundary.
    let (a, b) = (4 * 1024 * 1024 - 1001, 8 * 1024 * 1024 + 333);
    let r = h1.get(&url).header("range", format!("bytes={a}-{b}")).send().await.expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.expect("body").to_vec(), bytes[a..=b].to_vec());
    // Two at once on two connections, and over HTTP/2.
    let (x, y) = tokio::join!(get_all(&url), get_all(&url));
    assert_eq!(sha256(&x.expect("first").1), d);
    assert_eq!(sha256(&y.expect("second").1), d);
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    let r = h2.get(&url).send().await.expect("h2 GET");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(sha256(&r.bytes().await.expect("body")), d);
    assert_eq!(fake.count("GET", &d), 1, "served from cache");
}

/// A downloaded blob is made durable and moved into the store once the clients streaming
/// it have their bytes; meanwhile it is served from its verified spool, ranges included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_stored_once_its_clients_are_done_and_served_meanwhile() {
    let fake = Fake::start().await;
    // Far more than the slow client's small receive buffer, the server's send buffer and
    // wharf's queued chunks hold, so a client that stops reading stays mid-transfer.
    let bytes = noise("slow reader", 32 << 20);
    let d = fake.blob(bytes.clone());
    let w = Wharf::start(&fake.url(), "");
    let path = format!("/v2/app/blobs/{d}");

    // A client that reads the response head, then stops.
    let (mut slow, head) = common::stalled_get(w.addr, &path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // A range waits for the digest check, not for the slow client.
    let r = client().get(w.url(&path)).header("range", "bytes=1000-1999").send().await.expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.expect("body").to_vec(), bytes[1000..2000].to_vec());
    let (status, body) = get_all(&w.url(&path)).await.expect("a whole GET meanwhile");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), d);
    assert!(!blob_file(&w, &d).exists(), "stored while a client was still streaming it");
    assert_eq!(fake.count("GET", &d), 1, "one download for all three");

    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).await.expect("the rest");
    assert_eq!(rest.len(), bytes.len(), "the whole body, then the connection closes");
    assert_eq!(sha256(&rest), d);
    stored(&w, &d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let fake = Fake::start().await;
    let layer = fake.blob(noise("bad", 5000));
    fake.manifest(
        "app",
        Some("latest"),
        OCI_MANIFEST,
        format!(r#"{{"schemaVersion":2,"config":{{}},"layers":[{{"digest":"{layer}"}}]}}"#).into_bytes(),
    );
    let mut huge = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"x":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 << 20));
    huge.extend(br#""}}"#);
    fake.manifest("app", Some("huge"), OCI_MANIFEST, huge);
    let w = Wharf::start(&fake.url(), "");
    assert_eq!(get_all(&w.url("/v2/app/manifests/latest")).await.expect("warm").0, 200);
    assert_eq!(get_all(&w.url(&format!("/v2/app/blobs/{layer}"))).await.expect("warm").0, 200);
    stored(&w, &layer).await;
    let tree = w.data.join("docker");
    let before = tree_listing(&tree);
    let upstream_before = fake.seen().len();

    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/v2/../../etc/passwd/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/app/../../../etc/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/%2e%2e/%2e%2e/etc/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/app%2f..%2f../manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/App/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/app/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/manifests/sha256:ZZ", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/manifests/..", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/app/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/app/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/app/manifests/latest", 405, "UNSUPPORTED"),
        ("POST", "/v2/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/app/blobs/uploads/abc", 405, "UNSUPPORTED"),
        ("DELETE", &format!("/v2/app/blobs/{layer}"), 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let (got, body) = raw(&w, method, path).await;
        assert_eq!(got, *status, "{method} {path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("{method} {path}: OCI error JSON, got {body}"));
        assert_eq!(v["errors"][0]["code"], *code, "{method} {path}");
    }
    assert_eq!(fake.seen().len(), upstream_before, "invalid requests never reach the upstream");

    let r = client().get(w.url("/v2/app/manifests/huge")).send().await.expect("huge");
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let r = client()
        .get(w.url(&format!("/v2/app/blobs/sha256:{}", "0".repeat(64))))
        .send()
        .await
        .expect("unknown blob");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");

    assert_eq!(tree_listing(&tree), before, "the storage tree is unchanged");
    assert!(w.metric("wharf_errors_total", &[("code", "NAME_INVALID")]).await >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_is_negotiated_for_clients_that_cannot_read_it() {
    let fake = Fake::start().await;
    let amd = fake.manifest(
        "app",
        None,
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[],"arch":"amd64"}"#.to_vec(),
    );
    let arm = fake.manifest(
        "app",
        None,
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[],"arch":"arm64"}"#.to_vec(),
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{arm}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{amd}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    let idx = fake.manifest("app", Some("latest"), OCI_INDEX, index.into_bytes());
    let w = Wharf::start(&fake.url(), "");
    let url = w.url("/v2/app/manifests/latest");

    let r = client().get(&url).header("accept", OCI_INDEX).send().await.expect("index");
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(r.headers()["docker-content-digest"], idx.as_str());

    let r = client().get(&url).header("accept", OCI_MANIFEST).send().await.expect("manifest only");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    assert_eq!(r.headers()["docker-content-digest"], amd.as_str(), "the linux/amd64 image");

    let r = client()
        .get(&url)
        .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .expect("docker only");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");

    let r = client().head(&url).send().await.expect("head without accept");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], idx.as_str());
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
}

/// Manifest files are not fsynced (their names may be lost in a crash, which is a miss):
/// one a crash left short or damaged is checked against its digest and fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_manifest_is_fetched_again() {
    let (fake, m) = fake_with_latest().await;
    let mut w = Wharf::start(&fake.url(), "");
    let url = w.url(&format!("/v2/app/manifests/{m}"));
    let (status, good) = get_all(&url).await.expect("cold");
    assert_eq!(status, 200);
    w.settled().await;
    w.stop();
    std::fs::write(blob_file(&w, &m), b"").expect("damage the stored manifest");
    w.restart();
    let url = w.url(&format!("/v2/app/manifests/{m}"));
    let (status, body) = get_all(&url).await.expect("after the damage");
    assert_eq!(status, 200);
    assert_eq!(body, good);
    assert_eq!(sha256(&body), m);
    assert_eq!(fake.count("GET", &format!("/manifests/{m}")), 2, "fetched again, not served damaged");
    w.settled().await;
    assert_eq!(std::fs::read(blob_file(&w, &m)).expect("stored again"), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_ttl_serves_a_fresh_tag_without_asking_upstream() {
    let (fake, m) = fake_with_latest().await;
    let w = Wharf::start(&fake.url(), "tag_ttl = \"1h\"");
    let url = w.url("/v2/app/manifests/latest");
    for _ in 0..3 {
        let r = client().get(&url).send().await.expect("get");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], m.as_str());
    }
    let asked = fake.count("HEAD", "/manifests/latest") + fake.count("GET", "/manifests/latest");
    assert_eq!(asked, 1, "a new tag is one GET, then served within the ttl without asking");
    assert_eq!(w.metric("wharf_manifest_requests_total", &[("result", "hit")]).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_uses_the_password_file_and_never_logs_it() {
    let fake = Fake::start().await;
    // base64("user:secret")
    fake.require_basic("Basic dXNlcjpzZWNyZXQ=");
    fake.manifest(
        "org/private",
        Some("1"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[]}"#.to_vec(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").expect("password file");
    let w = Wharf::start(&fake.url(), &format!("username = \"user\"\npassword_file = \"{}\"", pw.display()));
    // A new tag is one GET; the next request revalidates it with a HEAD.
    for _ in 0..2 {
        let r = client().get(w.url("/v2/org/private/manifests/1")).send().await.expect("get");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(fake.count("HEAD", "/manifests/1"), 1);
    let authed = fake
        .seen()
        .into_iter()
        .filter(|s| s.authorization.as_deref() == Some("Basic dXNlcjpzZWNyZXQ="))
        .count();
    assert!(authed >= 2, "HEAD and GET carried the credentials");
    let log = w.log();
    assert!(!log.contains("secret") && !log.contains("dXNlcjpzZWNyZXQ"), "credentials never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_other_schemes_are_not_followed() {
    let fake = Fake::start().await;
    let w = Wharf::start(&fake.url(), "");
    for (i, to) in
        ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/x"].into_iter().enumerate()
    {
        let d = fake.blob(noise(&format!("ssrf-{i}"), 100));
        fake.set_blob_mode(&d, BlobMode::RedirectTo(to.to_owned()));
        let r = client().get(w.url(&format!("/v2/app/blobs/{d}"))).send().await.expect("response");
        assert!(r.status().is_server_error(), "{to}: {}", r.status());
        let body = r.text().await.expect("body");
        assert!(body.contains("\"errors\"") && !body.contains("root:"), "{to}: {body}");
        assert!(!blob_file(&w, &d).exists());
    }
}
