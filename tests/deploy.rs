//! What a deployment leans on: the readiness probe, `wharf check-config`, and failure
//! series that read 0 from the start (so dashboards and alerts never see "no data").

mod common;

use common::{wharf_bin, Registry, Wharf};

#[tokio::test]
async fn ready_says_whether_the_data_dir_takes_writes() {
    let reg = Registry::start();
    let w = Wharf::start(&reg.url(), "");
    let r = reqwest::get(w.url("/_wharf/ready")).await.expect("ready");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["status"], "ready");
    // The data dir stops taking writes (a read-only or lost mount): not ready, with an OCI
    // error that says why; health (liveness) is unaffected.
    let tmp = w.data.join("wharf/tmp");
    let kept = w.data.join("wharf/tmp-kept");
    std::fs::rename(&tmp, &kept).expect("move tmp away");
    std::fs::write(&tmp, b"not a directory").expect("block tmp");
    let r = reqwest::get(w.url("/_wharf/ready")).await.expect("ready");
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    assert!(v["errors"][0]["message"].as_str().expect("message").starts_with("not ready"));
    assert_eq!(reqwest::get(w.url("/_wharf/health")).await.expect("health").status(), 200);
    std::fs::remove_file(&tmp).expect("unblock");
    std::fs::rename(&kept, &tmp).expect("restore tmp");
    assert_eq!(reqwest::get(w.url("/_wharf/ready")).await.expect("ready").status(), 200);
}

#[tokio::test]
async fn failure_series_exist_at_zero_for_every_upstream() {
    let reg = Registry::start();
    let w = Wharf::with_config(&format!(
        "[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n\
         [[upstreams]]\nname = \"other.test\"\nurl = \"{}\"\ninsecure = true\n",
        reg.url(),
        reg.url()
    ));
    let text = reqwest::get(w.url("/metrics")).await.expect("metrics").text().await.expect("text");
    for upstream in ["registry.test", "other.test"] {
        for series in [
            format!("wharf_digest_mismatch_total{{upstream=\"{upstream}\"}} 0"),
            format!("wharf_stale_served_total{{upstream=\"{upstream}\"}} 0"),
            format!("wharf_upstream_errors_total{{kind=\"connect\",upstream=\"{upstream}\"}} 0"),
            format!("wharf_upstream_errors_total{{kind=\"status\",upstream=\"{upstream}\"}} 0"),
        ] {
            assert!(text.lines().any(|l| l == series), "{series} missing");
        }
    }
}

#[test]
fn check_config_prints_the_effective_configuration_without_secrets_or_says_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[upstreams]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nusername = \"me\"\npassword = \"hunter2\"\n\
         [cache]\nmax_size = \"10GiB\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(wharf_bin()).arg("check-config").arg(&good).output().expect("runs");
    let text = common::succeeded(&out, "check-config");
    assert!(!text.contains("hunter2"), "the password is never printed");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["upstreams"][0]["name"], "ghcr.io");
    assert_eq!(v["upstreams"][0]["password"], "<redacted>");
    assert_eq!(v["upstreams"][0]["referrers_ttl"], "5m", "defaults are filled in");
    assert_eq!(v["cache"]["max_size"], (10u64 << 30).to_string());

    for (body, key) in [
        ("[cache]\nmax_size = \"lots\"\n", "max_size"),
        ("[server]\nno_such_key = 1\n", "no_such_key"),
        ("[[upstreams]]\nname = \"x.io\"\nurl = \"http://x.io\"\n", "insecure"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, body).expect("write");
        let out =
            std::process::Command::new(wharf_bin()).arg("check-config").arg(&bad).output().expect("runs");
        assert!(!out.status.success(), "{body} is refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{body}: the error names {key}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_rated_ok_or_better() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/wharf.service"))
        .expect("deploy/systemd/wharf.service");
    for key in ["DynamicUser=yes", "StateDirectory=wharf", "ProtectSystem=strict", "NoNewPrivileges=yes"] {
        assert!(unit.lines().any(|l| l == key), "{key}");
    }
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // verify wants the ExecStart binary to exist: the unit as installed, pointing at this build.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("wharf.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/wharf", wharf_bin())).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    common::succeeded(&out, "systemd-analyze verify");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text.lines().find(|l| l.contains("Overall exposure level")).expect("an overall rating");
    let mut words = overall.rsplit(':').next().unwrap_or_default().split_whitespace();
    let score: f64 = words.next().and_then(|s| s.parse().ok()).expect("a score");
    let level = words.next().unwrap_or_default();
    eprintln!("systemd-analyze security: {score} {level}");
    assert!(matches!(level, "OK" | "SAFE"), "{overall}");
    assert!(score < 2.0, "{overall}");
}

#[tokio::test]
async fn sighup_is_a_reload_not_a_termination() {
    let reg = Registry::start();
    let w = Wharf::start(&reg.url(), "");
    let pid = w.pid().to_string();
    let sent = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(sent.success());
    // The handler has run once it logged; the process must then still be there and serving.
    common::wait_for(10, "the SIGHUP to be handled", || w.log().contains("SIGHUP").then_some(()));
    let alive = std::process::Command::new("kill").args(["-0", &pid]).status().expect("kill -0");
    assert!(alive.success(), "wharf survived SIGHUP");
    assert_eq!(reqwest::get(w.url("/_wharf/health")).await.expect("health").status(), 200);
}

#[test]
fn the_node_examples_are_what_configure_containerd_writes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mirror = url::Url::parse("http://wharf.example.internal:5000").expect("url");
    for r in ["docker.io", "ghcr.io", "registry.internal:5000"] {
        let example = std::fs::read_to_string(root.join("containerd/certs.d").join(r).join("hosts.toml"))
            .unwrap_or_else(|e| panic!("{r}: {e}"));
        let reg = wharf::containerd::Registry::from_host(r).expect("registry");
        assert_eq!(example, wharf::containerd::hosts_toml(&reg, &mirror).expect("hosts.toml"), "{r}");
    }
    let daemon: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("docker/daemon.json")).expect("daemon.json"))
            .expect("JSON");
    assert_eq!(daemon["registry-mirrors"][0], "http://wharf.example.internal:5000");
}

#[test]
fn configure_containerd_hold_keeps_the_node_configured_until_it_is_stopped() {
    let dir = tempfile::tempdir().expect("tmp");
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join("docker.io")).expect("mkdir");
    let original = "server = \"https://registry-1.docker.io\"\n";
    std::fs::write(certs.join("docker.io/hosts.toml"), original).expect("write");
    let mut child = std::process::Command::new(wharf_bin())
        .args([
            "configure-containerd",
            "--hold",
            "--mirror",
            "http://10.96.0.50:5000",
            "--registries",
            "docker.io,quay.io",
            "--dir",
        ])
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("wharf runs");
    common::wait_for(10, "the hosts.toml files", || {
        let hub = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).ok()?;
        (hub.contains("10.96.0.50:5000") && certs.join("quay.io/hosts.toml").exists()).then_some(())
    });
    assert!(child.try_wait().expect("wait").is_none(), "it holds");
    let term =
        std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(term.success());
    let status = common::wait_for(10, "it to stop", || child.try_wait().ok().flatten());
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(certs.join("docker.io/hosts.toml")).expect("read"), original);
    assert!(!certs.join("quay.io").exists(), "restored on SIGTERM");
}
