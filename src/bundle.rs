//! Air-gap bundles: what the cache holds, carried across a gap as one file, and read back
//! into another wharf's cache.
//!
//! A bundle is an OCI image layout in a tar (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`)
//! that `skopeo copy oci-archive:` and `ctr images import` read as it is, plus a Docker
//! `manifest.json` for the images that have one platform, which `docker load` reads, and
//! `wharf-history.json`, the exported tags' history. Every `index.json` entry names its
//! image (`io.containerd.image.name`, `org.opencontainers.image.ref.name`) and the cache
//! repository it came from (`io.wharf.repository`).
//!
//! Import trusts nothing in the file: every blob is hashed while it is staged, every entry
//! name and type is checked before it touches a path, and the whole graph is checked before
//! anything becomes visible. A refused bundle writes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::oci::{
    is_attestation, is_index, platform_string, references, split_reference, stored_media_type, Digest,
    Hasher, Platform, Tag,
};
use crate::store::{now_ms, RepoKey, Store, StoreError, StoredManifest};

/// The annotation naming the cache repository (`<upstream>/<name>`) of an entry.
pub const REPOSITORY_ANNOTATION: &str = "io.wharf.repository";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const HISTORY_FILE: &str = "wharf-history.json";
/// Most bytes of `index.json`, `manifest.json` or the history file in a bundle.
const MAX_METADATA_BYTES: u64 = 64 << 20;
/// Most bytes of one manifest.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle is refused as a whole; nothing was written.
    #[error("bundle refused: {0}")]
    Refused(String),
    /// An image cannot be exported as asked.
    #[error("{0}")]
    Export(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BundleError {
    let context = context.into();
    move |source| BundleError::Io { context, source }
}

fn refused(msg: impl Into<String>) -> BundleError {
    BundleError::Refused(msg.into())
}

/// One image to export: a cache repository, the tag it was asked by (if any) and its digest.
#[derive(Clone, Debug)]
pub struct Selection {
    pub key: RepoKey,
    pub tag: Option<Tag>,
    pub digest: Digest,
}

impl Selection {
    /// The image's full name: `<upstream>/<name>:<tag>` or `…@<digest>`.
    pub fn reference(&self) -> String {
        match &self.tag {
            Some(t) => format!("{}:{}", self.key.as_str(), t.as_str()),
            None => format!("{}@{}", self.key.as_str(), self.digest),
        }
    }
}

/// What to leave out or keep.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Only these platforms of an index (empty: every platform the cache holds whole).
    pub platforms: Vec<Platform>,
    /// Blobs the far side holds already (a differential bundle): named, not carried.
    pub skip: HashSet<Digest>,
}

/// One exported image, for the summary.
#[derive(Clone, Debug, Serialize)]
pub struct ExportedImage {
    pub reference: String,
    pub digest: String,
    pub platforms: Vec<String>,
    /// Platforms of the index the cache does not hold whole (left out).
    pub missing_platforms: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    pub images: Vec<ExportedImage>,
    /// Blobs (manifests included) written into the bundle, and their bytes.
    pub blobs: usize,
    pub bytes: u64,
    /// Blobs left out because the far side has them (`--since`).
    pub skipped: usize,
}

/// An image's part of the bundle.
struct Planned {
    sel: Selection,
    top: StoredManifest,
    /// Every manifest to carry (the top one first), with its media type.
    manifests: Vec<(Digest, StoredManifest)>,
    /// Config and layer blobs.
    blobs: Vec<Digest>,
    /// For `manifest.json`: the config and layers of the one platform image.
    docker: Option<(Digest, Vec<Digest>)>,
    image: ExportedImage,
}

/// The config and layers of an image manifest that `docker load` can read (not an
/// artifact: its config is an image config).
fn docker_parts(m: &StoredManifest) -> Option<(Digest, Vec<Digest>)> {
    let v: Value = serde_json::from_slice(&m.bytes).ok()?;
    let config_type = v.pointer("/config/mediaType")?.as_str()?;
    if !matches!(
        config_type,
        "application/vnd.oci.image.config.v1+json" | "application/vnd.docker.container.image.v1+json"
    ) {
        return None;
    }
    let config = Digest::parse(v.pointer("/config/digest")?.as_str()?)?;
    let layers = v["layers"]
        .as_array()?
        .iter()
        .map(|l| Digest::parse(l["digest"].as_str()?))
        .collect::<Option<Vec<_>>>()?;
    Some((config, layers))
}

