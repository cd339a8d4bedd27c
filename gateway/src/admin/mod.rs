//! The admin API on the admin listener: signing keys, clients, sessions, the audit trail.
//!
//! The admin listener is loopback by default. When `admin.token` is set (required for a
//! non-loopback listener) every `/admin/*` request must carry it as a bearer token.

use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use secrecy::ExposeSecret;
use serde::Deserialize;
use std::net::SocketAddr;

use crate::audit::AuditEvent;
use crate::error::ApiError;
use crate::state::AppState;

pub mod audit;
pub mod clients;
pub mod sessions;

/// The scope that grants the admin API to an access token.
pub const ADMIN_SCOPE: &str = crate::clients::ADMIN_SCOPE;

/// The audit actor of a write made with the static `admin.token`, or on a loopback
/// listener without one: whoever holds the token or the host, not known by name.
pub const OPERATOR_ACTOR: &str = "operator:admin-api";

/// Who made an admin-API request, as [`require_admin`] admitted it, and from where: the
/// actor and source address of its audit record.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `client:<id>` or `user:<sub>` for an access token, [`OPERATOR_ACTOR`] otherwise.
    pub actor: String,
    /// The peer of the admin listener.
    pub ip: std::net::IpAddr,
}

/// The actor [`require_admin`] found, in the request's extensions.
#[derive(Debug, Clone)]
struct Actor(String);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // both are always there behind `require_admin` on the admin listener; a handler
        // reached some other way refuses rather than audit an unknown actor
        let actor = parts
            .extensions
            .get::<Actor>()
            .ok_or_else(|| ApiError::Internal("admin request without its caller".into()))?;
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .ok_or_else(|| ApiError::Internal("admin request without its peer".into()))?;
        Ok(Self {
            actor: actor.0.clone(),
            ip: peer.0.ip(),
        })
    }
}

/// Guards `/admin/*`: the configured `admin.token`, or an access token carrying
/// `portcullis:admin` (e.g. from the bootstrap admin client). Without `admin.token` on a
/// loopback listener, the listener itself is the boundary and requests pass. Puts who
/// was admitted in the request for the audit records ([`Caller`]).
pub async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let authorization = req.headers().get(header::AUTHORIZATION);
    let static_ok = match (&state.config.admin.token, authorization) {
        // the scheme in any case (RFC 7235 §2.1), as for access tokens
        (Some(expected), Some(value)) => {
            crate::authn::bearer_token(value).is_some_and(|presented| {
                aws_lc_rs::constant_time::verify_slices_are_equal(
                    presented.as_bytes(),
                    expected.expose_secret().as_bytes(),
                )
                .is_ok()
            })
        }
        _ => false,
    };
    let actor = if static_ok || (state.config.admin.token.is_none() && authorization.is_none()) {
        OPERATOR_ACTOR.to_owned()
    } else {
        let principal =
            crate::authn::authenticate(&state.keys, authorization, &[ADMIN_SCOPE.to_owned()])
                .await?;
        principal.actor()
    };
    req.extensions_mut().insert(Actor(actor));
    Ok(next.run(req).await)
}

/// `GET /admin/keys`: the ring, each key's state and instants.
pub async fn key_status(State(state): State<AppState>) -> Json<keyrotation::RingStatus> {
    Json(state.keys.status())
}

/// Body of `POST /admin/keys/rotate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Retire the suspect keys at once (they stop verifying everywhere): every key that
    /// still verifies, or only `kid`.
    #[serde(default)]
    pub emergency: bool,
    /// Why; recorded in the ring and the audit log. Required for an emergency.
    pub reason: Option<String>,
    /// With `emergency`: the one key known to be compromised (active, retiring or next).
    pub kid: Option<String>,
}

/// `POST /admin/keys/rotate`: bring the next rotation forward, or an emergency rotation.
pub async fn rotate_keys(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<RotateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    // a reason, when given, is 1 to 500 characters and goes to the audit log; an
    // emergency rotation must give one, and the ring records it as well
    let reason = match req.reason {
        Some(r) if r.trim().is_empty() || r.chars().count() > 500 => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "reason must be 1 to 500 characters",
            ));
        }
        r => r,
    };
    if req.emergency && reason.is_none() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "an emergency rotation needs a reason (1 to 500 characters)",
        ));
    }
    if req.kid.is_some() && !req.emergency {
        return Err(ApiError::bad_request(
            "invalid_request",
            "kid names a compromised key: it goes with \"emergency\": true",
        ));
    }
    let suspects = keyrotation::Suspects::named(req.kid.as_deref())
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    let emergency = if req.emergency { reason.clone() } else { None };
    let outcome = state
        .keys
        .rotate(emergency.clone().map(|note| (note, suspects)))
        .await?;
    state.audit.record(AuditEvent {
        at: state.keys.now(),
        actor: caller.actor,
        action: if emergency.is_some() {
            "key.rotate.emergency"
        } else {
            "key.rotate"
        }
        .to_owned(),
        target: state
            .keys
            .status()
            .active_kid
            .map(|k| k.to_string())
            .unwrap_or_default(),
        source_ip: Some(caller.ip.to_string()),
        detail: serde_json::json!({
            "reason": reason,
            "kid": req.kid,
            "transitions": outcome.transitions,
        })
        .into(),
    });
    Ok(Json(serde_json::json!({
        "transitions": outcome.transitions,
        "ring_version": outcome.version,
        "status": state.keys.status(),
    })))
}
