//! Client identifiers.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ClientError;
use crate::server_key::random_bytes;

/// Shortest and longest identifier.
const MIN_LEN: usize = 3;
const MAX_LEN: usize = 64;

/// An OAuth2 `client_id`: `[a-z0-9][a-z0-9._-]{2,63}`.
///
/// Lower-case only, so that two ids never differ by case alone, and free of characters
/// that would need escaping in a URL path, a log line or HTTP Basic credentials.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientId(String);

// === impl ClientId ===

impl ClientId {
    /// Parses `text`; `Invalid("client_id", why)` when it does not match the pattern.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let invalid = |why: &str| ClientError::Invalid("client_id", why.to_owned());
        if text.len() < MIN_LEN || text.len() > MAX_LEN {
            return Err(invalid("must be 3 to 64 characters long"));
        }
        let mut chars = text.chars();
        if !chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(invalid("must start with a lower-case letter or a digit"));
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)) {
            return Err(invalid(
                "may contain only lower-case letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// A fresh identifier for a client created without one: `client-` and 20 hex digits
    /// (80 random bits: unique, not secret).
    pub fn generate() -> Result<Self, ClientError> {
        let mut bytes = [0u8; 10];
        random_bytes(&mut bytes).map_err(|_| ClientError::Rng)?;
        Ok(Self(format!("client-{}", hex::encode(bytes))))
    }

    /// The identifier.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClientId {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for ClientId {
    type Error = ClientError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<ClientId> for String {
    fn from(id: ClientId) -> Self {
        id.0
    }
}

impl AsRef<str> for ClientId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_follow_the_pattern() {
        for ok in ["abc", "executor-orders", "a.b_c-d", "0xx", &"a".repeat(64)] {
            assert_eq!(ClientId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "ab",
            "Abc",
            "-abc",
            ".abc",
            "ab c",
            "abc/",
            "ab\u{e9}",
            "ab:c",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(
                    ClientId::parse(bad),
                    Err(ClientError::Invalid("client_id", _))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = ClientId::generate().unwrap();
        let b = ClientId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(ClientId::parse(a.as_str()).unwrap(), a);
        assert!(a.as_str().starts_with("client-"));
    }
}
