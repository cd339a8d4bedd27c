//! The HTTPS accept loop: TLS handshakes with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util, limits on concurrent connections and request heads, an idle timer per
//! connection, and graceful shutdown that lets in-flight requests finish within a deadline.
//!
//! axum's own `serve` cannot terminate TLS nor bound the request head, which is why the
//! loop is written out here; everything per-request lives in the router's tower layers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::detach::{Detach, Detached, Handoff, Takeover};
use crate::tls::ReloadableTls;
use crate::workers::Workers;

/// Connection-level limits of the HTTPS listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A client must finish the TLS handshake within this time.
    pub tls_handshake_timeout: Duration,
    /// A client must send its whole request head within this time (slowloris), counted
    /// from the connection's start for the first request and from the first byte of
    /// each later one; the wait for that byte is bounded by `idle_timeout` instead.
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
/// their requests. Each connection is served on the next of `workers`, or on the
/// caller's runtime when there are none.
pub async fn serve_https(
    listener: TcpListener,
    tls: ReloadableTls,
    router: Router,
    limits: ConnectionLimits,
    workers: Option<Arc<Workers>>,
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
        let connection = Connection {
            peer,
            _permit: permit,
            acceptor: TlsAcceptor::from(tls.current()),
            router: router.clone(),
            limits,
            closing: shutdown.clone(),
            tracker: connections.clone(),
        };
        match &workers {
            None => {
                connections.spawn(connection.serve(stream));
            }
            // the worker's own reactor must watch the socket, or every read would be a
            // wake-up from this runtime's thread: hand it over as a plain socket
            Some(workers) => match stream.into_std() {
                Ok(stream) => {
                    connections.spawn_on(connection.serve_handed_over(stream), workers.next());
                }
                Err(e) => tracing::warn!(%peer, error = %e, "connection hand-over failed"),
            },
        }
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

/// An accepted connection, before its TLS handshake.
struct Connection {
    peer: SocketAddr,
    /// Held while the connection lives (`max_connections`).
    _permit: OwnedSemaphorePermit,
    acceptor: TlsAcceptor,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    /// Every connection task; a stream taken over from hyper runs on as one of them.
    tracker: TaskTracker,
}

impl Connection {
    /// [`Connection::serve`] for a socket handed over from another runtime: registered
    /// with the reactor of the runtime this runs on first.
    async fn serve_handed_over(self, stream: std::net::TcpStream) {
        match TcpStream::from_std(stream) {
            Ok(stream) => self.serve(stream).await,
            Err(e) => tracing::warn!(peer = %self.peer, error = %e, "connection hand-over failed"),
        }
    }

    /// Completes the TLS handshake within its deadline, then serves the connection.
    async fn serve(self, stream: TcpStream) {
        let Self {
            peer,
            _permit: permit,
            acceptor,
            router,
            limits,
            closing,
            tracker,
        } = self;
        let tls_stream =
            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await
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
        let slot = ConnectionSlot::new(permit);
        // HTTP/2 has no request head to time: a quiet h2 connection may still be
        // exchanging PINGs and SETTINGS, which must not look like a slow head
        let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        // the connection waits on a token of its own, cancelled with the listener's: its
        // wait is polled on every wake-up, and polling the shared token would take a lock
        // (and a cache line) every other connection on every core takes too
        let closing = closing.child_token();
        // an HTTP/1.1 connection over TLS 1.3 can be handed to a response that streams
        // for long (`detach`); HTTP/2 multiplexes, and TLS 1.2 records are not sealed there
        let handoff = (!h2
            && tls_stream.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3))
        .then(|| Arc::new(Handoff::default()));
        let Some((stream, run)) = serve_connection(
            tls_stream,
            !h2,
            peer,
            router,
            limits,
            closing.clone(),
            handoff,
            slot.clone(),
        )
        .await
        else {
            return;
        };
        let detached = Detached::from_tls(stream, closing);
        let outcome = if detached.is_ok() { "taken" } else { "failed" };
        metrics::counter!("portcullis_detached_streams_total", "outcome" => outcome).increment(1);
        match detached {
            // the stream runs in a task of its own, holding the connection's place: this
            // task, sized for hyper and rustls, ends here
            Ok(detached) => {
                tracker.spawn(async move {
                    let _slot = slot;
                    run(detached).await;
                });
            }
            Err(e) => tracing::debug!(%peer, error = %e, "stream takeover failed; closing"),
        }
    }
}

