//! A blob download from upstream into a spool file, shared by every client that wants the
//! blob while it runs. Bytes go through sha256 on their way to disk; readers follow the
//! writer through the spool file but never receive the last byte before the digest is
//! verified, so a bad download can never look complete to a client. The spool is made
//! durable and moved into the store once the clients streaming it have their bytes.

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::oci::{Digest, RepoName};
use crate::store::{RepoKey, Store};
use crate::upstream::{error_chain, Upstream, UpstreamError};
use crate::zerocopy::Regions;

use super::{Cache, CacheError};

/// Most a reader that copies sends per chunk.
const CHUNK: usize = 128 * 1024;
/// Most a zero-copy reader sends per chunk (a mapping, which costs no memory).
const MAPPED_CHUNK: u64 = 4 * 1024 * 1024;
/// Most the writer hashes and writes per trip to the blocking pool. What arrived is batched
/// without copying, so this only bounds how much of the client's read buffers one trip pins.
const BATCH: usize = 2 * 1024 * 1024;
/// Most chunks per batch: one `writev` takes at most 1024 (IOV_MAX on Linux).
const BATCH_CHUNKS: usize = 1024;
/// Longest a verified download waits for its clients before it is made durable anyway.
const COMMIT_WAIT: Duration = Duration::from_secs(60);

/// Where a fill is.
#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Receiving; `written` bytes are in the spool file.
    Streaming {
        size: Option<u64>,
        written: u64,
    },
    /// Verified: every byte may go to clients. Once they have them, the spool is made
    /// durable and moved into the store.
    Verified {
        size: u64,
    },
    /// Verified and stored.
    Done {
        size: u64,
    },
    Failed(CacheError),
}

/// A download in progress, shared by every client that wants the blob.
pub struct Fill {
    pub digest: Digest,
    state: watch::Receiver<FillState>,
    /// The spool file; readers use positional reads, so they share it without a cursor.
    file: Arc<File>,
    clients: Arc<Clients>,
}

/// The clients streaming a download. Its fsync waits for them: when the upstream is faster
/// than the clients, the spool is complete long before they are, and writing a whole blob
/// back to disk under them slows them down for nothing (measured: 0.86x -> 0.91x of the
/// upstream's rate for a cold 1 GiB blob).
#[derive(Default)]
struct Clients {
    streaming: AtomicUsize,
    left: Notify,
}

impl Clients {
    /// Waits until no client is streaming, or `at_most`.
    async fn gone(&self, at_most: Duration) {
        let deadline = tokio::time::Instant::now() + at_most;
        while self.streaming.load(Ordering::Acquire) > 0 {
            // `notify_one` leaves a permit when nobody waits, so no departure is missed.
            if tokio::time::timeout_at(deadline, self.left.notified()).await.is_err() {
                return;
            }
        }
    }
}

/// One client streaming a download, counted until it is done.
struct Streaming(Arc<Clients>);

impl Streaming {
    fn new(clients: &Arc<Clients>) -> Self {
        clients.streaming.fetch_add(1, Ordering::AcqRel);
        Streaming(clients.clone())
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::AcqRel);
        self.0.left.notify_one();
    }
}