fn plan(store: &Store, sel: &Selection, opts: &ExportOptions) -> Result<Planned, BundleError> {
    let reference = sel.reference();
    let top = store
        .manifest(&sel.key, &sel.digest)?
        .ok_or_else(|| BundleError::Export(format!("{reference}: {} is not in the cache", sel.digest)))?;
    let mut manifests = vec![(sel.digest.clone(), top.clone())];
    let mut blobs = Vec::new();
    let mut image = ExportedImage {
        reference: reference.clone(),
        digest: sel.digest.to_string(),
        platforms: Vec::new(),
        missing_platforms: Vec::new(),
    };
    let mut images = Vec::new();
    if is_index(&top.media_type) {
        let v: Value = serde_json::from_slice(&top.bytes).unwrap_or(Value::Null);
        let entries = v["manifests"].as_array().cloned().unwrap_or_default();
        let mut included = HashSet::new();
        for e in entries.iter().filter(|e| !is_attestation(e)) {
            let Some(d) = e["digest"].as_str().and_then(Digest::parse) else { continue };
            let platform = platform_string(&e["platform"]);
            if !opts.platforms.is_empty() && !opts.platforms.iter().any(|p| p.matches(&e["platform"])) {
                continue;
            }
            let child = store.manifest(&sel.key, &d)?;
            let missing = match &child {
                None => Some(format!("manifest {d}")),
                Some(c) => store.missing_blob(&c.bytes)?.map(|b| format!("blob {b}")),
            };
            match (child, missing) {
                (Some(c), None) => {
                    blobs.extend(references(&c.bytes).1);
                    images.push(c.clone());
                    manifests.push((d.clone(), c));
                    included.insert(d.to_string());
                    image.platforms.push(platform);
                }
                (_, Some(what)) if !opts.platforms.is_empty() => {
                    return Err(BundleError::Export(format!(
                        "{reference}: {platform} is not whole in the cache ({what} missing); prefetch it first"
                    )));
                }
                _ => image.missing_platforms.push(platform),
            }
        }
        if images.is_empty() {
            return Err(BundleError::Export(format!(
                "{reference}: no platform of {} is whole in the cache; prefetch it first",
                sel.digest
            )));
        }
        // The attestations of the platforms carried, when the cache holds them whole.
        for e in entries.iter().filter(|e| is_attestation(e)) {
            let of = e.pointer("/annotations/vnd.docker.reference.digest").and_then(Value::as_str);
            let Some(d) = e["digest"].as_str().and_then(Digest::parse) else { continue };
            if !of.is_some_and(|o| included.contains(o)) {
                continue;
            }
            if let Some(c) = store.manifest(&sel.key, &d)? {
                if store.missing_blob(&c.bytes)?.is_none() {
                    blobs.extend(references(&c.bytes).1);
                    manifests.push((d, c));
                }
            }
        }
    } else {
        if let Some(b) = store.missing_blob(&top.bytes)? {
            return Err(BundleError::Export(format!(
                "{reference}: blob {b} is not in the cache; prefetch it first"
            )));
        }
        blobs.extend(references(&top.bytes).1);
        images.push(top.clone());
        image.platforms.push("-".into());
    }
    // Signatures, SBOMs and attestations that name this image as their subject.
    for r in store.local_referrers(&sel.key, &sel.digest)? {
        let Some(d) = r["digest"].as_str().and_then(Digest::parse) else { continue };
        if let Some(m) = store.manifest(&sel.key, &d)? {
            if store.missing_blob(&m.bytes)?.is_none() {
                blobs.extend(references(&m.bytes).1);
                manifests.push((d, m));
            }
        }
    }
    let docker = match images.as_slice() {
        [one] => docker_parts(one),
        _ => None,
    };
    Ok(Planned { sel: sel.clone(), top, manifests, blobs, docker, image })
}

