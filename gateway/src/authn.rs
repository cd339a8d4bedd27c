//! Bearer-token authentication as a tower layer, for every route that serves services,
//! executors and console users (the proxy, the config API, the admin API).
//!
//! The layer takes the token from `Authorization: Bearer …` (RFC 6750 §2.1; no query or
//! body tokens), verifies it against the live key ring — `kid` among published keys (a
//! `kid` this instance does not hold yet makes it reload the ring first, rate-limited),
//! algorithm pinned by configuration, `iss`, `aud`, `exp` and `nbf` with leeway — checks
//! the route's required scopes, and hands the handler a [`Principal`] in the request
//! extensions. Refusals follow RFC 6750 §3: 401 with `WWW-Authenticate: Bearer` (with
//! `error="invalid_token"` when a token was presented), 403 `insufficient_scope` naming
//! the scopes needed. A token naming a key this instance does not hold while it cannot
//! reload the ring is not refused: 503 `temporarily_unavailable`, no challenge.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use tower::{Layer, Service};

use keyrotation::KeyError;

use crate::error::ApiError;
use crate::keys::KeyService;
use crate::verified::VerifiedAccess;

/// Who a verified request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: the client id for service tokens, the user for console sessions.
    pub subject: String,
    /// The client the token was issued to.
    pub client_id: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Console roles (users only).
    pub roles: Vec<String>,
    /// The token's `jti`.
    pub token_id: String,
    /// The token's expiry (unix seconds).
    pub expires_at: i64,
    /// When the token was issued (unix seconds): what a cutoff of its client compares
    /// ([`crate::cutoff`]).
    pub issued_at: i64,
}

impl Principal {
    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The audit actor: `user:<sub>` for a console user's token (it carries roles),
    /// `client:<sub>` for a client's own.
    pub fn actor(&self) -> String {
        if self.roles.is_empty() {
            format!("client:{}", self.subject)
        } else {
            format!("user:{}", self.subject)
        }
    }
}

/// Verifies the bearer token of a request's `Authorization` header and checks that it
/// carries every scope in `required`.
pub async fn authenticate(
    keys: &KeyService,
    authorization: Option<&header::HeaderValue>,
    required: &[String],
) -> Result<Principal, ApiError> {
    let verified = verify_bearer(keys, authorization, required).await?;
    let claims = &verified.claims;
    Ok(Principal {
        subject: claims.sub.clone(),
        client_id: claims.client_id.clone(),
        scopes: verified.scopes.clone(),
        roles: claims.roles.clone(),
        token_id: claims.jti.clone(),
        expires_at: claims.exp,
        issued_at: claims.iat,
    })
}

/// [`authenticate`] without making a [`Principal`]: the verification as remembered,
/// shared with every request that presents the same token (the proxy reads it as is).
pub async fn verify_bearer(
    keys: &KeyService,
    authorization: Option<&header::HeaderValue>,
    required: &[String],
) -> Result<Arc<VerifiedAccess>, ApiError> {
    let token = authorization
        .and_then(bearer_token)
        .ok_or(ApiError::MissingBearer)?;
    let verified = keys
        .verify_access_current(token)
        .await
        .map_err(|e| match e {
            // the token names a key this instance could not reload the ring to look for:
            // 503 without a challenge, so that the client keeps its token and retries
            e @ KeyError::RingUnavailable(_) => {
                metrics::counter!("portcullis_bearer_rejections_total", "reason" => "keys_unavailable")
                    .increment(1);
                ApiError::from(e)
            }
            e => {
                metrics::counter!("portcullis_bearer_rejections_total", "reason" => "invalid")
                    .increment(1);
                tracing::debug!(error = %e, "bearer token refused");
                ApiError::Unauthorized {
                    code: "invalid_token",
                    description: "the access token is invalid or expired".to_owned(),
                }
            }
        })?;
    if !required.iter().all(|r| verified.scopes.contains(r)) {
        metrics::counter!("portcullis_bearer_rejections_total", "reason" => "scope").increment(1);
        return Err(ApiError::InsufficientScope {
            required: required.join(" "),
        });
    }
    Ok(verified)
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750 §2.1; the scheme in
/// any case), or `None` for any other value.
pub fn bearer_token(value: &header::HeaderValue) -> Option<&str> {
    let (scheme, rest) = value.to_str().ok()?.split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

// === BearerAuth ===

/// The layer: `Router::new().route(...).route_layer(BearerAuth::new(keys).require(&["jobs:run"]))`.
#[derive(Clone)]
pub struct BearerAuth {
    keys: KeyService,
    required: Arc<[String]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl BearerAuth {
    /// Requires a valid token and no particular scope.
    pub fn new(keys: KeyService) -> Self {
        Self {
            keys,
            required: Arc::from(Vec::new()),
        }
    }

    /// Requires every one of `scopes` as well.
    pub fn require(mut self, scopes: &[&str]) -> Self {
        self.required = scopes.iter().map(|s| (*s).to_owned()).collect();
        self
    }
}

impl<S> Layer<S> for BearerAuth {
    type Service = BearerAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuthService {
            inner,
            auth: self.clone(),
        }
    }
}

/// The service [`BearerAuth`] wraps around a route.
#[derive(Clone, Debug)]
pub struct BearerAuthService<S> {
    inner: S,
    auth: BearerAuth,
}

impl<S> Service<Request> for BearerAuthService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // the clone that was polled ready is the one that must serve
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let verdict = authenticate(
                &auth.keys,
                req.headers().get(header::AUTHORIZATION),
                &auth.required,
            )
            .await;
            match verdict {
                Ok(principal) => {
                    req.extensions_mut().insert(principal);
                    ready.call(req).await
                }
                Err(e) => Ok(e.into_response()),
            }
        })
    }
}
