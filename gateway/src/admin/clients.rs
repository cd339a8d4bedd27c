//! `/admin/clients`: register, inspect, rotate, disable, enable and delete OAuth clients.
//!
//! Thin handlers over [`ClientStore`](crate::clients::ClientStore). Request bodies are
//! parsed here, field by field, into domain values, so a refusal names the field
//! (`invalid scopes: …`) and nothing reaches the store; the same parser serves the CLI.
//!
//! A client secret leaves the server in exactly two answers — create and rotate-secret —
//! both marked `Cache-Control: no-store`; every other answer, and every audit record, is
//! built from [`ClientView`], which has no secret and no hash in it.
//!
//! Disabling or deleting a client also revokes every refresh token issued to it, at once:
//! the client is disabled first (so no new token can be issued or refreshed for it), then
//! its refresh-token families are revoked, then (delete) its row goes. If the refresh-token
//! store is away the answer is 503 with the client left disabled; repeating the request
//! finishes the job.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::Caller;
use crate::audit::AuditEvent;
use crate::clients::{Audience, Client, ClientError, ClientId, GrantType, NewClient, ScopeSet};
use crate::error::ApiError;
use crate::state::AppState;

/// How long a rotated-out secret keeps working when the request does not say.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// The longest overlap a rotation may ask for: an old secret must not linger for months.
pub const MAX_OVERLAP: Duration = Duration::from_secs(30 * 24 * 3600);

/// The fields a create body may have.
const CREATE_FIELDS: &str = "id, name, grant_types, scopes, audiences, access_token_lifetime";

/// A client as the admin API and the CLI show it: its settings, never a secret or a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientView {
    /// Its `client_id`.
    pub id: String,
    /// Its human name.
    pub name: String,
    /// The grant types it may use.
    pub grant_types: Vec<String>,
    /// The scopes it may be granted.
    pub scopes: Vec<String>,
    /// The audiences it may have tokens for; the first is its default.
    pub audiences: Vec<String>,
    /// Its own access-token lifetime (`"15m"`), or `null` for `tokens.access_token_lifetime`.
    pub access_token_lifetime: Option<String>,
    /// Whether it may authenticate.
    pub enabled: bool,
    /// When it was registered.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Until when the secret replaced by the last rotation still works, if it does.
    #[serde(with = "time::serde::rfc3339::option")]
    pub previous_secret_expires_at: Option<OffsetDateTime>,
}

/// A client with the secret it was just given: the only answers that carry a secret.
/// Deliberately not `Debug`.
#[derive(Serialize)]
pub struct WithSecret<T: Serialize> {
    /// What the secret belongs to.
    #[serde(flatten)]
    pub inner: T,
    /// The secret, shown this once.
    pub secret: String,
}

// === impl ClientView ===

impl ClientView {
    /// The view of `client` at `now`.
    pub fn new(client: &Client, now: OffsetDateTime) -> Self {
        Self {
            id: client.id.to_string(),
            name: client.name.clone(),
            grant_types: client
                .grant_types
                .iter()
                .map(|g| g.as_str().to_owned())
                .collect(),
            scopes: client
                .scopes
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
            audiences: client.audiences.iter().map(|a| a.to_string()).collect(),
            access_token_lifetime: client.access_token_lifetime.map(format_duration),
            enabled: client.enabled,
            created_at: client.created_at,
            updated_at: client.updated_at,
            previous_secret_expires_at: client.previous_secret_expires_at(now),
        }
    }
}

impl<T: Serialize> WithSecret<T> {
    /// Pairs `inner` with `secret`.
    pub fn new(inner: T, secret: &SecretString) -> Self {
        Self {
            inner,
            secret: secret.expose_secret().to_owned(),
        }
    }
}

// === handlers ===

/// `GET /admin/clients`: every client, by id, without secrets.
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let now = state.keys.now();
    let clients: Vec<ClientView> = state
        .clients
        .list()
        .await?
        .iter()
        .map(|c| ClientView::new(c, now))
        .collect();
    Ok(Json(json!({ "clients": clients })))
}

