//! The accept loop: HTTP/1.1 and HTTP/2 (h2c) on one port, graceful shutdown that stops
//! accepting, lets in-flight responses finish within a bound, then flushes the index.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::{api, zerocopy, AppState};

pub mod tls;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the admin listener serves at once.
const ADMIN_CONNECTIONS: usize = 64;

/// Serves `listener` until `shutdown` resolves: HTTPS when the configuration names a
/// certificate, plain HTTP otherwise.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with_admin(listener, None, state, shutdown).await
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime and nginx-based
/// servers do: the default soft limit (often 1024) is far below what a mirror with
/// thousands of clients needs. Returns the soft limit in force afterwards.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let before = lim.current;
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, soft = ?before, "could not raise the open-file limit");
            return before;
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    tracing::info!(before = ?before, now = ?now, "open-file limit");
    now
}

/// Descriptors kept back from connections for what requests open: stored blobs being
/// read, spool files, upstream connections.
const DESCRIPTOR_RESERVE: u64 = 2048;

/// `server.max_connections`, held under the open-file limit: every connection takes a
/// descriptor, and requests need more (at least [`DESCRIPTOR_RESERVE`], or half the limit
/// when it is small).
fn connection_cap(cfg: &ServerConfig) -> usize {
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    match nofile {
        Some(n) if n.saturating_sub(DESCRIPTOR_RESERVE).max(n / 2) < cfg.max_connections as u64 => {
            let cap = n.saturating_sub(DESCRIPTOR_RESERVE).max(n / 2).max(1) as usize;
            tracing::warn!(
                configured = cfg.max_connections,
                cap,
                nofile = n,
                "server.max_connections held under the open-file limit"
            );
            cap
        }
        _ => cfg.max_connections,
    }
}

/// Connection builders with the configured limits: `auto` for TLS and HTTP/2, `http1`
/// for plain HTTP/1 connections, which hibernate when idle.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
}

impl Builders {
    fn new(cfg: &ServerConfig) -> Builders {
        let mut http1 = http1::Builder::new();
        // No hyper timer on HTTP/1: it costs a timer reset per request; the watchdog
        // bounds the time to a request head instead.
        // The read buffer holds a request head (wharf reads no request bodies): a head
        // that does not fit is answered 431 and the connection closed.
        http1.max_buf_size((cfg.max_header_bytes.0 as usize).max(8192));
        Builders { auto: builder(cfg), http1 }
    }
}

/// The HTTP/1 and HTTP/2 builder with the configured limits: HTTP/1 head size, HTTP/2
/// stream, header-list and keep-alive limits.
fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let header_bytes = cfg.max_header_bytes.0 as usize;
    // As [`Builders::new`] sets up HTTP/1.
    b.http1().max_buf_size(header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2_max_concurrent_streams)
        .max_header_list_size(header_bytes as u32)
        .keep_alive_interval(cfg.http2_keepalive_interval)
        .keep_alive_timeout(cfg.http2_keepalive_timeout)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256));
    b
}