/// An established connection's place: its permit of `server.max_connections` and its
/// count in `portcullis_https_connections_open`, given back when the last holder lets go.
/// The connection's task holds it, and so does whatever carries the connection on past
/// that task: a detached stream, and the relay of an upgraded (WebSocket) connection,
/// which hyper lets go of once the `101` is sent — without this a WebSocket would stop
/// counting against the limit the moment it opened. A request that may upgrade carries a
/// clone in its extensions for the proxy to take ([`crate::proxy`]).
#[derive(Clone)]
pub(crate) struct ConnectionSlot {
    // one per connection, cloned only for the requests that may upgrade
    _held: Arc<(OwnedSemaphorePermit, OpenConnection)>,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        Self {
            _held: Arc::new((permit, OpenConnection::new())),
        }
    }
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionSlot").finish_non_exhaustive()
    }
}

/// Counts an established connection in `portcullis_https_connections_open`, labelled by
/// the connection worker serving it (`shared` without workers), while it lives.
struct OpenConnection(metrics::Gauge);

impl OpenConnection {
    fn new() -> Self {
        let worker = crate::workers::current()
            .map_or(metrics::SharedString::const_str("shared"), |i| {
                metrics::SharedString::from(i.to_string())
            });
        let gauge = metrics::gauge!("portcullis_https_connections_open", "worker" => worker);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Serves one connection until the client leaves, it stays idle for
/// `limits.idle_timeout`, a request head takes longer than `limits.header_read_timeout`
/// (dropped at once), or `closing` is cancelled. Idleness and shutdown end it gracefully
/// (HTTP/1.1 after the response in progress, HTTP/2 by GOAWAY after the streams already
/// opened), so a request already received is answered in full. `time_heads` is false
/// for HTTP/2 negotiated by ALPN. `slot` is the connection's place, handed to a request
/// that may upgrade.
// each argument is the connection's own, set once by its one caller: a struct would only
// name them a second time
#[allow(clippy::too_many_arguments)]
async fn serve_connection<S>(
    stream: S,
    time_heads: bool,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    handoff: Option<Arc<Handoff>>,
    slot: ConnectionSlot,
) -> Option<(S, Takeover)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new(time_heads));
    let service = ConnService {
        router: std::sync::Mutex::new(router),
        requests: activity.clone(),
        peer,
        detach: handoff.clone().map(Detach::new),
        slot,
    };
    // where the stream goes when hyper is dropped for a takeover
    let kept: Kept<S> = Arc::default();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // no header_read_timeout here: hyper's runs from the end of one response to the end
    // of the next head, so it would also close every idle keep-alive connection after
    // that (short) time, abruptly; `IdleTimer` separates the two waits
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let io = TokioIo::new(Watched {
        inner: Some(stream),
        activity: activity.clone(),
        handoff: handoff.clone().map(|h| (h, kept.clone())),
    });
    // boxed, so that a takeover can drop it before this function returns
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(io, service));
    let mut timer = IdleTimer::new(activity, limits.idle_timeout, limits.header_read_timeout);
    let mut ending = false;
    let result = loop {
        tokio::select! {
            // the connection first: the bytes it reads may start a head, which the timer
            // must see in the same wake-up
            biased;
            served = Served { conn: conn.as_mut(), handoff: handoff.as_deref() } => match served {
                Ok(result) => break result,
                Err(run) => {
                    // dropping hyper leaves the stream in `kept` (`Watched`'s drop)
                    drop(conn);
                    let stream = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    return stream.map(|s| (s, run));
                }
            },
            () = closing.cancelled(), if !ending => {
                ending = true;
                conn.as_mut().graceful_shutdown();
            }
            expired = &mut timer, if !ending => match expired {
                Expired::Idle => {
                    ending = true;
                    tracing::debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                }
                Expired::Head => {
                    // a graceful close would wait for the unfinished head; drop the
                    // connection, as hyper's own header timeout does
                    tracing::debug!(%peer, "request head timed out; dropping the connection");
                    return None;
                }
            },
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection closed with an error");
    }
    None
}

