//! Client secrets: generated here, shown once, stored only as a keyed hash.
//!
//! A secret is `pcs_` followed by 43 base64url characters: 32 bytes (256 bits) from the
//! system RNG. Because it is that strong, a fast keyed hash is enough to store it —
//! HMAC-SHA256 under the [`ServerKey`] over `("client-secret", client_id, secret)` — and
//! checking one costs microseconds, not the tens of milliseconds a password hash would
//! (which would also make the token endpoint an easy CPU sink). Binding the client id
//! into the hash means a stored hash cannot be moved to another client's row.

use base64::Engine;
use secrecy::SecretString;
use time::OffsetDateTime;

use super::{ClientError, ClientId};
use crate::server_key::{ServerKey, random_bytes};

/// What every secret starts with: lets secret scanners (and people) recognise one.
pub const SECRET_PREFIX: &str = "pcs_";

/// The domain separator of client-secret hashes under the server key.
const DOMAIN: &[u8] = b"client-secret";

/// A fresh secret.
pub(crate) fn generate() -> Result<SecretString, ClientError> {
    let mut bytes = [0u8; 32];
    random_bytes(&mut bytes).map_err(|_| ClientError::Rng)?;
    let mut text = String::with_capacity(SECRET_PREFIX.len() + 43);
    text.push_str(SECRET_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut text);
    Ok(SecretString::from(text))
}

/// The stored form of `secret` for `client_id`.
pub(crate) fn hash(key: &ServerKey, client_id: &[u8], secret: &[u8]) -> [u8; 32] {
    key.mac(&[DOMAIN, client_id, secret])
}

/// Hash of a fresh secret for `id`.
pub(crate) fn hash_for(key: &ServerKey, id: &ClientId, secret: &str) -> [u8; 32] {
    hash(key, id.as_str().as_bytes(), secret.as_bytes())
}

/// The hashes a client's row holds. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SecretHashes {
    /// The current secret's hash.
    pub(crate) current: [u8; 32],
    /// The secret replaced by the last rotation, and until when it still works.
    pub(crate) previous: Option<([u8; 32], OffsetDateTime)>,
}

impl std::fmt::Debug for SecretHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretHashes")
            .field("current", &"<redacted>")
            .field("previous_expires_at", &self.previous.map(|(_, at)| at))
            .finish()
    }
}

impl SecretHashes {
    /// Whether `presented` (the hash of what a client presented) matches the current
    /// secret, or the previous one before its overlap ends. Both comparisons are made, in
    /// constant time, whatever the first one gives.
    pub(crate) fn matches(&self, presented: &[u8; 32], now: OffsetDateTime) -> bool {
        let current = ct_eq(presented, &self.current);
        let previous = match &self.previous {
            Some((hash, until)) => ct_eq(presented, hash) & (now < *until),
            None => {
                // the same work as when there is a previous secret
                std::hint::black_box(ct_eq(presented, &[0u8; 32]));
                false
            }
        };
        current | previous
    }
}

/// Constant-time equality of two hashes.
pub(crate) fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn secrets_are_prefixed_256_bit_base64url_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        let text = a.expose_secret();
        assert_eq!(text.len(), 47);
        let body = text.strip_prefix(SECRET_PREFIX).unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert_ne!(text, b.expose_secret());
    }

    #[test]
    fn the_hash_binds_the_client_id() {
        let (key, _) = ServerKey::generate().unwrap();
        let one = ClientId::parse("one").unwrap();
        let two = ClientId::parse("two").unwrap();
        assert_ne!(hash_for(&key, &one, "s"), hash_for(&key, &two, "s"));
    }

    #[test]
    fn the_previous_secret_works_only_until_its_overlap_ends() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let hashes = SecretHashes {
            current: [1; 32],
            previous: Some(([2; 32], now + time::Duration::hours(1))),
        };
        assert!(hashes.matches(&[1; 32], now));
        assert!(hashes.matches(&[2; 32], now));
        assert!(!hashes.matches(&[2; 32], now + time::Duration::hours(1)));
        assert!(!hashes.matches(&[3; 32], now));
        let debug = format!("{hashes:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("1, 1"),
            "{debug}"
        );
    }
}
