//! One wharf, several real upstreams: every way a client can address a mirror reaches the
//! right registry, names are normalised as Docker Hub does, rules hold, and nothing else
//! is ever contacted.

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use common::image::{write_layout, Layout, OCI_INDEX};
use common::{layout_blobs, layout_top_digest, push, skopeo_try, Registry, Wharf};

const SMALL: &[usize] = &[1024, 64 * 1024];

/// Two real registries with the same repository names holding different images:
/// `a` plays Docker Hub, `b` plays ghcr.io.
struct Upstreams {
    a: Registry,
    b: Registry,
    a_demo: Layout,
    a_app: Layout,
    b_app: Layout,
    _work: tempfile::TempDir,
}

fn upstreams() -> &'static Upstreams {
    static U: OnceLock<Upstreams> = OnceLock::new();
    U.get_or_init(|| {
        let work = tempfile::tempdir().expect("tempdir");
        let (a, b) = (Registry::start(), Registry::start());
        let layout = |name: &str| {
            let dir = work.path().join(name);
            (write_layout(&dir, name, "img", SMALL), dir)
        };
        let (a_demo, d1) = layout("a-demo");
        let (a_app, d2) = layout("a-app");
        let (b_app, d3) = layout("b-app");
        push(&d1, "img", &format!("{}/library/demo:latest", a.addr));
        push(&d2, "img", &format!("{}/org/app:1", a.addr));
        push(&d3, "img", &format!("{}/org/app:1", b.addr));
        push(&d3, "img", &format!("{}/org/app:2", b.addr));
        push(&d3, "img", &format!("{}/org/app:3", b.addr));
        push(&d3, "img", &format!("{}/org/secret:1", b.addr));
        push(&d3, "img", &format!("{}/other/x:1", b.addr));
        Upstreams { a, b, a_demo, a_app, b_app, _work: work }
    })
}

fn mirror(u: &Upstreams) -> Wharf {
    Wharf::with_config(&format!(
        r#"
[[upstreams]]
name = "docker.io"
aliases = ["index.docker.io", "registry.internal:5000"]
url = "{}"
insecure = true

[[upstreams]]
name = "ghcr.io"
url = "{}"
insecure = true
allow = ["org/**", "library/*"]
deny = ["org/secret"]
"#,
        u.a.url(),
        u.b.url()
    ))
}

/// HEADs a manifest through wharf; returns the status and the digest header.
async fn head(w: &Wharf, path_and_query: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .head(w.url(path_and_query))
        .header("accept", OCI_INDEX)
        .send()
        .await
        .expect("response");
    let d = r.headers().get("docker-content-digest").map(|v| v.to_str().expect("ascii").to_owned());
    (r.status().as_u16(), d.unwrap_or_default())
}