/// Polls a connection, and completes with the takeover instead once a response wants
/// the connection and hyper has flushed everything before it.
struct Served<'a, C> {
    conn: Pin<&'a mut C>,
    handoff: Option<&'a Handoff>,
}

impl<C: Future> Future for Served<'_, C> {
    type Output = Result<C::Output, Takeover>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(result) = self.conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(result));
        }
        match self.handoff.and_then(Handoff::ready) {
            Some(run) => Poll::Ready(Err(run)),
            None => Poll::Pending,
        }
    }
}

/// One connection's service: hands each request to the router. hyper calls it by shared
/// reference; the router is called in place (it is always ready, and its future owns what
/// it needs), where an adapter would clone it per request — a reference count every
/// connection on every core shares. The lock is only ever taken by this connection's own
/// task, so it is never contended.
struct ConnService {
    router: std::sync::Mutex<Router>,
    /// What the idle timer reads.
    requests: Arc<Activity>,
    /// The socket peer, handed to the router as `ConnectInfo` (as axum's own server does).
    peer: SocketAddr,
    /// The connection's offer to a streaming response, on HTTP/1.1 over TLS 1.3.
    detach: Option<Detach>,
    /// The connection's place, carried by a WebSocket handshake to the relay that
    /// outlives this connection's task.
    slot: ConnectionSlot,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnService {
    type Response = http::Response<TrackedBody<axum::body::Body>>;
    type Error = std::convert::Infallible;
    type Future = Respond;

    fn call(&self, mut req: http::Request<hyper::body::Incoming>) -> Respond {
        // the head has arrived: the connection is busy until the response body is sent or
        // dropped (the guard travels in the future, then in the body)
        let in_flight = InFlight::start(&self.requests, req.version());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        // offered to the one route that streams (`GET …/watch`), not carried by the rest
        if let Some(detach) = &self.detach
            && req.version() == http::Version::HTTP_11
            && req.method() == http::Method::GET
            && req.uri().path().ends_with("/watch")
        {
            req.extensions_mut().insert(detach.clone());
        }
        // a handshake the proxy may answer `101`: the relay then keeps the place
        if req.version() == http::Version::HTTP_11 && crate::proxy::is_upgrade(req.headers()) {
            req.extensions_mut().insert(self.slot.clone());
        }
        // an HTTP/1.1 body the answer may leave unread is read out after it (see
        // `Lingering`); HTTP/2 ends such a stream alone, most requests have no body, and
        // a client expecting `100 Continue` sends none unless asked (reading it out would
        // ask for it)
        let req = if req.version() != http::Version::HTTP_2
            && !req.body().is_end_stream()
            && !req.headers().contains_key(http::header::EXPECT)
        {
            let activity = self.requests.clone();
            req.map(|body| axum::body::Body::new(Lingering::new(body, activity)))
        } else {
            req.map(axum::body::Body::new)
        };
        let mut router = self
            .router
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Respond {
            inner: tower::Service::call(&mut *router, req),
            in_flight: Some(in_flight),
        }
    }
}

/// The router's answer to one request, its body tracked for the idle timer.
struct Respond {
    inner: axum::routing::future::RouteFuture<std::convert::Infallible>,
    in_flight: Option<InFlight>,
}

impl Future for Respond {
    type Output = Result<http::Response<TrackedBody<axum::body::Body>>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match Pin::new(&mut self.inner).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
        };
        let in_flight = self.in_flight.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            inner: body,
            in_flight,
        })))
    }
}

// === impl Activity ===

