//! Versioned, encrypted storage of releases (Postgres or SQLite, one SQL text for both).
//!
//! Every publish of an (environment, application) inserts release `expected + 1` and the
//! full snapshot of its entries in one transaction. Versions run 1, 2, 3, … without gaps:
//! the primary key refuses a second release with the same version, and the transaction
//! checks that the new version is exactly one past the number of releases, so a stale
//! writer gets [`StoreError::Conflict`] instead of a lost update. On Postgres the same
//! transaction sends `NOTIFY portcullis_config, '<env>/<app>/<version>'`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr as _;

use sqlx::{PgPool, SqlitePool};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::crypto::{CryptoError, DataKey, Envelope, WrappedKey, value_aad};
use crate::feed::{ChangeFeed, NOTIFY_CHANNEL, ReleaseEvent};
use crate::model::{
    AppName, ConfigEntry, ConfigKey, Environment, Field, Format, GraySelector, ModelError,
    check_entries,
};

/// How often a publish with [`Expected::Any`] retries after losing a race.
const ANY_RETRIES: usize = 16;

/// Entries written by one `INSERT` of a publish: 8 parameters each, so a statement stays
/// well under SQLite's 32,766 and Postgres's 65,535 parameters.
const ENTRIES_PER_INSERT: usize = 1_000;

/// Marks one gray release aborted (`$3`: its version), if it is still gray.
const ABORT_GRAY: &str = "UPDATE config_releases SET status = 'aborted' WHERE environment = $1 AND application = $2 AND version = $3 AND status = 'gray'";
/// The current main version of (`$1`, `$2`).
const MAIN_VERSION: &str = "SELECT MAX(version) FROM config_releases WHERE environment = $1 AND application = $2 AND status = 'main'";
/// Sends a change note (Postgres; delivered when and if the transaction commits).
const NOTIFY: &str = "SELECT pg_notify($1, $2)";

/// The mask shown in place of a secret value.
pub const MASK: &str = "******";

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name or value was refused.
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// The release's content was refused by the store's [`ReleaseCheck`].
    #[error("{0}")]
    Refused(String),
    /// Encryption or a key service failed (fail closed: nothing was read or written in
    /// plaintext).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The write was based on a version that is no longer current.
    #[error("stale write: expected current version {expected}, but it is {current}")]
    Conflict {
        /// The version the writer expected to be current (0: none).
        expected: u64,
        /// The version that is current (0: none).
        current: u64,
    },
    /// No such release.
    #[error("no release {version:?} of {environment}/{application}")]
    NotFound {
        /// The environment.
        environment: String,
        /// The application.
        application: String,
        /// The version asked for (`None`: any).
        version: Option<u64>,
    },
    /// A gray release of this (environment, application) is in progress: promote or
    /// abort it first.
    #[error("a gray release (version {0}) is in progress; promote or abort it first")]
    GrayInProgress(u64),
    /// No gray release of this (environment, application) is in progress.
    #[error("no gray release is in progress")]
    NoGray,
    /// A stored row does not make sense (altered by hand?).
    #[error("stored config data is corrupt: {0}")]
    Corrupt(String),
}