/// Accepts the next connection once a slot is free. Failed accepts (out of descriptors,
/// aborted handshakes) back off exponentially from 5 ms to 1 s instead of spinning.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (tokio::net::TcpStream, std::net::SocketAddr, tokio::sync::OwnedSemaphorePermit) {
    let permit = slots.clone().acquire_owned().await.expect("the connection semaphore is never closed");
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((s, peer)) => return (s, peer, permit),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// [`serve`], plus `/metrics` and `/_wharf/*` on a separate plain-HTTP listener
/// (`admin.listen`).
pub async fn serve_with_admin(
    listener: TcpListener,
    admin: Option<TcpListener>,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let admin = admin.map(|l| tokio::spawn(serve_admin(l, state.clone())));
    let tls = match &state.config.tls {
        Some(cfg) => {
            let certs = tls::Certificates::load(cfg).map_err(std::io::Error::other)?;
            let acceptor = certs.acceptor().map_err(std::io::Error::other)?;
            Some((acceptor, tokio::spawn(certs.watch())))
        }
        None => None,
    };
    // SIGHUP is a reload (systemd's ExecReload, kill -HUP), never the default termination:
    // the certificates re-read themselves on it (above), the rest of what can change on
    // disk (htpasswd) is re-read when it changes.
    let hangup = tokio::spawn(async {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: certificates are reloaded; htpasswd is re-read when it changes");
        }
    });
    let graceful = GracefulShutdown::new();
    let flusher = tokio::spawn(flush_access_periodically(state.clone()));
    let syncer = state.store().is_shared().then(|| tokio::spawn(sync_shared_periodically(state.clone())));
    let limits = state.config.server.clone();
    let builders = Arc::new(Builders::new(&limits));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cap = connection_cap(&limits);
    let slots = Arc::new(Semaphore::new(cap));
    state.metrics.connection_limit.set(cap as i64);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, permit) = tokio::select! {
            c = accept(&listener, &slots) => c,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (state, builders, watcher) = (state.clone(), builders.clone(), graceful.watcher());
        let stop = stop_rx.clone();
        let acceptor = tls.as_ref().map(|(a, _)| a.clone());
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let open = Open::new(&state.metrics.connections);
            let conn = Conn { peer, cert_user: None, limits: &limits, _open: open };
            match acceptor {
                None => {
                    serve_plain(&builders, zerocopy::Socket::new(stream), state, watcher, conn, stop).await
                }
                // Boxed: a plain connection's task stays small while it hibernates.
                Some(acceptor) => {
                    Box::pin(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let cert_user = tls::client_user(s.get_ref().1);
                                let conn = Conn { cert_user, ..conn };
                                serve_connection(&builders.auto, TokioIo::new(s), state, watcher, conn, None)
                                    .await
                            }
                            Ok(Err(e)) => {
                                let rustls_error =
                                    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                                let bad_cert = matches!(
                                    rustls_error,
                                    Some(
                                        rustls::Error::InvalidCertificate(_)
                                            | rustls::Error::NoCertificatesPresented
                                    )
                                );
                                if bad_cert {
                                    state.metrics.auth_failures.with_label_values(&["bad_certificate"]).inc();
                                    tracing::info!(%peer, error = %e, "client certificate refused");
                                } else {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                }
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    })
                    .await
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    flusher.abort();
    if let Some(s) = syncer {
        s.abort();
    }
    hangup.abort();
    if let Some(a) = admin {
        a.abort();
    }
    if let Some((_, watch)) = tls {
        watch.abort();
    }
    let grace = state.config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(?grace, "shutting down: waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep_until(deadline) => tracing::warn!("grace period over; dropping the remaining connections"),
    }
    // Clients get a blob's last byte once it is verified, before it is moved into the
    // store, and a manifest before it is written: let those finish within the same grace.
    while state.cache.writes_in_flight() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("grace period over; abandoning unfinished downloads");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Err(e) = state.analytics.flush().and_then(|_| state.store().close()) {
        tracing::error!(error = %e, "index flush failed; the next start checks the index against the tree");
    }
    Ok(())
}

/// One accepted connection: who is at the other end and what it may hold.
struct Conn<'a> {
    peer: std::net::SocketAddr,
    /// The verified client certificate's user name (mutual TLS).
    cert_user: Option<Arc<str>>,
    limits: &'a ServerConfig,
    _open: Open,
}

/// Counts a connection in `wharf_connections` until dropped.
struct Open(prometheus::IntGauge);

