//! Supply-chain artifacts and OCI artifacts through wharf, against a real CNCF distribution
//! 2.8 upstream (no referrers API): signatures and SBOMs under the referrers tag schema and
//! cosign's `.sig` tags, referrers wharf knows from its cache, and every artifact type a
//! registry holds today, pulled byte-identical.

mod common;

use common::image::{noise, sha256, OCI_INDEX, OCI_MANIFEST};
use common::{push, skopeo, wait_for, Registry, Wharf};
use serde_json::{json, Value};

const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const SPDX: &str = "application/spdx+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";

/// A pushed manifest: digest, media type, bytes.
struct Pushed {
    digest: String,
    media_type: String,
    bytes: Vec<u8>,
}

impl Pushed {
    fn descriptor(&self, artifact_type: &str) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len(), "artifactType": artifact_type})
    }
}

/// Pushes an artifact manifest (empty config, one layer) with `subject`, by digest.
async fn push_referrer(
    reg: &str,
    repo: &str,
    subject: &Value,
    artifact_type: &str,
    payload: &[u8],
) -> Pushed {
    push::blob(reg, repo, b"{}").await;
    let layer = push::blob(reg, repo, payload).await;
    let m = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": EMPTY, "digest": EMPTY_DIGEST, "size": 2, "data": "e30="},
        "layers": [{"mediaType": artifact_type, "digest": layer, "size": payload.len()}],
        "subject": subject,
        "annotations": {"org.opencontainers.image.created": "2026-12-03T00:00:00Z"},
    })
    .to_string()
    .into_bytes();
    let digest = sha256(&m);
    push::manifest(reg, repo, &digest, OCI_MANIFEST, &m).await;
    Pushed { digest, media_type: OCI_MANIFEST.into(), bytes: m }
}

