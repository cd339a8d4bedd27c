//! Failed-attempt counters per account and per client id, shared by every instance
//! (Redis; in process for a single `--dev` instance), with exponential backoff and a
//! temporary lockout.
//!
//! Each identifier has a record: how many failures in a row, and when the last one was.
//! From it and the current instant (the injectable clock, so expiry is testable):
//!
//! - the record is stale (the last failure is `lockout` or more ago): nothing is held
//!   against the identifier, and the next failure starts counting from one;
//! - `failures >= max_failures`: locked until `last + lockout`;
//! - `failures > free_failures`: the next attempt waits `backoff_base * 2^(failures -
//!   free_failures - 1)` (at most `backoff_max`) after the last failure;
//! - otherwise: allowed.
//!
//! Whether the identifier exists plays no part: an unknown account is counted and locked
//! exactly like a real one, and the refusal reads the same.
//!
//! Two ways to use it:
//!
//! - [`Lockout::attempt_account`] (accounts: human passwords) counts the attempt *before*
//!   the credential is checked, in one atomic step that refuses instead when the account
//!   is held back; a success then clears the records ([`Lockout::account_succeeded`]).
//!   Attempts made in parallel cannot all pass a check that none of them has counted yet.
//!   An account has two records, counted together: one per client address bucket (an IPv4
//!   address, an IPv6 /64: `protect::rate::bucket_of`) under the policy above, so
//!   that an attacker's failures lock the attacker's address and not the owner's; and one
//!   for the whole account, which only locks, at `account_max_failures` (no backoff, so
//!   that failures from elsewhere never make the owner wait), bounding an attacker with
//!   many addresses. The account-wide record holds back, and counts, only attempts from
//!   *unfamiliar* address buckets: a bucket the account has logged in from within
//!   [`FAMILIAR_FOR`] (the newest [`FAMILIAR_MAX`] of them) is familiar, and is held only
//!   to its own record, so an attacker who reaches the account-wide lock does not lock the
//!   owner out of the addresses they have used before. Whether the bucket is familiar is
//!   read in the same atomic step. A success clears its address's record, takes its own
//!   attempt back off the account-wide record (if counted there) and remembers the bucket
//!   as familiar; the account-wide record's failures stay, a bound on guesses from
//!   unfamiliar addresses that the owner's logins do not reset.
//! - [`Lockout::check`] then [`Lockout::failed`] (client ids): a wrong secret is refused
//!   while held back and counted otherwise; a correct secret never touches the counter
//!   (see `oauth::client_auth` for why).
//!
//! Redis layout: a hash `{f, last}` (last in Unix ms) per record, its TTL only garbage
//! collection: `<key_prefix>client:<sha256(id)>` for a client id;
//! `<key_prefix>account:{<sha256(name)>}` for an account as a whole and
//! `<key_prefix>account:{<sha256(name)>}:<bucket>` per address bucket (`203.0.113.7`,
//! `2001:db8:1:2::`); an account's familiar buckets are a sorted set
//! `<key_prefix>account:{<sha256(name)>}:familiar` (member the bucket, score its last
//! successful login in Unix ms). The braces keep an account's keys in one Redis Cluster
//! slot, so one script reads and counts them together. Deleting the account-wide key
//! lifts the account-wide lock (`docs/operations/runbook.md`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::redis_store::{RedisError, RedisHandle};

/// How long an address bucket stays familiar to an account after a successful login from
/// it (each success renews it): 90 days.
pub const FAMILIAR_FOR: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// The most familiar address buckets an account keeps (the most recently used).
pub const FAMILIAR_MAX: usize = 32;

/// `[protection.lockout]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutSettings {
    /// Failures in a row allowed before any backoff.
    pub free_failures: u32,
    /// Failures in a row that lock the identifier (for an account: from one client
    /// address bucket).
    pub max_failures: u32,
    /// Failures of an account from all addresses together that lock it for everyone; at
    /// least `max_failures`.
    pub account_max_failures: u32,
    /// The first backoff; each further failure doubles it.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// The longest backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long a lock lasts; also how long a failure is remembered.
    #[serde(with = "humantime_serde")]
    pub lockout: Duration,
    /// Prefix of the Redis keys.
    pub key_prefix: String,
}

impl Default for LockoutSettings {
    fn default() -> Self {
        Self {
            free_failures: 3,
            max_failures: 10,
            account_max_failures: 100,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            lockout: Duration::from_secs(15 * 60),
            key_prefix: "portcullis:lock:".to_owned(),
        }
    }
}

