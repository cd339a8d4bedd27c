//! The server's own secret key, for keyed hashes: client secrets and refresh tokens are
//! stored as HMAC-SHA256 under it, so a copy of the database or of Redis alone is not
//! enough to test guesses offline.
//!
//! Production: `tokens.hash_key` (base64, at least 32 bytes; from the environment, e.g.
//! `PORTCULLIS_TOKENS__HASH_KEY`, or a file through `tokens.hash_key_file`). `--dev`: a
//! key generated once into the data directory (mode 0600). Every instance of a cluster
//! must hold the same key.

use aws_lc_rs::hmac;

/// The keyed-hash key. Its bytes never leave this type: no `Debug` of them, no accessor.
#[derive(Clone)]
pub struct ServerKey {
    key: hmac::Key,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKey(..)")
    }
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerKeyError {
    /// Fewer than 32 bytes.
    #[error("the hash key must hold at least 32 bytes (got {0})")]
    TooShort(usize),
    /// Not base64.
    #[error("the hash key is not valid base64")]
    NotBase64,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
}

impl ServerKey {
    /// From raw bytes (at least 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ServerKeyError> {
        if bytes.len() < 32 {
            return Err(ServerKeyError::TooShort(bytes.len()));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// From standard or URL-safe base64, padded or not.
    pub fn from_base64(text: &str) -> Result<Self, ServerKeyError> {
        use base64::Engine;
        let text = text.trim();
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let bytes = engines
            .iter()
            .find_map(|e| e.decode(text).ok())
            .ok_or(ServerKeyError::NotBase64)?;
        Self::from_bytes(&bytes)
    }

    /// A fresh random key (for `--dev` and tests), with its base64 form to store.
    pub fn generate() -> Result<(Self, String), ServerKeyError> {
        use base64::Engine;
        let mut bytes = [0u8; 32];
        random_bytes(&mut bytes)?;
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        let key = Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        };
        Ok((key, text))
    }

    /// HMAC-SHA256 over `parts`, each prefixed by its length so that part boundaries
    /// cannot be shifted (`("ab","c")` and `("a","bc")` differ).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time check that `mac(parts)` equals `expected`.
    pub fn verify(&self, parts: &[&[u8]], expected: &[u8]) -> bool {
        let actual = self.mac(parts);
        aws_lc_rs::constant_time::verify_slices_are_equal(&actual, expected).is_ok()
    }
}

/// Fills `buf` with random bytes from the system RNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), ServerKeyError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| ServerKeyError::Rng)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn part_boundaries_matter_and_verification_is_exact() {
        let (key, _) = ServerKey::generate().unwrap();
        assert_ne!(key.mac(&[b"ab", b"c"]), key.mac(&[b"a", b"bc"]));
        let tag = key.mac(&[b"client-1", b"secret"]);
        assert!(key.verify(&[b"client-1", b"secret"], &tag));
        assert!(!key.verify(&[b"client-1", b"secreT"], &tag));
    }

    #[test]
    fn short_keys_are_refused_and_debug_shows_nothing() {
        assert!(ServerKey::from_bytes(&[0u8; 31]).is_err());
        let (key, text) = ServerKey::generate().unwrap();
        assert!(!format!("{key:?}").contains(&text));
        let again = ServerKey::from_base64(&text).unwrap();
        assert_eq!(again.mac(&[b"x"]), key.mac(&[b"x"]));
    }
}