async fn get(url: &str, accept: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(url);
    if let Some(a) = accept {
        r = r.header("accept", a);
    }
    r.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn referrers(w: &Wharf, repo: &str, digest: &str, query: &str) -> Value {
    let r = get(&w.url(&format!("/v2/{repo}/referrers/{digest}{query}")), None).await;
    assert_eq!(r.status(), 200, "referrers of {digest}");
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    r.json().await.expect("an index")
}

async fn upstream_calls(w: &Wharf) -> f64 {
    w.metric("wharf_upstream_requests_total", &[]).await
}

#[tokio::test]
async fn signatures_and_sboms_of_a_registry_without_the_referrers_api() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tmp");
    let img = reg.seed_with(work.path(), "signed", "demo/signed:v1", &[2000], false);
    let index_size = std::fs::metadata(
        work.path().join("signed/blobs/sha256").join(img.index.trim_start_matches("sha256:")),
    )
    .expect("index blob")
    .len();
    let subject = json!({"mediaType": OCI_INDEX, "digest": img.index, "size": index_size});
    let u = reg.url();
    let bundle =
        push_referrer(&u, "demo/signed", &subject, BUNDLE, br#"{"mediaType":"sigstore bundle"}"#).await;
    let sbom = push_referrer(&u, "demo/signed", &subject, SPDX, br#"{"spdxVersion":"SPDX-2.3"}"#).await;
    // The referrers tag schema, as cosign and oras write it on a registry without the API.
    let fallback = json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [bundle.descriptor(BUNDLE), sbom.descriptor(SPDX)]});
    let hex = img.index.trim_start_matches("sha256:");
    push::manifest(&u, "demo/signed", &format!("sha256-{hex}"), OCI_INDEX, fallback.to_string().as_bytes())
        .await;
    // A legacy cosign signature tag.
    let payload = br#"{"critical":{"image":{"docker-manifest-digest":"x"}}}"#;
    let sig_layer = push::blob(&u, "demo/signed", payload).await;
    let cfg = push::blob(&u, "demo/signed", b"{\"architecture\":\"\",\"os\":\"\"}").await;
    let sig = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": 27},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig_layer,
            "size": payload.len(), "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ=="}}]})
    .to_string()
    .into_bytes();
    push::manifest(&u, "demo/signed", &format!("sha256-{hex}.sig"), OCI_MANIFEST, &sig).await;

    let w = Wharf::start(&u, "referrers_ttl = \"1h\"");
    // Cold: the referrers API (distribution 2.8 answers 404), then the fallback tag.
    let before = upstream_calls(&w).await;
    let list = referrers(&w, "demo/signed", &img.index, "").await;
    let cold = upstream_calls(&w).await - before;
    assert_eq!(list["manifests"], json!([bundle.descriptor(BUNDLE), sbom.descriptor(SPDX)]));
    assert_eq!(cold, 2.0, "cold: one referrers GET and one fallback tag GET");
    assert_eq!(
        w.metric("wharf_referrers_requests_total", &[("source", "fallback_tag"), ("result", "miss")]).await,
        1.0
    );
    // Warm: nothing upstream.
    let before = upstream_calls(&w).await;
    let again = referrers(&w, "demo/signed", &img.index, "").await;
    assert_eq!(again, list);
    let sboms = referrers(&w, "demo/signed", &img.index, &format!("?artifactType={SPDX}")).await;
    assert_eq!(sboms["manifests"], json!([sbom.descriptor(SPDX)]));
    assert_eq!(upstream_calls(&w).await - before, 0.0, "warm: no upstream call");

    // The referrers themselves go through the verified cache, byte-identical, counted apart
    // from pulls.
    for (p, kind) in [(&bundle, BUNDLE), (&sbom, SPDX)] {
        let r = get(&w.url(&format!("/v2/demo/signed/manifests/{}", p.digest)), Some(OCI_MANIFEST)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], p.digest.as_str());
        assert_eq!(r.bytes().await.expect("body").to_vec(), p.bytes);
        assert_eq!(w.metric("wharf_referrer_fetches_total", &[("artifact_type", kind)]).await, 1.0);
    }
    let r = get(&w.url(&format!("/v2/demo/signed/manifests/sha256-{hex}.sig")), Some(OCI_MANIFEST)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").to_vec(), sig);
    let r = get(&w.url(&format!("/v2/demo/signed/blobs/{sig_layer}")), None).await;
    assert_eq!(r.bytes().await.expect("body").to_vec(), payload);
    assert_eq!(
        w.metric(
            "wharf_referrer_fetches_total",
            &[("artifact_type", "application/vnd.dev.cosign.simplesigning.v1+json")]
        )
        .await,
        1.0
    );
    assert_eq!(
        w.metric("wharf_pulls_total", &[("repository", "demo/signed")]).await,
        0.0,
        "no pulls counted"
    );

    // A second wharf with referrers_ttl 0 asks every time, and serves the last list while
    // the upstream is down.
    let mut reg = reg;
    let w0 = Wharf::start(&u, "referrers_ttl = \"0s\"");
    let first = referrers(&w0, "demo/signed", &img.index, "").await;
    assert_eq!(first, list);
    reg.stop();
    let stale = referrers(&w0, "demo/signed", &img.index, "").await;
    assert_eq!(stale, list);
    assert_eq!(w0.metric("wharf_referrers_requests_total", &[("result", "stale")]).await, 1.0);
}

