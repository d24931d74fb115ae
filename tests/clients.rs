//! Real clients pulling through wharf the way they are deployed: containerd with a
//! `hosts.toml` mirror (which adds `?ns=`), and the docker daemon with `--registry-mirror`.
//! Each runs as a private daemon with its own root, state and socket.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{wait_for, Registry, Wharf};

const LAYERS: &[usize] = &[2048, 256 * 1024];

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stops a daemon: SIGTERM, then waits for it.
fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Containerd {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("c.sock");
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{}\"\n",
                sock.display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&sock)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd runs (apt-get install containerd)");
        let c = Containerd { child, sock, dir };
        wait_for(30, "containerd to serve", || c.ctr(&["version"]).status.success().then_some(()));
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("300")
            .arg("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "wharf-test"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "{}",
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
            );
        }
    }
}

/// A `hosts.toml` directory naming wharf as the only mirror of `registry`, whose own server
/// is unreachable: a pull can only succeed through wharf.
fn hosts_dir(root: &Path, registry: &str, wharf: &Wharf) -> PathBuf {
    let dir = root.join("hosts.d");
    std::fs::create_dir_all(dir.join(registry)).expect("mkdir");
    std::fs::write(
        dir.join(registry).join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:1\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            wharf.host()
        ),
    )
    .expect("hosts.toml");
    dir
}

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
    ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        hosts,
        "--snapshotter",
        "native",
        "--platform",
        "linux/amd64",
        "registry.test/demo/app:latest",
    ]);
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
    ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        hosts,
        "--snapshotter",
        "native",
        "--all-platforms",
        "registry.test/demo/plain:latest",
    ]);
    assert!(asked("plain", &plain.images[0]) && asked("plain", &plain.images[1]));

    let log = w.log();
    assert!(log.contains("uri=/v2/demo/app/manifests/latest?ns=registry.test"), "containerd sent ns=");
    assert!(log.contains("/blobs/sha256:") && log.contains("?ns=registry.test"), "blobs carried ns= too");
}

fn docker_bin() -> &'static str {
    // Debian's client matches Debian's daemon; another one may be earlier on PATH.
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
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

    let d = work.path().join("docker");
    std::fs::create_dir_all(&d).expect("mkdir");
    let sock = format!("unix://{}/d.sock", d.display());
    let log = std::fs::File::create(d.join("dockerd.log")).expect("log");
    let mut dockerd = Command::new("dockerd")
        .arg("--data-root")
        .arg(d.join("data"))
        .arg("--exec-root")
        .arg(d.join("exec"))
        .arg("--pidfile")
        .arg(d.join("dockerd.pid"))
        .args(["-H", &sock, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none"])
        .args(["--registry-mirror", &format!("http://{}", w.host()), "--insecure-registry", &w.host()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("dockerd runs (apt-get install docker.io)");
    let docker = |args: &[&str]| {
        Command::new("timeout")
            .arg("300")
            .arg(docker_bin())
            .args(["-H", &sock])
            .args(args)
            .stdin(Stdio::null())
            .output()
    };
    let ready = std::panic::catch_unwind(|| {
        wait_for(60, "dockerd to serve", || {
            docker(&["version"]).ok().filter(|o| o.status.success()).map(|_| ())
        })
    });
    let result = ready.and_then(|_| {
        std::panic::catch_unwind(|| {
            let out = run(Command::new("timeout").arg("300").arg(docker_bin()).args([
                "-H",
                &sock,
                "pull",
                "demo:latest",
            ]));
            let pulled = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(pulled.contains(&img.index), "docker reports the upstream's digest: {pulled}");
            let out = run(Command::new(docker_bin()).args([
                "-H",
                &sock,
                "image",
                "inspect",
                "demo:latest",
                "--format",
                "{{json .RepoDigests}}",
            ]));
            let digests = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(digests.contains(&format!("demo@{}", img.index)), "{digests}");
        })
    });
    stop(&mut dockerd);
    let _ = Command::new("umount").arg("-R").arg(d.join("exec")).status();
    if let Err(e) = result {
        eprintln!("{}", std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default());
        std::panic::resume_unwind(e);
    }
    let log = w.log();
    assert!(
        log.contains("uri=/v2/library/demo/manifests/latest"),
        "the daemon asked the mirror for library/demo"
    );
    assert!(w.log().contains("method=GET route=\"blob\""), "layers came through wharf");
}
