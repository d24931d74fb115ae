//! Across an air gap: wharf A, online against a real distribution registry, exports what it
//! cached; wharf B, offline with no upstream process at all, imports the bundle and serves
//! skopeo, containerd and the docker daemon; `docker load`, `ctr images import` and `skopeo
//! copy oci-archive:` read the bundle directly; bad bundles are refused whole.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::daemons::{hosts_dir, Containerd};
use common::docker::Dockerd;
use common::{layout_blobs, layout_top_digest, pull, succeeded, wharf_cli as cli, Registry, Wharf};

const LAYERS: &[usize] = &[2048, 96 * 1024];

/// An offline wharf's configuration: docker.io, offline, its URL a port nothing listens on.
fn offline_config(dir: &Path) -> PathBuf {
    let cfg = dir.join("offline.toml");
    std::fs::write(
        &cfg,
        "offline = true\n[[upstreams]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:1\"\ninsecure = true\n",
    )
    .expect("write");
    cfg
}

/// Blob entries of a bundle (zstd-compressed or not).
fn bundle_blobs(bundle: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(bundle).expect("bundle");
    let tar: Box<dyn std::io::Read> = match bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        true => Box::new(zstd::stream::read::Decoder::new(std::io::Cursor::new(bytes)).expect("zstd")),
        false => Box::new(std::io::Cursor::new(bytes)),
    };
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .expect("tar")
        .filter_map(|e| {
            let e = e.expect("entry");
            let p = e.path().expect("path").to_string_lossy().into_owned();
            let hex = p.strip_prefix("blobs/sha256/")?;
            Some(format!("sha256:{hex}"))
        })
        .collect()
}

/// Files under the storage tree's blobs: what an import made visible.
fn stored_blobs(data: &Path) -> usize {
    let root = data.join("docker/registry/v2/blobs");
    let mut n = 0;
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

struct Connected {
    _reg: Registry,
    app: common::image::Layout,
    tool: common::image::Layout,
    /// An OCI artifact (a non-image media type): its manifest digest and its one blob.
    model: (String, String, Vec<u8>),
    data: PathBuf,
    config: PathBuf,
    history: serde_json::Value,
}

const MODEL_TYPE: &str = "application/vnd.example.model.v1";

/// Pushes an artifact: an empty config and one layer of a type no image has.
async fn push_model(registry: &str) -> (String, String, Vec<u8>) {
    let bytes = common::image::noise("model", 40 * 1024);
    let layer = common::push::blob(registry, "demo/model", &bytes).await;
    let empty = common::push::blob(registry, "demo/model", b"{}").await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": MODEL_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.example.model.weights", "digest": layer, "size": bytes.len()}],
    });
    let d = common::push::manifest(
        registry,
        "demo/model",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    )
    .await;
    (d, layer, bytes)
}

/// wharf A online (a stopped data dir: prefetch runs a server of its own) prefetches a
/// list: two multi-platform images (one with attestations, and a tag that moved, so it has
/// history) and an artifact.
fn connected_side(work: &Path) -> Connected {
    let reg = Registry::start();
    let old = reg.seed(work, "app-old", "demo/app:1.0", LAYERS);
    let data = work.join("a-data");
    let config = work.join("a.toml");
    let toml = format!("[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ninsecure = true\n", reg.url());
    std::fs::write(&config, toml).expect("write");
    succeeded(&cli(&config, &data, &["prefetch", "demo/app:1.0"]), "prefetch the old image");
    let app = reg.seed(work, "app", "demo/app:1.0", LAYERS);
    let tool = reg.seed_with(work, "tool", "demo/tool:2", LAYERS, false);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let model = rt.block_on(push_model(&reg.url()));
    let list = work.join("images.txt");
    std::fs::write(&list, "demo/app:1.0\ndocker.io/demo/tool:2\ndemo/model:v1\n").expect("write");
    let out = cli(&config, &data, &["prefetch", "-f", list.to_str().expect("path"), "--json"]);
    let outcomes: Vec<serde_json::Value> = serde_json::from_str(&succeeded(&out, "prefetch")).expect("json");
    assert!(outcomes.iter().all(|o| o["result"] == "ok"), "{outcomes:?}");
    assert_eq!(outcomes[2]["digest"], model.0.as_str());
    let history = serde_json::from_str(&succeeded(
        &cli(&config, &data, &["history", "demo/app:1.0", "--json"]),
        "history",
    ))
    .expect("json");
    assert_ne!(old.index, app.index);
    Connected { _reg: reg, app, tool, model, data, config, history }
}

