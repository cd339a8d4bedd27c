//! The reverse proxy to the admin cluster: every request the router does not serve itself
//! and that falls under a `[[proxy.routes]]` prefix is authenticated per its route, has
//! its identity headers replaced by verified ones, and is forwarded to an admin node.
//!
//! - a pooled HTTP/1.1 client (keep-alive) over plain TCP to the nodes, bodies streamed
//!   both ways, a connect timeout and a deadline for the response head;
//! - round robin over the nodes that may get traffic ([`upstream`]);
//! - an idempotent request whose body could be held (none, or a small declared one) is
//!   retried once on another node when the first could not be reached, failed before
//!   answering, or answered 502/503; anything else is sent exactly once;
//! - WebSocket (HTTP/1.1 `Upgrade`) handshakes are passed through and the two upgraded
//!   connections joined, for no longer than the credential of the handshake is good and
//!   the instance is not shutting down ([`upgrade`]); the relay keeps the client
//!   connection's place in `server.max_connections`, which hyper gives up at the `101`.
//!
//! Refusals and failures become HTTP in `error.rs` like every other error.

pub mod headers;
pub mod policy;
pub mod pool;
pub mod settings;
pub mod upgrade;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::http::uri::PathAndQuery;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header, request};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authn;
use crate::error::ApiError;
use crate::protect::ClientIp;
use crate::server::ConnectionSlot;
use crate::sso::session::{self, CONSOLE_SCOPE, Resolved};
use crate::state::AppState;
use headers::{Identity, Origin};
use policy::{Route, RouteTable, Unroutable};
use pool::{NodeError, NodePool, PooledBody};
use settings::{ProxySettings, RouteAuth};
use upgrade::Lease;
use upstream::{Outcome, Upstreams};

/// Why a request could not be forwarded. Mapped to HTTP in `error.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Every node is marked down (or the only other one was the one that just failed).
    #[error("no admin node is available")]
    NoNode,
    /// The node could not be reached, or the connection failed before it answered.
    #[error("admin node {node} failed")]
    Failed {
        /// `host:port`.
        node: String,
        /// What went wrong.
        #[source]
        source: NodeError,
    },
    /// The node sent no response head in time.
    #[error("admin node {node} sent no response within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// `host:port`.
        node: String,
        /// `proxy.read_timeout`.
        timeout: Duration,
    },
    /// The path could mean something else to the node than to us.
    #[error(transparent)]
    Unroutable(#[from] Unroutable),
    /// The request body exceeds `proxy.max_body_bytes`.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// `proxy.max_body_bytes`.
        limit: usize,
    },
    /// The client's body could not be read (it went away, or sent garbage).
    #[error("the request body could not be read")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The proxy of one instance; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections to the nodes, kept per connection worker: plain TCP for `http://`
    /// nodes, our rustls for `https://` ones.
    pool: NodePool,
    // swapped whole by the runtime settings (`proxy.upstreams`); a request keeps the list
    // it started with, so its retry and health records stay on the same nodes
    upstreams: ArcSwap<Upstreams>,
    routes: RouteTable,
    settings: ProxySettings,
    /// `server.request_timeout`: both attempts of a request must have answered by then.
    request_timeout: Duration,
    /// `X-Forwarded-Host`: the host of `server.public_url`, whatever `Host` a client sent,
    /// so a node that builds links or redirects from it cannot be pointed elsewhere.
    public_host: Option<HeaderValue>,
    /// Paces the WARNs of WebSocket session checks the refresh store did not answer.
    upgrade_check_failures: Arc<upgrade::CheckFailureLog>,
    /// The relays of upgraded connections. They outlive the connection tasks the
    /// listener drains (hyper lets go of a connection once it is upgraded), so the
    /// instance waits for them here before it drops the workers they run on.
    upgrades: TaskTracker,
    /// The instance's shutdown: closes every upgraded connection.
    closing: CancellationToken,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.inner.upstreams.load())
            .finish_non_exhaustive()
    }
}

// === impl Proxy ===