/// `POST /admin/clients`: registers a client; 201 with its secret, shown this once.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let new = parse_new_client(json_object(&body)?)?;
    let now = state.keys.now();
    let (client, secret) = state.clients.create(new, now).await?;
    let view = ClientView::new(&client, now);
    audit(
        &state,
        &caller,
        "client.create",
        &view.id,
        settings_detail(&view),
    );
    let location = format!("/admin/clients/{}", view.id);
    Ok(secret_response(
        StatusCode::CREATED,
        Some(location),
        WithSecret::new(view, &secret),
    ))
}

/// `GET /admin/clients/{id}`: one client, without secrets.
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ClientView>, ApiError> {
    let id = parse_id(&id)?;
    let client = state.clients.get(&id).await?;
    Ok(Json(ClientView::new(&client, state.keys.now())))
}

/// What a rotation reports besides the secret.
#[derive(Debug, Serialize)]
pub struct Rotated {
    /// The client.
    pub id: String,
    /// Until when the replaced secret still works; `null`: it stopped at once.
    #[serde(with = "time::serde::rfc3339::option")]
    pub previous_secret_expires_at: Option<OffsetDateTime>,
}

/// `POST /admin/clients/{id}/rotate-secret`: a new secret, shown once; the old one works
/// for `overlap` more (default 24 h, `"0s"`: stops at once).
pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut fields = json_object(&body)?;
    let overlap = match fields.remove("overlap") {
        None | Some(Value::Null) => DEFAULT_OVERLAP,
        Some(v) => parse_overlap(&v)?,
    };
    no_more_fields(fields, "overlap")?;
    let now = state.keys.now();
    let secret = state.clients.rotate_secret(&id, overlap, now).await?;
    let until = overlap_end(now, overlap);
    audit(
        &state,
        &caller,
        "client.rotate_secret",
        id.as_str(),
        json!({ "overlap": format_duration(overlap), "previous_secret_expires_at": until.map(rfc3339) }),
    );
    let rotated = Rotated {
        id: id.to_string(),
        previous_secret_expires_at: until,
    };
    Ok(secret_response(
        StatusCode::OK,
        None,
        WithSecret::new(rotated, &secret),
    ))
}

/// `POST /admin/clients/{id}/disable`: the client is refused from now on, every refresh
/// token issued to it is revoked, and every access token issued to it until now is cut
/// off ([`crate::cutoff`]).
pub async fn disable(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    no_more_fields(json_object(&body)?, "(none)")?;
    let (revoked, first) = disable_and_revoke(&state, &caller, &id, "client.disable").await?;
    Ok(Json(json!({
        "id": id.as_str(),
        "enabled": false,
        "sessions_revoked": revoked,
        "tokens_issued_before": rfc3339(first),
    })))
}

/// `POST /admin/clients/{id}/revoke-tokens`: every access token issued to the client until
/// now is refused from now on, on every instance within [`crate::cutoff::RELOAD_INTERVAL`]
/// (at once on this one); the client itself stays enabled and gets new tokens (from the
/// next second). For a token that leaked, with the secret rotated or not.
pub async fn revoke_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    no_more_fields(json_object(&body)?, "(none)")?;
    state.clients.get(&id).await?;
    let first = cut_tokens(&state, &id, state.keys.now()).await?;
    audit(
        &state,
        &caller,
        "client.revoke_tokens",
        id.as_str(),
        json!({ "tokens_issued_before": rfc3339(first) }),
    );
    Ok(Json(json!({
        "id": id.as_str(),
        "tokens_issued_before": rfc3339(first),
    })))
}

/// Cuts off the access tokens issued to `id` until `until`; returns the first instant
/// whose tokens are accepted again.
async fn cut_tokens(
    state: &AppState,
    id: &ClientId,
    until: OffsetDateTime,
) -> Result<OffsetDateTime, ApiError> {
    let longest = crate::cutoff::longest_lifetime(&state.config);
    Ok(state
        .keys
        .cutoffs()
        .cut(&state.db, id.as_str(), until, longest)
        .await?)
}

