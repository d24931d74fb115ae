//! The storage tree, in the layout of CNCF distribution's filesystem driver, so that a
//! stock registry pointed at the data dir serves what wharf cached:
//!
//! ```text
//! docker/registry/v2/blobs/<alg>/<2 hex>/<hex>/data
//! docker/registry/v2/repositories/<upstream>/<name>/_layers/<alg>/<hex>/link
//!                                              /_manifests/revisions/<alg>/<hex>/link
//!                                              /_manifests/tags/<tag>/current/link
//!                                              /_manifests/tags/<tag>/index/<alg>/<hex>/link
//! ```
//! `<alg>` is `sha256` or `sha512`, as distribution writes them.
//! Every write goes to a temp file under `wharf/tmp` and is renamed into place. Blob and
//! manifest data is fsynced before the rename, so a crash leaves either no file or the
//! whole one under a digest's name. Link files are not: they are read through the digest
//! grammar, so one a crash left empty or short reads as absent (a cache miss). Only a
//! downloaded blob's rename is made durable (the directory fsynced), after its clients
//! have their bytes; a lost manifest or link name is a cache miss, so cold tags and
//! manifests wait for one disk flush instead of eight.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use crate::oci::{Algorithm, Digest, Tag};

use super::backend::{BlobBackend, BlobRead, Listed, Spool};
use super::RepoKey;

const V2: &str = "docker/registry/v2";

/// A shared copy of the link files (the s3 backend's bucket): written before the local
/// file, read when the local one is missing. `rel` is a path under `docker/registry/v2`.
pub trait LinkMirror: Send + Sync {
    fn put_link(&self, rel: &str, d: &Digest) -> io::Result<()>;
    /// The link's digest and when it was last written (unix milliseconds).
    fn link(&self, rel: &str) -> io::Result<Option<(Digest, u64)>>;
    fn delete_link(&self, rel: &str) -> io::Result<()>;
    /// Every link file under `rel_prefix`, with when it was last written.
    fn list_links(&self, rel_prefix: &str) -> io::Result<Vec<(String, u64)>>;
}

/// Paths and atomic writes in the storage tree.
pub struct Tree {
    /// `<data_dir>/docker/registry/v2`.
    v2: PathBuf,
    /// Spool and temp files; on the same file system as `v2`, so renames are atomic.
    tmp: PathBuf,
    /// Makes temp names unique within this process.
    seq: AtomicU64,
    /// The shared copy of the links, when replicas share a bucket.
    mirror: Option<std::sync::Arc<dyn LinkMirror>>,
}

impl Tree {
    /// Opens (creating) the tree under `data_dir` and deletes temp files a crash left.
    pub fn open(data_dir: &Path) -> io::Result<Tree> {
        let v2 = data_dir.join(V2);
        let tmp = data_dir.join("wharf/tmp");
        fs::create_dir_all(v2.join("blobs/sha256"))?;
        fs::create_dir_all(v2.join("repositories"))?;
        if tmp.exists() {
            let mut cleaned = 0;
            for e in fs::read_dir(&tmp)? {
                fs::remove_file(e?.path())?;
                cleaned += 1;
            }
            if cleaned > 0 {
                tracing::info!(files = cleaned, "removed temp files left by an earlier run");
            }
        }
        fs::create_dir_all(&tmp)?;
        Ok(Tree { v2, tmp, seq: AtomicU64::new(0), mirror: None })
    }

    /// Makes every link write go to `mirror` first, and missing links be read from it.
    pub fn set_mirror(&mut self, mirror: std::sync::Arc<dyn LinkMirror>) {
        self.mirror = Some(mirror);
    }

    /// `path` relative to `docker/registry/v2`, as the mirror names it.
    fn rel(&self, path: &Path) -> Option<String> {
        path.strip_prefix(&self.v2).ok().and_then(|p| p.to_str()).map(str::to_owned)
    }