#[tokio::test]
async fn referrers_wharf_cached_answer_when_the_upstream_has_neither_api_nor_tag() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tmp");
    let img = reg.seed_with(work.path(), "attested", "demo/attested:v1", &[1500], false);
    let image = &img.images[0];
    let size = std::fs::metadata(
        work.path().join("attested/blobs/sha256").join(image.trim_start_matches("sha256:")),
    )
    .expect("manifest blob")
    .len();
    let subject = json!({"mediaType": OCI_MANIFEST, "digest": image, "size": size});
    let att =
        push_referrer(&reg.url(), "demo/attested", &subject, IN_TOTO, br#"{"_type":"statement"}"#).await;
    let mut w = Wharf::start(&reg.url(), "referrers_ttl = \"1h\"");
    let empty = referrers(&w, "demo/attested", image, "").await;
    assert_eq!(empty["manifests"], json!([]));
    // A client fetches the attestation by digest (it learned it elsewhere): from now on
    // wharf knows it refers to the image.
    let r = get(&w.url(&format!("/v2/demo/attested/manifests/{}", att.digest)), Some(OCI_MANIFEST)).await;
    assert_eq!(r.bytes().await.expect("body").to_vec(), att.bytes);
    w.settled().await;
    let want = json!([{"mediaType": OCI_MANIFEST, "digest": att.digest, "size": att.bytes.len(),
        "artifactType": IN_TOTO, "annotations": {"org.opencontainers.image.created": "2026-12-03T00:00:00Z"}}]);
    let known = referrers(&w, "demo/attested", image, "").await;
    assert_eq!(known["manifests"], want);
    assert_eq!(w.metric("wharf_referrers_requests_total", &[("source", "local")]).await, 2.0);
    // It survives a rebuilt index (the subjects are derived from the tree).
    w.stop();
    let out = w.cli(&["reindex"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.start_again();
    let known = referrers(&w, "demo/attested", image, "").await;
    assert_eq!(known["manifests"], want);
}

/// (tag, manifest media type, manifest bytes, blobs) of one artifact pushed to `repo`.
async fn push_artifact(
    u: &str,
    repo: &str,
    tag: &str,
    config: (&str, &[u8]),
    layers: &[(&str, Vec<u8>)],
    extra: Value,
) -> Pushed {
    let cfg = push::blob(u, repo, config.1).await;
    let mut descs = Vec::new();
    for (mt, bytes) in layers {
        let d = push::blob(u, repo, bytes).await;
        descs.push(json!({"mediaType": mt, "digest": d, "size": bytes.len()}));
    }
    let mut m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config.0, "digest": cfg, "size": config.1.len()}, "layers": descs});
    if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let bytes = m.to_string().into_bytes();
    let digest = push::manifest(u, repo, tag, OCI_MANIFEST, &bytes).await;
    Pushed { digest, media_type: OCI_MANIFEST.into(), bytes }
}

/// Pulls `repo:tag` through wharf as an artifact client does and checks every byte.
async fn pull_artifact(w: &Wharf, repo: &str, tag: &str, want: &Pushed) {
    let r = get(&w.url(&format!("/v2/{repo}/manifests/{tag}")), Some(&want.media_type)).await;
    assert_eq!(r.status(), 200, "{repo}:{tag}");
    assert_eq!(r.headers()["content-type"], want.media_type.as_str(), "{repo}:{tag}");
    assert_eq!(r.headers()["docker-content-digest"], want.digest.as_str());
    let bytes = r.bytes().await.expect("body").to_vec();
    assert_eq!(bytes, want.bytes, "{repo}:{tag} byte-identical");
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    let mut blobs: Vec<String> = v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["digest"].as_str().expect("d").to_owned())
        .collect();
    blobs.extend(v["config"]["digest"].as_str().map(str::to_owned));
    for d in blobs {
        let r = get(&w.url(&format!("/v2/{repo}/blobs/{d}")), None).await;
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.expect("blob")), d, "{repo}:{tag} blob");
    }
}

