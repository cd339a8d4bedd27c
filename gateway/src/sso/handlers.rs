//! `/auth/*`: the HTTP face of SSO. Thin: the flow is in [`super::Sso`], the session in
//! [`super::session`]; these functions turn outcomes into redirects, cookies, audit
//! events and metrics.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use secrecy::SecretString;

use crate::accounts::{self, AccountError};
use crate::audit::AuditEvent;
use crate::error::ApiError;
use crate::protect::{AccountAttempt, ClientIp, Scope};
use crate::state::AppState;

use super::session::{
    self, Established, ID_TOKEN_COOKIE, MAX_PENDING_LOGINS, NewSession, REFRESH_COOKIE, Resolved,
    SessionInfo,
};
use super::{Callback, Ended, SsoError};

/// The audit record of an SSO login's outcome: its user, against its provider.
fn login_event(
    now: time::OffsetDateTime,
    login: &super::LoggedIn,
    action: &str,
    source_ip: Option<String>,
    detail: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        at: now,
        actor: format!("user:{}", login.subject()),
        action: action.to_owned(),
        target: login.provider.clone(),
        source_ip,
        detail: detail.into(),
    }
}

/// The parameters of a query string, decoded once; a repeated parameter is refused
/// (which of two `state`s or `redirect`s would count is exactly what an attacker wants
/// to choose).
fn query_params(raw: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    let mut params = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if params
            .insert(k.clone().into_owned(), v.into_owned())
            .is_some()
        {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("parameter `{k}` is repeated"),
            ));
        }
    }
    Ok(params)
}

/// `GET /auth/login`: 302 to the provider, with this login's cookie set.
pub async fn login(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    start_login(&state, ip, &headers, raw.as_deref())
        .await
        .unwrap_or_else(|e| refusal(&headers, e))
}