    /// Copies the mirror's link files under `rel_prefix` (a directory under
    /// `docker/registry/v2`) that are missing here or were written since, with the
    /// mirror's times. Returns how many were copied.
    pub fn pull_links(&self, rel_prefix: &str) -> io::Result<u64> {
        let Some(m) = &self.mirror else { return Ok(0) };
        let mut copied = 0;
        for (rel, at) in m.list_links(rel_prefix)? {
            // Names from the bucket become paths: only plain components.
            if rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                continue;
            }
            let path = self.v2.join(&rel);
            let at_time = UNIX_EPOCH + std::time::Duration::from_millis(at);
            let current = rel.ends_with("/current/link");
            if path.exists() && (!current || mtime_ms(&path) == at) {
                // The same link; the bucket's time is the one every replica shares.
                if mtime_ms(&path) != at {
                    File::options().write(true).open(&path)?.set_modified(at_time)?;
                }
                continue;
            }
            // A link under `<alg>/<hex>/link` names its digest; `current/link` must be read.
            let comps: Vec<&str> = rel.rsplit('/').take(3).collect();
            let d = match comps.as_slice() {
                ["link", hex, alg] if !current => Digest::parse(&format!("{alg}:{hex}")),
                _ => m.link(&rel)?.map(|(d, _)| d),
            };
            let Some(d) = d else { continue };
            self.write_link_local(&path, &d)?;
            File::options().write(true).open(&path)?.set_modified(at_time)?;
            copied += 1;
        }
        Ok(copied)
    }

    /// The local link at `path`, copied from the mirror first when it is missing here.
    fn has_link(&self, path: &Path) -> bool {
        if path.exists() {
            return true;
        }
        let (Some(m), Some(rel)) = (&self.mirror, self.rel(path)) else { return false };
        match m.link(&rel) {
            Ok(Some((d, at))) => {
                if self.write_link_local(path, &d).is_ok() {
                    if let Ok(f) = File::options().write(true).open(path) {
                        let _ = f.set_modified(UNIX_EPOCH + std::time::Duration::from_millis(at));
                    }
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, link = %rel, "reading a link from the bucket failed");
                false
            }
        }
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_root(d.algorithm()).join(&d.hex()[..2]).join(d.hex()).join("data")
    }

    fn repositories(&self) -> PathBuf {
        self.v2.join("repositories")
    }

    fn blobs_root(&self, a: Algorithm) -> PathBuf {
        self.v2.join("blobs").join(a.as_str())
    }

    fn repo(&self, r: &RepoKey) -> PathBuf {
        self.repositories().join(r.as_str())
    }

    fn layer_link(&self, r: &RepoKey, d: &Digest) -> PathBuf {
        self.repo(r).join("_layers").join(d.algorithm().as_str()).join(d.hex()).join("link")
    }

    fn revision_link(&self, r: &RepoKey, d: &Digest) -> PathBuf {
        self.repo(r).join("_manifests/revisions").join(d.algorithm().as_str()).join(d.hex()).join("link")
    }

    fn tag_current(&self, r: &RepoKey, t: &Tag) -> PathBuf {
        self.repo(r).join("_manifests/tags").join(t.as_str()).join("current/link")
    }

    fn tag_index_link(&self, r: &RepoKey, t: &Tag, d: &Digest) -> PathBuf {
        self.repo(r)
            .join("_manifests/tags")
            .join(t.as_str())
            .join("index")
            .join(d.algorithm().as_str())
            .join(d.hex())
            .join("link")
    }

    fn new_spool(&self) -> io::Result<(File, PathBuf)> {
        let path =
            self.tmp.join(format!("{}-{}", std::process::id(), self.seq.fetch_add(1, Ordering::Relaxed)));
        let f = File::options().read(true).write(true).create_new(true).open(&path)?;
        Ok((f, path))
    }

    /// Writes and removes a small temp file: whether the data dir takes writes now.
    pub fn probe_write(&self) -> io::Result<()> {
        let (mut f, path) = self.new_spool()?;
        let res = f.write_all(b"ready").and_then(|_| f.sync_data());
        let _ = fs::remove_file(&path);
        res
    }

    /// Removes the `_layers` links of `digests` in every repository, so a stock registry
    /// reading the tree never lists a layer whose data is gone. One walk for the batch.
    pub fn remove_layer_links(&self, digests: &HashSet<&str>) -> io::Result<u64> {
        let mut removed = 0;
        if let Some(m) = &self.mirror {
            for (rel, _) in m.list_links("repositories/")? {
                let comps: Vec<&str> = rel.rsplit('/').take(4).collect();
                if let ["link", hex, _, "_layers"] = comps.as_slice() {
                    if digests.contains(hex) {
                        m.delete_link(&rel)?;
                    }
                }
            }
        }
        for layers in find_dirs_named(&self.repositories(), "_layers")? {
            for a in Algorithm::ALL {
                let Ok(entries) = fs::read_dir(layers.join(a.as_str())) else { continue };
                for e in entries.flatten() {
                    if digests.contains(e.file_name().to_string_lossy().as_ref()) {
                        match fs::remove_dir_all(e.path()) {
                            Ok(()) => removed += 1,
                            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                            Err(err) => return Err(err),
                        }
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Writes a link file (`<alg>:<hex>`): to the mirror first, when there is one, then
    /// here atomically, without waiting for the disk.
    fn write_link(&self, path: &Path, d: &Digest) -> io::Result<()> {
        if let (Some(m), Some(rel)) = (&self.mirror, self.rel(path)) {
            m.put_link(&rel, d)?;
        }
        self.write_link_local(path, d)
    }

    fn write_link_local(&self, path: &Path, d: &Digest) -> io::Result<()> {
        self.write_atomic(path, d.to_string().as_bytes(), false)
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let (mut f, tmp) = self.new_spool()?;
        let res = f.write_all(bytes).and_then(|_| match durable {
            // The data must be on disk before its name is; the name itself may be lost.
            true => f.sync_all().and_then(|_| rename_only(&tmp, dest)),
            false => rename_only(&tmp, dest),
        });
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }
}

impl BlobBackend for Tree {
    fn stat(&self, d: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self, d: &Digest, _range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        match File::open(self.blob_path(d)) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some(BlobRead::File { file, size }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read(&self, d: &Digest) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.blob_path(d)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn spool(&self) -> io::Result<Spool> {
        let (file, path) = self.new_spool()?;
        Ok(Spool { file, path })
    }

    fn put_spool(&self, spool: &Path, d: &Digest) -> io::Result<()> {
        rename_into(spool, &self.blob_path(d))
    }

    fn put_bytes(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        self.write_atomic(&self.blob_path(d), bytes, true)
    }

    fn delete(&self, d: &Digest) -> io::Result<Option<u64>> {
        let path = self.blob_path(d);
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        // The now empty `<hex>/` directory; its `<2 hex>/` parent stays for the next blob.
        if let Some(dir) = path.parent() {
            let _ = fs::remove_dir(dir);
        }
        Ok(Some(size))
    }

    fn list(&self, each: &mut dyn FnMut(Listed)) -> io::Result<()> {
        for a in Algorithm::ALL {
            let Ok(prefixes) = fs::read_dir(self.blobs_root(a)) else { continue };
            for p in prefixes {
                let p = p?;
                let Ok(blobs) = fs::read_dir(p.path()) else { continue };
                for b in blobs {
                    let b = b?;
                    let name = b.file_name();
                    let Some(d) = name.to_str().and_then(Digest::from_hex).filter(|d| d.algorithm() == a)
                    else {
                        continue;
                    };
                    match fs::metadata(b.path().join("data")) {
                        Ok(m) => each(Listed { digest: d, size: m.len(), stored_ms: modified_ms(&m) }),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    fn sweep_spools(&self, older_than_ms: u64, dry_run: bool) -> io::Result<(u64, u64)> {
        let (mut bytes, mut files) = (0, 0);
        for e in fs::read_dir(&self.tmp)? {
            let e = e?;
            let m = e.metadata()?;
            if !m.is_file() || modified_ms(&m) >= older_than_ms {
                continue;
            }
            if !dry_run {
                match fs::remove_file(e.path()) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
            }
            bytes += m.len();
            files += 1;
        }
        Ok((bytes, files))
    }

    fn free_space(&self) -> io::Result<Option<u64>> {
        let st = rustix::fs::statvfs(&self.v2).map_err(io::Error::from)?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }
}

fn modified_ms(m: &fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Modification time of `path` in unix milliseconds (0 when it cannot be read).
pub fn mtime_ms(path: &Path) -> u64 {
    fs::metadata(path).map(|m| modified_ms(&m)).unwrap_or(0)
}

/// Every file below `root` (none when it does not exist).
pub fn walk_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Directories named `name` below `root`, not descending into them.
pub fn find_dirs_named(root: &Path, name: &str) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let e = e?;
            if !e.file_type()?.is_dir() {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if !e.file_name().to_string_lossy().starts_with('_') {
                stack.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Renames `src` to `dest`, creating `dest`'s parents, and fsyncs the directory so the
/// new name survives a crash.
fn rename_into(src: &Path, dest: &Path) -> io::Result<()> {
    rename_only(src, dest)?;
    let parent = dest.parent().ok_or_else(|| io::Error::other("destination has no parent"))?;
    File::open(parent)?.sync_all()
}

/// Renames `src` to `dest`, creating `dest`'s parents; a crash may undo it.
fn rename_only(src: &Path, dest: &Path) -> io::Result<()> {
    let parent = dest.parent().ok_or_else(|| io::Error::other("destination has no parent"))?;
    fs::create_dir_all(parent)?;
    fs::rename(src, dest)
}

/// Every (repository, manifest) revision link.
pub type Revisions = Vec<(RepoKey, Digest)>;

/// What a repository's `_manifests` directory says of one tag.
pub struct TagLinks {
    pub repo: RepoKey,
    pub tag: Tag,
    pub current: Digest,
    /// When the current link was last written (unix milliseconds).
    pub current_ms: u64,
    /// Every digest in the tag's index, with when its link was written.
    pub seen: Vec<(Digest, u64)>,
}

impl Tree {
    /// Whether `r` has a revision link for manifest `d`.
    pub fn has_revision(&self, r: &RepoKey, d: &Digest) -> bool {
        self.has_link(&self.revision_link(r, d))
    }

    /// The tag directory of `t` in `r`, relative to `docker/registry/v2` (for
    /// [`Tree::pull_links`]).
    pub fn tag_dir_rel(&self, r: &RepoKey, t: &Tag) -> String {
        format!("repositories/{}/_manifests/tags/{}/", r.as_str(), t.as_str())
    }

    /// What the links say of tag `t` of `r`.
    pub fn tag_links(&self, r: &RepoKey, t: &Tag) -> io::Result<Option<TagLinks>> {
        let tag_dir = self.repo(r).join("_manifests/tags").join(t.as_str());
        let current_link = tag_dir.join("current/link");
        let Some(current) = read_link(&current_link)? else { return Ok(None) };
        let mut seen = Vec::new();
        for a in Algorithm::ALL {
            for link in walk_files(&tag_dir.join("index").join(a.as_str()))? {
                if let Some(d) = read_link(&link)? {
                    seen.push((d, mtime_ms(&link)));
                }
            }
        }
        Ok(Some(TagLinks {
            repo: r.clone(),
            tag: t.clone(),
            current,
            current_ms: mtime_ms(&current_link),
            seen,
        }))
    }

    /// Every (repository, manifest digest) revision link, and every tag's links.
    pub fn manifest_links(&self) -> io::Result<(Revisions, Vec<TagLinks>)> {
        let repos_root = self.repositories();
        let (mut revisions, mut tags) = (Vec::new(), Vec::new());
        for manifests_dir in find_dirs_named(&repos_root, "_manifests")? {
            let Some(repo) = manifests_dir
                .parent()
                .and_then(|p| p.strip_prefix(&repos_root).ok())
                .and_then(|p| p.to_str())
                .and_then(RepoKey::parse)
            else {
                continue;
            };
            for a in Algorithm::ALL {
                for link in walk_files(&manifests_dir.join("revisions").join(a.as_str()))? {
                    if let Some(d) = read_link(&link)? {
                        revisions.push((repo.clone(), d));
                    }
                }
            }
            let Ok(tag_dirs) = fs::read_dir(manifests_dir.join("tags")) else {
                continue;
            };
            for tag_dir in tag_dirs {
                let tag_dir = tag_dir?.path();
                let Some(tag) = tag_dir.file_name().and_then(|n| n.to_str()).and_then(Tag::parse) else {
                    continue;
                };
                let current_link = tag_dir.join("current/link");
                let Some(current) = read_link(&current_link)? else {
                    continue;
                };
                let mut seen = Vec::new();
                for a in Algorithm::ALL {
                    for link in walk_files(&tag_dir.join("index").join(a.as_str()))? {
                        if let Some(d) = read_link(&link)? {
                            seen.push((d, mtime_ms(&link)));
                        }
                    }
                }
                tags.push(TagLinks {
                    repo: repo.clone(),
                    tag,
                    current,
                    current_ms: mtime_ms(&current_link),
                    seen,
                });
            }
        }
        Ok((revisions, tags))
    }

    /// Records that `r`'s tag `t` points at `d`: its index link and its current link.
    pub fn link_tag(&self, r: &RepoKey, t: &Tag, d: &Digest) -> io::Result<()> {
        let idx = self.tag_index_link(r, t, d);
        if !self.has_link(&idx) {
            self.write_link(&idx, d)?;
        }
        self.write_link(&self.tag_current(r, t), d)
    }

    /// Records that tag `t` of `r` once pointed at `d` (its history), without moving it.
    pub fn link_tag_history(&self, r: &RepoKey, t: &Tag, d: &Digest) -> io::Result<()> {
        let idx = self.tag_index_link(r, t, d);
        if !self.has_link(&idx) {
            self.write_link(&idx, d)?;
        }
        Ok(())
    }

    /// Records that `r` holds layer `d`.
    pub fn link_layer(&self, r: &RepoKey, d: &Digest) -> io::Result<()> {
        let link = self.layer_link(r, d);
        if !link.exists() {
            self.write_link(&link, d)?;
        }
        Ok(())
    }

    /// Records that `r` holds manifest `d`.
    pub fn link_revision(&self, r: &RepoKey, d: &Digest) -> io::Result<()> {
        let link = self.revision_link(r, d);
        if !link.exists() {
            self.write_link(&link, d)?;
        }
        Ok(())
    }
}

/// Reads a link file; `None` when it does not exist or does not hold a digest.
fn read_link(path: &Path) -> io::Result<Option<Digest>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Digest::parse(s.trim())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
