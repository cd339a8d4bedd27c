//! The two routers: the public HTTPS one and the admin (ops) one. Built by plain
//! functions so tests can drive them with `oneshot` as well as over real sockets.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::oauth;
use crate::protect;
use crate::sso;
use serde_json::json;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tower_http::trace::TraceLayer;

use crate::authn::BearerAuth;
use crate::config_api;
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry;

/// The header carrying the request id, in and out.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every route of the public router as (method, path). `docs/api/openapi.json` documents
/// exactly these; a test holds the three (router, this list, the file) together.
pub const PUBLIC_ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/oauth2/jwks"),
    ("POST", "/oauth2/token"),
    ("POST", "/oauth2/introspect"),
    ("POST", "/oauth2/revoke"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/.well-known/openid-configuration"),
    ("GET", "/config/v1/{env}/{app}"),
    ("PUT", "/config/v1/{env}/{app}"),
    ("PATCH", "/config/v1/{env}/{app}"),
    ("GET", "/config/v1/{env}/{app}/poll"),
    ("GET", "/config/v1/{env}/{app}/watch"),
    ("GET", "/config/v1/{env}/{app}/releases"),
    ("GET", "/config/v1/{env}/{app}/releases/{version}"),
    ("GET", "/config/v1/{env}/{app}/diff"),
    ("POST", "/config/v1/{env}/{app}/rollback"),
    ("PUT", "/config/v1/{env}/{app}/gray"),
    ("DELETE", "/config/v1/{env}/{app}/gray"),
    ("POST", "/config/v1/{env}/{app}/gray/promote"),
    ("GET", "/auth/login"),
    ("GET", "/auth/callback"),
    ("GET", "/auth/me"),
    ("GET", "/auth/logout"),
    ("POST", "/auth/logout"),
    ("POST", "/auth/local"),
];

/// Every route of the admin router as (method, path); see [`PUBLIC_ROUTES`].
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys/rotate"),
    ("GET", "/admin/clients"),
    ("POST", "/admin/clients"),
    ("GET", "/admin/clients/{id}"),
    ("DELETE", "/admin/clients/{id}"),
    ("POST", "/admin/clients/{id}/rotate-secret"),
    ("POST", "/admin/clients/{id}/disable"),
    ("POST", "/admin/clients/{id}/enable"),
    ("GET", "/admin/sessions"),
    ("DELETE", "/admin/sessions"),
    ("DELETE", "/admin/sessions/{family}"),
    ("GET", "/admin/audit"),
];

/// The public router (HTTPS listener).
pub fn router(state: AppState) -> Router {
    let server = &state.config.server;
    let max_body = server.max_body_bytes;
    let request_timeout = server.request_timeout;
    let protection = &state.config.protection;
    let trusted = protection.trusted();
    let public_origin = origin_of(&server.public_url);
    let proxy = state.proxy.clone();
    // the login endpoints share one per-IP bucket: a flood of logins, callbacks or
    // probes of /auth/me is refused before any provider or store is asked
    let auth = Router::new()
        .route("/login", get(sso::handlers::login))
        .route("/callback", get(sso::handlers::callback))
        .route("/me", get(sso::handlers::me))
        .route("/local", post(sso::handlers::local_login))
        .route(
            "/logout",
            get(sso::handlers::logout_page).post(sso::handlers::logout),
        )
        .route_layer(state.rate.auth.clone());
    // each `layer` wraps everything above it, so read the stack bottom-up: the last
    // layer is the first a request meets
    Router::new()
        .route("/", get(index))
        .route("/oauth2/jwks", get(jwks))
        // its own bucket: guessing client secrets is limited per IP before any lookup
        .route(
            "/oauth2/token",
            post(oauth::token::token).route_layer(state.rate.token.clone()),
        )
        .route("/oauth2/introspect", post(oauth::introspect::introspect))
        .route("/oauth2/revoke", post(oauth::revoke::revoke))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::discovery::authorization_server),
        )
        .route(
            "/.well-known/openid-configuration",
            get(oauth::discovery::openid_configuration),
        )
        .merge(config_routes(&state))
        .nest("/auth", auth)
        // everything else: forwarded to the admin cluster when a proxy route covers it,
        // 404 otherwise
        .fallback(crate::proxy::handle)
        // a cookie-carrying state change must come from our own pages (CSRF); inside
        // the metrics layer, so refusals are counted per route
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            csrf_guard(public_origin.clone(), req, next)
        }))
        // per-route counters and latency, labelled by route template
        .layer(middleware::from_fn(telemetry::record_request))
        // body size: refused up front when declared, enforced while read otherwise;
        // requests for the admin cluster have the proxy's own limit
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let proxied = req.extensions().get::<MatchedPath>().is_none()
                && proxy
                    .as_ref()
                    .is_some_and(|p| p.would_forward(req.method(), req.uri().path()));
            let max = match (&proxy, proxied) {
                (Some(p), true) => p.max_body_bytes(),
                _ => max_body,
            };
            limit_body(max, proxied, req, next)
        }))
        // a client that stalls while sending its body is cut off
        .layer(RequestBodyTimeoutLayer::new(request_timeout))
        // the time to the response head is bounded; a long-poll answers before it
        // (config_center.long_poll_timeout is validated to be shorter) and an SSE stream
        // has its head at once, so neither is cut off
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        // a panic in a handler becomes an opaque 500, not a dropped connection
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        // echo the id on the response, including on errors made by inner layers
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // one span per request with its id; headers and bodies are never recorded, as
        // they carry credentials
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        // make sure every request has an id, so every later layer and log line can carry
        // it; an id set by nginx (`$request_id`) is kept end to end
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        // first of all, drop a client-supplied id we would not want in our logs (too
        // long, odd characters)
        .layer(middleware::from_fn(sanitize_request_id))
        // who the client is (X-Forwarded-For believed only from trusted proxies), for
        // rate limits, lockouts and audit; outermost, so every layer can use it
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            protect::client_ip::resolve(trusted.clone(), req, next)
        }))
        .with_state(state)
}

