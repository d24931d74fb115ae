//! Real clients pulling through wharf the way they are deployed: containerd with a
//! `hosts.toml` mirror (which adds `?ns=`), and the docker daemon with `--registry-mirror`.
//! Each runs as a private daemon with its own root, state and socket.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemons::{hosts_dir, Containerd};
use common::docker::Dockerd;
use common::{Registry, Wharf};

const LAYERS: &[usize] = &[2048, 256 * 1024];

#[test]
fn containerd_pulls_through_a_hosts_toml_mirror_with_ns() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "ctr", "demo/app:latest", LAYERS);
    let plain = reg.seed_with(work.path(), "ctr-plain", "demo/plain:latest", LAYERS, false);
    let w = Wharf::start(&reg.url(), "");
    let ctd = Containerd::start();
    let hosts = hosts_dir(work.path(), "registry.test", &w);
    let hosts = hosts.to_str().expect("utf-8 path");

    let ctr = |args: &[&str]| {
        let out = ctd.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let asked = |repo: &str, d: &str| {
        w.log().contains(&format!("uri=/v2/demo/{repo}/manifests/{d}?ns=registry.test"))
    };

    // One platform, pulled and unpacked.
    common::succeeded(&ctd.pull_amd64(Path::new(hosts), "registry.test/demo/app:latest"), "ctr images pull");
    let images = String::from_utf8_lossy(&ctd.ctr(&["images", "ls"]).stdout).into_owned();
    assert!(images.contains(&img.index), "containerd resolved the upstream's index: {images}");
    assert!(asked("app", &img.images[0]), "the linux/amd64 manifest came through wharf");
    assert!(!asked("app", &img.images[1]), "the linux/arm64 manifest was not fetched");
    // HEAD by tag, GET index by digest, GET the amd64 image: one pull of `latest`.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let pulls = |labels: &[(&str, &str)]| rt.block_on(w.metric("wharf_pulls_total", labels));
    assert_eq!(pulls(&[("repository", "demo/app"), ("tag", "latest"), ("platform", "linux/amd64")]), 1.0);
    assert_eq!(pulls(&[]), 1.0);

    // Every platform, including the buildx attestation manifests. (containerd 1.6 cannot
    // unpack attestation manifests, mirror or not, so this one is fetched, not unpacked.)
    ctr(&["content", "fetch", "--hosts-dir", hosts, "--all-platforms", "registry.test/demo/app:latest"]);
    assert!(asked("app", &img.images[1]), "the linux/arm64 manifest came through wharf");
    let content = String::from_utf8_lossy(&ctd.ctr(&["content", "ls", "-q"]).stdout).into_owned();
    for blob in &img.blobs {
        assert!(content.lines().any(|l| l == blob), "{blob} is in containerd's content store");
    }

    // `images pull --all-platforms`, unpacked, on an image without attestations.
    let out = ctd.pull(Path::new(hosts), "registry.test/demo/plain:latest", &["--all-platforms"]);
    common::succeeded(&out, "ctr images pull --all-platforms");
    assert!(asked("plain", &plain.images[0]) && asked("plain", &plain.images[1]));

    let log = w.log();
    assert!(log.contains("uri=/v2/demo/app/manifests/latest?ns=registry.test"), "containerd sent ns=");
    assert!(log.contains("/blobs/sha256:") && log.contains("?ns=registry.test"), "blobs carried ns= too");
}

#[test]
fn docker_daemon_pulls_an_unqualified_name_through_its_registry_mirror() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "dockerd", "library/demo:latest", LAYERS);
    let w = Wharf::with_config(&format!(
        "[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n",
        reg.url()
    ));
    let mirror = format!("http://{}", w.host());
    let d = Dockerd::start(
        &work.path().join("docker"),
        &["--registry-mirror", &mirror, "--insecure-registry", &w.host()],
    );
    let pulled = d.ok(&["pull", "demo:latest"]);
    assert!(pulled.contains(&img.index), "docker reports the upstream's digest: {pulled}");
    let digests = d.ok(&["image", "inspect", "demo:latest", "--format", "{{json .RepoDigests}}"]);
    assert!(digests.contains(&format!("demo@{}", img.index)), "{digests}");
    drop(d);
    let log = w.log();
    assert!(
        log.contains("uri=/v2/library/demo/manifests/latest"),
        "the daemon asked the mirror for library/demo"
    );
    assert!(w.log().contains("method=GET route=\"blob\""), "layers came through wharf");
}

