//! The cache's lifecycle with real parts: a CNCF distribution registry upstream, skopeo
//! pulling through the real wharf binary, a size cap, pins, garbage collection, kill -9 at
//! random moments, and a data dir on a file system too small for what is pulled.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::image::{sha256, Layout};
use common::{
    damaged_blobs, in_tree, layout_blobs, layout_top_digest, pull, tree_listing, wait_for, Registry, Wharf,
};
use tokio::io::AsyncReadExt;

const MIB: usize = 1 << 20;

/// wharf on `reg` with these `[cache]` lines (and nothing younger than 0 s protected).
fn wharf_with_cache(reg: &Registry, cache: &str) -> Wharf {
    Wharf::with_config(&format!(
        "[cache]\nmin_age = \"0s\"\n{cache}\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
        reg.url()
    ))
}

/// Pulls `reference` through wharf into a new layout under `work`; panics on failure.
fn pull_ok(w: &Wharf, work: &Path, reference: &str, out: &str) -> std::path::PathBuf {
    // Apart from the seeded layouts, which skopeo would reuse blobs from.
    std::fs::create_dir_all(work.join("pulled")).expect("mkdir");
    let dir = work.join("pulled").join(out);
    pull(&format!("{}/{reference}", w.host()), &dir).unwrap_or_else(|e| panic!("pull {reference}: {e}"));
    dir
}

/// Asserts that the pull in `out` is exactly `image`, and that wharf's store holds all of it.
fn assert_whole(w: &Wharf, out: &Path, image: &Layout, what: &str) {
    assert_eq!(layout_top_digest(out), image.index, "{what}: index");
    assert_eq!(layout_blobs(out), image.blobs.iter().cloned().collect::<BTreeSet<_>>(), "{what}: blobs");
    let missing: Vec<&String> = image.blobs.iter().filter(|d| !in_tree(&w.data, d)).collect();
    assert!(missing.is_empty(), "{what}: evicted from the store: {missing:?}");
}

async fn downloads_done(w: &Wharf) {
    w.settled().await;
}

