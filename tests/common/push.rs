//! Pushes to a real registry over its HTTP API (what oras and other artifact clients do):
//! blobs by a monolithic upload, manifests of any media type by tag or digest.

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use super::image::{noise_chunks, sha256};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Starts an upload and returns the URL to PUT the bytes to.
async fn upload_url(registry: &str, repo: &str, digest: &str) -> String {
    let r =
        client().post(format!("{registry}/v2/{repo}/blobs/uploads/")).send().await.expect("start an upload");
    assert_eq!(r.status(), 202, "upload start for {repo}");
    let loc = r.headers()["location"].to_str().expect("location").to_owned();
    let loc = if loc.starts_with("http") { loc } else { format!("{registry}{loc}") };
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

/// Pushes `bytes` as a blob of `repo`; returns its digest.
pub async fn blob(registry: &str, repo: &str, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    let url = upload_url(registry, repo, &d).await;
    let r = client()
        .put(url)
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 201, "blob upload to {repo}: {}", r.text().await.unwrap_or_default());
    d
}

/// Pushes a large generated blob without holding it; returns its digest.
pub async fn big_blob(registry: &str, repo: &str, seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    noise_chunks(seed, len).for_each(|c| h.update(&c));
    let d = format!("sha256:{}", hex::encode(h.finalize()));
    let url = upload_url(registry, repo, &d).await;
    let stream = futures_util::stream::iter(noise_chunks(seed, len)).map(Ok::<_, std::io::Error>);
    let r = client()
        .put(url)
        .header("content-type", "application/octet-stream")
        .header("content-length", len.to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 201, "big blob upload: {}", r.text().await.unwrap_or_default());
    d
}

/// Pushes a manifest under `reference` (a tag or its digest); returns its digest.
pub async fn manifest(registry: &str, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
    let r = client()
        .put(format!("{registry}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("manifest put");
    assert_eq!(r.status(), 201, "manifest put {repo}:{reference}: {}", r.text().await.unwrap_or_default());
    sha256(bytes)
}