async fn start_login(
    state: &AppState,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Response, ApiError> {
    let query = query_params(raw)?;
    let started = match state
        .sso
        .start(
            query.get("provider").map(String::as_str),
            query.get("redirect").map(String::as_str),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            metrics::counter!("portcullis_login_total", "method" => "sso", "outcome" => "failure", "reason" => e.reason()).increment(1);
            if matches!(e, SsoError::InvalidRedirect) {
                tracing::warn!(client_ip = %ip, "open-redirect attempt refused at login");
            }
            return Err(e.into());
        }
    };
    let location = HeaderValue::from_str(&started.authorize_url)
        .map_err(|e| ApiError::Internal(Box::new(e)))?;
    let mut response = redirect_to(StatusCode::FOUND, location);
    // one cookie per pending login, so tabs logging in at once keep their own; the
    // oldest beyond the bound are cleared (their logins then fail as `invalid_state`)
    let held = session::login_cookie_names(headers);
    let excess = (held.len() + 1).saturating_sub(MAX_PENDING_LOGINS);
    for name in held.iter().take(excess) {
        response
            .headers_mut()
            .append(header::SET_COOKIE, session::clear_cookie(name));
    }
    if let Some(cookie) = session::set_cookie(
        &session::login_cookie_name(&started.state),
        &started.state,
        state.sso.settings().login_timeout,
    ) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// `GET /auth/callback`: finishes the login and starts the session, or refuses with no
/// session at all.
pub async fn callback(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let mut params = match query_params(raw.as_deref()) {
        Ok(p) => p,
        Err(e) => return refusal(&headers, e),
    };
    let query = Callback {
        code: params.remove("code"),
        state: params.remove("state"),
        iss: params.remove("iss"),
        error: params.remove("error"),
        error_description: params.remove("error_description"),
    };
    let now = state.keys.now();
    // this login's own cookie: another tab's login, finished or failed, leaves it alone
    let cookie_name = query.state.as_deref().map(session::login_cookie_name);
    let cookie = cookie_name
        .as_deref()
        .and_then(|n| session::read_cookie(&headers, n));
    let result = state.sso.finish(&query, cookie.as_deref(), now).await;
    let source_ip = Some(ip.to_string());
    let mut response = match result {
        Ok(login) if login.roles.is_empty() => {
            metrics::counter!("portcullis_login_total", "method" => "sso", "outcome" => "refused", "reason" => "no_role").increment(1);
            state.audit.record(login_event(
                now,
                &login,
                "login.refused",
                source_ip,
                serde_json::json!({ "reason": "no_role", "groups": login.groups }),
            ));
            refusal(&headers, ApiError::from(SsoError::NoRole))
        }
        Ok(login) => match session::establish_login(&state, &login, now).await {
            Ok(Established::Live(cookies)) => {
                metrics::counter!("portcullis_login_total", "method" => "sso", "outcome" => "success", "reason" => "").increment(1);
                state.audit.record(login_event(
                    now,
                    &login,
                    "login.success",
                    source_ip,
                    serde_json::json!({
                        "method": "sso",
                        "roles": login.roles,
                    }),
                ));
                match HeaderValue::from_str(&login.redirect) {
                    Ok(location) => {
                        let mut r = redirect_to(StatusCode::FOUND, location);
                        for c in cookies {
                            r.headers_mut().append(header::SET_COOKIE, c);
                        }
                        r
                    }
                    Err(e) => refusal(&headers, ApiError::Internal(Box::new(e))),
                }
            }
            Ok(Established::EndedByProvider { family }) => {
                // the provider's logout wins: the browser is told so, and may sign in
                // again (a new provider session, which no logout names)
                let reason = SsoError::ProviderSessionEnded.reason();
                tracing::info!(reason, provider = %login.provider, client_ip = %ip, "SSO login ended by a provider logout");
                metrics::counter!("portcullis_login_total", "method" => "sso", "outcome" => "refused", "reason" => reason).increment(1);
                state.audit.record(login_event(
                    now,
                    &login,
                    "login.refused",
                    source_ip,
                    serde_json::json!({
                        "method": "sso",
                        "reason": reason,
                        "sid": login.claims.extra.get("sid"),
                        "family_revoked": family,
                    }),
                ));
                refusal(&headers, ApiError::from(SsoError::ProviderSessionEnded))
            }
            Err(e) => refusal(&headers, e),
        },
        Err(e) => {
            let reason = e.reason();
            // the error may quote what the provider sent (a JWKS or discovery document it
            // controls): escaped, so no byte of it can break a log line, in any format
            let error = e.to_string();
            tracing::info!(reason, error = %error.escape_debug(), client_ip = %ip, "SSO login refused");
            metrics::counter!("portcullis_login_total", "method" => "sso", "outcome" => "failure", "reason" => reason).increment(1);
            state.audit.record(AuditEvent {
                at: now,
                actor: "anonymous".to_owned(),
                action: "login.failure".to_owned(),
                target: "sso".to_owned(),
                source_ip,
                detail: serde_json::json!({ "method": "sso", "reason": reason }).into(),
            });
            // a stale callback (reloaded, back button, a second tab after the first
            // logged in) from a browser that is logged in already: on to the console
            // rather than an error page. Nothing is consumed or made: the state stays
            // refused, the session is the one the browser had.
            if matches!(e, SsoError::InvalidState)
                && session::has_live_session(&state, &headers).await
            {
                redirect_to(StatusCode::FOUND, HeaderValue::from_static("/"))
            } else {
                refusal(&headers, ApiError::from(e))
            }
        }
    };
    if let Some(name) = cookie_name.filter(|_| cookie.is_some()) {
        response
            .headers_mut()
            .append(header::SET_COOKIE, session::clear_cookie(&name));
    }
    response
}

/// `POST /auth/local`: a break-glass login with a local account (form fields `username`,
/// `password`, optional `redirect`). Refused unless `sso.local_accounts` is on; from our
/// own pages only (Origin); under the account's failure counters (per client address
/// bucket and account-wide), which fail closed; every attempt audited.
pub async fn local_login(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !state.sso.settings().local_accounts {
        return Err(ApiError::Forbidden {
            code: "local_login_disabled",
            description: "local accounts are not enabled on this instance".to_owned(),
        });
    }
    same_origin(&state, &headers)?;
    let mut form =
        crate::oauth::token::parse_form(&headers, &body, &["username", "password", "redirect"])?;
    let missing = || ApiError::bad_request("invalid_request", "username and password are required");
    let name = form
        .take("username")
        .filter(|n| !n.is_empty())
        .ok_or_else(missing)?;
    let password = SecretString::from(form.take("password").ok_or_else(missing)?);
    let redirect = match form.take("redirect") {
        None => "/".to_owned(),
        Some(r) => super::redirect::safe_redirect(&r).ok_or(SsoError::InvalidRedirect)?,
    };
    let now = state.keys.now();
    let source_ip = Some(ip.to_string());
    // the name as submitted only when it could be an account name: anything else (control
    // characters, NUL, a password typed into the wrong field) stays out of the trail
    let who = if accounts::valid_name(&name) {
        name.as_str()
    } else {
        "(malformed)"
    };
    let audit = |action: &str, detail: serde_json::Value| {
        state.audit.record(AuditEvent {
            at: now,
            actor: format!("user:local:{who}"),
            action: action.to_owned(),
            target: "local".to_owned(),
            source_ip: source_ip.clone(),
            detail: detail.into(),
        });
    };
    // The attempt is counted before the password is checked, in one atomic step that
    // refuses instead while the account backs off or is locked for this client address
    // (an IPv4 address, an IPv6 /64), or is locked account-wide and the address is not one
    // the account has logged in from before: parallel guesses cannot all pass a check
    // none of them has counted yet, and an attacker's failures hold back the attacker's
    // addresses, not the owner's familiar ones. A success clears it below; an error on the
    // way leaves it counted. Fail closed: a human password has no entropy guarantee, so
    // no counters, no login.
    let bucket = crate::protect::rate::bucket_of(ip).to_string();
    let (if_failed, familiar) = match state.lockout.attempt_account(&name, ip, now).await? {
        AccountAttempt::Counted {
            if_failed,
            familiar,
        } => (if_failed, familiar),
        AccountAttempt::Refused(refusal, scope) => {
            metrics::counter!("portcullis_login_total", "method" => "local", "outcome" => "locked", "reason" => "too_many_attempts").increment(1);
            audit(
                "login.failure",
                serde_json::json!({
                    "method": "local",
                    "break_glass": true,
                    "reason": "locked",
                    "scope": scope.as_str(),
                    "address": bucket,
                }),
            );
            return Err(ApiError::too_many_attempts(refusal));
        }
    };
    let account = accounts::verify(&state.db, &name, &password)
        .await
        .map_err(|e| match e {
            e @ AccountError::Db(_) => ApiError::unavailable("database", e),
            e => ApiError::Internal(Box::new(e)),
        })?;
    let Some(account) = account else {
        metrics::counter!("portcullis_login_total", "method" => "local", "outcome" => "failure", "reason" => "invalid_credentials").increment(1);
        audit(
            "login.failure",
            serde_json::json!({
                "method": "local",
                "break_glass": true,
                "reason": "invalid_credentials",
                "address": bucket,
                "familiar": familiar,
            }),
        );
        if let Some((refusal, scope)) = if_failed.filter(|(r, _)| r.locked) {
            let kind = match scope {
                Scope::Address => "account_address",
                Scope::Account => "account",
            };
            metrics::counter!("portcullis_login_lockouts_total", "kind" => kind).increment(1);
            // `address`: the bucket locked (scope `address`), or the one whose failure
            // locked the whole account (scope `account`)
            audit(
                "login.lockout",
                serde_json::json!({
                    "kind": "account",
                    "scope": scope.as_str(),
                    "address": bucket,
                    "familiar": familiar,
                    "locked_for_secs": refusal.retry_after.as_secs(),
                }),
            );
        }
        return Err(ApiError::InvalidCredentials);
    };
    // clears this address's record and makes its bucket familiar to the account (exempt
    // from the account-wide lock from now on)
    state.lockout.account_succeeded(&name, ip, now).await?;
    let roles: Vec<String> = account
        .roles
        .iter()
        .map(|r| r.as_str().to_owned())
        .collect();
    let new = NewSession {
        subject: format!("local:{}", account.name),
        info: SessionInfo {
            roles: roles.clone(),
            provider: crate::sso::LOCAL_PROVIDER.to_owned(),
            email: None,
            name: None,
            preferred_username: Some(account.name.clone()),
            idp_sid: None,
            account_stamp: Some(account.stamp),
        },
        id_token: None,
    };
    let cookies = session::establish(&state, &new, now).await?;
    metrics::counter!("portcullis_login_total", "method" => "local", "outcome" => "success", "reason" => "").increment(1);
    audit(
        "login.success",
        serde_json::json!({ "method": "local", "break_glass": true, "roles": roles }),
    );
    let location = HeaderValue::from_str(&redirect).map_err(|e| ApiError::Internal(Box::new(e)))?;
    let mut response = redirect_to(StatusCode::SEE_OTHER, location);
    for c in cookies {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(response)
}

/// `GET /auth/me`: who the session is, renewing the access cookie when it has expired.
pub async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    match session::resolve(&state, &headers).await? {
        Resolved::Active { user, set_cookies } => {
            let mut response = Json(user).into_response();
            no_store(&mut response);
            for c in set_cookies {
                response.headers_mut().append(header::SET_COOKIE, c);
            }
            Ok(response)
        }
        Resolved::None { stale } => {
            let mut response = ApiError::LoginRequired.into_response();
            if stale {
                for c in session::clear_session_cookies() {
                    response.headers_mut().append(header::SET_COOKIE, c);
                }
            }
            Ok(response)
        }
    }
}

/// `GET /auth/logout`: without a session, back to `/`; with one, a page whose button
/// posts to `/auth/logout` (a GET must not end a session: any page could embed it).
pub async fn logout_page(headers: HeaderMap) -> Response {
    if !session::has_session_cookie(&headers) {
        return redirect_to(StatusCode::SEE_OTHER, HeaderValue::from_static("/"));
    }
    let mut response = Html(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Sign out</title></head>\
         <body><h1>Sign out of Portcullis?</h1>\
         <form method=\"post\" action=\"/auth/logout\"><button type=\"submit\">Sign out</button>\
         </form></body></html>",
    )
    .into_response();
    no_store(&mut response);
    response
}

/// Refuses (403 `csrf_rejected`) a request whose `Origin` (or, without one, `Referer`) is
/// not this site, whether or not it carries a session cookie: for a login, so that no
/// other site can log a browser in to an account of its choosing; for a logout, because
/// `SameSite=Lax` keeps the cookies off another site's form POST but not the clearing
/// `Set-Cookie`s of the answer, which would log the user out.
fn same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let origin = url::Url::parse(&state.config.server.public_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    if session::from_origin(headers, &origin) {
        return Ok(());
    }
    metrics::counter!("portcullis_csrf_rejected_total").increment(1);
    Err(ApiError::Forbidden {
        code: "csrf_rejected",
        description: "cross-site request refused: Origin is not this site".to_owned(),
    })
}

/// `POST /auth/logout`: revokes the session's refresh family, clears the cookies, and
/// sends the browser through the provider's `end_session_endpoint` when it has one. Only
/// from this site ([`same_origin`]).
pub async fn logout(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    same_origin(&state, &headers)?;
    let sso = state.sso.settings();
    let now = state.keys.now();
    let access = session::access_claims(&state, &headers).await;
    let mut provider = access.as_ref().map(|c| c.idp.clone());
    let mut subject = access.as_ref().map(|c| c.base.sub.clone());
    let mut family = access.as_ref().and_then(|c| c.base.sid.clone());
    if let Some(rt) = session::read_cookie(&headers, REFRESH_COOKIE) {
        let rt = SecretString::from(rt);
        if let Some(s) = state.refresh.inspect(&rt, now).await? {
            provider = provider.or_else(|| {
                s.session
                    .get("provider")
                    .and_then(|p| p.as_str())
                    .map(str::to_owned)
            });
            subject = subject.or_else(|| Some(s.subject.clone()));
            family = Some(s.family.to_string());
        }
        // any genuine token of the family revokes it, rotated ones included
        state
            .refresh
            .revoke_token(&rt, &sso.console_client_id)
            .await
            .or_else(|e| {
                if e.is_invalid_grant() {
                    Ok(false)
                } else {
                    Err(e)
                }
            })?;
    }
    if let Some(f) = &family
        && let Ok(id) = f.parse::<crate::refresh::FamilyId>()
    {
        state.refresh.revoke_family(&id).await?;
    }
    if let Some(subject) = &subject {
        metrics::counter!("portcullis_logout_total").increment(1);
        state.audit.record(AuditEvent {
            at: now,
            actor: format!("user:{subject}"),
            action: "logout".to_owned(),
            target: family.clone().unwrap_or_default(),
            source_ip: Some(ip.to_string()),
            detail: serde_json::json!({ "provider": provider }).into(),
        });
    }
    // the provider session ends too, with or without the ID token: its cookie is absent
    // when the token was too large to keep in one (or the browser dropped it)
    let id_token = session::read_cookie(&headers, ID_TOKEN_COOKIE);
    let location = match provider {
        Some(p) => end_session_url(&state, &p, id_token.as_deref()).await,
        None => None,
    }
    .unwrap_or_else(|| "/".to_owned());
    let location = HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(Box::new(e)))?;
    let mut response = redirect_to(StatusCode::SEE_OTHER, location);
    for c in session::clear_session_cookies() {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(response)
}

/// `POST /auth/backchannel-logout` (OpenID Connect Back-Channel Logout 1.0): the provider
/// says a user's session there has ended. The form's `logout_token` is verified (see
/// [`super::logout_token`]) and used once; then the user's console sessions from that
/// provider end: those logged in through the named provider session (`sid`), or all of
/// them when the token names none. A session whose login carried no `sid` ends whenever
/// its user is logged out. Their refresh families are revoked, so no renewal follows; an
/// access cookie already minted lives out its `sso.access_token_lifetime`.
///
/// 200 with an empty body on success, also when no session was left to end, and for a
/// token used already (a provider's retry after a lost answer), which ends nothing
/// again; 400 `invalid_request` for a token refused; 503 when a store or the provider's
/// keys cannot be reached (the token is not marked used, so the provider may send it
/// again). A logout that fails part-way is audited part by part, for what each part
/// begun did ([`LogoutPart`]).
pub async fn backchannel_logout(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut parts = Vec::new();
    let result = backchannel_logout_inner(&state, &headers, &body, &mut parts).await;
    let outcome = match &result {
        Ok(Backchannel::Ended) => "success",
        Ok(Backchannel::Replayed) => "replayed",
        Err(ApiError::OAuth { .. } | ApiError::BadRequest { .. }) => "refused",
        Err(_) => "error",
    };
    metrics::counter!("portcullis_backchannel_logouts_total", "outcome" => outcome).increment(1);
    audit_logout(
        &state,
        ip,
        "logout.backchannel",
        parts,
        result.as_ref().err(),
    );
    match result {
        Ok(_) => {
            let mut response = StatusCode::OK.into_response();
            no_store(&mut response);
            Ok(response)
        }
        Err(e) => {
            // the reason is ours (a variant's text), never the token's content; at debug
            // level, since anyone may post garbage here (the metric counts refusals)
            let (status, code, description) = e.parts();
            tracing::debug!(status = status.as_u16(), code, reason = %description, client_ip = %ip, "back-channel logout refused");
            Err(e)
        }
    }
}

/// What a back-channel logout did.
enum Backchannel {
    /// Its parts are done, each provider name's (in the `parts` given).
    Ended,
    /// The token was used already: nothing done.
    Replayed,
}

/// The back-channel logout of the request, its parts kept in `parts` as they go (see
/// [`LogoutPart`]).
async fn backchannel_logout_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
    parts: &mut Vec<LogoutPart>,
) -> Result<Backchannel, ApiError> {
    let mut form = crate::oauth::token::parse_form(headers, body, &["logout_token"])?;
    let token = form.take("logout_token").ok_or_else(|| {
        ApiError::oauth(
            crate::error::OAuthCode::InvalidRequest,
            "logout_token is required",
        )
    })?;
    let now = state.keys.now();
    let (providers, logout) = state.sso.verify_logout_token(&token, now).await?;
    let Some(first) = providers.first() else {
        return Err(SsoError::UnknownProvider.into());
    };
    // once per token: a replay (within the token's life) must not end a session made
    // after the logout it announced
    if !state.sso.claim_logout(first, &logout, now).await? {
        return Ok(Backchannel::Replayed);
    }
    for provider in &providers {
        let ended = Ended::from(&logout);
        let mut part = LogoutPart::new(provider, ended, Some(&logout.jti));
        let done = end_logout(state, &mut part, ended, now).await;
        parts.push(part);
        if let Err(e) = done {
            // not done: the provider may send the token again (what was revoked stays
            // revoked; revoking again is harmless)
            if let Err(release) = state.sso.release_logout(first, &logout).await {
                tracing::warn!(error = %release, "a failed back-channel logout stays marked used");
            }
            return Err(e);
        }
    }
    Ok(Backchannel::Ended)
}

