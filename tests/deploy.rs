//! What a deployment leans on: the readiness probe, `wharf check-config`, and failure
//! series that read 0 from the start (so dashboards and alerts never see "no data").

mod common;

use std::path::Path;

use common::docker::Dockerd;
use common::{succeeded, wait_for, wharf_bin, Registry, Wharf};

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

/// The container image: the Dockerfile's runtime stage built by a real docker daemon from
/// a static wharf (`scripts/build-static.sh`; `FROM scratch` pulls nothing), run the way
/// the docs say (read-only root, non-root, `/data` volume, config file plus `WHARF_*`),
/// pulled through with skopeo; and the image's `wharf` run as the chart's node-config
/// DaemonSet runs it.
#[test]
fn the_container_image_runs_read_only_as_non_root_and_serves_pulls() {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // A no-op when scripts/test.sh built it already; fresh after a source change otherwise.
    let out =
        Command::new(root.join("scripts/build-static.sh")).arg("dev").output().expect("build-static.sh");
    succeeded(&out, "scripts/build-static.sh dev");

    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "container", "library/demo:latest", &[4096, 300 * 1024]);
    let d = Dockerd::start(&work.path().join("docker"), &[]);
    let tag = "wharf-test:image";
    d.ok(&[
        "build",
        "--build-arg",
        "WHARF_BINARY=prebuilt",
        "--target",
        "runtime",
        "-t",
        tag,
        root.to_str().expect("path"),
    ]);

    // What the image says about itself.
    let config: serde_json::Value =
        serde_json::from_str(&d.ok(&["image", "inspect", "-f", "{{json .Config}}", tag])).expect("json");
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], serde_json::json!(["wharf", "serve"]));
    assert!(config["ExposedPorts"].get("5000/tcp").is_some(), "{config}");
    assert!(config["Volumes"].get("/data").is_some(), "{config}");
    // Its own configuration is valid and keeps the cache on the volume.
    let effective = d.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "wharf",
        tag,
        "check-config",
        "/etc/wharf/config.toml",
    ]);
    let v: serde_json::Value = serde_json::from_str(&effective).expect("effective configuration");
    assert_eq!(v["data_dir"], "/data");
    assert_eq!(v["listen"], "0.0.0.0:5000");

    // Served as documented: a config file mounted over the image's, the listen address from
    // the environment, the cache on a volume owned by the image's user.
    let data = work.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::os::unix::fs::chown(&data, Some(65532), Some(65532)).expect("chown");
    let cfg = work.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"/data\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n",
            // By name: the static binary's resolver reads the /etc/hosts docker provides.
            reg.url().replace("127.0.0.1", "localhost")
        ),
    )
    .expect("write");
    d.ok(&[
        "run",
        "-d",
        "--name",
        "wharf",
        "--network",
        "host",
        "--read-only",
        "-e",
        "WHARF_LISTEN=127.0.0.1:0",
        "-v",
        &format!("{}:/data", data.display()),
        "-v",
        &format!("{}:/etc/wharf/config.toml:ro", cfg.display()),
        tag,
    ]);
    let addr = wait_for(30, "wharf in its container to listen", || {
        if d.ok(&["inspect", "-f", "{{.State.Running}}", "wharf"]).trim() != "true" {
            panic!(
                "the container stopped: {}",
                String::from_utf8_lossy(&d.docker(&["logs", "wharf"]).stderr)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("wharf/server.json")).ok()?).ok()?;
        v["addr"].as_str()?.parse::<std::net::SocketAddr>().ok()
    });
    assert!(addr.ip().is_loopback() && addr.port() != 5000, "WHARF_LISTEN applied: {addr}");

    let pulled = work.path().join("pulled");
    let first = common::pull(&format!("{addr}/library/demo:latest"), &pulled);
    assert!(first.is_ok(), "skopeo pulls through the container: {first:?}\n{}", d.ok(&["logs", "wharf"]));
    assert_eq!(common::layout_top_digest(&pulled), img.index, "the upstream's digest");
    assert_eq!(
        common::layout_blobs(&pulled),
        img.blobs.iter().cloned().collect(),
        "every blob, byte-checked"
    );
    for blob in &img.blobs {
        assert!(reg.blob_gets(blob) <= 1, "{blob} fetched once");
    }

    // The process: not root, on a read-only root filesystem; what it wrote is its own.
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "wharf"]).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uids = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
    assert_eq!(uids.split_whitespace().skip(1).collect::<Vec<_>>(), ["65532"; 4], "{uids}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let rootfs = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/")).expect("the root mount");
    let options = rootfs.split(' ').nth(5).expect("mount options");
    assert!(options.split(',').any(|o| o == "ro"), "root mounted read-only: {rootfs}");
    let index = std::fs::metadata(data.join("wharf/server.json")).expect("server.json");
    assert_eq!((index.uid(), index.gid()), (65532, 65532));

    // A clean exit on `docker stop` (SIGTERM).
    d.ok(&["stop", "wharf"]);
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "wharf"]).trim(), "0");

    // The node-config DaemonSet's command, as it runs it: root, read-only, certs.d mounted.
    let certs = work.path().join("certs.d");
    std::fs::create_dir(&certs).expect("mkdir");
    d.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--user",
        "0",
        "-v",
        &format!("{}:/host/certs.d", certs.display()),
        "--entrypoint",
        "wharf",
        tag,
        "configure-containerd",
        "--mirror=http://10.96.0.50:5000",
        "--dir=/host/certs.d",
        "--registries=docker.io",
    ]);
    let hosts = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).expect("hosts.toml written");
    assert!(hosts.contains("[host.\"http://10.96.0.50:5000\"]"), "{hosts}");
}