#[test]
fn a_bundle_crosses_the_gap_and_every_client_pulls_from_the_offline_mirror() {
    let work = tempfile::tempdir().expect("tempdir");
    let a = connected_side(work.path());
    let bundle = work.path().join("bundle.tar");
    let out = cli(
        &a.config,
        &a.data,
        &[
            "export",
            "-o",
            bundle.to_str().expect("path"),
            "demo/app:1.0",
            "docker.io/demo/tool:2",
            "demo/model:v1",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&succeeded(&out, "export")).expect("json");
    assert_eq!(report["images"][0]["digest"], a.app.index.as_str());
    assert_eq!(report["images"][0]["platforms"], serde_json::json!(["linux/amd64", "linux/arm64"]));
    let carried = bundle_blobs(&bundle);
    for b in a.app.blobs.iter().chain(&a.tool.blobs) {
        assert!(carried.contains(b), "{b} is in the bundle");
    }

    // The far side: no upstream process at all.
    let b_data = work.path().join("b-data");
    let b_config = offline_config(work.path());
    let out = cli(&b_config, &b_data, &["import", bundle.to_str().expect("path"), "--json"]);
    let imported: serde_json::Value = serde_json::from_str(&succeeded(&out, "import")).expect("json");
    assert_eq!(imported["new_blobs"].as_u64(), Some(carried.len() as u64));
    // Idempotent: nothing new the second time.
    let again: serde_json::Value = serde_json::from_str(&succeeded(
        &cli(&b_config, &b_data, &["import", bundle.to_str().expect("path"), "--json"]),
        "import again",
    ))
    .expect("json");
    assert_eq!(again["new_blobs"], 0);

    let b = Wharf::with_config_at(&std::fs::read_to_string(&b_config).expect("config"), Some(b_data.clone()));
    // skopeo, every platform and attestation: the upstream's digests and bytes.
    for (name, img) in [("demo/app:1.0", &a.app), ("demo/tool:2", &a.tool)] {
        let out = work.path().join(format!("b-{}", name.replace(['/', ':'], "-")));
        pull(&format!("{}/{name}", b.host()), &out).unwrap_or_else(|e| panic!("{name} through B: {e}"));
        assert_eq!(layout_top_digest(&out), img.index, "{name}");
        assert_eq!(layout_blobs(&out), img.blobs.iter().cloned().collect(), "{name}");
    }
    // The artifact, byte for byte, with its media type.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (manifest_digest, media_type, layer) = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(b.url("/v2/demo/model/manifests/v1"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("manifest");
        assert_eq!(r.status(), 200);
        let d = r.headers()["docker-content-digest"].to_str().expect("digest").to_owned();
        let v: serde_json::Value = r.json().await.expect("json");
        let layer = reqwest::get(b.url(&format!("/v2/demo/model/blobs/{}", a.model.1)))
            .await
            .expect("blob")
            .bytes()
            .await
            .expect("bytes");
        (d, v["artifactType"].as_str().unwrap_or_default().to_owned(), layer)
    });
    assert_eq!(manifest_digest, a.model.0);
    assert_eq!(media_type, MODEL_TYPE);
    assert!(layer.as_ref() == a.model.2.as_slice(), "the artifact's blob, byte-identical");

    // The tag's history crossed the gap.
    let history: serde_json::Value =
        serde_json::from_str(&succeeded(&b.cli(&["history", "demo/app:1.0", "--json"]), "history on B"))
            .expect("json");
    let digests = |h: &serde_json::Value| -> Vec<String> {
        h["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|e| e["digest"].as_str().expect("digest").to_owned())
            .collect()
    };
    assert_eq!(digests(&history), digests(&a.history), "the same digests, newest first");
    assert_eq!(digests(&history).len(), 2);

    // containerd with a hosts.toml mirror, and the docker daemon with registry-mirrors:
    // every image, the upstream's digests.
    let ctd = Containerd::start();
    let hosts = hosts_dir(work.path(), "docker.io", &b);
    let mirror = format!("http://{}", b.host());
    let d = Dockerd::start(
        &work.path().join("docker"),
        &["--registry-mirror", &mirror, "--insecure-registry", &b.host()],
    );
    for (name, img) in [("demo/app:1.0", &a.app), ("demo/tool:2", &a.tool)] {
        let full = format!("docker.io/{name}");
        let out = ctd.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            hosts.to_str().expect("path"),
            "--snapshotter",
            "native",
            &full,
        ]);
        succeeded(&out, &format!("ctr images pull {full} through B"));
        let listed = succeeded(&ctd.ctr(&["images", "ls"]), "ctr images ls");
        assert!(listed.lines().any(|l| l.starts_with(&full) && l.contains(&img.index)), "{listed}");
        let pulled = d.ok(&["pull", name]);
        assert!(pulled.contains(&img.index), "docker reports the upstream's digest: {pulled}");
    }
    // What they pulled goes, so reading the bundle directly below proves something.
    succeeded(&ctd.ctr(&["images", "rm", "docker.io/demo/app:1.0"]), "ctr images rm");
    d.ok(&["rmi", "demo/app:1.0", "demo/tool:2"]);

    // The bundle read directly: skopeo from the archive, ctr import, docker load.
    let from_archive = work.path().join("from-archive");
    common::skopeo(&[
        "copy",
        "-q",
        "--all",
        "--preserve-digests",
        &format!("oci-archive:{}:docker.io/demo/app:1.0", bundle.display()),
        &format!("oci:{}:x", from_archive.display()),
    ]);
    assert_eq!(layout_top_digest(&from_archive), a.app.index);
    let out =
        ctd.ctr(&["images", "import", "--all-platforms", "--no-unpack", bundle.to_str().expect("path")]);
    succeeded(&out, "ctr images import");
    let listed = succeeded(&ctd.ctr(&["images", "ls"]), "ctr images ls");
    assert!(
        listed.lines().any(|l| l.starts_with("docker.io/demo/app:1.0") && l.contains(&a.app.index)),
        "{listed}"
    );
    // docker load reads manifest.json: a single-platform export has one.
    let amd64 = work.path().join("amd64.tar");
    succeeded(
        &cli(
            &a.config,
            &a.data,
            &["export", "-o", amd64.to_str().expect("path"), "--platform", "linux/amd64", "demo/app:1.0"],
        ),
        "export --platform",
    );
    // A bundle with a manifest.json imports too.
    let c_data = work.path().join("c-data");
    succeeded(
        &cli(&b_config, &c_data, &["import", amd64.to_str().expect("path")]),
        "import the amd64 bundle",
    );
    let loaded = d.ok(&["load", "-i", amd64.to_str().expect("path")]);
    assert!(loaded.contains("demo/app:1.0"), "{loaded}");
    let id = d.ok(&["image", "inspect", "-f", "{{.Id}}", "docker.io/demo/app:1.0"]);
    let config = a.app.blobs.iter().find(|b| id.trim() == b.as_str()).cloned();
    assert!(config.is_some(), "the loaded image's id is its config digest, a blob of the image: {id}");
}

