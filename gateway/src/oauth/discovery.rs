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
    // the endpoints hang off the issuer without a `/` of its own: an issuer configured
    // as `https://a.example/` must not advertise `https://a.example//oauth2/token`
    let base = issuer.trim_end_matches('/');
    let algs: Vec<&str> = state
        .config
        .accepted_algorithms()
        .iter()
        .map(|a| a.as_str())
        .collect();
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{base}/oauth2/token"),
        "jwks_uri": format!("{base}/oauth2/jwks"),
        "introspection_endpoint": format!("{base}/oauth2/introspect"),
        "revocation_endpoint": format!("{base}/oauth2/revoke"),
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

/// `GET /.well-known/openid-configuration`: the same metadata, plus the two members
/// OpenID Connect Discovery 1.0 §3 requires that RFC 8414 does not. Strict parsers
/// (Nimbus, which Spring Security's `issuer-uri` uses) refuse a provider document without
/// them, and do not fall back to RFC 8414 then. Portcullis issues no ID tokens to clients
/// of its own (console users log in at the upstream provider); its subject identifiers
/// are `public` (one `sub` per client, whatever the audience), and the ID-token
/// algorithms are the ones it accepts.
pub async fn openid_configuration(State(state): State<AppState>) -> Response {
    let mut v = metadata(&state);
    if let Some(doc) = v.as_object_mut() {
        let algs = doc
            .get("access_token_signing_alg_values_supported")
            .cloned()
            .unwrap_or_else(|| json!([]));
        doc.insert("subject_types_supported".to_owned(), json!(["public"]));
        doc.insert("id_token_signing_alg_values_supported".to_owned(), algs);
    }
    cached(v)
}

fn cached(v: Value) -> Response {
    ([(header::CACHE_CONTROL, "public, max-age=3600")], Json(v)).into_response()
}
