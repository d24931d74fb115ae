//! `wharf prefetch`: fills the cache from a list through the cache itself (a stopped data
//! dir gets a server of its own for the run), each blob fetched once, counted apart from
//! pulls; bars on a terminal, lines otherwise.

mod common;

use std::process::{Command, Output};

use common::{succeeded, wharf_bin, wharf_cli as cli, Registry, Wharf};

const LAYERS: &[usize] = &[2048, 96 * 1024];

fn outcomes(out: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON summary ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn prefetch_fetches_each_blob_once_and_a_rerun_fetches_nothing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let app = reg.seed(work.path(), "app", "demo/app:1.0", LAYERS);
    let tool = reg.seed_with(work.path(), "tool", "demo/tool:2", LAYERS, false);
    let config = work.path().join("w.toml");
    std::fs::write(
        &config,
        format!("[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n", reg.url()),
    )
    .expect("write");
    let list = work.path().join("images.txt");
    std::fs::write(&list, "# the CI images\ndemo/app:1.0\n\ndocker.io/demo/tool:2  # qualified\n")
        .expect("write");

    // One platform only, on its own data dir: the other platform is never asked for.
    let arm = work.path().join("arm");
    let out = cli(&config, &arm, &["prefetch", "demo/app:1.0", "--platform", "linux/arm64", "--json"]);
    let o = outcomes(&out);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(o[0]["platforms"], serde_json::json!(["linux/arm64"]));
    assert_eq!(reg.requests(&format!("/manifests/{}", app.images[0])), 0, "amd64 not fetched");
    assert_eq!(reg.requests(&format!("/manifests/{}", app.images[1])), 1, "arm64 fetched");

    // Everything, on a stopped data dir.
    let manifests: Vec<&String> = [&app.index, &tool.index]
        .into_iter()
        .chain(&app.images)
        .chain(&app.attestations)
        .chain(&tool.images)
        .collect();
    let layer_blobs: Vec<String> =
        app.blobs.iter().chain(&tool.blobs).filter(|b| !manifests.contains(b)).cloned().collect();
    let before: std::collections::HashMap<String, usize> =
        layer_blobs.iter().map(|b| (b.clone(), reg.blob_gets(b))).collect();
    let data = work.path().join("data");
    let out = cli(&config, &data, &["prefetch", "-f", list.to_str().expect("path"), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let o = outcomes(&out);
    assert_eq!(o.len(), 2);
    assert_eq!(o[0]["digest"], app.index.as_str());
    assert_eq!(o[0]["platforms"], serde_json::json!(["linux/amd64", "linux/arm64"]));
    assert_eq!(o[1]["digest"], tool.index.as_str());
    assert!(o.iter().all(|x| x["result"] == "ok" && x["fetched_bytes"].as_u64() > Some(0)));
    // Again: nothing new is fetched.
    let out = cli(&config, &data, &["prefetch", "-f", list.to_str().expect("path"), "--json"]);
    assert!(out.status.success());
    for x in outcomes(&out) {
        assert_eq!(x["fetched_bytes"], 0, "{x}");
        assert!(x["cached_bytes"].as_u64() > Some(0));
    }
    // Each blob crossed from the registry once for this data dir, over both runs.
    assert!(layer_blobs.len() >= 8, "configs and layers of both platforms");
    for b in &layer_blobs {
        assert_eq!(reg.blob_gets(b) - before[b], 1, "{b}");
    }

    // The cache serves them: a server on the data dir with the registry gone.
    drop(reg);
    let w = Wharf::with_config_at("offline = true\n[[upstreams]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:1\"\ninsecure = true\n", Some(data));
    let pulled = work.path().join("pulled");
    common::pull(&format!("{}/demo/app:1.0", w.host()), &pulled).expect("pull from the prefetched cache");
    assert_eq!(common::layout_top_digest(&pulled), app.index);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_through_a_running_server_is_not_a_pull_and_says_what_failed() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let app = reg.seed(work.path(), "app", "demo/app:1.0", LAYERS);
    let w = Wharf::start(&reg.url(), "");
    let out = w.cli(&["prefetch", "demo/app:1.0", "demo/nothing:here", "--json"]);
    assert!(!out.status.success(), "an image failed: non-zero exit");
    let o = outcomes(&out);
    assert_eq!(o[0]["result"], "ok");
    assert_eq!(o[0]["digest"], app.index.as_str());
    let failure = o[1]["result"].as_str().expect("result");
    assert!(failure.contains("404") && failure.contains("MANIFEST_UNKNOWN"), "{failure}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 2 images failed"));

    // Fetched by the server (its metrics), and not counted as pulls.
    let blobs = app.blobs.len() as f64 - (app.images.len() + app.attestations.len() + 1) as f64;
    assert_eq!(w.metric("wharf_prefetch_blobs_total", &[("result", "fetched")]).await, blobs);
    assert!(w.metric("wharf_prefetch_bytes_total", &[]).await > 0.0);
    assert_eq!(w.metric("wharf_pulls_total", &[]).await, 0.0);
    // A client's pull afterwards is a hit, and a pull.
    let pulled = work.path().join("pulled");
    common::pull(&format!("{}/demo/app:1.0", w.host()), &pulled).expect("pull");
    for b in &app.blobs {
        assert!(reg.blob_gets(b) <= 1, "{b} fetched once");
    }
    assert!(w.metric("wharf_pulls_total", &[]).await >= 1.0);
}

#[test]
fn a_terminal_gets_bars_and_a_pipe_gets_lines() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    reg.seed(work.path(), "app", "demo/app:1.0", LAYERS);
    let config = work.path().join("w.toml");
    std::fs::write(
        &config,
        format!("[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n", reg.url()),
    )
    .expect("write");
    let piped = cli(&config, &work.path().join("a"), &["prefetch", "demo/app:1.0"]);
    let err = succeeded(&piped, "prefetch piped");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(stderr.lines().any(|l| l.starts_with("prefetched demo/app:1.0 sha256:")), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no terminal control in a pipe");
    assert!(err.contains("IMAGE") && err.contains("demo/app:1.0"), "the summary table: {err}");

    // Under a pseudo-terminal (util-linux `script`): bars, drawn with control sequences.
    let cmd = format!(
        "{} prefetch demo/app:1.0 --config {} --data-dir {}",
        wharf_bin(),
        config.display(),
        work.path().join("b").display()
    );
    let out = Command::new("script").args(["-qefc", &cmd, "/dev/null"]).output().expect("script runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ETA") && text.contains("total") && text.contains('\u{1b}'), "bars: {text}");
    assert!(!text.contains("prefetched demo/app:1.0"), "no plain lines on a terminal");
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_lists_are_refreshed_by_the_server_behind_a_protected_admin() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let app = reg.seed(work.path(), "app", "demo/app:1.0", LAYERS);
    let tool = reg.seed_with(work.path(), "tool", "demo/tool:2", LAYERS, false);
    let pw = work.path().join("htpasswd");
    std::fs::write(&pw, format!("alice:{}\n", bcrypt::hash("alice-pw", 5).expect("bcrypt"))).expect("write");
    let w = Wharf::with_config(&format!(
        "[auth]\nhtpasswd_file = \"{}\"\nprotect_admin = true\n\
         [[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n\
         [[prefetch]]\nimages = [\"demo/app:1.0\"]\nplatforms = [\"linux/amd64\"]\nrefresh = \"1h\"\n\
         [[prefetch]]\nimages = [\"demo/tool:2\"]\n",
        pw.display(),
        reg.url()
    ));
    let metrics = || async {
        reqwest::Client::new()
            .get(w.url("/metrics"))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    // The entry with a refresh is fetched at start, by the server, as its own user: the
    // amd64 image (config, two layers) and its attestation (config, one layer).
    let mut fetched = 0.0;
    for _ in 0..600 {
        fetched =
            common::metric_sum(&metrics().await, "wharf_prefetch_blobs_total", &[("result", "fetched")]);
        if fetched >= 5.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(fetched, 5.0, "the scheduled entry, amd64 only");
    assert_eq!(reg.requests(&format!("/manifests/{}", app.images[1])), 0, "not arm64");
    for b in &tool.blobs {
        assert_eq!(reg.blob_gets(b), 0, "the entry without refresh waits for `wharf prefetch`");
    }

    // `wharf prefetch` with no list takes the configuration's, with the admin's credentials.
    let out = Command::new(wharf_bin())
        .args(["prefetch", "--json", "--config"])
        .arg(w.tmp().join("wharf.toml"))
        .arg("--data-dir")
        .arg(&w.data)
        .env("WHARF_CREDENTIALS", "alice:alice-pw")
        .output()
        .expect("wharf");
    let o = outcomes(&out);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(o.len(), 2);
    assert_eq!(o[0]["fetched_bytes"], 0, "fetched already by the schedule");
    assert_eq!(o[1]["digest"], tool.index.as_str());
    let without = Command::new(wharf_bin())
        .args(["prefetch", "--config"])
        .arg(w.tmp().join("wharf.toml"))
        .arg("--data-dir")
        .arg(&w.data)
        .output()
        .expect("wharf");
    assert!(!without.status.success(), "no credentials, no prefetch");
    assert!(String::from_utf8_lossy(&without.stdout).contains("401"));
}

#[test]
fn a_pinned_prefetch_survives_eviction_and_the_rest_does_not() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let app = reg.seed(work.path(), "app", "demo/app:1.0", LAYERS);
    let tool = reg.seed_with(work.path(), "tool", "demo/tool:2", LAYERS, false);
    let upstream = format!("[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n", reg.url());
    let config = work.path().join("w.toml");
    std::fs::write(&config, &upstream).expect("write");
    let data = work.path().join("data");
    succeeded(&cli(&config, &data, &["prefetch", "--pin", "demo/app:1.0"]), "prefetch --pin");
    succeeded(&cli(&config, &data, &["prefetch", "demo/tool:2"]), "prefetch");
    let pins = std::fs::read_to_string(data.join("wharf/pins")).expect("pins");
    assert_eq!(pins.lines().collect::<Vec<_>>(), ["docker.io/demo/app:1.0"]);

    // A cap far below what is held: eviction takes all it may.
    let tight = work.path().join("tight.toml");
    std::fs::write(&tight, format!("[cache]\nmax_size = \"1KiB\"\nmin_age = \"0s\"\n{upstream}"))
        .expect("write");
    let report: serde_json::Value =
        serde_json::from_str(&succeeded(&cli(&tight, &data, &["gc", "--json"]), "gc")).expect("json");
    let stored = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        data.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data").exists()
    };
    for b in &app.blobs {
        assert!(stored(b), "{b} of the pinned image stays");
    }
    let manifests: Vec<&String> = [&tool.index].into_iter().chain(&tool.images).collect();
    let evicted: Vec<&String> = tool.blobs.iter().filter(|b| !manifests.contains(b)).collect();
    assert!(!evicted.is_empty());
    for b in evicted {
        assert!(!stored(b), "{b} of the unpinned image is evicted: {report}");
    }
}

