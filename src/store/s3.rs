//! The shared store: blob bytes and repository links in an S3-compatible bucket, in CNCF
//! distribution's layout under `<prefix>/docker/registry/v2/`, so that several replicas
//! share one cache (and a stock distribution with its S3 driver serves what they cached).
//!
//! Each replica keeps a bounded local tier of blobs in its data dir (served with
//! `sendfile` like the filesystem backend), a local copy of the link files, and its sled
//! index, all derived from the bucket. A blob object is written only after its digest is
//! verified, with one PUT or a multipart upload: S3 makes neither visible under its key
//! before it is complete. Downloads are claimed with a lease object created with
//! `If-None-Match: *`, so one replica fetches a blob from the upstream while the others
//! wait for it to appear in the bucket.

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, WriteMultipart,
};

use crate::config::StorageConfig;
use crate::oci::{Algorithm, Digest};

use super::backend::{BlobBackend, BlobRead, Listed, Spool};
use super::now_ms;
use super::tree::{LinkMirror, Tree};

/// Blobs up to this size go up in one PUT; larger ones in parts of this size.
const PART: usize = 16 * 1024 * 1024;
/// Parts of one blob uploaded at a time.
const PART_CONCURRENCY: usize = 4;

/// An error of the bucket: a transient condition of a service wharf depends on, not a
/// fault of wharf's own (see [`super::StoreError::is_unavailable`]).
#[derive(Debug)]
pub struct Unavailable(String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the shared object store failed: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

fn unavailable(kind: io::ErrorKind, what: String) -> io::Error {
    io::Error::new(kind, Unavailable(what))
}

fn to_io(e: object_store::Error) -> io::Error {
    let kind = match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    unavailable(kind, e.to_string())
}

/// An error for a request whose task ended without an answer.
trait Lost {
    fn lost() -> Self;
}

impl Lost for io::Error {
    fn lost() -> Self {
        unavailable(io::ErrorKind::Other, "the request to the store ended without an answer".into())
    }
}

impl Lost for object_store::Error {
    fn lost() -> Self {
        object_store::Error::Generic { store: "wharf", source: Box::new(io::Error::lost()) }
    }
}

/// The bucket and how wharf uses it.
pub struct Bucket {
    s3: Arc<AmazonS3>,
    /// The client of blob bodies streamed to clients, used from the server's runtime
    /// (its pooled connections live there).
    streams: Arc<AmazonS3>,
    /// Signs presigned URLs: names the endpoint clients reach (`redirect_endpoint`).
    signer: Arc<AmazonS3>,
    /// `<prefix>/docker/registry/v2`, without slashes at either end.
    v2: String,
    /// `<prefix>/_wharf`: leases; distribution ignores it.
    own: String,
    /// The store's own runtime: callers are blocking threads, CLI commands and async tasks
    /// of the server's runtime alike, and none of them may drive the requests themselves.
    rt: tokio::runtime::Handle,
    _rt: OwnRuntime,
    redirect_ttl: Option<Duration>,
    lease_ttl: Duration,
    /// Names this replica in the leases it holds.
    replica: String,
}

fn join(prefix: &str, rest: &str) -> String {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        rest.to_owned()
    } else {
        format!("{p}/{rest}")
    }
}

