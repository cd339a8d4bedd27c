//! OAuth2 clients: who may ask the token endpoint for tokens, with which grants, for which
//! scopes and audiences, and how they prove who they are.
//!
//! Values are parsed once, at the edge, into [`ClientId`], [`Scope`]/[`ScopeSet`],
//! [`GrantType`] and [`Audience`]; everything past that carries valid values. Clients live
//! in the `oauth_clients` table (Postgres, or SQLite in `--dev`) behind [`ClientStore`].
//! Secrets are generated here, returned once, and stored only as a keyed hash: see
//! [`secret`](self::secret) for the format and why a fast hash is the right one.
//!
//! This module knows nothing about HTTP; the gateway maps [`ClientError`] to responses
//! (`InvalidClient` → 401 `invalid_client`, `Db` → 503, …).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;

mod audience;
pub mod cache;
mod grant;
mod id;
mod scope;
mod secret;
mod store;

pub use audience::Audience;
pub use grant::GrantType;
pub use id::ClientId;
pub use scope::{Scope, ScopeSet};
pub use secret::SECRET_PREFIX;
pub use store::{ADMIN_CLIENT_ID, ADMIN_SCOPE, ClientStore, REREAD_AFTER};

use secret::SecretHashes;

/// Longest client name.
const MAX_NAME_LEN: usize = 200;
/// Most audiences one client may be allowed.
const MAX_AUDIENCES: usize = 32;
/// Bounds of a per-client access-token lifetime.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What the configuration asks of every client, checked when one is registered or
/// changed.
#[derive(Debug, Clone)]
pub struct ClientRules {
    /// Ids no client may take: `sso.console_client_id`, which console sessions are bound
    /// to. A client holding it could trade console refresh cookies for bearer tokens with
    /// the user's roles, and disabling it would end every console session.
    pub reserved_ids: Vec<String>,
    /// The longest access-token lifetime a client may have: 24 h, and no more than
    /// `keys.overlap` less `tokens.leeway`, so that the key that signed a token still
    /// verifies it until it expires.
    pub max_lifetime: Duration,
}

impl Default for ClientRules {
    /// No reserved id; lifetimes up to 24 h.
    fn default() -> Self {
        Self {
            reserved_ids: Vec::new(),
            max_lifetime: MAX_LIFETIME,
        }
    }
}

impl ClientRules {
    /// The rules `config` sets.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            reserved_ids: vec![config.sso.console_client_id.clone()],
            max_lifetime: config.max_token_lifetime().min(MAX_LIFETIME),
        }
    }
}

/// What went wrong with a client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No client has that id.
    #[error("no such client")]
    NotFound,
    /// A client with that id exists already.
    #[error("a client with that id exists already")]
    AlreadyExists,
    /// The id is `sso.console_client_id`, which no client may have
    /// ([`ClientRules::reserved_ids`]).
    #[error(
        "client id {0} is sso.console_client_id: console sessions are bound to it, so no \
         client may have it"
    )]
    ReservedId(ClientId),
    /// Client authentication failed: unknown id, wrong or expired secret, or a disabled
    /// client — deliberately one error, so callers cannot tell which (RFC 6749 §5.2
    /// `invalid_client`).
    #[error("client authentication failed")]
    InvalidClient,
    /// Bad input: which field, and why (safe to show to the caller).
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, String),
    /// The client may not use this grant type (`unauthorized_client`).
    #[error("the client may not use the {0} grant")]
    UnauthorizedGrant(GrantType),
    /// The request names scopes the client is not allowed (`invalid_scope`); they are
    /// listed.
    #[error("scopes not allowed for this client: {0}")]
    ScopeNotAllowed(ScopeSet),
    /// The requested audience is not one the client may have tokens for
    /// (`invalid_target`, RFC 8707).
    #[error("audience not allowed for this client: {0}")]
    AudienceNotAllowed(Audience),
    /// A stored row does not parse (someone edited the table by hand?): a server fault.
    #[error("client {id} is stored in an unreadable form ({reason})")]
    Corrupt {
        /// The row's id as stored.
        id: String,
        /// What does not parse.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
    /// The database failed (the gateway answers 503).
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// A registered client. Built only by [`ClientStore`]; its secret hashes never leave this
/// module and never appear in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Client {
    /// Its `client_id`.
    pub id: ClientId,
    /// A human name (free text, 1–200 characters, no control characters).
    pub name: String,
    /// The grant types it may use.
    pub grant_types: BTreeSet<GrantType>,
    /// The scopes it may be granted.
    pub scopes: ScopeSet,
    /// The audiences it may have tokens for, without repeats; the first is its default
    /// when a request names none.
    pub audiences: Vec<Audience>,
    /// Its own access-token lifetime; `None`: the configured default.
    pub access_token_lifetime: Option<Duration>,
    /// Disabled clients cannot authenticate.
    pub enabled: bool,
    /// When it was created (millisecond precision).
    pub created_at: OffsetDateTime,
    /// When it was last changed (millisecond precision).
    pub updated_at: OffsetDateTime,
    secrets: SecretHashes,
}

#[cfg(test)]
impl Client {
    /// An enabled client with id `id` and no usable secret, for unit tests.
    #[allow(clippy::unwrap_used)]
    pub(crate) fn for_tests(id: &str) -> Self {
        Self {
            id: ClientId::parse(id).unwrap(),
            name: id.to_owned(),
            grant_types: BTreeSet::from([GrantType::ClientCredentials]),
            scopes: ScopeSet::parse("read").unwrap(),
            audiences: Vec::new(),
            access_token_lifetime: None,
            enabled: true,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            secrets: SecretHashes {
                current: [0u8; 32],
                previous: None,
            },
        }
    }
}