impl Proxy {
    /// The proxy for validated settings; `None` when no admin node is configured. Fails
    /// when the TLS files for `https://` nodes cannot be read.
    /// `request_timeout` is `server.request_timeout`: the time a request has for its
    /// response head, retry included. `shutdown` is the instance's: cancelled, it closes
    /// every upgraded connection (see [`Proxy::upgrades_closed`]).
    pub fn new(
        settings: &ProxySettings,
        public_url: &str,
        request_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Option<Self>, String> {
        if !settings.enabled() {
            return Ok(None);
        }
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(settings.connect_timeout));
        tcp.set_nodelay(true);
        // the https connector hands http:// URIs to the TCP connector as they are
        tcp.enforce_http(false);
        let tls = crate::outbound::client_tls_config(
            settings.tls_ca_file.as_deref(),
            settings
                .tls_client_cert
                .as_deref()
                .zip(settings.tls_client_key.as_deref()),
        )?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        upgrade::register_metrics();
        Ok(Some(Self {
            inner: Arc::new(Inner {
                pool: NodePool::new(
                    connector,
                    settings.pool_idle_timeout,
                    settings.pool_max_idle_per_node,
                ),
                upstreams: ArcSwap::from_pointee(Upstreams::new(
                    &settings.upstreams,
                    settings.health.clone(),
                )),
                routes: RouteTable::new(&settings.routes),
                settings: settings.clone(),
                request_timeout,
                upgrade_check_failures: Arc::new(upgrade::CheckFailureLog::new(
                    settings.upgrade_session_check_interval,
                )),
                upgrades: TaskTracker::new(),
                closing: shutdown,
                public_host: url::Url::parse(public_url).ok().and_then(|u| {
                    let host = u.host_str()?;
                    let authority = match u.port() {
                        Some(port) => format!("{host}:{port}"),
                        None => host.to_owned(),
                    };
                    HeaderValue::from_str(&authority).ok()
                }),
            }),
        }))
    }

    /// The route table.
    pub fn routes(&self) -> &RouteTable {
        &self.inner.routes
    }

