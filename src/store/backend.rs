//! The one way to blob bytes. Everything that reads, writes, deletes or lists stored blobs
//! goes through [`BlobBackend`]; the filesystem tree is its first implementation, and a
//! shared object store is meant to be another with nothing above the store changing.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;

use crate::oci::Digest;

/// A stored blob opened for reading.
pub enum BlobRead {
    /// A local file: positional reads, mappings and `sendfile` work on it. The whole blob;
    /// the caller reads the range it wants.
    File { file: File, size: u64 },
    /// Bytes from a backend with no local file, already cut to the range asked for.
    Stream { body: Pin<Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send>>, size: u64 },
}

/// One stored blob, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    pub digest: Digest,
    pub size: u64,
    /// When it was stored (unix milliseconds).
    pub stored_ms: u64,
}

/// A download's local temp file, before it is verified and handed to [`BlobBackend::put_spool`].
pub struct Spool {
    pub file: File,
    pub path: PathBuf,
}

/// Where verified blob bytes live. All calls block: async callers use the blocking pool.
pub trait BlobBackend: Send + Sync {
    /// Size of a stored blob; `None` when absent.
    fn stat(&self, d: &Digest) -> io::Result<Option<u64>>;
    /// Opens a stored blob. `range` (first byte, length) is a hint: a [`BlobRead::File`] is
    /// always the whole blob, a [`BlobRead::Stream`] only the range.
    fn open(&self, d: &Digest, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>>;
    /// Reads a small blob (a manifest, a config) whole.
    fn read(&self, d: &Digest) -> io::Result<Option<Vec<u8>>>;
    /// A new temp file for a download.
    fn spool(&self) -> io::Result<Spool>;
    /// Stores a complete, verified, fsynced spool as blob `d`.
    fn put_spool(&self, spool: &Path, d: &Digest) -> io::Result<()>;
    /// Stores small verified bytes (a manifest) durably.
    fn put_bytes(&self, d: &Digest, bytes: &[u8]) -> io::Result<()>;
    /// Removes a stored blob; its size when it was there. A reader that has it open keeps
    /// reading the bytes it opened.
    fn delete(&self, d: &Digest) -> io::Result<Option<u64>>;
    /// Every stored blob, in no particular order.
    fn list(&self, each: &mut dyn FnMut(Listed)) -> io::Result<()>;
    /// Temp files older than `older_than_ms` (unix milliseconds) that no download owns any
    /// more: removed unless `dry_run`; returns their total size and count.
    fn sweep_spools(&self, older_than_ms: u64, dry_run: bool) -> io::Result<(u64, u64)>;
    /// Bytes free for blobs (the file system's available space); `None` when unbounded.
    fn free_space(&self) -> io::Result<Option<u64>>;
}