impl Fill {
    /// Waits for the upstream's answer: the size when it is known, or why it failed.
    pub async fn ready(&self) -> Result<Option<u64>, CacheError> {
        let mut rx = self.state.clone();
        loop {
            match rx.borrow_and_update().clone() {
                FillState::Connecting => {}
                FillState::Streaming { size, .. } => return Ok(size),
                FillState::Verified { size } | FillState::Done { size } => return Ok(Some(size)),
                FillState::Failed(e) => return Err(e),
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::Internal("blob download ended without a result".into()));
            }
        }
    }

    /// Waits until the whole blob is downloaded and verified, and returns its file (the
    /// spool, or the same file once moved into the store) and size.
    pub async fn verified(&self) -> Result<(File, u64), CacheError> {
        let mut rx = self.state.clone();
        loop {
            match rx.borrow_and_update().clone() {
                FillState::Verified { size } | FillState::Done { size } => {
                    let file = self
                        .file
                        .try_clone()
                        .map_err(|e| CacheError::from(crate::store::StoreError::from(e)))?;
                    return Ok((file, size));
                }
                FillState::Failed(e) => return Err(e),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::Internal("blob download ended without a result".into()));
            }
        }
    }

    /// Streams the blob to one client as it arrives. Ends with an error (the client's
    /// response is cut) when the download fails or does not match its digest.
    ///
    /// With `zerocopy` (a plain-TCP HTTP/1 client), each chunk is a mapping of the spool's
    /// written range, which the connection sends by `sendfile`: no read, no copy, no
    /// buffer per client. The spool only grows while the fill runs, and a failed fill
    /// unlinks it without truncating, so a mapped range stays valid.
    pub fn stream(
        self: Arc<Self>,
        tx: mpsc::Sender<io::Result<Bytes>>,
        zerocopy: Option<Arc<Regions>>,
        on_chunk: impl Fn(u64) + Send + 'static,
    ) {
        let streaming = Streaming::new(&self.clients);
        tokio::spawn(async move {
            let _streaming = streaming;
            let mut rx = self.state.clone();
            let mut off = 0u64;
            loop {
                let state = rx.borrow_and_update().clone();
                let (limit, done) = match state {
                    FillState::Connecting => (0, false),
                    // Hold back the last byte written until the digest is verified.
                    FillState::Streaming { written, .. } => (written.saturating_sub(1), false),
                    FillState::Verified { size } | FillState::Done { size } => (size, true),
                    FillState::Failed(e) => {
                        let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                        return;
                    }
                };
                if off < limit {
                    let chunk = match &zerocopy {
                        Some(regions) => {
                            let len = (limit - off).min(MAPPED_CHUNK) as usize;
                            regions.map(self.file.clone(), off, len)
                        }
                        None => {
                            let len = (limit - off).min(CHUNK as u64) as usize;
                            let file = self.file.clone();
                            tokio::task::spawn_blocking(move || read_at(&file, off, len))
                                .await
                                .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
                        }
                    };
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    off += chunk.len() as u64;
                    on_chunk(chunk.len() as u64);
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away; the download carries on for the cache
                    }
                    continue;
                }
                if done {
                    return;
                }
                if rx.changed().await.is_err() {
                    let _ = tx.send(Err(io::Error::other("blob download ended without a result"))).await;
                    return;
                }
            }
        });
    }
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
fn write_all_chunks(f: &mut File, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match f.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads `len` bytes at `off` into a new buffer.
pub fn read_at(file: &File, off: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    let mut got = 0;
    while got < len {
        let n = file.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than expected"));
        }
        got += n;
    }
    Ok(buf.freeze())
}

/// What [`Cache::join_or_start_fill`] found.
pub(super) enum Joined {
    /// A fill to stream, and whether it was already running.
    Fill(Arc<Fill>, bool),
    /// The blob is stored now.
    Stored,
    /// A new download is needed and none of `server.max_inflight_downloads` is free.
    NeedsSlot,
}

impl Cache {
    /// Joins the fill of `d` in flight, or starts one with `slot` (a download permit,
    /// taken without waiting when not given). Checked under the fills lock, so a fill
    /// that just finished is never started twice.
    pub(super) fn join_or_start_fill(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repo: &RepoName,
        key: &RepoKey,
        d: &Digest,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Joined, CacheError> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fills.get(d) {
            return Ok(Joined::Fill(f.clone(), true));
        }
        if self.store.blob_size(d)?.is_some() {
            return Ok(Joined::Stored);
        }
        let permit = match slot.take() {
            Some(p) => p,
            None => match self.limits.downloads.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => return Ok(Joined::NeedsSlot),
            },
        };
        let crate::store::Spool { file, path: spool } =
            self.store.spool().map_err(|e| CacheError::from(crate::store::StoreError::from(e)))?;
        let (tx, rx) = watch::channel(FillState::Connecting);
        let clients = Arc::new(Clients::default());
        let fill = Arc::new(Fill {
            digest: d.clone(),
            state: rx,
            clients: clients.clone(),
            file: Arc::new(
                file.try_clone().map_err(|e| CacheError::from(crate::store::StoreError::from(e)))?,
            ),
        });
        fills.insert(d.clone(), fill.clone());
        self.metrics.inflight_downloads.inc();
        let job = FillJob {
            cache: self.clone(),
            up: up.clone(),
            repo: repo.clone(),
            key: key.clone(),
            digest: d.clone(),
            spool,
            tx,
            clients,
            fill: Arc::downgrade(&fill),
            _slot: permit,
            spooled: Spooled { limits: self.limits.clone(), bytes: 0 },
            finished: false,
            shared_lease: None,
        };
        tokio::spawn(job.run(file));
        Ok(Joined::Fill(fill, false))
    }
}