#[tokio::test]
async fn every_artifact_type_pulls_through_byte_identical() {
    let reg = Registry::start();
    let u = reg.url();
    let helm = push_artifact(
        &u,
        "charts/app",
        "1.2.3",
        (
            "application/vnd.cncf.helm.config.v1+json",
            br#"{"name":"app","version":"1.2.3","apiVersion":"v2"}"#,
        ),
        &[("application/vnd.cncf.helm.chart.content.v1.tar+gzip", noise("chart", 4000))],
        json!({}),
    )
    .await;
    let compose = push_artifact(
        &u,
        "stacks/web",
        "v1",
        (EMPTY, b"{}"),
        &[("application/vnd.docker.compose.file+yaml", b"services:\n  web:\n    image: nginx\n".to_vec())],
        json!({"artifactType": "application/vnd.docker.compose.project"}),
    )
    .await;
    let wasm = push_artifact(
        &u,
        "wasm/hello",
        "v1",
        ("application/vnd.wasm.config.v0+json", br#"{"architecture":"wasm32","os":"wasip1"}"#),
        &[("application/vnd.wasm.content.layer.v1+wasm", noise("wasm", 9000))],
        json!({}),
    )
    .await;
    let artifact = push_artifact(
        &u,
        "things/report",
        "v1",
        (EMPTY, b"{}"),
        &[("text/markdown", b"# report\n".to_vec())],
        json!({"artifactType": "application/vnd.example.report.v1"}),
    )
    .await;
    // A descriptor carrying its content in `data`.
    let data_cfg = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let with_data = push_artifact(
        &u,
        "things/data",
        "v1",
        ("application/vnd.oci.image.config.v1+json", data_cfg),
        &[],
        json!({"annotations": {"note": "config inline"}}),
    )
    .await;
    let mut v: Value = serde_json::from_slice(&with_data.bytes).expect("json");
    v["config"]["data"] = json!(base64_encode(data_cfg));
    let with_data_bytes = v.to_string().into_bytes();
    let with_data = Pushed {
        digest: push::manifest(&u, "things/data", "inline", OCI_MANIFEST, &with_data_bytes).await,
        media_type: OCI_MANIFEST.into(),
        bytes: with_data_bytes,
    };
    // An index of indexes (CNAB-style bundles).
    let inner = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": wasm.digest, "size": wasm.bytes.len()}]})
    .to_string()
    .into_bytes();
    push::blob(&u, "wasm/hello", b"{}").await;
    let inner_d = push::manifest(&u, "wasm/hello", "inner", OCI_INDEX, &inner).await;
    let outer = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_INDEX, "digest": inner_d, "size": inner.len(), "annotations": {"io.cnab.manifest.type": "invocation"}}]})
    .to_string()
    .into_bytes();
    let outer = Pushed {
        digest: push::manifest(&u, "wasm/hello", "bundle", OCI_INDEX, &outer).await,
        media_type: OCI_INDEX.into(),
        bytes: outer,
    };

    let w = Wharf::start(&u, "");
    pull_artifact(&w, "charts/app", "1.2.3", &helm).await;
    pull_artifact(&w, "stacks/web", "v1", &compose).await;
    pull_artifact(&w, "wasm/hello", "v1", &wasm).await;
    pull_artifact(&w, "things/report", "v1", &artifact).await;
    pull_artifact(&w, "things/data", "inline", &with_data).await;
    pull_artifact(&w, "wasm/hello", "bundle", &outer).await;
    let r = get(&w.url(&format!("/v2/wasm/hello/manifests/{inner_d}")), Some(OCI_INDEX)).await;
    assert_eq!(r.bytes().await.expect("inner").to_vec(), inner);

    // A real client: skopeo reads the helm chart's manifest through wharf as pushed, and
    // copies the whole chart out byte for byte.
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/charts/app:1.2.3", w.host()),
    ]);
    assert_eq!(raw.trim_end().as_bytes(), helm.bytes.as_slice());
    let out = tempfile::tempdir().expect("tmp");
    skopeo(&[
        "copy",
        "-q",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{}/charts/app:1.2.3", w.host()),
        &format!("oci:{}:chart", out.path().display()),
    ]);
    let idx: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).expect("index.json"))
            .expect("json");
    assert_eq!(idx["manifests"][0]["digest"], helm.digest.as_str());
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[tokio::test]
async fn a_model_sized_layer_reaches_a_herd_with_one_upstream_get_and_flat_memory() {
    // A GGUF model as docker model artifacts carry it. 1 GiB by default; WHARF_TEST_MODEL_MIB
    // sets another size.
    let mib: u64 = std::env::var("WHARF_TEST_MODEL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let len = mib << 20;
    let reg = Registry::start();
    let u = reg.url();
    let gguf = push::big_blob(&u, "ai/model", 7, len).await;
    let cfg = br#"{"config":{"format":"gguf","quantization":"Q4_K_M"},"descriptor":{}}"#;
    let cfg_d = push::blob(&u, "ai/model", cfg).await;
    let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.docker.ai.model.config.v0.1+json",
        "config": {"mediaType": "application/vnd.docker.ai.model.config.v0.1+json", "digest": cfg_d, "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.docker.ai.gguf.v3", "digest": gguf, "size": len}]})
    .to_string()
    .into_bytes();
    push::manifest(&u, "ai/model", "q4", OCI_MANIFEST, &m).await;

    let w = Wharf::start(&u, "");
    let r = get(&w.url("/v2/ai/model/manifests/q4"), Some(OCI_MANIFEST)).await;
    assert_eq!(r.bytes().await.expect("manifest").to_vec(), m);
    let rss_before = peak_rss(w.pid());
    let url = w.url(&format!("/v2/ai/model/blobs/{gguf}"));
    let herd: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                use futures_util::StreamExt;
                use sha2::{Digest as _, Sha256};
                let r = reqwest::get(&url).await.expect("GET");
                assert_eq!(r.status(), 200);
                let mut h = Sha256::new();
                let mut n = 0u64;
                let mut s = r.bytes_stream();
                while let Some(c) = s.next().await {
                    let c = c.expect("chunk");
                    n += c.len() as u64;
                    h.update(&c);
                }
                (n, format!("sha256:{}", hex::encode(h.finalize())))
            })
        })
        .collect();
    for h in herd {
        let (n, d) = h.await.expect("join");
        assert_eq!((n, d.as_str()), (len, gguf.as_str()), "every client gets the whole layer");
    }
    assert_eq!(reg.blob_gets(&gguf), 1, "one upstream GET for the herd");
    let grown = peak_rss(w.pid()).saturating_sub(rss_before);
    eprintln!("model layer {mib} MiB to 6 clients: peak RSS grew by {} MiB", grown >> 20);
    assert!(
        grown < 64 << 20,
        "memory stays flat: peak RSS grew by {} MiB for a {mib} MiB layer",
        grown >> 20
    );
    wait_for(60, "the layer to be stored", || common::in_tree(&w.data, &gguf).then_some(()));
}