impl LockoutSettings {
    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures == 0 {
            return Err("max_failures must be greater than 0".to_owned());
        }
        if self.free_failures >= self.max_failures {
            return Err("free_failures must be less than max_failures".to_owned());
        }
        if self.account_max_failures < self.max_failures {
            return Err(format!(
                "account_max_failures ({}) must be at least max_failures ({})",
                self.account_max_failures, self.max_failures
            ));
        }
        if self.lockout.is_zero() || self.backoff_base.is_zero() {
            return Err("lockout and backoff_base must be greater than 0".to_owned());
        }
        if self.backoff_max < self.backoff_base {
            return Err("backoff_max must be at least backoff_base".to_owned());
        }
        if self.lockout > MAX_LOCK || self.backoff_max > MAX_LOCK {
            return Err(format!(
                "lockout and backoff_max must be at most {}",
                humantime::format_duration(MAX_LOCK)
            ));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err("key_prefix must not contain '{' or '}'".to_owned());
        }
        Ok(())
    }
}

/// The longest lockout or backoff accepted: a record's key lives this long and a minute
/// more, in Redis milliseconds.
pub const MAX_LOCK: Duration = Duration::from_secs(30 * 24 * 3600);

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A user account (break-glass local login).
    Account,
    /// An OAuth client id at the token, introspection and revocation endpoints.
    Client,
}

impl Kind {
    /// As in keys, metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::Client => "client",
        }
    }
}

/// One identifier's failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureRecord {
    /// Failures in a row.
    pub failures: u32,
    /// The last one, Unix milliseconds.
    pub last_ms: i64,
}

/// The counters could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("login-attempt counters unavailable")]
pub struct LockoutUnavailable(#[source] pub RedisError);

/// An attempt refused before any credential is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// When the identifier may try again.
    pub retry_after: Duration,
    /// Locked (as opposed to backing off).
    pub locked: bool,
}

/// The policy of the module docs in milliseconds, as a store applies it inside its atomic
/// [`FailureStore::count_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures in a row allowed before any backoff.
    pub free_failures: u32,
    /// Failures in a row that lock.
    pub max_failures: u32,
    /// The first backoff.
    pub backoff_base_ms: i64,
    /// The longest backoff.
    pub backoff_max_ms: i64,
    /// How long a lock lasts and a failure is remembered.
    pub lockout_ms: i64,
}

impl Thresholds {
    fn of(s: &LockoutSettings) -> Self {
        Self {
            free_failures: s.free_failures,
            max_failures: s.max_failures,
            backoff_base_ms: duration_ms(s.backoff_base),
            backoff_max_ms: duration_ms(s.backoff_max),
            lockout_ms: duration_ms(s.lockout),
        }
    }

    /// The account-wide record's: no backoff, locked at `account_max_failures`.
    fn account_wide(s: &LockoutSettings) -> Self {
        let max_failures = s.account_max_failures.max(1);
        Self {
            free_failures: max_failures - 1,
            max_failures,
            ..Self::of(s)
        }
    }

    /// The refusal `r` means for an attempt at `now` (Unix ms), if any.
    pub fn refusal(&self, r: FailureRecord, now: i64) -> Option<Refusal> {
        let since = now.saturating_sub(r.last_ms);
        if r.failures == 0 || since >= self.lockout_ms {
            return None;
        }
        let (until, locked) = if r.failures >= self.max_failures {
            (r.last_ms.saturating_add(self.lockout_ms), true)
        } else if r.failures > self.free_failures {
            let doublings = (r.failures - self.free_failures - 1).min(30);
            let wait = self
                .backoff_base_ms
                .saturating_mul(1i64 << doublings)
                .min(self.backoff_max_ms);
            (r.last_ms.saturating_add(wait), false)
        } else {
            return None;
        };
        (until > now).then(|| Refusal {
            retry_after: Duration::from_millis(u64::try_from(until - now).unwrap_or(0)),
            locked,
        })
    }
}

/// Which of an account's records holds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The record of the client address bucket the attempt came from.
    Address,
    /// The account-wide record: every address is held back.
    Account,
}

impl Scope {
    /// As in audit and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Account => "account",
        }
    }
}

/// What counting an account attempt found ([`Lockout::attempt_account`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountAttempt {
    /// Counted on both records, which a success then clears
    /// ([`Lockout::account_succeeded`]).
    Counted {
        /// The refusal the next attempt meets if this one fails, and which record makes
        /// it (the account-wide one when both do).
        if_failed: Option<(Refusal, Scope)>,
        /// The address bucket is familiar to the account (so exempt from, and not counted
        /// on, the account-wide record): a failure from it is more likely the owner's.
        familiar: bool,
    },
    /// Refused, and counted on neither record.
    Refused(Refusal, Scope),
}

