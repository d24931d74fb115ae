//! Hostile or broken upstream answers, injected by an in-test upstream: each gets a clear
//! OCI error for the client and nothing is cached from it.

mod common;

use common::fake::{BlobMode, Fake, ManifestFault};
use common::image::{noise, sha256, OCI_MANIFEST};
use common::{tree_listing, Wharf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The status and OCI error code of a GET through wharf.
async fn get_error(w: &Wharf, path: &str) -> (u16, String) {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(w.url(path))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("response");
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.expect("an OCI error JSON body");
    (status, v["errors"][0]["code"].as_str().expect("code").to_owned())
}

fn blob_stored(w: &Wharf, digest: &str) -> bool {
    common::in_tree(&w.data, digest)
}

#[tokio::test]
async fn an_html_page_with_200_for_a_manifest_is_refused_and_not_cached() {
    let fake = Fake::start().await;
    fake.manifest(
        "app",
        Some("latest"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"config":{},"layers":[]}"#.to_vec(),
    );
    fake.set_manifest_fault(ManifestFault::Html);
    let w = Wharf::start(&fake.url(), "");
    let before = tree_listing(&w.data.join("docker"));
    assert_eq!(get_error(&w, "/v2/app/manifests/latest").await, (502, "UNKNOWN".to_owned()));
    w.settled().await;
    assert_eq!(tree_listing(&w.data.join("docker")), before, "nothing was stored");
}

#[tokio::test]
async fn a_head_digest_that_differs_from_the_bytes_is_never_recorded() {
    let fake = Fake::start().await;
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
    let real = fake.manifest("app", Some("v1"), OCI_MANIFEST, body.to_vec());
    let lie = format!("sha256:{}", "ab".repeat(32));
    fake.set_manifest_fault(ManifestFault::HeadDigest(lie.clone()));
    // Asked by that digest, the upstream serves the tag's bytes, which hash otherwise.
    fake.state
        .manifests
        .lock()
        .expect("lock")
        .insert(format!("app@{lie}"), (OCI_MANIFEST.to_owned(), body.to_vec()));
    let w = Wharf::start(&fake.url(), "");
    let c = reqwest::Client::new();
    // Seen for the first time: one GET by tag, whose bytes are the truth.
    let r = c.get(w.url("/v2/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], real.as_str());
    // Revalidated: the HEAD names a digest the upstream cannot serve bytes for.
    let r = c.get(w.url("/v2/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.expect("get");
    let status = r.status().as_u16();
    if status == 200 {
        assert_eq!(r.headers()["docker-content-digest"], real.as_str(), "only the verified digest is served");
    } else {
        assert_eq!(status, 502);
    }
    w.settled().await;
    let history = w.json("/_wharf/history/app/tags/v1").await;
    let digests: Vec<&str> =
        history["history"].as_array().expect("history").iter().filter_map(|e| e["digest"].as_str()).collect();
    assert_eq!(digests, vec![real.as_str()], "the lie never enters the tag's history");
    assert_eq!(w.metric("wharf_digest_mismatch_total", &[]).await, 1.0, "counted as a mismatch");
    assert!(!blob_stored(&w, &lie));
}

#[tokio::test]
async fn a_blob_without_content_length_is_verified_and_cached() {
    let fake = Fake::start().await;
    let bytes = noise("chunked", 300_000);
    let d = fake.blob(bytes.clone());
    fake.set_blob_mode(&d, BlobMode::Chunked);
    let wrong = fake.blob(noise("chunked-wrong", 1000));
    fake.set_blob_mode(&wrong, BlobMode::Wrong(noise("other", 1000)));
    let w = Wharf::start(&fake.url(), "");
    let got =
        reqwest::get(w.url(&format!("/v2/app/blobs/{d}"))).await.expect("get").bytes().await.expect("body");
    assert_eq!(sha256(&got), d);
    w.settled().await;
    assert!(blob_stored(&w, &d), "a chunked blob is cached once verified");
    // Wrong bytes are refused whatever the framing: found mid-transfer, the 200 is cut;
    // found before the answer starts (a small blob can be fetched and hashed first), a
    // 502. Never a complete 200.
    let r = reqwest::get(w.url(&format!("/v2/app/blobs/{wrong}"))).await.expect("get");
    let status = r.status().as_u16();
    let body = r.bytes().await;
    match status {
        200 => assert!(body.is_err(), "the transfer is cut, never completed"),
        _ => assert_eq!(status, 502, "a mismatch found before the answer is a bad gateway"),
    }
    w.settled().await;
    assert!(!blob_stored(&w, &wrong));
}

#[tokio::test]
async fn a_body_longer_than_its_content_length_yields_only_the_announced_bytes() {
    // A raw upstream: a real HTTP server will not send more than it announced.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let blob = noise("longer", 5000);
    let d = sha256(&blob);
    let served = blob.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let blob = served.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_owned();
                let resp = if line.contains("/blobs/") {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        blob.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&blob);
                    r.extend_from_slice(b"EXTRA BYTES THE HEADER DID NOT ANNOUNCE");
                    r
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_vec()
                };
                let _ = s.write_all(&resp).await;
            });
        }
    });
    let w = Wharf::start(&format!("http://{addr}"), "");
    let got =
        reqwest::get(w.url(&format!("/v2/app/blobs/{d}"))).await.expect("get").bytes().await.expect("body");
    assert_eq!(got.as_ref(), &blob[..], "exactly the announced, verified bytes");
    w.settled().await;
    let stored = std::fs::read(
        w.data.join("docker/registry/v2/blobs/sha256").join(&d[7..9]).join(&d[7..]).join("data"),
    )
    .expect("stored");
    assert_eq!(stored, blob);
}

#[tokio::test]
async fn a_token_endpoint_answering_junk_or_a_huge_body_is_a_clear_error() {
    let fake = Fake::start().await;
    fake.require_tokens(60);
    let d = fake.blob(noise("behind-token", 1000));
    let w = Wharf::start(&fake.url(), "");
    for body in
        [b"<html>login</html>".to_vec(), b"{\"token\": 42}".to_vec(), b"{}".to_vec(), vec![b' '; 2 << 20]]
    {
        *fake.state.token_body.lock().expect("lock") = Some(body.clone());
        let (status, code) = get_error(&w, &format!("/v2/app/blobs/{d}")).await;
        assert_eq!((status, code.as_str()), (502, "UNKNOWN"), "token body of {} bytes", body.len());
    }
    assert!(!blob_stored(&w, &d));
}

#[tokio::test]
async fn a_redirect_loop_is_cut_short_with_a_clear_error() {
    let fake = Fake::start().await;
    let d = fake.blob(noise("loop", 1000));
    let w = Wharf::start(&fake.url(), "");
    fake.set_blob_mode(&d, BlobMode::RedirectTo(format!("{}/v2/app/blobs/{d}", fake.url())));
    let (status, code) = get_error(&w, &format!("/v2/app/blobs/{d}")).await;
    assert!(status == 502 || status == 503, "{status}");
    assert!(code == "UNKNOWN" || code == "UNAVAILABLE", "{code}");
    let hops = fake.seen().iter().filter(|s| s.path.contains("/blobs/")).count();
    assert!(hops <= 6 * 3, "redirects followed at most 5 times per attempt: {hops}");
    assert!(!blob_stored(&w, &d));
}