/// `GET /auth/frontchannel-logout?iss=…&sid=…` (OpenID Connect Front-Channel Logout 1.0):
/// the provider's logout page loads this in an iframe when the user's session there ends.
/// For every provider configured with exactly that `iss` and with `frontchannel_logout`
/// on, the console sessions the logins of provider session `sid` made end, as for a
/// back-channel logout naming only that `sid` (and the `sid` is remembered as ended, so a
/// login of it still finishing ends too).
///
/// The request carries no proof that the provider sent it: whoever knows a provider
/// session id can end the console sessions it made (the specification's model). Hence off
/// by default, and nothing but those sessions ends: the browser's own cookies are cleared
/// only when the session they carry is one that ended (or is dead already), so a made-up
/// `sid` logs nobody out.
///
/// 200 with a tiny page, `Cache-Control: no-store`, frameable by the provider's origin
/// only (`Content-Security-Policy: frame-ancestors <origin of iss>`); 400
/// `invalid_request` without `iss` or `sid` (or with a repeated one, or a `sid` that
/// cannot be one), 400 `unknown_issuer` for an `iss` of no configured provider, 403
/// `frontchannel_logout_disabled` when none of its providers turned it on; 503 when a
/// store cannot be reached (a logout that fails part-way is audited part by part, for
/// what each part begun did: [`LogoutPart`]). A refusal changes nothing.
pub async fn frontchannel_logout(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut parts = Vec::new();
    let result = frontchannel_logout_inner(&state, &headers, raw.as_deref(), &mut parts).await;
    let outcome = match &result {
        Ok(_) => "success",
        Err(ApiError::BadRequest { .. } | ApiError::Forbidden { .. }) => "refused",
        Err(_) => "error",
    };
    metrics::counter!("portcullis_frontchannel_logouts_total", "outcome" => outcome).increment(1);
    audit_logout(
        &state,
        ip,
        "logout.frontchannel",
        parts,
        result.as_ref().err(),
    );
    match result {
        Ok(response) => Ok(response),
        Err(e) => {
            let (status, code, _) = e.parts();
            tracing::debug!(status = status.as_u16(), code, client_ip = %ip, "front-channel logout refused");
            Err(e)
        }
    }
}

