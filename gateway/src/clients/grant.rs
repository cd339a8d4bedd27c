//! Grant types a client may use at the token endpoint.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ClientError;

/// An OAuth2 grant type, spelled as in RFC 6749 on the wire and in storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    /// `client_credentials` (RFC 6749 §4.4): a service acting for itself.
    ClientCredentials,
    /// `refresh_token` (RFC 6749 §6).
    RefreshToken,
    /// `authorization_code` (RFC 6749 §4.1).
    AuthorizationCode,
}

// === impl GrantType ===

impl GrantType {
    /// Every grant type, in storage order.
    pub const ALL: [GrantType; 3] = [
        GrantType::ClientCredentials,
        GrantType::RefreshToken,
        GrantType::AuthorizationCode,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
            GrantType::AuthorizationCode => "authorization_code",
        }
    }

    /// Parses a wire name; `Invalid("grant_type", why)` for any other.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        Self::ALL
            .into_iter()
            .find(|g| g.as_str() == text)
            .ok_or_else(|| {
                ClientError::Invalid(
                    "grant_type",
                    "expected client_credentials, refresh_token or authorization_code".to_owned(),
                )
            })
    }

    /// Parses a space-separated list (the storage form); empty text is the empty set.
    pub(crate) fn parse_set(text: &str) -> Result<BTreeSet<GrantType>, ClientError> {
        text.split(' ')
            .filter(|t| !t.is_empty())
            .map(Self::parse)
            .collect()
    }

    /// The storage form of a set: wire names separated by single spaces.
    pub(crate) fn format_set(set: &BTreeSet<GrantType>) -> String {
        set.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(" ")
    }
}

impl fmt::Display for GrantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GrantType {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grant_types_round_trip_by_wire_name() {
        for g in GrantType::ALL {
            assert_eq!(GrantType::parse(g.as_str()).unwrap(), g);
            assert_eq!(
                serde_json::to_string(&g).unwrap(),
                format!("\"{}\"", g.as_str())
            );
        }
        assert!(GrantType::parse("password").is_err());
        assert!(GrantType::parse("Client_Credentials").is_err());
        let set = GrantType::parse_set("refresh_token client_credentials").unwrap();
        assert_eq!(
            GrantType::format_set(&set),
            "client_credentials refresh_token"
        );
    }
}
