//! Pull analytics end to end: real clients pull, wharf counts pulls by tag and platform,
//! the real Prometheus scrapes it, and the counts outlive a restart.

mod common;

use std::process::{Command, Stdio};

use common::fake::Fake;
use common::image::{OCI_INDEX, OCI_MANIFEST};
use common::{metric_sum, skopeo_try, wait_until, Registry, Wharf};

const LAYERS: &[usize] = &[2048, 64 * 1024];

/// skopeo pulls one platform of `reference` through wharf.
fn pull_platform(w: &Wharf, reference: &str, arch: &str, out: &std::path::Path) {
    skopeo_try(&[
        "--override-os",
        "linux",
        "--override-arch",
        arch,
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{}/{reference}", w.host()),
        &format!("oci:{}:x", out.display()),
    ])
    .expect("skopeo pull through wharf");
}

async fn pulls(w: &Wharf, labels: &[(&str, &str)]) -> f64 {
    w.metric("wharf_pulls_total", labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_counted_by_tag_and_platform_and_survive_a_restart() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let v1 = reg.seed(work.path(), "stats-1", "demo/app:latest", LAYERS);
    // Pushed under a tag no client will ask wharf for: pulled by digest only.
    let v2 = reg.seed(work.path(), "stats-2", "demo/app:unseen", LAYERS);
    let mut w = Wharf::start(&reg.url(), "");

    pull_platform(&w, "demo/app:latest", "arm64", &work.path().join("o1"));
    assert_eq!(pulls(&w, &[]).await, 1.0, "one pull, whatever the index and blobs");
    assert_eq!(
        pulls(&w, &[("repository", "demo/app"), ("tag", "latest"), ("platform", "linux/arm64")]).await,
        1.0
    );
    assert_eq!(w.metric("wharf_attestation_fetches_total", &[]).await, 0.0);

    // HEADs are revalidations, not pulls.
    for _ in 0..3 {
        let r = reqwest::Client::new()
            .head(w.url("/v2/demo/app/manifests/latest"))
            .header("accept", OCI_INDEX)
            .send()
            .await
            .expect("head");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(pulls(&w, &[]).await, 1.0, "HEAD requests are not pulls");
    assert!(w.metric("wharf_manifest_requests_total", &[("method", "HEAD")]).await >= 3.0);

    // A digest no tag resolved to.
    pull_platform(&w, &format!("demo/app@{}", v2.index), "amd64", &work.path().join("o2"));
    assert_eq!(pulls(&w, &[("tag", "@digest"), ("platform", "linux/amd64")]).await, 1.0);

    // skopeo --all: one pull per platform, attestations apart.
    let out = work.path().join("o3");
    common::pull(&format!("{}/demo/app:latest", w.host()), &out).expect("pull --all");
    assert_eq!(pulls(&w, &[("tag", "latest"), ("platform", "linux/amd64")]).await, 1.0);
    assert_eq!(pulls(&w, &[("tag", "latest"), ("platform", "linux/arm64")]).await, 2.0);
    assert_eq!(w.metric("wharf_attestation_fetches_total", &[]).await, 2.0);
    assert_eq!(pulls(&w, &[]).await, 4.0);

    // The counts outlive the process: read from the data dir with the server stopped...
    assert!(w.stop().success());
    let out = w.cli(&["stats", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    assert_eq!(offline["pulls"], 4);
    assert_eq!(offline["top_tags"][0]["name"], "registry.test/demo/app:latest");
    assert_eq!(offline["top_tags"][0]["pulls"], 3);
    let platforms = offline["platforms"].as_array().expect("platforms");
    assert!(platforms.iter().any(|p| p["name"] == "linux/arm64" && p["pulls"] == 2), "{offline}");
    assert!(offline["bytes_from_upstream"].as_u64().expect("bytes") > 0);
    assert!(offline["cache_hit_ratio"].as_f64().is_some());

    // ...and from the running server after a restart, with the history's pull counts.
    w.restart();
    let out = w.cli(&["stats"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pulls: 4"), "{text}");
    assert!(text.contains("registry.test/demo/app:latest"), "{text}");
    let h = w.json("/_wharf/history/demo/app/tags/latest").await;
    assert_eq!(h["history"][0]["digest"], v1.index.as_str());
    assert_eq!(h["history"][0]["pulls"], 3, "which digest of latest was pulled, how often");
    println!("{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_beyond_the_cap_are_folded() {
    let fake = Fake::start().await;
    for t in ["a", "b", "c"] {
        let body = format!(r#"{{"schemaVersion":2,"config":{{}},"layers":[],"t":"{t}"}}"#);
        fake.manifest("app", Some(t), OCI_MANIFEST, body.into_bytes());
    }
    let w = Wharf::with_config(&format!(
        "[analytics]\nmax_series = 2\n\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
        fake.url()
    ));
    for t in ["a", "b", "c", "c", "a"] {
        let r = reqwest::get(w.url(&format!("/v2/app/manifests/{t}"))).await.expect("get");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(pulls(&w, &[("repository", "app"), ("tag", "a")]).await, 2.0);
    assert_eq!(pulls(&w, &[("repository", "app"), ("tag", "b")]).await, 1.0);
    assert_eq!(pulls(&w, &[("repository", "app"), ("tag", "c")]).await, 0.0);
    assert_eq!(pulls(&w, &[("repository", "other"), ("tag", "other")]).await, 2.0);
    assert_eq!(w.metric("wharf_pulls_folded_total", &[]).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_wharf_and_promql_counts_the_pulls() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    reg.seed(work.path(), "prom", "demo/app:latest", LAYERS);
    let w = Wharf::with_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
        reg.url()
    ));
    let metrics_addr = w.metrics_addr().expect("metrics.listen is bound");
    pull_platform(&w, "demo/app:latest", "amd64", &work.path().join("o1"));
    pull_platform(&w, "demo/app:latest", "arm64", &work.path().join("o2"));

    // The separate listener serves metrics only.
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert_eq!(metric_sum(&text, "wharf_pulls_total", &[]), 2.0);
    let r = reqwest::get(format!("http://{metrics_addr}/v2/")).await.expect("v2 on the admin port");
    assert_eq!(r.status(), 404);

    // promtool accepts the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus)");
    std::io::Write::write_all(check.stdin.as_mut().expect("stdin"), text.as_bytes()).expect("write");
    drop(check.stdin.take());
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The real Prometheus scrapes it, and PromQL sees the pulls.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let cfg = work.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: wharf\n    static_configs:\n      - targets: [\"{metrics_addr}\"]\n"
        ),
    )
    .expect("config");
    let log = std::fs::File::create(work.path().join("prometheus.log")).expect("log");
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", work.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("prometheus runs (apt-get install prometheus)");
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=sum(wharf_pulls_total%7Brepository%3D%22demo%2Fapp%22%2Ctag%3D%22latest%22%7D)"
    );
    let seen = std::panic::AssertUnwindSafe(wait_until(60, "Prometheus to report the pulls", || async {
        let v: serde_json::Value = reqwest::get(&query).await.ok()?.json().await.ok()?;
        let value = v["data"]["result"][0]["value"][1].as_str()?.to_owned();
        (value == "2").then_some(value)
    }));
    let seen = futures_util::FutureExt::catch_unwind(seen).await;
    let _ = prom.kill();
    let _ = prom.wait();
    if seen.is_err() {
        eprintln!("{}", std::fs::read_to_string(work.path().join("prometheus.log")).unwrap_or_default());
        panic!("Prometheus never reported 2 pulls");
    }
}

/// Metric names a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("wharf_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_names_only_metrics_wharf_exports() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/wharf-dashboard.json"))
            .expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exported = wharf::metrics::Metrics::new().names().to_vec();
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "datasource variable"
    );
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut exprs = 0;
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            exprs += 1;
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s).filter(|b| exported.contains(b)))
                    .unwrap_or(&n);
                assert!(exported.contains(&base), "{} uses {n}, which wharf does not export", p["title"]);
            }
        }
    }
    for wanted in [
        "wharf_pulls_total",
        "wharf_upstream_request_duration_seconds",
        "wharf_cache_bytes",
        "wharf_cache_limit_bytes",
        "wharf_cache_evicted_bytes_total",
        "wharf_cache_evictions_total",
        "wharf_cache_uncached_downloads_total",
        "wharf_referrers_requests_total",
        "wharf_referrer_fetches_total",
    ] {
        assert!(text.contains(wanted), "the dashboard shows {wanted}");
    }
    assert!(exprs >= 12);
}
