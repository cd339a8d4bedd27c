//! The claims of an access token (DESIGN.md "Tokens").

use serde::{Deserialize, Serialize};

/// `aud`: one audience as a string, several as an array (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audiences {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Audiences {
    /// From a list: a single audience is written as a string.
    pub fn from_vec(mut v: Vec<String>) -> Self {
        if v.len() == 1 {
            Self::One(v.remove(0))
        } else {
            Self::Many(v)
        }
    }

    /// Every audience.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(a) => vec![a.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// An access token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer.
    pub iss: String,
    /// Subject: the client id for `client_credentials`, the user for console sessions.
    pub sub: String,
    /// Audience.
    pub aud: Audiences,
    /// Expiry (unix seconds).
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Unique id.
    pub jti: String,
    /// Granted scopes, space-separated (RFC 8693 §4.2).
    pub scope: String,
    /// The client the token was issued to (RFC 9068).
    pub client_id: String,
    /// Console roles, for users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// The session (refresh-token family) a user token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}
