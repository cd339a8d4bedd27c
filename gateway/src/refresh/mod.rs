//! Refresh tokens: opaque, rotated on every use, grouped in families (one family = one
//! login session), stored only as keyed hashes. No HTTP here: the token endpoint, the
//! introspection and revocation endpoints and the session admin API call [`RefreshStore`].
//!
//! # Token format
//!
//! `rt1.<family_id>.<body>`
//!
//! - `family_id`: 16 random bytes, base64url (22 characters). Public: it names the session
//!   in lists, audit entries and admin APIs, and it lets a refresh find its family with a
//!   single key lookup (all of a family's state lives under one Redis hash slot).
//! - `body`: base64url of `secret ‖ tag` (64 characters), where `secret` is 32 bytes from
//!   the system RNG (256 random bits) and `tag = HMAC(server key, "tag", family_id,
//!   secret)[..16]`.
//!
//! The tag makes a token self-authenticating: a presented token whose tag checks out was
//! minted by us for that family. That is what lets the store call a token that is neither
//! the family's current nor its previous one a *re-use* (a rotated token, replayed) instead
//! of a guess — so someone who only knows a family id cannot get a family revoked by
//! sending garbage, and forged tokens never reach Redis.
//!
//! # What is stored
//!
//! Never a token, never a secret. Per family: `hash(current) = HMAC(server key, "hash",
//! family_id, secret)`, `hash(previous)`, and, for the grace window, the current secret
//! *wrapped* under the previous token: `wrap = secret(current) XOR HMAC(server key, "wrap",
//! family_id, secret(previous))`.
//!
//! # Rotation and the grace window
//!
//! A refresh presents token `P`; the caller side computes `hash(P)` and a candidate
//! successor `S` (fresh random secret, its hash, and its secret wrapped under `P`). One
//! atomic step (a Lua script on the family's hash slot in Redis; a mutex in memory) then:
//!
//! 1. unknown family → `Invalid`; other client → `Invalid`, nothing changes; past the
//!    absolute or idle expiry → `Invalid`;
//! 2. `hash(P)` is the current hash → **rotate**: store `hash(S)` as current, `hash(P)` as
//!    previous, the wrapped secret, the rotation instant and the new idle expiry; answer `S`;
//! 3. `hash(P)` is the previous hash and the rotation is at most `reuse_grace` old →
//!    **grace replay**: answer the stored wrapped secret; the caller, holding `P`, unwraps it
//!    and gets the very successor the winner got (several tabs, one answer). The candidate
//!    it prepared is thrown away;
//! 4. otherwise `P` is an older token of the family (its tag proved it ours) or the previous
//!    one after the grace window → **re-use**: the family is deleted, and
//!    [`RefreshError::Reused`] reports family, subject and client for the audit trail.
//!
//! Only the immediate predecessor enjoys the grace window: a token two rotations old is
//! re-use even if both rotations happened within it.
//!
//! The same window covers a lost answer: if a rotation happened but its reply never reached
//! the client (a timeout, a 503 after Redis answered), the client's retry with the old token
//! within the window gets the successor instead of revoking its own session.
//!
//! Hashes are compared with plain equality (in Lua and in memory): they are HMAC outputs
//! under a key the attacker does not hold, so timing reveals nothing usable; the token's tag
//! is checked in constant time.
//!
//! Why a wrapped successor rather than a successor derived from a stored per-family seed:
//! a Redis dump alone reveals no token (everything is keyed by the server key); the server
//! key alone reveals none (the hashes, wraps and family ids are in Redis); and even a dump
//! *together with* the key reveals no live token — unwrapping needs the predecessor's
//! secret, which is stored nowhere. A seed-derived successor would fall to dump plus key.
//!
//! # Expiry
//!
//! Every family has an absolute expiry (`created + absolute_lifetime`) and an idle expiry
//! (`last use + idle_lifetime`), both logical instants checked against the `now` the caller
//! passes in. Redis key TTLs are garbage collection only: the logical remaining lifetime
//! plus [`GC_MARGIN`].
//!
//! # Redis layout (with the default `key_prefix` `portcullis:rt:`)
//!
//! - `portcullis:rt:fam:{<family_id>}` — a hash: `v`, `client`, `sub`, `scope`, `aud`
//!   (JSON array), `session` (JSON), `auth_time`, `created`, `abs_exp`, `idle_exp`,
//!   `last_used`, `rotated_at` (Unix milliseconds; `rotated_at` 0 before the first
//!   rotation), `gen`, `cur`, `prev`, `wrap` (base64url). The `{…}` hash tag keeps each
//!   family in one slot of a Redis Cluster.
//! - `portcullis:rt:sub:<subject>` and `portcullis:rt:client:<client_id>` — sets of family
//!   ids. They live in other slots, so they are updated by separate commands: ids are
//!   added *before* the family is created (a failure leaves a stale id, never an unindexed
//!   family that "sign out everywhere" would miss) and removed after it is deleted; readers
//!   drop ids whose family is gone.

