//! Pending logins: what `/auth/login` must remember until `/auth/callback` (provider,
//! PKCE verifier, nonce, where to go after). Single use and short-lived: the callback
//! takes the record out atomically (`GETDEL` in Redis), so a replayed `state` finds
//! nothing. Stored under a hash of `state`, never `state` itself.
//!
//! The same store keeps what provider logouts need: single-use claims (a logout token's
//! `jti`); per provider session, the console sessions its logins made (so a logout token
//! naming only a `sid` finds them); and the logouts themselves, kept for a while as
//! *marks* (a number under a key), so that a login whose callback was still running when
//! the logout came is ended too (see [`super::Sso::remember_logout`]).
//!
//! Redis (shared by every instance: the callback may reach another instance than the
//! login did), or in process for a single `--dev` instance. Both pass the same
//! conformance tests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::redis_store::RedisHandle;

/// What a pending login remembers. The PKCE verifier and nonce are secrets of this login:
/// `Debug` does not show them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLogin {
    /// The provider's name.
    pub provider: String,
    /// The PKCE code verifier.
    pub pkce_verifier: String,
    /// The nonce the ID token must carry.
    pub nonce: String,
    /// Where to send the browser after the login (a checked relative path).
    pub redirect: String,
}

impl std::fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLogin")
            .field("provider", &self.provider)
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

/// The store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    /// Redis failed or did not answer in time.
    #[error("pending-login store unavailable")]
    Unavailable(#[source] crate::redis_store::RedisError),
    /// A stored record does not parse.
    #[error("pending-login record does not parse")]
    Corrupt,
}

/// Where pending logins live.
#[async_trait]
pub trait PendingStore: Send + Sync + 'static {
    /// Stores `login` under `state` for `ttl`.
    async fn put(
        &self,
        state: &str,
        login: &PendingLogin,
        ttl: Duration,
    ) -> Result<(), PendingError>;

    /// Takes the login stored under `state` out of the store: a second call finds nothing.
    async fn take(&self, state: &str) -> Result<Option<PendingLogin>, PendingError>;

    /// Marks `key` used for `ttl`, atomically: `true` when it was not already (a
    /// back-channel logout token's `jti`, which must be single use).
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, PendingError>;

    /// Forgets a [`PendingStore::claim`] (what it guarded failed and may be retried).
    async fn release(&self, key: &str) -> Result<(), PendingError>;

    /// Adds `member` to the set `key`, which lives `ttl` from now (the later of that and
    /// its expiry so far, in Redis: each add sets it).
    async fn index_add(&self, key: &str, member: &str, ttl: Duration) -> Result<(), PendingError>;

    /// The members of the set `key` (none once it expired).
    async fn index_members(&self, key: &str) -> Result<Vec<String>, PendingError>;

    /// Sets the mark `key` to `value`, or keeps the one it holds when that is larger, and
    /// makes it live at least `ttl` from now (a shorter `ttl` never cuts the life an
    /// earlier call gave). Atomic: of marks set at once, the largest stays.
    async fn mark(&self, key: &str, value: i64, ttl: Duration) -> Result<(), PendingError>;

    /// The value of the mark `key` (none once it expired).
    async fn mark_of(&self, key: &str) -> Result<Option<i64>, PendingError>;
}

fn key_of(prefix: &str, state: &str) -> String {
    let hex = hex::encode(Sha256::digest(state.as_bytes()));
    format!("{prefix}login:{hex}")
}

fn claim_key_of(prefix: &str, key: &str) -> String {
    let hex = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{prefix}used:{hex}")
}

/// Adds ARGV[1] to the set KEYS[1] and makes it live at least ARGV[2] ms more.
const INDEX_ADD: &str = "redis.call('SADD', KEYS[1], ARGV[1]) \
    if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then \
    redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 1";

fn index_key_of(prefix: &str, key: &str) -> String {
    let hex = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{prefix}index:{hex}")
}

