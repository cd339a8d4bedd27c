//! The console session: cookies and what they carry.
//!
//! - `__Host-portcullis-rt`: a refresh token of the refresh store (one family per login,
//!   subject `<provider>:<sub>`, client `sso.console_client_id`);
//! - `__Host-portcullis-at`: a short-lived access token signed by our keys, with the
//!   user's roles; renewed from the refresh cookie when it has expired;
//! - `__Host-portcullis-idt`: the provider's ID token, only for `id_token_hint` at logout,
//!   and only when it fits in a cookie ([`MAX_COOKIE_BYTES`]);
//! - `__Host-portcullis-login-<h>`: the `state` of one login in progress, `<h>` derived
//!   from that `state` (one cookie per pending login, so logins started in several tabs at
//!   once do not overwrite each other; at most [`MAX_PENDING_LOGINS`] per browser).
//!
//! All `HttpOnly; Secure; SameSite=Lax; Path=/` with the `__Host-` prefix, so no
//! subdomain can set or shadow them.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::oauth::claims::{AccessClaims, Audiences};
use crate::refresh::{NewFamily, RefreshError};
use crate::state::AppState;

use super::LoggedIn;

/// The refresh-token cookie.
pub const REFRESH_COOKIE: &str = "__Host-portcullis-rt";
/// The access-token cookie.
pub const ACCESS_COOKIE: &str = "__Host-portcullis-at";
/// The ID-token cookie (logout hint).
pub const ID_TOKEN_COOKIE: &str = "__Host-portcullis-idt";
/// The start of every pending-login cookie's name; the rest is [`login_cookie_name`]'s.
pub const LOGIN_COOKIE_PREFIX: &str = "__Host-portcullis-login-";
/// How many pending-login cookies a browser keeps: a login started beyond this clears
/// the oldest (so abandoned tabs cannot grow the `Cookie` header without bound).
pub const MAX_PENDING_LOGINS: usize = 8;
/// The largest `Set-Cookie` value (name, value and attributes) every browser keeps: RFC
/// 6265 §6.1 asks for at least 4096 bytes, and browsers drop larger ones silently.
pub const MAX_COOKIE_BYTES: usize = 4096;
/// Every cookie of ours starts with this: no admin node may set or read one.
pub const COOKIE_PREFIX: &str = "__Host-portcullis-";

/// The scope of console access tokens.
pub const CONSOLE_SCOPE: &str = "console";

/// A console access token: the access-token claims plus who the user is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleClaims {
    /// The standard claims (`roles` and `sid` included).
    #[serde(flatten)]
    pub base: AccessClaims,
    /// The provider's name.
    pub idp: String,
    /// Email, as the provider reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Login name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
}

/// What a session's refresh family remembers (no secrets).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Console roles (the refresh grant reads `roles` too).
    pub roles: Vec<String>,
    /// The provider's name.
    pub provider: String,
    /// Email.
    pub email: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Login name.
    pub preferred_username: Option<String>,
    /// The provider's session (the ID token's `sid`), when it named one: a back-channel
    /// logout of that session ends this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_sid: Option<String>,
    /// A break-glass session's account stamp at login ([`crate::accounts::LocalAccount`]):
    /// it is renewed only while the account still has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_stamp: Option<i64>,
}

/// The user of a console request, as `/auth/me` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleUser {
    /// `<provider>:<sub>`.
    pub subject: String,
    /// The login name (`preferred_username`, else the subject).
    pub user: String,
    /// Email.
    pub email: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Console roles.
    pub roles: Vec<String>,
    /// The provider's name.
    pub provider: String,
    /// The session (refresh family) id.
    pub session: Option<String>,
    /// When the current access token expires (Unix seconds); never after the session's
    /// end (login + `sso.session_max_lifetime`).
    pub expires_at: i64,
}