impl Bucket {
    pub fn open(cfg: &StorageConfig) -> io::Result<Bucket> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let mut opts = ClientOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(Duration::from_secs(10))
            .with_allow_http(cfg.insecure)
            .with_allow_invalid_certificates(cfg.insecure);
        if let Some(ca) = &cfg.ca_file {
            let pem = fs::read(ca).map_err(|e| invalid(format!("storage.ca_file {}: {e}", ca.display())))?;
            for c in object_store::Certificate::from_pem_bundle(&pem).map_err(to_io)? {
                opts = opts.with_root_certificate(c);
            }
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(opts)
            // A client waits for these: a store that is down is answered 503 in seconds.
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(3),
                ..Default::default()
            });
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e.as_str().trim_end_matches('/'));
        }
        if let Some(k) = &cfg.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = cfg.resolved_secret().map_err(|e| invalid(e.to_string()))? {
            b = b.with_secret_access_key(s.0);
        }
        let s3 = Arc::new(b.clone().build().map_err(to_io)?);
        // Signing makes no request: a client of its own only names another endpoint.
        let signer = match &cfg.redirect_endpoint {
            Some(e) => {
                Arc::new(b.clone().with_endpoint(e.as_str().trim_end_matches('/')).build().map_err(to_io)?)
            }
            None => s3.clone(),
        };
        let streams = Arc::new(b.build().map_err(to_io)?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wharf-s3")
            .enable_all()
            .build()?;
        Ok(Bucket {
            s3,
            streams,
            signer,
            v2: join(&cfg.prefix, "docker/registry/v2"),
            own: join(&cfg.prefix, "_wharf"),
            rt: rt.handle().clone(),
            _rt: OwnRuntime(Some(rt)),
            redirect_ttl: cfg.redirect.then_some(cfg.redirect_ttl),
            lease_ttl: cfg.lease_ttl,
            replica: format!("{}-{}-{}", hostname(), std::process::id(), now_ms()),
        })
    }

    fn spawn<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.rt.spawn(f)
    }

    /// Runs `f` on the store's runtime and waits for it, from any thread.
    fn run<T: Send + 'static, E: Lost + Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, E>> + Send + 'static,
    ) -> Result<T, E> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(f.await);
        });
        // A request that panicked drops its sender: an error, not a panic here.
        let wait = move || rx.recv().unwrap_or_else(|_| Err(E::lost()));
        // Called from a server worker (a cache lookup), the other tasks move elsewhere
        // while this one waits for the store.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }

    fn blob_key(&self, d: &Digest) -> Key {
        Key::from(format!("{}/blobs/{}/{}/{}/data", self.v2, d.algorithm().as_str(), &d.hex()[..2], d.hex()))
    }

    fn lease_key(&self, d: &Digest) -> Key {
        Key::from(format!("{}/leases/{}-{}", self.own, d.algorithm().as_str(), d.hex()))
    }

    fn head(&self, key: Key) -> io::Result<Option<object_store::ObjectMeta>> {
        let s3 = self.s3.clone();
        match self.run(async move { s3.head(&key).await }) {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    fn get(&self, key: Key) -> io::Result<Option<Bytes>> {
        let s3 = self.s3.clone();
        match self.run(async move { s3.get(&key).await?.bytes().await }) {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    fn put(&self, key: Key, bytes: Bytes) -> io::Result<()> {
        let s3 = self.s3.clone();
        self.run(async move { s3.put(&key, PutPayload::from(bytes)).await }).map(|_| ()).map_err(to_io)
    }

    fn delete(&self, key: Key) -> io::Result<()> {
        let s3 = self.s3.clone();
        match self.run(async move { s3.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(to_io(e)),
        }
    }

    /// Every object under `prefix` (a key prefix ending in `/`).
    fn list(&self, prefix: String) -> io::Result<Vec<object_store::ObjectMeta>> {
        let s3 = self.s3.clone();
        self.run(async move { s3.list(Some(&Key::from(prefix))).try_collect::<Vec<_>>().await })
            .map_err(to_io)
    }

    /// Uploads a verified file as blob `d`: one PUT, or parts when it is large. Only a
    /// complete upload becomes visible under the key.
    fn upload(&self, path: &Path, d: &Digest) -> io::Result<()> {
        let key = self.blob_key(d);
        let mut file = File::open(path)?;
        let size = file.metadata()?.len();
        if size as usize <= PART {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf)?;
            return self.put(key, Bytes::from(buf));
        }
        let s3 = self.s3.clone();
        self.run(async move {
            let upload = s3.put_multipart(&key).await.map_err(to_io)?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            loop {
                w.wait_for_capacity(PART_CONCURRENCY).await.map_err(to_io)?;
                let (f, buf) = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; PART];
                    let mut n = 0;
                    while n < PART {
                        match file.read(&mut buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) => return (file, Err(e)),
                        }
                    }
                    buf.truncate(n);
                    (file, Ok(buf))
                })
                .await
                .map_err(io::Error::other)?;
                file = f;
                let buf = match buf {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(e);
                    }
                };
                if buf.is_empty() {
                    break;
                }
                w.put(Bytes::from(buf));
            }
            w.finish().await.map(|_| ()).map_err(to_io)
        })
    }

    /// Streams blob `d` (or the `(first, len)` part of it) from the bucket.
    fn stream(&self, d: &Digest, size: u64, range: Option<(u64, u64)>) -> BlobRead {
        let (key, s3) = (self.blob_key(d), self.streams.clone());
        let range = range.filter(|(first, len)| first.saturating_add(*len) <= size && *len > 0);
        let opts = GetOptions {
            range: range.map(|(first, len)| GetRange::Bounded(first..first + len)),
            ..Default::default()
        };
        // Sent when first polled, by the runtime that serves the client: the connection
        // then lives there too, and each chunk does not cross between runtimes.
        let body = futures_util::stream::once(async move { s3.get_opts(&key, opts).await })
            .map(|got| match got {
                Ok(g) => g.into_stream().map(|r| r.map_err(to_io)).left_stream(),
                Err(e) => futures_util::stream::once(std::future::ready(Err(to_io(e)))).right_stream(),
            })
            .flatten();
        BlobRead::Stream { body: Box::pin(body), size: range.map_or(size, |(_, len)| len) }
    }

    /// Whether blob GETs are redirected to the bucket.
    pub fn redirects(&self) -> bool {
        self.redirect_ttl.is_some()
    }

    /// A presigned GET of blob `d`, when redirects are on.
    pub fn presigned(&self, d: &Digest) -> io::Result<Option<String>> {
        let Some(ttl) = self.redirect_ttl else { return Ok(None) };
        let (s3, key) = (self.signer.clone(), self.blob_key(d));
        let url =
            self.run(async move { s3.signed_url(http::Method::GET, &key, ttl).await }).map_err(to_io)?;
        Ok(Some(url.to_string()))
    }

    /// Claims the download of `d` for this replica; `None` when another replica holds a
    /// live claim. A claim not renewed for `lease_ttl` (its holder died) is taken over.
    pub fn claim(self: &Arc<Self>, d: &Digest) -> io::Result<Option<Lease>> {
        self.claim_key(self.lease_key(d))
    }

    /// The lease of one job all replicas share (`name`: `gc`), as [`Bucket::claim`].
    pub fn claim_job(self: &Arc<Self>, name: &str) -> io::Result<Option<Lease>> {
        self.claim_key(Key::from(format!("{}/leases/{name}", self.own)))
    }

    fn claim_key(self: &Arc<Self>, key: Key) -> io::Result<Option<Lease>> {
        for _ in 0..2 {
            let (s3, k) = (self.s3.clone(), key.clone());
            let body = PutPayload::from(self.replica.clone());
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            let failed = match self.run(async move { s3.put_opts(&k, body, opts).await }) {
                Ok(_) => return Ok(Some(Lease::start(self.clone(), key))),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    None
                }
                Err(e) => Some(e),
            };
            // Who holds it: a create retried after a lost answer says "exists" when the
            // first try had in fact made it, and a failed one may have made it too; the
            // holder's name is in the object.
            match self.get(key.clone())? {
                Some(holder) if holder.as_ref() == self.replica.as_bytes() => {
                    return Ok(Some(Lease::start(self.clone(), key)))
                }
                Some(_) => {}
                None => match failed {
                    Some(e) => return Err(to_io(e)),
                    // Released between our two requests: try again.
                    None => continue,
                },
            }
            match self.head(key.clone())? {
                Some(m)
                    if (m.last_modified.timestamp_millis().max(0) as u64)
                        .saturating_add(self.lease_ttl.as_millis() as u64)
                        > now_ms() =>
                {
                    return Ok(None)
                }
                Some(_) => {
                    tracing::warn!(lease = %key, "a replica's download claim lapsed; taking it over");
                    self.delete(key.clone())?;
                }
                // Released between our two requests: try again.
                None => {}
            }
        }
        Ok(None)
    }
}

