//! `POST /oauth2/revoke` (RFC 7009). Client-authenticated. Revoking a refresh token revokes
//! its whole family (the session). Access tokens are short-lived JWTs verified without a
//! lookup, so they cannot be revoked one by one: presenting one answers
//! `unsupported_token_type` (revoke its refresh token or disable its client instead).
//! An unknown or malformed token answers 200, as the RFC requires.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;

use crate::audit::AuditEvent;
use crate::error::{ApiError, OAuthCode};
use crate::oauth::client_auth;
use crate::oauth::token::{TOKEN_HINT_PARAMS, no_store, parse_form};
use crate::refresh::{InvalidReason, RefreshError};
use crate::state::AppState;

/// The handler.
pub async fn revoke(
    State(state): State<AppState>,
    axum::extract::Extension(crate::protect::ClientIp(ip)): axum::extract::Extension<
        crate::protect::ClientIp,
    >,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut form = parse_form(&headers, &body, TOKEN_HINT_PARAMS)?;
    let presented = client_auth::presented(&headers, &mut form)?;
    let token = form
        .take("token")
        .ok_or_else(|| ApiError::oauth(OAuthCode::InvalidRequest, "token is required"))?;
    let client = client_auth::authenticate(&state, &presented, Some(ip)).await?;
    if token.split('.').count() == 3 && !token.starts_with("rt1.") {
        return Err(ApiError::oauth(
            OAuthCode::UnsupportedTokenType,
            "access tokens are short-lived and cannot be revoked one by one; revoke the refresh token",
        ));
    }
    match state
        .refresh
        .revoke_token(&SecretString::from(token), client.id.as_str())
        .await
    {
        Ok(revoked) => {
            if revoked {
                metrics::counter!("portcullis_refresh_revocations_total", "by" => "client")
                    .increment(1);
                state.audit.record(AuditEvent {
                    at: state.keys.now(),
                    actor: format!("client:{}", client.id),
                    action: "refresh.revoke".to_owned(),
                    target: client.id.to_string(),
                    source_ip: Some(ip.to_string()),
                    detail: serde_json::json!({ "via": "rfc7009" }).into(),
                });
            }
        }
        Err(RefreshError::Invalid(InvalidReason::WrongClient)) => {
            return Err(ApiError::oauth(
                OAuthCode::UnauthorizedClient,
                "the token was not issued to this client",
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let mut r = StatusCode::OK.into_response();
    no_store(r.headers_mut());
    Ok(r)
}