/// An address on the loopback interface outside 127.0.0.0/8: the docker daemon treats
/// every 127.x registry as insecure and then presents no client certificate.
const SECURE_TEST_ADDR: &str = "10.213.7.1";

/// A CA, and a certificate it signed: for `ip` (a server) or with `cn` as its subject
/// (a client).
fn issue(ca_name: &str, ip: Option<&str>, cn: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("self-signed");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("params");
    leaf.distinguished_name.push(DnType::CommonName, cn);
    match ip {
        Some(ip) => {
            leaf.subject_alt_names.push(SanType::IpAddress(ip.parse().expect("ip")));
            leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        None => leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).expect("signed");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn docker_daemon_pulls_with_a_client_certificate_and_clients_without_one_are_refused() {
    let _ = Command::new("ip").args(["addr", "add", &format!("{SECURE_TEST_ADDR}/32"), "dev", "lo"]).status();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "mtls", "library/signed:latest", LAYERS);
    let pki = work.path().join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let (server_ca, server_cert, server_key) = issue("wharf test server CA", Some(SECURE_TEST_ADDR), "wharf");
    let (client_ca, client_cert, client_key) = issue("wharf test client CA", None, "docker-node-1");
    for (name, body) in
        [("server.crt", &server_cert), ("server.key", &server_key), ("clients-ca.pem", &client_ca)]
    {
        std::fs::write(pki.join(name), body).expect("write");
    }
    let w = Wharf::with_config_listen(
        &format!(
            r#"
[tls]
cert_file = "{0}/server.crt"
key_file = "{0}/server.key"
client_ca_file = "{0}/clients-ca.pem"
[auth]
anonymous = false
[[auth.rules]]
repositories = ["docker.io/library/*"]
users = ["docker-node-1"]
[[upstreams]]
name = "docker.io"
url = "{1}"
insecure = true
"#,
            pki.display(),
            reg.url()
        ),
        None,
        &format!("{SECURE_TEST_ADDR}:0"),
    );

    // Without a certificate: refused.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let status = rt.block_on(async {
        let c = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(server_ca.as_bytes()).expect("CA"))
            .build()
            .expect("client");
        let probe = c.get(w.url("/v2/")).send().await.expect("probe").status().as_u16();
        let manifest = c
            .get(w.url("/v2/library/signed/manifests/latest"))
            .send()
            .await
            .expect("manifest")
            .status()
            .as_u16();
        (probe, manifest)
    });
    assert_eq!(status, (401, 401), "a client without a certificate is refused");

    // The docker daemon presents /etc/docker/certs.d/<mirror>/client.cert.
    let certs_d = Path::new("/etc/docker/certs.d").join(w.host());
    std::fs::create_dir_all(&certs_d).expect("certs.d");
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(certs_d.clone());
    for (name, body) in [("ca.crt", &server_ca), ("client.cert", &client_cert), ("client.key", &client_key)] {
        std::fs::write(certs_d.join(name), body).expect("write certs.d");
    }
    let d = Dockerd::start(&work.path().join("docker"), &["--registry-mirror", &w.url("")]);
    let pulled = d.ok(&["pull", "signed:latest"]);
    assert!(pulled.contains(&img.index), "docker pulled the upstream's image through the mirror: {pulled}");
    drop(d);
    assert!(
        w.log().contains("user=\"docker-node-1\"") || w.log().contains("user=docker-node-1"),
        "wharf saw the certificate's user"
    );
    let served = rt.block_on(w.metric("wharf_http_requests_total", &[("route", "blob"), ("status", "200")]));
    assert!(served >= LAYERS.len() as f64, "layers came through wharf: {served}");
}

#[test]
fn containerd_pulls_with_an_authorization_header_from_hosts_toml() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed(work.path(), "ctr-auth", "private/app:latest", LAYERS);
    let pw = work.path().join("htpasswd");
    std::fs::write(&pw, format!("node:{}\n", bcrypt::hash("node-pw", 5).expect("bcrypt"))).expect("htpasswd");
    let w = Wharf::start(&reg.url(), &format!("\n[auth]\nhtpasswd_file = \"{}\"\n", pw.display()));
    let ctd = Containerd::start();
    let hosts = hosts_dir(work.path(), "registry.test", &w);
    let pull = |hosts: &Path| ctd.pull_amd64(hosts, "registry.test/private/app:latest");
    let refused = pull(&hosts);
    assert!(!refused.status.success(), "no header, no pull");
    use base64::Engine as _;
    let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("node:node-pw"));
    let toml = hosts.join("registry.test").join("hosts.toml");
    let mut text = std::fs::read_to_string(&toml).expect("hosts.toml");
    text.push_str(&format!("  [host.\"http://{}\".header]\n    Authorization = \"{header}\"\n", w.host()));
    std::fs::write(&toml, text).expect("hosts.toml");
    let out = pull(&hosts);
    assert!(
        out.status.success(),
        "ctr pull with the header: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let images = String::from_utf8_lossy(&ctd.ctr(&["images", "ls"]).stdout).into_owned();
    assert!(images.contains(&img.index), "containerd resolved the upstream's index: {images}");
    assert!(w.log().contains("user=\"node\"") || w.log().contains("user=node"));
}

