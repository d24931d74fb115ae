//! Test harness: the real `wharf` binary on port 0, a real CNCF distribution registry as the
//! upstream, OCI image layouts written here and pushed with skopeo, and helpers that wait on
//! conditions with deadlines.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod daemons;
pub mod docker;
pub mod fake;
pub mod image;
pub mod push;
pub mod s3;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The stdout of a command that must have succeeded; its output in the panic otherwise.
pub fn succeeded(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where scripts/test.sh installs the Python test tools (oras, kubernetes-validate).
pub fn python_path() -> String {
    std::env::var("WHARF_TEST_PYTHONPATH")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/python").to_owned())
}

/// Polls `f` until it returns `Some`, or panics with `what` after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async twin of [`wait_for`].
pub async fn wait_until<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Now, in milliseconds since the Unix epoch (wharf's access times).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn http_ok(url: &str) -> bool {
    // -k: readiness only; certificate checks are the TLS tests' business.
    let Ok(out) =
        Command::new("curl").args(["-sk", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}", url]).output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).starts_with('2')
}

/// Kills `pid` once this test process is gone, even if it dies without unwinding.
pub fn reap_with_me(pid: u32) {
    let me = std::process::id();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// A CNCF distribution registry (Debian `docker-registry`) on a loopback port.
pub struct Registry {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub root: PathBuf,
    _dir: Option<TempDir>,
}

impl Registry {
    /// A fresh registry with its own storage.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root).expect("mkdir");
        let mut r = Registry::serve(&root, false);
        r._dir = Some(dir);
        r
    }

    /// A registry serving an existing storage root (read-only: deletes disabled, no pushes made).
    pub fn serve(root: &Path, read_only: bool) -> Registry {
        for _ in 0..3 {
            let port = free_port();
            let cfg_dir = root.parent().expect("root has a parent").to_path_buf();
            let cfg = cfg_dir.join(format!("registry-{port}.yml"));
            let ro = if read_only { "  maintenance:\n    readonly:\n      enabled: true\n" } else { "" };
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n{ro}http:\n  addr: 127.0.0.1:{port}\n  secret: test\n",
                    root.display()
                ),
            )
            .expect("write registry config");
            let log = std::fs::File::create(cfg_dir.join(format!("registry-{port}.log"))).expect("log");
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("docker-registry runs (apt-get install docker-registry)");
            reap_with_me(child.id());
            let mut reg = Registry {
                child: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                root: root.to_path_buf(),
                _dir: None,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if http_ok(&format!("http://{}/v2/", reg.addr)) {
                    return reg;
                }
                if let Some(c) = reg.child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        break; // port taken between our probe and its bind: try another
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            reg.stop();
        }
        panic!("docker-registry did not start");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many GETs of blob `digest` the registry's access log shows.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log =
            self.root.parent().expect("root has a parent").join(format!("registry-{}.log", self.addr.port()));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let needle = format!("/blobs/{digest} ");
        text.lines().filter(|l| l.contains("\"GET /v2/") && l.contains(&needle)).count()
    }

    /// How many requests the registry's access log shows whose line contains `needle`.
    pub fn requests(&self, needle: &str) -> usize {
        let log =
            self.root.parent().expect("root has a parent").join(format!("registry-{}.log", self.addr.port()));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("\"GET /v2/") || l.contains("\"HEAD /v2/"))
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Writes a multi-platform image (with attestations) under `work/<seed>` and pushes it
    /// as `reference` (`repo:tag`).
    pub fn seed(&self, work: &Path, seed: &str, reference: &str, sizes: &[usize]) -> image::Layout {
        self.seed_with(work, seed, reference, sizes, true)
    }

    /// [`Registry::seed`], with or without attestation manifests.
    pub fn seed_with(
        &self,
        work: &Path,
        seed: &str,
        reference: &str,
        sizes: &[usize],
        attest: bool,
    ) -> image::Layout {
        let dir = work.join(seed);
        let layout = image::write_layout_with(&dir, seed, "img", sizes, attest);
        push(&dir, "img", &format!("{}/{reference}", self.addr));
        layout
    }

    /// Stops the registry (the upstream goes away).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs skopeo with a deadline; panics with its output when it fails.
pub fn skopeo(args: &[&str]) -> String {
    let out = skopeo_try(args);
    match out {
        Ok(s) => s,
        Err(e) => panic!("skopeo {args:?} failed: {e}"),
    }
}

pub fn skopeo_try(args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("300")
        .arg("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("skopeo runs (apt-get install skopeo)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// `skopeo copy --all` from an OCI layout to a registry over plain http.
pub fn push(layout: &Path, reference: &str, dest: &str) {
    skopeo(&[
        "copy",
        "-q",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:{reference}", layout.display()),
        &format!("docker://{dest}"),
    ]);
}

/// `skopeo copy --all` from a registry over plain http into a new OCI layout.
pub fn pull(src: &str, out: &Path) -> Result<String, String> {
    skopeo_try(&[
        "copy",
        "-q",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{src}"),
        &format!("oci:{}:pulled", out.display()),
    ])
}

/// The real `wharf` binary, serving on a loopback port it chose itself.
pub struct Wharf {
    child: Option<Child>,
    /// `https` when the configuration has a `[tls]` table.
    pub scheme: &'static str,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    dir: TempDir,
    /// `--listen` for each start.
    listen: String,
}

/// The wharf CLI on a data dir with a configuration file (no server of the test's).
pub fn wharf_cli(config: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(wharf_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("wharf runs")
}

pub fn wharf_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wharf")
}

impl Wharf {
    /// Starts wharf with one upstream named `registry.test` at `upstream` and extra TOML
    /// lines for that upstream (e.g. `response_timeout = "1s"`).
    pub fn start(upstream: &str, upstream_extra: &str) -> Wharf {
        Wharf::with_config(&format!(
            "[[upstreams]]\nname = \"registry.test\"\nurl = \"{upstream}\"\ninsecure = true\n{upstream_extra}\n"
        ))
    }

    /// Starts wharf with this configuration (listen address and data dir are set here).
    pub fn with_config(toml: &str) -> Wharf {
        Wharf::with_config_at(toml, None)
    }

    /// [`Wharf::with_config`], with the data dir at `data` (e.g. a small file system).
    pub fn with_config_at(toml: &str, data: Option<PathBuf>) -> Wharf {
        Wharf::with_config_listen(toml, data, "127.0.0.1:0")
    }

    /// [`Wharf::with_config_at`], listening on `listen` (e.g. an address that is not
    /// loopback, which the docker daemon treats as secure).
    pub fn with_config_listen(toml: &str, data: Option<PathBuf>, listen: &str) -> Wharf {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("wharf.toml");
        std::fs::write(&config, format!("shutdown_grace = \"5s\"\n{toml}")).expect("write config");
        let data = data.unwrap_or_else(|| dir.path().join("data"));
        let log = dir.path().join("wharf.log");
        let scheme = if toml.contains("[tls]") { "https" } else { "http" };
        let mut w = Wharf {
            child: None,
            scheme,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            config,
            log,
            dir,
            listen: listen.to_owned(),
        };
        w.launch();
        w
    }

    fn launch(&mut self) {
        let _ = std::fs::remove_file(self.data.join("wharf/server.json"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let child = Command::new(wharf_bin())
            .args(["serve", "--listen", &self.listen, "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data)
            .env("RUST_LOG", "wharf=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("wharf starts");
        reap_with_me(child.id());
        self.child = Some(child);
        let info = self.data.join("wharf/server.json");
        let addr = wait_for(20, "wharf to listen", || {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&info).ok()?).ok()?;
            v["addr"].as_str()?.parse::<SocketAddr>().ok()
        });
        self.addr = addr;
        let scheme = self.scheme;
        // Health, not /v2/: with access control /v2/ answers 401 to an anonymous probe.
        wait_for(20, "wharf to answer", || {
            http_ok(&format!("{scheme}://{addr}/_wharf/health")).then_some(())
        });
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The admin listener's address (`admin.listen`, or its old name `metrics.listen`),
    /// when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.data.join("wharf/server.json")).ok()?).ok()?;
        v["metrics_addr"].as_str()?.parse().ok()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("wharf is running").id()
    }

    /// `host:port` for image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("wharf is running");
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        wait_for(30, "wharf to exit after SIGTERM", || c.try_wait().ok().flatten())
    }

    /// SIGKILL: no shutdown, no flush, whatever was under way.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts wharf again after [`Wharf::kill9`] or [`Wharf::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "wharf is still running");
        self.launch();
    }

    pub fn restart(&mut self) {
        if self.child.is_some() {
            assert!(self.stop().success(), "wharf exits cleanly on SIGTERM");
        }
        self.launch();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn tmp(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the wharf CLI against this instance's data dir.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(wharf_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data)
            .output()
            .expect("wharf cli runs")
    }

    /// GETs `path` from wharf and parses the JSON answer.
    pub async fn json(&self, path: &str) -> serde_json::Value {
        let r = reqwest::get(self.url(path)).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        r.json().await.unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// Waits until nothing is being stored: no blob download and no manifest write in
    /// flight (clients get bytes before they are stored).
    pub async fn settled(&self) {
        wait_until(30, "downloads and manifest writes to finish", || async {
            let busy = self.metric("wharf_inflight_downloads", &[]).await
                + self.metric("wharf_inflight_manifest_writes", &[]).await;
            (busy == 0.0).then_some(())
        })
        .await;
    }

    /// Sum of every series of `name` whose labels include all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // Certificates are the TLS tests' business; metrics are read whatever they are.
        let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().expect("client");
        // With an admin listener, metrics are served there only.
        let url = match self.metrics_addr() {
            Some(a) => format!("http://{a}/metrics"),
            None => self.url("/metrics"),
        };
        let text = client.get(url).send().await.expect("metrics").text().await.expect("metrics text");
        metric_sum(&text, name, labels)
    }
}

/// Sums the series of `name` in a Prometheus text exposition that carry all `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

impl Drop for Wharf {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- wharf log (last lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Every blob digest (`sha256:<hex>`) in an OCI layout.
pub fn layout_blobs(layout: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("layout has blobs")
        .map(|e| format!("sha256:{}", e.expect("entry").file_name().to_string_lossy()))
        .collect()
}

/// The digest of the top manifest in an OCI layout's index.json.
pub fn layout_top_digest(layout: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json")).expect("json");
    v["manifests"][0]["digest"].as_str().expect("digest").to_owned()
}

/// A client that sends `GET path`, reads the response head (returned), then stops reading:
/// with a small receive buffer it stays mid-transfer for any body much larger than 64 KiB.
pub async fn stalled_get(addr: SocketAddr, path: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.windows(4).any(|h| h == b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("response head");
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Every blob file in wharf's storage tree whose bytes do not hash to its name.
pub fn damaged_blobs(data: &Path) -> Vec<String> {
    let root = data.join("docker/registry/v2/blobs/sha256");
    let mut bad = Vec::new();
    for (path, _) in tree_listing(&root) {
        let Some(hex) = path.strip_suffix("/data").and_then(|p| p.rsplit('/').next()) else { continue };
        let bytes = std::fs::read(root.join(&path)).expect("read blob");
        if image::sha256(&bytes) != format!("sha256:{hex}") {
            bad.push(path);
        }
    }
    bad
}

/// Whether blob `digest` is in wharf's storage tree.
pub fn in_tree(data: &Path, digest: &str) -> bool {
    let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    data.join("docker/registry/v2/blobs").join(alg).join(&hex[..2]).join(hex).join("data").exists()
}

/// Every file below `dir`, with its size, for before/after comparisons.
pub fn tree_listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((p.strip_prefix(dir).expect("below").display().to_string(), len));
            }
        }
    }
    out.sort();
    out
}

/// Stops a daemon: SIGTERM, then waits for it.
pub fn stop_child(child: &mut Child) {
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