/// `POST /admin/clients/{id}/enable`: the client may authenticate again (its revoked
/// refresh tokens stay revoked).
pub async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    no_more_fields(json_object(&body)?, "(none)")?;
    state.clients.enable(&id, state.keys.now()).await?;
    audit(&state, &caller, "client.enable", id.as_str(), json!({}));
    Ok(Json(json!({ "id": id.as_str(), "enabled": true })))
}

/// `DELETE /admin/clients/{id}`: disables the client, revokes its refresh tokens, then
/// removes it for good.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    // disabled first: from here on no token can be issued to it while the rest happens
    let (revoked, _) = disable_and_revoke(&state, &caller, &id, "client.delete").await?;
    if let Err(e) = state.clients.delete(&id).await {
        // what did happen is on record: disabled, sessions revoked, still there
        audit(
            &state,
            &caller,
            "client.disable",
            id.as_str(),
            json!({ "for": "client.delete", "sessions_revoked": revoked }),
        );
        return Err(e.into());
    }
    audit(
        &state,
        &caller,
        "client.delete",
        id.as_str(),
        json!({ "sessions_revoked": revoked }),
    );
    Ok(Json(json!({
        "id": id.as_str(),
        "deleted": true,
        "sessions_revoked": revoked,
    })))
}

/// Disables `id` and revokes its refresh-token families; returns how many there were.
/// `purpose` is the caller's action: `client.disable` is recorded here, a delete records
/// its own. A failed revocation is recorded here as `client.disable` (with the purpose and
/// the failure, no count) and answered 503.
async fn disable_and_revoke(
    state: &AppState,
    caller: &Caller,
    id: &ClientId,
    purpose: &str,
) -> Result<(usize, OffsetDateTime), ApiError> {
    let now = state.keys.now();
    state.clients.disable(id, now).await?;
    // both are tried whatever the other does, and what happened is on record
    let cut = cut_tokens(state, id, now + crate::cutoff::after_disable(&state.config)).await;
    let revoked = state.refresh.revoke_client(id.as_str()).await;
    let mut failure = json!({ "for": purpose,
        "sessions_revoked": revoked.as_ref().ok(),
        "tokens_issued_before": cut.as_ref().ok().map(|t| rfc3339(*t)) });
    let mut fail = |error: &str| {
        failure["error"] = json!(error);
        audit(state, caller, "client.disable", id.as_str(), failure.take());
    };
    match (cut, revoked) {
        (Ok(first), Ok(n)) => {
            if purpose == "client.disable" {
                audit(
                    state,
                    caller,
                    "client.disable",
                    id.as_str(),
                    json!({ "sessions_revoked": n, "tokens_issued_before": rfc3339(first) }),
                );
            }
            Ok((n, first))
        }
        (Err(e), _) => {
            fail("the database is unavailable: access tokens were not cut off; repeat the request");
            Err(e)
        }
        (Ok(_), Err(e)) => {
            fail("the refresh-token store is unavailable; repeat the request");
            Err(e.into())
        }
    }
}

// === parsing (shared with the CLI) ===

/// Parses a create body into a [`NewClient`]. Fields: `id` (optional), `name`,
/// `grant_types` (array, default `["client_credentials"]`), `scopes` (array, default
/// none), `audiences` (array, default none), `access_token_lifetime` (a duration string
/// such as `"15m"`, default the configured one). Unknown fields are refused.
pub fn parse_new_client(mut fields: Map<String, Value>) -> Result<NewClient, ClientError> {
    let id = match fields.remove("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_id(string(&v, "id")?)?),
    };
    let name = match fields.remove("name") {
        None | Some(Value::Null) => return Err(invalid("name", "required")),
        Some(v) => string(&v, "name")?.to_owned(),
    };
    let grant_types = match fields.remove("grant_types") {
        None | Some(Value::Null) => [GrantType::ClientCredentials].into_iter().collect(),
        Some(v) => strings(&v, "grant_types")?
            .into_iter()
            .map(|g| GrantType::parse(g).map_err(|e| rename(e, "grant_types")))
            .collect::<Result<BTreeSet<_>, _>>()?,
    };
    let scopes = match fields.remove("scopes") {
        None | Some(Value::Null) => ScopeSet::new(),
        Some(v) => parse_scopes(&strings(&v, "scopes")?)?,
    };
    let audiences = match fields.remove("audiences") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => strings(&v, "audiences")?
            .into_iter()
            .map(|a| Audience::parse(a).map_err(|e| rename(e, "audiences")))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let access_token_lifetime = match fields.remove("access_token_lifetime") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_duration(
            string(&v, "access_token_lifetime")?,
            "access_token_lifetime",
        )?),
    };
    no_more_fields(fields, CREATE_FIELDS)?;
    Ok(NewClient {
        id,
        name,
        grant_types,
        scopes,
        audiences,
        access_token_lifetime,
    })
}