async fn get_error(w: &Wharf, path: &str) -> (u16, String, String) {
    let r = reqwest::get(w.url(path)).await.expect("response");
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.expect("OCI error JSON");
    (
        status,
        v["errors"][0]["code"].as_str().unwrap_or("").into(),
        v["errors"][0]["message"].as_str().unwrap_or("").into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_routing_form_reaches_the_right_upstream() {
    let u = upstreams();
    let w = mirror(u);
    // containerd's hosts.toml form.
    assert_eq!(head(&w, "/v2/org/app/manifests/1?ns=ghcr.io").await, (200, u.b_app.index.clone()));
    assert_eq!(head(&w, "/v2/org/app/manifests/1?ns=docker.io").await, (200, u.a_app.index.clone()));
    assert_eq!(head(&w, "/v2/org/app/manifests/1?ns=index.docker.io").await, (200, u.a_app.index.clone()));
    // A registry on another port: containerd sends host:port, which only an alias can hold.
    assert_eq!(
        head(&w, "/v2/org/app/manifests/1?ns=registry.internal:5000").await,
        (200, u.a_app.index.clone())
    );
    // Path prefix (registries.conf prefix mirrors, plain docker tags).
    assert_eq!(head(&w, "/v2/ghcr.io/org/app/manifests/1").await, (200, u.b_app.index.clone()));
    assert_eq!(head(&w, "/v2/docker.io/org/app/manifests/1").await, (200, u.a_app.index.clone()));
    // The default upstream (docker registry-mirrors).
    assert_eq!(head(&w, "/v2/org/app/manifests/1").await, (200, u.a_app.index.clone()));

    // Docker Hub's official images: one repository under both spellings.
    assert_eq!(head(&w, "/v2/demo/manifests/latest").await, (200, u.a_demo.index.clone()));
    assert_eq!(head(&w, "/v2/library/demo/manifests/latest").await, (200, u.a_demo.index.clone()));
    let h = w.json("/_wharf/history/demo/tags/latest").await;
    assert_eq!(h["repository"], "docker.io/library/demo");
    let repos = std::fs::read_dir(w.data.join("docker/registry/v2/repositories/docker.io"))
        .expect("docker.io repositories")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect::<BTreeSet<_>>();
    assert_eq!(repos, BTreeSet::from(["library".to_string(), "org".to_string()]), "no separate `demo` entry");

    // Same repository name, two upstreams: two cache entries, never mixed.
    let hist = |path: &'static str| {
        let w = &w;
        async move {
            let v = w.json(path).await;
            v["history"][0]["digest"].as_str().expect("digest").to_owned()
        }
    };
    assert_eq!(hist("/_wharf/history/ghcr.io/org/app/tags/1").await, u.b_app.index);
    assert_eq!(hist("/_wharf/history/org/app/tags/1").await, u.a_app.index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_registries_are_refused_without_contacting_anything() {
    let u = upstreams();
    let w = mirror(u);
    let before = w.metric("wharf_upstream_requests_total", &[]).await;
    for path in [
        "/v2/org/app/manifests/1?ns=quay.io",
        "/v2/quay.io/org/app/manifests/1",
        "/v2/localhost/org/app/manifests/1",
        "/v2/evil.example/org/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let (status, code, message) = get_error(&w, path).await;
        assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"), "{path}");
        assert!(message.contains("is configured"), "{path}: {message}");
    }
    assert_eq!(w.metric("wharf_upstream_requests_total", &[]).await, before, "no outbound request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_rules_hold() {
    let u = upstreams();
    let w = mirror(u);
    let before = w.metric("wharf_upstream_requests_total", &[]).await;
    let (status, code, message) = get_error(&w, "/v2/ghcr.io/org/secret/manifests/1").await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert!(message.contains("deny = \"org/secret\""), "{message}");
    let (status, code, message) = get_error(&w, "/v2/other/x/manifests/1?ns=ghcr.io").await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert!(message.contains("no allow rule"), "{message}");
    assert_eq!(
        w.metric("wharf_upstream_requests_total", &[]).await,
        before,
        "refused before any upstream call"
    );
    assert_eq!(head(&w, "/v2/ghcr.io/org/app/manifests/1").await.0, 200, "allowed names pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_catalog_come_from_upstream_then_from_cache() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut reg = Registry::start();
    let dir = work.path().join("l");
    let img = write_layout(&dir, "tags", "img", SMALL);
    for t in ["1", "2", "3"] {
        push(&dir, "img", &format!("{}/org/app:{t}", reg.addr));
    }
    let w = Wharf::start(&reg.url(), "");

    let r = reqwest::get(w.url("/v2/org/app/tags/list?n=2")).await.expect("tags");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["wharf-source"], "upstream");
    assert_eq!(r.headers()["link"], "</v2/org/app/tags/list?n=2&last=2>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["1", "2"]));
    let v = w.json("/v2/org/app/tags/list?n=2&last=2").await;
    assert_eq!(v["tags"], serde_json::json!(["3"]));
    let v = w.json("/v2/_catalog").await;
    assert_eq!(v["repositories"], serde_json::json!(["org/app"]));

    // Pull two tags into the cache, then lose the upstream.
    for t in ["1", "3"] {
        assert_eq!(head(&w, &format!("/v2/org/app/manifests/{t}")).await, (200, img.index.clone()));
    }
    reg.stop();
    let r = reqwest::get(w.url("/v2/org/app/tags/list")).await.expect("tags offline");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["wharf-source"], "cache");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["1", "3"]), "what the cache knows");
    let v = w.json("/v2/_catalog").await;
    assert_eq!(v["repositories"], serde_json::json!(["org/app"]));
}

/// `skopeo copy --all` of `src` into a new OCI layout, resolving registries with `conf`.
fn skopeo_copy_with_conf(conf: &str, src: &str, out: &std::path::Path) -> Result<String, String> {
    let dest = format!("oci:{}:x", out.display());
    skopeo_try(&["--registries-conf", conf, "copy", "-q", "--all", "--preserve-digests", src, &dest])
}

/// A registries.conf for skopeo.
fn registries_conf(dir: &std::path::Path, body: &str) -> String {
    let f = dir.join("registries.conf");
    std::fs::write(&f, body).expect("registries.conf");
    f.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_a_registries_conf_mirror_and_a_prefix_mirror() {
    let u = upstreams();
    let w = mirror(u);
    let work = tempfile::tempdir().expect("tempdir");

    // A mirror for docker.io: skopeo asks wharf with the plain path.
    let conf = registries_conf(
        work.path(),
        &format!("[[registry]]\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n", w.host()),
    );
    let out = work.path().join("mirror");
    skopeo_copy_with_conf(&conf, "docker://docker.io/org/app:1", &out)
        .expect("skopeo through a docker.io mirror");
    assert_eq!(layout_top_digest(&out), u.a_app.index);
    assert_eq!(layout_blobs(&out), u.a_app.blobs.iter().cloned().collect::<BTreeSet<_>>());

    // A prefix mirror: ghcr.io/... is fetched from wharf/ghcr.io/...
    let conf = registries_conf(
        work.path(),
        &format!(
            "[[registry]]\nprefix = \"ghcr.io\"\nlocation = \"{}/ghcr.io\"\ninsecure = true\n",
            w.host()
        ),
    );
    let out = work.path().join("prefix");
    skopeo_copy_with_conf(&conf, "docker://ghcr.io/org/app:1", &out).expect("skopeo through a prefix mirror");
    assert_eq!(layout_top_digest(&out), u.b_app.index);
    assert_eq!(layout_blobs(&out), u.b_app.blobs.iter().cloned().collect::<BTreeSet<_>>());

    let log = w.log();
    assert!(log.contains("uri=/v2/org/app/manifests/1"), "the mirror form reached wharf");
    assert!(log.contains("uri=/v2/ghcr.io/org/app/manifests/1"), "the prefix form reached wharf");
}