/// Runs the oras Python client (tests/tools/oras_client.py); its JSON answer.
fn oras(args: &[&str]) -> Value {
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/oras_client.py"))
        .args(args)
        .env("PYTHONPATH", common::python_path())
        .output()
        .expect("python3 runs (scripts/test.sh installs the oras client)");
    let stdout = common::succeeded(&out, &format!("oras {args:?}"));
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("oras {args:?} printed {stdout}: {e}"))
}

#[tokio::test]
async fn the_oras_client_pulls_an_artifact_and_its_signature_through_wharf() {
    let reg = Registry::start();
    let host = reg.addr.to_string();
    let work = tempfile::tempdir().expect("tmp");
    let model = work.path().join("model.bin");
    let model_bytes = noise("oras-model", 300_000);
    std::fs::write(&model, &model_bytes).expect("write");
    let pushed = oras(&[
        "push",
        &host,
        "oras/demo:v1",
        model.to_str().expect("path"),
        "application/vnd.example.model.v1",
    ]);
    assert_eq!(pushed["status"], 201);
    let subject = get(&format!("{}/v2/oras/demo/manifests/v1", reg.url()), Some(OCI_MANIFEST)).await;
    let subject_d = subject.headers()["docker-content-digest"].to_str().expect("digest").to_owned();
    let subject_len = subject.bytes().await.expect("manifest").len().to_string();
    let sig = work.path().join("signature.json");
    std::fs::write(&sig, br#"{"signed":"oras/demo:v1"}"#).expect("write");
    let signed = oras(&[
        "push",
        &host,
        "oras/demo:sig",
        sig.to_str().expect("path"),
        "application/vnd.example.signature.v1",
        &subject_d,
        &subject_len,
        OCI_MANIFEST,
    ]);
    assert_eq!(signed["status"], 201);
    let sig_d = get(&format!("{}/v2/oras/demo/manifests/sig", reg.url()), Some(OCI_MANIFEST)).await.headers()
        ["docker-content-digest"]
        .to_str()
        .expect("digest")
        .to_owned();

    let w = Wharf::start(&reg.url(), "");
    let out = work.path().join("pulled");
    let pulled = oras(&["pull", &w.host(), "oras/demo:v1", out.to_str().expect("path")]);
    assert_eq!(pulled["files"].as_array().map(Vec::len), Some(1), "{pulled}");
    assert_eq!(std::fs::read(out.join("model.bin")).expect("pulled file"), model_bytes);
    // The signature, by digest, as a verifier fetches it; from then on wharf lists it as a
    // referrer of the artifact (distribution 2.8 has neither the API nor a fallback tag here).
    let sig_out = work.path().join("sig");
    oras(&["pull", &w.host(), &format!("oras/demo@{sig_d}"), sig_out.to_str().expect("path")]);
    assert_eq!(
        std::fs::read(sig_out.join("signature.json")).expect("pulled sig"),
        br#"{"signed":"oras/demo:v1"}"#
    );
    w.settled().await;
    let list = referrers(&w, "oras/demo", &subject_d, "").await;
    assert_eq!(digests(&list), vec![sig_d]);
    assert_eq!(w.metric("wharf_referrers_requests_total", &[("source", "local")]).await, 1.0);
}

fn digests(index: &Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str().map(str::to_owned))
        .collect()
}
