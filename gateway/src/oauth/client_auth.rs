//! Client authentication at the OAuth endpoints (RFC 6749 §2.3.1): HTTP Basic
//! (`client_secret_basic`, id and secret form-urlencoded inside) or the body
//! (`client_secret_post`) — exactly one of them. A client authenticating by Basic may
//! still name itself in the body's `client_id` (RFC 6749 §3.2.1; some libraries do):
//! accepted when it is the id of the Basic credentials.

use axum::http::{HeaderMap, header};
use base64::Engine;
use secrecy::SecretString;

use crate::audit::AuditEvent;
use crate::clients::{Client, ClientError};
use crate::error::{ApiError, OAuthCode};
use crate::oauth::form::{Form, decode_component};
use crate::protect::{Kind, Verdict};
use crate::state::AppState;

/// Credentials as presented, before checking.
pub struct Presented {
    /// The claimed client id.
    pub client_id: String,
    /// The secret.
    pub secret: SecretString,
    /// Which method the client used (for metrics).
    pub method: &'static str,
}

/// Extracts the credentials, refusing requests that use both methods or neither, or that
/// name another client in the body than in Basic. Removes `client_id` and
/// `client_secret` from the form.
pub fn presented(headers: &HeaderMap, form: &mut Form) -> Result<Presented, ApiError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .map(|v| parse_basic(v.as_bytes()))
        .transpose()?;
    let body_id = form.take("client_id");
    let body_secret = form.take("client_secret");
    match (basic, body_id, body_secret) {
        (Some(_), _, Some(_)) => Err(ApiError::oauth(
            OAuthCode::InvalidRequest,
            "use one client authentication method, not both",
        )),
        (Some((client_id, _)), Some(named), None) if named != client_id => Err(ApiError::oauth(
            OAuthCode::InvalidRequest,
            "client_id names another client than the Basic credentials",
        )),
        (Some((client_id, secret)), Some(_), None) => Ok(Presented {
            client_id,
            secret,
            method: "client_secret_basic",
        }),
        (Some((client_id, secret)), None, None) => Ok(Presented {
            client_id,
            secret,
            method: "client_secret_basic",
        }),
        (None, Some(client_id), Some(secret)) => Ok(Presented {
            client_id,
            secret: SecretString::from(secret),
            method: "client_secret_post",
        }),
        (None, _, _) => Err(ApiError::oauth(
            OAuthCode::InvalidClient,
            "client authentication is required",
        )),
    }
}