/// Where the counters live.
#[async_trait]
pub trait FailureStore: Send + Sync + 'static {
    /// The record under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<FailureRecord>, LockoutUnavailable>;
    /// Counts one failure at `now_ms` (starting over when the last is `reset_ms` or more
    /// ago) and returns the new record; the stored record lives `ttl` at least.
    async fn record_failure(
        &self,
        key: &str,
        now_ms: i64,
        reset_ms: i64,
        ttl: Duration,
    ) -> Result<FailureRecord, LockoutUnavailable>;
    /// In one atomic step over every `(key, policy)` of `records`: when any record holds
    /// the identifier back at `now_ms` by its policy ([`Thresholds::refusal`]), changes
    /// nothing and returns `counted: false` with the records (a stale record read as zero
    /// failures); otherwise counts one failure on each as [`Self::record_failure`] does
    /// (reset after its `policy.lockout_ms`) and returns `counted: true` with the new
    /// records, in the order given. With `familiar`, when its bucket is familiar (in its
    /// set, last remembered after `after_ms`), the record at its index `exempts` is left
    /// out, neither read for the refusal nor counted, and returned as zero failures. The
    /// keys of one call (the familiar set's too) are in one Redis Cluster slot.
    async fn count_attempt(
        &self,
        records: &[(&str, Thresholds)],
        familiar: Option<&Familiar<'_>>,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<Counting, LockoutUnavailable>;
    /// When `bucket` was last remembered in the familiar set `key` (Unix ms), if it is in
    /// (whether that is still familiar is the caller's to judge).
    async fn familiar(&self, key: &str, bucket: &str) -> Result<Option<i64>, LockoutUnavailable>;
    /// After a success, in one atomic step: see [`Success`].
    async fn remember(&self, success: &Success<'_>) -> Result<(), LockoutUnavailable>;
}

/// A success from `bucket` at `now_ms`, as [`FailureStore::remember`] records it in one
/// atomic step: forgets the record `forget` (the address bucket's); unless `bucket` was
/// familiar (in the set `familiar`, last remembered less than `keep` before), takes one
/// failure off the record `uncount` (the success's own attempt, counted there); then
/// remembers `bucket` in `familiar` at `now_ms`, forgetting members last remembered `keep`
/// or more before and all but the newest `max`. The set lives `keep` at least (in Redis:
/// its TTL, renewed by each success). The three keys are in one Redis Cluster slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Success<'a> {
    /// The familiar set's key.
    pub familiar: &'a str,
    /// The address bucket the success came from.
    pub bucket: &'a str,
    /// The record forgotten: the address bucket's.
    pub forget: &'a str,
    /// The record the success's own attempt is taken off: the account-wide one.
    pub uncount: &'a str,
    /// When (Unix ms).
    pub now_ms: i64,
    /// How long a bucket stays familiar.
    pub keep: Duration,
    /// How many buckets are kept.
    pub max: usize,
}

/// An account's familiar address buckets, as [`FailureStore::count_attempt`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Familiar<'a> {
    /// The set's key.
    pub key: &'a str,
    /// The attempt's address bucket.
    pub bucket: &'a str,
    /// Members last remembered after this instant (Unix ms) are familiar.
    pub after_ms: i64,
    /// The index in `records` of the record a familiar bucket is exempt from.
    pub exempts: usize,
}

/// What [`FailureStore::count_attempt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counting {
    /// Counted (not held back).
    pub counted: bool,
    /// The records, in the order given.
    pub records: Vec<FailureRecord>,
    /// The bucket was familiar, and its exempt record left out.
    pub familiar: bool,
}

/// The counters and the policy over them. Cheap to clone.
#[derive(Clone)]
pub struct Lockout {
    store: Arc<dyn FailureStore>,
    // swapped by the runtime settings; each check reads the policy current at that moment
    settings: Arc<arc_swap::ArcSwap<LockoutSettings>>,
}

impl std::fmt::Debug for Lockout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lockout")
            .field("settings", &self.settings.load())
            .finish_non_exhaustive()
    }
}

/// What a check found: nothing to hold against the identifier, or a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead; `had_failures` says whether a success should clear a record.
    Allowed {
        /// A record with failures exists.
        had_failures: bool,
    },
    /// Refused.
    Refused(Refusal),
}

impl Lockout {
    /// Over `store` with `settings`.
    pub fn new(store: Arc<dyn FailureStore>, settings: LockoutSettings) -> Self {
        Self {
            store,
            settings: Arc::new(arc_swap::ArcSwap::from_pointee(settings)),
        }
    }

    /// Replaces the policy (thresholds, backoff, lockout) from now on; the key prefix is
    /// kept, so the counters already recorded still count.
    pub fn set_settings(&self, mut settings: LockoutSettings) {
        settings.key_prefix = self.settings.load().key_prefix.clone();
        self.settings.store(Arc::new(settings));
    }