/// The page a front-channel logout answers: nothing to see, nothing to run.
const FRONTCHANNEL_PAGE: &str = "<!DOCTYPE html><html><head><meta charset=\"utf-8\">\
    <title>Signed out</title></head><body><p>Signed out of Portcullis.</p></body></html>";

/// The longest `sid` taken: provider session ids are short (a UUID, a random string).
const MAX_SID_LEN: usize = 255;

/// The front-channel logout of the request and its page, its parts kept in `parts` as
/// they go (see [`LogoutPart`]).
async fn frontchannel_logout_inner(
    state: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
    parts: &mut Vec<LogoutPart>,
) -> Result<Response, ApiError> {
    let mut query = query_params(raw)?;
    let iss = query
        .remove("iss")
        .filter(|v| !v.is_empty())
        .ok_or(SsoError::InvalidLogoutRequest("iss is required"))?;
    let sid = query.remove("sid").filter(|v| !v.is_empty()).ok_or(
        SsoError::InvalidLogoutRequest(
            "sid is required (turn on \"front-channel logout session required\" at the provider)",
        ),
    )?;
    if sid.len() > MAX_SID_LEN || !sid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            SsoError::InvalidLogoutRequest("sid must be 1-255 visible ASCII characters").into(),
        );
    }
    let providers = state.sso.frontchannel_providers(&iss)?;
    let now = state.keys.now();
    // whose session the browser's own cookies carry, before it may end
    let browser = browser_family(state, headers, now).await;
    for provider in &providers {
        let logout = Ended {
            sub: None,
            sid: Some(sid.as_str()),
            issued_at: None,
        };
        let mut part = LogoutPart::new(&provider.settings.name, logout, None);
        let done = end_logout(state, &mut part, logout, now).await;
        parts.push(part);
        done?;
    }
    let mut response = Html(FRONTCHANNEL_PAGE).into_response();
    no_store(&mut response);
    // unlike the other `/auth/` pages (never framed), this one may be framed by the
    // provider (all providers of one `iss` share its origin), and no one else
    let origin = url::Url::parse(&iss)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    let policy = HeaderValue::from_str(&format!("default-src 'none'; frame-ancestors {origin}"))
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    response
        .headers_mut()
        .insert(header::CONTENT_SECURITY_POLICY, policy);
    let browser_ended = match &browser {
        // the browser's session is of that provider session: ended now, or before
        Some(family) => {
            let mut of_sid = parts.iter().any(|p| p.revoked.contains(family));
            for provider in &providers {
                if of_sid {
                    break;
                }
                let name = &provider.settings.name;
                match state.sso.sessions_of_provider_session(name, &sid).await {
                    Ok(families) => of_sid = families.contains(family),
                    Err(e) => {
                        // every part is done, but the answer is a 503: audited as partial
                        if let Some(part) = parts.iter_mut().find(|p| p.provider == *name) {
                            part.failed = Some(LogoutStep::BrowserSession);
                        }
                        return Err(e.into());
                    }
                }
            }
            of_sid
        }
        // cookies that carry no live session are dead anyway
        None => true,
    };
    if session::has_session_cookie(headers) && browser_ended {
        for c in session::clear_session_cookies() {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
    }
    Ok(response)
}