mod lazy;
mod memory;
mod redis;
mod token;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use time::OffsetDateTime;

pub use lazy::LazyRedisRefreshStore;
pub use memory::MemoryRefreshStore;
pub use redis::RedisRefreshStore;
pub use token::{FamilyId, InvalidFamilyId};

/// How long a family's Redis keys outlive its logical expiry: garbage collection only.
pub const GC_MARGIN: Duration = Duration::from_secs(24 * 60 * 60);

/// What a store needs to know about refresh tokens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshSettings {
    /// A family dies this long after its login, whatever happens. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub absolute_lifetime: Duration,
    /// A family unused this long is dead. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub idle_lifetime: Duration,
    /// How long after a rotation the rotated token still yields the same successor
    /// (concurrent refreshes from several tabs). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub reuse_grace: Duration,
    /// Prefix of every Redis key. Must not contain `{` or `}`. Default `portcullis:rt:`.
    pub key_prefix: String,
}

/// Settings that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshSettingsError {
    /// A lifetime of zero.
    #[error("refresh-token lifetimes must be longer than zero")]
    ZeroLifetime,
    /// A grace window as long as the idle lifetime would make re-use undetectable.
    #[error("refresh-token reuse_grace must be shorter than idle_lifetime")]
    GraceTooLong,
    /// Braces in the prefix would break the per-family hash tags.
    #[error("refresh-token key_prefix must not contain '{{' or '}}'")]
    PrefixBraces,
}

/// A new login: what the family remembers for its whole life.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFamily {
    /// The client the tokens are bound to.
    pub client_id: String,
    /// The user or service.
    pub subject: String,
    /// Granted scope (space-separated, as in OAuth).
    pub scope: String,
    /// Audiences of the access tokens minted on refresh.
    pub audience: Vec<String>,
    /// When the user authenticated.
    pub auth_time: OffsetDateTime,
    /// Whatever the caller needs to mint access tokens later (e.g. roles). Not secret-safe:
    /// do not put secrets in it.
    pub session: serde_json::Value,
}

/// A family (session) as stored, without anything secret.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Session {
    /// The family's public id.
    pub family: FamilyId,
    /// The client the tokens are bound to.
    pub client_id: String,
    /// The user or service.
    pub subject: String,
    /// Granted scope.
    pub scope: String,
    /// Audiences.
    pub audience: Vec<String>,
    /// When the user authenticated.
    #[serde(with = "time::serde::rfc3339")]
    pub auth_time: OffsetDateTime,
    /// When the family was issued.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the family was last refreshed (or issued).
    #[serde(with = "time::serde::rfc3339")]
    pub last_used_at: OffsetDateTime,
    /// Absolute expiry.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Idle expiry (moves forward with every refresh).
    #[serde(with = "time::serde::rfc3339")]
    pub idle_expires_at: OffsetDateTime,
    /// How many rotations the family has been through.
    pub generation: u64,
    /// The caller's blob.
    pub session: serde_json::Value,
}

