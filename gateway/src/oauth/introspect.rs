//! `POST /oauth2/introspect` (RFC 7662). Client-authenticated. Access tokens (JWTs) are
//! introspectable by any authenticated client (resource servers check tokens they were
//! sent); refresh tokens only by the client they were issued to. Anything not active —
//! expired, revoked, malformed, someone else's refresh token — is `{"active": false}`.
//! A JWT naming a key this instance does not hold while the ring cannot be reloaded is
//! neither: 503 `temporarily_unavailable`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use keyrotation::KeyError;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::error::{ApiError, OAuthCode};
use crate::oauth::claims::AccessClaims;
use crate::oauth::client_auth;
use crate::oauth::token::{TOKEN_HINT_PARAMS, no_store, parse_form};
use crate::state::AppState;

/// The handler.
pub async fn introspect(
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
    let answer = if looks_like_jwt(&token) {
        introspect_jwt(&state, &token).await?
    } else {
        let session = state
            .refresh
            .inspect(&SecretString::from(token), state.keys.now())
            .await?;
        match session {
            Some(s) if s.client_id == client.id.as_str() => json!({
                "active": true,
                "token_type": "refresh_token",
                "client_id": s.client_id,
                "sub": s.subject,
                "scope": s.scope,
                "aud": s.audience,
                "iss": state.config.issuer(),
                "exp": s.expires_at.unix_timestamp().min(s.idle_expires_at.unix_timestamp()),
                "iat": s.last_used_at.unix_timestamp(),
                "auth_time": s.auth_time.unix_timestamp(),
                "sid": s.family,
            }),
            _ => json!({ "active": false }),
        }
    };
    let mut r = Json(answer).into_response();
    no_store(r.headers_mut());
    Ok(r)
}

fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && !token.starts_with("rt1.")
}

/// The answer for a JWT; 503 rather than `active: false` when it names a key this instance
/// does not hold and cannot reload the ring to look for (a resource server would throw a
/// valid token away).
async fn introspect_jwt(state: &AppState, token: &str) -> Result<Value, ApiError> {
    // our tokens may be for any audience a client was allowed: the audience check is
    // against the token's own `aud`; signature, issuer, expiry, algorithm and type
    // (`at+jwt`, or `JWT` while `tokens.accept_jwt_typ` is on, counted as on a bearer
    // route) are checked as everywhere, through the same path as on every bearer
    // route: a `kid` this instance does not hold yet makes it reload the ring before
    // answering `active: false`
    let mut params = state.keys.verify_params().clone();
    params.audiences = unverified_audiences(token);
    if params.audiences.is_empty() {
        return Ok(json!({ "active": false }));
    }
    match state
        .keys
        .verify_current_with::<AccessClaims>(token, &params)
        .await
    {
        // a token of a client whose tokens were cut off is no longer active
        Ok(c) if state.keys.cutoffs().refuses(&c.client_id, c.iat) => {
            Ok(json!({ "active": false }))
        }
        Ok(c) => Ok(json!({
            "active": true,
            "token_type": "Bearer",
            "client_id": c.client_id,
            "sub": c.sub,
            "scope": c.scope,
            "aud": c.aud,
            "iss": c.iss,
            "exp": c.exp,
            "iat": c.iat,
            "nbf": c.nbf,
            "jti": c.jti,
            "roles": c.roles,
        })),
        Err(e @ KeyError::RingUnavailable(_)) => Err(e.into()),
        Err(_) => Ok(json!({ "active": false })),
    }
}

fn unverified_audiences(token: &str) -> Vec<String> {
    let Some(payload) = token.split('.').nth(1) else {
        return Vec::new();
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Vec::new();
    };
    match &v["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}