/// The zstd frame's magic number, which a compressed bundle starts with.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A bundle file to read as a tar: decompressed when it is zstd (`export --zstd`).
fn open_tar(path: &Path) -> Result<Box<dyn Read>, BundleError> {
    use std::io::Seek;
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io_err(format!("reading {}", path.display())))?;
    f.rewind().map_err(io_err(format!("reading {}", path.display())))?;
    if n == 4 && magic == ZSTD_MAGIC {
        let d = zstd::stream::read::Decoder::new(f).map_err(io_err(format!("reading {}", path.display())))?;
        return Ok(Box::new(d));
    }
    Ok(Box::new(f))
}

/// The blob paths of a bundle (`--since`): what the far side already has.
pub fn bundle_blobs(path: &Path) -> Result<HashSet<Digest>, BundleError> {
    let mut ar = tar::Archive::new(open_tar(path)?);
    let mut out = HashSet::new();
    for entry in ar.entries().map_err(io_err(format!("reading {}", path.display())))? {
        let entry = entry.map_err(io_err(format!("reading {}", path.display())))?;
        let p = entry.path().map_err(io_err("an entry's path"))?.into_owned();
        if let Some(d) = blob_digest(&p) {
            out.insert(d);
        }
    }
    Ok(out)
}

/// `blobs/<alg>/<hex>` → its digest.
fn blob_digest(p: &Path) -> Option<Digest> {
    let parts: Vec<&str> = p.iter().map(|c| c.to_str()).collect::<Option<_>>()?;
    match parts.as_slice() {
        ["blobs", alg, hex] | [".", "blobs", alg, hex] => Digest::parse(&format!("{alg}:{hex}")),
        _ => None,
    }
}

fn regular_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// A tag's history as it travels: each digest with its first- and last-seen times (ms).
pub type TagHistory = (RepoKey, Tag, Vec<(Digest, u64, u64)>);

/// Writes the bundle of `selection` to `out`: metadata first, then each blob once,
/// streamed from the store. Gives `out` back, flushed (a compressor still has to finish).
pub fn export<W: Write>(
    store: &Store,
    selection: &[Selection],
    history: &[TagHistory],
    opts: &ExportOptions,
    out: W,
) -> Result<(ExportReport, W), BundleError> {
    let planned = selection.iter().map(|s| plan(store, s, opts)).collect::<Result<Vec<_>, _>>()?;
    let mut index_entries = Vec::new();
    let mut docker_entries = Vec::new();
    // Blobs in the order met, each once: manifests carry their bytes, others their size.
    let mut order: Vec<Digest> = Vec::new();
    let mut manifest_bytes: HashMap<Digest, bytes::Bytes> = HashMap::new();
    let mut seen = HashSet::new();
    for p in &planned {
        let reference = p.sel.reference();
        let mut annotations =
            json!({ CONTAINERD_NAME: reference, REPOSITORY_ANNOTATION: p.sel.key.as_str() });
        if p.sel.tag.is_some() {
            annotations[REF_NAME] = reference.clone().into();
        }
        index_entries.push(json!({
            "mediaType": p.top.media_type,
            "digest": p.sel.digest.to_string(),
            "size": p.top.bytes.len(),
            "annotations": annotations,
        }));
        // Referrers are carried as unnamed entries of the same repository, so an import
        // files them where their subject is.
        for (d, m) in p.manifests.iter().skip(1) {
            if crate::oci::referrer_of(&m.bytes, d, &m.media_type).is_some() {
                index_entries.push(json!({
                    "mediaType": m.media_type,
                    "digest": d.to_string(),
                    "size": m.bytes.len(),
                    "annotations": { REPOSITORY_ANNOTATION: p.sel.key.as_str() },
                }));
            }
        }
        if let (Some((config, layers)), Some(_)) = (&p.docker, &p.sel.tag) {
            docker_entries.push(json!({
                "Config": format!("blobs/{}/{}", config.algorithm().as_str(), config.hex()),
                "RepoTags": [reference],
                "Layers": layers.iter().map(|l| format!("blobs/{}/{}", l.algorithm().as_str(), l.hex())).collect::<Vec<_>>(),
            }));
        }
        for (d, m) in &p.manifests {
            if seen.insert(d.clone()) {
                manifest_bytes.insert(d.clone(), m.bytes.clone());
                order.push(d.clone());
            }
        }
        for b in &p.blobs {
            if seen.insert(b.clone()) {
                order.push(b.clone());
            }
        }
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index_entries,
    });
    let hist: Vec<Value> = history
        .iter()
        .map(|(k, t, entries)| {
            json!({
                "repository": k.as_str(),
                "tag": t.as_str(),
                "history": entries.iter().map(|(d, f, l)| json!({"digest": d.to_string(), "first_seen_ms": f, "last_seen_ms": l})).collect::<Vec<_>>(),
            })
        })
        .collect();

    let mut report =
        ExportReport { images: planned.iter().map(|p| p.image.clone()).collect(), ..Default::default() };
    let mut tar = tar::Builder::new(out);
    let add = |tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]| -> Result<(), BundleError> {
        let mut h = regular_header(bytes.len() as u64);
        tar.append_data(&mut h, name, bytes).map_err(io_err(format!("writing {name}")))
    };
    add(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add(&mut tar, "index.json", index.to_string().as_bytes())?;
    if !docker_entries.is_empty() {
        add(&mut tar, "manifest.json", Value::Array(docker_entries).to_string().as_bytes())?;
    }
    add(&mut tar, HISTORY_FILE, json!({ "version": 1, "tags": hist }).to_string().as_bytes())?;
    for d in order {
        if opts.skip.contains(&d) {
            report.skipped += 1;
            continue;
        }
        let name = format!("blobs/{}/{}", d.algorithm().as_str(), d.hex());
        if let Some(bytes) = manifest_bytes.get(&d) {
            add(&mut tar, &name, bytes)?;
            report.bytes += bytes.len() as u64;
        } else {
            let (f, size) = match store.open_blob_file(&d)? {
                Some(f) => f,
                None => {
                    return Err(BundleError::Export(format!("blob {d} left the cache during the export")))
                }
            };
            let mut h = regular_header(size);
            // Exactly `size` bytes: a file that changed under us cannot overrun the entry.
            tar.append_data(&mut h, &name, f.take(size)).map_err(io_err(format!("writing blob {d}")))?;
            report.bytes += size;
        }
        report.blobs += 1;
    }
    let mut out = tar.into_inner().map_err(io_err("finishing the bundle"))?;
    out.flush().map_err(io_err("flushing the bundle"))?;
    Ok((report, out))
}