/// A freshly issued family and its first token. `Debug` shows no token.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The refresh token to hand to the client.
    pub token: SecretString,
    /// The family.
    pub session: Session,
}

/// A successful refresh. `Debug` shows no token.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The successor refresh token to hand to the client.
    pub token: SecretString,
    /// The family after the rotation.
    pub session: Session,
    /// `true` when this answer replays, within the grace window, a rotation another request
    /// made (same successor); `false` for the request that rotated.
    pub replayed: bool,
}

/// Why a token is not accepted. For logs and metrics only: clients always get
/// `invalid_grant`, whichever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    /// Not a token of ours (wrong format, bad tag).
    #[error("malformed")]
    Malformed,
    /// The family does not exist (revoked, re-used, garbage collected, never issued).
    #[error("unknown family")]
    Unknown,
    /// Past the absolute or the idle expiry.
    #[error("expired")]
    Expired,
    /// Presented by another client than the one it was issued to.
    #[error("wrong client")]
    WrongClient,
}

/// Refresh-token store failures.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The token is not (or no longer) good: answer `invalid_grant` without saying why.
    #[error("invalid refresh token: {0}")]
    Invalid(InvalidReason),
    /// A rotated token was presented after its grace window: the whole family is revoked.
    /// Answer `invalid_grant` and write an audit entry.
    #[error(
        "re-use of a rotated refresh token of family {family} (client {client_id}): family revoked"
    )]
    Reused {
        /// The revoked family.
        family: FamilyId,
        /// Its subject.
        subject: String,
        /// Its client.
        client_id: String,
    },
    /// Redis failed or is unreachable: answer 503.
    #[error("the refresh-token store is unavailable")]
    Unavailable(#[source] ::redis::RedisError),
    /// Redis did not answer in time: answer 503.
    #[error("the refresh-token store did not answer in time")]
    Timeout,
    /// Something that should not happen (RNG failure, a stored record that does not parse).
    #[error("refresh-token store: {0}")]
    Internal(&'static str),
}

// === impl RefreshError ===

impl RefreshError {
    /// `true` for the outcomes a token endpoint answers with `invalid_grant`.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::Reused { .. })
    }

    /// `true` when the store could not be reached (answer 503, retry later).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout)
    }
}

/// The refresh-token store. Every method takes the current instant from the caller's clock;
/// none reads the system time.
#[async_trait]
pub trait RefreshStore: Send + Sync + 'static {
    /// Starts a family and returns its first token.
    async fn issue(&self, family: NewFamily, now: OffsetDateTime) -> Result<Issued, RefreshError>;

    /// Rotates `presented` (issued to `client_id`) into its successor; see the module docs.
    async fn refresh(
        &self,
        presented: &SecretString,
        client_id: &str,
        now: OffsetDateTime,
    ) -> Result<Refreshed, RefreshError> {
        self.refresh_with_grace(presented, client_id, now, Duration::ZERO)
            .await
    }

    /// [`RefreshStore::refresh`] with a grace window of at least `min_grace` (the
    /// settings' `reuse_grace` when that is longer): a console renewal's cookies reach the
    /// browser only with the answer of the request that renewed, which may take up to
    /// `server.request_timeout`.
    async fn refresh_with_grace(
        &self,
        presented: &SecretString,
        client_id: &str,
        now: OffsetDateTime,
        min_grace: Duration,
    ) -> Result<Refreshed, RefreshError>;

    /// RFC 7662: the family of `presented` if it is the family's current token and the family
    /// is alive; `None` for anything else (rotated, revoked, expired, malformed).
    async fn inspect(
        &self,
        presented: &SecretString,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError>;

    /// The family `family` if it is alive at `now` (nothing secret, as in a listing);
    /// `None` once it was revoked, re-used, has expired or never existed. One key read: what
    /// an open upgraded connection of a console session checks now and then
    /// (`proxy::upgrade`).
    async fn live_family(
        &self,
        family: &FamilyId,
        now: OffsetDateTime,
    ) -> Result<Option<Session>, RefreshError>;

    /// The live families of `subject`, oldest first.
    async fn list_sessions(
        &self,
        subject: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Session>, RefreshError>;

    /// RFC 7009: revokes the family of `presented` (any genuine token of it, current or
    /// rotated). `Ok(false)` when there was nothing to revoke (malformed, unknown);
    /// `Err(Invalid(WrongClient))` when the token belongs to another client (nothing revoked).
    async fn revoke_token(
        &self,
        presented: &SecretString,
        client_id: &str,
    ) -> Result<bool, RefreshError>;

    /// Revokes one family. `Ok(false)` when it did not exist.
    async fn revoke_family(&self, family: &FamilyId) -> Result<bool, RefreshError>;

    /// "Sign out everywhere": revokes every family of `subject`; returns how many existed.
    async fn revoke_subject(&self, subject: &str) -> Result<usize, RefreshError>;

    /// "Disable client": revokes every family of `client_id`; returns how many existed.
    async fn revoke_client(&self, client_id: &str) -> Result<usize, RefreshError>;
}

// === impl RefreshSettings ===

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            absolute_lifetime: Duration::from_secs(30 * 24 * 60 * 60),
            idle_lifetime: Duration::from_secs(7 * 24 * 60 * 60),
            reuse_grace: Duration::from_secs(10),
            key_prefix: "portcullis:rt:".to_owned(),
        }
    }
}

