//! The wire types shared by the gateway (which serves them) and the client library
//! (which reads them). See `docs/config-center.md` for the HTTP contract.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::model::Format;
use crate::signing::{self, ReleaseClaims};
use crate::store::Release;

/// One entry of a [`Snapshot`]. Secret values travel in plaintext (over TLS) to nodes
/// authorised for the environment, so `Debug` masks them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// Its declared format.
    pub format: Format,
    /// Whether it is secret.
    pub secret: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value: &dyn std::fmt::Debug = if self.secret { &"******" } else { &self.value };
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("value", value)
            .field("format", &self.format)
            .field("secret", &self.secret)
            .finish()
    }
}

/// A signed release of one (environment, application), as served by
/// `GET /config/v1/{env}/{app}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The environment.
    pub environment: String,
    /// The application.
    pub application: String,
    /// The release version.
    pub version: u64,
    /// When the release was made (whole seconds, RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// [`signing::content_hash`] of `entries`.
    pub content_hash: String,
    /// Every entry, sorted by key.
    pub entries: Vec<Entry>,
    /// The detached compact JWS (`header..signature`) over [`Snapshot::claims`].
    pub signature: String,
}

impl Snapshot {
    /// The snapshot of `release` with plaintext values, not yet signed (`signature` is
    /// empty): the gateway signs [`Snapshot::claims`] and sets `signature` to the detached
    /// JWS ([`signing::detach`]).
    pub fn unsigned(release: &Release) -> Self {
        let entries: Vec<Entry> = release
            .entries
            .iter()
            .map(|e| Entry {
                key: e.key.to_string(),
                value: e.value.expose().to_owned(),
                format: e.format,
                secret: e.secret,
            })
            .collect();
        Self {
            environment: release.environment.to_string(),
            application: release.application.to_string(),
            version: release.version,
            issued_at: release.created_at,
            content_hash: signing::content_hash(&entries),
            entries,
            signature: String::new(),
        }
    }

    /// The claims the signature covers, with the hash recomputed from `entries` (never
    /// taken from the `content_hash` field).
    pub fn claims(&self) -> ReleaseClaims {
        ReleaseClaims {
            environment: self.environment.clone(),
            application: self.application.clone(),
            version: self.version,
            content_hash: signing::content_hash(&self.entries),
            issued_at: self.issued_at.unix_timestamp(),
        }
    }
}

/// The JSON error body of every config endpoint: `{"error": .., "error_description": ..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A machine-readable code (`not_found`, `invalid_request`, `unauthorized`, …).
    pub error: String,
    /// A human-readable description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}