/// Samples `wharf_cache_bytes` until stopped; returns the largest value seen. (The pulls
/// block one of the test's two runtime threads; this runs on the other.)
fn sample_cache_bytes(w: &Wharf) -> (Arc<AtomicBool>, tokio::task::JoinHandle<f64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let url = w.url("/metrics");
    let flag = stop.clone();
    let handle = tokio::spawn(async move {
        let mut max: f64 = 0.0;
        let client = reqwest::Client::new();
        while !flag.load(Ordering::Relaxed) {
            if let Ok(r) = client.get(&url).send().await {
                if let Ok(text) = r.text().await {
                    max = max.max(common::metric_sum(&text, "wharf_cache_bytes", &[]));
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        max
    });
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_cache_stays_under_its_cap_and_keeps_the_newest_and_pinned_images() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    // 20 MiB pinned, then six 50 MiB images (two platforms of 10 + 15 MiB): 320 MiB in all.
    let pinned = reg.seed_with(work.path(), "pinned", "keep/app:v1", &[4 * MIB, 6 * MIB], false);
    let images: Vec<Layout> = (0..6)
        .map(|i| {
            reg.seed_with(
                work.path(),
                &format!("img{i}"),
                &format!("cap/img{i}:v1"),
                &[10 * MIB, 15 * MIB],
                false,
            )
        })
        .collect();
    let cap = 100 * MIB;
    let w = wharf_with_cache(&reg, "max_size = \"100MiB\"\npins = [\"registry.test/keep/*:*\"]");
    assert_eq!(w.metric("wharf_cache_limit_bytes", &[]).await, cap as f64);

    let (stop, sampler) = sample_cache_bytes(&w);
    let out = pull_ok(&w, work.path(), "keep/app:v1", "pinned");
    downloads_done(&w).await;
    assert_whole(&w, &out, &pinned, "pinned image");
    for (i, image) in images.iter().enumerate() {
        let out = pull_ok(&w, work.path(), &format!("cap/img{i}:v1"), &format!("img{i}"));
        assert_eq!(
            layout_blobs(&out),
            image.blobs.iter().cloned().collect::<BTreeSet<_>>(),
            "img{i} pulled whole"
        );
        downloads_done(&w).await;
        let bytes = w.metric("wharf_cache_bytes", &[]).await;
        assert!(bytes <= cap as f64, "after img{i}: {bytes} bytes cached, cap {cap}");
    }
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.expect("sampler");
    // At most one blob is committed past the watermark before eviction catches up.
    let largest_blob = 16 * MIB;
    assert!(peak <= (cap + largest_blob) as f64, "cache peaked at {peak} bytes, cap {cap}");
    assert!(peak > (cap / 2) as f64, "the sampler saw the cache fill ({peak})");

    let evicted = w.metric("wharf_cache_evicted_bytes_total", &[("reason", "lru")]).await;
    assert!(evicted >= (320 - 100) as f64 * MIB as f64 * 0.9, "evicted {evicted} bytes");
    assert_eq!(w.metric("wharf_cache_uncached_downloads_total", &[]).await, 0.0);
    assert!(damaged_blobs(&w.data).is_empty());

    // The image pulled last and the pinned one are whole in the store.
    let pulled = work.path().join("pulled");
    assert_whole(&w, &pulled.join("img5"), &images[5], "last image");
    assert_whole(&w, &pulled.join("pinned"), &pinned, "pinned image");
    // Evicted layers lost their _layers links, so a registry reading the tree stays consistent.
    let links = tree_listing(&w.data.join("docker/registry/v2/repositories/registry.test/cap/img0/_layers"));
    for (path, _) in &links {
        let hex = path.split('/').nth(1).expect("sha256/<hex>/link");
        assert!(in_tree(&w.data, &format!("sha256:{hex}")), "a link to an evicted blob: {path}");
    }

    // The first image was evicted (its manifests stay): pulling it again fetches exactly
    // its missing blobs, once each.
    let missing: Vec<String> = images[0].blobs.iter().filter(|d| !in_tree(&w.data, d)).cloned().collect();
    assert!(missing.len() >= 4, "img0's layers were evicted: {missing:?}");
    let before: Vec<usize> = images[0].blobs.iter().map(|d| reg.blob_gets(d)).collect();
    let misses = w.metric("wharf_blob_requests_total", &[("result", "miss")]).await;
    let out = pull_ok(&w, work.path(), "cap/img0:v1", "img0-again");
    assert_eq!(layout_top_digest(&out), images[0].index);
    assert_eq!(layout_blobs(&out), images[0].blobs.iter().cloned().collect::<BTreeSet<_>>());
    for (d, n) in images[0].blobs.iter().zip(before) {
        let want = usize::from(missing.contains(d));
        assert_eq!(reg.blob_gets(d) - n, want, "upstream GETs of {d} (missing: {})", want == 1);
    }
    assert_eq!(
        w.metric("wharf_blob_requests_total", &[("result", "miss")]).await - misses,
        missing.len() as f64,
        "one download per missing blob"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_being_read_is_not_evicted_and_its_client_gets_every_byte() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let first = reg.seed_with(work.path(), "read-me", "big/a:v1", &[24 * MIB], false);
    reg.seed_with(work.path(), "push-out", "big/b:v1", &[24 * MIB], false);
    // Room for two of the four 24 MiB layers: the one being read is the least recently
    // used once the second image arrives, so only its lease keeps it.
    let w = wharf_with_cache(&reg, "max_size = \"60MiB\"");
    pull_ok(&w, work.path(), "big/a:v1", "a");
    downloads_done(&w).await;

    // The largest blob of the first image, read by a client that stops after the head.
    let big = first
        .blobs
        .iter()
        .max_by_key(|d| {
            std::fs::metadata(work.path().join("read-me/blobs/sha256").join(d.trim_start_matches("sha256:")))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .expect("a blob")
        .clone();
    let (mut slow, head) = common::stalled_get(w.addr, &format!("/v2/big/a/blobs/{big}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Another 48 MiB: over the cap, so eviction runs while the client is mid-transfer.
    pull_ok(&w, work.path(), "big/b:v1", "b");
    downloads_done(&w).await;
    assert!(w.metric("wharf_cache_evictions_total", &[("reason", "lru")]).await > 0.0, "eviction ran");
    assert!(in_tree(&w.data, &big), "the blob a client is reading was evicted");
    assert_eq!(w.metric("wharf_cache_uncached_downloads_total", &[]).await, 0.0, "the rest made room");
    assert!(w.metric("wharf_cache_bytes", &[]).await <= (60 * MIB) as f64);

    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).await.expect("the rest");
    assert_eq!(sha256(&rest), big, "every byte right");
}

/// Pushes a blob no manifest refers to into the registry (monolithic upload).
async fn push_loose_blob(reg: &Registry, repo: &str, bytes: Vec<u8>) -> String {
    let c = reqwest::Client::new();
    let r = c.post(format!("{}/v2/{repo}/blobs/uploads/", reg.url())).send().await.expect("start upload");
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().expect("location").to_owned();
    let d = sha256(&bytes);
    let url = if loc.starts_with("http") { loc } else { format!("{}{loc}", reg.url()) };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{url}{sep}digest={d}")).body(bytes).send().await.expect("finish upload");
    assert_eq!(r.status(), 201);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_unreferenced_blobs_orphans_and_stale_spools_and_its_dry_run_changes_nothing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let image = reg.seed_with(work.path(), "kept", "gc/app:v1", &[256 * 1024, MIB], true);
    let loose = push_loose_blob(&reg, "gc/app", common::image::noise("loose", 300 * 1024)).await;
    let mut w = wharf_with_cache(&reg, "");
    pull_ok(&w, work.path(), "gc/app:v1", "pulled");
    // A blob no cached manifest refers to, fetched by digest.
    let r = reqwest::get(w.url(&format!("/v2/gc/app/blobs/{loose}"))).await.expect("GET loose");
    assert_eq!(sha256(&r.bytes().await.expect("body")), loose);
    downloads_done(&w).await;
    // A blob in the tree the index does not know, and a temp file a crash left long ago.
    let orphan_bytes = b"left behind".to_vec();
    let orphan = sha256(&orphan_bytes);
    let hex = orphan.trim_start_matches("sha256:");
    let dir = w.data.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("data"), &orphan_bytes).expect("orphan");
    let spool = w.data.join("wharf/tmp/stale-spool");
    std::fs::write(&spool, vec![0u8; 4096]).expect("spool");
    let st = Command::new("touch").args(["-d", "3 hours ago"]).arg(&spool).status().expect("touch");
    assert!(st.success());

    let before = tree_listing(&w.data.join("docker"));
    let out = w.cli(&["gc", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["by_reason"]["gc"]["blobs"], 1, "{dry}");
    assert_eq!(dry["by_reason"]["gc"]["bytes"], 300 * 1024);
    assert_eq!(dry["by_reason"]["orphan"]["blobs"], 1, "{dry}");
    assert!(dry["by_reason"].get("lru").is_none(), "no cap, nothing evicted: {dry}");
    assert_eq!(dry["spool_files"], 1);
    let listed: BTreeSet<&str> =
        dry["removed"].as_array().expect("removed").iter().filter_map(|r| r["digest"].as_str()).collect();
    assert_eq!(listed, [loose.as_str(), orphan.as_str()].into_iter().collect());
    assert_eq!(tree_listing(&w.data.join("docker")), before, "a dry run changes nothing");
    assert!(spool.exists());
    assert_eq!(w.metric("wharf_cache_evictions_total", &[]).await, 0.0);

    let out = w.cli(&["gc", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(done["by_reason"], dry["by_reason"], "gc does what its dry run said");
    assert!(!in_tree(&w.data, &loose) && !in_tree(&w.data, &orphan));
    assert!(!spool.exists());
    assert!(image.blobs.iter().all(|d| in_tree(&w.data, d)), "what a manifest refers to stays");
    assert_eq!(w.metric("wharf_cache_evictions_total", &[("reason", "gc")]).await, 1.0);
    assert_eq!(w.metric("wharf_cache_evictions_total", &[("reason", "orphan")]).await, 1.0);
    assert_eq!(w.metric("wharf_cache_evicted_bytes_total", &[("reason", "gc")]).await, (300 * 1024) as f64);

    // The image still pulls entirely from the cache.
    let misses = w.metric("wharf_blob_requests_total", &[("result", "miss")]).await;
    let out = pull_ok(&w, work.path(), "gc/app:v1", "again");
    assert_eq!(layout_top_digest(&out), image.index);
    assert_eq!(w.metric("wharf_blob_requests_total", &[("result", "miss")]).await, misses);

    // With the server stopped, gc works on the data dir itself.
    assert!(w.stop().success());
    let out = w.cli(&["gc", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(stopped["removed"].as_array().map(Vec::len), Some(0), "{stopped}");
    assert_eq!(stopped["cache_bytes_before"], done["cache_bytes_after"], "totals survive a clean restart");
    w.start_again();
}

/// An index dump of a stopped data dir (`wharf dump-index`).
fn dump_index(w: &Wharf, data: &Path) -> serde_json::Value {
    let out = Command::new(common::wharf_bin())
        .arg("dump-index")
        .arg("--config")
        .arg(&w.config)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("wharf dump-index");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("dump json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_corrupts_the_cache() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let images: Vec<(String, Layout)> = (0..4)
        .map(|i| {
            let r = format!("crash/img{i}:v1");
            let l = reg.seed_with(
                work.path(),
                &format!("crash{i}"),
                &r,
                &[512 * 1024, 2 * MIB, 5 * MIB],
                i % 2 == 0,
            );
            (r, l)
        })
        .collect();
    // A cap well under the images' 60 MiB keeps eviction busy, so kills land in it too.
    let mut w = wharf_with_cache(&reg, "max_size = \"24MiB\"");
    // Deterministic pseudo-random kill moments (xorshift), 0.05 to 1.5 s into the pulls.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for round in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(50 + x % 1450);
        let host = w.host();
        let pulls: Vec<std::process::Child> = images
            .iter()
            .enumerate()
            .map(|(i, (r, _))| {
                Command::new("skopeo")
                    .args(["--insecure-policy", "copy", "-q", "--all", "--src-tls-verify=false"])
                    .arg(format!("docker://{host}/{r}"))
                    .arg(format!("oci:{}:pulled", work.path().join(format!("r{round}-{i}")).display()))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("skopeo")
            })
            .collect();
        // Fault injection, not synchronisation: the kill lands wherever the pulls are.
        std::thread::sleep(delay);
        w.kill9();
        for mut p in pulls {
            let _ = p.kill();
            let _ = p.wait();
        }
        w.start_again();
        let spools = std::fs::read_dir(w.data.join("wharf/tmp")).expect("tmp").count();
        assert_eq!(spools, 0, "round {round}: temp files left after start");
        let bad = damaged_blobs(&w.data);
        assert!(bad.is_empty(), "round {round}: blobs that do not hash to their name: {bad:?}");
    }

    // Every image pulls whole with the upstream's digests after all that.
    for (i, (r, l)) in images.iter().enumerate() {
        let out = pull_ok(&w, work.path(), r, &format!("final{i}"));
        assert_eq!(layout_top_digest(&out), l.index);
        assert_eq!(layout_blobs(&out), l.blobs.iter().cloned().collect::<BTreeSet<_>>());
    }
    downloads_done(&w).await;
    assert!(w.stop().success());

    // The live index is what a rebuild from the tree gives.
    let live = dump_index(&w, &w.data);
    let copy = work.path().join("data-copy");
    let st = Command::new("cp").arg("-a").arg(&w.data).arg(&copy).status().expect("cp");
    assert!(st.success());
    let out = Command::new(common::wharf_bin())
        .arg("reindex")
        .arg("--config")
        .arg(&w.config)
        .arg("--data-dir")
        .arg(&copy)
        .output()
        .expect("reindex");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dump_index(&w, &copy), live, "reindex on a copy gives the live index");
    assert!(live["tags"].as_object().is_some_and(|t| t.len() == 4), "{}", live["tags"]);
}

/// A tmpfs of `mib` MiB mounted at `at`, unmounted on drop (needs root, as the client tests do).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &Path, mib: usize) -> SmallFs {
        std::fs::create_dir_all(at).expect("mkdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(st.success(), "mounting a tmpfs needs root");
        SmallFs(at.to_path_buf())
    }

    fn resize(&self, mib: usize) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .status()
            .expect("mount runs");
        assert!(st.success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_pull_loses_nothing_and_recovers_when_space_returns() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let small = reg.seed_with(work.path(), "fits", "disk/small:v1", &[MIB, 2 * MIB], false);
    let big = reg.seed_with(work.path(), "too-big", "disk/big:v1", &[20 * MIB, 20 * MIB], false);
    let mnt = tempfile::tempdir().expect("tempdir");
    let fs = SmallFs::mount(&mnt.path().join("data"), 48);
    let w = Wharf::with_config_at(
        &format!("[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n", reg.url()),
        Some(mnt.path().join("data")),
    );
    pull_ok(&w, work.path(), "disk/small:v1", "small");
    downloads_done(&w).await;

    // 80 MiB onto a 48 MiB file system: the pull fails, and nothing partial is stored.
    let err = pull(&format!("{}/disk/big:v1", w.host()), &work.path().join("big-fails"));
    assert!(err.is_err(), "a pull larger than the disk cannot succeed");
    downloads_done(&w).await;
    assert!(w.metric("wharf_cache_uncached_downloads_total", &[("reason", "disk_full")]).await >= 1.0);
    assert!(damaged_blobs(&w.data).is_empty(), "nothing partial under a digest's name");
    wait_for(10, "failed downloads' temp files removed", || {
        (std::fs::read_dir(w.data.join("wharf/tmp")).map(|d| d.count()).unwrap_or(1) == 0).then_some(())
    });
    // What was cached is still served, from the cache.
    let misses = w.metric("wharf_blob_requests_total", &[("result", "miss")]).await;
    let out = pull_ok(&w, work.path(), "disk/small:v1", "small-again");
    assert_whole(&w, &out, &small, "cached image on a full disk");
    assert_eq!(w.metric("wharf_blob_requests_total", &[("result", "miss")]).await, misses);

    // Space returns: the same pull succeeds.
    fs.resize(256);
    let out = pull_ok(&w, work.path(), "disk/big:v1", "big");
    assert_whole(&w, &out, &big, "big image once space returned");
    assert!(damaged_blobs(&w.data).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cap_eviction_makes_room_on_a_small_disk_instead_of_failing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let first = reg.seed_with(work.path(), "first", "room/a:v1", &[8 * MIB, 8 * MIB], false);
    let second = reg.seed_with(work.path(), "second", "room/b:v1", &[8 * MIB, 8 * MIB], false);
    let third = reg.seed_with(work.path(), "third", "room/c:v1", &[8 * MIB, 8 * MIB], false);
    let mnt = tempfile::tempdir().expect("tempdir");
    let _fs = SmallFs::mount(&mnt.path().join("data"), 64);
    let w = Wharf::with_config_at(
        &format!(
            "[cache]\nmin_age = \"0s\"\nmax_size = \"40MiB\"\nmin_free = \"8MiB\"\n[[upstreams]]\nname = \"registry.test\"\nurl = \"{}\"\ninsecure = true\n",
            reg.url()
        ),
        Some(mnt.path().join("data")),
    );
    for (i, (r, image)) in
        [("room/a:v1", &first), ("room/b:v1", &second), ("room/c:v1", &third)].into_iter().enumerate()
    {
        let out = pull_ok(&w, work.path(), r, &format!("p{i}"));
        assert_whole(&w, &out, image, r);
        downloads_done(&w).await;
    }
    assert!(w.metric("wharf_cache_evictions_total", &[("reason", "lru")]).await > 0.0);
    assert_eq!(w.metric("wharf_cache_uncached_downloads_total", &[]).await, 0.0);
    assert!(damaged_blobs(&w.data).is_empty());
}