impl RefreshSettings {
    /// Checks the settings before a store is built on them.
    pub fn validate(&self) -> Result<(), RefreshSettingsError> {
        if self.absolute_lifetime.is_zero() || self.idle_lifetime.is_zero() {
            return Err(RefreshSettingsError::ZeroLifetime);
        }
        if self.reuse_grace >= self.idle_lifetime {
            return Err(RefreshSettingsError::GraceTooLong);
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(RefreshSettingsError::PrefixBraces);
        }
        Ok(())
    }

    fn absolute_ms(&self) -> i64 {
        duration_ms(self.absolute_lifetime)
    }

    fn idle_ms(&self) -> i64 {
        duration_ms(self.idle_lifetime)
    }

    /// The grace window of a refresh that asks for at least `min_grace`.
    fn grace_ms(&self, min_grace: Duration) -> i64 {
        duration_ms(self.reuse_grace.max(min_grace))
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Unix milliseconds: the unit of every stored instant.
fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_ms(ms: i64) -> Result<OffsetDateTime, RefreshError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|_| RefreshError::Internal("stored instant out of range"))
}

/// One family's stored state (the Redis hash, field for field).
#[derive(Clone, PartialEq)]
struct Record {
    client_id: String,
    subject: String,
    scope: String,
    audience: Vec<String>,
    session: serde_json::Value,
    auth_time: i64,
    created: i64,
    abs_exp: i64,
    idle_exp: i64,
    last_used: i64,
    rotated_at: i64,
    generation: u64,
    /// Hash of the current token.
    cur: String,
    /// Hash of the previous token ("" before the first rotation).
    prev: String,
    /// The current secret wrapped under the previous token ("" before the first rotation).
    wrap: String,
}

/// What one refresh step decided (the Lua script makes the same decisions).
enum Step {
    Rotate,
    Replay,
    Reused,
}

// === impl Record ===

impl Record {
    fn new(family: NewFamily, first_hash: String, now: i64, settings: &RefreshSettings) -> Self {
        Self {
            client_id: family.client_id,
            subject: family.subject,
            scope: family.scope,
            audience: family.audience,
            session: family.session,
            auth_time: to_ms(family.auth_time),
            created: now,
            abs_exp: now.saturating_add(settings.absolute_ms()),
            idle_exp: now.saturating_add(settings.idle_ms()),
            last_used: now,
            rotated_at: 0,
            generation: 0,
            cur: first_hash,
            prev: String::new(),
            wrap: String::new(),
        }
    }

