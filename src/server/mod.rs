//! The accept loop: HTTP/1.1 and HTTP/2 (h2c) on one port, graceful shutdown that stops
//! accepting, lets in-flight responses finish within a bound, then flushes the index.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::{api, zerocopy, AppState};

pub mod tls;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` resolves: HTTPS when the configuration names a
/// certificate, plain HTTP otherwise.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with_admin(listener, None, state, shutdown).await
}

/// [`serve`], plus `/metrics` on a separate plain-HTTP listener (`metrics.listen`).
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
    let graceful = GracefulShutdown::new();
    let flusher = tokio::spawn(flush_access_periodically(state.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (state, builder, watcher) = (state.clone(), builder.clone(), graceful.watcher());
        let acceptor = tls.as_ref().map(|(a, _)| a.clone());
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let socket = zerocopy::Socket::new(stream);
                    let regions = Some(socket.regions());
                    serve_connection(&builder, TokioIo::new(socket), state, watcher, peer, regions).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            serve_connection(&builder, TokioIo::new(s), state, watcher, peer, None).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    flusher.abort();
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

/// HTTP/1.1 or HTTP/2 (by ALPN, or the h2c preface) on one connection.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    state: AppState,
    watcher: hyper_util::server::graceful::Watcher,
    peer: std::net::SocketAddr,
    zerocopy: Option<Arc<zerocopy::Regions>>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(z) = &zerocopy {
            req.extensions_mut().insert(z.clone());
        }
        let st = state.clone();
        async move { Ok::<_, Infallible>(api::handle(st, req, peer.ip()).await) }
    });
    if let Err(e) = watcher.watch(builder.serve_connection(io, svc)).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
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

/// Accept loop of the admin listener (plain HTTP, metrics and health only).
async fn serve_admin(listener: TcpListener, state: AppState) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (state, builder) = (state.clone(), builder.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = state.clone();
                async move { Ok::<_, Infallible>(api::handle_admin(st, req, peer.ip()).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