/// What [`ClientStore::create`] needs.
#[derive(Debug, Clone)]
pub struct NewClient {
    /// Its id; `None`: generate one (`client-` and 20 hex digits).
    pub id: Option<ClientId>,
    /// A human name.
    pub name: String,
    /// At least one grant type.
    pub grant_types: BTreeSet<GrantType>,
    /// Allowed scopes (may be empty).
    pub scopes: ScopeSet,
    /// Allowed audiences; the first is the default. At most 32, no repeats.
    pub audiences: Vec<Audience>,
    /// Its own access-token lifetime, whole seconds from 1 s to 24 h and at most
    /// [`ClientRules::max_lifetime`]; `None`: the default.
    pub access_token_lifetime: Option<Duration>,
}

/// A change to a client's settings for [`ClientStore::update`]; `None` fields are left
/// as they are.
#[derive(Debug, Clone, Default)]
pub struct ClientUpdate {
    /// A new name.
    pub name: Option<String>,
    /// New grant types (at least one).
    pub grant_types: Option<BTreeSet<GrantType>>,
    /// New allowed scopes (replaces the set: tokens already issued keep theirs until they
    /// expire).
    pub scopes: Option<ScopeSet>,
    /// New audiences (first is the default).
    pub audiences: Option<Vec<Audience>>,
    /// `Some(None)` clears the override; `Some(Some(d))` sets it.
    pub access_token_lifetime: Option<Option<Duration>>,
}

// === impl Client ===

impl Client {
    /// Whether the client may use `grant`.
    pub fn allows_grant(&self, grant: GrantType) -> bool {
        self.grant_types.contains(&grant)
    }

    /// `Ok` when the client may use `grant`, else [`ClientError::UnauthorizedGrant`].
    pub fn check_grant(&self, grant: GrantType) -> Result<(), ClientError> {
        if self.allows_grant(grant) {
            Ok(())
        } else {
            Err(ClientError::UnauthorizedGrant(grant))
        }
    }

    /// The scopes a token for `requested` carries: see [`ScopeSet::narrow`] (nothing
    /// requested → everything allowed; a subset → as asked; anything else refused with
    /// [`ClientError::ScopeNotAllowed`]).
    pub fn grant_scopes(&self, requested: &ScopeSet) -> Result<ScopeSet, ClientError> {
        self.scopes.narrow(requested)
    }

    /// The audience a token for `requested` is for: the requested one if allowed
    /// ([`ClientError::AudienceNotAllowed`] otherwise), else the client's default (its
    /// first audience); `None` when nothing was requested and the client has no
    /// audience — the caller then applies the configured default.
    pub fn audience_for(
        &self,
        requested: Option<&Audience>,
    ) -> Result<Option<Audience>, ClientError> {
        match requested {
            Some(a) if self.audiences.contains(a) => Ok(Some(a.clone())),
            Some(a) => Err(ClientError::AudienceNotAllowed(a.clone())),
            None => Ok(self.audiences.first().cloned()),
        }
    }

    /// When the secret replaced by the last rotation stops working, if it still does at
    /// `now`.
    pub fn previous_secret_expires_at(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.secrets
            .previous
            .map(|(_, until)| until)
            .filter(|until| now < *until)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("grant_types", &self.grant_types)
            .field("scopes", &self.scopes)
            .field("audiences", &self.audiences)
            .field("access_token_lifetime", &self.access_token_lifetime)
            .field("enabled", &self.enabled)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .field("secrets", &self.secrets)
            .finish()
    }
}

// === validation shared by create and update ===

fn validate_name(name: &str) -> Result<(), ClientError> {
    let invalid = |why: &str| ClientError::Invalid("name", why.to_owned());
    if name.trim().is_empty() {
        return Err(invalid("a name is never empty"));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(invalid("a name is at most 200 characters long"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("a name has no control characters"));
    }
    Ok(())
}

fn validate_grants(grants: &BTreeSet<GrantType>) -> Result<(), ClientError> {
    if grants.is_empty() {
        return Err(ClientError::Invalid(
            "grant_types",
            "a client needs at least one grant type".to_owned(),
        ));
    }
    Ok(())
}

fn validate_audiences(audiences: &[Audience]) -> Result<(), ClientError> {
    if audiences.len() > MAX_AUDIENCES {
        return Err(ClientError::Invalid(
            "audiences",
            format!("at most {MAX_AUDIENCES} audiences"),
        ));
    }
    let distinct: BTreeSet<&Audience> = audiences.iter().collect();
    if distinct.len() != audiences.len() {
        return Err(ClientError::Invalid(
            "audiences",
            "an audience is listed twice".to_owned(),
        ));
    }
    Ok(())
}

fn validate_lifetime(lifetime: Option<Duration>, max: Duration) -> Result<(), ClientError> {
    let Some(d) = lifetime else { return Ok(()) };
    if d.subsec_nanos() != 0 || d < MIN_LIFETIME || d > MAX_LIFETIME {
        return Err(ClientError::Invalid(
            "access_token_lifetime",
            "whole seconds from 1 s to 24 h".to_owned(),
        ));
    }
    if d > max {
        return Err(ClientError::Invalid(
            "access_token_lifetime",
            format!(
                "at most {} here (keys.overlap less tokens.leeway), so that no token outlives \
                 the key that verifies it",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}