/// Owns the store's runtime. Dropped from async code too, where waiting for the runtime's
/// threads is refused: it is shut down in the background.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Bucket {
    fn access_prefix(&self) -> String {
        format!("{}/access/", self.own)
    }

    /// Writes one batch of this replica's last-access times (digest → unix ms) as an
    /// object of its own: replicas never write the same key.
    pub fn put_accesses(&self, times: &HashMap<Digest, u64>) -> io::Result<()> {
        let map: serde_json::Map<String, serde_json::Value> =
            times.iter().map(|(d, t)| (d.to_string(), serde_json::Value::from(*t))).collect();
        let key = format!("{}{}-{}.json", self.access_prefix(), self.replica, now_ms());
        let body = serde_json::to_vec(&map).map_err(io::Error::other)?;
        self.put(Key::from(key), Bytes::from(body))
    }

    /// Every replica's last-access times: the batches written since, merged with the
    /// last merge, which is written back (`merged.json`) before the batches it took in
    /// are deleted. Run by the replica holding the `gc` lease. Digests `keep` refuses
    /// (blobs gone from the bucket) are dropped, so the merge does not grow with every
    /// blob ever cached.
    pub fn collect_accesses(&self, keep: impl Fn(&Digest) -> bool) -> io::Result<HashMap<Digest, u64>> {
        let prefix = self.access_prefix();
        let merged_key = format!("{prefix}merged.json");
        let mut times: HashMap<Digest, u64> = HashMap::new();
        let mut merge = |bytes: &[u8]| {
            if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(bytes) {
                for (d, t) in m {
                    if let (Some(d), Some(t)) = (Digest::parse(&d), t.as_u64()) {
                        let e = times.entry(d).or_insert(0);
                        *e = (*e).max(t);
                    }
                }
            }
        };
        if let Some(b) = self.get(Key::from(merged_key.clone()))? {
            merge(&b);
        }
        let batches: Vec<Key> =
            self.list(prefix)?.into_iter().map(|m| m.location).filter(|k| k.as_ref() != merged_key).collect();
        for k in &batches {
            if let Some(b) = self.get(k.clone())? {
                merge(&b);
            }
        }
        let before = times.len();
        times.retain(|d, _| keep(d));
        if !batches.is_empty() || times.len() < before {
            let map: serde_json::Map<String, serde_json::Value> =
                times.iter().map(|(d, t)| (d.to_string(), serde_json::Value::from(*t))).collect();
            self.put(
                Key::from(merged_key),
                Bytes::from(serde_json::to_vec(&map).map_err(io::Error::other)?),
            )?;
            for k in batches {
                self.delete(k)?;
            }
        }
        Ok(times)
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "wharf".into())
}