/// A request's session, if any, and the cookies to set when it was renewed.
#[derive(Debug)]
pub enum Resolved {
    /// A live session.
    Active {
        /// Who.
        user: ConsoleUser,
        /// `Set-Cookie` values of a renewal (empty when the access token was still good).
        set_cookies: Vec<HeaderValue>,
    },
    /// No usable session; `stale` when cookies were presented that no longer work (they
    /// should be cleared).
    None {
        /// Cookies to clear.
        stale: bool,
    },
}

/// `name=value; Path=/; Max-Age=…; HttpOnly; Secure; SameSite=Lax`.
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
        max_age.as_secs()
    ))
    .ok()
}

/// A `Set-Cookie` that removes `name`.
pub fn clear_cookie(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// `Set-Cookie` values that end a session in the browser.
pub fn clear_session_cookies() -> Vec<HeaderValue> {
    [REFRESH_COOKIE, ACCESS_COOKIE, ID_TOKEN_COOKIE]
        .iter()
        .map(|c| clear_cookie(c))
        .collect()
}

/// The `(name, value)` pairs of the request's `Cookie` headers, in the order sent.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    cookie_pairs(headers)
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

/// The name of the cookie that binds the login of `state` to the browser: the prefix and
/// 16 hex digits of SHA-256(`state`). Derived, so the callback finds its own login's
/// cookie among several without the name carrying the `state` itself; always a valid
/// cookie name, whatever a callback's `state` holds.
pub fn login_cookie_name(state: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(state.as_bytes());
    let short = digest.get(..8).unwrap_or_default();
    format!("{LOGIN_COOKIE_PREFIX}{}", hex::encode(short))
}

/// The names of the request's pending-login cookies, in the order the browser sent them
/// (oldest first: RFC 6265 §5.4 lists cookies of one path by creation time).
pub fn login_cookie_names(headers: &HeaderMap) -> Vec<String> {
    cookie_pairs(headers)
        .filter(|(k, v)| k.starts_with(LOGIN_COOKIE_PREFIX) && !v.is_empty())
        .map(|(k, _)| k.to_owned())
        .collect()
}

/// Whether the request's `Origin` (or, without one, its `Referer`) is `origin`.
pub fn from_origin(headers: &HeaderMap, origin: &str) -> bool {
    let claimed = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::REFERER)
                .and_then(|v| v.to_str().ok())
                .and_then(|r| url::Url::parse(r).ok())
                .map(|u| u.origin().ascii_serialization())
        });
    !origin.is_empty() && claimed.as_deref() == Some(origin)
}

/// Whether the request carries a session cookie (CSRF protection applies to it).
pub fn has_session_cookie(headers: &HeaderMap) -> bool {
    read_cookie(headers, REFRESH_COOKIE).is_some() || read_cookie(headers, ACCESS_COOKIE).is_some()
}

/// Who a new session is for: from an SSO login or a break-glass account.
#[derive(Clone)]
pub struct NewSession {
    /// `<provider>:<sub>`, or `local:<name>`.
    pub subject: String,
    /// What is remembered in the refresh family.
    pub info: SessionInfo,
    /// The provider's ID token, for `id_token_hint` at logout (SSO only).
    pub id_token: Option<String>,
}

