//! The one place where errors become HTTP responses.
//!
//! Every error body is JSON with a machine-readable `error` code (RFC 6749 §5.2 style) and
//! a human `error_description`. Causes from Redis, the database or Vault are logged with
//! their chain but never sent to the client: 5xx bodies are opaque.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The error codes of RFC 6749 §5.2 (and RFC 8707's `invalid_target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthCode {
    /// Malformed request: missing, repeated or invalid parameter.
    InvalidRequest,
    /// Client authentication failed (401 with `WWW-Authenticate: Basic`).
    InvalidClient,
    /// The grant (refresh token, code) is invalid, expired, revoked or not this client's.
    InvalidGrant,
    /// The client may not use this grant type.
    UnauthorizedClient,
    /// The grant type is not supported.
    UnsupportedGrantType,
    /// The requested scope is invalid or exceeds what the client may have.
    InvalidScope,
    /// The requested resource (audience) is not one the client may have.
    InvalidTarget,
    /// The token type is not supported (revocation, RFC 7009 §2.2.1).
    UnsupportedTokenType,
}

impl OAuthCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidTarget => "invalid_target",
            Self::UnsupportedTokenType => "unsupported_token_type",
        }
    }
}

/// An error a handler or middleware answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// An OAuth 2.0 endpoint error (RFC 6749 §5.2).
    #[error("{}: {description}", code.as_str())]
    OAuth {
        /// The code.
        code: OAuthCode,
        /// For humans; never names which of id or secret was wrong.
        description: String,
    },
    /// No such route or resource.
    #[error("not found")]
    NotFound,
    /// A method requests are not forwarded with (405, with `Allow`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body is larger than `server.max_body_bytes`.
    #[error("request body too large")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The request is malformed; `code` is the machine-readable reason.
    #[error("{description}")]
    BadRequest {
        /// Machine-readable reason.
        code: &'static str,
        /// For humans.
        description: String,
    },
    /// Credentials missing or wrong (`WWW-Authenticate: Bearer`).
    #[error("unauthorized")]
    Unauthorized {
        /// Machine-readable reason (`invalid_token`, `invalid_request`, …).
        code: &'static str,
        /// For humans.
        description: String,
    },
    /// No bearer token was presented (RFC 6750 §3.1: no error code in the challenge).
    #[error("no bearer token")]
    MissingBearer,
    /// The token lacks scopes the route needs (403, RFC 6750 §3.1).
    #[error("insufficient scope")]
    InsufficientScope {
        /// The scopes the route needs, space-separated.
        required: String,
    },
    /// The request conflicts with the current state.
    #[error("{description}")]
    Conflict {
        /// Machine-readable reason.
        code: &'static str,
        /// For humans.
        description: String,
    },
    /// A dependency (Redis, database, Vault, keys) is unavailable; the feature is degraded.
    #[error("{dependency} unavailable")]
    Unavailable {
        /// Which dependency, as shown to the client (`keys`, `redis`, `database`, `vault`).
        dependency: &'static str,
        /// The cause, logged and never sent.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The request is understood and refused (403).
    #[error("{description}")]
    Forbidden {
        /// Machine-readable reason (`no_role`, `csrf_rejected`, …).
        code: &'static str,
        /// For humans.
        description: String,
    },
    /// Too many requests or failed attempts: 429 with `Retry-After`.
    #[error("{description}")]
    TooManyRequests {
        /// Machine-readable reason (`rate_limited`, `too_many_attempts`).
        code: &'static str,
        /// For humans; never says whether an account exists.
        description: String,
        /// Seconds until a new attempt may succeed (at least 1).
        retry_after: u64,
    },
    /// A break-glass login with a wrong name or password (the same answer for both).
    #[error("invalid credentials")]
    InvalidCredentials,
    /// A console route without a session (401, no `WWW-Authenticate`: browsers log in
    /// at `/auth/login`, not with a challenge).
    #[error("login required")]
    LoginRequired,
    /// A proxied console route without a session, asked by a script rather than a
    /// browser page: 401 with a challenge naming where to log in.
    #[error("console session required")]
    SessionRequired,
    /// No admin node could answer (502); the cause is logged, never sent.
    #[error("bad gateway")]
    BadGateway(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The admin node did not answer in time (504).
    #[error("gateway timeout")]
    GatewayTimeout(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A bug or an unexpected failure; logged, answered with an opaque 500.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The JSON body of every error.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// Machine-readable code.
    pub error: &'a str,
    /// Human-readable explanation.
    pub error_description: String,
}

impl ApiError {
    /// An OAuth error.
    pub fn oauth(code: OAuthCode, description: impl Into<String>) -> Self {
        Self::OAuth {
            code,
            description: description.into(),
        }
    }

    /// A 400 with a code and a description.
    pub fn bad_request(code: &'static str, description: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            description: description.into(),
        }
    }

    /// A 503 for `dependency`, keeping the cause for the log.
    pub fn unavailable(
        dependency: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            dependency,
            source: Some(Box::new(source)),
        }
    }

    /// The status, machine-readable code and description this error answers with (the
    /// browser pages of the login flow render them as HTML).
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::OAuth { code, description } => (
                if *code == OAuthCode::InvalidClient {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::BAD_REQUEST
                },
                code.as_str(),
                description.clone(),
            ),
            Self::MissingBearer => (
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "this endpoint needs a bearer access token".to_owned(),
            ),
            Self::InsufficientScope { required } => (
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("the access token lacks a scope this endpoint needs: {required}"),
            ),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such resource".to_owned(),
            ),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "requests are forwarded with GET, HEAD, POST, PUT, DELETE, PATCH or OPTIONS \
                 (upper case) only"
                    .to_owned(),
            ),
            Self::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body exceeds {limit} bytes"),
            ),
            Self::BadRequest { code, description } => {
                (StatusCode::BAD_REQUEST, code, description.clone())
            }
            Self::Unauthorized { code, description } => {
                (StatusCode::UNAUTHORIZED, code, description.clone())
            }
            Self::Conflict { code, description } => {
                (StatusCode::CONFLICT, code, description.clone())
            }
            Self::Forbidden { code, description } => {
                (StatusCode::FORBIDDEN, code, description.clone())
            }
            Self::TooManyRequests {
                code, description, ..
            } => (StatusCode::TOO_MANY_REQUESTS, code, description.clone()),
            Self::InvalidCredentials => (
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "wrong user name or password".to_owned(),
            ),
            Self::LoginRequired => (
                StatusCode::UNAUTHORIZED,
                "login_required",
                "no console session; log in at /auth/login".to_owned(),
            ),
            Self::SessionRequired => (
                StatusCode::UNAUTHORIZED,
                "login_required",
                "this page needs a console session; log in at /auth/login".to_owned(),
            ),
            Self::BadGateway(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the admin cluster could not answer; try again shortly".to_owned(),
            ),
            Self::GatewayTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the admin cluster did not answer in time".to_owned(),
            ),
            Self::Unavailable { dependency, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                format!("{dependency} is unavailable; try again shortly"),
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error".to_owned(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, description) = self.parts();
        match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %chain(cause.as_ref()), "internal error")
            }
            Self::BadGateway(cause) | Self::GatewayTimeout(cause) => {
                tracing::warn!(status = status.as_u16(), error = %chain(cause.as_ref()), "proxied request failed")
            }
            Self::Unavailable {
                dependency,
                source: Some(cause),
            } => {
                tracing::warn!(dependency, error = %chain(cause.as_ref()), "dependency unavailable")
            }
            _ => tracing::debug!(status = status.as_u16(), code, "request refused"),
        }
        let mut response = (
            status,
            Json(ErrorBody {
                error: code,
                error_description: description.clone(),
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        // never cached, and `Pragma` too for HTTP/1.0 caches: RFC 6749 §5.1 asks both of
        // token responses, and a 401 from the token endpoint is one as much as a 400
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        match &self {
            Self::OAuth {
                code: OAuthCode::InvalidClient,
                ..
            } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"portcullis\", charset=\"UTF-8\""),
                );
            }
            Self::Unauthorized { code, .. } => {
                let value = format!(
                    "Bearer realm=\"portcullis\", error=\"{code}\", error_description=\"{}\"",
                    quote_safe(&description)
                );
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::MethodNotAllowed => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
                );
            }
            Self::MissingBearer => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"portcullis\""),
                );
            }
            Self::InsufficientScope { required } => {
                let value = format!(
                    "Bearer realm=\"portcullis\", error=\"insufficient_scope\", scope=\"{}\"",
                    quote_safe(required)
                );
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::SessionRequired => {
                // RFC 9110 §11.6.1: a 401 carries a challenge; this one names the login
                // page, since a console session is made by logging in, not by a header
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Session realm=\"portcullis\", login_uri=\"/auth/login\"",
                    ),
                );
            }
            Self::Unavailable { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::TooManyRequests { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from((*retry_after).max(1)),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<keyrotation::KeyError> for ApiError {
    fn from(e: keyrotation::KeyError) -> Self {
        use keyrotation::KeyError as K;
        match e {
            e @ (K::NoActiveKey | K::SignerNotAccepted { .. }) => {
                Self::unavailable("signing keys", e)
            }
            // a token naming a key the ring held lacks, while the ring cannot be reloaded:
            // it may be valid, so 503 (retry later), never 401 (throw the token away)
            K::RingUnavailable(_) => Self::unavailable("key ring", e),
            K::ReadOnly => Self::Conflict {
                code: "rotation_external",
                description:
                    "this instance only reads the key ring (keys.rotation = \"external\"); \
                              rotate with `portcullis keys rotate`"
                        .to_owned(),
            },
            K::NotInRing(kid) => Self::bad_request(
                "unknown_kid",
                format!("the key ring holds no key with id {kid}"),
            ),
            e if e.is_source_unavailable() => Self::unavailable("key source", e),
            e if e.is_token_rejection() => Self::Unauthorized {
                code: "invalid_token",
                description: "the access token is invalid".to_owned(),
            },
            // no ring yet (the rotation job has not made one), or other writers kept
            // winning: both pass, so a retry is the answer
            e @ (K::NoRing | K::TooManyConflicts(_)) => Self::unavailable("key ring", e),
            // the key source refused (its policy): the operator's to fix, and named so
            K::SourceDenied { .. } => Self::Forbidden {
                code: "key_source_denied",
                description: "the key source refused the operation: the Vault policy of this \
                              instance does not allow it"
                    .to_owned(),
            },
            // any other failure of the key source (Vault answering 429 or 5xx, say)
            e @ K::Source { .. } => Self::unavailable("key source", e),
            e => Self::Internal(Box::new(e)),
        }
    }
}

impl From<crate::audit::AuditError> for ApiError {
    fn from(e: crate::audit::AuditError) -> Self {
        use crate::audit::AuditError as A;
        match e {
            A::Filter(f) => Self::bad_request("invalid_request", f.to_string()),
            A::Store(e) => Self::unavailable("database", e),
        }
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        Self::unavailable("database", e)
    }
}

impl From<crate::clients::ClientError> for ApiError {
    fn from(e: crate::clients::ClientError) -> Self {
        use crate::clients::ClientError as C;
        match e {
            C::NotFound => Self::NotFound,
            C::AlreadyExists => Self::Conflict {
                code: "already_exists",
                description: "a client with that id exists already".to_owned(),
            },
            e @ C::ReservedId(_) => Self::Conflict {
                code: "reserved_client_id",
                description: e.to_string(),
            },
            C::InvalidClient => {
                Self::oauth(OAuthCode::InvalidClient, "client authentication failed")
            }
            C::Invalid(field, reason) => {
                Self::bad_request("invalid_request", format!("invalid {field}: {reason}"))
            }
            C::UnauthorizedGrant(g) => Self::oauth(
                OAuthCode::UnauthorizedClient,
                format!("this client may not use the {} grant", g.as_str()),
            ),
            C::ScopeNotAllowed(extra) => Self::oauth(
                OAuthCode::InvalidScope,
                format!("scope not allowed for this client: {extra}"),
            ),
            C::AudienceNotAllowed(a) => Self::oauth(
                OAuthCode::InvalidTarget,
                format!("resource not allowed for this client: {}", a.as_str()),
            ),
            e @ C::Db(_) => Self::unavailable("database", e),
            e => Self::Internal(Box::new(e)),
        }
    }
}

impl From<crate::refresh::RefreshError> for ApiError {
    fn from(e: crate::refresh::RefreshError) -> Self {
        if e.is_invalid_grant() {
            Self::oauth(
                OAuthCode::InvalidGrant,
                "the refresh token is invalid, expired or revoked",
            )
        } else if e.is_unavailable() {
            Self::unavailable("refresh-token store", e)
        } else {
            Self::Internal(Box::new(e))
        }
    }
}

impl From<config_center::ModelError> for ApiError {
    fn from(e: config_center::ModelError) -> Self {
        Self::bad_request("invalid_request", e.to_string())
    }
}

impl From<config_center::StoreError> for ApiError {
    fn from(e: config_center::StoreError) -> Self {
        match e {
            config_center::StoreError::Invalid(m) => m.into(),
            config_center::StoreError::Refused(reason) => {
                Self::bad_request("invalid_setting", reason)
            }
            config_center::StoreError::Conflict { expected, current } => Self::Conflict {
                code: "version_conflict",
                description: format!(
                    "the write expected version {expected} to be current, but it is {current}"
                ),
            },
            config_center::StoreError::NotFound { .. } => Self::NotFound,
            config_center::StoreError::GrayInProgress(v) => Self::Conflict {
                code: "gray_in_progress",
                description: format!("gray release {v} is in progress; promote or abort it first"),
            },
            config_center::StoreError::NoGray => Self::Conflict {
                code: "no_gray_release",
                description: "no gray release is in progress".to_owned(),
            },
            e @ config_center::StoreError::Crypto(_) => {
                Self::unavailable("config encryption key", e)
            }
            e
            @ (config_center::StoreError::Database(_) | config_center::StoreError::Migrate(_)) => {
                Self::unavailable("database", e)
            }
            e => Self::Internal(Box::new(e)),
        }
    }
}

impl From<crate::sso::SsoError> for ApiError {
    fn from(e: crate::sso::SsoError) -> Self {
        use crate::sso::SsoError as S;
        let failed = |e: &S| Self::bad_request("login_failed", format!("the login failed: {e}"));
        match e {
            S::Disabled => Self::bad_request(
                "sso_not_configured",
                "no identity provider is configured on this instance",
            ),
            S::UnknownProvider => Self::bad_request(
                "unknown_provider",
                "name a configured identity provider with ?provider=",
            ),
            S::InvalidRedirect => Self::bad_request(
                "invalid_redirect",
                "redirect must be a relative path on this site, such as /jobs",
            ),
            S::InvalidState => Self::bad_request(
                "invalid_state",
                "this login is invalid, expired or already used; start again at /auth/login",
            ),
            S::ProviderDenied(_) => Self::Forbidden {
                code: "login_failed",
                description: "the identity provider did not complete the login".to_owned(),
            },
            S::IdToken(ref inner) => {
                Self::bad_request("invalid_id_token", format!("the login failed: {inner}"))
            }
            S::NoRole => Self::Forbidden {
                code: "no_role",
                description: "your account has no role in the scheduler console; \
                              ask an administrator to grant you one"
                    .to_owned(),
            },
            e @ (S::IssuerMismatch
            | S::MissingCode
            | S::CodeRejected(_)
            | S::NoIdToken
            | S::UserinfoMismatch) => failed(&e),
            e @ (S::ProviderUnavailable(_) | S::ProviderMisconfigured(_)) => {
                Self::unavailable("identity provider", e)
            }
            e @ S::Store(_) => Self::unavailable("login-state store", e),
            e @ S::Config(_) => Self::Internal(Box::new(e)),
            // Back-Channel Logout 1.0 §2.8: a refused logout token is a 400 OAuth error
            S::LogoutToken(inner) => Self::oauth(OAuthCode::InvalidRequest, inner.to_string()),
            S::ProviderSessionEnded => Self::Forbidden {
                code: "provider_session_ended",
                description: "your session at the identity provider ended while this login \
                              was finishing; sign in again"
                    .to_owned(),
            },
            S::InvalidLogoutRequest(why) => Self::bad_request("invalid_request", why),
            S::UnknownIssuer => Self::bad_request(
                "unknown_issuer",
                "iss is not the issuer of a configured identity provider",
            ),
            S::FrontchannelDisabled => Self::Forbidden {
                code: "frontchannel_logout_disabled",
                description: "front-channel logout is not enabled for this identity provider"
                    .to_owned(),
            },
        }
    }
}

impl From<crate::config_api::HubError> for ApiError {
    fn from(e: crate::config_api::HubError) -> Self {
        match e {
            crate::config_api::HubError::Store(s) => s.into(),
            crate::config_api::HubError::Keys(k) => k.into(),
            e => Self::Internal(Box::new(e)),
        }
    }
}

impl From<crate::proxy::ProxyError> for ApiError {
    fn from(e: crate::proxy::ProxyError) -> Self {
        use crate::proxy::ProxyError as P;
        use crate::proxy::policy::Unroutable;
        match e {
            e @ P::NoNode => Self::unavailable("admin cluster", e),
            e @ P::Failed { .. } => Self::BadGateway(Box::new(e)),
            e @ P::Timeout { .. } => Self::GatewayTimeout(Box::new(e)),
            P::Unroutable(Unroutable::Path(reason)) => {
                Self::bad_request("invalid_path", reason.to_string())
            }
            P::Unroutable(Unroutable::Method) => Self::MethodNotAllowed,
            P::BodyTooLarge { limit } => Self::PayloadTooLarge { limit },
            e @ P::ClientBody(_) => Self::bad_request("invalid_request", format!("{e}")),
        }
    }
}

impl From<crate::protect::lockout::LockoutUnavailable> for ApiError {
    fn from(e: crate::protect::lockout::LockoutUnavailable) -> Self {
        Self::unavailable("login-attempt counters", e)
    }
}

impl ApiError {
    /// The refusal of a locked or backing-off account or client: the same words whether
    /// or not it exists.
    pub fn too_many_attempts(refusal: crate::protect::Refusal) -> Self {
        Self::TooManyRequests {
            code: "too_many_attempts",
            description: "too many failed attempts; try again later".to_owned(),
            retry_after: refusal.retry_after.as_secs_f64().ceil() as u64,
        }
    }
}

/// `a: b: c` from an error and its sources, for logs.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn quote_safe(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_errors_that_pass_are_503_a_refusing_source_403_a_corrupt_ring_500() {
        let status = |e: keyrotation::KeyError| ApiError::from(e).parts().0;
        let source = || ("vault:secret/portcullis".to_owned(), "x".to_owned());
        for e in [
            keyrotation::KeyError::NoRing,
            keyrotation::KeyError::TooManyConflicts(5),
            keyrotation::KeyError::Source {
                source_name: source().0,
                message: "429 Too Many Requests".to_owned(),
            },
            keyrotation::KeyError::SourceUnavailable {
                source_name: source().0,
                message: source().1,
            },
        ] {
            assert_eq!(status(e), StatusCode::SERVICE_UNAVAILABLE);
        }
        let denied = ApiError::from(keyrotation::KeyError::SourceDenied {
            source_name: source().0,
            message: source().1,
        });
        assert_eq!(denied.parts().0, StatusCode::FORBIDDEN);
        assert_eq!(denied.parts().1, "key_source_denied");
        assert_eq!(
            status(keyrotation::KeyError::CorruptRing("bad".to_owned())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