/// A replica's claim on one download, renewed while it is held and deleted when dropped.
pub struct Lease {
    bucket: Arc<Bucket>,
    key: Key,
    renew: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn start(bucket: Arc<Bucket>, key: Key) -> Lease {
        let (s3, k, body, every) =
            (bucket.s3.clone(), key.clone(), bucket.replica.clone(), bucket.lease_ttl / 3);
        let renew = bucket.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = s3.put(&k, PutPayload::from(body.clone())).await {
                    tracing::warn!(error = %e, lease = %k, "renewing a download claim failed");
                }
            }
        });
        Lease { bucket, key, renew }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (s3, key) = (self.bucket.s3.clone(), self.key.clone());
        self.bucket.spawn(async move {
            if let Err(e) = s3.delete(&key).await {
                tracing::warn!(error = %e, lease = %key, "releasing a download claim failed; it lapses");
            }
        });
    }
}

impl LinkMirror for Bucket {
    fn put_link(&self, rel: &str, d: &Digest) -> io::Result<()> {
        self.put(Key::from(format!("{}/{rel}", self.v2)), Bytes::from(d.to_string()))
    }

    fn link(&self, rel: &str) -> io::Result<Option<(Digest, u64)>> {
        let key = Key::from(format!("{}/{rel}", self.v2));
        let Some(meta) = self.head(key.clone())? else { return Ok(None) };
        let Some(bytes) = self.get(key)? else { return Ok(None) };
        let d = std::str::from_utf8(&bytes).ok().and_then(|s| Digest::parse(s.trim()));
        Ok(d.map(|d| (d, meta.last_modified.timestamp_millis().max(0) as u64)))
    }

    fn delete_link(&self, rel: &str) -> io::Result<()> {
        self.delete(Key::from(format!("{}/{rel}", self.v2)))
    }

    fn list_links(&self, rel_prefix: &str) -> io::Result<Vec<(String, u64)>> {
        let root = format!("{}/", self.v2);
        Ok(self
            .list(format!("{root}{rel_prefix}"))?
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&root)?.to_owned();
                key.ends_with("/link").then(|| (key, m.last_modified.timestamp_millis().max(0) as u64))
            })
            .collect())
    }
}