    /// The nodes and their health, as they are now.
    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.inner.upstreams.load_full()
    }

    /// The admin nodes `list` names, checked, for [`Proxy::install_upstreams`]: a node
    /// already listed keeps its health (a node down stays down), a new one starts healthy;
    /// nothing changes yet (runtime settings check a whole release before they put any of
    /// it in force).
    pub fn prepare_upstreams(&self, list: &[String]) -> Result<Upstreams, String> {
        if list.is_empty() {
            return Err("proxy.upstreams: at least one admin node is needed".to_owned());
        }
        settings::check_upstreams(list).map_err(|(_, e)| format!("proxy.upstreams: {e}"))?;
        let current = self.inner.upstreams.load();
        Ok(Upstreams::carrying_over(
            list,
            current.health().clone(),
            &current,
        ))
    }

    /// Replaces the admin nodes (runtime settings): requests from now on go to
    /// `upstreams`; requests under way finish on the nodes they had.
    pub fn install_upstreams(&self, upstreams: Upstreams) {
        let previous = self.inner.upstreams.swap(Arc::new(upstreams));
        self.inner.upstreams.load().publish_gauges(&previous);
    }

    /// Upgraded (WebSocket) connections open now.
    pub fn open_upgrades(&self) -> usize {
        self.inner.upgrades.len()
    }

    /// Resolves once every upgraded connection is closed, for the instance's stop: the
    /// shutdown closes each at once, telling both sides within [`upgrade::CLOSE_GRACE`],
    /// which bounds this wait too. `false` when some were still closing then (their
    /// sockets are dropped with the workers they run on).
    pub async fn upgrades_closed(&self) -> bool {
        self.inner.upgrades.close();
        // twice the bound: a relay started during the drain begins its close late
        tokio::time::timeout(upgrade::CLOSE_GRACE * 2, self.inner.upgrades.wait())
            .await
            .is_ok()
    }

    /// `proxy.max_body_bytes`.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.settings.max_body_bytes
    }

    /// The route `method` on the raw `path` falls under, if any; an ambiguous path is
    /// refused whatever the routes say.
    pub fn resolve(&self, method: &Method, path: &str) -> Result<Option<Arc<Route>>, Unroutable> {
        let path = policy::decoded_path(path)?;
        Ok(self.inner.routes.find(method, &path)?.cloned())
    }

    /// Runs the proxy's background work until `stop`: closing node connections idle for
    /// longer than `proxy.pool_idle_timeout`, and the active health checks when
    /// `proxy.health.check_path` is set.
    pub fn spawn_upkeep(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let checks = {
            let ups = self.inner.upstreams.load();
            ups.active_check()
                .map(|(path, interval, timeout)| (path.to_owned(), interval, timeout))
        };
        let this = self.clone();
        let prune_every = (self.inner.settings.pool_idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut prune = tokio::time::interval(prune_every);
            prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut check = checks.as_ref().map(|(_, interval, _)| {
                let mut tick = tokio::time::interval(*interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            });
            loop {
                let due_check = async {
                    match &mut check {
                        Some(tick) => {
                            tick.tick().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = prune.tick() => this.inner.pool.prune(),
                    () = due_check => {
                        if let Some((path, _, timeout)) = &checks {
                            let ups = this.inner.upstreams.load_full();
                            let all = (0..ups.nodes().len())
                                .map(|i| this.check(&ups, i, path, *timeout));
                            futures::future::join_all(all).await;
                        }
                    }
                }
            }
        })
    }

    async fn check(&self, ups: &Upstreams, index: usize, path: &str, timeout: Duration) {
        let Some(node) = ups.nodes().get(index) else {
            return;
        };
        let Ok(path) = PathAndQuery::try_from(path) else {
            return;
        };
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = path.into();
        let sent = self.inner.pool.send(node, req);
        let up = match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(resp)) => {
                let ok = resp.status().is_success();
                // read the (small) answer so the connection goes back to the pool
                let _ = tokio::time::timeout(
                    timeout,
                    http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect(),
                )
                .await;
                ok
            }
            _ => false,
        };
        ups.record_check(index, up);
    }

    /// Forwards `req` (already authenticated) with `identity` to a node and returns the
    /// node's answer, streaming. `arrived` is when the request reached the handler, before
    /// its authentication (which may have renewed a console session or reloaded the key
    /// ring): the request's `server.request_timeout` runs from about then. `lease` is
    /// the credential of a WebSocket handshake on an authenticated route: the upgraded
    /// connection is closed when it runs out.
    #[tracing::instrument(name = "proxy.forward", skip_all, fields(otel.kind = "client"))]
    pub async fn forward(
        &self,
        mut req: Request,
        identity: Option<&Identity>,
        origin: &Origin,
        arrived: Instant,
        lease: Option<Lease>,
    ) -> Result<Response, ProxyError> {
        let settings = &self.inner.settings;
        // the outer timeout layer answers 408 at `server.request_timeout`: every attempt
        // must have given up before then, so that a slow node is a 504 (which carries a
        // renewed session's cookies, a 408 from the layer would not), and a retry never
        // runs past it
        let deadline = arrived + self.inner.request_timeout.saturating_sub(DEADLINE_MARGIN);
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| ClientUpgrade {
            upgraded: hyper::upgrade::on(&mut req),
            lease,
            slot: req.extensions_mut().remove::<ConnectionSlot>(),
        });
        let (mut parts, body) = req.into_parts();
        // read before the hop-by-hop headers go: the layers in front wrap the body in
        // ways that hide its size, the headers do not
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        if declared.is_some_and(|n| n > settings.max_body_bytes as u64) {
            return Err(ProxyError::BodyTooLarge {
                limit: settings.max_body_bytes,
            });
        }
        // a body can be sent twice only if we hold it; hold it only when it is small and
        // its size is known up front: declared, or absent (no length, not chunked) on a
        // method that carries none by convention
        let replay_limit = settings.retry_buffer_bytes;
        let replayable = is_idempotent(&parts.method)
            && !upgrade
            && match declared {
                Some(n) => n <= replay_limit as u64,
                None => {
                    !chunked
                        && matches!(
                            parts.method,
                            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
                        )
                }
            };
        headers::to_upstream(
            &mut parts.headers,
            identity,
            origin,
            settings.forward_token,
            upgrade,
        );
        let (replay, body) =
            if replayable && (declared == Some(0) || hyper::body::Body::is_end_stream(&body)) {
                // nothing to read (a GET, usually): no read, and no body deadline to arm
                (Some(bytes::Bytes::new()), Body::empty())
            } else if replayable {
                let held = http_body_util::Limited::new(body, replay_limit.max(1))
                    .collect()
                    .await
                    .map_err(|e| client_body_error(e, settings.max_body_bytes))?
                    .to_bytes();
                (Some(held), Body::empty())
            } else {
                (None, body)
            };
        let ups = self.inner.upstreams.load_full();
        let first = ups.pick(None).ok_or(ProxyError::NoNode)?;
        let first_body = match &replay {
            Some(bytes) => Body::from(bytes.clone()),
            None => body,
        };
        // the headers are copied only when a second node could get the request
        let retry = replay.filter(|_| ups.nodes().len() > 1);
        let first_headers = match retry {
            Some(_) => parts.headers.clone(),
            None => std::mem::take(&mut parts.headers),
        };
        let answer = self
            .attempt(&ups, first, &parts, first_headers, first_body, deadline)
            .await;
        // a retry with hardly any time left would only turn the first node's answer into
        // our 504: not tried
        let time_for_retry = deadline.saturating_duration_since(Instant::now()) >= RETRY_MIN_TIME;
        let answer = match retry {
            Some(bytes) if time_for_retry && should_retry(&answer) => match ups.pick(Some(first)) {
                Some(second) => {
                    metrics::counter!("portcullis_upstream_retries_total").increment(1);
                    tracing::info!(
                        from = %node_name(&ups, first),
                        to = %node_name(&ups, second),
                        method = %parts.method,
                        "retrying an idempotent request on another admin node"
                    );
                    let headers = std::mem::take(&mut parts.headers);
                    self.attempt(&ups, second, &parts, headers, Body::from(bytes), deadline)
                        .await
                }
                None => answer,
            },
            _ => answer,
        }?;
        Ok(into_client_response(&self.inner, answer, client_upgrade))
    }

    /// One try on node `index` with the request `parts` (whose own headers are not
    /// used) and `headers`, given up at `proxy.read_timeout` or at `deadline`, whichever
    /// comes first; records the outcome for health and metrics.
    async fn attempt(
        &self,
        ups: &Upstreams,
        index: usize,
        parts: &request::Parts,
        headers: HeaderMap,
        body: Body,
        deadline: Instant,
    ) -> Result<axum::http::Response<PooledBody>, ProxyError> {
        let node = ups.nodes().get(index).ok_or(ProxyError::NoNode)?;
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        // origin-form: the node is reached directly, not as a proxy
        *req.uri_mut() = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
            .into();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;

        let started = Instant::now();
        let read_timeout = self.inner.settings.read_timeout;
        let timeout = read_timeout.min(deadline.saturating_duration_since(started));
        let sent = self.inner.pool.send(node, req);
        let result = tokio::time::timeout(timeout, sent).await;
        node.record_duration(started.elapsed());
        let (outcome, result) = match result {
            // a node cut short by the request's deadline did not have its whole
            // `read_timeout`: counted, not held against its health
            Err(_) if timeout < read_timeout => {
                ups.count_only(index, Outcome::Timeout);
                (
                    None,
                    Err(ProxyError::Timeout {
                        node: node.authority.clone(),
                        timeout,
                    }),
                )
            }
            Err(_) => (
                Some(Outcome::Timeout),
                Err(ProxyError::Timeout {
                    node: node.authority.clone(),
                    timeout,
                }),
            ),
            Ok(Ok(resp)) => {
                let outcome = match resp.status() {
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => {
                        Outcome::ErrorStatus
                    }
                    _ => Outcome::Ok,
                };
                (Some(outcome), Ok(resp))
            }
            // the client's own body failed (too large, cut off): not the node's fault
            Ok(Err(e)) if is_client_side(&e) => (
                None,
                Err(client_body_error(
                    Box::new(e),
                    self.inner.settings.max_body_bytes,
                )),
            ),
            Ok(Err(e)) => {
                let outcome = if e.is_connect() {
                    Outcome::ConnectError
                } else {
                    Outcome::Error
                };
                (
                    Some(outcome),
                    Err(ProxyError::Failed {
                        node: node.authority.clone(),
                        source: e,
                    }),
                )
            }
        };
        if let Some(outcome) = outcome {
            ups.record(index, outcome);
        }
        result
    }
}