/// The task that downloads one blob. Dropped however the task ends (finished, panicked,
/// cancelled): its `Drop` takes the fill out of the in-flight map and fails it for its
/// clients, so a later request starts a new download instead of waiting on a dead one.
struct FillJob {
    cache: Arc<Cache>,
    up: Arc<Upstream>,
    repo: RepoName,
    key: RepoKey,
    digest: Digest,
    spool: PathBuf,
    tx: watch::Sender<FillState>,
    clients: Arc<Clients>,
    /// This job's entry in the in-flight map (removed only if it is still this one).
    fill: std::sync::Weak<Fill>,
    /// One of `server.max_inflight_downloads`, held until the job ends.
    _slot: OwnedSemaphorePermit,
    /// This download's bytes counted against `server.max_spool_bytes`.
    spooled: Spooled,
    /// Set when `run` reached its end and published the result.
    finished: bool,
    /// This replica's claim on the download in a bucket shared by replicas, held until
    /// the blob is stored there.
    shared_lease: Option<crate::store::SharedLease>,
}

/// A blob body on its way into the spool.
type BodyStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send>>;

impl FillJob {
    async fn run(mut self, file: File) {
        let result = self.download(file).await;
        let state = match result {
            Ok(size) => FillState::Done { size },
            Err(e) => {
                let _ = std::fs::remove_file(&self.spool);
                match &e {
                    CacheError::DigestMismatch { .. } => {
                        self.cache.metrics.digest_mismatch.with_label_values(&[&self.up.name]).inc()
                    }
                    CacheError::Busy(limit) => {
                        self.cache.metrics.downloads_refused.with_label_values(&[limit]).inc()
                    }
                    _ => {}
                }
                tracing::warn!(upstream = %self.up.name, repository = %self.repo, digest = %self.digest, error = %e, "blob download failed; nothing cached");
                FillState::Failed(e)
            }
        };
        self.leave_map();
        self.tx.send_replace(state);
        self.finished = true;
    }

    fn leave_map(&self) {
        let mut fills = self.cache.fills.lock().unwrap_or_else(|p| p.into_inner());
        let ours =
            fills.get(&self.digest).zip(self.fill.upgrade()).is_some_and(|(f, mine)| Arc::ptr_eq(f, &mine));
        if ours {
            fills.remove(&self.digest);
        }
    }
}

impl Drop for FillJob {
    fn drop(&mut self) {
        if !self.finished {
            tracing::error!(digest = %self.digest, "blob download task ended without a result; nothing cached");
            let _ = std::fs::remove_file(&self.spool);
            self.leave_map();
            self.tx.send_replace(FillState::Failed(CacheError::Internal(
                "the download task ended early".into(),
            )));
        }
        self.cache.metrics.inflight_downloads.dec();
    }
}

/// Download slots and the spool-byte budget (`server.max_inflight_downloads`,
/// `server.max_spool_bytes`), shared by every fill.
pub(super) struct Limits {
    pub(super) downloads: Arc<Semaphore>,
    max_spool: u64,
    spool: std::sync::Mutex<u64>,
    freed: Notify,
    pub(super) wait: Duration,
    gauge: prometheus::IntGauge,
}