/// An address on the loopback interface outside 127.0.0.0/8: a client from it is not local.
const REMOTE_TEST_ADDR: &str = "10.213.7.2";

#[tokio::test(flavor = "multi_thread")]
async fn only_a_local_client_or_a_signed_in_user_may_pin() {
    let _ = Command::new("ip").args(["addr", "add", &format!("{REMOTE_TEST_ADDR}/32"), "dev", "lo"]).status();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    reg.seed(work.path(), "app", "demo/app:1.0", LAYERS);
    let w = Wharf::with_config_listen(
        &format!("[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n", reg.url()),
        None,
        "0.0.0.0:0",
    );
    let port = w.addr.port();
    let accept = "application/vnd.oci.image.index.v1+json";
    let post = |host: &str, query: &str| {
        let url = format!("http://{host}:{port}/_wharf/prefetch/demo/app/manifests/1.0{query}");
        let local = host.parse::<std::net::IpAddr>().expect("address");
        async move {
            let c = reqwest::Client::builder().local_address(local).build().expect("client");
            c.post(url).header("accept", accept).send().await.expect("request")
        }
    };
    // From another address: a prefetch, as a pull would be, but no pin.
    let r = post(REMOTE_TEST_ADDR, "?pin=1").await;
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.expect("OCI error");
    assert_eq!(v["errors"][0]["code"], "DENIED");
    assert_eq!(post(REMOTE_TEST_ADDR, "").await.status(), 200);
    assert!(!w.data.join("wharf/pins").exists(), "nothing pinned");
    // From this host: pinned.
    assert_eq!(post("127.0.0.1", "?pin=1").await.status(), 200);
    let pins = std::fs::read_to_string(w.data.join("wharf/pins")).expect("pins");
    assert_eq!(pins.trim(), "docker.io/demo/app:1.0");
}