impl Open {
    fn new(g: &prometheus::IntGauge) -> Open {
        g.inc();
        Open(g.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a connection's watchdog reads: requests started, responses in flight, responses
/// that handed the connection a chunk it has not taken yet, chunks taken, bytes written.
#[derive(Default)]
struct Activity {
    requests: AtomicU64,
    in_flight: AtomicUsize,
    awaiting_client: AtomicUsize,
    /// Chunks clients took (a response was asked for its next chunk after handing one out).
    taken: AtomicU64,
    written: AtomicU64,
    /// Reads that returned data: a head is arriving when this moves with no request in
    /// flight and none started.
    reads: AtomicU64,
    /// HTTP/2: its pings write bytes whether or not a client reads, so only `taken`
    /// shows progress there.
    h2: std::sync::atomic::AtomicBool,
}

/// What a connection's watchdog saw.
#[derive(Debug, Clone, Copy)]
enum Closed {
    Idle,
    HeaderTimeout,
    WriteTimeout,
    /// An HTTP/1 connection with nothing in flight and nothing arriving since `.0`: it can
    /// give its buffers back until the client sends again.
    Hibernate(tokio::time::Instant),
}

impl Closed {
    fn count(self, metrics: &crate::metrics::Metrics) {
        let label = match self {
            Closed::Idle => "idle",
            Closed::HeaderTimeout => "header_timeout",
            Closed::WriteTimeout => "write_timeout",
            Closed::Hibernate(_) => return,
        };
        metrics.connections_closed.with_label_values(&[label]).inc();
    }
}

/// How long an HTTP/1 connection stays quiet before it hibernates.
const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

/// Resolves when the connection has had no request and no response in flight for
/// `idle`; when an HTTP/1 request head has been arriving for longer than `head` (slow
/// headers); or when a response has waited `write` for its client to take anything: on
/// HTTP/1 a byte written (a mapped chunk is megabytes), on HTTP/2 a chunk taken. With
/// `hibernate`, also once the connection has been quiet for [`HIBERNATE_AFTER`]. The
/// connection counts as quiet since `quiet_since` until a request arrives (a hibernated
/// connection woken by spurious readiness keeps its idle clock).
async fn watchdog(
    act: &Activity,
    limits: &ServerConfig,
    hibernate: bool,
    quiet_since: tokio::time::Instant,
) -> Closed {
    let (idle, write, head) = (limits.idle_timeout, limits.write_timeout, limits.header_read_timeout);
    let mut tick = (idle.min(write).min(head) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    if hibernate {
        tick = tick.min(HIBERNATE_AFTER);
    }
    let progress = || {
        let taken = act.taken.load(Ordering::Relaxed);
        if act.h2.load(Ordering::Relaxed) {
            (taken, 0)
        } else {
            (taken, act.written.load(Ordering::Relaxed))
        }
    };
    let (mut requests, mut written) = (act.requests.load(Ordering::Relaxed), progress());
    let mut reads = act.reads.load(Ordering::Relaxed);
    let (mut idle_since, mut write_since) = (quiet_since, tokio::time::Instant::now());
    let mut head_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        let now = tokio::time::Instant::now();
        let (r, w) = (act.requests.load(Ordering::Relaxed), progress());
        let rd = act.reads.load(Ordering::Relaxed);
        let busy = act.in_flight.load(Ordering::Relaxed) > 0;
        if r != requests || busy {
            requests = r;
            idle_since = now;
            reads = rd;
            head_since = None;
        } else if rd != reads && !act.h2.load(Ordering::Relaxed) {
            // Bytes came in and no request has: part of a head (HTTP/2 reads pings).
            let since = *head_since.get_or_insert(now);
            if now - since >= head {
                return Closed::HeaderTimeout;
            }
        } else if hibernate && head_since.is_none() && now - idle_since >= HIBERNATE_AFTER {
            return Closed::Hibernate(idle_since);
        }
        if w != written || act.awaiting_client.load(Ordering::Relaxed) == 0 {
            written = w;
            write_since = now;
        }
        if now - idle_since >= idle {
            return Closed::Idle;
        }
        if now - write_since >= write {
            return Closed::WriteTimeout;
        }
    }
}

/// The connection's I/O, counting bytes written for the watchdog.
struct Watched<I> {
    io: I,
    act: Arc<Activity>,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            self.act.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.act.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.act.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that tells the watchdog when it is in flight and when it waits for the
/// client (it handed out a chunk and has not been asked for the next one).
struct Tracked {
    inner: api::Body,
    flight: InFlight,
    handed: bool,
}

impl Tracked {
    fn new(inner: api::Body, flight: InFlight) -> Tracked {
        Tracked { inner, flight, handed: false }
    }
}

/// One request in flight on a connection, until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(act: Arc<Activity>) -> InFlight {
        act.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(act)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let act = &this.flight.0;
        if this.handed {
            this.handed = false;
            act.awaiting_client.fetch_sub(1, Ordering::Relaxed);
            act.taken.fetch_add(1, Ordering::Relaxed);
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r {
            this.handed = true;
            act.awaiting_client.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.handed {
            self.flight.0.awaiting_client.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What the per-connection service returns: boxed, so that an HTTP/1 connection can be
/// polled without shutting its socket down (hyper wants an `Unpin` future for that).
type Answer = Pin<Box<dyn Future<Output = Result<hyper::Response<Tracked>, Infallible>> + Send>>;

/// The service for one connection: each request is marked on the watchdog's [`Activity`]
/// and its response body tracked until dropped.
fn service(
    state: AppState,
    act: Arc<Activity>,
    peer: std::net::SocketAddr,
    cert_user: Option<Arc<str>>,
    zerocopy: Option<Arc<zerocopy::Regions>>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<Tracked>,
    Error = Infallible,
    Future = Answer,
> + Clone
       + Unpin {
    service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| -> Answer {
        if let Some(z) = &zerocopy {
            req.extensions_mut().insert(z.clone());
        }
        if let Some(u) = &cert_user {
            req.extensions_mut().insert(api::ClientCert(u.clone()));
        }
        act.requests.fetch_add(1, Ordering::Relaxed);
        if req.version() == http::Version::HTTP_2 {
            act.h2.store(true, Ordering::Relaxed);
        }
        // Counted out when the body is dropped, whether sent, failed or cancelled (or
        // when the request is dropped before it has a response).
        let flight = InFlight::new(act.clone());
        let st = state.clone();
        Box::pin(async move {
            let resp = api::handle(st, req, peer.ip()).await;
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, flight)))
        })
    })
}

/// HTTP/1.1 or HTTP/2 (by ALPN, or the h2c preface) on one connection, closed by its
/// watchdog when idle or when its client stops reading.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    state: AppState,
    watcher: Watcher,
    conn: Conn<'_>,
    zerocopy: Option<Arc<zerocopy::Regions>>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let act = Arc::new(Activity::default());
    let io = Watched { io, act: act.clone() };
    let peer = conn.peer;
    let svc = service(state.clone(), act.clone(), peer, conn.cert_user.clone(), zerocopy);
    let served = watcher.watch(builder.serve_connection(io, svc));
    tokio::select! {
        res = served => if let Err(e) = res {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        },
        why = watchdog(&act, conn.limits, false, tokio::time::Instant::now()) => {
            tracing::debug!(%peer, reason = ?why, "connection closed");
            why.count(&state.metrics);
        }
    }
}

/// A plain-TCP connection. HTTP/2 with prior knowledge goes to [`serve_connection`]. An
/// HTTP/1 connection hibernates when quiet: hyper's connection state (an 8 KiB read and an
/// 8 KiB header-write buffer that it keeps for the life of a connection) is taken apart,
/// and the bare socket is waited on until the client sends again. Idle keep-alive
/// connections then cost little more than their socket; the first bytes of a new
/// connection are waited for the same way. `watcher` is held, not used, so graceful
/// shutdown counts the connection while it lives.
async fn serve_plain(
    builders: &Builders,
    mut socket: zerocopy::Socket,
    state: AppState,
    watcher: Watcher,
    conn: Conn<'_>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (limits, peer) = (conn.limits, conn.peer);
    let act = Arc::new(Activity::default());
    let regions = socket.regions();
    let svc = service(state.clone(), act.clone(), peer, None, Some(regions.clone()));
    let mut idle_since = tokio::time::Instant::now();
    let mut first = true;
    loop {
        // Waits for the client's next bytes holding no buffer. A new connection peeks,
        // which waits for a byte (readiness can be spurious) and shows HTTP/2's preface.
        let mut head = [0u8; 4];
        let arrived = async {
            if first {
                socket.peek(&mut head).await
            } else {
                socket.readable().await.map(|()| head.len())
            }
        };
        let arrived = tokio::select! {
            r = arrived => r,
            _ = tokio::time::sleep_until(idle_since + limits.idle_timeout) => {
                tracing::debug!(%peer, reason = ?Closed::Idle, "connection closed");
                Closed::Idle.count(&state.metrics);
                return;
            }
            _ = stop.changed() => return,
        };
        match arrived {
            Ok(0) | Err(_) => return,
            // HTTP/2's preface, or too few bytes yet to tell: hyper decides.
            Ok(n) if first && b"PRI ".starts_with(&head[..n]) => {
                let io = TokioIo::new(socket);
                let h2c = serve_connection(&builders.auto, io, state, watcher, conn, Some(regions));
                return Box::pin(h2c).await;
            }
            Ok(_) => first = false,
        }
        // Boxed: the hyper connection's state is allocated while the connection is
        // active and freed while it hibernates.
        let active =
            Box::pin(serve_http1(builders, socket, &svc, &act, &conn, &state.metrics, &mut stop, idle_since));
        match active.await {
            Some((resumed, since)) => {
                socket = resumed;
                idle_since = since;
            }
            None => return,
        }
    }
}

/// Serves HTTP/1 on `socket` until the connection closes (`None`) or hibernates: then the
/// socket comes back, with what the client had already sent put back in front, and the
/// time it went quiet.
// The pieces of one connection's state that outlive its hyper connection, passed apart.
#[allow(clippy::too_many_arguments)]
async fn serve_http1<S>(
    builders: &Builders,
    socket: zerocopy::Socket,
    svc: &S,
    act: &Arc<Activity>,
    conn: &Conn<'_>,
    metrics: &crate::metrics::Metrics,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    quiet_since: tokio::time::Instant,
) -> Option<(zerocopy::Socket, tokio::time::Instant)>
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<Tracked>,
            Error = Infallible,
            Future = Answer,
        > + Clone
        + Unpin,
{
    let (limits, peer) = (conn.limits, conn.peer);
    let io = Watched { io: TokioIo::new(socket), act: act.clone() };
    let mut http = builders.http1.serve_connection(io, svc.clone());
    let watch = watchdog(act, limits, true, quiet_since);
    tokio::pin!(watch);
    // Requests started when hibernation was decided: a request that slipped in between
    // is answered with `Connection: close`, and the connection is not resumed.
    let mut hibernating: Option<(u64, tokio::time::Instant)> = None;
    let mut stopping = false;
    let done = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => break r,
            why = &mut watch, if hibernating.is_none() => match why {
                Closed::Hibernate(since) => {
                    hibernating = Some((act.requests.load(Ordering::Relaxed), since));
                    Pin::new(&mut http).graceful_shutdown();
                }
                why => {
                    tracing::debug!(%peer, reason = ?why, "connection closed");
                    why.count(metrics);
                    return None;
                }
            },
            _ = stop.changed(), if !stopping => {
                stopping = true;
                Pin::new(&mut http).graceful_shutdown();
            }
        }
    };
    if let Err(e) = done {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
        return None;
    }
    let since = match hibernating {
        Some((n, since)) if !stopping && n == act.requests.load(Ordering::Relaxed) => since,
        _ => return None,
    };
    metrics.connections_hibernated.inc();
    let parts = http.into_parts();
    let mut socket = parts.io.io.into_inner();
    if !parts.read_buf.is_empty() {
        socket.unread(parts.read_buf);
    }
    Some((socket, since))
}

/// Background upkeep: batched last-access times and analytics counts go to disk every
/// 10 s; the cache is collected (and evicted down to its cap) every `cache.gc_interval`;
/// analytics older than their retention are dropped once a day.
async fn flush_access_periodically(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let gc_every = state.config.cache.gc_interval;
    let mut next_gc = tokio::time::Instant::now() + gc_every;
    let mut next_retention = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let (store, analytics) = (state.store().clone(), state.analytics.clone());
        let retention =
            (tokio::time::Instant::now() >= next_retention).then_some(state.config.analytics.retention_days);
        let res = tokio::task::spawn_blocking(move || {
            store.flush_access().and_then(|_| analytics.flush())?;
            if let Some(days) = retention {
                let dropped = analytics.apply_retention(days)?;
                if dropped > 0 {
                    tracing::info!(series = dropped, days, "dropped per-day analytics past their retention");
                }
            }
            Ok::<_, crate::store::StoreError>(())
        })
        .await;
        match res {
            Ok(Err(e)) => tracing::warn!(error = %e, "writing last-access times failed"),
            Err(e) => tracing::warn!(error = %e, "last-access flush task failed"),
            Ok(Ok(())) => {}
        }
        if retention.is_some() {
            next_retention = tokio::time::Instant::now() + Duration::from_secs(86_400);
        }
        if tokio::time::Instant::now() >= next_gc {
            next_gc = tokio::time::Instant::now() + gc_every;
            match state.cache.collect(false).await {
                Ok(r) if !r.removed.is_empty() || r.spool_files > 0 => {
                    tracing::info!(
                        blobs = r.removed.len(),
                        bytes_before = r.cache_bytes_before,
                        bytes_after = r.cache_bytes_after,
                        spool_files = r.spool_files,
                        "cache collected"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cache collection failed"),
            }
        }
    }
}

/// With a bucket shared by replicas: what the others stored (tags, links, blobs) is read
/// into this replica's index every `storage.sync_interval`.
async fn sync_shared_periodically(state: AppState) {
    let mut tick = tokio::time::interval(state.config.storage.sync_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let store = state.store().clone();
        match tokio::task::spawn_blocking(move || store.sync()).await {
            Ok(Ok(stats)) => tracing::debug!(?stats, "index synced with the shared bucket"),
            Ok(Err(e)) => tracing::warn!(error = %e, "syncing with the shared bucket failed"),
            Err(e) => tracing::warn!(error = %e, "sync task failed"),
        }
    }
}

/// Accept loop of the admin listener (plain HTTP: metrics, health, stats, history, gc),
/// with the data port's limits and a small connection cap of its own.
async fn serve_admin(listener: TcpListener, state: AppState) {
    let limits = state.config.server.clone();
    let builder = builder(&limits);
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let (stream, peer, permit) = accept(&listener, &slots).await;
        let (state, builder, limits) = (state.clone(), builder.clone(), limits.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let st = state.clone();
                async move { Ok::<_, Infallible>(api::handle_admin(st, req, peer.ip()).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            // An admin client gets the data port's idle bound, without a watchdog: the
            // answers are small.
            let _ = tokio::time::timeout(limits.idle_timeout.max(Duration::from_secs(300)), conn).await;
        });
    }
}
