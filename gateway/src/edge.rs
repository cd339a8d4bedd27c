//! The two hand-written layers every public request passes, written as plain tower
//! services rather than `middleware::from_fn` closures: those box a future and clone the
//! inner service on every call, and this path runs for every token, every config read and
//! every proxied request.
//!
//! - [`EdgeLayer`], around the whole router (before the request id, the span and the
//!   timeouts): who the client is, and dropping a client-supplied request id we would
//!   not want in our logs.
//! - [`GuardLayer`], on every route and the fallback (after routing, so it knows the route
//!   template): the body limit, the CSRF check, the request metrics, and the span's name.
//!   For a request the router does not match it also decides, once, which proxy route it
//!   falls under ([`crate::proxy::ResolvedRoute`]), so the proxy does not decode the path again.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use crate::error::ApiError;
use crate::protect::client_ip::{ClientIp, TrustedProxies};
use crate::proxy::{Proxy, ResolvedRoute};
use crate::routes::REQUEST_ID;

// === outside the router ===

/// Resolves [`ClientIp`] (`X-Forwarded-For` believed only from trusted proxies) and
/// removes an `X-Request-Id` that is too long or has odd characters.
#[derive(Clone)]
pub struct EdgeLayer {
    trusted: Arc<TrustedProxies>,
}

impl EdgeLayer {
    /// Believing `X-Forwarded-For` from `trusted` peers only.
    pub fn new(trusted: TrustedProxies) -> Self {
        Self {
            trusted: Arc::new(trusted),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            trusted: self.trusted.clone(),
        }
    }
}

/// See [`EdgeLayer`].
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    trusted: Arc<TrustedProxies>,
}

impl<S, B> Service<Request<B>> for Edge<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        let ip = self.trusted.client_ip(peer, req.headers());
        req.extensions_mut().insert(ClientIp(ip));
        req.extensions_mut().insert(Arrived(Instant::now()));
        if req
            .headers()
            .get(&REQUEST_ID)
            .is_some_and(|v| !acceptable_request_id(v))
        {
            req.headers_mut().remove(&REQUEST_ID);
        }
        self.inner.call(req)
    }
}

/// When the request reached the first layer: before the timeout layer started its clock,
/// so a request still running when that clock ran out has been here at least as long.
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// A request id we are willing to log and echo: 1–128 of `[A-Za-z0-9._:-]`.
fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

// === on every route ===

/// What [`Guard`] needs, shared by every route.
struct GuardConfig {
    max_body: usize,
    public_origin: Arc<str>,
    proxy: Option<Proxy>,
    request_timeout: Duration,
}

/// The body limit, the CSRF check, request metrics and the span name; see the module
/// documentation.
#[derive(Clone)]
pub struct GuardLayer {
    config: Arc<GuardConfig>,
}

impl GuardLayer {
    /// Bodies up to `max_body` bytes (the proxy's own limit for what it forwards);
    /// cookie-carrying state changes only from `public_origin`; `request_timeout` is the
    /// outer timeout layer's, so that a request it cut off is counted as its 408.
    pub fn new(
        max_body: usize,
        public_origin: String,
        proxy: Option<Proxy>,
        request_timeout: Duration,
    ) -> Self {
        Self {
            config: Arc::new(GuardConfig {
                max_body,
                public_origin: Arc::from(public_origin),
                proxy,
                request_timeout,
            }),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            config: self.config.clone(),
            // `Router::layer` wraps each route on its own: this remembers its template
            route: Arc::new(OnceLock::new()),
        }
    }
}

/// See [`GuardLayer`].
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    config: Arc<GuardConfig>,
    route: Arc<OnceLock<Arc<str>>>,
}

impl<S> Guard<S> {
    /// The route template as a shared string, built once per route.
    fn template(&self, matched: &MatchedPath) -> Arc<str> {
        let held = self.route.get_or_init(|| Arc::from(matched.as_str()));
        if **held == *matched.as_str() {
            held.clone()
        } else {
            Arc::from(matched.as_str())
        }
    }
}