/// Blobs on this replica's disk, least recently used dropped first past `max` (the
/// bucket keeps them).
struct LocalTier {
    tree: Arc<Tree>,
    max: u64,
    used: Mutex<(Used, u64)>,
}

/// The local tier's blobs: digest → (size, last used in unix ms).
type Used = HashMap<Digest, (u64, u64)>;

impl LocalTier {
    /// Drops local copies, least recently used first, until `extra` more bytes fit.
    fn trim(&self, extra: u64) -> io::Result<()> {
        let victims: Vec<Digest> = {
            let mut g = lock(&self.used);
            let (used, bytes) = &mut *g;
            if *bytes + extra <= self.max {
                return Ok(());
            }
            let mut by_age: Vec<(u64, Digest, u64)> =
                used.iter().map(|(d, (size, at))| (*at, d.clone(), *size)).collect();
            by_age.sort();
            let target = (self.max / 10 * 9).saturating_sub(extra);
            let mut out = Vec::new();
            for (_, d, size) in by_age {
                if *bytes <= target {
                    break;
                }
                *bytes -= size;
                used.remove(&d);
                out.push(d);
            }
            out
        };
        for d in victims {
            // Readers holding it open keep their bytes.
            self.tree.delete(&d)?;
        }
        Ok(())
    }

    /// Moves a verified spool file into the tier.
    fn admit(&self, spool: &Path, d: &Digest, size: u64) -> io::Result<()> {
        self.trim(size)?;
        self.tree.put_spool(spool, d)?;
        self.keep(d, size);
        Ok(())
    }

    fn keep(&self, d: &Digest, size: u64) {
        let mut g = lock(&self.used);
        if g.0.insert(d.clone(), (size, now_ms())).is_none() {
            g.1 += size;
        }
    }

    fn touch(&self, d: &Digest) {
        if let Some(e) = lock(&self.used).0.get_mut(d) {
            e.1 = now_ms();
        }
    }

    fn forget(&self, d: &Digest) {
        let mut g = lock(&self.used);
        if let Some((size, _)) = g.0.remove(d) {
            g.1 -= size;
        }
    }
}

/// A whole blob streamed from the bucket, copied into the local tier on the way: once
/// the last byte has passed and the digest matches, the copy is admitted, so the next
/// read is local. A client that goes away early leaves no copy.
struct Promote {
    tier: Arc<LocalTier>,
    digest: Digest,
    size: u64,
    /// The copy, its hash and length; `None` once given up.
    copy: Option<(Spool, crate::oci::Hasher, u64)>,
}

impl Promote {
    fn chunk(&mut self, c: &[u8]) {
        use std::io::Write;
        let Some((spool, h, n)) = &mut self.copy else { return };
        h.update(c);
        *n += c.len() as u64;
        if spool.file.write_all(c).is_err() {
            self.give_up();
        }
    }

    fn end(&mut self) {
        let Some((spool, h, n)) = self.copy.take() else { return };
        if n != self.size || h.finish() != self.digest {
            let _ = fs::remove_file(&spool.path);
            return;
        }
        if let Err(e) = self.tier.admit(&spool.path, &self.digest, n) {
            tracing::warn!(digest = %self.digest, error = %e, "keeping a blob in the local tier failed");
            let _ = fs::remove_file(&spool.path);
        }
    }

    fn give_up(&mut self) {
        if let Some((spool, _, _)) = self.copy.take() {
            let _ = fs::remove_file(&spool.path);
        }
    }
}

/// A bucket body that feeds a [`Promote`] as it is read.
struct Teed {
    inner: std::pin::Pin<Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send>>,
    promote: Promote,
    done: bool,
}

impl futures_util::Stream for Teed {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let item = match self.inner.poll_next_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(i) => i,
        };
        match &item {
            // Complete at its length: a server that announced it stops reading there.
            Some(Ok(c)) => {
                self.promote.chunk(c);
                if self.promote.copy.as_ref().is_some_and(|(_, _, n)| *n >= self.promote.size) {
                    self.promote.end();
                }
            }
            Some(Err(_)) => self.promote.give_up(),
            None => {
                self.done = true;
                self.promote.end();
            }
        }
        Poll::Ready(item)
    }
}