fn node_name(ups: &Upstreams, index: usize) -> &str {
    ups.nodes().get(index).map_or("?", |n| n.authority.as_str())
}

/// How long before `server.request_timeout` the proxy gives up waiting for a node, so
/// that its own 504 is the answer rather than the timeout layer's 408.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// The least time left before the deadline for which a retry is worth sending.
const RETRY_MIN_TIME: Duration = Duration::from_secs(1);

/// GET, HEAD, OPTIONS, PUT and DELETE may be sent twice (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// A retry on another node helps when the first could not be reached, failed before
/// answering, or said it cannot serve (502/503); a timeout is not retried, since the node
/// may still be working on the request and the client's deadline is mostly spent.
fn should_retry(answer: &Result<axum::http::Response<PooledBody>, ProxyError>) -> bool {
    match answer {
        Ok(resp) => matches!(
            resp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
        ),
        Err(ProxyError::Failed { .. }) => true,
        Err(_) => false,
    }
}

/// Whether an error of the client came from the request body we were streaming.
fn is_client_side(e: &NodeError) -> bool {
    let NodeError::Http(h) = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(h);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    h.is_user()
}

fn client_body_error(e: Box<dyn std::error::Error + Send + Sync>, limit: usize) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return ProxyError::BodyTooLarge { limit };
        }
        cur = err.source();
    }
    ProxyError::ClientBody(e)
}

