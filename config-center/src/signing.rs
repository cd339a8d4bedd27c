//! The release signing contract.
//!
//! The gateway signs [`ReleaseClaims`] with its JWT keys as a compact JWS and serves it
//! detached (RFC 7515 Appendix F: `header..signature`); a client recomputes the claims
//! from the snapshot it received, re-attaches them and verifies against the gateway's
//! JWKS.
//!
//! The payload is exactly `serde_json::to_vec(&claims)`: the struct's fields serialize in
//! their fixed declaration order, with no whitespace, so `keyrotation::Keys::sign(&claims,
//! now)` signs the same bytes [`signing_payload`] returns.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::wire::Entry;

/// What a release signature covers. Field order is part of the contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseClaims {
    /// The environment.
    pub environment: String,
    /// The application.
    pub application: String,
    /// The release version.
    pub version: u64,
    /// [`content_hash`] of the release's entries.
    pub content_hash: String,
    /// When the release was made, in Unix seconds.
    pub issued_at: i64,
}

/// The canonical form of one entry inside the hash; field order is fixed.
#[derive(Serialize)]
struct CanonicalEntry<'a> {
    key: &'a str,
    value: &'a str,
    format: &'a str,
    secret: bool,
}

/// SHA-256 (base64url, no padding) over the canonical serialization of `entries`: a JSON
/// array of `{"key","value","format","secret"}` objects, in that field order, sorted by
/// key (byte order), without whitespace.
pub fn content_hash(entries: &[Entry]) -> String {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    let canonical: Vec<CanonicalEntry<'_>> = sorted
        .iter()
        .map(|e| CanonicalEntry {
            key: &e.key,
            value: &e.value,
            format: e.format.as_str(),
            secret: e.secret,
        })
        .collect();
    // serializing plain strings and bools into a Vec cannot fail; an empty hash input
    // would only ever produce a hash that verifies nothing
    let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(Sha256::digest(&bytes))
}

/// The JWS payload for `claims`: their canonical JSON.
pub fn signing_payload(claims: &ReleaseClaims) -> Vec<u8> {
    serde_json::to_vec(claims).unwrap_or_default()
}

/// Why a JWS could not be detached or attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsFormError {
    /// Not three dot-separated parts.
    #[error("a compact JWS has three dot-separated parts")]
    Malformed,
    /// A detached JWS must have an empty payload part.
    #[error("a detached JWS has an empty payload part")]
    NotDetached,
}

/// Turns a compact JWS `h.p.s` into its detached form `h..s`.
pub fn detach(compact: &str) -> Result<String, JwsFormError> {
    let mut parts = compact.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(_), Some(s), None) if !h.is_empty() && !s.is_empty() => {
            Ok(format!("{h}..{s}"))
        }
        _ => Err(JwsFormError::Malformed),
    }
}

/// Re-attaches `payload` to a detached JWS `h..s`, giving the compact `h.p.s`.
pub fn attach(detached: &str, payload: &[u8]) -> Result<String, JwsFormError> {
    let mut parts = detached.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(""), Some(s), None) if !h.is_empty() && !s.is_empty() => {
            Ok(format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(payload)))
        }
        (Some(_), Some(_), Some(_), None) => Err(JwsFormError::NotDetached),
        _ => Err(JwsFormError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Format;

    fn entry(key: &str, value: &str) -> Entry {
        Entry {
            key: key.into(),
            value: value.into(),
            format: Format::Plain,
            secret: false,
        }
    }

    #[test]
    fn the_content_hash_ignores_entry_order_but_not_content() {
        let a = [entry("b", "2"), entry("a", "1")];
        let b = [entry("a", "1"), entry("b", "2")];
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(
            content_hash(&a),
            content_hash(&[entry("a", "1"), entry("b", "3")])
        );
        let mut secret = entry("a", "1");
        secret.secret = true;
        assert_ne!(content_hash(&[entry("a", "1")]), content_hash(&[secret]));
        assert_eq!(content_hash(&a).len(), 43, "SHA-256 in unpadded base64url");
    }

    #[test]
    fn the_signing_payload_has_a_fixed_field_order() {
        let claims = ReleaseClaims {
            environment: "prod".into(),
            application: "orders".into(),
            version: 7,
            content_hash: "h".into(),
            issued_at: 1_700_000_000,
        };
        assert_eq!(
            String::from_utf8(signing_payload(&claims)).unwrap(),
            r#"{"environment":"prod","application":"orders","version":7,"content_hash":"h","issued_at":1700000000}"#
        );
    }

    #[test]
    fn detach_and_attach_are_inverse() {
        let payload = br#"{"a":1}"#;
        let compact = format!("aGVhZGVy.{}.c2ln", URL_SAFE_NO_PAD.encode(payload));
        let detached = detach(&compact).unwrap();
        assert_eq!(detached, "aGVhZGVy..c2ln");
        assert_eq!(attach(&detached, payload).unwrap(), compact);
        assert_eq!(attach(&compact, payload), Err(JwsFormError::NotDetached));
        assert_eq!(detach("a.b"), Err(JwsFormError::Malformed));
    }
}
