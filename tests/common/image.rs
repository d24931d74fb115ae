//! Writes synthetic multi-platform OCI image layouts: an index with linux/amd64 and
//! linux/arm64 images (real gzipped tar layers, configs with diff_ids) plus buildx-style
//! attestation manifests. Deterministic for a given seed.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for realistic layers.
pub fn noise(seed: &str, len: usize) -> Vec<u8> {
    let state =
        0x9E37_79B9_7F4A_7C15 ^ seed.bytes().fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    noise_chunks(state, len as u64).flatten().collect()
}

/// The same xorshift stream from `state`, in 1 MiB chunks generated as they are read (a
/// multi-GiB layer never sits in memory).
pub fn noise_chunks(state: u64, len: u64) -> impl Iterator<Item = Vec<u8>> {
    const CHUNK: u64 = 1 << 20;
    let mut x = state.max(1);
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK) as usize;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(n);
        left -= n as u64;
        Some(out)
    })
}

/// What a written layout holds.
pub struct Layout {
    /// Digest of the image index.
    pub index: String,
    /// Digests of the per-platform image manifests, amd64 then arm64.
    pub images: Vec<String>,
    /// Digests of the attestation manifests.
    pub attestations: Vec<String>,
    /// Every blob in the layout (manifests included).
    pub blobs: Vec<String>,
}

struct Writer<'a> {
    dir: &'a Path,
    blobs: Vec<String>,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> (String, usize) {
        let d = sha256(bytes);
        let p = self.dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
        std::fs::write(p, bytes).expect("write blob");
        self.blobs.push(d.clone());
        (d, bytes.len())
    }

    fn layer(&mut self, seed: &str, size: usize) -> (serde_json::Value, String) {
        let mut tar = tar::Builder::new(Vec::new());
        let data = noise(seed, size);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("data/{seed}.bin"), &data[..]).expect("tar");
        let tar = tar.into_inner().expect("tar");
        let diff_id = sha256(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let (d, len) = self.put(&gz);
        (json!({ "mediaType": OCI_LAYER, "digest": d, "size": len }), diff_id)
    }

    fn manifest(&mut self, config: serde_json::Value, layers: Vec<serde_json::Value>) -> (String, usize) {
        let cfg = serde_json::to_vec(&config).expect("json");
        let (cd, clen) = self.put(&cfg);
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": cd, "size": clen },
            "layers": layers,
        });
        self.put(&serde_json::to_vec(&m).expect("json"))
    }
}

/// Writes an OCI layout at `dir` with the index tagged `tag`. `layer_sizes` are the payload
/// sizes of each platform's layers.
pub fn write_layout(dir: &Path, seed: &str, tag: &str, layer_sizes: &[usize]) -> Layout {
    write_layout_with(dir, seed, tag, layer_sizes, true)
}

/// [`write_layout`], with or without the attestation manifests.
pub fn write_layout_with(dir: &Path, seed: &str, tag: &str, layer_sizes: &[usize], attest: bool) -> Layout {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let mut w = Writer { dir, blobs: Vec::new() };
    let mut entries = Vec::new();
    let mut images = Vec::new();
    let mut attestations = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let (l, diff) = w.layer(&format!("{seed}-{arch}-{i}"), *size);
            layers.push(l);
            diff_ids.push(diff);
        }
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": { "Cmd": ["/bin/sh"], "Labels": { "seed": seed } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let (md, mlen) = w.manifest(config, layers);
        images.push(md.clone());
        entries.push(json!({ "mediaType": OCI_MANIFEST, "digest": md, "size": mlen, "platform": { "architecture": arch, "os": "linux" } }));
    }
    for image in images.clone().into_iter().filter(|_| attest) {
        let statement = json!({ "_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://spdx.dev/Document", "subject": [{ "digest": { "sha256": image.trim_start_matches("sha256:") } }], "predicate": { "seed": seed } });
        let (sd, slen) = w.put(&serde_json::to_vec(&statement).expect("json"));
        let layer = json!({ "mediaType": "application/vnd.in-toto+json", "digest": sd, "size": slen, "annotations": { "in-toto.io/predicate-type": "https://spdx.dev/Document" } });
        let config = json!({ "architecture": "unknown", "os": "unknown", "config": {}, "rootfs": { "type": "layers", "diff_ids": [sd] } });
        let (ad, alen) = w.manifest(config, vec![layer]);
        attestations.push(ad.clone());
        entries.push(json!({
            "mediaType": OCI_MANIFEST, "digest": ad, "size": alen,
            "platform": { "architecture": "unknown", "os": "unknown" },
            "annotations": { "vnd.docker.reference.digest": image, "vnd.docker.reference.type": "attestation-manifest" },
        }));
    }
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries });
    let (id, ilen) = w.put(&serde_json::to_vec(&index).expect("json"));
    let top = json!({ "schemaVersion": 2, "manifests": [{ "mediaType": OCI_INDEX, "digest": id, "size": ilen, "annotations": { "org.opencontainers.image.ref.name": tag } }] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).expect("json")).expect("index.json");
    Layout { index: id, images, attestations, blobs: w.blobs }
}