/// The config center's routes; every one needs a bearer token, and each handler checks
/// the scope for its environment and application.
fn config_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route(
            "/config/v1/{env}/{app}",
            get(config_api::snapshot)
                .put(config_api::publish)
                .patch(config_api::edit),
        )
        .route("/config/v1/{env}/{app}/releases", get(config_api::history))
        .route(
            "/config/v1/{env}/{app}/releases/{version}",
            get(config_api::release),
        )
        .route("/config/v1/{env}/{app}/poll", get(config_api::poll))
        .route("/config/v1/{env}/{app}/watch", get(config_api::watch))
        .route("/config/v1/{env}/{app}/diff", get(config_api::diff))
        .route(
            "/config/v1/{env}/{app}/rollback",
            post(config_api::rollback),
        )
        .route(
            "/config/v1/{env}/{app}/gray",
            axum::routing::put(config_api::publish_gray).delete(config_api::abort_gray),
        )
        .route(
            "/config/v1/{env}/{app}/gray/promote",
            post(config_api::promote_gray),
        )
        .route_layer(BearerAuth::new(state.keys.clone()))
}

/// `scheme://host[:port]` of a URL, as browsers write `Origin`.
fn origin_of(url: &str) -> String {
    url::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default()
}

/// Refuses POST/PUT/PATCH/DELETE requests that carry a console session cookie unless
/// their `Origin` (or, without one, `Referer`) is our public origin. `SameSite=Lax`
/// already keeps the cookies off most cross-site requests; this closes the rest
/// (same-site subdomains, old browsers).
async fn csrf_guard(public_origin: String, req: Request, next: Next) -> Response {
    let unsafe_method = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if unsafe_method
        && sso::session::has_session_cookie(req.headers())
        && !sso::session::from_origin(req.headers(), &public_origin)
    {
        metrics::counter!("portcullis_csrf_rejected_total").increment(1);
        return ApiError::Forbidden {
            code: "csrf_rejected",
            description: "cross-site request refused: Origin is not this site".to_owned(),
        }
        .into_response();
    }
    next.run(req).await
}

fn request_span(req: &Request<Body>) -> tracing::Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {}", req.method(), route_of(req)),
        otel.kind = "server",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    // exported spans join the caller's trace (W3C traceparent)
    telemetry::adopt_remote_parent(&span, req.headers());
    span
}

/// The route template when the router matched one, else the path's first segment (span
/// names stay few).
fn route_of(req: &Request<Body>) -> String {
    match req.extensions().get::<MatchedPath>() {
        Some(p) => p.as_str().to_owned(),
        None => {
            let first = req.uri().path().split('/').nth(1).unwrap_or("");
            format!("/{first}")
        }
    }
}

async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let ok = req.headers().get(&REQUEST_ID).is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
    });
    if !ok {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}

async fn limit_body(max: usize, proxied: bool, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::PayloadTooLarge { limit: max }.into_response();
    }
    // undeclared (chunked) bodies are counted as they are read; extractors turn the
    // overflow into 413
    let req = req.map(|body| Body::new(http_body_util::Limited::new(body, max)));
    let response = next.run(req).await;
    // a node's own 413 is its answer to give; ours are JSON already
    if !proxied
        && response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response.headers().get(header::CONTENT_TYPE)
            != Some(&HeaderValue::from_static("application/json"))
    {
        return ApiError::PayloadTooLarge { limit: max }.into_response();
    }
    response
}

async fn index(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "name": "portcullis",
        "version": env!("CARGO_PKG_VERSION"),
        "issuer": state.config.issuer(),
    }))
}

/// `GET /oauth2/jwks`: every key that may verify a live token.
async fn jwks(State(state): State<AppState>) -> Response {
    let max_age = state.keys.jwks_max_age().as_secs();
    (
        [(header::CACHE_CONTROL, format!("public, max-age={max_age}"))],
        Json(state.keys.jwks()),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

// === admin listener ===

/// The admin router: liveness, readiness and metrics.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest(
            "/admin",
            Router::new()
                .route("/keys", get(crate::admin::key_status))
                .route(
                    "/keys/rotate",
                    axum::routing::post(crate::admin::rotate_keys),
                )
                .route(
                    "/clients",
                    get(crate::admin::clients::list).post(crate::admin::clients::create),
                )
                .route(
                    "/clients/{id}",
                    get(crate::admin::clients::show).delete(crate::admin::clients::delete),
                )
                .route(
                    "/clients/{id}/rotate-secret",
                    post(crate::admin::clients::rotate_secret),
                )
                .route(
                    "/clients/{id}/disable",
                    post(crate::admin::clients::disable),
                )
                .route("/clients/{id}/enable", post(crate::admin::clients::enable))
                .route(
                    "/sessions",
                    get(crate::admin::sessions::list).delete(crate::admin::sessions::revoke_all),
                )
                .route(
                    "/sessions/{family}",
                    axum::routing::delete(crate::admin::sessions::revoke),
                )
                .route("/audit", get(crate::admin::audit::list))
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    crate::admin::require_admin,
                )),
        )
        .fallback(not_found)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
        .with_state(state)
}

/// Alive: the process runs and serves HTTP. Says nothing about dependencies.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready: every dependency this instance needs answers.
async fn readyz(State(state): State<AppState>) -> Response {
    let report = crate::readiness::check(&state).await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(report)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.keys.record_metrics();
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