/// Every file below `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    common::tree_listing(dir)
        .into_iter()
        .map(|(p, _)| {
            let bytes = std::fs::read(dir.join(&p)).expect("read");
            (p, bytes)
        })
        .collect()
}

#[test]
fn configure_containerd_points_a_node_at_wharf_for_every_upstream_and_restores_it() {
    let (reg, other) = (Registry::start(), Registry::start());
    let work = tempfile::tempdir().expect("tempdir");
    let img = reg.seed_with(work.path(), "node-a", "demo/a:latest", LAYERS, false);
    let img2 = other.seed_with(work.path(), "node-b", "demo/b:latest", LAYERS, false);
    let w = Wharf::with_config(&format!(
        "[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n\
         [[upstreams]]\nname = \"other.test\"\nurl = \"{}\"\ninsecure = true\n",
        reg.url(),
        other.url()
    ));
    // A node that already has a hosts.toml for one registry, and one for a registry wharf
    // does not mirror.
    let certs = work.path().join("certs.d");
    std::fs::create_dir_all(certs.join("registry.test")).expect("mkdir");
    std::fs::create_dir_all(certs.join("quay.io")).expect("mkdir");
    std::fs::write(certs.join("registry.test/hosts.toml"), format!("server = \"{}\"\n", reg.url()))
        .expect("write");
    std::fs::write(certs.join("quay.io/hosts.toml"), "server = \"https://quay.io\"\n").expect("write");
    let before = snapshot(&certs);

    let configure = |extra: &[&str]| {
        let out = Command::new(common::wharf_bin())
            .arg("configure-containerd")
            .args(["--mirror", &format!("http://{}", w.host())])
            .arg("--from-config")
            .arg(&w.config)
            .arg("--dir")
            .arg(&certs)
            .args(extra)
            .output()
            .expect("wharf runs");
        common::succeeded(&out, "configure-containerd")
    };
    let said = configure(&[]);
    assert!(said.contains("registry.test: written (the previous hosts.toml is kept"), "{said}");
    assert!(said.contains("other.test: written"), "{said}");
    let configured = snapshot(&certs);
    let hosts = std::fs::read_to_string(certs.join("other.test/hosts.toml")).expect("hosts.toml");
    assert!(
        hosts.contains(&format!("server = \"{}\"", other.url())),
        "the registry stays the fallback: {hosts}"
    );
    assert!(hosts.contains(&format!("[host.\"http://{}\"]", w.host())));
    // Idempotent.
    let said = configure(&[]);
    assert!(said.contains("registry.test: already configured"), "{said}");
    assert_eq!(snapshot(&certs), configured);

    // containerd pulls both registries' images through wharf.
    let ctd = Containerd::start();
    for image in ["registry.test/demo/a:latest", "other.test/demo/b:latest"] {
        let out = ctd.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            certs.to_str().expect("utf-8"),
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            image,
        ]);
        common::succeeded(&out, &format!("ctr pull {image}"));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for (upstream, manifest) in [("registry.test", &img.images[0]), ("other.test", &img2.images[0])] {
        let served = rt.block_on(w.metric("wharf_manifest_requests_total", &[("upstream", upstream)]));
        assert!(served >= 2.0, "{upstream}: the tag and the image came through wharf ({served})");
        assert!(
            w.log().contains(&format!("{manifest}?ns={upstream}")),
            "{upstream} image manifest via wharf"
        );
    }

    // Restored: the directory is byte for byte what it was.
    let out = Command::new(common::wharf_bin())
        .args(["configure-containerd", "--restore", "--dir"])
        .arg(&certs)
        .output()
        .expect("wharf runs");
    common::succeeded(&out, "configure-containerd --restore");
    assert_eq!(snapshot(&certs), before);
    assert!(!certs.join("other.test").exists());
}
