//! Cache-lifecycle benchmark (not a timed test): start-up of the real binary over a large
//! synthetic data dir, a full index rebuild (the path after a crash), and an eviction pass
//! over many cached blobs, alone and under small-blob load.
//!
//! `cargo bench --bench lifecycle` (release). Sizes: `BLOBS` (1,000,000), `TAGS` (100,000),
//! `EVICT_BLOBS` (100,000); `BENCH_DIR` keeps the generated data dirs between runs. The
//! load part needs `wrk` (`apt-get install wrk`); without it that part is skipped.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const UPSTREAM: &str = "registry.test";

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn put_blob(v2: &Path, bytes: &[u8]) -> String {
    let hex = hex_of(bytes);
    let dir = v2.join("blobs/sha256").join(&hex[..2]).join(&hex);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("data"), bytes).expect("blob");
    hex
}

fn link(path: PathBuf, hex: &str) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, format!("sha256:{hex}")).expect("link");
}

/// A data dir with `blobs` blobs of `blob_size` bytes and `tags` tags (10 per repository),
/// each tag's manifest naming four of the blobs. Kept when already generated.
fn generate(dir: &Path, blobs: usize, blob_size: usize, tags: usize) {
    let marker = dir.join(format!(".generated-{blobs}-{blob_size}-{tags}"));
    if marker.exists() {
        return;
    }
    let _ = fs::remove_dir_all(dir);
    let v2 = dir.join("docker/registry/v2");
    let t = Instant::now();
    let mut hexes = Vec::with_capacity(blobs);
    let mut body = vec![0u8; blob_size.max(8)];
    for i in 0..blobs {
        body[..8].copy_from_slice(&(i as u64).to_le_bytes());
        hexes.push(put_blob(&v2, &body[..blob_size.max(8)]));
    }
    for t_i in 0..tags {
        let pick = |k: usize| &hexes[(t_i * 4 + k) % hexes.len()];
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"digest":"sha256:{}","size":8}},"layers":[{{"digest":"sha256:{}","size":8}},{{"digest":"sha256:{}","size":8}},{{"digest":"sha256:{}","size":8}}]}}"#,
            pick(0),
            pick(1),
            pick(2),
            pick(3)
        );
        let m = put_blob(&v2, manifest.as_bytes());
        let repo = v2.join(format!("repositories/{UPSTREAM}/bench/r{}", t_i / 10));
        let tag = repo.join(format!("_manifests/tags/t{}", t_i % 10));
        link(repo.join("_manifests/revisions/sha256").join(&m).join("link"), &m);
        link(tag.join("current/link"), &m);
        link(tag.join("index/sha256").join(&m).join("link"), &m);
    }
    fs::write(&marker, b"").expect("marker");
    eprintln!("generated {blobs} blobs and {tags} tags in {:.1}s", t.elapsed().as_secs_f64());
}

fn config_file(dir: &Path, cache: &str) -> PathBuf {
    let path = dir.join("bench-wharf.toml");
    // The upstream is never asked: everything the benchmark requests is cached.
    let toml = format!(
        "[cache]\n{cache}\n[[upstreams]]\nname = \"{UPSTREAM}\"\nurl = \"http://127.0.0.1:9\"\ninsecure = true\n"
    );
    fs::write(&path, toml).expect("config");
    path
}

fn wharf_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("bench exe");
    // target/release/deps/lifecycle-… → target/release/wharf
    exe.parent().and_then(Path::parent).map(|p| p.join("wharf")).expect("target dir")
}

struct Server {
    child: std::process::Child,
    addr: String,
}