#[derive(Deserialize)]
struct HistoryFile {
    tags: Vec<HistoryTag>,
}

#[derive(Deserialize)]
struct HistoryTag {
    repository: String,
    tag: String,
    history: Vec<HistorySeen>,
}

#[derive(Deserialize)]
struct HistorySeen {
    digest: String,
    first_seen_ms: u64,
    last_seen_ms: u64,
}

/// One imported image, for the summary.
#[derive(Clone, Debug, Serialize)]
pub struct ImportedImage {
    pub reference: String,
    pub digest: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    pub images: Vec<ImportedImage>,
    /// Blobs (manifests included) new to the cache, and their bytes.
    pub new_blobs: usize,
    pub new_bytes: u64,
    /// Blobs the cache held already.
    pub present_blobs: usize,
}

/// Files staged from a bundle: removed unless committed.
struct Staged {
    files: HashMap<Digest, (PathBuf, u64)>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (path, _) in self.files.values() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The small files of a bundle, read whole.
#[derive(Default)]
struct Metadata {
    layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    history: Option<Vec<u8>>,
}

/// A bundle entry's path, checked: relative, no `..`, nothing but normal components.
fn safe_path(p: &Path) -> Result<PathBuf, BundleError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(refused(format!("entry {:?} is not a plain relative path", p.display()))),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refused("an entry has an empty path"));
    }
    Ok(out)
}

fn read_small(mut r: impl Read, what: &str, max: u64) -> Result<Vec<u8>, BundleError> {
    let mut buf = Vec::new();
    (&mut r).take(max + 1).read_to_end(&mut buf).map_err(io_err(format!("reading {what}")))?;
    if buf.len() as u64 > max {
        return Err(refused(format!("{what} is larger than {max} bytes")));
    }
    Ok(buf)
}