/// Sets KEYS[1] to the larger of ARGV[1] and what it holds, living at least ARGV[2] ms
/// more. The value is kept as sent (a decimal string): no Lua number ever rewrites it.
const MARK: &str = "local held = redis.call('GET', KEYS[1]) \
    local value = ARGV[1] \
    if held and tonumber(held) and tonumber(held) > tonumber(value) then value = held end \
    local ttl = ARGV[2] \
    local left = redis.call('PTTL', KEYS[1]) \
    if left > tonumber(ttl) then ttl = left end \
    redis.call('SET', KEYS[1], value, 'PX', ttl) return 1";

fn mark_key_of(prefix: &str, key: &str) -> String {
    let hex = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{prefix}ended:{hex}")
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

// === Redis ===

/// Pending logins in Redis, with a key TTL of the login timeout.
#[derive(Debug, Clone)]
pub struct RedisPendingStore {
    redis: RedisHandle,
    prefix: String,
}

impl RedisPendingStore {
    /// Over the shared connection; keys start with `prefix`.
    pub fn new(redis: RedisHandle, prefix: String) -> Self {
        Self { redis, prefix }
    }

    /// Runs `script` (whole: `EVAL`) on the one key `key` with the arguments `arg` and
    /// `ttl` in milliseconds, as the index and the mark scripts take them.
    async fn eval_with_ttl(
        &self,
        script: &str,
        key: String,
        arg: impl redis::ToRedisArgs,
        ttl: Duration,
    ) -> Result<(), PendingError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(1).arg(key).arg(arg).arg(ttl_ms(ttl));
        let _: i64 = self.run(cmd).await?;
        Ok(())
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, PendingError> {
        self.redis
            .query(&cmd)
            .await
            .map_err(PendingError::Unavailable)
    }
}

#[async_trait]
impl PendingStore for RedisPendingStore {
    #[tracing::instrument(name = "redis.sso_state.put", skip_all, fields(otel.kind = "client"))]
    async fn put(
        &self,
        state: &str,
        login: &PendingLogin,
        ttl: Duration,
    ) -> Result<(), PendingError> {
        let value = serde_json::to_string(login).map_err(|_| PendingError::Corrupt)?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(key_of(&self.prefix, state))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms(ttl));
        let _: () = self.run(cmd).await?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.sso_state.take", skip_all, fields(otel.kind = "client"))]
    async fn take(&self, state: &str) -> Result<Option<PendingLogin>, PendingError> {
        let mut cmd = redis::cmd("GETDEL");
        cmd.arg(key_of(&self.prefix, state));
        let value: Option<String> = self.run(cmd).await?;
        value
            .map(|v| serde_json::from_str(&v).map_err(|_| PendingError::Corrupt))
            .transpose()
    }

    #[tracing::instrument(name = "redis.sso_used.claim", skip_all, fields(otel.kind = "client"))]
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, PendingError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(claim_key_of(&self.prefix, key))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(ttl));
        let set: Option<String> = self.run(cmd).await?;
        Ok(set.is_some())
    }

    #[tracing::instrument(name = "redis.sso_used.release", skip_all, fields(otel.kind = "client"))]
    async fn release(&self, key: &str) -> Result<(), PendingError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(claim_key_of(&self.prefix, key));
        let _: i64 = self.run(cmd).await?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.sso_index.add", skip_all, fields(otel.kind = "client"))]
    async fn index_add(&self, key: &str, member: &str, ttl: Duration) -> Result<(), PendingError> {
        // one key, so one slot in a cluster; one script, so the set never lives without
        // its expiry (sent whole each time: this runs once per login)
        self.eval_with_ttl(INDEX_ADD, index_key_of(&self.prefix, key), member, ttl)
            .await
    }

    #[tracing::instrument(name = "redis.sso_index.members", skip_all, fields(otel.kind = "client"))]
    async fn index_members(&self, key: &str) -> Result<Vec<String>, PendingError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(index_key_of(&self.prefix, key));
        self.run(cmd).await
    }

    #[tracing::instrument(name = "redis.sso_mark.set", skip_all, fields(otel.kind = "client"))]
    async fn mark(&self, key: &str, value: i64, ttl: Duration) -> Result<(), PendingError> {
        // one key, so one slot in a cluster (no hash tag needed); one script, so two
        // logouts at once keep the larger value and the mark never lives without expiry
        self.eval_with_ttl(MARK, mark_key_of(&self.prefix, key), value, ttl)
            .await
    }

    #[tracing::instrument(name = "redis.sso_mark.get", skip_all, fields(otel.kind = "client"))]
    async fn mark_of(&self, key: &str) -> Result<Option<i64>, PendingError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(mark_key_of(&self.prefix, key));
        let value: Option<String> = self.run(cmd).await?;
        value
            .map(|v| v.parse().map_err(|_| PendingError::Corrupt))
            .transpose()
    }
}

