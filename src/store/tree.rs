//! The storage tree, in the layout of CNCF distribution's filesystem driver, so that a
//! stock registry pointed at the data dir serves what wharf cached:
//!
//! ```text
//! docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data
//! docker/registry/v2/repositories/<upstream>/<name>/_layers/sha256/<hex>/link
//!                                              /_manifests/revisions/sha256/<hex>/link
//!                                              /_manifests/tags/<tag>/current/link
//!                                              /_manifests/tags/<tag>/index/sha256/<hex>/link
//! ```
//! Every write goes to a temp file under `wharf/tmp` and is renamed into place. Blob and
//! manifest data is fsynced before the rename, so a crash leaves either no file or the
//! whole one under a digest's name. Link files are not: they are read through the digest
//! grammar, so one a crash left empty or short reads as absent (a cache miss). Only a
//! downloaded blob's rename is made durable (the directory fsynced), after its clients
//! have their bytes; a lost manifest or link name is a cache miss, so cold tags and
//! manifests wait for one disk flush instead of eight.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::oci::{Digest, Tag};

use super::RepoKey;

const V2: &str = "docker/registry/v2";

/// Paths and atomic writes in the storage tree.
pub struct Tree {
    /// `<data_dir>/docker/registry/v2`.
    v2: PathBuf,
    /// Spool and temp files; on the same file system as `v2`, so renames are atomic.
    tmp: PathBuf,
    /// Makes temp names unique within this process.
    seq: AtomicU64,
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
        Ok(Tree { v2, tmp, seq: AtomicU64::new(0) })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.v2.join("blobs/sha256").join(&d.hex()[..2]).join(d.hex()).join("data")
    }

    pub fn repositories(&self) -> PathBuf {
        self.v2.join("repositories")
    }

    pub fn blobs_root(&self) -> PathBuf {
        self.v2.join("blobs/sha256")
    }

    fn repo(&self, r: &RepoKey) -> PathBuf {
        self.repositories().join(r.as_str())
    }

    pub fn layer_link(&self, r: &RepoKey, d: &Digest) -> PathBuf {
        self.repo(r).join("_layers/sha256").join(d.hex()).join("link")
    }

    pub fn revision_link(&self, r: &RepoKey, d: &Digest) -> PathBuf {
        self.repo(r).join("_manifests/revisions/sha256").join(d.hex()).join("link")
    }

    pub fn tag_current(&self, r: &RepoKey, t: &Tag) -> PathBuf {
        self.repo(r).join("_manifests/tags").join(t.as_str()).join("current/link")
    }

    pub fn tag_index_link(&self, r: &RepoKey, t: &Tag, d: &Digest) -> PathBuf {
        self.repo(r).join("_manifests/tags").join(t.as_str()).join("index/sha256").join(d.hex()).join("link")
    }

    /// A new temp file for a download in progress.
    pub fn spool(&self) -> io::Result<(File, PathBuf)> {
        let path =
            self.tmp.join(format!("{}-{}", std::process::id(), self.seq.fetch_add(1, Ordering::Relaxed)));
        let f = File::options().read(true).write(true).create_new(true).open(&path)?;
        Ok((f, path))
    }

    /// Moves a complete, verified, fsynced spool file into place as blob `d`.
    pub fn persist(&self, spool: &Path, d: &Digest) -> io::Result<()> {
        let dest = self.blob_path(d);
        rename_into(spool, &dest)
    }

    /// Writes a small blob (a manifest) atomically and durably.
    pub fn write_blob(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        self.write_atomic(&self.blob_path(d), bytes, true)
    }

    /// Writes a link file (`sha256:<hex>`) atomically, without waiting for the disk.
    pub fn write_link(&self, path: &Path, d: &Digest) -> io::Result<()> {
        self.write_atomic(path, d.to_string().as_bytes(), false)
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let (mut f, tmp) = self.spool()?;
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

/// Reads a link file; `None` when it does not exist or does not hold a digest.
pub fn read_link(path: &Path) -> io::Result<Option<Digest>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Digest::parse(s.trim())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
