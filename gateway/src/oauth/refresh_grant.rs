//! RFC 6749 §6: the `refresh_token` grant. Every use rotates the token (one atomic step in
//! the store); a rotated token re-used after the grace window revokes its family, which is
//! audited.

use std::net::IpAddr;

use secrecy::SecretString;

use crate::audit::AuditEvent;
use crate::clients::{Audience, Client, GrantType, ScopeSet};
use crate::error::{ApiError, OAuthCode};
use crate::oauth::form::Form;
use crate::oauth::token::{
    AccessGrant, TokenResponse, access_token_lifetime, ensure_can_sign, mint, requested_resource,
    requested_scope,
};
use crate::refresh::{RefreshError, Session};
use crate::state::AppState;

/// Rotates the presented refresh token and mints an access token for its session.
pub async fn refresh(
    state: &AppState,
    client: &Client,
    form: &mut Form,
    source_ip: IpAddr,
) -> Result<TokenResponse, ApiError> {
    let presented = form
        .take("refresh_token")
        .map(SecretString::from)
        .ok_or_else(|| ApiError::oauth(OAuthCode::InvalidRequest, "refresh_token is required"))?;
    // a narrower scope (RFC 6749 §6) and a narrower audience (RFC 8707 §2.2) may be asked
    // for; both are parsed before rotating, so a malformed request does not consume the
    // token
    let requested = requested_scope(form)?;
    let resource = requested_resource(form)?;
    // nothing is rotated unless the access token can be signed: a 503 leaves the
    // presented token as it was, to be used again once signing works
    ensure_can_sign(state)?;
    let now = state.keys.now();
    // a wider scope or a resource the grant does not cover is refused before rotating too:
    // refused after a rotation, the client would hold only the rotated token, whose next
    // use past the grace window counts as re-use and revokes the whole session. `inspect`
    // sees only the current token of a live family; anything else goes on to `refresh`,
    // which refuses it or replays a rotation (changing nothing), and the check after it
    // still applies.
    if (!requested.is_empty() || resource.is_some())
        && let Some(session) = state.refresh.inspect(&presented, now).await?
        && session.client_id == client.id.as_str()
    {
        narrowed(state, &session, &requested, resource.as_ref())?;
    }
    let refreshed = match state
        .refresh
        .refresh(&presented, client.id.as_str(), now)
        .await
    {
        Ok(r) => r,
        Err(RefreshError::Reused {
            family,
            subject,
            client_id,
        }) => {
            metrics::counter!("portcullis_refresh_reuse_detected_total").increment(1);
            state.audit.record(AuditEvent {
                at: now,
                actor: format!("client:{client_id}"),
                action: "refresh.reuse_detected".to_owned(),
                target: family.to_string(),
                source_ip: Some(source_ip.to_string()),
                detail: serde_json::json!({ "subject": subject, "family_revoked": true }).into(),
            });
            return Err(ApiError::oauth(
                OAuthCode::InvalidGrant,
                "the refresh token is invalid, expired or revoked",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    metrics::counter!(
        "portcullis_refresh_rotations_total",
        "replayed" => if refreshed.replayed { "true" } else { "false" }
    )
    .increment(1);
    let session = &refreshed.session;
    // the family id, never a token: the family is what an operator revokes
    state.audit.record(AuditEvent {
        at: now,
        actor: format!("client:{}", client.id),
        action: "token.refresh".to_owned(),
        target: session.family.to_string(),
        source_ip: Some(source_ip.to_string()),
        detail: serde_json::json!({ "subject": session.subject, "replayed": refreshed.replayed })
            .into(),
    });
    let (scope, audiences) = narrowed(state, session, &requested, resource.as_ref())?;
    let roles = session
        .session
        .get("roles")
        .and_then(|r| serde_json::from_value::<Vec<String>>(r.clone()).ok())
        .unwrap_or_default();
    mint(
        state,
        AccessGrant {
            subject: session.subject.clone(),
            client_id: session.client_id.clone(),
            audiences,
            scope: scope.to_string(),
            roles,
            session: Some(session.family.to_string()),
            lifetime: access_token_lifetime(state, client),
            grant: GrantType::RefreshToken,
            source_ip,
        },
        Some(refreshed.token),
    )
}

/// The scope and audiences of an access token for `session`: what was asked for, which
/// may only narrow what the session was granted (`invalid_scope`, `invalid_target`
/// otherwise), else all of it. A session granted no audience covers the issuer.
fn narrowed(
    state: &AppState,
    session: &Session,
    requested: &ScopeSet,
    resource: Option<&Audience>,
) -> Result<(ScopeSet, Vec<String>), ApiError> {
    let granted = ScopeSet::parse(&session.scope).unwrap_or_default();
    let scope = if requested.is_empty() {
        granted
    } else if requested.is_subset(&granted) {
        requested.clone()
    } else {
        return Err(ApiError::oauth(
            OAuthCode::InvalidScope,
            "a refresh may only narrow the scope originally granted",
        ));
    };
    let covered = if session.audience.is_empty() {
        vec![state.config.issuer()]
    } else {
        session.audience.clone()
    };
    let audiences = match resource {
        None => covered,
        Some(r) if covered.iter().any(|a| a == r.as_str()) => vec![r.as_str().to_owned()],
        Some(r) => {
            return Err(ApiError::oauth(
                OAuthCode::InvalidTarget,
                format!(
                    "a refresh may only narrow the audience originally granted; \
                     resource not covered: {}",
                    r.as_str()
                ),
            ));
        }
    };
    Ok((scope, audiences))
}