impl Server {
    /// Starts the binary; returns it and the time to its first answered `GET /v2/`.
    fn start(config: &Path, data: &Path) -> (Server, Duration) {
        let _ = fs::remove_file(data.join("wharf/server.json"));
        let t = Instant::now();
        let child = Command::new(wharf_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wharf starts (cargo build --release first)");
        let info = data.join("wharf/server.json");
        let deadline = Instant::now() + Duration::from_secs(600);
        let addr = loop {
            assert!(Instant::now() < deadline, "wharf did not start");
            if let Some(a) = fs::read(&info)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["addr"].as_str().map(str::to_owned))
            {
                break a;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        loop {
            if get(&addr, "/v2/").is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "wharf did not answer");
            std::thread::sleep(Duration::from_millis(1));
        }
        (Server { child, addr }, t.elapsed())
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request; the status and body, when it answers.
fn request(addr: &str, method: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(600))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| out[i + 4..].to_vec())?;
    Some((status, body))
}

fn get(addr: &str, path: &str) -> Option<Vec<u8>> {
    request(addr, "GET", path).filter(|(s, _)| *s == 200).map(|(_, b)| b)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Runs wrk against `url`; its p99 latency in milliseconds and requests per second.
fn wrk(url: &str, seconds: u64) -> Option<(f64, f64)> {
    let out =
        Command::new("wrk").args(["-t1", "-c8", &format!("-d{seconds}s"), "--latency", url]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |v: &str| -> Option<f64> {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let p99 = text.lines().find_map(|l| l.trim().strip_prefix("99%").map(|v| v.trim().to_owned()))?;
    let rps = text.lines().find_map(|l| l.strip_prefix("Requests/sec:").map(|v| v.trim().to_owned()))?;
    Some((ms(&p99)?, rps.parse().ok()?))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    let root = match std::env::var("BENCH_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => std::env::temp_dir().join("wharf-lifecycle-bench"),
    };
    let (blobs, tags, evict_blobs) =
        (env_usize("BLOBS", 1_000_000), env_usize("TAGS", 100_000), env_usize("EVICT_BLOBS", 100_000));
    let mut report = String::new();
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "startup,evict".into());

    // Start-up over a large index.
    let big = root.join("startup");
    if parts.contains("startup") {
        generate(&big, blobs, 8, tags);
        let config = config_file(&root, "");
        let _ = fs::remove_file(big.join("wharf/clean"));
        let (s, first) = Server::start(&config, &big);
        s.stop();
        writeln!(
            report,
            "index rebuilt from the tree ({blobs} blobs, {tags} tags), first start: {:.1} s",
            first.as_secs_f64()
        )
        .ok();
        let mut times = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..3 {
            let (s, t) = Server::start(&config, &big);
            times.push(t.as_secs_f64());
            rss.push(s.peak_rss_mib());
            s.stop();
        }
        writeln!(
            report,
            "clean start-up to first answer: median {:.3} s (runs {:?}), peak RSS {:.1} MiB",
            median(times.clone()),
            times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>(),
            median(rss)
        )
        .ok();
    }

    // One eviction pass over many small cached blobs, every one of them referenced by a
    // manifest (so garbage collection takes none): the cap is what the blobs alone take,
    // so the manifests put it over and eviction frees down to the 0.9 watermark.
    let size = 4096;
    let evict = root.join("evict");
    if !parts.contains("evict") {
        print!("{report}");
        return;
    }
    generate(&evict, evict_blobs, size, evict_blobs / 4);
    let total = (evict_blobs * size) as u64;
    let cfg =
        config_file(&root, &format!("max_size = \"{total}\"\nmin_age = \"0s\"\ngc_interval = \"100d\""));
    let copy = root.join("evict-copy");
    let reps = env_usize("EVICT_REPS", 3);
    let runs = std::iter::once(("alone", false)).chain(std::iter::repeat_n(("under load", true), reps));
    let mut ratios = Vec::new();
    for (label, with_load) in runs {
        let _ = fs::remove_dir_all(&copy);
        let st = Command::new("cp").arg("-a").arg(&evict).arg(&copy).status().expect("cp");
        assert!(st.success());
        let (s, _) = Server::start(&cfg, &copy);
        // A hot small blob (a layer of the first tag) for the load.
        let hot = fs::read_dir(copy.join("docker/registry/v2/blobs/sha256"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| fs::read_dir(e.path()).ok()?.next()?.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .expect("a blob");
        let url = format!("http://{}/v2/bench/r0/blobs/sha256:{hot}", s.addr);
        let have_wrk = Command::new("wrk").arg("--version").output().is_ok();
        let baseline = if with_load && have_wrk { wrk(&url, 5) } else { None };
        let load = (with_load && have_wrk).then(|| {
            let url = url.clone();
            std::thread::spawn(move || wrk(&url, 8))
        });
        if load.is_some() {
            std::thread::sleep(Duration::from_secs(1));
        }
        let cpu0 = cpu_seconds(s.child.id());
        let t = Instant::now();
        let (status, body) = request(&s.addr, "POST", "/_wharf/gc").expect("gc answers");
        let wall = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds(s.child.id()) - cpu0;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let r: serde_json::Value = serde_json::from_slice(&body).expect("gc json");
        let evicted = r["by_reason"]["lru"]["blobs"].as_u64().unwrap_or(0);
        // Then full collection passes back to back (each scans every entry) for the rest
        // of the load window, so the p99 below is measured while they run.
        let mut passes = 1;
        if let Some(h) = &load {
            while !h.is_finished() {
                request(&s.addr, "POST", "/_wharf/gc");
                passes += 1;
            }
        }
        let during = load.and_then(|h| h.join().ok().flatten());
        writeln!(
            report,
            "eviction pass over {evict_blobs} blobs ({label}): {evicted} evicted, {wall:.2} s wall, {cpu:.2} s server CPU; {passes} passes in all",
        )
        .ok();
        if let (Some((p99_base, rps_base)), Some((p99_during, rps_during))) = (baseline, during) {
            writeln!(
                report,
                "  small-blob GET p99 {p99_base:.2} ms without, {p99_during:.2} ms during ({:.2}x); {rps_base:.0} vs {rps_during:.0} req/s",
                p99_during / p99_base
            )
            .ok();
            ratios.push(p99_during / p99_base);
        }
        s.stop();
    }
    if !ratios.is_empty() {
        writeln!(report, "p99 during / without, median of {}: {:.2}x", ratios.len(), median(ratios)).ok();
    }
    let _ = fs::remove_dir_all(&copy);
    print!("{report}");
}
