//! Downstream access control through the real binary: htpasswd users and per-repository
//! rules with skopeo against a real upstream, the 401 challenge clients probe for, the
//! slowdown after failures, htpasswd reload, and upstream credentials that never leak.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fake::Fake;
use common::image::{noise, sha256};
use common::{skopeo_try, wait_until, Registry, Wharf};

const LAYERS: &[usize] = &[2048, 64 * 1024];

fn htpasswd(path: &Path, users: &[(&str, &str)]) {
    let lines: String =
        users.iter().map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 5).expect("bcrypt"))).collect();
    // Written whole and renamed, as a secret mount or a config tool replaces it.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, lines).expect("write htpasswd");
    std::fs::rename(&tmp, path).expect("rename htpasswd");
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// `skopeo copy` of `image` through wharf with `creds` (none: anonymous); the error text
/// when it fails.
fn pull(w: &Wharf, image: &str, creds: Option<&str>, out: &Path) -> Result<String, String> {
    let src = format!("docker://{}/{image}", w.host());
    let dest = format!("oci:{}:pulled", out.display());
    let mut args = vec!["copy", "-q", "--all", "--preserve-digests", "--src-tls-verify=false"];
    if let Some(c) = creds {
        args.push("--src-creds");
        args.push(c);
    }
    args.push(&src);
    args.push(&dest);
    let res = skopeo_try(&args);
    let _ = std::fs::remove_dir_all(out);
    res
}

#[test]
fn htpasswd_users_pull_what_their_rules_allow_with_skopeo() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let team = reg.seed(work.path(), "team", "team/app:1.0", LAYERS);
    let public = reg.seed(work.path(), "public", "public/tool:1.0", LAYERS);
    let pw = work.path().join("htpasswd");
    htpasswd(&pw, &[("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "carol-pw")]);
    let w = Wharf::with_config(&format!(
        r#"
[auth]
htpasswd_file = "{}"
[auth.groups]
platform = ["carol"]
[[auth.rules]]
repositories = ["registry.test/team/**"]
users = ["alice"]
groups = ["platform"]
[[auth.rules]]
repositories = ["registry.test/public/*"]
anonymous = true
[[upstreams]]
name = "registry.test"
url = "{}"
insecure = true
"#,
        pw.display(),
        reg.url()
    ));
    let out = work.path().join("out");

    pull(&w, "team/app:1.0", Some("alice:alice-pw"), &out).expect("alice may pull team/app");
    pull(&w, "team/app:1.0", Some("carol:carol-pw"), &out).expect("carol may, by her group");
    let bob = pull(&w, "team/app:1.0", Some("bob:bob-pw"), &out).expect_err("bob may not");
    assert!(bob.contains("denied") || bob.contains("403"), "bob is refused with DENIED: {bob}");
    let anon = pull(&w, "team/app:1.0", None, &out).expect_err("anonymous may not");
    assert!(anon.contains("unauthorized") || anon.contains("401"), "anonymous is challenged: {anon}");
    pull(&w, "public/tool:1.0", None, &out).expect("anonymous may pull public/*");
    pull(&w, "public/tool:1.0", Some("bob:bob-pw"), &out).expect("and so may bob");
    let wrong = pull(&w, "public/tool:1.0", Some("alice:nope"), &out).expect_err("a wrong password fails");
    assert!(wrong.contains("unauthorized") || wrong.contains("401"), "{wrong}");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        assert!(w.metric("wharf_auth_failures_total", &[("reason", "forbidden")]).await >= 1.0);
        assert!(w.metric("wharf_auth_failures_total", &[("reason", "bad_password")]).await >= 1.0);
        // What was allowed went through the cache: the digests are the upstream's.
        let m = reqwest::Client::new()
            .get(w.url("/v2/team/app/manifests/1.0"))
            .header("authorization", basic("alice", "alice-pw"))
            .header("accept", "application/vnd.oci.image.index.v1+json")
            .send()
            .await
            .expect("manifest");
        assert_eq!(m.status(), 200);
        assert_eq!(sha256(&m.bytes().await.expect("bytes")), team.index);
        let m =
            reqwest::get(w.url(&format!("/v2/public/tool/manifests/{}", public.index))).await.expect("get");
        assert_eq!(m.status(), 200);
    });
}