impl Limits {
    pub(super) fn new(cfg: &crate::config::ServerConfig, gauge: prometheus::IntGauge) -> Limits {
        Limits {
            downloads: Arc::new(Semaphore::new(cfg.max_inflight_downloads)),
            max_spool: cfg.max_spool_bytes.0,
            spool: std::sync::Mutex::new(0),
            freed: Notify::new(),
            wait: cfg.download_wait,
            gauge,
        }
    }

    /// Adds `n` bytes if they fit (or nothing else is spooled: a blob larger than the
    /// whole budget still downloads alone).
    fn try_add(&self, n: u64) -> bool {
        let mut cur = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        if self.max_spool == 0 || *cur == 0 || *cur + n <= self.max_spool {
            *cur += n;
            self.gauge.set(*cur as i64);
            true
        } else {
            false
        }
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut cur = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        *cur = cur.saturating_sub(n);
        self.gauge.set(*cur as i64);
        drop(cur);
        self.freed.notify_waiters();
    }
}

/// Bytes of one download counted against the spool budget, released when dropped.
struct Spooled {
    limits: Arc<Limits>,
    bytes: u64,
}

impl Spooled {
    /// Counts `n` more bytes, waiting up to `server.download_wait` for room.
    async fn reserve(&mut self, n: u64) -> Result<(), CacheError> {
        let deadline = tokio::time::Instant::now() + self.limits.wait;
        loop {
            let freed = self.limits.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.limits.try_add(n) {
                self.bytes += n;
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(CacheError::Busy("spool_bytes"));
            }
        }
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        self.limits.release(self.bytes);
    }
}

impl FillJob {
    /// Where the bytes come from: the upstream, or (with a bucket shared by replicas) the
    /// bucket, once the replica that claimed the download has put the blob there. A claim
    /// that lapses (its holder died) or a wait past `storage.lease_wait` fetches here.
    async fn source(&mut self) -> Result<(Option<u64>, BodyStream), CacheError> {
        let store = self.cache.store.clone();
        let deadline = tokio::time::Instant::now() + self.cache.lease_wait;
        let mut waited = false;
        // Each look costs the store a claim attempt and a HEAD: with many blobs waited
        // for on many replicas, a fixed 200 ms would be thousands of requests a second.
        let mut pause = Duration::from_millis(200);
        while store.is_shared() {
            let (s, d) = (store.clone(), self.digest.clone());
            let claim = super::blocking(move || s.claim_download(&d)).await?;
            match claim {
                crate::store::Claim::Mine(lease) => {
                    let shared = lease.is_some();
                    self.shared_lease = lease;
                    // Another replica may have stored it and let go of its claim since
                    // the cache was looked at: the claim orders us after it.
                    if shared {
                        if let Some(src) = self.bucket_source().await? {
                            return Ok(src);
                        }
                    }
                    break;
                }
                crate::store::Claim::Elsewhere => {
                    if !waited {
                        self.cache.metrics.replica_waits.inc();
                        waited = true;
                    }
                    if let Some(src) = self.bucket_source().await? {
                        return Ok(src);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(digest = %self.digest, "waited storage.lease_wait for another replica's download; fetching it here");
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 3 / 2).min(Duration::from_secs(1));
                }
            }
        }
        let resp = self.up.get_blob(&self.repo, &self.digest).await?;
        let size = resp.content_length();
        let body = resp
            .bytes_stream()
            .map(|r| r.map_err(|e| io::Error::other(format!("blob body cut: {}", error_chain(&e)))));
        Ok((size, Box::pin(body.fuse())))
    }