/// The refresh family of the console session the request's cookies carry, if they carry
/// a live one: the access cookie's, else the refresh cookie's.
async fn browser_family(
    state: &AppState,
    headers: &HeaderMap,
    now: time::OffsetDateTime,
) -> Option<String> {
    if let Some(claims) = session::access_claims(state, headers).await {
        return claims.base.sid;
    }
    let refresh = SecretString::from(session::read_cookie(headers, REFRESH_COOKIE)?);
    match state.refresh.inspect(&refresh, now).await {
        Ok(Some(s)) if s.client_id == state.sso.settings().console_client_id => {
            Some(s.family.to_string())
        }
        _ => None,
    }
}

/// One provider name's part of a provider logout, from either channel, as its audit
/// record tells it. Kept as the part goes, so that a logout failing part-way (a store
/// answering an error for the second of two provider names, at its start or half-way
/// through) is audited for what it did, not only answered 503.
#[derive(Debug)]
struct LogoutPart {
    /// The provider name.
    provider: String,
    /// The record's target: the subject, or the provider session.
    target: String,
    /// The provider session the logout named.
    sid: Option<String>,
    /// A back-channel logout's token id (`None` for a front-channel logout).
    jti: Option<String>,
    /// The families revoked so far.
    revoked: Vec<String>,
    /// The step that failed, if one did; none once the logout is remembered and every
    /// session it names ended.
    failed: Option<LogoutStep>,
}