// === in process ===

/// Pending logins in this process (a single `--dev` instance only).
#[derive(Debug, Default)]
pub struct MemoryPendingStore {
    entries: Mutex<HashMap<String, (PendingLogin, Instant)>>,
    claims: Mutex<HashMap<String, Instant>>,
    indexes: Mutex<HashMap<String, (Vec<String>, Instant)>>,
    marks: Mutex<HashMap<String, (i64, Instant)>>,
}

/// The longest life of an in-process mark (see [`PendingStore::mark`]).
const MAX_MARK_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Past this many pending logins, expired ones are swept on insert.
const SWEEP_AT: usize = 1024;

impl MemoryPendingStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl PendingStore for MemoryPendingStore {
    async fn put(
        &self,
        state: &str,
        login: &PendingLogin,
        ttl: Duration,
    ) -> Result<(), PendingError> {
        let now = Instant::now();
        let mut entries = self.entries.lock().await;
        if entries.len() >= SWEEP_AT {
            entries.retain(|_, (_, until)| *until > now);
        }
        entries.insert(key_of("", state), (login.clone(), now + ttl));
        Ok(())
    }

    async fn take(&self, state: &str) -> Result<Option<PendingLogin>, PendingError> {
        let mut entries = self.entries.lock().await;
        Ok(entries
            .remove(&key_of("", state))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(login, _)| login))
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, PendingError> {
        let now = Instant::now();
        let mut claims = self.claims.lock().await;
        if claims.len() >= SWEEP_AT {
            claims.retain(|_, until| *until > now);
        }
        let key = claim_key_of("", key);
        if claims.get(&key).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        claims.insert(key, now + ttl);
        Ok(true)
    }

    async fn release(&self, key: &str) -> Result<(), PendingError> {
        self.claims.lock().await.remove(&claim_key_of("", key));
        Ok(())
    }

    async fn index_add(&self, key: &str, member: &str, ttl: Duration) -> Result<(), PendingError> {
        let now = Instant::now();
        let mut indexes = self.indexes.lock().await;
        if indexes.len() >= SWEEP_AT {
            indexes.retain(|_, (_, until)| *until > now);
        }
        let (members, until) = indexes
            .entry(index_key_of("", key))
            .or_insert_with(|| (Vec::new(), now));
        if *until <= now {
            members.clear();
        }
        if !members.iter().any(|m| m == member) {
            members.push(member.to_owned());
        }
        *until = (*until).max(now + ttl);
        Ok(())
    }

    async fn index_members(&self, key: &str) -> Result<Vec<String>, PendingError> {
        let now = Instant::now();
        Ok(self
            .indexes
            .lock()
            .await
            .get(&index_key_of("", key))
            .filter(|(_, until)| *until > now)
            .map(|(members, _)| members.clone())
            .unwrap_or_default())
    }

    async fn mark(&self, key: &str, value: i64, ttl: Duration) -> Result<(), PendingError> {
        let now = Instant::now();
        let mut marks = self.marks.lock().await;
        if marks.len() >= SWEEP_AT {
            marks.retain(|_, (_, until)| *until > now);
        }
        let (held, until) = marks
            .entry(mark_key_of("", key))
            .or_insert_with(|| (value, now));
        if *until <= now {
            // expired: as if it were not there
            *held = value;
        }
        *held = (*held).max(value);
        // a TTL past ten years is as good as for ever (and cannot overflow an `Instant`)
        *until = (*until).max(now + ttl.min(MAX_MARK_TTL));
        Ok(())
    }

    async fn mark_of(&self, key: &str) -> Result<Option<i64>, PendingError> {
        let now = Instant::now();
        Ok(self
            .marks
            .lock()
            .await
            .get(&mark_key_of("", key))
            .filter(|(_, until)| *until > now)
            .map(|(value, _)| *value))
    }
}