impl Drop for Promote {
    fn drop(&mut self) {
        self.give_up();
    }
}

/// The s3 backend: the bucket holds every blob; the local tier some of them.
pub struct Tiered {
    bucket: Arc<Bucket>,
    local: Arc<LocalTier>,
    /// Blobs known to be in the bucket, with their sizes: a hit asks the bucket nothing.
    known: Mutex<HashMap<Digest, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tiered {
    pub fn new(bucket: Arc<Bucket>, tree: Arc<Tree>, local_max: u64) -> io::Result<Tiered> {
        let (mut used, mut bytes) = (HashMap::new(), 0);
        tree.list(&mut |l: Listed| {
            bytes += l.size;
            used.insert(l.digest, (l.size, l.stored_ms));
        })?;
        let local = Arc::new(LocalTier { tree, max: local_max, used: Mutex::new((used, bytes)) });
        local.trim(0)?;
        Ok(Tiered { bucket, local, known: Mutex::new(HashMap::new()) })
    }

    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }

    /// Size of `d` in the bucket (asked only when not known).
    fn remote_size(&self, d: &Digest) -> io::Result<Option<u64>> {
        if let Some(n) = lock(&self.known).get(d) {
            return Ok(Some(*n));
        }
        let size = self.bucket.head(self.bucket.blob_key(d))?.map(|m| m.size);
        if let Some(n) = size {
            lock(&self.known).insert(d.clone(), n);
        }
        Ok(size)
    }

    /// Whether blob `d` is in the bucket, asking it (a download of another replica may
    /// have just put it there).
    pub fn in_bucket(&self, d: &Digest) -> io::Result<Option<u64>> {
        self.forget_known(d);
        self.remote_size(d)
    }

    /// Asks the bucket about `d` next time (it was found gone).
    pub fn forget_known(&self, d: &Digest) {
        lock(&self.known).remove(d);
    }

    /// Blob `d` as a local file: the local tier's, or downloaded from the bucket into a
    /// spool (verified, then kept in the tier when it fits). For readers that need a file
    /// (an export).
    pub fn open_file(&self, d: &Digest) -> io::Result<Option<(File, u64)>> {
        if let Some(BlobRead::File { file, size }) = self.local.tree.open(d, None)? {
            self.local.touch(d);
            return Ok(Some((file, size)));
        }
        let Some(size) = self.remote_size(d)? else { return Ok(None) };
        let spool = self.local.tree.spool()?;
        let (s3, key, digest) = (self.bucket.s3.clone(), self.bucket.blob_key(d), d.clone());
        let file = spool.file.try_clone()?;
        let got = self.bucket.run(async move {
            use std::io::Write;
            let mut body = s3.get(&key).await.map_err(to_io)?.into_stream();
            let (mut file, mut h, mut n) = (file, digest.hasher(), 0u64);
            while let Some(c) = body.next().await {
                let c = c.map_err(to_io)?;
                h.update(&c);
                n += c.len() as u64;
                file = tokio::task::spawn_blocking(move || file.write_all(&c).map(|_| file))
                    .await
                    .map_err(io::Error::other)??;
            }
            Ok::<_, io::Error>((h.finish(), n))
        });
        let (got, n) = match got {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&spool.path);
                return Err(e);
            }
        };
        if got != *d || n != size {
            let _ = fs::remove_file(&spool.path);
            return Err(unavailable(
                io::ErrorKind::InvalidData,
                format!("blob {d} in the bucket does not match its digest"),
            ));
        }
        let file = File::open(&spool.path)?;
        if self.local.max > 0 && n <= self.local.max / 4 {
            self.local.admit(&spool.path, d, n)?;
        } else {
            // Open, then gone from the directory: the reader keeps the bytes.
            fs::remove_file(&spool.path)?;
        }
        Ok(Some((file, n)))
    }

    /// `body` (all of blob `d`), copied into the local tier as it passes when it fits.
    fn promoting(&self, d: &Digest, size: u64, body: BlobRead) -> BlobRead {
        let BlobRead::Stream { body, size: len } = body else { return body };
        if self.local.max == 0 || size > self.local.max / 4 {
            return BlobRead::Stream { body, size: len };
        }
        let Ok(spool) = self.local.tree.spool() else { return BlobRead::Stream { body, size: len } };
        let copy = Some((spool, d.hasher(), 0));
        let p = Promote { tier: self.local.clone(), digest: d.clone(), size, copy };
        let body = Teed { inner: body, promote: p, done: false };
        BlobRead::Stream { body: Box::pin(body), size: len }
    }
}