/// The step of a provider name's logout that failed, as its audit record names it
/// (`partial.step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogoutStep {
    /// Remembering the logout, so that a login of it still finishing ends too: nothing
    /// of this provider name's part was done.
    Remember,
    /// Ending the sessions already stored: those in `revoked` were.
    EndSessions,
    /// (Front channel, after every part was done.) Reading whether the browser's own
    /// session was one of those the provider session made, to clear its cookies: none
    /// were cleared.
    BrowserSession,
}

// === impl LogoutStep ===

impl LogoutStep {
    /// The name in the audit record.
    fn as_str(self) -> &'static str {
        match self {
            Self::Remember => "remember",
            Self::EndSessions => "end_sessions",
            Self::BrowserSession => "browser_session",
        }
    }
}

// === impl LogoutPart ===

impl LogoutPart {
    /// `provider`'s part of `logout` (a back-channel one's token `jti`), not begun.
    fn new(provider: &str, logout: Ended<'_>, jti: Option<&str>) -> Self {
        let target = match (logout.sub, logout.sid) {
            (Some(sub), _) => format!("{provider}:{sub}"),
            (None, Some(sid)) => format!("{provider} session {sid}"),
            (None, None) => provider.to_owned(),
        };
        Self {
            provider: provider.to_owned(),
            target,
            sid: logout.sid.map(str::to_owned),
            jti: jti.map(str::to_owned),
            revoked: Vec::new(),
            failed: None,
        }
    }

