//! `POST /oauth2/token` (RFC 6749 §3.2): parses the form strictly, authenticates the
//! client, and hands over to the grant's own function. Every answer carries
//! `Cache-Control: no-store` and `Pragma: no-cache`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use std::net::IpAddr;

use crate::audit::{AuditEvent, Detail};
use crate::clients::{Audience, Client, GrantType, ScopeSet};
use crate::error::{ApiError, OAuthCode};
use crate::oauth::claims::{AccessClaims, Audiences};
use crate::oauth::client_auth;
use crate::oauth::form::Form;
use crate::state::AppState;

/// A successful token response (RFC 6749 §5.1).
#[derive(Serialize)]
pub struct TokenResponse {
    /// The JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until `exp`.
    pub expires_in: u64,
    /// Granted scope.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// A rotated refresh token, for the `refresh_token` grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl IntoResponse for TokenResponse {
    fn into_response(self) -> Response {
        let mut r = Json(self).into_response();
        no_store(r.headers_mut());
        r
    }
}

/// Marks a response as never to be cached (RFC 6749 §5.1).
pub fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The parameters `POST /oauth2/token` reads.
pub const TOKEN_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "resource",
    "refresh_token",
];

/// The parameters introspection and revocation read (RFC 7662 §2.1, RFC 7009 §2.1).
pub const TOKEN_HINT_PARAMS: &[&str] = &["token", "token_type_hint", "client_id", "client_secret"];

/// Parses an OAuth form body: the content type must be
/// `application/x-www-form-urlencoded`; the parameters in `known` may not repeat and must
/// be UTF-8; every other parameter is ignored (RFC 6749 §3.1).
pub fn parse_form(headers: &HeaderMap, body: &Bytes, known: &[&str]) -> Result<Form, ApiError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(ApiError::oauth(
            OAuthCode::InvalidRequest,
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    Form::parse(body, known).map_err(|e| ApiError::oauth(OAuthCode::InvalidRequest, e.to_string()))
}

/// The handler.
pub async fn token(
    State(state): State<AppState>,
    axum::extract::Extension(crate::protect::ClientIp(ip)): axum::extract::Extension<
        crate::protect::ClientIp,
    >,
    headers: HeaderMap,
    body: Bytes,
) -> Result<TokenResponse, ApiError> {
    let mut form = parse_form(&headers, &body, TOKEN_PARAMS)?;
    let grant = form
        .take("grant_type")
        .ok_or_else(|| ApiError::oauth(OAuthCode::InvalidRequest, "grant_type is required"))?;
    let presented = client_auth::presented(&headers, &mut form)?;
    let grant = match grant.as_str() {
        "client_credentials" => GrantType::ClientCredentials,
        "refresh_token" => GrantType::RefreshToken,
        _ => {
            return Err(ApiError::oauth(
                OAuthCode::UnsupportedGrantType,
                "supported grant types: client_credentials, refresh_token",
            ));
        }
    };
    let client = client_auth::authenticate(&state, &presented, Some(ip)).await?;
    if client.id.as_str() == state.sso.settings().console_client_id {
        // registered before that id was refused: it would trade console sessions' refresh
        // cookies for bearer tokens carrying the users' roles
        return Err(ApiError::oauth(
            OAuthCode::UnauthorizedClient,
            "this client id is sso.console_client_id, reserved for console sessions; \
             register the client under another id",
        ));
    }
    client.check_grant(grant)?;
    let response = match grant {
        GrantType::ClientCredentials => client_credentials(&state, &client, &mut form, ip)?,
        GrantType::RefreshToken => {
            super::refresh_grant::refresh(&state, &client, &mut form, ip).await?
        }
        GrantType::AuthorizationCode => {
            return Err(ApiError::oauth(
                OAuthCode::UnsupportedGrantType,
                "supported grant types: client_credentials, refresh_token",
            ));
        }
    };
    issued_counter(grant).increment(1);
    Ok(response)
}

/// `portcullis_tokens_issued_total` for `grant`, looked up in the registry once per grant
/// (on first use, after the recorder is installed) rather than once per token.
fn issued_counter(grant: GrantType) -> &'static metrics::Counter {
    static ISSUED: [std::sync::OnceLock<metrics::Counter>; 3] =
        [const { std::sync::OnceLock::new() }; 3];
    let slot = match grant {
        GrantType::ClientCredentials => 0,
        GrantType::RefreshToken => 1,
        GrantType::AuthorizationCode => 2,
    };
    ISSUED[slot].get_or_init(
        || metrics::counter!("portcullis_tokens_issued_total", "grant" => grant.as_str()),
    )
}

/// RFC 6749 §4.4: a token for the client itself.
fn client_credentials(
    state: &AppState,
    client: &Client,
    form: &mut Form,
    source_ip: IpAddr,
) -> Result<TokenResponse, ApiError> {
    let requested = requested_scope(form)?;
    let scope = client.grant_scopes(&requested)?;
    let resource = requested_resource(form)?;
    let audience = client
        .audience_for(resource.as_ref())?
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| state.config.issuer());
    let lifetime = access_token_lifetime(state, client);
    mint(
        state,
        AccessGrant {
            subject: client.id.as_str().to_owned(),
            client_id: client.id.as_str().to_owned(),
            audiences: vec![audience],
            scope: scope.to_string(),
            roles: Vec::new(),
            session: None,
            lifetime,
            grant: GrantType::ClientCredentials,
            source_ip,
        },
        None,
    )
}

