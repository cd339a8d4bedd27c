//! The HTTPS accept loop: TLS handshakes with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util, limits on concurrent connections and request heads, and graceful shutdown
//! that lets in-flight requests finish within a deadline.
//!
//! axum's own `serve` cannot terminate TLS nor bound the request head, which is why the
//! loop is written out here; everything per-request lives in the router's tower layers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::tls::ReloadableTls;

/// Connection-level limits of the HTTPS listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A client must finish the TLS handshake within this time.
    pub tls_handshake_timeout: Duration,
    /// A client must send its whole request head within this time (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
    /// Most connections served at once.
    pub max_connections: usize,
    /// After shutdown starts, how long in-flight requests may run.
    pub shutdown_grace: Duration,
}

/// Serves `router` over TLS on `listener` until `shutdown` is cancelled, then stops
/// accepting and waits up to `limits.shutdown_grace` for open connections to finish
/// their requests.
pub async fn serve_https(
    listener: TcpListener,
    tls: ReloadableTls,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // take a permit before accepting: over the limit, clients wait in the backlog
        // instead of costing us a task and a TLS handshake each
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let router = router.clone();
        let watcher = graceful.watcher();
        let closing = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls_stream =
                match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        metrics::counter!("portcullis_tls_handshake_failures_total").increment(1);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        metrics::counter!("portcullis_tls_handshake_failures_total").increment(1);
                        return;
                    }
                };
            if closing.is_cancelled() {
                return;
            }
            serve_connection(tls_stream, peer, router, limits, watcher).await;
        });
    }
    drop(listener);
    tracing::info!(
        grace = %humantime::format_duration(limits.shutdown_grace),
        "HTTPS listener closed; waiting for in-flight requests"
    );
    match tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => tracing::warn!("shutdown grace elapsed; dropping remaining connections"),
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // the socket peer rides along as `ConnectInfo`, as with axum's own server
    let service = TowerToHyperService::new(tower::service_fn(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let mut router = router.clone();
            async move {
                use tower::Service;
                router.call(req.map(axum::body::Body::new)).await
            }
        },
    ));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection closed with an error");
    }
}