fn parse_basic(value: &[u8]) -> Result<(String, SecretString), ApiError> {
    let bad = || ApiError::oauth(OAuthCode::InvalidClient, "malformed Basic credentials");
    let text = std::str::from_utf8(value).map_err(|_| bad())?;
    let (scheme, rest) = text.split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(ApiError::oauth(
            OAuthCode::InvalidClient,
            "unsupported authorization scheme; use Basic",
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(bad)?;
    let id = decode_component(id).map_err(|_| bad())?;
    let secret = decode_component(secret).map_err(|_| bad())?;
    if id.is_empty() || secret.is_empty() {
        return Err(bad());
    }
    Ok((id, SecretString::from(secret)))
}

/// Authenticates the presented credentials against the client store, with the per-client
/// failure counter on the failure path only.
///
/// The secret is checked first (a keyed hash compared in constant time: microseconds), and
/// a correct secret is never refused by the counter, nor does it read or write it. A client
/// secret is 256 random bits, so the counter protects nothing a correct secret could be
/// guessed through; refusing the correct secret of a locked client id would only let
/// anyone who knows a service's client id (it is in every token the service shows) lock
/// that service out of its tokens. It also keeps Redis off the path of every token issued.
///
/// A wrong secret is then held against the id: refused with 429 while the id backs off or
/// is locked (not counted), counted and answered 401 otherwise, whether or not the client
/// exists. When Redis is away the counters are skipped (logged, counted); the per-IP
/// buckets still apply. (Human passwords keep the check before the secret, and fail
/// closed.)
pub async fn authenticate(
    state: &AppState,
    presented: &Presented,
    source_ip: Option<std::net::IpAddr>,
) -> Result<std::sync::Arc<Client>, ApiError> {
    let now = state.keys.now();
    let id = presented.client_id.as_str();
    match state.clients.authenticate(id, &presented.secret, now).await {
        Ok(client) => Ok(client),
        Err(ClientError::InvalidClient) => Err(failed(state, id, now, source_ip).await),
        Err(e) => Err(e.into()),
    }
}

/// A wrong secret (or an unknown id) for `id`: the refusal it meets, or the failure it counts.
async fn failed(
    state: &AppState,
    id: &str,
    now: time::OffsetDateTime,
    source_ip: Option<std::net::IpAddr>,
) -> ApiError {
    match state.lockout.check(Kind::Client, id, now).await {
        Ok(Verdict::Refused(refusal)) => {
            metrics::counter!("portcullis_login_total", "method" => "client_secret", "outcome" => "locked", "reason" => "too_many_attempts").increment(1);
            return ApiError::too_many_attempts(refusal);
        }
        Ok(Verdict::Allowed { .. }) => {}
        Err(e) => counters_unavailable(&e),
    }
    metrics::counter!("portcullis_client_auth_failures_total").increment(1);
    metrics::counter!("portcullis_login_total", "method" => "client_secret", "outcome" => "failure", "reason" => "invalid_client").increment(1);
    let next = state
        .lockout
        .failed(Kind::Client, id, now)
        .await
        .unwrap_or_else(|e| {
            counters_unavailable(&e);
            None
        });
    // the id as presented only when it is a well-formed client id: a caller that swapped
    // id and secret must not leave its secret in the trail
    let who = crate::clients::ClientId::parse(id)
        .map_or_else(|_| "(malformed)".to_owned(), |c| c.as_str().to_owned());
    state.audit.record(AuditEvent {
        at: now,
        actor: format!("client:{who}"),
        action: "login.failure".to_owned(),
        target: who.clone(),
        source_ip: source_ip.map(|ip| ip.to_string()),
        detail: serde_json::json!({ "kind": "client", "reason": "invalid_client" }).into(),
    });
    if let Some(refusal) = next.filter(|r| r.locked) {
        metrics::counter!("portcullis_login_lockouts_total", "kind" => "client").increment(1);
        state.audit.record(AuditEvent {
            at: now,
            actor: format!("client:{who}"),
            action: "login.lockout".to_owned(),
            target: who,
            source_ip: source_ip.map(|ip| ip.to_string()),
            detail: serde_json::json!({
                "kind": "client",
                "locked_for_secs": refusal.retry_after.as_secs(),
            })
            .into(),
        });
    }
    ApiError::oauth(OAuthCode::InvalidClient, "client authentication failed")
}

fn counters_unavailable(e: &crate::protect::lockout::LockoutUnavailable) {
    metrics::counter!("portcullis_lockout_unavailable_total", "kind" => "client").increment(1);
    tracing::warn!(error = %crate::error::chain(e), "login-attempt counters unavailable; client checked without them");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::oauth::token::TOKEN_PARAMS;
    use axum::http::HeaderValue;
    use secrecy::ExposeSecret;

    fn basic(raw: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        h
    }

    #[test]
    fn basic_parts_are_form_decoded() {
        let mut form = Form::parse(b"grant_type=client_credentials", TOKEN_PARAMS).unwrap();
        let p = presented(&basic("my%2Bclient:s%3Acret"), &mut form).unwrap();
        assert_eq!(p.client_id, "my+client");
        assert_eq!(p.secret.expose_secret(), "s:cret");
        assert_eq!(p.method, "client_secret_basic");
    }

    #[test]
    fn both_methods_or_none_are_refused() {
        let mut form = Form::parse(b"client_id=a&client_secret=b", TOKEN_PARAMS).unwrap();
        assert!(presented(&basic("a:b"), &mut form).is_err());
        let mut form = Form::parse(b"client_secret=b", TOKEN_PARAMS).unwrap();
        assert!(presented(&basic("a:b"), &mut form).is_err());
        let mut form = Form::parse(b"grant_type=x", TOKEN_PARAMS).unwrap();
        let err = presented(&HeaderMap::new(), &mut form).err().unwrap();
        assert!(matches!(
            err,
            ApiError::OAuth {
                code: OAuthCode::InvalidClient,
                ..
            }
        ));
        let mut form = Form::parse(b"client_id=a", TOKEN_PARAMS).unwrap();
        assert!(presented(&HeaderMap::new(), &mut form).is_err());
    }

    #[test]
    fn basic_may_come_with_its_own_client_id_in_the_body_but_not_another() {
        let mut form = Form::parse(b"grant_type=x&client_id=a", TOKEN_PARAMS).unwrap();
        let p = presented(&basic("a:b"), &mut form).unwrap();
        assert_eq!(
            (p.client_id.as_str(), p.method),
            ("a", "client_secret_basic")
        );
        assert_eq!(form.take("client_id"), None);
        let mut form = Form::parse(b"grant_type=x&client_id=c", TOKEN_PARAMS).unwrap();
        let err = presented(&basic("a:b"), &mut form).err().unwrap();
        assert!(matches!(
            err,
            ApiError::OAuth {
                code: OAuthCode::InvalidRequest,
                ..
            }
        ));
    }
}