    /// The record's detail: the provider, what the logout named, the families revoked,
    /// and `partial` when given.
    fn detail(&self, partial: Option<&serde_json::Value>) -> serde_json::Value {
        let mut detail = serde_json::json!({
            "provider": self.provider,
            "sid": self.sid,
            "families_revoked": self.revoked,
        });
        if let Some(jti) = &self.jti {
            detail["jti"] = jti.as_str().into();
        }
        if let Some(partial) = partial {
            detail["partial"] = partial.clone();
        }
        detail
    }
}

/// Records the audit `action` of each part of a provider logout from `ip` that was begun:
/// every part done, and the one that failed, with the families it revoked before it did
/// (none when it failed at its start: its record still says that the provider's logout
/// was tried, and failed). When the logout failed (`failed`) once its parts had begun —
/// in a part, or in the front channel's check of the browser's session after them — each
/// record says so: `partial`, with the provider name and the step that failed, and the
/// reason the answer gave (never a store's own error text, which goes to the log).
fn audit_logout(
    state: &AppState,
    ip: std::net::IpAddr,
    action: &str,
    parts: Vec<LogoutPart>,
    failed: Option<&ApiError>,
) {
    // a failure once the parts began names its part and step; were one not to, the
    // records would still say that the logout was partial
    let partial = failed.map(|e| {
        let at = parts
            .iter()
            .find_map(|p| Some((p.provider.as_str(), p.failed?)));
        serde_json::json!({
            "failed_at": at.map(|(provider, _)| provider),
            "step": at.map(|(_, step)| step.as_str()),
            "reason": e.parts().2,
        })
    });
    for part in parts {
        tracing::info!(
            action,
            provider = %part.provider,
            logout = %part.target,
            sessions = part.revoked.len(),
            partial = partial.is_some(),
            "provider logout"
        );
        state.audit.record(AuditEvent {
            at: state.keys.now(),
            actor: format!("provider:{}", part.provider),
            action: action.to_owned(),
            source_ip: Some(ip.to_string()),
            detail: part.detail(partial.as_ref()).into(),
            target: part.target,
        });
    }
}