/// A WebSocket handshake: `Connection: upgrade` with `Upgrade: websocket`. Another
/// protocol (`h2c`, say) is not passed through: its `Upgrade` is dropped with the other
/// hop-by-hop headers and the node gets a plain request.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The client's side of a WebSocket handshake, for the relay should the node answer `101`.
struct ClientUpgrade {
    /// The client's connection, once hyper has sent our `101`.
    upgraded: hyper::upgrade::OnUpgrade,
    /// The handshake's credential, on an authenticated route.
    lease: Option<Lease>,
    /// The client connection's place in `server.max_connections` (absent only when the
    /// request did not come through the HTTPS listener, as in tests that call the router
    /// directly).
    slot: Option<ConnectionSlot>,
}

/// The node's answer as ours: headers cleaned, body streamed; a `101 Switching
/// Protocols` joins the client's and the node's upgraded connections, until either closes,
/// the handshake's credential (`lease`) runs out or the instance shuts down.
fn into_client_response(
    proxy: &Inner,
    mut resp: axum::http::Response<PooledBody>,
    client_upgrade: Option<ClientUpgrade>,
) -> Response {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching
        && let Some(ClientUpgrade {
            upgraded: client,
            lease,
            slot,
        }) = client_upgrade
    {
        let upstream = hyper::upgrade::on(&mut resp);
        // a token of its own: the relay polls it at every wake-up, and the instance's
        // would take a lock every other connection on every core takes too
        let closing = proxy.closing.child_token();
        proxy.upgrades.spawn(async move {
            // hyper lets go of the client's connection at the `101`: the relay holds its
            // place in `server.max_connections` until it ends
            let _slot = slot;
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => upgrade::join(client, upstream, lease, closing).await,
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    headers::from_upstream(&mut parts.headers, switching);
    Response::from_parts(parts, Body::new(body))
}

// === the handler ===

/// Which proxy route a request falls under, decided once before the handler (by the
/// route guard, which needs it for the body limit) and taken by [`handle`].
#[derive(Debug, Clone)]
pub struct ResolvedRoute(pub Result<Option<Arc<Route>>, Unroutable>);

/// The router's fallback: forwards what a route covers, 404 for the rest.
pub async fn handle(State(state): State<AppState>, mut req: Request) -> Response {
    let arrived = Instant::now();
    let Some(proxy) = state.proxy.clone() else {
        return ApiError::NotFound.into_response();
    };
    // the route guard has usually decided already (`edge::Guard`)
    let resolved = match req.extensions_mut().remove::<ResolvedRoute>() {
        Some(ResolvedRoute(r)) => r,
        None => proxy.resolve(req.method(), req.uri().path()),
    };
    let route = match resolved {
        Ok(Some(route)) => route,
        Ok(None) => return ApiError::NotFound.into_response(),
        Err(e) => return ApiError::from(ProxyError::from(e)).into_response(),
    };
    // the head alone crosses the awaits of authentication: the body is not `Sync`
    let (head, body) = req.into_parts();
    let Authorized {
        identity,
        set_cookies,
        lease,
    } = match authorize(&state, &proxy, &route, &head).await {
        Ok(ok) => ok,
        Err(refusal) => return refusal,
    };
    let origin = Origin {
        client_ip: client_ip(&head),
        host: proxy.inner.public_host.clone(),
    };
    let req = Request::from_parts(head, body);
    let mut response = match proxy
        .forward(req, identity.as_ref(), &origin, arrived, lease)
        .await
    {
        Ok(r) => r,
        Err(e) => ApiError::from(e).into_response(),
    };
    for c in set_cookies {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}

fn client_ip(head: &request::Parts) -> IpAddr {
    head.extensions
        .get::<ClientIp>()
        .map(|c| c.0)
        .or_else(|| {
            head.extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
        })
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// What [`authorize`] found a request to be.
struct Authorized {
    /// Who, for the node; `None` on public routes.
    identity: Option<Identity>,
    /// The `Set-Cookie`s of a renewed console session.
    set_cookies: Vec<HeaderValue>,
    /// For a WebSocket handshake on an authenticated route: its credential, which bounds
    /// the upgraded connection.
    lease: Option<Lease>,
}

/// Who the request is, per its route; a refusal is a finished response (401, 403, or a
/// redirect to the login for a browser). The `Set-Cookie`s of a renewed console session
/// go on whatever the node answers.
async fn authorize(
    state: &AppState,
    proxy: &Proxy,
    route: &Route,
    req: &request::Parts,
) -> Result<Authorized, Response> {
    match route.auth {
        RouteAuth::Public => Ok(Authorized {
            identity: None,
            set_cookies: Vec::new(),
            lease: None,
        }),
        RouteAuth::Bearer => {
            let authorization = req.headers.get(header::AUTHORIZATION);
            let verified = authn::verify_bearer(&state.keys, authorization, &route.scopes)
                .await
                .map_err(IntoResponse::into_response)?;
            check_roles(route, &verified.claims.roles).map_err(IntoResponse::into_response)?;
            let identity = verified.identity().clone().with_token(authorization);
            // only a handshake pays for a lease: other requests end with their answer
            let lease = authorization
                .filter(|_| is_upgrade(&req.headers))
                .map(|a| Lease::bearer(state, route.label.clone(), &verified, a));
            Ok(Authorized {
                identity: Some(identity),
                set_cookies: Vec::new(),
                lease,
            })
        }
        RouteAuth::Session => match session::resolve(state, &req.headers).await {
            Ok(Resolved::Active { user, set_cookies }) => {
                if let Err(e) = check_roles(route, &user.roles) {
                    let mut refusal = e.into_response();
                    for c in set_cookies {
                        refusal.headers_mut().append(header::SET_COOKIE, c);
                    }
                    return Err(refusal);
                }
                let identity = Identity::new(
                    &user.user,
                    &user.subject,
                    user.email.as_deref(),
                    &user.roles,
                    &[CONSOLE_SCOPE.to_owned()],
                );
                let lease = is_upgrade(&req.headers).then(|| {
                    Lease::session(
                        state,
                        route.label.clone(),
                        &user,
                        proxy.inner.settings.upgrade_session_check_interval,
                        proxy.inner.upgrade_check_failures.clone(),
                    )
                });
                Ok(Authorized {
                    identity: Some(identity),
                    set_cookies,
                    lease,
                })
            }
            Ok(Resolved::None { stale }) => Err(login_required(req, stale)),
            Err(e) => Err(e.into_response()),
        },
    }
}

/// The user needs one of the route's roles, when it names any.
fn check_roles(route: &Route, held: &[String]) -> Result<(), ApiError> {
    if route.roles.is_empty() || route.roles.iter().any(|r| held.contains(r)) {
        return Ok(());
    }
    metrics::counter!("portcullis_proxy_refusals_total", "reason" => "role").increment(1);
    Err(ApiError::Forbidden {
        code: "insufficient_role",
        description: format!(
            "this page needs one of the roles: {}",
            route.roles.join(", ")
        ),
    })
}

/// No console session: a browser asking for a page is sent to log in and brought back;
/// anything else (XHR, API clients) gets 401.
fn login_required(req: &request::Parts, stale: bool) -> Response {
    metrics::counter!("portcullis_proxy_refusals_total", "reason" => "no_session").increment(1);
    let page = matches!(req.method, Method::GET | Method::HEAD)
        && crate::sso::handlers::wants_html(&req.headers);
    let mut response = if page {
        let back = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let location = format!(
            "/auth/login?redirect={}",
            url::form_urlencoded::byte_serialize(back.as_bytes()).collect::<String>()
        );
        match HeaderValue::from_str(&location) {
            Ok(location) => {
                let mut r = (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
                crate::oauth::token::no_store(r.headers_mut());
                r
            }
            Err(_) => ApiError::SessionRequired.into_response(),
        }
    } else {
        ApiError::SessionRequired.into_response()
    };
    if stale {
        for c in session::clear_session_cookies() {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
    }
    response
}