/// Stands for "no request head is being read".
const NO_HEAD: u64 = u64::MAX;

/// What a connection's timer reads: requests in flight, when the last one ended, and
/// when the next head began. Atomics written once or twice per request, so the request
/// path takes no lock and allocates nothing.
struct Activity {
    opened: Instant,
    /// Requests whose head has arrived and whose response body is not yet sent or dropped.
    in_flight: AtomicUsize,
    /// When a request last ended (or the connection opened), in nanoseconds since `opened`.
    last_end_nanos: AtomicU64,
    /// When the first byte of the next request head was read, in nanoseconds since
    /// `opened`, or [`NO_HEAD`]. The first head is timed from the start.
    head_start_nanos: AtomicU64,
    /// Whether heads are timed: HTTP/1.1 only.
    time_heads: AtomicBool,
}

impl Activity {
    fn new(time_heads: bool) -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_nanos: AtomicU64::new(0),
            head_start_nanos: AtomicU64::new(if time_heads { 0 } else { NO_HEAD }),
            time_heads: AtomicBool::new(time_heads),
        }
    }

    fn nanos_since_open(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(NO_HEAD - 1)
    }

    fn at(&self, nanos: u64) -> Instant {
        self.opened + Duration::from_nanos(nanos)
    }

    /// Bytes arrived: with no request in flight they begin the next request head.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_start_nanos.load(Ordering::Relaxed) == NO_HEAD
            && self.time_heads.load(Ordering::Relaxed)
        {
            self.head_start_nanos
                .store(self.nanos_since_open(), Ordering::Relaxed);
        }
    }

    /// When the connection must close unless something happens, and why; `None` while a
    /// request is in flight.
    fn due(&self, idle: Duration, head: Duration) -> Option<(Instant, Expired)> {
        // Acquire pairs with the Release in `InFlight::drop`: seeing 0 means seeing the
        // end time the last request stored before it left
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle_due = self.at(self.last_end_nanos.load(Ordering::Relaxed)) + idle;
        match self.head_start_nanos.load(Ordering::Relaxed) {
            NO_HEAD => Some((idle_due, Expired::Idle)),
            started => Some((self.at(started) + head, Expired::Head)),
        }
    }
}

/// Why a connection's timer fired.
#[derive(Debug, Clone, Copy)]
enum Expired {
    /// No request in flight for `idle_timeout`.
    Idle,
    /// A request head took longer than `header_read_timeout`.
    Head,
}

/// Completes when the connection has been idle for `idle`, or a request head has taken
/// longer than `head`. One sleep per connection: re-armed for the time still missing when
/// it fires, and brought forward when a head begins (checked whenever the connection's
/// task wakes, which reading that head does), rather than a timer per request.
struct IdleTimer {
    activity: Arc<Activity>,
    idle: Duration,
    head: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    fn new(activity: Arc<Activity>, idle: Duration, head: Duration) -> Self {
        let first = activity
            .due(idle, head)
            .map_or(activity.opened + idle, |(due, _)| due);
        Self {
            activity,
            idle,
            head,
            sleep: Box::pin(tokio::time::sleep_until(first)),
        }
    }
}

impl Future for IdleTimer {
    type Output = Expired;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Expired> {
        let this = &mut *self;
        // brought forward: a head began since the sleep was armed
        if let Some((due, _)) = this.activity.due(this.idle, this.head)
            && due < this.sleep.deadline()
        {
            this.sleep.as_mut().reset(due);
        }
        while this.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match this.activity.due(this.idle, this.head) {
                // busy: it cannot be idle long enough before a whole timeout from now
                None => this.sleep.as_mut().reset(now + this.idle),
                Some((due, why)) if due <= now => return Poll::Ready(why),
                Some((due, _)) => this.sleep.as_mut().reset(due),
            }
        }
        Poll::Pending
    }
}

