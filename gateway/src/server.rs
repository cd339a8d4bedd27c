//! The HTTPS accept loop: TLS handshakes with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util, limits on concurrent connections and request heads, an idle timer per
//! connection, and graceful shutdown that lets in-flight requests finish within a deadline.
//!
//! axum's own `serve` cannot terminate TLS nor bound the request head, which is why the
//! loop is written out here; everything per-request lives in the router's tower layers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// A connection with no request in flight for this long is shut down gracefully.
    /// Must be greater than zero.
    pub idle_timeout: Duration,
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
    // every connection task, handshakes included, so shutdown can wait for them
    let connections = TaskTracker::new();
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
        let closing = shutdown.clone();
        connections.spawn(async move {
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
            serve_connection(tls_stream, peer, router, limits, closing).await;
        });
    }
    drop(listener);
    tracing::info!(
        grace = %humantime::format_duration(limits.shutdown_grace),
        "HTTPS listener closed; waiting for in-flight requests"
    );
    connections.close();
    match tokio::time::timeout(limits.shutdown_grace, connections.wait()).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => tracing::warn!("shutdown grace elapsed; dropping remaining connections"),
    }
}

/// Serves one connection until the client leaves, it stays idle for
/// `limits.idle_timeout`, or `closing` is cancelled; the last two end it gracefully (an
/// HTTP/1.1 connection after the response in progress, HTTP/2 by GOAWAY after the
/// streams already opened), so a request racing with the close is not cut off.
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let requests = activity.clone();
    // the socket peer rides along as `ConnectInfo`, as with axum's own server
    let service = TowerToHyperService::new(tower::service_fn(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            // the head has arrived: the connection is busy until the response body is
            // sent or dropped (the guard travels in the future, then in the body)
            let in_flight = InFlight::start(&requests);
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let mut router = router.clone();
            async move {
                use tower::Service;
                let response = router.call(req.map(axum::body::Body::new)).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| TrackedBody {
                    inner: body,
                    in_flight: Some(in_flight),
                }))
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
    tokio::pin!(conn);
    let idle = activity.idle_for(limits.idle_timeout);
    tokio::pin!(idle);
    let mut ending = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            () = closing.cancelled(), if !ending => {
                ending = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut idle, if !ending => {
                ending = true;
                tracing::debug!(%peer, "closing an idle connection");
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection closed with an error");
    }
}

// === impl Activity ===

/// What a connection's idle timer reads: requests in flight and when the last one
/// ended. Two atomics written once per request, so the request path takes no lock and
/// allocates nothing; the timer wakes at most once per `idle_timeout`.
struct Activity {
    opened: Instant,
    /// Requests whose head has arrived and whose response body is not yet sent or dropped.
    in_flight: AtomicUsize,
    /// When a request last ended (or the connection opened), in nanoseconds since `opened`.
    last_end_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_nanos: AtomicU64::new(0),
        }
    }

    /// Completes once no request has been in flight for `timeout`. One sleep at a time,
    /// re-armed for the time still missing, rather than a timer per request.
    async fn idle_for(&self, timeout: Duration) {
        let mut deadline = self.opened + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            // Acquire pairs with the Release in `InFlight::drop`: seeing 0 means seeing
            // the end time the last request stored before it left
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // a request is running: the connection cannot be idle long enough
                // before a whole timeout from now
                deadline = Instant::now() + timeout;
                continue;
            }
            let ended = self.opened
                + Duration::from_nanos(self.last_end_nanos.load(Ordering::Relaxed))
                + timeout;
            if ended <= Instant::now() {
                return;
            }
            deadline = ended;
        }
    }
}

/// One request in flight on a connection, from its head to the end of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = u64::try_from(activity.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // max: with HTTP/2 several requests may end at once, in any order
        activity.last_end_nanos.fetch_max(now, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that holds its request's [`InFlight`] until the last frame is sent,
/// the body fails, or hyper drops it (client gone, HEAD, upgrade).
struct TrackedBody<B> {
    inner: B,
    in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // done: do not wait for hyper to drop the body
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