/// A pool of either kind; the gateway passes a clone of its own pool.
#[derive(Debug, Clone)]
pub enum Pool {
    /// Postgres.
    Postgres(PgPool),
    /// SQLite (`--dev`, one instance).
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$p` bound to the pool and `$pg` telling whether it is Postgres:
/// one SQL text, both backends (each arm is type-checked on its own).
macro_rules! on_pool {
    ($pool:expr, |$p:ident, $pg:ident| $body:expr) => {
        match $pool {
            Pool::Postgres($p) => {
                #[allow(unused_variables)]
                let $pg = true;
                $body
            }
            Pool::Sqlite($p) => {
                #[allow(unused_variables)]
                let $pg = false;
                $body
            }
        }
    };
}

/// Applies the config center's migrations (versions 1001+) to `pool`. Migrations of
/// other crates on the same database (the gateway's) are ignored, and theirs ignore ours.
///
/// For a process of its own. Several instances starting together on one Postgres go
/// through the gateway's runner (`portcullis::db`), which runs [`postgres_migrator`]
/// under a lock it takes without stalling an index build, on a session it closes
/// whatever happens.
pub async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    match pool {
        Pool::Postgres(p) => postgres_migrator().run(p).await?,
        Pool::Sqlite(p) => sqlite_migrator().run(p).await?,
    }
    Ok(())
}

/// The config center's Postgres migrations, missing ones (another crate's) ignored.
pub fn postgres_migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations/postgres");
    m.set_ignore_missing(true);
    m
}

/// The config center's SQLite migrations, missing ones (another crate's) ignored.
pub fn sqlite_migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations/sqlite");
    m.set_ignore_missing(true);
    m
}

/// Which version a write expects to be current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Exactly this version (0: no release yet); anything else is a [`StoreError::Conflict`].
    Version(u64),
    /// Whatever is current; the write retries when it loses a race.
    Any,
}

/// Who made a change, and why (kept with the release).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeNote {
    /// The subject that made it (user or client id).
    pub author: String,
    /// A free-text reason.
    pub message: String,
}

impl ChangeNote {
    /// A note by `author` saying `message`.
    pub fn new(author: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            author: author.into(),
            message: message.into(),
        }
    }

    /// Refuses a note the database could not store as text: a NUL character (Postgres
    /// refuses it, so the write would fail as if the database were away, and a client
    /// told to retry would retry for ever).
    fn check(&self) -> Result<(), ModelError> {
        match self.message.find('\0') {
            Some(at) => Err(ModelError::BadCharacter {
                field: Field::Message,
                what: "a NUL character",
                at,
            }),
            None => Ok(()),
        }
    }
}

/// Whether a release is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseStatus {
    /// Served to every instance (the newest main release is the current one).
    Main,
    /// Served only to the instances its selector matches.
    Gray,
    /// A gray release that was aborted; never served again.
    Aborted,
}

impl ReleaseStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseStatus::Main => "main",
            ReleaseStatus::Gray => "gray",
            ReleaseStatus::Aborted => "aborted",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "main" => Ok(ReleaseStatus::Main),
            "gray" => Ok(ReleaseStatus::Gray),
            "aborted" => Ok(ReleaseStatus::Aborted),
            other => Err(StoreError::Corrupt(format!("release status {other:?}"))),
        }
    }
}

/// A release without its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseInfo {
    /// The environment.
    pub environment: Environment,
    /// The application.
    pub application: AppName,
    /// Its version (1, 2, …).
    pub version: u64,
    /// When it was made (whole seconds).
    pub created_at: OffsetDateTime,
    /// Who made it.
    pub author: String,
    /// Why.
    pub message: String,
    /// The version it restored, when it is a rollback.
    pub rollback_of: Option<u64>,
    /// Whether it is served.
    pub status: ReleaseStatus,
    /// Who receives it while it is gray.
    pub gray: Option<GraySelector>,
}

/// A release with its decrypted entries, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The environment.
    pub environment: Environment,
    /// The application.
    pub application: AppName,
    /// Its version.
    pub version: u64,
    /// When it was made (whole seconds).
    pub created_at: OffsetDateTime,
    /// Who made it.
    pub author: String,
    /// Why.
    pub message: String,
    /// The version it restored, when it is a rollback.
    pub rollback_of: Option<u64>,
    /// Whether it is served.
    pub status: ReleaseStatus,
    /// Who receives it while it is gray.
    pub gray: Option<GraySelector>,
    /// Every entry.
    pub entries: Vec<ConfigEntry>,
}

impl Release {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&ConfigEntry> {
        self.entries.iter().find(|e| e.key.as_str() == key)
    }

    /// The entries for a listing: secret values replaced by [`MASK`] unless `reveal`.
    pub fn listing(&self, reveal: bool) -> Vec<crate::wire::Entry> {
        self.entries
            .iter()
            .map(|e| crate::wire::Entry {
                key: e.key.to_string(),
                value: shown(e, reveal),
                format: e.format,
                secret: e.secret,
            })
            .collect()
    }
}

fn shown(e: &ConfigEntry, reveal: bool) -> String {
    if e.secret && !reveal {
        MASK.to_owned()
    } else {
        e.value.expose().to_owned()
    }
}

/// One edit for [`Store::apply`].
#[derive(Debug, Clone)]
pub enum Edit {
    /// Sets (adds or replaces) an entry.
    Put(ConfigEntry),
    /// Removes a key (absent keys are ignored).
    Delete(ConfigKey),
}

/// How a key differs between two releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Only in the newer one.
    Added,
    /// Only in the older one.
    Removed,
    /// In both, with another value, format or secret flag.
    Changed,
}

/// One key in a [`Diff`]; values masked when secret unless revealed.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The key.
    pub key: String,
    /// How it changed.
    pub kind: ChangeKind,
    /// Its entry in `from` (masked when secret and not revealed).
    pub before: Option<crate::wire::Entry>,
    /// Its entry in `to` (masked likewise).
    pub after: Option<crate::wire::Entry>,
}

impl fmt::Debug for KeyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyChange")
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("before", &self.before)
            .field("after", &self.after)
            .finish()
    }
}

/// The differences between two releases of one (environment, application).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    /// The older side.
    pub from: u64,
    /// The newer side.
    pub to: u64,
    /// Changed keys, sorted.
    pub changes: Vec<KeyChange>,
}

/// What [`Store::abort_gray`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aborted {
    /// The gray release's version, now aborted.
    pub gray: u64,
    /// The main release republished as a new version, so that the instances that held
    /// the gray release move forward to it; `None` when there was no main release to
    /// republish (nothing is served then, as before the gray release).
    pub republished: Option<ReleaseInfo>,
}

/// A main release of `entries`.
fn main<'a>(
    entries: &'a [ConfigEntry],
    note: &'a ChangeNote,
    rollback_of: Option<u64>,
) -> NewRelease<'a> {
    NewRelease {
        entries,
        note,
        rollback_of,
        status: ReleaseStatus::Main,
        gray: None,
        abort: None,
    }
}

/// The config store: releases in the database, values sealed by the envelope.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    envelope: Envelope,
    /// In-process change feed for SQLite (single instance); Postgres uses NOTIFY.
    local: broadcast::Sender<ReleaseEvent>,
    /// What every new release's content must pass, beyond its names and formats.
    check: Option<ReleaseCheck>,
}

/// A check of a release's whole content, and whether it is main or gray, before it is
/// written: `Err` says why it is refused ([`StoreError::Refused`]). For an application
/// whose content something interprets (settings of the gateway itself), so that a release
/// it would refuse is never published.
#[derive(Clone)]
pub struct ReleaseCheck(std::sync::Arc<CheckFn>);

/// The function of a [`ReleaseCheck`].
type CheckFn = dyn Fn(&Environment, &AppName, &[ConfigEntry], ReleaseStatus) -> Result<(), String>
    + Send
    + Sync;

impl ReleaseCheck {
    /// A check from a function.
    pub fn new(
        check: impl Fn(&Environment, &AppName, &[ConfigEntry], ReleaseStatus) -> Result<(), String>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self(std::sync::Arc::new(check))
    }
}

impl std::fmt::Debug for ReleaseCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReleaseCheck")
    }
}

type EntryRow = (String, String, bool, i64, Vec<u8>);
type InfoRow = (
    i64,
    i64,
    String,
    String,
    Option<i64>,
    String,
    Option<String>,
);

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("version {v} out of range")))
}

fn to_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative version {v}")))
}

fn time_of(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map_err(|_| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// What one insert attempt found.
enum Attempt {
    Done,
    Conflict,
    GrayInProgress(i64),
    /// The gray release to abort is no longer in gray (promoted or aborted meanwhile).
    NoGray,
}

/// The gray release an abort retires, and the main release whose content it republishes
/// (both as read before the transaction, and checked again inside it).
#[derive(Debug, Clone, Copy)]
struct AbortOf {
    gray: i64,
    main: i64,
}

/// One release to insert.
struct NewRelease<'a> {
    entries: &'a [ConfigEntry],
    note: &'a ChangeNote,
    rollback_of: Option<u64>,
    status: ReleaseStatus,
    gray: Option<&'a GraySelector>,
    /// Abort this gray release in the same transaction.
    abort: Option<AbortOf>,
}

impl Store {
    /// A store over `pool` (migrated by [`migrate`]) sealing values with `envelope`.
    pub fn new(pool: Pool, envelope: Envelope) -> Self {
        let (local, _) = broadcast::channel(1024);
        Self {
            pool,
            envelope,
            local,
            check: None,
        }
    }

    /// The store with `check` run on the content of every new release (published,
    /// edited, rolled back to, or published gray); a refusal writes nothing. An abort's
    /// republication of the main release is not checked: that content is in force.
    pub fn with_check(mut self, check: ReleaseCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The envelope (wrapper and key cache).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// A change feed of releases published through any store on this database
    /// (Postgres), or through this store (SQLite).
    pub fn change_feed(&self) -> ChangeFeed {
        match &self.pool {
            Pool::Postgres(p) => ChangeFeed::postgres(p.clone()),
            Pool::Sqlite(_) => ChangeFeed::local(self.local.subscribe()),
        }
    }

    // === reading ===

    /// The current (newest main) version of (env, app); `None` when nothing was
    /// published.
    pub async fn current_version(
        &self,
        env: &Environment,
        app: &AppName,
    ) -> Result<Option<u64>, StoreError> {
        self.max_version(
            "SELECT MAX(version) FROM config_releases WHERE environment = $1 AND application = $2 AND status = 'main'",
            env,
            app,
        )
        .await
    }

    /// The newest version of any status (main, gray or aborted): the version writes name
    /// in [`Expected::Version`].
    pub async fn head_version(
        &self,
        env: &Environment,
        app: &AppName,
    ) -> Result<Option<u64>, StoreError> {
        self.max_version(
            "SELECT MAX(version) FROM config_releases WHERE environment = $1 AND application = $2",
            env,
            app,
        )
        .await
    }

    /// The gray release in progress, if any.
    pub async fn gray_version(
        &self,
        env: &Environment,
        app: &AppName,
    ) -> Result<Option<u64>, StoreError> {
        self.max_version(
            "SELECT MAX(version) FROM config_releases WHERE environment = $1 AND application = $2 AND status = 'gray'",
            env,
            app,
        )
        .await
    }

    async fn max_version(
        &self,
        sql: &'static str,
        env: &Environment,
        app: &AppName,
    ) -> Result<Option<u64>, StoreError> {
        let max: Option<i64> = on_pool!(&self.pool, |p, _pg| {
            sqlx::query_scalar(sql)
                .bind(env.as_str())
                .bind(app.as_str())
                .fetch_one(p)
                .await?
        });
        max.map(to_u64).transpose()
    }

    /// The newest version (of any status) of every (environment, application) that has a
    /// release, for a periodic reconcile of watchers against the change feed. An aborted
    /// release is the newest only when its abort republished nothing (no main release):
    /// it is listed so that an instance that missed the note still drops the gray
    /// release it holds.
    #[tracing::instrument(name = "db.config.latest_versions", skip_all, fields(otel.kind = "client"))]
    pub async fn latest_versions(&self) -> Result<Vec<ReleaseEvent>, StoreError> {
        const SQL: &str = "SELECT environment, application, MAX(version) FROM config_releases GROUP BY environment, application";
        let rows: Vec<(String, String, i64)> = on_pool!(&self.pool, |p, _pg| sqlx::query_as(SQL)
            .fetch_all(p)
            .await?);
        rows.into_iter()
            .map(|(env, app, version)| {
                ReleaseEvent::new(&env, &app, to_u64(version)?)
                    .ok_or_else(|| StoreError::Corrupt(format!("stored name {env:?}/{app:?}")))
            })
            .collect()
    }

    /// Release `version` of (env, app), decrypted.
    #[tracing::instrument(name = "db.config.release", skip_all, fields(otel.kind = "client"))]
    pub async fn release(
        &self,
        env: &Environment,
        app: &AppName,
        version: u64,
    ) -> Result<Release, StoreError> {
        const INFO: &str = "SELECT version, created_at_unix_ms, author, message, rollback_of, status, gray_selector FROM config_releases WHERE environment = $1 AND application = $2 AND version = $3";
        const ENTRIES: &str = "SELECT key, format, secret, data_key_version, sealed FROM config_entries WHERE environment = $1 AND application = $2 AND version = $3";
        // versions are stored as BIGINT: a larger one names no release
        let Ok(v) = i64::try_from(version) else {
            return Err(StoreError::NotFound {
                environment: env.to_string(),
                application: app.to_string(),
                version: Some(version),
            });
        };
        let (info, rows): (Option<InfoRow>, Vec<EntryRow>) = on_pool!(&self.pool, |p, _pg| {
            let mut tx = p.begin().await?;
            let info = sqlx::query_as(INFO)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(v)
                .fetch_optional(&mut *tx)
                .await?;
            let rows = sqlx::query_as(ENTRIES)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(v)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            (info, rows)
        });
        let info = info.ok_or_else(|| StoreError::NotFound {
            environment: env.to_string(),
            application: app.to_string(),
            version: Some(version),
        })?;
        let info = self.info_from_row(env, app, info)?;
        let mut entries = Vec::with_capacity(rows.len());
        // one data key lookup per key version, not per entry
        let mut keys: std::collections::HashMap<i64, std::sync::Arc<DataKey>> =
            std::collections::HashMap::new();
        for (key, format, secret, key_version, sealed) in rows {
            let key = ConfigKey::parse(&key)
                .map_err(|e| StoreError::Corrupt(format!("stored key: {e}")))?;
            let format = Format::parse(&format)
                .map_err(|e| StoreError::Corrupt(format!("stored format: {e}")))?;
            let data_key = match keys.get(&key_version) {
                Some(k) => std::sync::Arc::clone(k),
                None => {
                    let k = self.data_key(env, key_version).await?;
                    keys.insert(key_version, std::sync::Arc::clone(&k));
                    k
                }
            };
            let aad = value_aad(env, app, version, &key, format, secret, key_version);
            let plain = data_key
                .open(&aad, &sealed)
                .ok_or_else(|| CryptoError::Open {
                    environment: env.to_string(),
                    application: app.to_string(),
                    version,
                    key: key.to_string(),
                })?;
            let text = std::str::from_utf8(&plain)
                .map_err(|_| StoreError::Corrupt(format!("value of {key} is not UTF-8")))?;
            let value = crate::model::Value::parse(&key, format, text)
                .map_err(|e| StoreError::Corrupt(format!("stored value: {e}")))?;
            entries.push(ConfigEntry {
                key,
                value,
                format,
                secret,
            });
        }
        entries.sort_by(|a, b| a.key.as_str().as_bytes().cmp(b.key.as_str().as_bytes()));
        Ok(Release {
            environment: info.environment,
            application: info.application,
            version: info.version,
            created_at: info.created_at,
            author: info.author,
            message: info.message,
            rollback_of: info.rollback_of,
            status: info.status,
            gray: info.gray,
            entries,
        })
    }

    /// The current release of (env, app), decrypted; `None` when nothing was published.
    #[tracing::instrument(name = "db.config.current", skip_all, fields(otel.kind = "client"))]
    pub async fn current(
        &self,
        env: &Environment,
        app: &AppName,
    ) -> Result<Option<Release>, StoreError> {
        match self.current_version(env, app).await? {
            Some(v) => self.release(env, app, v).await.map(Some),
            None => Ok(None),
        }
    }

    /// Releases of (env, app), newest first, at most `limit`.
    #[tracing::instrument(name = "db.config.history", skip_all, fields(otel.kind = "client"))]
    pub async fn history(
        &self,
        env: &Environment,
        app: &AppName,
        limit: u32,
    ) -> Result<Vec<ReleaseInfo>, StoreError> {
        const SQL: &str = "SELECT version, created_at_unix_ms, author, message, rollback_of, status, gray_selector FROM config_releases WHERE environment = $1 AND application = $2 ORDER BY version DESC LIMIT $3";
        let rows: Vec<InfoRow> = on_pool!(&self.pool, |p, _pg| {
            sqlx::query_as(SQL)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?
        });
        rows.into_iter()
            .map(|row| self.info_from_row(env, app, row))
            .collect()
    }

    fn info_from_row(
        &self,
        env: &Environment,
        app: &AppName,
        (version, created, author, message, rollback_of, status, gray): InfoRow,
    ) -> Result<ReleaseInfo, StoreError> {
        let gray = gray
            .map(|text| serde_json::from_str::<GraySelector>(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("gray selector: {e}")))?;
        Ok(ReleaseInfo {
            environment: env.clone(),
            application: app.clone(),
            version: to_u64(version)?,
            created_at: time_of(created)?,
            author,
            message,
            rollback_of: rollback_of.map(to_u64).transpose()?,
            status: ReleaseStatus::parse(&status)?,
            gray,
        })
    }

    /// The differences from release `from` to release `to` (any two, either order);
    /// secret values masked unless `reveal`.
    #[tracing::instrument(name = "db.config.diff", skip_all, fields(otel.kind = "client"))]
    pub async fn diff(
        &self,
        env: &Environment,
        app: &AppName,
        from: u64,
        to: u64,
        reveal: bool,
    ) -> Result<Diff, StoreError> {
        let before = self.release(env, app, from).await?;
        let after = self.release(env, app, to).await?;
        let old: BTreeMap<&str, &ConfigEntry> =
            before.entries.iter().map(|e| (e.key.as_str(), e)).collect();
        let new: BTreeMap<&str, &ConfigEntry> =
            after.entries.iter().map(|e| (e.key.as_str(), e)).collect();
        let wire = |e: &ConfigEntry| crate::wire::Entry {
            key: e.key.to_string(),
            value: shown(e, reveal),
            format: e.format,
            secret: e.secret,
        };
        let mut keys: Vec<&str> = old.keys().chain(new.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        let changes = keys
            .into_iter()
            .filter_map(|key| {
                let (b, a) = (old.get(key).copied(), new.get(key).copied());
                let kind = match (b, a) {
                    (None, Some(_)) => ChangeKind::Added,
                    (Some(_), None) => ChangeKind::Removed,
                    (Some(b), Some(a)) if b != a => ChangeKind::Changed,
                    _ => return None,
                };
                Some(KeyChange {
                    key: key.to_owned(),
                    kind,
                    before: b.map(wire),
                    after: a.map(wire),
                })
            })
            .collect();
        Ok(Diff { from, to, changes })
    }

    // === writing ===

    /// Publishes `entries` as the full snapshot of a new main release of (env, app).
    /// `expected` names the head version ([`Store::head_version`]). Refused while a gray
    /// release is in progress.
    #[tracing::instrument(name = "db.config.publish", skip_all, fields(otel.kind = "client"))]
    pub async fn publish(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
        entries: Vec<ConfigEntry>,
        note: &ChangeNote,
    ) -> Result<ReleaseInfo, StoreError> {
        let entries = check_entries(entries)?;
        self.publish_checked(env, app, expected, main(&entries, note, None))
            .await
    }

    /// Publishes `entries` as a gray release: served only to instances `selector`
    /// matches ([`Store::snapshot_for`]) until [`Store::promote`] or [`Store::abort_gray`].
    /// One gray release at a time per (environment, application).
    #[tracing::instrument(name = "db.config.publish_gray", skip_all, fields(otel.kind = "client"))]
    pub async fn publish_gray(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
        entries: Vec<ConfigEntry>,
        selector: &GraySelector,
        note: &ChangeNote,
    ) -> Result<ReleaseInfo, StoreError> {
        let entries = check_entries(entries)?;
        let release = NewRelease {
            entries: &entries,
            note,
            rollback_of: None,
            status: ReleaseStatus::Gray,
            gray: Some(selector),
            abort: None,
        };
        self.publish_checked(env, app, expected, release).await
    }

    /// Makes the gray release in progress the main release (same version, so instances
    /// that already hold it keep it; every other instance moves up to it).
    ///
    /// `expected` names the gray release's version (it is the head while in progress).
    #[tracing::instrument(name = "db.config.promote", skip_all, fields(otel.kind = "client"))]
    pub async fn promote(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
    ) -> Result<u64, StoreError> {
        const SQL: &str = "UPDATE config_releases SET status = 'main' WHERE environment = $1 AND application = $2 AND status = 'gray' AND version = $3 RETURNING version";
        let gray = self.expect_gray(env, app, expected).await?;
        let gray_i64 = to_i64(gray)?;
        let promoted: Option<i64> = on_pool!(&self.pool, |p, pg| {
            let mut tx = p.begin().await?;
            let version: Option<i64> = sqlx::query_scalar(SQL)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(gray_i64)
                .fetch_optional(&mut *tx)
                .await?;
            if let (Some(v), true) = (version, pg) {
                sqlx::query(NOTIFY)
                    .bind(NOTIFY_CHANNEL)
                    .bind(format!("{env}/{app}/{v}"))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            version
        });
        let version = to_u64(promoted.ok_or(StoreError::NoGray)?)?;
        self.announce(env, app, version);
        tracing::info!(environment = %env, application = %app, version, "gray config release promoted");
        Ok(version)
    }

    /// Aborts the gray release in progress: it is never served again, and the current
    /// main release is republished as a new version so that every instance — those that
    /// held the gray one too — moves forward to it (clients never go back a version).
    /// With no main release (the first release of the application was published gray),
    /// nothing is republished: every instance finds no release, as before.
    ///
    /// `expected` names the gray release's version (it is the head while in progress).
    /// The transaction checks that the release is still gray and the main release still
    /// the one read: an abort that loses a race with a promote gets [`StoreError::NoGray`]
    /// and changes nothing.
    #[tracing::instrument(name = "db.config.abort_gray", skip_all, fields(otel.kind = "client"))]
    pub async fn abort_gray(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
        note: &ChangeNote,
    ) -> Result<Aborted, StoreError> {
        let gray = self.expect_gray(env, app, expected).await?;
        let Some(main_release) = self.current(env, app).await? else {
            self.retire_gray(env, app, gray).await?;
            tracing::info!(environment = %env, application = %app, gray, "gray config release aborted; no main release to republish");
            return Ok(Aborted {
                gray,
                republished: None,
            });
        };
        let release = NewRelease {
            entries: &main_release.entries,
            note,
            rollback_of: Some(main_release.version),
            status: ReleaseStatus::Main,
            gray: None,
            abort: Some(AbortOf {
                gray: to_i64(gray)?,
                main: to_i64(main_release.version)?,
            }),
        };
        let info = self
            .publish_checked(env, app, Expected::Version(gray), release)
            .await?;
        tracing::info!(environment = %env, application = %app, gray, version = info.version, "gray config release aborted");
        Ok(Aborted {
            gray,
            republished: Some(info),
        })
    }

    /// Marks gray release `gray` aborted and publishes nothing, when there is no main
    /// release; the note tells the other instances to drop the gray release they hold.
    async fn retire_gray(
        &self,
        env: &Environment,
        app: &AppName,
        gray: u64,
    ) -> Result<(), StoreError> {
        let v = to_i64(gray)?;
        let payload = format!("{env}/{app}/{gray}");
        on_pool!(&self.pool, |p, pg| {
            let mut tx = p.begin().await?;
            let aborted = sqlx::query(ABORT_GRAY)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(v)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if aborted != 1 {
                // promoted (or aborted) since it was read
                tx.rollback().await?;
                return Err(StoreError::NoGray);
            }
            let main: Option<i64> = sqlx::query_scalar(MAIN_VERSION)
                .bind(env.as_str())
                .bind(app.as_str())
                .fetch_one(&mut *tx)
                .await?;
            if let Some(main) = main {
                // a main release appeared since it was read (none can while a release is
                // gray): refuse, so that the operator looks again
                tx.rollback().await?;
                return Err(StoreError::Conflict {
                    expected: gray,
                    current: to_u64(main)?,
                });
            }
            if pg {
                sqlx::query(NOTIFY)
                    .bind(NOTIFY_CHANNEL)
                    .bind(&payload)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        self.announce(env, app, gray);
        Ok(())
    }

    /// The gray release in progress, checked against `expected`.
    async fn expect_gray(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
    ) -> Result<u64, StoreError> {
        let gray = self
            .gray_version(env, app)
            .await?
            .ok_or(StoreError::NoGray)?;
        match expected {
            Expected::Version(v) if v != gray => Err(StoreError::Conflict {
                expected: v,
                current: gray,
            }),
            _ => Ok(gray),
        }
    }

    /// What an instance receives: the gray release in progress when its selector
    /// matches `instance` or `labels`, otherwise the current main release.
    #[tracing::instrument(name = "db.config.snapshot_for", skip_all, fields(otel.kind = "client"))]
    pub async fn snapshot_for(
        &self,
        env: &Environment,
        app: &AppName,
        instance: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<Release>, StoreError> {
        if let Some(gray) = self.gray_version(env, app).await? {
            let release = self.release(env, app, gray).await?;
            // promoted or aborted meanwhile: fall through to the main release
            if release.status == ReleaseStatus::Gray
                && release
                    .gray
                    .as_ref()
                    .is_some_and(|s| s.matches(instance, labels))
            {
                return Ok(Some(release));
            }
        }
        self.current(env, app).await
    }

    /// Applies `edits` to the current main release and publishes the result.
    #[tracing::instrument(name = "db.config.apply", skip_all, fields(otel.kind = "client"))]
    pub async fn apply(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
        edits: &[Edit],
        note: &ChangeNote,
    ) -> Result<ReleaseInfo, StoreError> {
        for _ in 0..ANY_RETRIES {
            let head = self.head_version(env, app).await?.unwrap_or(0);
            if let Expected::Version(v) = expected
                && v != head
            {
                return Err(StoreError::Conflict {
                    expected: v,
                    current: head,
                });
            }
            let current = self.current(env, app).await?;
            let mut map: BTreeMap<ConfigKey, ConfigEntry> = current
                .map(|r| r.entries.into_iter().map(|e| (e.key.clone(), e)).collect())
                .unwrap_or_default();
            for edit in edits {
                match edit {
                    Edit::Put(e) => {
                        map.insert(e.key.clone(), e.clone());
                    }
                    Edit::Delete(k) => {
                        map.remove(k);
                    }
                }
            }
            let entries = check_entries(map.into_values().collect())?;
            match self
                .publish_checked(
                    env,
                    app,
                    Expected::Version(head),
                    main(&entries, note, None),
                )
                .await
            {
                Err(StoreError::Conflict { .. }) if expected == Expected::Any => continue,
                other => return other,
            }
        }
        Err(StoreError::Conflict {
            expected: 0,
            current: self.head_version(env, app).await?.unwrap_or(0),
        })
    }

    /// Republishes release `to`'s snapshot as a new main release (nothing is deleted).
    #[tracing::instrument(name = "db.config.rollback", skip_all, fields(otel.kind = "client"))]
    pub async fn rollback(
        &self,
        env: &Environment,
        app: &AppName,
        to: u64,
        expected: Expected,
        note: &ChangeNote,
    ) -> Result<ReleaseInfo, StoreError> {
        let target = self.release(env, app, to).await?;
        self.publish_checked(env, app, expected, main(&target.entries, note, Some(to)))
            .await
    }

    fn announce(&self, env: &Environment, app: &AppName, version: u64) {
        if let Some(event) = ReleaseEvent::new(env.as_str(), app.as_str(), version) {
            // no subscriber is fine
            let _ = self.local.send(event);
        }
    }

    async fn publish_checked(
        &self,
        env: &Environment,
        app: &AppName,
        expected: Expected,
        release: NewRelease<'_>,
    ) -> Result<ReleaseInfo, StoreError> {
        // no stored version is i64::MAX or more, so such an expectation never holds (and
        // its successor would not fit)
        if let Expected::Version(v) = expected
            && v >= i64::MAX as u64
        {
            return Err(StoreError::Conflict {
                expected: v,
                current: self.head_version(env, app).await?.unwrap_or(0),
            });
        }
        release.note.check()?;
        if let Some(check) = self.check.as_ref().filter(|_| release.abort.is_none()) {
            (check.0)(env, app, release.entries, release.status).map_err(StoreError::Refused)?;
        }
        let (key_version, data_key) = self.current_data_key(env).await?;
        for _ in 0..ANY_RETRIES {
            let base = match expected {
                Expected::Version(v) => v,
                Expected::Any => self.head_version(env, app).await?.unwrap_or(0),
            };
            let version = base + 1;
            let created_at = now_seconds();
            match self
                .try_insert(
                    env,
                    app,
                    version,
                    created_at,
                    &release,
                    key_version,
                    &data_key,
                )
                .await?
            {
                Attempt::Done => {
                    self.announce(env, app, version);
                    tracing::info!(environment = %env, application = %app, version, status = release.status.as_str(), entries = release.entries.len(), "config release published");
                    return Ok(ReleaseInfo {
                        environment: env.clone(),
                        application: app.clone(),
                        version,
                        created_at,
                        author: release.note.author.clone(),
                        message: release.note.message.clone(),
                        rollback_of: release.rollback_of,
                        status: release.status,
                        gray: release.gray.cloned(),
                    });
                }
                Attempt::GrayInProgress(v) => return Err(StoreError::GrayInProgress(to_u64(v)?)),
                Attempt::NoGray => return Err(StoreError::NoGray),
                Attempt::Conflict if expected == Expected::Any => continue,
                Attempt::Conflict => {
                    return Err(StoreError::Conflict {
                        expected: base,
                        current: self.head_version(env, app).await?.unwrap_or(0),
                    });
                }
            }
        }
        Err(StoreError::Conflict {
            expected: 0,
            current: self.head_version(env, app).await?.unwrap_or(0),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_insert(
        &self,
        env: &Environment,
        app: &AppName,
        version: u64,
        created_at: OffsetDateTime,
        release: &NewRelease<'_>,
        key_version: i64,
        data_key: &DataKey,
    ) -> Result<Attempt, StoreError> {
        const RELEASE: &str = "INSERT INTO config_releases (environment, application, version, created_at_unix_ms, author, message, rollback_of, status, gray_selector) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
        // both checks in one round trip: how many releases exist (the new one included),
        // and the newest other release still in gray
        const CHECK: &str = "SELECT COUNT(*), MAX(CASE WHEN status = 'gray' AND version <> $3 THEN version END) \
             FROM config_releases WHERE environment = $1 AND application = $2";
        const ENTRIES: &str = "INSERT INTO config_entries (environment, application, version, key, format, secret, data_key_version, sealed) ";

        let sealed = release
            .entries
            .iter()
            .map(|e| {
                let aad = value_aad(env, app, version, &e.key, e.format, e.secret, key_version);
                data_key.seal(&aad, e.value.expose().as_bytes())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let v = to_i64(version)?;
        let rollback_of = release.rollback_of.map(to_i64).transpose()?;
        let created_ms = created_at.unix_timestamp().saturating_mul(1000);
        let payload = format!("{env}/{app}/{version}");
        let selector = release
            .gray
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("gray selector: {e}")))?;

        on_pool!(&self.pool, |p, pg| {
            let mut tx = p.begin().await?;
            if let Some(abort) = release.abort {
                // a write, so on SQLite it takes the write lock before the read below; on
                // Postgres it locks the gray row, which a concurrent promote waits for
                let aborted = sqlx::query(ABORT_GRAY)
                    .bind(env.as_str())
                    .bind(app.as_str())
                    .bind(abort.gray)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if aborted != 1 {
                    // promoted (or aborted) since it was read: republishing the main
                    // content read before would undo that
                    tx.rollback().await?;
                    return Ok(Attempt::NoGray);
                }
                let main: Option<i64> = sqlx::query_scalar(MAIN_VERSION)
                    .bind(env.as_str())
                    .bind(app.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                if main != Some(abort.main) {
                    tx.rollback().await?;
                    return Ok(Attempt::Conflict);
                }
            }
            // the write comes first: on SQLite it takes the write lock before any read
            let inserted = sqlx::query(RELEASE)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(v)
                .bind(created_ms)
                .bind(&release.note.author)
                .bind(&release.note.message)
                .bind(rollback_of)
                .bind(release.status.as_str())
                .bind(selector.as_deref())
                .execute(&mut *tx)
                .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    tx.rollback().await?;
                    return Ok(Attempt::Conflict);
                }
                Err(e) => return Err(e.into()),
            }
            let (count, gray): (i64, Option<i64>) = sqlx::query_as(CHECK)
                .bind(env.as_str())
                .bind(app.as_str())
                .bind(v)
                .fetch_one(&mut *tx)
                .await?;
            if count != v {
                // expected a version ahead of the head
                tx.rollback().await?;
                return Ok(Attempt::Conflict);
            }
            if let Some(gray) = gray {
                tx.rollback().await?;
                return Ok(Attempt::GrayInProgress(gray));
            }
            // many rows a statement: one round trip per ENTRIES_PER_INSERT entries rather
            // than one per entry
            let rows: Vec<_> = release.entries.iter().zip(&sealed).collect();
            for chunk in rows.chunks(ENTRIES_PER_INSERT) {
                let mut insert = sqlx::QueryBuilder::new(ENTRIES);
                insert.push_values(chunk, |mut b, (e, sealed)| {
                    b.push_bind(env.as_str())
                        .push_bind(app.as_str())
                        .push_bind(v)
                        .push_bind(e.key.as_str())
                        .push_bind(e.format.as_str())
                        .push_bind(e.secret)
                        .push_bind(key_version)
                        .push_bind(sealed.as_slice());
                });
                insert.build().execute(&mut *tx).await?;
            }
            if pg {
                // delivered to listeners only when (and if) the transaction commits
                sqlx::query(NOTIFY)
                    .bind(NOTIFY_CHANNEL)
                    .bind(&payload)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(Attempt::Done)
        })
    }

    // === data keys ===

    async fn stored_key(
        &self,
        env: &Environment,
        key_version: Option<i64>,
    ) -> Result<Option<WrappedKey>, StoreError> {
        const ONE: &str = "SELECT key_version, wrapper, wrapped FROM config_data_keys WHERE environment = $1 AND key_version = $2";
        const NEWEST: &str = "SELECT key_version, wrapper, wrapped FROM config_data_keys WHERE environment = $1 ORDER BY key_version DESC LIMIT 1";
        let row: Option<(i64, String, String)> = on_pool!(&self.pool, |p, _pg| {
            match key_version {
                Some(kv) => {
                    sqlx::query_as(ONE)
                        .bind(env.as_str())
                        .bind(kv)
                        .fetch_optional(p)
                        .await?
                }
                None => {
                    sqlx::query_as(NEWEST)
                        .bind(env.as_str())
                        .fetch_optional(p)
                        .await?
                }
            }
        });
        Ok(row.map(|(key_version, wrapper, wrapped)| WrappedKey {
            key_version,
            wrapper,
            wrapped,
        }))
    }

    async fn data_key(
        &self,
        env: &Environment,
        key_version: i64,
    ) -> Result<std::sync::Arc<DataKey>, StoreError> {
        if let Some(key) = self.envelope.cached(env, key_version) {
            return Ok(key);
        }
        let stored = self
            .stored_key(env, Some(key_version))
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("data key {key_version} of {env} is missing"))
            })?;
        Ok(self.envelope.data_key(env, &stored).await?)
    }

    /// The environment's newest data key, created on first use.
    async fn current_data_key(
        &self,
        env: &Environment,
    ) -> Result<(i64, std::sync::Arc<DataKey>), StoreError> {
        if let Some(stored) = self.stored_key(env, None).await? {
            let key = self.envelope.data_key(env, &stored).await?;
            return Ok((stored.key_version, key));
        }
        self.insert_data_key(env, 1).await?;
        let stored = self
            .stored_key(env, None)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("data key of {env} vanished")))?;
        let key = self.envelope.data_key(env, &stored).await?;
        Ok((stored.key_version, key))
    }

    /// Inserts a new data key `key_version` for `env` unless another instance already did.
    async fn insert_data_key(&self, env: &Environment, key_version: i64) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO config_data_keys (environment, key_version, wrapper, wrapped, created_at_unix_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
        let (key, wrapped) = self.envelope.new_data_key(env).await?;
        let kind = self.envelope.wrapper().kind();
        let now_ms = now_seconds().unix_timestamp().saturating_mul(1000);
        let done = on_pool!(&self.pool, |p, _pg| {
            sqlx::query(SQL)
                .bind(env.as_str())
                .bind(key_version)
                .bind(kind)
                .bind(&wrapped)
                .bind(now_ms)
                .execute(p)
                .await?
                .rows_affected()
        });
        if done == 1 {
            self.envelope.remember(env, key_version, key);
        }
        Ok(())
    }

    /// Starts a new data key for `env`: later releases are sealed under it, earlier ones
    /// stay readable under theirs. Returns the new key version.
    #[tracing::instrument(name = "db.config.rotate_data_key", skip_all, fields(otel.kind = "client"))]
    pub async fn rotate_data_key(&self, env: &Environment) -> Result<i64, StoreError> {
        let next = self
            .stored_key(env, None)
            .await?
            .map_or(1, |k| k.key_version + 1);
        self.insert_data_key(env, next).await?;
        Ok(next)
    }

    /// Re-wraps every stored data key under the wrapping key's newest version (after
    /// [`crate::KeyWrapper::rotate`]), one row at a time with compare-and-set, while the
    /// store keeps serving: old and new wrapped forms both unwrap until the old Transit
    /// key version is retired. Returns how many rows were re-wrapped.
    #[tracing::instrument(name = "db.config.rewrap_data_keys", skip_all, fields(otel.kind = "client"))]
    pub async fn rewrap_data_keys(&self) -> Result<u64, StoreError> {
        const ALL: &str =
            "SELECT environment, key_version, wrapped FROM config_data_keys WHERE wrapper = $1";
        const SET: &str = "UPDATE config_data_keys SET wrapped = $1 WHERE environment = $2 AND key_version = $3 AND wrapped = $4";
        let kind = self.envelope.wrapper().kind();
        let rows: Vec<(String, i64, String)> = on_pool!(&self.pool, |p, _pg| sqlx::query_as(ALL)
            .bind(kind)
            .fetch_all(p)
            .await?);
        let mut count = 0;
        for (env, key_version, wrapped) in rows {
            let rewrapped = self.envelope.wrapper().rewrap(&wrapped).await?;
            let n = on_pool!(&self.pool, |p, _pg| {
                sqlx::query(SET)
                    .bind(&rewrapped)
                    .bind(&env)
                    .bind(key_version)
                    .bind(&wrapped)
                    .execute(p)
                    .await?
                    .rows_affected()
            });
            count += n;
        }
        Ok(count)
    }
}

/// Parses a pool URL into a lazily connecting pool (`sqlite:` or `postgres://`), for
/// tests and tools; the gateway passes its own pool instead.
pub fn lazy_pool(url: &str) -> Result<Pool, StoreError> {
    if url.starts_with("sqlite:") {
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        Ok(Pool::Sqlite(
            sqlx::sqlite::SqlitePoolOptions::new().connect_lazy_with(opts),
        ))
    } else {
        let opts = sqlx::postgres::PgConnectOptions::from_str(url)?;
        Ok(Pool::Postgres(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(10)
                .connect_lazy_with(opts),
        ))
    }
}