/// One request in flight on a connection, from its head to the end of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    /// Counts the connection busy for as long as the guard lives, without starting a
    /// request (a request body still being read after its answer).
    fn hold(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }

    fn start(activity: &Arc<Activity>, version: http::Version) -> Self {
        let guard = Self::hold(activity);
        activity.head_start_nanos.store(NO_HEAD, Ordering::Relaxed);
        if version == http::Version::HTTP_2 {
            // h2 without ALPN (prior knowledge): nothing to time from here on
            activity.time_heads.store(false, Ordering::Relaxed);
        }
        guard
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.nanos_since_open();
        // max: with HTTP/2 several requests may end at once, in any order
        activity.last_end_nanos.fetch_max(now, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// The most of a request body left unread by its answer that is read out after it.
const LINGER_BYTES: u64 = 4 * 1024 * 1024;
/// How long that may take.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// An HTTP/1.1 request body that, dropped before its end, is read to its end (and thrown
/// away) in the background: "lingering close". A request answered before its body was
/// read — refused for its token, its rate, its size — may still be arriving; hyper
/// closes a connection whose body was dropped unread, and a client still sending it
/// then meets the close instead of reading the answer (over TLS an "EOF in violation of
/// protocol", a connection reset over TCP). Read out, the body ends, the client reads
/// the answer, and the connection stays open for the next request. At most
/// [`LINGER_BYTES`] within [`LINGER_TIME`]: a body declared longer, or slower, is left and
/// the connection closed, as before. While it is read the connection counts as busy, so
/// that its bytes are not taken for the start of the next request head.
struct Lingering {
    inner: Option<hyper::body::Incoming>,
    /// Set once the body's end was seen.
    done: bool,
    activity: Arc<Activity>,
}

impl Lingering {
    fn new(body: hyper::body::Incoming, activity: Arc<Activity>) -> Self {
        Self {
            inner: Some(body),
            done: false,
            activity,
        }
    }
}

impl Body for Lingering {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // an error ends it too: nothing more to read
            self.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if self.done || body.is_end_stream() {
            return;
        }
        let declared = body.size_hint();
        if declared.lower() > LINGER_BYTES {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let busy = InFlight::hold(&self.activity);
        runtime.spawn(async move {
            let _busy = busy;
            let _ = tokio::time::timeout(LINGER_TIME, read_out(body, LINGER_BYTES)).await;
        });
    }
}

/// Reads `body` to its end, keeping nothing, unless it holds more than `budget` bytes.
async fn read_out(mut body: hyper::body::Incoming, mut budget: u64) {
    use http_body_util::BodyExt;
    while let Some(Ok(frame)) = body.frame().await {
        let len = frame
            .data_ref()
            .map_or(0, |d| u64::try_from(d.len()).unwrap_or(u64::MAX));
        match budget.checked_sub(len) {
            Some(left) => budget = left,
            // dropped unread: hyper closes the connection
            None => return,
        }
    }
}

/// Where a connection's stream is left for a takeover.
type Kept<S> = Arc<std::sync::Mutex<Option<S>>>;

/// The connection's stream, telling [`Activity`] when bytes arrive, and the handoff
/// when writes are flushed. Dropped (with hyper) after a response asked for the
/// connection, it leaves the stream in the handoff's slot.
struct Watched<S> {
    // `None` only once given up
    inner: Option<S>,
    activity: Arc<Activity>,
    handoff: Option<(Arc<Handoff>, Kept<S>)>,
}

impl<S> Watched<S> {
    fn stream(&mut self) -> std::io::Result<&mut S> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::ErrorKind::NotConnected.into())
    }

    fn on_write(&self) {
        if let Some((handoff, _)) = &self.handoff {
            handoff.on_write();
        }
    }
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        if let Some((handoff, kept)) = &self.handoff
            && handoff.wanted()
        {
            *kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = self.inner.take();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(self.stream()?).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.on_write();
        Pin::new(self.stream()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.on_write();
        Pin::new(self.stream()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(self.stream()?).poll_flush(cx);
        if let (Poll::Ready(Ok(())), Some((handoff, _))) = (&flushed, &self.handoff) {
            handoff.on_flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.stream()?).poll_shutdown(cx)
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
