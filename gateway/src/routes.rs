//! The two routers: the public HTTPS one and the admin (ops) one. Built by plain
//! functions so tests can drive them with `oneshot` as well as over real sockets.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::oauth;
use crate::sso;
use serde_json::json;
use tower::Layer as _;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use crate::authn::BearerAuth;
use crate::config_api;
use crate::edge::{EdgeLayer, Guard, GuardLayer};
use crate::error::ApiError;
use crate::request_span::RequestSpanLayer;
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
    ("POST", "/auth/backchannel-logout"),
    ("GET", "/auth/frontchannel-logout"),
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
    ("POST", "/admin/clients/{id}/revoke-tokens"),
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
    // after routing, on every route: the body limit (the proxy's own for what it
    // forwards), the CSRF check, per-route metrics and the span's name
    let guard = GuardLayer::new(max_body, public_origin, proxy.clone(), request_timeout);
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
        .route_layer(state.rate.auth.clone())
        // the login, callback and sign-out pages are never shown inside another site's
        // frame (a one-button sign-out page or a "Sign in again" link could otherwise be
        // clicked through an invisible frame); the front-channel logout below sets its
        // own policy, framed by its provider only
        .route_layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .route_layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        ))
        // not under the login bucket (one provider may post the logouts of many users at
        // once, from one address) but under the token endpoint's larger one: anyone may
        // post here, and a token naming an unknown key makes the provider's JWKS fetched
        .route(
            "/backchannel-logout",
            post(sso::handlers::backchannel_logout).route_layer(state.rate.token.clone()),
        )
        // the same for the front channel: a provider's logout page loads it for each of
        // its users who sign out, and anyone may request it
        .route(
            "/frontchannel-logout",
            get(sso::handlers::frontchannel_logout).route_layer(state.rate.token.clone()),
        );
    let routes = Router::new()
        .route("/", get(index))
        .route("/oauth2/jwks", get(jwks))
        // the client-authenticated endpoints are limited per IP before any lookup, so
        // guessing client secrets (or probing made-up client ids, each a database read)
        // is bounded at each; introspection and revocation have buckets of their own,
        // sized as the token endpoint's, so a resource server's calls do not spend the
        // token requests of the executors behind the same address
        .route(
            "/oauth2/token",
            post(oauth::token::token).route_layer(state.rate.token.clone()),
        )
        .route(
            "/oauth2/introspect",
            post(oauth::introspect::introspect).route_layer(state.rate.introspection.clone()),
        )
        .route(
            "/oauth2/revoke",
            post(oauth::revoke::revoke).route_layer(state.rate.introspection.clone()),
        )
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
        .layer(guard.clone())
        .with_state(state.clone());
    // a request outside the paths Portcullis serves itself can only be the proxy's: it
    // skips the router (and its per-route boxing) for the same guard and handler the
    // router's fallback would have given it
    let dispatch = Dispatch {
        proxied: proxy.is_some().then(|| guard.layer(Forward(state))),
        own: routes,
    };
    // Everything that does not need the route runs around the router, composed once:
    // `Router::layer` would box each of these around every route and clone it per call.
    // The first layer listed is the first a request meets.
    let stack = ServiceBuilder::new()
        // who the client is (X-Forwarded-For believed only from trusted proxies), for
        // rate limits, lockouts and audit; and a client-supplied request id we would not
        // want in our logs (too long, odd characters) is dropped
        .layer(EdgeLayer::new(trusted))
        // make sure every request has an id, so every later layer and log line can carry
        // it; an id set by nginx (`$request_id`) is kept end to end
        .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId))
        // one span per request with its id; headers and bodies are never recorded, as
        // they carry credentials
        .layer(RequestSpanLayer::new(request_span))
        // echo the id on the response, including on errors made by inner layers
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // a panic in a handler becomes an opaque 500, not a dropped connection
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        // the time to the response head is bounded; a long-poll answers before it
        // (config_center.long_poll_timeout is validated to be shorter) and an SSE stream
        // has its head at once, so neither is cut off
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        // a client that stalls while sending its body is cut off
        .layer(RequestBodyTimeoutLayer::new(request_timeout))
        .service(dispatch);
    Router::new().fallback_service(stack)
}

/// Whether Portcullis serves `path` itself: `/` and everything under the prefixes no proxy
/// route may overlap (`proxy::settings`), which hold every public route.
fn served_here(path: &str) -> bool {
    path == "/"
        || crate::proxy::settings::RESERVED_PREFIXES
            .iter()
            .any(|p| path.starts_with(p))
}

/// Sends a request for a path Portcullis serves itself to its router, and any other to
/// the proxy's handler behind the route guard: what the router's fallback does, without
/// the router.
#[derive(Clone)]
struct Dispatch {
    own: Router,
    /// `None` when no proxy is configured: then everything goes to the router.
    proxied: Option<Guard<Forward>>,
}

impl<B> tower::Service<axum::http::Request<B>> for Dispatch
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::Either<
        <Router as tower::Service<Request>>::Future,
        <Guard<Forward> as tower::Service<Request>>::Future,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // both are always ready (the router and the guard around a handler)
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        use futures::future::Either;
        let req = req.map(Body::new);
        match &mut self.proxied {
            Some(proxied) if !served_here(req.uri().path()) => {
                Either::Right(tower::Service::call(proxied, req))
            }
            _ => Either::Left(tower::Service::call(&mut self.own, req)),
        }
    }
}

/// The proxy's handler as a service.
#[derive(Clone)]
struct Forward(AppState);

impl tower::Service<Request> for Forward {
    type Response = Response;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move { Ok(crate::proxy::handle(State(state), req).await) })
    }
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

fn request_span(req: &Request<Body>) -> tracing::Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    // named by its route once the router has matched it (`edge::Guard`)
    let span = tracing::info_span!(
        "request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    // exported spans join the caller's trace (W3C traceparent)
    telemetry::adopt_remote_parent(&span, req.headers());
    span
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
                    "/clients/{id}/revoke-tokens",
                    post(crate::admin::clients::revoke_tokens),
                )
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
                .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId))
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
    state.audit.record_metrics();
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

/// A request id for a request that came without one: a random (v4) UUID, written on the
/// stack and copied once into the header value.
#[derive(Debug, Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let mut buf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        axum::http::HeaderValue::from_str(id)
            .ok()
            .map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_public_route_is_served_here_and_nothing_next_to_them_is() {
        // a public route outside `served_here` would be sent to the proxy, not answered
        for (_, path) in PUBLIC_ROUTES {
            assert!(served_here(path), "{path} would bypass the router");
        }
        for path in [
            "/api/jobs",
            "/oauth2",
            "/authx/login",
            "/config/v2/x",
            "//oauth2/token",
        ] {
            assert!(!served_here(path), "{path}");
        }
    }
}