/// The lifetime of `client`'s access tokens: its own, else `tokens.access_token_lifetime`;
/// never more than `keys.overlap` less `tokens.leeway` ([`crate::config::Config::max_token_lifetime`]).
/// Creating or changing a client refuses a longer lifetime, so only one stored before the
/// overlap was shortened is capped here (`expires_in` says so).
pub fn access_token_lifetime(state: &AppState, client: &Client) -> std::time::Duration {
    client
        .access_token_lifetime
        .unwrap_or(state.config.tokens.access_token_lifetime)
        .min(state.config.max_token_lifetime())
}

/// The `scope` parameter, parsed; absent means "everything allowed".
pub fn requested_scope(form: &mut Form) -> Result<ScopeSet, ApiError> {
    match form.take("scope") {
        None => Ok(ScopeSet::new()),
        Some(s) => ScopeSet::parse(&s)
            .map_err(|_| ApiError::oauth(OAuthCode::InvalidScope, "scope is malformed")),
    }
}

/// The `resource` parameter (RFC 8707), parsed; absent means "the default audience". A
/// value that is no valid audience is `invalid_target`; a repeated one was refused with
/// `invalid_request` when the form was parsed (one audience per token).
pub fn requested_resource(form: &mut Form) -> Result<Option<Audience>, ApiError> {
    form.take("resource")
        .map(|r| {
            Audience::parse(&r).map_err(|_| {
                ApiError::oauth(
                    OAuthCode::InvalidTarget,
                    "resource is not a valid URI or name",
                )
            })
        })
        .transpose()
}

/// What an access token is for.
pub struct AccessGrant {
    /// `sub`.
    pub subject: String,
    /// `client_id`.
    pub client_id: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `scope`.
    pub scope: String,
    /// `roles`.
    pub roles: Vec<String>,
    /// `sid`.
    pub session: Option<String>,
    /// Lifetime.
    pub lifetime: std::time::Duration,
    /// The grant it is issued by (for the audit trail).
    pub grant: GrantType,
    /// Who asked (for the audit trail).
    pub source_ip: IpAddr,
}

/// The detail of `token.issue`, written straight from the claims (one per token issued:
/// no `serde_json::Value` built and dropped per token). Fields sorted, as a `Value`'s are.
#[derive(Serialize)]
struct IssueDetail<'a> {
    aud: &'a Audiences,
    exp: i64,
    grant: &'static str,
    scope: &'a str,
    sid: Option<&'a str>,
    subject: &'a str,
}

/// `Ok` when a key can sign now, else the 503 [`mint`] would answer (`signing keys`
/// unavailable). A refresh checks this before it rotates: a rotation whose access token
/// then cannot be signed leaves the client holding a used-up token, whose next use past
/// the grace window counts as re-use and revokes the whole session. What remains is the
/// instant between this check and the signature (a key retiring, or a ring being swapped
/// in, in between); a retry within the grace window then gets the same successor.
pub fn ensure_can_sign(state: &AppState) -> Result<(), ApiError> {
    state.keys.check_can_issue().map_err(Into::into)
}

/// Signs an access token, records `token.issue` in the audit trail (the token's id, never
/// the token) and builds the response.
pub fn mint(
    state: &AppState,
    grant: AccessGrant,
    refresh_token: Option<SecretString>,
) -> Result<TokenResponse, ApiError> {
    let now = state.keys.now().unix_timestamp();
    let lifetime = i64::try_from(grant.lifetime.as_secs()).unwrap_or(i64::MAX);
    let (access_token, claims) = state
        .keys
        .sign_access(now.saturating_add(lifetime), |exp| AccessClaims {
            iss: state.config.issuer(),
            sub: grant.subject,
            aud: Audiences::from_vec(grant.audiences),
            exp,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: grant.scope,
            client_id: grant.client_id,
            roles: grant.roles,
            sid: grant.session,
        })?;
    state.audit.record(AuditEvent {
        at: state.keys.now(),
        actor: format!("client:{}", claims.client_id),
        action: "token.issue".to_owned(),
        target: claims.jti.clone(),
        source_ip: Some(grant.source_ip.to_string()),
        detail: Detail::of(&IssueDetail {
            aud: &claims.aud,
            exp: claims.exp,
            grant: grant.grant.as_str(),
            scope: &claims.scope,
            sid: claims.sid.as_deref(),
            subject: &claims.sub,
        }),
    });
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: u64::try_from(claims.exp.saturating_sub(now)).unwrap_or_default(),
        scope: claims.scope,
        refresh_token: refresh_token.map(|t| t.expose_secret().to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_detail_is_stored_as_its_value_would_be() {
        let aud = Audiences::from_vec(vec!["a".to_owned(), "b\"c".to_owned()]);
        for sid in [None, Some("s-1")] {
            let typed = Detail::of(&IssueDetail {
                aud: &aud,
                exp: 1_700_000_000,
                grant: "client_credentials",
                scope: "jobs:run jobs:read",
                sid,
                subject: "svc",
            });
            let value: Detail = serde_json::json!({
                "grant": "client_credentials",
                "subject": "svc",
                "scope": "jobs:run jobs:read",
                "aud": aud,
                "exp": 1_700_000_000,
                "sid": sid,
            })
            .into();
            assert_eq!(typed.as_str(), value.as_str());
        }
    }
}