#[test]
fn a_differential_bundle_carries_only_what_the_far_side_lacks() {
    let work = tempfile::tempdir().expect("tempdir");
    let a = connected_side(work.path());
    let first = work.path().join("week1.tar");
    let second = work.path().join("week2.tar.zst");
    let path = |p: &Path| p.to_str().expect("path").to_owned();
    succeeded(&cli(&a.config, &a.data, &["export", "-o", &path(&first), "demo/app:1.0"]), "export week 1");
    succeeded(
        &cli(
            &a.config,
            &a.data,
            &[
                "export",
                "-o",
                &path(&second),
                "demo/app:1.0",
                "demo/tool:2",
                "--since",
                &path(&first),
                "--zstd",
            ],
        ),
        "export week 2",
    );
    let (w1, w2) = (bundle_blobs(&first), bundle_blobs(&second));
    let tool: BTreeSet<String> = a.tool.blobs.iter().cloned().collect();
    assert_eq!(w2, &tool - &w1, "week 2 carries the new image's blobs, nothing week 1 had");
    let head = std::fs::read(&second).expect("week 2");
    assert!(head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "--zstd writes a zstd stream");

    // A far side that imported week 1 takes week 2; one that did not refuses it whole.
    let cfg = offline_config(work.path());
    let b = work.path().join("b-data");
    succeeded(&cli(&cfg, &b, &["import", &path(&first)]), "import week 1");
    succeeded(&cli(&cfg, &b, &["import", &path(&second)]), "import week 2");
    let c = work.path().join("c-data");
    let out = cli(&cfg, &c, &["import", &path(&second)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neither in the bundle nor in the cache") || err.contains("not in the bundle"),
        "{err}"
    );
    assert_eq!(stored_blobs(&c), 0, "nothing written");
}

/// A copy of `good` with its entries passed through `edit` (which may change, drop or add).
fn rewrite(
    good: &Path,
    out: &Path,
    mut edit: impl FnMut(&mut tar::Builder<std::fs::File>, tar::Header, Vec<u8>),
) {
    let mut ar = tar::Archive::new(std::fs::File::open(good).expect("bundle"));
    let mut b = tar::Builder::new(std::fs::File::create(out).expect("create"));
    for e in ar.entries().expect("tar") {
        let mut e = e.expect("entry");
        let h = e.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read");
        edit(&mut b, h, data);
    }
    b.finish().expect("finish");
}

/// A raw header whose name is written as is (the tar crate refuses `..` and absolute paths
/// through its safe setters, as it should).
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

#[test]
fn a_bad_bundle_is_refused_whole_and_writes_nothing() {
    let work = tempfile::tempdir().expect("tempdir");
    let a = connected_side(work.path());
    let good = work.path().join("good.tar");
    succeeded(
        &cli(&a.config, &a.data, &["export", "-o", good.to_str().expect("path"), "demo/tool:2"]),
        "export",
    );
    let layer = a.tool.blobs.iter().max_by_key(|b| {
        std::fs::metadata(work.path().join("tool/blobs/sha256").join(b.trim_start_matches("sha256:")))
            .map(|m| m.len())
            .unwrap_or(0)
    });
    let layer_path = format!("blobs/sha256/{}", layer.expect("a layer").trim_start_matches("sha256:"));
    let cfg = offline_config(work.path());

    type Edit = Box<dyn FnMut(&mut tar::Builder<std::fs::File>, tar::Header, Vec<u8>)>;
    let path_of = |h: &tar::Header| h.path().expect("path").to_string_lossy().into_owned();
    let lp = layer_path.clone();
    let flip: Edit = Box::new(move |b, mut h, mut data| {
        if path_of(&h) == lp {
            let mid = data.len() / 2;
            data[mid] ^= 0x01;
        }
        h.set_cksum();
        b.append(&h, data.as_slice()).expect("append");
    });
    let lp = layer_path.clone();
    let drop_layer: Edit = Box::new(move |b, h, data| {
        if path_of(&h) != lp {
            b.append(&h, data.as_slice()).expect("append");
        }
    });
    let extra = |name: &'static [u8], kind: tar::EntryType| -> Edit {
        let mut done = false;
        Box::new(move |b, h, data| {
            b.append(&h, data.as_slice()).expect("append");
            if !done {
                done = true;
                let body: &[u8] = if kind == tar::EntryType::Regular { b"evil" } else { b"" };
                let mut x = raw_header(name, kind, body.len() as u64);
                if kind == tar::EntryType::Symlink {
                    x.set_link_name("/etc/passwd").expect("link name");
                    x.set_cksum();
                }
                b.append(&x, body).expect("append");
            }
        })
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("flipped", flip, "does not match its digest"),
        ("missing-blob", drop_layer, "neither in the bundle nor in the cache"),
        ("dotdot", extra(b"../evil", tar::EntryType::Regular), "not a plain relative path"),
        ("absolute", extra(b"/tmp/evil", tar::EntryType::Regular), "not a plain relative path"),
        ("symlink", extra(b"blobs/link", tar::EntryType::Symlink), "symbolic link"),
        ("device", extra(b"blobs/dev", tar::EntryType::Char), "device"),
    ];
    let data = work.path().join("b-data");
    for (name, edit, reason) in cases {
        let bad = work.path().join(format!("{name}.tar"));
        rewrite(&good, &bad, edit);
        let out = cli(&cfg, &data, &["import", bad.to_str().expect("path")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: refused");
        assert!(err.contains("bundle refused") && err.contains(reason), "{name}: {err}");
        assert_eq!(stored_blobs(&data), 0, "{name}: nothing written");
    }
    // Cut short.
    let bytes = std::fs::read(&good).expect("bundle");
    let cut = work.path().join("truncated.tar");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).expect("write");
    let out = cli(&cfg, &data, &["import", cut.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bundle refused"), "truncated: {err}");
    assert_eq!(stored_blobs(&data), 0, "truncated: nothing written");
    // No staged file is left behind either.
    let tmp = data.join("wharf/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).into_iter().flatten().flatten().collect();
    assert!(left.is_empty(), "staged files removed: {left:?}");
    // And the good bundle still goes in.
    succeeded(&cli(&cfg, &data, &["import", good.to_str().expect("path")]), "import the good bundle");
    assert_eq!(stored_blobs(&data), a.tool.blobs.len());
}