/// Copies a blob entry to a spool file while hashing it; refuses it unless it matches.
fn stage_blob(store: &Store, d: &Digest, mut r: impl Read, staged: &mut Staged) -> Result<(), BundleError> {
    if staged.files.contains_key(d) {
        return Err(refused(format!("blob {d} appears twice")));
    }
    let mut spool = store.spool().map_err(io_err("a spool file"))?;
    let path = spool.path.clone();
    // Owned by `staged` from here, so a failure below removes it.
    staged.files.insert(d.clone(), (path, 0));
    let mut hasher: Hasher = d.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(|e| refused(format!("blob {d}: {e} (a truncated bundle?)")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        spool.file.write_all(&buf[..n]).map_err(io_err(format!("staging blob {d}")))?;
        size += n as u64;
    }
    let got = hasher.finish();
    if got != *d {
        return Err(refused(format!("blob {d} does not match its digest (its bytes hash to {got})")));
    }
    spool.file.sync_all().map_err(io_err(format!("staging blob {d}")))?;
    if let Some(e) = staged.files.get_mut(d) {
        e.1 = size;
    }
    Ok(())
}

fn take_entry(
    store: &Store,
    path: &Path,
    kind: &str,
    r: impl Read,
    meta: &mut Metadata,
    staged: &mut Staged,
) -> Result<(), BundleError> {
    let p = safe_path(path)?;
    match kind {
        "dir" => return Ok(()),
        "file" => {}
        other => {
            return Err(refused(format!("entry {} is a {other}; a bundle holds only files", p.display())))
        }
    }
    let name = p.to_string_lossy().into_owned();
    let slot = match name.as_str() {
        "oci-layout" => Some(&mut meta.layout),
        "index.json" => Some(&mut meta.index),
        HISTORY_FILE => Some(&mut meta.history),
        // For `docker load`; the import reads index.json (and only checks this is small).
        "manifest.json" | "repositories" => {
            read_small(r, &name, MAX_METADATA_BYTES)?;
            return Ok(());
        }
        _ => None,
    };
    if let Some(slot) = slot {
        if slot.is_some() {
            return Err(refused(format!("{name} appears twice")));
        }
        *slot = Some(read_small(r, &name, MAX_METADATA_BYTES)?);
        return Ok(());
    }
    if p.starts_with("blobs") {
        let d = blob_digest(&p).ok_or_else(|| refused(format!("{name} is not blobs/<algorithm>/<hex>")))?;
        return stage_blob(store, &d, r, staged);
    }
    Err(refused(format!("unexpected entry {name}")))
}

/// A manifest from the bundle or, for a differential bundle, the cache.
fn manifest_of(store: &Store, staged: &Staged, d: &Digest) -> Result<Option<Vec<u8>>, BundleError> {
    if let Some((path, size)) = staged.files.get(d) {
        if *size > MAX_MANIFEST_BYTES {
            return Err(refused(format!("manifest {d} is larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        return Ok(Some(std::fs::read(path).map_err(io_err(format!("reading manifest {d}")))?));
    }
    Ok(store.manifest_bytes(d)?.map(|m| m.bytes.to_vec()))
}

/// An image to file: where, under what name, and every manifest of its graph.
struct Filing {
    key: RepoKey,
    tag: Option<Tag>,
    digest: Digest,
    reference: String,
    manifests: Vec<(Digest, Vec<u8>, String)>,
}

/// Checks an index.json entry's graph: the manifests there (children of an index may be
/// missing: a bundle may carry some platforms), every blob an image manifest names there.
fn check_graph(
    store: &Store,
    staged: &Staged,
    entry: &Value,
    upstream_known: &dyn Fn(&str) -> bool,
) -> Result<Filing, BundleError> {
    let d = entry["digest"]
        .as_str()
        .and_then(Digest::parse)
        .ok_or_else(|| refused(format!("index.json names an invalid digest: {}", entry["digest"])))?;
    let ann = &entry["annotations"];
    let name = ann[REPOSITORY_ANNOTATION]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            let full = ann[CONTAINERD_NAME].as_str().or(ann[REF_NAME].as_str())?;
            Some(split_reference(full).0.to_owned())
        })
        .ok_or_else(|| refused(format!("index.json entry {d} names no image")))?;
    let key =
        RepoKey::parse(&name).ok_or_else(|| refused(format!("{name:?} is not <upstream>/<repository>")))?;
    let upstream = name.split('/').next().unwrap_or_default();
    if !upstream_known(upstream) {
        return Err(refused(format!(
            "{name}: this wharf has no upstream named {upstream} (add [[upstreams]] name = \"{upstream}\", offline = true)"
        )));
    }
    let full = ann[CONTAINERD_NAME].as_str().or(ann[REF_NAME].as_str()).unwrap_or("");
    let tag = match split_reference(full).1 {
        Some(t) if !t.starts_with("sha256:") && !t.starts_with("sha512:") => {
            Some(Tag::parse(t).ok_or_else(|| refused(format!("{full:?} has an invalid tag")))?)
        }
        _ => None,
    };
    let reference = match &tag {
        Some(t) => format!("{name}:{}", t.as_str()),
        None => format!("{name}@{d}"),
    };
    let mut manifests = Vec::new();
    let mut stack = vec![(d.clone(), entry["mediaType"].as_str().map(str::to_owned), true)];
    let mut visited = HashSet::new();
    while let Some((m, declared, required)) = stack.pop() {
        if !visited.insert(m.clone()) {
            continue;
        }
        let Some(bytes) = manifest_of(store, staged, &m)? else {
            if required {
                return Err(refused(format!("{reference}: manifest {m} is not in the bundle")));
            }
            continue;
        };
        let media_type = stored_media_type(declared.as_deref(), &bytes)
            .ok_or_else(|| refused(format!("{reference}: {m} is not a manifest")))?;
        let (children, blobs) = references(&bytes);
        if is_index(&media_type) {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            for (c, e) in children.iter().zip(v["manifests"].as_array().into_iter().flatten()) {
                stack.push((c.clone(), e["mediaType"].as_str().map(str::to_owned), false));
            }
        } else {
            for b in blobs {
                let present = staged.files.contains_key(&b) || store.blob_size(&b)?.is_some();
                if !present {
                    return Err(refused(format!(
                        "{reference}: manifest {m} references blob {b}, which is neither in the bundle nor in the cache"
                    )));
                }
            }
        }
        manifests.push((m, bytes, media_type));
    }
    Ok(Filing { key, tag, digest: d, reference, manifests })
}

/// Reads a bundle (a tar, or an OCI layout directory), checks all of it, then files it in
/// the cache. `upstream_known` says whether this wharf has an upstream of that name.
pub fn import(
    store: &Store,
    path: &Path,
    upstream_known: &dyn Fn(&str) -> bool,
) -> Result<ImportReport, BundleError> {
    let mut meta = Metadata::default();
    let mut staged = Staged { files: HashMap::new() };
    if path.is_dir() {
        read_dir_bundle(store, path, &mut meta, &mut staged)?;
    } else {
        let mut ar = tar::Archive::new(open_tar(path)?);
        let entries = ar.entries().map_err(|e| refused(format!("not a tar: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| refused(format!("{e} (a truncated or damaged bundle?)")))?;
            let p = entry.path().map_err(|e| refused(format!("an entry's path: {e}")))?.into_owned();
            let kind = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => "file",
                tar::EntryType::Directory => "dir",
                tar::EntryType::Symlink => "symbolic link",
                tar::EntryType::Link => "hard link",
                tar::EntryType::Char | tar::EntryType::Block => "device",
                tar::EntryType::Fifo => "fifo",
                _ => "special entry",
            };
            let size = entry.header().size().unwrap_or(0);
            let mut counted = CountingReader { inner: entry, read: 0 };
            take_entry(store, &p, kind, &mut counted, &mut meta, &mut staged)?;
            if kind == "file" && counted.read != size {
                return Err(refused(format!("{} is cut short (a truncated bundle?)", p.display())));
            }
        }
    }
    let layout = meta.layout.ok_or_else(|| refused("no oci-layout file: not an OCI image layout"))?;
    let layout: Value = serde_json::from_slice(&layout).map_err(|e| refused(format!("oci-layout: {e}")))?;
    if layout["imageLayoutVersion"].as_str() != Some("1.0.0") {
        return Err(refused(format!("oci-layout version {} is not 1.0.0", layout["imageLayoutVersion"])));
    }
    let index = meta.index.ok_or_else(|| refused("no index.json"))?;
    let index: Value = serde_json::from_slice(&index).map_err(|e| refused(format!("index.json: {e}")))?;
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        return Err(refused("index.json lists no image"));
    }
    let filings = entries
        .iter()
        .map(|e| check_graph(store, &staged, e, upstream_known))
        .collect::<Result<Vec<_>, _>>()?;
    let history: Option<HistoryFile> = match &meta.history {
        Some(h) => Some(serde_json::from_slice(h).map_err(|e| refused(format!("{HISTORY_FILE}: {e}")))?),
        None => None,
    };

    // Everything checks out: file it. Blobs first, then manifests, then tags.
    let mut report = ImportReport::default();
    let manifest_digests: HashSet<&Digest> =
        filings.iter().flat_map(|f| f.manifests.iter().map(|m| &m.0)).collect();
    for (d, (spool, size)) in &staged.files {
        if manifest_digests.contains(d) {
            continue;
        }
        if store.blob_size(d)?.is_some() {
            report.present_blobs += 1;
            continue;
        }
        store.commit_blob(spool, d, *size)?;
        report.new_blobs += 1;
        report.new_bytes += size;
    }
    let now = now_ms();
    for f in &filings {
        for (d, bytes, media_type) in &f.manifests {
            match store.blob_size(d)? {
                Some(_) => report.present_blobs += 1,
                None => {
                    report.new_blobs += 1;
                    report.new_bytes += bytes.len() as u64;
                }
            }
            store.put_manifest(&f.key, d, bytes, media_type)?;
            if !is_index(media_type) {
                for b in references(bytes).1 {
                    store.link_layer(&f.key, &b)?;
                }
            }
        }
        if let Some(t) = &f.tag {
            if let Some(h) = history
                .as_ref()
                .and_then(|h| h.tags.iter().find(|x| x.repository == f.key.as_str() && x.tag == t.as_str()))
            {
                let seen: Vec<(Digest, u64, u64)> = h
                    .history
                    .iter()
                    .filter_map(|s| Some((Digest::parse(&s.digest)?, s.first_seen_ms, s.last_seen_ms)))
                    .collect();
                store.import_history(&f.key, t, &seen)?;
            }
            store.record_tag(&f.key, t, &f.digest, now)?;
        }
        report.images.push(ImportedImage { reference: f.reference.clone(), digest: f.digest.to_string() });
    }
    store.flush()?;
    Ok(report)
}

/// Counts what a reader gave, to tell a cut-short entry.
struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// An OCI layout directory: the same checks as a tar (links and special files refused).
fn read_dir_bundle(
    store: &Store,
    root: &Path,
    meta: &mut Metadata,
    staged: &mut Staged,
) -> Result<(), BundleError> {
    let mut stack = vec![PathBuf::new()];
    let mut seen_files = BTreeMap::new();
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let e = e.map_err(io_err(format!("reading {}", dir.display())))?;
            let ft = e.file_type().map_err(io_err(format!("{}", e.path().display())))?;
            let rel = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(rel);
            } else if ft.is_file() {
                seen_files.insert(rel, ());
            } else {
                let kind = if ft.is_symlink() { "symbolic link" } else { "special file" };
                take_entry(store, &rel, kind, io::empty(), meta, staged)?;
            }
        }
    }
    for rel in seen_files.keys() {
        let f = File::open(root.join(rel)).map_err(io_err(format!("opening {}", rel.display())))?;
        take_entry(store, rel, "file", f, meta, staged)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_must_be_plain_and_relative() {
        for ok in ["index.json", "./blobs/sha256/ab", "blobs/sha256/ab"] {
            assert!(safe_path(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in ["/etc/passwd", "../x", "blobs/../../x", "", "."] {
            assert!(safe_path(Path::new(bad)).is_err(), "{bad}");
        }
        let hex = "a".repeat(64);
        assert!(blob_digest(Path::new(&format!("blobs/sha256/{hex}"))).is_some());
        assert!(blob_digest(Path::new("blobs/sha256/zz")).is_none());
    }
}