    /// Whether `id` may attempt a login now.
    pub async fn check(
        &self,
        kind: Kind,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Verdict, LockoutUnavailable> {
        let record = self.store.get(&self.key(kind, id)).await?;
        Ok(match record {
            None => Verdict::Allowed {
                had_failures: false,
            },
            Some(r) => match self.refusal(r, ms(now)) {
                Some(refusal) => Verdict::Refused(refusal),
                None => Verdict::Allowed {
                    had_failures: r.failures > 0,
                },
            },
        })
    }

    /// Counts a failed attempt of `id`; returns the refusal the next attempt would meet
    /// now (`locked` when this failure locked it).
    pub async fn failed(
        &self,
        kind: Kind,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Refusal>, LockoutUnavailable> {
        let s = self.settings.load();
        let record = self
            .store
            .record_failure(
                &self.key(kind, id),
                ms(now),
                duration_ms(s.lockout),
                s.lockout + Duration::from_secs(60),
            )
            .await?;
        Ok(self.refusal(record, ms(now)))
    }

    /// Counts an attempt at account `name` from `from` before its password is checked, in
    /// one atomic step across instances on two records: the account's from `from`'s
    /// address bucket (an IPv4 address, an IPv6 /64), held to the whole policy, and the
    /// account-wide one, locked at `account_max_failures`, which a bucket familiar to the
    /// account (a successful login from it within [`FAMILIAR_FOR`]) is exempt from: it
    /// neither holds such an attempt back nor counts it. Refused (and counted on neither)
    /// while a record that applies holds the attempt back, otherwise counted on each that
    /// applies. A success must then clear its address with [`Self::account_succeeded`].
    pub async fn attempt_account(
        &self,
        name: &str,
        from: IpAddr,
        now: OffsetDateTime,
    ) -> Result<AccountAttempt, LockoutUnavailable> {
        let s = self.settings.load();
        let (address, account) = (Thresholds::of(&s), Thresholds::account_wide(&s));
        let keys = self.account_keys(name, from);
        let now = ms(now);
        let familiar = Familiar {
            key: &keys.familiar,
            bucket: &keys.bucket,
            after_ms: familiar_after(now),
            exempts: 1,
        };
        let Counting {
            counted,
            records,
            familiar,
        } = self
            .store
            .count_attempt(
                &[(&keys.address, address), (&keys.account, account)],
                Some(&familiar),
                now,
                s.lockout + Duration::from_secs(60),
            )
            .await?;
        let at = |i: usize| records.get(i).copied().unwrap_or_default();
        let (on_address, on_account) = (at(0), at(1));
        // the account-wide refusal first: it holds every address back
        let held = account
            .refusal(on_account, now)
            .map(|r| (r, Scope::Account))
            .or_else(|| {
                address
                    .refusal(on_address, now)
                    .map(|r| (r, Scope::Address))
            });
        Ok(if counted {
            AccountAttempt::Counted {
                if_failed: held,
                familiar,
            }
        } else {
            // the store refused by the same rules, so there is a refusal to report
            AccountAttempt::Refused(
                held.map_or_else(|| refused(&address, on_address, now), |(r, _)| r),
                held.map_or(Scope::Address, |(_, scope)| scope),
            )
        })
    }

    /// Whether account `name` may attempt a login from `from` now, by the records that
    /// apply to `from` (read one after the other: for inspection, not for gating
    /// attempts).
    pub async fn check_account(
        &self,
        name: &str,
        from: IpAddr,
        now: OffsetDateTime,
    ) -> Result<(Verdict, Scope), LockoutUnavailable> {
        let keys = self.account_keys(name, from);
        let s = self.settings.load();
        let now = ms(now);
        let account = if self.is_familiar(&keys, now).await? {
            FailureRecord::default()
        } else {
            self.store.get(&keys.account).await?.unwrap_or_default()
        };
        if let Some(r) = Thresholds::account_wide(&s).refusal(account, now) {
            return Ok((Verdict::Refused(r), Scope::Account));
        }
        let address = self.store.get(&keys.address).await?.unwrap_or_default();
        if let Some(r) = Thresholds::of(&s).refusal(address, now) {
            return Ok((Verdict::Refused(r), Scope::Address));
        }
        let live = |r: FailureRecord| r.failures > 0 && now - r.last_ms < duration_ms(s.lockout);
        Ok((
            Verdict::Allowed {
                had_failures: live(address) || live(account),
            },
            Scope::Address,
        ))
    }

    /// After a successful login to account `name` from `from` at `now` (its attempt counted
    /// by [`Self::attempt_account`]): forgets the record of `from`'s address bucket, takes
    /// the success's own attempt off the account-wide record if it was counted there (the
    /// bucket was not familiar yet), and remembers the bucket as familiar to the account
    /// for [`FAMILIAR_FOR`] (exempt from the account-wide lock). The records of other
    /// addresses stay, and so do the account-wide record's failures: it bounds the guesses
    /// from unfamiliar addresses whether or not the owner logs in meanwhile.
    pub async fn account_succeeded(
        &self,
        name: &str,
        from: IpAddr,
        now: OffsetDateTime,
    ) -> Result<(), LockoutUnavailable> {
        let keys = self.account_keys(name, from);
        self.store
            .remember(&Success {
                familiar: &keys.familiar,
                bucket: &keys.bucket,
                forget: &keys.address,
                uncount: &keys.account,
                now_ms: ms(now),
                keep: FAMILIAR_FOR,
                max: FAMILIAR_MAX,
            })
            .await
    }

    /// Whether `from` is an address bucket account `name` has logged in from within
    /// [`FAMILIAR_FOR`] before `now` (for inspection).
    pub async fn is_familiar_address(
        &self,
        name: &str,
        from: IpAddr,
        now: OffsetDateTime,
    ) -> Result<bool, LockoutUnavailable> {
        self.is_familiar(&self.account_keys(name, from), ms(now))
            .await
    }

    async fn is_familiar(&self, keys: &AccountKeys, now: i64) -> Result<bool, LockoutUnavailable> {
        Ok(self
            .store
            .familiar(&keys.familiar, &keys.bucket)
            .await?
            .is_some_and(|at| at > familiar_after(now)))
    }

    fn key(&self, kind: Kind, id: &str) -> String {
        // on every client authentication: one hex string, not one per byte
        let hex = hex::encode(Sha256::digest(id.as_bytes()));
        let prefix = &self.settings.load().key_prefix;
        match kind {
            // an account's records share one Redis Cluster slot (the braces)
            Kind::Account => format!("{prefix}account:{{{hex}}}"),
            Kind::Client => format!("{prefix}client:{hex}"),
        }
    }

    fn account_keys(&self, name: &str, from: IpAddr) -> AccountKeys {
        let account = self.key(Kind::Account, name);
        let bucket = crate::protect::rate::bucket_of(from).to_string();
        AccountKeys {
            address: format!("{account}:{bucket}"),
            familiar: format!("{account}:familiar"),
            account,
            bucket,
        }
    }

    /// The policy of the module docs.
    fn refusal(&self, r: FailureRecord, now: i64) -> Option<Refusal> {
        Thresholds::of(&self.settings.load()).refusal(r, now)
    }
}

/// An account's keys for an attempt from one address bucket (the module docs' layout).
struct AccountKeys {
    /// The record of the address bucket.
    address: String,
    /// The account-wide record.
    account: String,
    /// The set of familiar buckets.
    familiar: String,
    /// The address bucket itself (`203.0.113.7`, `2001:db8:1:2::`).
    bucket: String,
}

/// Buckets last remembered after this instant (Unix ms) are familiar at `now`: for
/// [`FAMILIAR_FOR`], as a failure is remembered for `lockout`.
fn familiar_after(now: i64) -> i64 {
    now.saturating_sub(duration_ms(FAMILIAR_FOR))
}

/// The refusal of a record the store refused by `policy` (there is one; a second's wait
/// should the clocks disagree).
fn refused(policy: &Thresholds, record: FailureRecord, now: i64) -> Refusal {
    policy.refusal(record, now).unwrap_or(Refusal {
        retry_after: Duration::from_secs(1),
        locked: record.failures >= policy.max_failures,
    })
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// === Redis ===

/// Counts a failure atomically: starts over when the last failure is stale.
const RECORD_FAILURE: &str = r"
local v = redis.call('HMGET', KEYS[1], 'f', 'last')
local f = tonumber(v[1]) or 0
local last = tonumber(v[2]) or 0
local now = tonumber(ARGV[1])
if f > 0 and now - last >= tonumber(ARGV[2]) then f = 0 end
f = f + 1
redis.call('HSET', KEYS[1], 'f', f, 'last', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {f, now}
";

/// Counts an attempt atomically on every record of KEYS unless one holds it back:
/// [`Thresholds::refusal`] in Lua. ARGV: now, TTL, the number of records n, the 1-based
/// index of the record a familiar bucket is exempt from (0: none; else KEYS[n + 1] is the
/// familiar set), the bucket, the greatest score that is not familiar, then per record
/// lockout, free, max, backoff base, backoff max (all ms). Returns `{counted (0|1),
/// familiar (0|1), failures, last, ...}`, a pair per record (zeros for an exempt one).
const COUNT_ATTEMPT: &str = r"
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local exempt = tonumber(ARGV[4])
if exempt > 0 then
  local seen = redis.call('ZSCORE', KEYS[n + 1], ARGV[5])
  if not (seen and tonumber(seen) > tonumber(ARGV[6])) then exempt = 0 end
end
local fs, lasts = {}, {}
local held = false
for i = 1, n do
  local o = 6 + (i - 1) * 5
  local lockout = tonumber(ARGV[o + 1])
  local free = tonumber(ARGV[o + 2])
  local max = tonumber(ARGV[o + 3])
  local f, last = 0, 0
  if i ~= exempt then
    local v = redis.call('HMGET', KEYS[i], 'f', 'last')
    f = tonumber(v[1]) or 0
    last = tonumber(v[2]) or 0
  end
  if f > 0 and now - last >= lockout then f = 0 end
  if f > 0 then
    local wait = 0
    if f >= max then
      wait = lockout
    elseif f > free then
      wait = math.min(tonumber(ARGV[o + 4]) * 2 ^ math.min(f - free - 1, 30), tonumber(ARGV[o + 5]))
    end
    if wait > 0 and last + wait > now then held = true end
  end
  fs[i] = f
  lasts[i] = last
end
local out = {0, 0}
if exempt > 0 then out[2] = 1 end
if held then
  for i = 1, n do
    out[#out + 1] = fs[i]
    out[#out + 1] = lasts[i]
  end
  return out
end
out[1] = 1
for i = 1, n do
  if i == exempt then
    out[#out + 1] = 0
    out[#out + 1] = 0
  else
    local f = fs[i] + 1
    redis.call('HSET', KEYS[i], 'f', f, 'last', now)
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[#out + 1] = f
    out[#out + 1] = now
  end
end
return out
";

/// After a success: forgets the address bucket's record KEYS[3]; unless the bucket was
/// familiar, takes its own attempt off the account-wide record KEYS[2]; then remembers the
/// bucket in the familiar set KEYS[1].
/// ARGV: bucket, now, the greatest score forgotten, how many are kept, TTL (ms).
const REMEMBER: &str = r"
redis.call('DEL', KEYS[3])
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not (seen and tonumber(seen) > tonumber(ARGV[3])) then
  local f = tonumber(redis.call('HGET', KEYS[2], 'f'))
  if f and f > 0 then redis.call('HSET', KEYS[2], 'f', f - 1) end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

/// Counters in Redis, shared by every instance.
#[derive(Clone)]
pub struct RedisFailureStore {
    redis: RedisHandle,
    script: Arc<redis::Script>,
    attempt: Arc<redis::Script>,
    remember: Arc<redis::Script>,
}

impl std::fmt::Debug for RedisFailureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisFailureStore").finish_non_exhaustive()
    }
}

impl RedisFailureStore {
    /// Over the shared connection.
    pub fn new(redis: RedisHandle) -> Self {
        Self {
            redis,
            script: Arc::new(redis::Script::new(RECORD_FAILURE)),
            attempt: Arc::new(redis::Script::new(COUNT_ATTEMPT)),
            remember: Arc::new(redis::Script::new(REMEMBER)),
        }
    }

    /// One command, within the store's deadline.
    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, LockoutUnavailable> {
        self.redis.query(&cmd).await.map_err(LockoutUnavailable)
    }

    /// One script, within the store's deadline.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, LockoutUnavailable> {
        self.redis
            .invoke(invocation)
            .await
            .map_err(LockoutUnavailable)
    }
}

#[async_trait]
impl FailureStore for RedisFailureStore {
    #[tracing::instrument(name = "redis.lockout.get", skip_all, fields(otel.kind = "client"))]
    async fn get(&self, key: &str) -> Result<Option<FailureRecord>, LockoutUnavailable> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg("f").arg("last");
        let (f, last): (Option<u32>, Option<i64>) = self.query(cmd).await?;
        Ok(match (f, last) {
            (Some(failures), Some(last_ms)) => Some(FailureRecord { failures, last_ms }),
            _ => None,
        })
    }

    #[tracing::instrument(name = "redis.lockout.record_failure", skip_all, fields(otel.kind = "client"))]
    async fn record_failure(
        &self,
        key: &str,
        now_ms: i64,
        reset_ms: i64,
        ttl: Duration,
    ) -> Result<FailureRecord, LockoutUnavailable> {
        let mut invocation = self.script.key(key);
        invocation
            .arg(now_ms)
            .arg(reset_ms)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let (failures, last_ms): (u32, i64) = self.invoke(invocation).await?;
        Ok(FailureRecord { failures, last_ms })
    }

    #[tracing::instrument(name = "redis.lockout.count_attempt", skip_all, fields(otel.kind = "client"))]
    async fn count_attempt(
        &self,
        records: &[(&str, Thresholds)],
        familiar: Option<&Familiar<'_>>,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<Counting, LockoutUnavailable> {
        let mut invocation = self.attempt.prepare_invoke();
        invocation
            .arg(now_ms)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(records.len());
        let familiar = familiar.filter(|f| f.exempts < records.len());
        match familiar {
            Some(f) => invocation.arg(f.exempts + 1).arg(f.bucket).arg(f.after_ms),
            None => invocation.arg(0).arg("").arg(0),
        };
        for (key, policy) in records {
            invocation
                .key(*key)
                .arg(policy.lockout_ms)
                .arg(policy.free_failures)
                .arg(policy.max_failures)
                .arg(policy.backoff_base_ms)
                .arg(policy.backoff_max_ms);
        }
        // KEYS[n + 1], after the records'
        if let Some(f) = familiar {
            invocation.key(f.key);
        }
        let reply: Vec<i64> = self.invoke(invocation).await?;
        let malformed = || {
            LockoutUnavailable(RedisError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply of the attempt script",
            ))))
        };
        let (&[counted, familiar], pairs) = reply.split_first_chunk().ok_or_else(malformed)?;
        if pairs.len() != records.len() * 2 {
            return Err(malformed());
        }
        let records = pairs
            .chunks_exact(2)
            .map(|p| FailureRecord {
                failures: u32::try_from(p[0]).unwrap_or(u32::MAX),
                last_ms: p[1],
            })
            .collect();
        Ok(Counting {
            counted: counted == 1,
            records,
            familiar: familiar == 1,
        })
    }

    #[tracing::instrument(name = "redis.lockout.familiar", skip_all, fields(otel.kind = "client"))]
    async fn familiar(&self, key: &str, bucket: &str) -> Result<Option<i64>, LockoutUnavailable> {
        let mut cmd = redis::cmd("ZSCORE");
        cmd.arg(key).arg(bucket);
        let score: Option<f64> = self.query(cmd).await?;
        // scores are Unix ms, exact in an f64
        #[allow(clippy::cast_possible_truncation)]
        Ok(score.map(|s| s as i64))
    }

    #[tracing::instrument(name = "redis.lockout.remember", skip_all, fields(otel.kind = "client"))]
    async fn remember(&self, success: &Success<'_>) -> Result<(), LockoutUnavailable> {
        let keep_ms = duration_ms(success.keep);
        let mut invocation = self.remember.key(success.familiar);
        invocation
            .key(success.uncount)
            .key(success.forget)
            .arg(success.bucket)
            .arg(success.now_ms)
            .arg(success.now_ms.saturating_sub(keep_ms))
            .arg(success.max)
            .arg(keep_ms);
        let _: i64 = self.invoke(invocation).await?;
        Ok(())
    }
}

// === in process ===

/// Counters in this process (a single `--dev` instance only).
#[derive(Debug, Default)]
pub struct MemoryFailureStore {
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    records: HashMap<String, FailureRecord>,
    /// Familiar sets: bucket → last remembered (Unix ms).
    familiar: HashMap<String, HashMap<String, i64>>,
}

/// Past this many records, stale ones are swept on insert.
const SWEEP_AT: usize = 10_000;

impl MemoryFailureStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Counts one failure in `records` (see [`FailureStore::record_failure`]).
fn count_failure(
    records: &mut HashMap<String, FailureRecord>,
    key: &str,
    now_ms: i64,
    reset_ms: i64,
) -> FailureRecord {
    if records.len() >= SWEEP_AT {
        records.retain(|_, r| now_ms.saturating_sub(r.last_ms) < reset_ms);
    }
    let r = records.entry(key.to_owned()).or_default();
    if r.failures > 0 && now_ms.saturating_sub(r.last_ms) >= reset_ms {
        r.failures = 0;
    }
    r.failures = r.failures.saturating_add(1);
    r.last_ms = now_ms;
    *r
}

#[async_trait]
impl FailureStore for MemoryFailureStore {
    async fn get(&self, key: &str) -> Result<Option<FailureRecord>, LockoutUnavailable> {
        Ok(self.inner.lock().await.records.get(key).copied())
    }

    async fn record_failure(
        &self,
        key: &str,
        now_ms: i64,
        reset_ms: i64,
        _ttl: Duration,
    ) -> Result<FailureRecord, LockoutUnavailable> {
        let mut inner = self.inner.lock().await;
        Ok(count_failure(&mut inner.records, key, now_ms, reset_ms))
    }

    async fn count_attempt(
        &self,
        records: &[(&str, Thresholds)],
        familiar: Option<&Familiar<'_>>,
        now_ms: i64,
        _ttl: Duration,
    ) -> Result<Counting, LockoutUnavailable> {
        // the check and the count under one lock, as the Redis script is one step
        let mut inner = self.inner.lock().await;
        let exempt = familiar
            .filter(|f| {
                f.exempts < records.len()
                    && inner
                        .familiar
                        .get(f.key)
                        .and_then(|set| set.get(f.bucket))
                        .is_some_and(|&at| at > f.after_ms)
            })
            .map(|f| f.exempts);
        let applies = |i: usize| exempt != Some(i);
        let stored = &mut inner.records;
        let held = records.iter().enumerate().any(|(i, (key, policy))| {
            applies(i)
                && stored
                    .get(*key)
                    .is_some_and(|&r| policy.refusal(r, now_ms).is_some())
        });
        let records = if held {
            records
                .iter()
                .enumerate()
                .map(|(i, (key, policy))| match stored.get(*key) {
                    _ if !applies(i) => FailureRecord::default(),
                    // as the script reads it: a stale record has no failures
                    Some(&r) if now_ms.saturating_sub(r.last_ms) < policy.lockout_ms => r,
                    Some(&r) => FailureRecord {
                        failures: 0,
                        last_ms: r.last_ms,
                    },
                    None => FailureRecord::default(),
                })
                .collect()
        } else {
            records
                .iter()
                .enumerate()
                .map(|(i, (key, policy))| {
                    if applies(i) {
                        count_failure(stored, key, now_ms, policy.lockout_ms)
                    } else {
                        FailureRecord::default()
                    }
                })
                .collect()
        };
        Ok(Counting {
            counted: !held,
            records,
            familiar: exempt.is_some(),
        })
    }

    async fn familiar(&self, key: &str, bucket: &str) -> Result<Option<i64>, LockoutUnavailable> {
        let inner = self.inner.lock().await;
        Ok(inner
            .familiar
            .get(key)
            .and_then(|set| set.get(bucket))
            .copied())
    }

    async fn remember(&self, success: &Success<'_>) -> Result<(), LockoutUnavailable> {
        let Success {
            familiar: key,
            bucket,
            forget,
            uncount,
            now_ms,
            keep,
            max,
        } = *success;
        let forgotten = now_ms.saturating_sub(duration_ms(keep));
        let mut inner = self.inner.lock().await;
        inner.records.remove(forget);
        let was_familiar = inner
            .familiar
            .get(key)
            .and_then(|set| set.get(bucket))
            .is_some_and(|&at| at > forgotten);
        if !was_familiar && let Some(r) = inner.records.get_mut(uncount) {
            r.failures = r.failures.saturating_sub(1);
        }
        let set = inner.familiar.entry(key.to_owned()).or_default();
        set.insert(bucket.to_owned(), now_ms);
        set.retain(|_, &mut at| at > forgotten);
        if set.len() > max {
            // all but the newest `max`, as ZREMRANGEBYRANK does (ties by bucket, as
            // Redis orders equal scores)
            let mut by_age: Vec<(i64, String)> =
                set.iter().map(|(b, &at)| (at, b.clone())).collect();
            by_age.sort_unstable();
            for (_, b) in by_age.iter().take(by_age.len() - max) {
                set.remove(b);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_account_wide_threshold_is_at_least_the_per_address_one() {
        let settings = LockoutSettings {
            account_max_failures: 9,
            ..LockoutSettings::default()
        };
        assert_eq!(
            settings.validate().unwrap_err(),
            "account_max_failures (9) must be at least max_failures (10)"
        );
        let settings = LockoutSettings {
            account_max_failures: 10,
            ..LockoutSettings::default()
        };
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn a_lockout_or_backoff_beyond_30_days_is_refused_not_overflowed() {
        for settings in [
            LockoutSettings {
                lockout: Duration::MAX,
                ..LockoutSettings::default()
            },
            LockoutSettings {
                backoff_max: MAX_LOCK + Duration::from_secs(1),
                ..LockoutSettings::default()
            },
        ] {
            assert_eq!(
                settings.validate().unwrap_err(),
                "lockout and backoff_max must be at most 30days"
            );
        }
        let longest = LockoutSettings {
            lockout: MAX_LOCK,
            backoff_max: MAX_LOCK,
            ..LockoutSettings::default()
        };
        assert!(longest.validate().is_ok());
    }

    #[test]
    fn the_account_wide_record_never_backs_off_and_locks_at_its_threshold() {
        let policy = Thresholds::account_wide(&LockoutSettings::default());
        let now = 1_000_000;
        for failures in 1..100 {
            let r = FailureRecord {
                failures,
                last_ms: now,
            };
            assert_eq!(policy.refusal(r, now), None, "{failures}");
        }
        let r = FailureRecord {
            failures: 100,
            last_ms: now,
        };
        assert_eq!(
            policy.refusal(r, now),
            Some(Refusal {
                retry_after: Duration::from_secs(15 * 60),
                locked: true
            })
        );
    }
}