    fn alive(&self, now: i64) -> bool {
        now < self.abs_exp && now < self.idle_exp
    }

    /// The refresh decision for an authenticated token of this family, after the client and
    /// expiry checks.
    fn step(&self, presented_hash: &str, now: i64, grace_ms: i64) -> Step {
        if self.cur == presented_hash {
            Step::Rotate
        } else if !self.prev.is_empty()
            && self.prev == presented_hash
            && now.saturating_sub(self.rotated_at) <= grace_ms
        {
            Step::Replay
        } else {
            Step::Reused
        }
    }

    fn rotate(
        &mut self,
        presented_hash: String,
        next_hash: String,
        wrap: String,
        now: i64,
        settings: &RefreshSettings,
    ) {
        self.prev = presented_hash;
        self.cur = next_hash;
        self.wrap = wrap;
        self.rotated_at = now;
        self.last_used = now;
        self.idle_exp = now.saturating_add(settings.idle_ms());
        self.generation += 1;
    }

    fn session(&self, family: &FamilyId) -> Result<Session, RefreshError> {
        Ok(Session {
            family: family.clone(),
            client_id: self.client_id.clone(),
            subject: self.subject.clone(),
            scope: self.scope.clone(),
            audience: self.audience.clone(),
            auth_time: from_ms(self.auth_time)?,
            created_at: from_ms(self.created)?,
            last_used_at: from_ms(self.last_used)?,
            expires_at: from_ms(self.abs_exp)?,
            idle_expires_at: from_ms(self.idle_exp)?,
            generation: self.generation,
            session: self.session.clone(),
        })
    }

    /// The Redis hash fields.
    fn to_fields(&self) -> Result<Vec<(&'static str, String)>, RefreshError> {
        Ok(vec![
            ("v", "1".to_owned()),
            ("client", self.client_id.clone()),
            ("sub", self.subject.clone()),
            ("scope", self.scope.clone()),
            ("aud", to_json(&self.audience)?),
            ("session", to_json(&self.session)?),
            ("auth_time", self.auth_time.to_string()),
            ("created", self.created.to_string()),
            ("abs_exp", self.abs_exp.to_string()),
            ("idle_exp", self.idle_exp.to_string()),
            ("last_used", self.last_used.to_string()),
            ("rotated_at", self.rotated_at.to_string()),
            ("gen", self.generation.to_string()),
            ("cur", self.cur.clone()),
            ("prev", self.prev.clone()),
            ("wrap", self.wrap.clone()),
        ])
    }

    /// Parses the Redis hash (`HGETALL`).
    fn from_fields(mut fields: HashMap<String, String>) -> Result<Self, RefreshError> {
        const CORRUPT: RefreshError =
            RefreshError::Internal("stored refresh-token family does not parse");
        let mut take = |name: &str| fields.remove(name).ok_or(CORRUPT);
        let int = |text: String| text.parse::<i64>().map_err(|_| CORRUPT);
        if take("v")? != "1" {
            return Err(CORRUPT);
        }
        Ok(Self {
            client_id: take("client")?,
            subject: take("sub")?,
            scope: take("scope")?,
            audience: serde_json::from_str(&take("aud")?).map_err(|_| CORRUPT)?,
            session: serde_json::from_str(&take("session")?).map_err(|_| CORRUPT)?,
            auth_time: int(take("auth_time")?)?,
            created: int(take("created")?)?,
            abs_exp: int(take("abs_exp")?)?,
            idle_exp: int(take("idle_exp")?)?,
            last_used: int(take("last_used")?)?,
            rotated_at: int(take("rotated_at")?)?,
            generation: take("gen")?.parse().map_err(|_| CORRUPT)?,
            cur: take("cur")?,
            prev: take("prev")?,
            wrap: take("wrap")?,
        })
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, RefreshError> {
    serde_json::to_string(value)
        .map_err(|_| RefreshError::Internal("session data does not serialise"))
}