#[tokio::test]
async fn an_anonymous_probe_is_challenged_and_credentials_open_the_api_and_metrics() {
    let fake = Fake::start().await;
    let blob = noise("auth-blob", 4096);
    let d = fake.blob(blob.clone());
    let dir = tempfile::tempdir().expect("tmp");
    let pw = dir.path().join("htpasswd");
    htpasswd(&pw, &[("alice", "alice-pw")]);
    let w = Wharf::with_config(&format!(
        "[auth]\nhtpasswd_file = \"{}\"\nrealm = \"wharf-test\"\nprotect_admin = true\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
        pw.display(),
        fake.url()
    ));
    let c = reqwest::Client::new();
    let r = c.get(w.url("/v2/")).send().await.expect("probe");
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        format!("Bearer realm=\"http://{}/_wharf/token\",service=\"wharf-test\"", w.host()).as_str()
    );
    let body: serde_json::Value = r.json().await.expect("OCI error JSON");
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    let r = c.get(w.url(&format!("/v2/app/blobs/{d}"))).send().await.expect("blob");
    assert_eq!(r.status(), 401, "no pull without credentials");
    assert_eq!(fake.seen().len(), 0, "a refused request never reaches the upstream");
    assert_eq!(c.get(w.url("/_wharf/health")).send().await.expect("health").status(), 200);
    assert_eq!(c.get(w.url("/metrics")).send().await.expect("metrics").status(), 401);

    let alice = basic("alice", "alice-pw");
    let r = c.get(w.url("/v2/")).header("authorization", &alice).send().await.expect("probe");
    assert_eq!(r.status(), 200);
    let r = c
        .get(w.url(&format!("/v2/app/blobs/{d}")))
        .header("authorization", &alice)
        .send()
        .await
        .expect("blob");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("bytes").as_ref(), &blob[..]);
    let m = c.get(w.url("/metrics")).header("authorization", &alice).send().await.expect("metrics");
    assert_eq!(m.status(), 200);
    let text = m.text().await.expect("text");

    // The token flow clients follow after the Bearer challenge.
    let token_url = w.url("/_wharf/token?service=wharf-test&scope=repository:app:pull");
    let t: serde_json::Value = c
        .get(&token_url)
        .header("authorization", &alice)
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    assert_eq!(t["expires_in"], 300);
    let bearer = format!("Bearer {}", t["token"].as_str().expect("token"));
    let r = c
        .get(w.url(&format!("/v2/app/blobs/{d}")))
        .header("authorization", &bearer)
        .send()
        .await
        .expect("blob");
    assert_eq!(r.status(), 200, "alice's token pulls");
    let anon: serde_json::Value = c.get(&token_url).send().await.expect("token").json().await.expect("json");
    let anon = format!("Bearer {}", anon["token"].as_str().expect("token"));
    let r = c.get(w.url("/v2/")).header("authorization", &anon).send().await.expect("probe");
    assert_eq!(r.status(), 401, "an anonymous token opens nothing anonymous may not do");
    let r = c.get(w.url("/v2/")).header("authorization", format!("{bearer}x")).send().await.expect("probe");
    assert_eq!(r.status(), 401, "a tampered token is refused");
    let r = c.get(&token_url).header("authorization", basic("alice", "wrong")).send().await.expect("token");
    assert_eq!(r.status(), 401, "no token for wrong credentials");
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"wharf-test\"");

    // Junk in the header is a clear 401, counted as malformed.
    for junk in ["Digest abc", "Basic !!!", "Basic"] {
        let r = c.get(w.url("/v2/")).header("authorization", junk).send().await.expect("junk");
        assert_eq!(r.status(), 401, "{junk}");
    }
    let malformed = common::metric_sum(&text, "wharf_auth_failures_total", &[("reason", "malformed")]);
    assert_eq!(malformed, 0.0);
    let text = c
        .get(w.url("/metrics"))
        .header("authorization", &alice)
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert_eq!(common::metric_sum(&text, "wharf_auth_failures_total", &[("reason", "malformed")]), 3.0);
    assert_eq!(
        common::metric_sum(&text, "wharf_auth_failures_total", &[("reason", "bad_token")]),
        1.0,
        "the tampered token"
    );
}

