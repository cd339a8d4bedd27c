//! `/admin/sessions`: a user's live sessions (refresh-token families), and signing them
//! out — one session, or everywhere.
//!
//! Sessions are listed by subject only: the refresh store indexes families by subject and
//! by client, and a listing of everyone's sessions would be neither cheap nor needed. A
//! session's `family` id is public (it is in every token of the family, and in the audit
//! trail); no token or hash is ever shown.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Caller;
use super::clients::audit;
use crate::error::ApiError;
use crate::refresh::FamilyId;
use crate::state::AppState;

/// Longest subject accepted in a query.
const MAX_SUBJECT_LEN: usize = 256;

/// The query of `/admin/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectQuery {
    /// Whose sessions.
    pub subject: Option<String>,
}

/// `GET /admin/sessions?subject=…`: the subject's live sessions, oldest first. A console
/// session past `sso.session_max_lifetime` is not live, though its family is revoked only
/// when something next tries to renew it: it is left out.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<SubjectQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let subject = subject(query)?;
    let now = state.keys.now();
    let console = &state.sso.settings().console_client_id;
    let mut sessions = state.refresh.list_sessions(&subject, now).await?;
    sessions.retain(|s| {
        s.client_id != *console || now < crate::sso::session::session_end(&state, s.auth_time)
    });
    Ok(Json(json!({ "subject": subject, "sessions": sessions })))
}

/// `DELETE /admin/sessions?subject=…`: "sign out everywhere" — revokes every session of
/// the subject.
pub async fn revoke_all(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<SubjectQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let subject = subject(query)?;
    let revoked = state.refresh.revoke_subject(&subject).await?;
    audit(
        &state,
        &caller,
        "session.revoke_all",
        &subject,
        json!({ "sessions_revoked": revoked }),
    );
    Ok(Json(
        json!({ "subject": subject, "sessions_revoked": revoked }),
    ))
}

/// `DELETE /admin/sessions/{family}`: revokes one session; 404 when it is not live.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(family): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let family = FamilyId::parse(&family).map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            "invalid family: not a session id (22 base64url characters)",
        )
    })?;
    if !state.refresh.revoke_family(&family).await? {
        return Err(ApiError::NotFound);
    }
    audit(
        &state,
        &caller,
        "session.revoke",
        &family.to_string(),
        json!({}),
    );
    Ok(Json(json!({ "family": family, "revoked": true })))
}

fn subject(query: Result<Query<SubjectQuery>, QueryRejection>) -> Result<String, ApiError> {
    let bad = |why: String| ApiError::bad_request("invalid_request", why);
    let Query(q) = query.map_err(|e| bad(format!("invalid query: {}", e.body_text())))?;
    let subject = q
        .subject
        .ok_or_else(|| bad("invalid subject: required (?subject=…)".to_owned()))?;
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(bad(format!(
            "invalid subject: 1 to {MAX_SUBJECT_LEN} bytes"
        )));
    }
    if subject.chars().any(char::is_control) {
        return Err(bad("invalid subject: no control characters".to_owned()));
    }
    Ok(subject)
}