impl BlobBackend for Tiered {
    fn stat(&self, d: &Digest) -> io::Result<Option<u64>> {
        if let Some(n) = self.local.tree.stat(d)? {
            return Ok(Some(n));
        }
        self.remote_size(d)
    }

    fn open(&self, d: &Digest, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        if let Some(r) = self.local.tree.open(d, range)? {
            self.local.touch(d);
            return Ok(Some(r));
        }
        let Some(size) = self.remote_size(d)? else { return Ok(None) };
        let r = self.bucket.stream(d, size, range);
        Ok(Some(if range.is_none() { self.promoting(d, size, r) } else { r }))
    }

    fn read(&self, d: &Digest) -> io::Result<Option<Vec<u8>>> {
        if let Some(b) = self.local.tree.read(d)? {
            self.local.touch(d);
            return Ok(Some(b));
        }
        let Some(b) = self.bucket.get(self.bucket.blob_key(d))? else { return Ok(None) };
        // Manifests and configs are read whole: kept locally when they are what they claim.
        if self.local.max > 0 && d.matches(&b) {
            let kept = self.local.trim(b.len() as u64).and_then(|_| self.local.tree.put_bytes(d, &b));
            match kept {
                Ok(()) => self.local.keep(d, b.len() as u64),
                Err(e) => tracing::warn!(digest = %d, error = %e, "keeping a blob in the local tier failed"),
            }
        }
        Ok(Some(b.to_vec()))
    }

    fn spool(&self) -> io::Result<Spool> {
        self.local.tree.spool()
    }

    fn put_spool(&self, spool: &Path, d: &Digest) -> io::Result<()> {
        let size = fs::metadata(spool)?.len();
        if self.in_bucket(d)? != Some(size) {
            self.bucket.upload(spool, d)?;
            lock(&self.known).insert(d.clone(), size);
        }
        if self.local.max == 0 {
            return fs::remove_file(spool);
        }
        self.local.admit(spool, d, size)
    }

    fn put_bytes(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        if self.in_bucket(d)? != Some(bytes.len() as u64) {
            self.bucket.put(self.bucket.blob_key(d), Bytes::copy_from_slice(bytes))?;
            lock(&self.known).insert(d.clone(), bytes.len() as u64);
        }
        if self.local.max > 0 {
            self.local.trim(bytes.len() as u64)?;
            self.local.tree.put_bytes(d, bytes)?;
            self.local.keep(d, bytes.len() as u64);
        }
        Ok(())
    }

    fn delete(&self, d: &Digest) -> io::Result<Option<u64>> {
        let remote = self.in_bucket(d)?;
        self.bucket.delete(self.bucket.blob_key(d))?;
        lock(&self.known).remove(d);
        let local = self.local.tree.delete(d)?;
        self.local.forget(d);
        Ok(remote.or(local))
    }

    fn list(&self, each: &mut dyn FnMut(Listed)) -> io::Result<()> {
        let mut known = HashMap::new();
        for a in Algorithm::ALL {
            for m in self.bucket.list(format!("{}/blobs/{}/", self.bucket.v2, a.as_str()))? {
                let key = m.location.as_ref();
                let Some(hex) = key.strip_suffix("/data").and_then(|k| k.rsplit('/').next()) else {
                    continue;
                };
                let Some(d) = Digest::parse(&format!("{}:{hex}", a.as_str())) else { continue };
                known.insert(d.clone(), m.size);
                each(Listed {
                    digest: d,
                    size: m.size,
                    stored_ms: m.last_modified.timestamp_millis().max(0) as u64,
                });
            }
        }
        *lock(&self.known) = known;
        Ok(())
    }

    fn sweep_spools(&self, older_than_ms: u64, dry_run: bool) -> io::Result<(u64, u64)> {
        self.local.tree.sweep_spools(older_than_ms, dry_run)
    }

    fn free_space(&self) -> io::Result<Option<u64>> {
        // The bucket is bounded by `cache.max_size` alone; the local tier by its own cap.
        Ok(None)
    }
}