#[tokio::test]
async fn failed_logins_are_counted_and_slowed_down_per_client_address() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let pw = dir.path().join("htpasswd");
    htpasswd(&pw, &[("alice", "alice-pw")]);
    let w = Wharf::with_config(&format!(
        "[auth]\nhtpasswd_file = \"{}\"\nmax_failure_delay = \"1s\"\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
        pw.display(),
        fake.url()
    ));
    let c = reqwest::Client::new();
    let wrong = basic("alice", "guess");
    let mut waits = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = c.get(w.url("/v2/")).header("authorization", &wrong).send().await.expect("attempt");
        assert_eq!(r.status(), 401);
        waits.push(t.elapsed());
    }
    // 100, 200, 400, 800 ms, then the 1 s ceiling.
    assert!(waits[3] >= Duration::from_millis(800), "the 4th failure waited {:?}", waits[3]);
    assert!(waits[4] >= Duration::from_millis(1000), "the 5th failure waited {:?}", waits[4]);
    let r =
        c.get(w.url("/v2/")).header("authorization", basic("mallory", "x")).send().await.expect("unknown");
    assert_eq!(r.status(), 401);
    assert_eq!(w.metric("wharf_auth_failures_total", &[("reason", "bad_password")]).await, 5.0);
    assert_eq!(w.metric("wharf_auth_failures_total", &[("reason", "unknown_user")]).await, 1.0);
    // The right password is let in, and the log names the reason, never the secret.
    let r =
        c.get(w.url("/v2/")).header("authorization", basic("alice", "alice-pw")).send().await.expect("ok");
    assert_eq!(r.status(), 200);
    let log = w.log();
    assert!(log.contains("reason=\"bad_password\"") || log.contains("reason=bad_password"));
    assert!(!log.contains("guess") && !log.contains("alice-pw"), "no password in the log");
}

#[tokio::test]
async fn the_htpasswd_file_is_reloaded_when_it_changes() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let pw = dir.path().join("htpasswd");
    htpasswd(&pw, &[("alice", "old-pw")]);
    let w = Wharf::with_config(&format!(
        "[auth]\nhtpasswd_file = \"{}\"\nmax_failure_delay = \"100ms\"\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
        pw.display(),
        fake.url()
    ));
    let c = reqwest::Client::new();
    let probe = |user: &'static str, pass: &'static str| {
        let (c, url) = (c.clone(), w.url("/v2/"));
        async move {
            c.get(url)
                .header("authorization", basic(user, pass))
                .send()
                .await
                .expect("probe")
                .status()
                .as_u16()
        }
    };
    assert_eq!(probe("alice", "old-pw").await, 200);
    htpasswd(&pw, &[("alice", "new-pw"), ("dave", "dave-pw")]);
    wait_until(10, "the new htpasswd to be in force", || async {
        (probe("alice", "new-pw").await == 200).then_some(())
    })
    .await;
    assert_eq!(probe("alice", "old-pw").await, 401, "the old password no longer works");
    assert_eq!(probe("dave", "dave-pw").await, 200, "a new user is let in");
    // A file that does not parse leaves the last good one in force.
    std::fs::write(&pw, "alice:$apr1$not-bcrypt\n").expect("write");
    assert_eq!(probe("dave", "dave-pw").await, 200);
}

#[tokio::test]
async fn upstream_credentials_never_reach_clients_logs_or_metrics() {
    let fake = Fake::start().await;
    let secret = "upstream-s3cret-pw";
    fake.require_basic(&basic("mirror-bot", secret));
    let blob = noise("cred-blob", 2048);
    let d = fake.blob(blob.clone());
    let w = Wharf::with_config(&format!(
        "[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\nusername = \"mirror-bot\"\npassword = \"{secret}\"\n",
        fake.url()
    ));
    let c = reqwest::Client::new();
    let mut seen_by_client = String::new();
    for path in [
        format!("/v2/app/blobs/{d}"),
        format!("/v2/app/blobs/sha256:{}", "0".repeat(64)),
        "/v2/app/manifests/missing".to_owned(),
        "/v2/app/tags/list".to_owned(),
        "/v2/".to_owned(),
    ] {
        let r = c.get(w.url(&path)).send().await.expect("answer");
        seen_by_client.push_str(&format!("{:?}", r.headers()));
        seen_by_client.push_str(&r.text().await.unwrap_or_default());
    }
    let metrics = c.get(w.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let encoded = basic("mirror-bot", secret);
    for (what, text) in [("responses", &seen_by_client), ("metrics", &metrics), ("log", &w.log())] {
        assert!(!text.contains(secret), "the upstream password is in the {what}");
        assert!(!text.contains(&encoded[6..]), "the encoded upstream credentials are in the {what}");
    }
    assert!(
        fake.seen().iter().any(|s| s.authorization.as_deref() == Some(encoded.as_str())),
        "the upstream did get them"
    );
}