/// Parses a client id from a path or a body; refusals name the field `id`.
pub fn parse_id(text: &str) -> Result<ClientId, ClientError> {
    ClientId::parse(text).map_err(|e| rename(e, "id"))
}

/// Parses a rotation overlap: a duration string from `"0s"` to `"30d"`.
pub fn parse_overlap(value: &Value) -> Result<Duration, ClientError> {
    let overlap = parse_duration(string(value, "overlap")?, "overlap")?;
    if overlap > MAX_OVERLAP {
        return Err(invalid("overlap", "at most 30 days"));
    }
    Ok(overlap)
}

/// When a secret rotated out at `now` with `overlap` stops working (none for zero), to the
/// millisecond as stored.
pub fn overlap_end(now: OffsetDateTime, overlap: Duration) -> Option<OffsetDateTime> {
    if overlap.is_zero() {
        return None;
    }
    let at = now + overlap;
    Some(
        at.replace_nanosecond(at.nanosecond() / 1_000_000 * 1_000_000)
            .unwrap_or(at),
    )
}

/// `15m`, `1h 30m`, `0s`.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn parse_scopes(items: &[&str]) -> Result<ScopeSet, ClientError> {
    // each item alone must be one scope (no spaces); the set's own parse then applies the
    // count limit
    for item in items {
        crate::clients::Scope::parse(item).map_err(|e| rename(e, "scopes"))?;
    }
    ScopeSet::parse(&items.join(" ")).map_err(|e| rename(e, "scopes"))
}

fn parse_duration(text: &str, field: &'static str) -> Result<Duration, ClientError> {
    humantime::parse_duration(text).map_err(|e| {
        invalid(
            field,
            &format!("expected a duration such as \"15m\" or \"1h\" ({e})"),
        )
    })
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ClientError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid("request body", "expected a JSON object")),
        Err(e) => Err(invalid(
            "request body",
            &format!("expected a JSON object ({e})"),
        )),
    }
}

fn no_more_fields(fields: Map<String, Value>, allowed: &str) -> Result<(), ClientError> {
    match fields.keys().next() {
        None => Ok(()),
        Some(k) => Err(invalid(
            "request body",
            &format!("unknown field {k:?} (allowed: {allowed})"),
        )),
    }
}

fn string<'a>(value: &'a Value, field: &'static str) -> Result<&'a str, ClientError> {
    value
        .as_str()
        .ok_or_else(|| invalid(field, "expected a string"))
}

fn strings<'a>(value: &'a Value, field: &'static str) -> Result<Vec<&'a str>, ClientError> {
    let not_strings = || invalid(field, "expected an array of strings");
    value
        .as_array()
        .ok_or_else(not_strings)?
        .iter()
        .map(|v| v.as_str().ok_or_else(not_strings))
        .collect()
}

fn invalid(field: &'static str, why: &str) -> ClientError {
    ClientError::Invalid(field, why.to_owned())
}

/// The same refusal, naming the request's field rather than the domain's.
fn rename(e: ClientError, field: &'static str) -> ClientError {
    match e {
        ClientError::Invalid(_, why) => ClientError::Invalid(field, why),
        e => e,
    }
}

// === responses and audit ===

