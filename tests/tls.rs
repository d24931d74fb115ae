//! HTTPS: a test CA signs wharf's certificate; real clients pull over TLS (HTTP/2 by ALPN
//! and HTTP/1.1), and a certificate swap applies to new connections while a long transfer
//! on an old one carries on.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use common::fake::{BlobMode, Fake};
use common::image::{noise, sha256};
use common::{layout_blobs, layout_top_digest, skopeo_try, wait_until, Registry, Wharf};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A CA and a certificate it signed for 127.0.0.1 and localhost.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("wharf test CA {name}"));
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("self-signed");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    leaf.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let leaf_key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).expect("signed");
    Pki { ca: ca_cert.pem(), cert: cert.pem(), key: leaf_key.serialize_pem() }
}

/// Writes the certificate pair atomically (as a secret mount or cert-manager would).
fn install(dir: &Path, p: &Pki) {
    for (name, body) in [("tls.key", &p.key), ("tls.crt", &p.cert)] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, body).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

fn tls_config(dir: &Path, upstream: &str) -> String {
    format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{upstream}\"\ninsecure = true\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    )
}

fn client(ca: &str, http1: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"))
        .pool_max_idle_per_host(0);
    if http1 {
        b = b.http1_only();
    }
    b.build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_pull_over_https_with_the_test_ca() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "tls", "demo/app:latest", &[4096, 200_000]);
    let p = pki("one");
    install(work.path(), &p);
    let w = Wharf::with_config(&tls_config(work.path(), &reg.url()));

    // ALPN: h2 for clients that offer it, HTTP/1.1 for the rest.
    let r = client(&p.ca, false).get(w.url("/v2/")).send().await.expect("https");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let r = client(&p.ca, true).get(w.url("/v2/")).send().await.expect("https/1.1");
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert!(reqwest::get(w.url("/v2/")).await.is_err(), "an untrusted certificate is refused by clients");

    // skopeo, verifying the certificate against the test CA.
    let certs = work.path().join("certs.d");
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::write(certs.join("ca.crt"), &p.ca).expect("ca.crt");
    let out = work.path().join("out");
    skopeo_try(&[
        "copy",
        "-q",
        "--all",
        "--preserve-digests",
        "--src-cert-dir",
        certs.to_str().expect("utf-8"),
        &format!("docker://{}/demo/app:latest", w.host()),
        &format!("oci:{}:x", out.display()),
    ])
    .expect("skopeo over https");
    assert_eq!(layout_top_digest(&out), img.index);
    assert_eq!(layout_blobs(&out), img.blobs.iter().cloned().collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swap_applies_to_new_connections_while_a_long_pull_continues() {
    let fake = Fake::start().await;
    let d = fake.blob(noise("long", 4 << 20));
    fake.set_blob_mode(&d, BlobMode::GatedAfter(64 * 1024));
    let work = tempfile::tempdir().expect("tempdir");
    let (one, two) = (pki("one"), pki("two"));
    install(work.path(), &one);
    let w = Wharf::with_config(&tls_config(work.path(), &fake.url()));

    // A long pull on a connection made with the first certificate.
    let long = {
        let (c, url) = (client(&one.ca, false), w.url(&format!("/v2/app/blobs/{d}")));
        tokio::spawn(async move {
            let r = c.get(url).send().await.map_err(|e| e.to_string())?;
            let status = r.status();
            let body = r.bytes().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body))
        })
    };
    wait_until(20, "the long pull to start", || async {
        (w.metric("wharf_blob_requests_total", &[("result", "miss")]).await >= 1.0).then_some(())
    })
    .await;

    install(work.path(), &two);
    let hup = std::process::Command::new("kill").arg("-HUP").arg(w.pid().to_string()).status().expect("kill");
    assert!(hup.success());
    wait_until(20, "the new certificate on new connections", || async {
        client(&two.ca, false).get(w.url("/v2/")).send().await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    assert!(client(&one.ca, false).get(w.url("/v2/")).send().await.is_err(), "the old certificate is gone");

    fake.open_gate();
    let (status, body) = long.await.expect("task").expect("the long pull completes on its old connection");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), d);
    assert!(w.log().contains("certificate reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_fit_is_refused_and_the_old_certificate_stays() {
    let fake = Fake::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let (one, two) = (pki("one"), pki("two"));
    install(work.path(), &one);
    let w = Wharf::with_config(&tls_config(work.path(), &fake.url()));
    // Only the key is replaced: the pair does not match.
    std::fs::write(work.path().join("tls.key"), &two.key).expect("write");
    let hup = std::process::Command::new("kill").arg("-HUP").arg(w.pid().to_string()).status().expect("kill");
    assert!(hup.success());
    common::wait_for(20, "the refusal to be logged", || {
        w.log().contains("certificate not reloaded").then_some(())
    });
    let r = client(&one.ca, false).get(w.url("/v2/")).send().await.expect("the old certificate still serves");
    assert_eq!(r.status(), 200);
}

/// Threads of a process, from /proc.
fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_readers_hold_no_threads_and_are_dropped_at_the_write_timeout() {
    let fake = Fake::start().await;
    let cached = fake.blob(noise("tls-stalled", 8 << 20));
    let cold = fake.blob(noise("tls-cold", 2 << 20));
    let work = tempfile::tempdir().expect("tempdir");
    let p = pki("stall");
    install(work.path(), &p);
    let w = Wharf::with_config(&format!(
        "[server]\nwrite_timeout = \"20s\"\n{}",
        tls_config(work.path(), &fake.url())
    ));
    let url = |d: &str| w.url(&format!("/v2/app/blobs/{d}"));
    let warm = client(&p.ca, true).get(url(&cached)).send().await.expect("warm").bytes().await.expect("body");
    assert_eq!(sha256(&warm), cached);
    w.settled().await;
    let baseline = threads_of(w.pid());

    // 150 HTTP/1.1 TLS connections that read the response head and nothing more.
    let mut stalled = Vec::new();
    for _ in 0..150 {
        let r = client(&p.ca, true).get(url(&cached)).send().await.expect("response head");
        assert_eq!(r.status(), 200);
        stalled.push(r);
    }
    let pid = w.pid();
    wait_until(18, "the blocking pool to shrink back while 150 readers are stalled", || async move {
        (threads_of(pid) < baseline + 20).then_some(())
    })
    .await;
    let got =
        client(&p.ca, true).get(url(&cold)).send().await.expect("cold").bytes().await.expect("cold body");
    assert_eq!(sha256(&got), cold, "a cold pull goes on meanwhile");

    wait_until(40, "the stalled connections to be dropped", || async {
        let closed = w.metric("wharf_connections_closed_total", &[("reason", "write_timeout")]).await;
        (closed >= 150.0).then_some(closed)
    })
    .await;
    assert_eq!(w.metric("wharf_connections_closed_total", &[("reason", "write_timeout")]).await, 150.0);
    for r in stalled {
        assert!(r.bytes().await.is_err(), "a stalled response is cut, never completed");
    }
}
