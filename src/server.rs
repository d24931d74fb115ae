//! The accept loop: HTTP/1.1 and HTTP/2 (h2c) on one port, graceful shutdown that stops
//! accepting, lets in-flight responses finish within a bound, then flushes the index.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::{api, AppState};

/// Serves `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
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
        let st = state.clone();
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(api::handle(st, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    flusher.abort();
    let grace = state.config.shutdown_grace;
    tracing::info!(?grace, "shutting down: waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; dropping the remaining connections"),
    }
    if let Err(e) = state.store().flush() {
        tracing::error!(error = %e, "index flush failed");
    }
    Ok(())
}

/// Writes batched last-access times to the index now and then.
async fn flush_access_periodically(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let store = state.store().clone();
        match tokio::task::spawn_blocking(move || store.flush_access()).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "writing last-access times failed"),
            Err(e) => tracing::warn!(error = %e, "last-access flush task failed"),
            Ok(Ok(_)) => {}
        }
    }
}