fn secret_response(status: StatusCode, location: Option<String>, body: impl Serialize) -> Response {
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    // the body holds a secret: no cache anywhere may keep it
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Some(v) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(header::LOCATION, v);
    }
    response
}

/// The secret-free settings of a client, for audit records.
pub fn settings_detail(view: &ClientView) -> Value {
    json!({
        "name": view.name,
        "grant_types": view.grant_types,
        "scopes": view.scopes,
        "audiences": view.audiences,
        "access_token_lifetime": view.access_token_lifetime,
    })
}

/// Records an admin-API write. `detail` must be secret-free.
pub(super) fn audit(state: &AppState, caller: &Caller, action: &str, target: &str, detail: Value) {
    state.audit.record(AuditEvent {
        at: state.keys.now(),
        actor: caller.actor.clone(),
        action: action.to_owned(),
        target: target.to_owned(),
        source_ip: Some(caller.ip.to_string()),
        detail: detail.into(),
    });
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(v: Value) -> Result<NewClient, ClientError> {
        parse_new_client(v.as_object().unwrap().clone())
    }

    fn field_of(r: Result<NewClient, ClientError>) -> &'static str {
        match r {
            Err(ClientError::Invalid(f, _)) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_body_parses_into_domain_values() {
        let new = parse(json!({
            "id": "executor-orders", "name": "Orders executor",
            "grant_types": ["client_credentials", "refresh_token"],
            "scopes": ["jobs:run", "config:read:prod"], "audiences": ["xxl-job-admin"],
            "access_token_lifetime": "15m",
        }))
        .unwrap();
        assert_eq!(new.id.unwrap().as_str(), "executor-orders");
        assert_eq!(new.grant_types.len(), 2);
        assert_eq!(new.scopes.to_string(), "config:read:prod jobs:run");
        assert_eq!(new.access_token_lifetime, Some(Duration::from_secs(900)));
    }

    #[test]
    fn a_minimal_body_takes_the_defaults() {
        let new = parse(json!({ "name": "x" })).unwrap();
        assert!(new.id.is_none());
        assert!(new.grant_types.contains(&GrantType::ClientCredentials));
        assert!(new.scopes.is_empty() && new.audiences.is_empty());
        assert!(new.access_token_lifetime.is_none());
    }

    #[test]
    fn refusals_name_the_request_field() {
        for (body, field) in [
            (json!({}), "name"),
            (json!({ "name": 5 }), "name"),
            (json!({ "name": "x", "id": "Bad Id" }), "id"),
            (
                json!({ "name": "x", "grant_types": ["password"] }),
                "grant_types",
            ),
            (
                json!({ "name": "x", "grant_types": "client_credentials" }),
                "grant_types",
            ),
            (json!({ "name": "x", "scopes": ["a b"] }), "scopes"),
            (json!({ "name": "x", "scopes": "a b" }), "scopes"),
            (json!({ "name": "x", "audiences": ["no way"] }), "audiences"),
            (
                json!({ "name": "x", "access_token_lifetime": 900 }),
                "access_token_lifetime",
            ),
            (
                json!({ "name": "x", "access_token_lifetime": "soon" }),
                "access_token_lifetime",
            ),
            (json!({ "name": "x", "secret": "mine" }), "request body"),
        ] {
            assert_eq!(field_of(parse(body.clone())), field, "{body}");
        }
    }

    #[test]
    fn overlaps_are_bounded_and_end_on_a_millisecond() {
        assert_eq!(parse_overlap(&json!("0s")).unwrap(), Duration::ZERO);
        assert_eq!(parse_overlap(&json!("30d")).unwrap(), MAX_OVERLAP);
        assert!(parse_overlap(&json!("31d")).is_err());
        assert!(parse_overlap(&json!(60)).is_err());
        let now = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).unwrap();
        assert_eq!(overlap_end(now, Duration::ZERO), None);
        let end = overlap_end(now, Duration::from_secs(1)).unwrap();
        assert_eq!(end.unix_timestamp_nanos(), 1_800_000_001_123_000_000);
    }
}