    /// The blob from the shared bucket, when another replica has stored it.
    async fn bucket_source(&self) -> Result<Option<(Option<u64>, BodyStream)>, CacheError> {
        let (s, d) = (self.cache.store.clone(), self.digest.clone());
        match super::blocking(move || s.shared_blob(&d)).await? {
            Some(crate::store::BlobRead::Stream { body, size }) => {
                self.cache.metrics.replica_fills.inc();
                Ok(Some((Some(size), Box::pin(body.fuse()))))
            }
            Some(crate::store::BlobRead::File { file, size }) => {
                // In the local tier after all (stored since we looked): read in chunks.
                let file = Arc::new(file);
                let body = futures_util::stream::unfold(0u64, move |off| {
                    let file = file.clone();
                    async move {
                        if off >= size {
                            return None;
                        }
                        let len = (size - off).min(CHUNK as u64) as usize;
                        let chunk = tokio::task::spawn_blocking(move || read_at(&file, off, len))
                            .await
                            .map_err(io::Error::other)
                            .and_then(|r| r);
                        Some((chunk, off + len as u64))
                    }
                });
                Ok(Some((Some(size), Box::pin(body.fuse()))))
            }
            None => Ok(None),
        }
    }

    async fn download(&mut self, file: File) -> Result<u64, CacheError> {
        let (size, mut stream) = self.source().await?;
        if let Some(n) = size {
            self.spooled.reserve(n).await?;
        }
        if let Some(n) = size {
            // Make room before the bytes land, so the spool does not fill the disk. Only
            // advice: whether the blob is stored is decided when it is complete.
            if let Err(e) = self.cache.make_room(n, true).await {
                tracing::warn!(error = %e, "eviction before a download failed");
            }
        }
        self.tx.send_replace(FillState::Streaming { size, written: 0 });
        let mut written = 0u64;
        let mut sink = Some((file, self.digest.hasher()));
        loop {
            let first = match stream.next().await {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(UpstreamError::Unavailable(e.to_string()).into()),
            };
            // Batch what has already arrived into one blocking write, without copying it.
            let mut n = first.len();
            let mut batch = vec![first];
            while n < BATCH && batch.len() < BATCH_CHUNKS {
                match stream.next().now_or_never() {
                    Some(Some(Ok(c))) => {
                        n += c.len();
                        batch.push(c);
                    }
                    Some(Some(Err(e))) => return Err(UpstreamError::Unavailable(e.to_string()).into()),
                    Some(None) | None => break,
                }
            }
            let n = n as u64;
            if size.is_some_and(|s| written + n > s) {
                return Err(UpstreamError::Invalid("blob body longer than its Content-Length".into()).into());
            }
            if size.is_none() {
                // No length announced: counted as it arrives, without waiting.
                if !self.spooled.limits.try_add(n) {
                    return Err(CacheError::Busy("spool_bytes"));
                }
                self.spooled.bytes += n;
            }
            let (mut f, mut h) = sink.take().ok_or_else(|| CacheError::Internal("spool lost".into()))?;
            let (f, h, res) = tokio::task::spawn_blocking(move || {
                batch.iter().for_each(|c| h.update(c));
                let res = write_all_chunks(&mut f, &batch);
                (f, h, res)
            })
            .await
            .map_err(|e| CacheError::Internal(e.to_string()))?;
            if let Err(e) = res {
                if e.raw_os_error() == Some(28) {
                    // ENOSPC: the clients' transfer is cut (the spool is how they are fed);
                    // free what the policy allows so the next try fits.
                    self.cache.metrics.uncached_downloads.with_label_values(&["disk_full"]).inc();
                    let cache = self.cache.clone();
                    tokio::spawn(async move { cache.make_room(n, false).await });
                }
                return Err(CacheError::from(crate::store::StoreError::from(e)));
            }
            sink = Some((f, h));
            written += n;
            self.up.count_body_bytes(n);
            self.tx.send_replace(FillState::Streaming { size, written });
        }
        let (f, h) = sink.ok_or_else(|| CacheError::Internal("spool lost".into()))?;
        let got = h.finish();
        if got != self.digest {
            return Err(CacheError::DigestMismatch { want: self.digest.clone(), got });
        }
        if size.is_some_and(|s| s != written) {
            return Err(UpstreamError::Invalid("blob body shorter than its Content-Length".into()).into());
        }
        // The clients' last byte need not wait for the fsyncs and renames below, and those
        // wait for the clients. Until then, new requests join this fill and read the spool.
        self.tx.send_replace(FillState::Verified { size: written });
        self.clients.gone(COMMIT_WAIT).await;
        let cache = self.cache.clone();
        let reserved = tokio::task::spawn_blocking(move || cache.reserve_blocking(written))
            .await
            .map_err(|e| CacheError::Internal(e.to_string()))??;
        let Some(reservation) = reserved else {
            // Served, not stored: everything left is pinned, in use or too young to evict.
            self.cache.metrics.uncached_downloads.with_label_values(&["no_room"]).inc();
            tracing::warn!(upstream = %self.up.name, repository = %self.repo, digest = %self.digest, bytes = written, "no room in the cache; blob served but not stored");
            let _ = std::fs::remove_file(&self.spool);
            return Ok(written);
        };
        let store: Arc<Store> = self.cache.store.clone();
        let (spool, d, key) = (self.spool.clone(), self.digest.clone(), self.key.clone());
        tokio::task::spawn_blocking(move || {
            // Held until the blob is counted in the store's totals.
            let _reservation = reservation;
            f.sync_all()?;
            store.commit_blob(&spool, &d, written)?;
            store.link_layer(&key, &d)
        })
        .await
        .map_err(|e| CacheError::Internal(e.to_string()))??;
        tracing::info!(upstream = %self.up.name, repository = %self.repo, digest = %self.digest, bytes = written, "blob cached");
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fill whose state the test drives, over a spool file of `len` bytes.
    fn fill(len: usize) -> (Arc<Fill>, watch::Sender<FillState>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool");
        std::fs::write(&path, vec![7u8; len]).expect("spool");
        let (tx, rx) = watch::channel(FillState::Streaming { size: Some(len as u64), written: len as u64 });
        let file = Arc::new(File::open(&path).expect("open"));
        let fill = Fill { digest: Digest::of(b""), state: rx, file, clients: Arc::default() };
        (Arc::new(fill), tx, dir)
    }

    async fn receive_at_least(rx: &mut mpsc::Receiver<io::Result<Bytes>>, n: usize) -> usize {
        let mut got = 0;
        while got < n {
            match rx.recv().await {
                Some(Ok(b)) => got += b.len(),
                other => panic!("expected data, got {other:?}"),
            }
        }
        got
    }

    #[tokio::test(start_paused = true)]
    async fn the_commit_waits_for_streaming_clients_but_not_past_its_bound() {
        let clients = Arc::new(Clients::default());
        let (a, b) = (Streaming::new(&clients), Streaming::new(&clients));
        let start = tokio::time::Instant::now();
        let wait = tokio::spawn({
            let clients = clients.clone();
            async move { clients.gone(COMMIT_WAIT).await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "one client is still streaming");
        drop(b);
        wait.await.expect("wait");
        assert!(start.elapsed() < COMMIT_WAIT, "the last client leaving ends the wait");

        // A client that never finishes holds the commit back only so long.
        let _stuck = Streaming::new(&clients);
        let start = tokio::time::Instant::now();
        clients.gone(COMMIT_WAIT).await;
        assert!(start.elapsed() >= COMMIT_WAIT);
    }

    #[tokio::test]
    async fn readers_never_get_the_last_byte_before_verification() {
        let (fill, state, _dir) = fill(1000);
        let (tx, mut rx) = mpsc::channel(4);
        fill.stream(tx, None, |_| {});
        let got = receive_at_least(&mut rx, 999).await;
        state.send_replace(FillState::Failed(CacheError::Internal("digest mismatch".into())));
        assert!(matches!(rx.recv().await, Some(Err(_))), "the transfer is cut");
        assert_eq!(got, 999, "everything but the unverified last byte");
    }

    #[tokio::test]
    async fn readers_get_the_last_byte_once_verified() {
        let (fill, state, _dir) = fill(1000);
        let (tx, mut rx) = mpsc::channel(4);
        fill.stream(tx, None, |_| {});
        let mut got = receive_at_least(&mut rx, 999).await;
        state.send_replace(FillState::Done { size: 1000 });
        while let Some(chunk) = rx.recv().await {
            got += chunk.expect("data").len();
        }
        assert_eq!(got, 1000);
    }
}