/// `part`'s provider's logout, from either channel: remembered first, so that a login of
/// it whose callback is still running ends too ([`super::Sso::remember_logout`]), then
/// the sessions already stored are ended ([`end_sessions`]), into `part`.
async fn end_logout(
    state: &AppState,
    part: &mut LogoutPart,
    logout: Ended<'_>,
    now: time::OffsetDateTime,
) -> Result<(), ApiError> {
    if let Err(e) = state.sso.remember_logout(&part.provider, logout).await {
        part.failed = Some(LogoutStep::Remember);
        return Err(e.into());
    }
    let ended = end_sessions(
        state,
        &part.provider,
        logout.sub,
        logout.sid,
        now,
        &mut part.revoked,
    )
    .await;
    if ended.is_err() {
        part.failed = Some(LogoutStep::EndSessions);
    }
    ended
}

/// Ends the console sessions from `provider` that a logout naming `sub` and/or `sid`
/// names: of the subject, those whose login recorded that `sid` or none (all of them
/// without a `sid`); and every one the logins of the `sid` made (how a logout naming only
/// the `sid` finds them). Adds the families revoked to `revoked` as it goes, so that they
/// are there when a later one fails.
async fn end_sessions(
    state: &AppState,
    provider: &str,
    sub: Option<&str>,
    sid: Option<&str>,
    now: time::OffsetDateTime,
    revoked: &mut Vec<String>,
) -> Result<(), ApiError> {
    let console = &state.sso.settings().console_client_id;
    if let Some(sub) = sub {
        for session in state
            .refresh
            .list_sessions(&format!("{provider}:{sub}"), now)
            .await?
        {
            if session.client_id != *console {
                continue;
            }
            let recorded = session.session.get("idp_sid").and_then(|v| v.as_str());
            let named = match (sid, recorded) {
                (Some(wanted), Some(had)) => wanted == had,
                _ => true,
            };
            if named && state.refresh.revoke_family(&session.family).await? {
                revoked.push(session.family.to_string());
            }
        }
    }
    if let Some(sid) = sid {
        for family in state
            .sso
            .sessions_of_provider_session(provider, sid)
            .await?
        {
            let Ok(id) = family.parse::<crate::refresh::FamilyId>() else {
                continue;
            };
            if !revoked.contains(&family) && state.refresh.revoke_family(&id).await? {
                revoked.push(family);
            }
        }
    }
    Ok(())
}

/// The provider's `end_session_endpoint` with `id_token_hint` (when we have the ID token),
/// `post_logout_redirect_uri` and `client_id` (RP-Initiated Logout 1.0 §2: the hint is
/// RECOMMENDED, and `client_id` lets the provider check the redirect URI without it);
/// `None` when the provider has no such endpoint or cannot be reached (the local logout
/// stands either way).
async fn end_session_url(
    state: &AppState,
    provider: &str,
    id_token: Option<&str>,
) -> Option<String> {
    let provider = state.sso.provider(Some(provider)).ok()?;
    let metadata = provider.metadata().await.ok()?;
    let endpoint = metadata.end_session_endpoint.as_ref()?;
    let mut url = url::Url::parse(endpoint).ok()?;
    {
        let mut query = url.query_pairs_mut();
        if let Some(hint) = id_token {
            query.append_pair("id_token_hint", hint);
        }
        query
            .append_pair(
                "post_logout_redirect_uri",
                &provider.post_logout_redirect_uri,
            )
            .append_pair("client_id", &provider.settings.client_id);
    }
    Some(url.to_string())
}

/// Whether the client is a browser asking for a page (`Accept: text/html`).
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// The refusal as a small page for a browser, as JSON for anything else; same status and
/// headers (`Retry-After`, `Cache-Control`) either way.
fn refusal(headers: &HeaderMap, error: ApiError) -> Response {
    if !wants_html(headers) {
        return error.into_response();
    }
    let (_, code, description) = error.parts();
    let mut response = error.into_response();
    let page = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Sign-in refused</title>\
         </head><body><h1>Sign-in refused</h1><p id=\"error\" data-code=\"{code}\">{}</p>\
         <p><a href=\"/auth/login\">Sign in again</a></p></body></html>",
        escape_html(&description)
    );
    *response.body_mut() = axum::body::Body::from(page);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response.headers_mut().remove(header::CONTENT_LENGTH);
    response
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn redirect_to(status: StatusCode, location: HeaderValue) -> Response {
    let mut response = (status, [(header::LOCATION, location)]).into_response();
    no_store(&mut response);
    response
}

fn no_store(response: &mut Response) {
    crate::oauth::token::no_store(response.headers_mut());
}
