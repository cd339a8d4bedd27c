//! Discovery documents: RFC 8414 and OpenID Provider configuration, listing exactly what
//! this server supports.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::AppState;

fn metadata(state: &AppState) -> Value {
    let issuer = state.config.issuer();
    let algs: Vec<&str> = state
        .config
        .accepted_algorithms()
        .iter()
        .map(|a| a.as_str())
        .collect();
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/oauth2/token"),
        "jwks_uri": format!("{issuer}/oauth2/jwks"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "grant_types_supported": ["client_credentials", "refresh_token"],
        // REQUIRED by RFC 8414 §2; empty: there is no authorization endpoint here
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "access_token_signing_alg_values_supported": algs,
    })
}

/// `GET /.well-known/oauth-authorization-server`
pub async fn authorization_server(State(state): State<AppState>) -> Response {
    cached(metadata(&state))
}

/// `GET /.well-known/openid-configuration`: the same metadata; Portcullis issues no ID
/// tokens to clients of its own (console users log in at the upstream provider), so the
/// OpenID-only members are absent rather than invented.
pub async fn openid_configuration(State(state): State<AppState>) -> Response {
    cached(metadata(&state))
}

fn cached(v: Value) -> Response {
    ([(header::CACHE_CONTROL, "public, max-age=3600")], Json(v)).into_response()
}