impl std::fmt::Debug for NewSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSession")
            .field("subject", &self.subject)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl From<&LoggedIn> for NewSession {
    fn from(login: &LoggedIn) -> Self {
        Self {
            subject: login.subject(),
            info: SessionInfo {
                roles: login.roles.iter().map(|r| r.as_str().to_owned()).collect(),
                provider: login.provider.clone(),
                // an address the provider has not verified names nobody: admin nodes
                // get no `X-Portcullis-Email` rather than a claim a user typed in
                email: login
                    .claims
                    .email
                    .clone()
                    .filter(|_| login.claims.email_verified == Some(true)),
                name: login.claims.name.clone(),
                preferred_username: login.claims.preferred_username.clone(),
                idp_sid: login
                    .claims
                    .extra
                    .get("sid")
                    .and_then(|s| s.as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
                account_stamp: None,
            },
            id_token: Some(login.id_token.clone()),
        }
    }
}

/// Starts a session: a new refresh family and a first access token. Returns the
/// `Set-Cookie` values. For an SSO login, see [`establish_login`].
pub async fn establish(
    state: &AppState,
    new: &NewSession,
    now: OffsetDateTime,
) -> Result<Vec<HeaderValue>, ApiError> {
    let issued = store(state, new, now).await?;
    cookies(state, new, &issued)
}

/// What [`establish_login`] made.
#[derive(Debug)]
pub enum Established {
    /// A live session: its `Set-Cookie` values.
    Live(Vec<HeaderValue>),
    /// The provider announced a logout that ends this login while its callback ran (see
    /// [`super::Sso::remember_logout`]): the session was stored and revoked at once, and
    /// no cookie carries it.
    EndedByProvider {
        /// The refresh family revoked.
        family: String,
    },
}

/// Starts the session of an SSO login, unless the provider has announced a logout that
/// ends it: the session is stored (and indexed under its provider session) first, then
/// the logouts remembered are checked, so a logout running at the same time either finds
/// the session or is found by the check (see [`super::Sso::remember_logout`]). A session
/// a logout ends is revoked before any token of it leaves; so is one whose check could not
/// be made (the store is away: 503), since nobody can tell whether it should live.
pub async fn establish_login(
    state: &AppState,
    login: &LoggedIn,
    now: OffsetDateTime,
) -> Result<Established, ApiError> {
    let new = NewSession::from(login);
    let issued = store(state, &new, now).await?;
    let family = issued.session.family.clone();
    let ended = state
        .sso
        .ended_by_logout(
            &login.provider,
            &login.claims.sub,
            new.info.idp_sid.as_deref(),
            login.claims.iat,
        )
        .await;
    match ended {
        Ok(false) => Ok(Established::Live(cookies(state, &new, &issued)?)),
        Ok(true) => {
            state.refresh.revoke_family(&family).await?;
            Ok(Established::EndedByProvider {
                family: family.to_string(),
            })
        }
        Err(e) => {
            if let Err(revoke) = state.refresh.revoke_family(&family).await {
                // never handed out, so unusable even while it stays in the store
                tracing::warn!(error = %revoke, %family, "an unchecked login's session stays stored, unused");
            }
            Err(e.into())
        }
    }
}

/// Stores a new session: its refresh family (which the refresh store indexes under its
/// subject) and, when its login named a provider session, its entry in that session's
/// index.
async fn store(
    state: &AppState,
    new: &NewSession,
    now: OffsetDateTime,
) -> Result<crate::refresh::Issued, ApiError> {
    let sso = state.sso.settings();
    let issued = state
        .refresh
        .issue(
            NewFamily {
                client_id: sso.console_client_id.clone(),
                subject: new.subject.clone(),
                scope: CONSOLE_SCOPE.to_owned(),
                audience: Vec::new(),
                auth_time: now,
                session: serde_json::to_value(&new.info)
                    .map_err(|e| ApiError::Internal(Box::new(e)))?,
            },
            now,
        )
        .await?;
    let lifetime = state.config.refresh.absolute_lifetime;
    // a logout token naming only the provider session finds this one through it
    if let Some(sid) = &new.info.idp_sid {
        state
            .sso
            .remember_provider_session(
                &new.info.provider,
                sid,
                &issued.session.family.to_string(),
                lifetime.min(sso.session_max_lifetime),
            )
            .await?;
    }
    Ok(issued)
}

/// The first access token of a session [`store`] made, and its cookies.
fn cookies(
    state: &AppState,
    new: &NewSession,
    issued: &crate::refresh::Issued,
) -> Result<Vec<HeaderValue>, ApiError> {
    let lifetime = state.config.refresh.absolute_lifetime;
    let (access, claims) = mint(
        state,
        &new.subject,
        &issued.session.family.to_string(),
        &new.info,
        session_end(state, issued.session.auth_time),
    )?;
    // a cookie over the size every browser keeps would be dropped without a word; then
    // there is no hint, and logout names the client instead (see `handlers::logout`).
    // Without a hint of this login, one left by an earlier login must go too: it would
    // name another session, perhaps another user.
    let id_token = new
        .id_token
        .as_deref()
        .and_then(|t| set_cookie(ID_TOKEN_COOKIE, t, lifetime))
        .filter(|c| {
            let fits = c.len() <= MAX_COOKIE_BYTES;
            if !fits {
                tracing::debug!(
                    bytes = c.len(),
                    "ID token too large for a cookie: logout will name the client instead"
                );
            }
            fits
        })
        .unwrap_or_else(|| clear_cookie(ID_TOKEN_COOKIE));
    Ok([
        set_cookie(REFRESH_COOKIE, issued.token.expose_secret(), lifetime),
        set_cookie(ACCESS_COOKIE, &access, access_cookie_age(&claims)),
        Some(id_token),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// When the console session that logged in at `auth_time` ends, whatever its activity:
/// `sso.session_max_lifetime` later. Past it the session is not renewed.
pub fn session_end(state: &AppState, auth_time: OffsetDateTime) -> OffsetDateTime {
    time::Duration::try_from(state.sso.settings().session_max_lifetime)
        .ok()
        .and_then(|max| auth_time.checked_add(max))
        .unwrap_or(OffsetDateTime::new_utc(
            time::Date::MAX,
            time::Time::MIDNIGHT,
        ))
}

/// The `Max-Age` of the access cookie carrying `claims`: the token's own lifetime.
fn access_cookie_age(claims: &ConsoleClaims) -> Duration {
    Duration::from_secs(
        u64::try_from(claims.base.exp.saturating_sub(claims.base.iat)).unwrap_or_default(),
    )
}

/// Signs a console access token (recorded as `token.issue`, by its id); returns it and
/// its claims. Its `exp` is `sso.access_token_lifetime` from now, but never after
/// `session_end`: an access token must not carry a session past its maximum lifetime.
fn mint(
    state: &AppState,
    subject: &str,
    family: &str,
    info: &SessionInfo,
    session_end: OffsetDateTime,
) -> Result<(String, ConsoleClaims), ApiError> {
    let now = state.keys.now().unix_timestamp();
    let lifetime =
        i64::try_from(state.sso.settings().access_token_lifetime.as_secs()).unwrap_or(i64::MAX);
    let until = now
        .saturating_add(lifetime)
        .min(session_end.unix_timestamp());
    let (token, claims) = state.keys.sign_access(until, |exp| ConsoleClaims {
        base: AccessClaims {
            iss: state.config.issuer(),
            sub: subject.to_owned(),
            aud: Audiences::One(state.config.issuer()),
            exp,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: CONSOLE_SCOPE.to_owned(),
            client_id: state.sso.settings().console_client_id.clone(),
            roles: info.roles.clone(),
            sid: Some(family.to_owned()),
        },
        idp: info.provider.clone(),
        email: info.email.clone(),
        name: info.name.clone(),
        preferred_username: info.preferred_username.clone(),
    })?;
    state.audit.record(crate::audit::AuditEvent {
        at: state.keys.now(),
        actor: format!("user:{subject}"),
        action: "token.issue".to_owned(),
        target: claims.base.jti.clone(),
        source_ip: None,
        detail: serde_json::json!({
            "grant": "console_session",
            "client_id": claims.base.client_id,
            "scope": claims.base.scope,
            "exp": claims.base.exp,
            "sid": family,
        })
        .into(),
    });
    Ok((token, claims))
}

fn user_of(claims: &ConsoleClaims) -> ConsoleUser {
    ConsoleUser {
        subject: claims.base.sub.clone(),
        user: claims
            .preferred_username
            .as_deref()
            .filter(|n| plain_login_name(n))
            .map_or_else(|| claims.base.sub.clone(), str::to_owned),
        email: claims.email.clone(),
        name: claims.name.clone(),
        roles: claims.base.roles.clone(),
        provider: claims.idp.clone(),
        session: claims.base.sid.clone(),
        expires_at: claims.base.exp,
    }
}

/// Whether a provider's `preferred_username` can be an admin node's user name as it is:
/// visible ASCII only, so no space a servlet container trims (`" admin"` is not `admin`),
/// no bytes it decodes as Latin-1, nothing that is not a plain name. Any other is replaced
/// by the subject, which is unique.
pub fn plain_login_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// The verified console claims of the access cookie, if it is good now.
pub async fn access_claims(state: &AppState, headers: &HeaderMap) -> Option<ConsoleClaims> {
    let token = read_cookie(headers, ACCESS_COOKIE)?;
    let claims: ConsoleClaims = state.keys.verify_current(&token).await.ok()?;
    (claims.base.client_id == state.sso.settings().console_client_id
        && claims.base.scope == CONSOLE_SCOPE)
        .then_some(claims)
}

/// Whether the request carries a live console session: a good access cookie, or a
/// refresh cookie that is its family's current token (nothing is rotated or set).
pub async fn has_live_session(state: &AppState, headers: &HeaderMap) -> bool {
    if access_claims(state, headers).await.is_some() {
        return true;
    }
    let Some(refresh) = read_cookie(headers, REFRESH_COOKIE) else {
        return false;
    };
    let presented = SecretString::from(refresh);
    let now = state.keys.now();
    matches!(
        state.refresh.inspect(&presented, now).await,
        Ok(Some(s)) if s.client_id == state.sso.settings().console_client_id
            && now < session_end(state, s.auth_time)
    )
}

/// Why a break-glass session may not be renewed, if it may not: local accounts were turned
/// off, or its account was removed, disabled or changed (password, roles) since the login.
/// A session of the identity provider is never refused here.
///
/// With the database unreachable the account cannot be read, and the session is renewed
/// as it stands (logged at WARN): break-glass is for the day other things are broken, and
/// failing here, after the rotation, would leave the browser only a spent token whose
/// next use past the grace window counts as re-use. A change made in the database was
/// made before the outage, so it applies at the first renewal after the database is back
/// (or at once, when the CLI that made it reached Redis and revoked the sessions).
async fn break_glass_refusal(
    state: &AppState,
    session: &crate::refresh::Session,
    info: &SessionInfo,
) -> Option<&'static str> {
    if info.provider != crate::sso::LOCAL_PROVIDER {
        return None;
    }
    if !state.sso.settings().local_accounts {
        return Some("local_accounts_off");
    }
    let name = session.subject.strip_prefix("local:").unwrap_or_default();
    let standing =
        crate::accounts::standing(&state.db, name, info.account_stamp, session.auth_time);
    // bounded like the wait for a connection: a connection a failover left silent must not
    // hold the renewal until the request's own timeout
    let read = match tokio::time::timeout(state.config.database.acquire_timeout, standing).await {
        Ok(read) => read.map_err(|e| crate::error::chain(&e)),
        Err(_) => Err("the database did not answer in time".to_owned()),
    };
    match read {
        Ok(crate::accounts::Standing::Good) => None,
        Ok(refused) => Some(refused.as_str()),
        Err(error) => {
            tracing::warn!(
                family = %session.family,
                %error,
                "break-glass session renewed without re-reading its account: database unavailable"
            );
            None
        }
    }
}

/// Ends a console session a renewal has just rotated but must not renew: revokes its
/// family (the successor with it) and records `action` with `detail`.
async fn end_renewed(
    state: &AppState,
    session: &crate::refresh::Session,
    now: OffsetDateTime,
    action: &str,
    detail: serde_json::Value,
) -> Result<Resolved, ApiError> {
    state.refresh.revoke_family(&session.family).await?;
    state.audit.record(crate::audit::AuditEvent {
        at: now,
        actor: format!("user:{}", session.subject),
        action: action.to_owned(),
        target: session.family.to_string(),
        source_ip: None,
        detail: detail.into(),
    });
    Ok(Resolved::None { stale: true })
}

/// The least grace window of a console renewal. Its new cookies reach the browser only
/// with the answer of the request that renewed, which can take up to
/// `server.request_timeout`; until then the browser's other requests still carry the
/// rotated cookie, and must get the same successor, not be taken for a thief. The margin
/// covers the answer's way to the browser.
fn renewal_grace(state: &AppState) -> std::time::Duration {
    state.config.server.request_timeout + RENEWAL_DELIVERY_MARGIN
}

/// See [`renewal_grace`].
const RENEWAL_DELIVERY_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The request's session: the access cookie when it is good, else a transparent renewal
/// from the refresh cookie (which rotates it).
#[tracing::instrument(skip_all)]
pub async fn resolve(state: &AppState, headers: &HeaderMap) -> Result<Resolved, ApiError> {
    if let Some(claims) = access_claims(state, headers).await {
        return Ok(Resolved::Active {
            user: user_of(&claims),
            set_cookies: Vec::new(),
        });
    }
    let Some(refresh) = read_cookie(headers, REFRESH_COOKIE) else {
        return Ok(Resolved::None {
            stale: read_cookie(headers, ACCESS_COOKIE).is_some(),
        });
    };
    // nothing is rotated unless the renewed access token can be signed (see
    // `ensure_can_sign`): the refresh cookie stays good for the next request
    crate::oauth::token::ensure_can_sign(state)?;
    let sso = state.sso.settings();
    let presented = SecretString::from(refresh);
    let now = state.keys.now();
    let refreshed = match state
        .refresh
        .refresh_with_grace(
            &presented,
            &sso.console_client_id,
            now,
            renewal_grace(state),
        )
        .await
    {
        Ok(r) => r,
        Err(RefreshError::Reused {
            family, subject, ..
        }) => {
            metrics::counter!("portcullis_refresh_reuse_detected_total").increment(1);
            state.audit.record(crate::audit::AuditEvent {
                at: state.keys.now(),
                actor: format!("user:{subject}"),
                action: "refresh.reuse_detected".to_owned(),
                target: family.to_string(),
                source_ip: None,
                detail: serde_json::json!({ "console": true, "family_revoked": true }).into(),
            });
            return Ok(Resolved::None { stale: true });
        }
        Err(e) if e.is_invalid_grant() => return Ok(Resolved::None { stale: true }),
        Err(e) => return Err(e.into()),
    };
    let session = &refreshed.session;
    // The maximum lifetime is checked after the rotation, not before it: the login
    // instant is in the family, and reading it first would cost a second store round trip
    // (`inspect`) on every renewal to spare one rotation per session. The access cookie
    // cannot tell it either: it is gone by now (its `Max-Age` is the token's lifetime) and
    // its claims carry no `auth_time`. And `inspect` knows only a family's current token,
    // so a grace replay of the previous one would need this check anyway. The one
    // successor rotated for nothing dies with its family below.
    let end = session_end(state, session.auth_time);
    if now >= end {
        let detail = serde_json::json!({
            "console": true,
            "reason": "max_lifetime",
            "auth_time": session.auth_time.unix_timestamp(),
            "ended_at": end.unix_timestamp(),
            "family_revoked": true,
        });
        return end_renewed(state, session, now, "session.expired", detail).await;
    }
    let info: SessionInfo = serde_json::from_value(session.session.clone())
        .map_err(|e| ApiError::Internal(Box::new(e)))?;
    if let Some(reason) = break_glass_refusal(state, session, &info).await {
        let detail = serde_json::json!({
            "console": true,
            "break_glass": true,
            "reason": reason,
            "auth_time": session.auth_time.unix_timestamp(),
            "family_revoked": true,
        });
        return end_renewed(state, session, now, "session.ended", detail).await;
    }
    let (access, claims) = mint(
        state,
        &session.subject,
        &session.family.to_string(),
        &info,
        end,
    )?;
    let set_cookies = [
        set_cookie(
            REFRESH_COOKIE,
            refreshed.token.expose_secret(),
            state.config.refresh.absolute_lifetime,
        ),
        set_cookie(ACCESS_COOKIE, &access, access_cookie_age(&claims)),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(Resolved::Active {
        user: user_of(&claims),
        set_cookies,
    })
}