type BoxedResponse = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxedResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> BoxedResponse {
        let start = req
            .extensions()
            .get::<Arrived>()
            .map_or_else(Instant::now, |a| a.0);
        let method = req.method().clone();
        let matched = req
            .extensions()
            .get::<MatchedPath>()
            .map(|m| self.template(m));
        name_span(&method, matched.as_deref(), req.uri().path());
        // the metrics label: the route template, or the proxy route's `proxy:<prefix>`
        let mut route = matched.clone();
        // a request no route matched goes to the proxy's fallback: decide its route once
        let mut proxied = false;
        if matched.is_none()
            && let Some(proxy) = &self.config.proxy
        {
            let resolved = proxy.resolve(&method, req.uri().path());
            if let Ok(Some(r)) = &resolved {
                proxied = true;
                route = Some(r.label.clone());
            }
            req.extensions_mut().insert(ResolvedRoute(resolved));
        }
        let max = match (&self.config.proxy, proxied) {
            (Some(p), true) => p.max_body_bytes(),
            _ => self.config.max_body,
        };
        let early = refuse_early(&self.config, &req, max);
        // the clone that was made ready is the one called; the one left behind is fresh
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let recording = Recording {
            method,
            route,
            start,
            timeout: self.config.request_timeout,
            status: None,
        };
        Box::pin(async move {
            // the whole recording moves into the future (a closure would take only the
            // field it assigns), so it is dropped with the future, however that ends
            let mut recording = recording;
            let response = match early {
                Some(refusal) => refusal,
                None => {
                    // undeclared (chunked) bodies are counted as they are read;
                    // extractors turn the overflow into 413
                    let req = req.map(|body| Body::new(http_body_util::Limited::new(body, max)));
                    let response = match inner.call(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    // a node's own 413 is its answer to give; ours are JSON already
                    if !proxied
                        && response.status() == StatusCode::PAYLOAD_TOO_LARGE
                        && response.headers().get(header::CONTENT_TYPE)
                            != Some(&HeaderValue::from_static("application/json"))
                    {
                        ApiError::PayloadTooLarge { limit: max }.into_response()
                    } else {
                        response
                    }
                }
            };
            recording.status = Some(response.status());
            Ok(response)
        })
    }
}

/// nginx's "client closed request": the client went away before the answer was ready,
/// so nobody received one.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Records a request in `portcullis_http_requests_total` and its duration when the
/// request's future ends, however it ends:
/// - with the response's status when the handler answered;
/// - 500 when the handler panicked (the catch-panic layer outside answers 500);
/// - 408 when it was still running at `server.request_timeout` (the timeout layer
///   outside dropped it and answers 408);
/// - 499 when the client went away first (the connection dropped it).
///
/// Those three never reach the end of the handler's future, so counting at its end alone
/// missed exactly the requests an operator most needs to see.
struct Recording {
    method: Method,
    route: Option<Arc<str>>,
    start: Instant,
    timeout: Duration,
    status: Option<StatusCode>,
}

impl Drop for Recording {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let status = self.status.unwrap_or_else(|| {
            if std::thread::panicking() {
                StatusCode::INTERNAL_SERVER_ERROR
            } else if elapsed >= self.timeout {
                StatusCode::REQUEST_TIMEOUT
            } else {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
            }
        });
        crate::telemetry::record_request(&self.method, self.route.take(), status, elapsed);
    }
}

/// A refusal made before the handler runs: a declared body over the limit (413), or a
/// cookie-carrying state change from another origin (403, CSRF).
fn refuse_early(config: &GuardConfig, req: &Request, max: usize) -> Option<Response> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Some(ApiError::PayloadTooLarge { limit: max }.into_response());
    }
    // `SameSite=Lax` already keeps the session cookies off most cross-site requests;
    // this closes the rest (same-site subdomains, old browsers). A WebSocket handshake is
    // a GET, but what follows it is as good as any state change, and browsers send
    // cookies and `Origin` with it whatever page opened it (cross-site WebSocket hijacking)
    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || crate::proxy::is_upgrade(req.headers());
    if unsafe_method
        && crate::sso::session::has_session_cookie(req.headers())
        && !crate::sso::session::from_origin(req.headers(), &config.public_origin)
    {
        metrics::counter!("portcullis_csrf_rejected_total").increment(1);
        return Some(
            ApiError::Forbidden {
                code: "csrf_rejected",
                description: "cross-site request refused: Origin is not this site".to_owned(),
            }
            .into_response(),
        );
    }
    None
}

/// Names the request span (made outside the router, where the route is not known yet)
/// by method and route template, or by the path's first segment when no route matched,
/// so span names stay few.
fn name_span(method: &Method, route: Option<&str>, path: &str) {
    crate::telemetry::name_current_span(|| match route {
        Some(r) => format!("{method} {r}"),
        None => {
            let first = path.split('/').nth(1).unwrap_or("");
            format!("{method} /{first}")
        }
    });
}
