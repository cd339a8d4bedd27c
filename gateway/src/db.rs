//! The database: Postgres in production, SQLite for a single `--dev` instance.
//!
//! Pools connect lazily, so an instance starts (and reports not-ready) while the database
//! is away; migrations are retried in the background until they succeed.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgConnection, PgPool, SqlitePool};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL does not parse (its text is never shown: it may hold a password).
    #[error("database.url does not parse")]
    Url,
    /// A query or connection failed.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The schema is not in place yet (migrations still pending).
    #[error("database schema not migrated yet")]
    NotMigrated,
    /// The session migrating the database is gone from the server (a failover left it
    /// silent, or its backend was ended): the migration is given up, to be made again.
    #[error("the migration's database session is gone from the server")]
    MigrationSessionLost,
}

/// Settings every Postgres session of ours starts with, so that the server notices within
/// about 25 s that an instance vanished (power cut, network gone) and ends its backend,
/// rolling back its transaction and releasing its locks — the audit chain head's among
/// them. The kernel's defaults take about two hours: keepalives only after 2 h of
/// silence, and none at all while a reply waits unacknowledged (retransmissions then run
/// for ~15 min). Probes after 10 s of silence, every 5 s, 3 unanswered ones end the
/// connection; `tcp_user_timeout` (milliseconds, Postgres 12 or later) ends it once sent
/// data has gone unacknowledged for 25 s (on Linux it also decides when unanswered
/// probes end it: after 25 s). A live client's kernel answers probes however idle the
/// client is. Ignored on a Unix socket.
///
/// Set by `SET` once a connection is open, not in the startup packet's `options`: a
/// pooler in between (PgBouncer) refuses a startup `options` it was not told to ignore,
/// and a server that lacks a setting (`tcp_user_timeout` before Postgres 12) would refuse
/// the connection. Here such a failure is logged and the connection used all the same.
/// One statement each: sent together they would run as one implicit transaction, and one
/// refused setting would undo the others.
const DEAD_CLIENT_DETECTION: [&str; 4] = [
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 25000",
];

/// The check of a Postgres connection given back to the pool, bounded by `deadline`
/// (`database.acquire_timeout`): a round trip, which also waits out whatever a request cut
/// off by its deadline left running on it. sqlx makes the same check right after (another
/// round trip, cheap once this one is answered) but with no deadline: on a connection a
/// failover left silent (the server gone, nothing answering, no reset) it would wait for
/// as long as the kernel retransmits, about 15 minutes, and hold the connection's place
/// in the pool all that time. A connection that does not answer in time is closed at once
/// (an error makes sqlx drop it without a goodbye) and counted in
/// `portcullis_db_connections_closed_total{reason="release_check"}`.
async fn check_on_release(
    conn: &mut PgConnection,
    deadline: Duration,
) -> Result<bool, sqlx::Error> {
    match ping_within(conn, deadline, "release_check").await {
        Ok(()) => Ok(true),
        Err(Unfit { error, unanswered }) => {
            if unanswered {
                tracing::warn!(
                    deadline = ?deadline,
                    "a database connection given back to the pool did not answer in time; \
                     closing it (a failover may have left it silent)"
                );
            }
            Err(error)
        }
    }
}

/// A connection that failed one of the pool's checks, to be closed.
struct Unfit {
    /// What sqlx is told, which makes it drop the connection without a goodbye.
    error: sqlx::Error,
    /// It gave no answer within the deadline (rather than an error).
    unanswered: bool,
}

/// Pings `conn` within `deadline`. A connection that answers with an error, or not in
/// time, is [`Unfit`], and counted in `portcullis_db_connections_closed_total{reason}`.
async fn ping_within(
    conn: &mut PgConnection,
    deadline: Duration,
    reason: &'static str,
) -> Result<(), Unfit> {
    let unfit = match tokio::time::timeout(deadline, sqlx::Connection::ping(conn)).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(error)) => Unfit {
            error,
            unanswered: false,
        },
        Err(_) => Unfit {
            error: sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection did not answer the pool's check in time",
            )),
            unanswered: true,
        },
    };
    metrics::counter!("portcullis_db_connections_closed_total", "reason" => reason).increment(1);
    Err(unfit)
}

/// The check of an idle Postgres connection before the pool hands it out, in place of
/// sqlx's own (`test_before_acquire`), which has no deadline but the whole acquire's: a
/// connection a failover left silent then cost the request that drew it its whole
/// `database.acquire_timeout` and a 503, and each idle connection the next request again.
///
/// Here a connection made before the last one found silent (`silence`) is closed unasked:
/// a failover silences every connection open at the time, so once one idle connection does
/// not answer its siblings are not asked in turn. Any other is pinged, within a third of
/// the acquire timeout; one that does not answer in time marks the silence and is closed,
/// and the acquire goes on with a newer connection, or a new one. A check that times out
/// on a live but slow server costs the pool its older idle connections, made again on
/// demand: a few milliseconds each.
async fn check_on_acquire(
    conn: &mut PgConnection,
    age: Duration,
    silence: &SilenceMark,
    deadline: Duration,
) -> Result<bool, sqlx::Error> {
    if silence.precedes_made(age) {
        metrics::counter!("portcullis_db_connections_closed_total", "reason" => "older_than_silent")
            .increment(1);
        return Ok(false);
    }
    match ping_within(conn, deadline, "acquire_check").await {
        Ok(()) => Ok(true),
        Err(Unfit { error, unanswered }) => {
            if unanswered {
                silence.mark();
                tracing::warn!(
                    deadline = ?deadline,
                    "an idle database connection did not answer the pool's check in time; \
                     closing it and every connection older than it (a failover may have left \
                     them silent)"
                );
            }
            Err(error)
        }
    }
}

/// When an idle connection of the pool was last found silent, as an offset from the
/// pool's creation; connections made before it are closed unasked ([`check_on_acquire`]).
#[derive(Debug)]
struct SilenceMark {
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch`; 0: never.
    at_ns: std::sync::atomic::AtomicU64,
}

impl SilenceMark {
    fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            at_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn mark(&self) {
        self.mark_at(self.elapsed_ns());
    }

    /// Marks a silence found `at_ns` after the epoch; an earlier mark than the last one
    /// (two checks timing out at once) changes nothing.
    fn mark_at(&self, at_ns: u64) {
        self.at_ns.fetch_max(at_ns.max(1), Ordering::Relaxed);
    }

    /// Whether a connection `age` old was made before the last mark.
    fn precedes_made(&self, age: Duration) -> bool {
        let age_ns = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
        self.marked_after(self.elapsed_ns().saturating_sub(age_ns))
    }

    /// Whether the last mark came after `made_ns` (after the epoch).
    fn marked_after(&self, made_ns: u64) -> bool {
        let at = self.at_ns.load(Ordering::Relaxed);
        at != 0 && made_ns < at
    }
}

/// Runs `$body` with `$p` bound to the pool, whichever kind it is: one SQL text, both
/// backends. (The arms are type-checked separately, so `$body` may be generic over the
/// database.)
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            $crate::db::Pool::Postgres($p) => $body,
            $crate::db::Pool::Sqlite($p) => $body,
        }
    };
}

/// A pool of either kind.
#[derive(Debug, Clone)]
pub enum Pool {
    /// Postgres.
    Postgres(PgPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

/// The database handle shared by every feature.
#[derive(Debug, Clone)]
pub struct Database {
    pool: Pool,
    migrated: Arc<AtomicBool>,
}

impl Database {
    /// Builds the pool without connecting.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Self, DbError> {
        let url = config.url.expose_secret();
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|_| DbError::Url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5));
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(config.acquire_timeout)
                    .connect_lazy_with(opts),
            )
        } else {
            let opts = PgConnectOptions::from_str(url).map_err(|_| DbError::Url)?;
            let release_check = config.acquire_timeout;
            let acquire_check = config.acquire_timeout / 3;
            let silence = Arc::new(SilenceMark::new());
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(config.max_connections)
                    // replaced when idle or old connections are closed (every 10 min)
                    .min_connections(config.min_connections)
                    .acquire_timeout(config.acquire_timeout)
                    .test_before_acquire(false)
                    .before_acquire(move |conn, meta| {
                        let silence = Arc::clone(&silence);
                        Box::pin(async move {
                            check_on_acquire(conn, meta.age, &silence, acquire_check).await
                        })
                    })
                    .after_release(move |conn, _| Box::pin(check_on_release(conn, release_check)))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            for set in DEAD_CLIENT_DETECTION {
                                if let Err(e) = sqlx::Executor::execute(&mut *conn, set).await {
                                    tracing::warn!(
                                        setting = set,
                                        error = %e,
                                        "the server did not take a dead-client detection \
                                         setting; a vanished instance's session may outlive it"
                                    );
                                }
                            }
                            Ok(())
                        })
                    })
                    .connect_lazy_with(opts),
            )
        };
        Ok(Self {
            pool,
            migrated: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Which backend, for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Postgres(_) => "postgres",
            Pool::Sqlite(_) => "sqlite",
        }
    }

    /// Applies pending migrations: the gateway's own, then the config center's. Both
    /// share sqlx's bookkeeping table (the config center numbers its migrations from
    /// 1001), so each ignores the other's rows. On Postgres they run under a lock that
    /// every instance takes first (see [`migrate_postgres`]).
    pub async fn migrate(&self) -> Result<(), DbError> {
        match &self.pool {
            Pool::Postgres(p) => migrate_postgres(p).await?,
            Pool::Sqlite(p) => {
                let mut m = sqlx::migrate!("./migrations/sqlite");
                m.set_ignore_missing(true);
                m.run(p).await?;
                config_center::sqlite_migrator().run(p).await?;
            }
        }
        self.migrated.store(true, Ordering::Release);
        self.warm().await;
        Ok(())
    }

    /// Opens the pool's `min_connections` now (Postgres), so that the first writes do
    /// not each wait for a new connection and backend (3–10 ms apiece on a small
    /// machine). sqlx keeps that many open from then on. A connection that cannot be
    /// made now is made on demand, as before.
    async fn warm(&self) {
        if let Pool::Postgres(p) = &self.pool {
            let min = p.options().get_min_connections();
            let held = futures::future::join_all((0..min).map(|_| p.acquire())).await;
            let opened = held.iter().filter(|c| c.is_ok()).count();
            tracing::debug!(opened, "database pool warmed");
        }
    }

    /// The same pool, as the config center names it.
    pub fn config_center_pool(&self) -> config_center::Pool {
        match &self.pool {
            Pool::Postgres(p) => config_center::Pool::Postgres(p.clone()),
            Pool::Sqlite(p) => config_center::Pool::Sqlite(p.clone()),
        }
    }

    /// Whether migrations have completed.
    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    /// Retries migrations until they succeed or `stop` is cancelled.
    pub async fn migrate_until_done(&self, stop: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        loop {
            // a connection attempt may hang until the acquire timeout: shutdown must not
            // wait for it
            let attempt = tokio::select! {
                () = stop.cancelled() => return,
                r = self.migrate() => r,
            };
            match attempt {
                Ok(()) => {
                    tracing::info!(backend = self.backend(), "database schema up to date");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "database migration failed; will retry");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// One round trip, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        crate::on_pool!(&self.pool, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .map(|_| ())?);
        if self.is_migrated() {
            Ok(())
        } else {
            Err(DbError::NotMigrated)
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        crate::on_pool!(&self.pool, |p| p.close().await);
    }
}

/// How often an instance asks again for the migration lock another instance holds.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(250);

/// Indexes that a migration of their own builds `CONCURRENTLY`: (its version, the index).
/// A build cut off (the instance stopped, the connection lost) leaves the index behind,
/// invalid, and the migration unrecorded; its `IF NOT EXISTS` would then pass over it.
const CONCURRENT_BUILDS: [(i64, &str); 2] =
    [(6, "audit_events_at_brin"), (7, "audit_events_action_rare")];

/// Runs the gateway's and the config center's Postgres migrations on a session of their
/// own, holding the lock that keeps two instances from migrating at once: the advisory
/// lock sqlx's migrator takes, under the same key, so that an instance of an earlier
/// version starting meanwhile waits as well.
///
/// Unlike sqlx's own locking:
/// - The session is taken out of the pool and closed at the end, whatever happened:
///   Postgres releases the lock with it. sqlx leaves the lock held when a migration
///   fails, on a connection it returns to the pool, and every later attempt of every
///   instance then waits on it for good.
/// - The lock is asked for with `pg_try_advisory_lock`, again every
///   [`MIGRATION_LOCK_POLL`], not waited for in `pg_advisory_lock`. A session waiting
///   inside a statement holds a snapshot, and `CREATE INDEX CONCURRENTLY` (0006, 0007)
///   waits for every older snapshot to end: the holder's build would wait for the
///   waiters and the waiters for the holder, until Postgres's deadlock check cancelled
///   one of them, the build as likely as not.
///
/// And the session is watched from another connection ([`Backend::until_gone`]): once
/// the server no longer knows it (a failover left it silent), the migration is given up
/// with [`DbError::MigrationSessionLost`] and [`Database::migrate_until_done`] makes it
/// again on a new session.
async fn migrate_postgres(pool: &PgPool) -> Result<(), DbError> {
    let mut session = pool.acquire().await?.detach();
    let migrated =
        match tokio::time::timeout(MIGRATION_SESSION_CHECK, Backend::of(&mut session)).await {
            Ok(Ok(backend)) => tokio::select! {
                migrated = migrate_postgres_on(&mut session) => migrated,
                () = backend.until_gone(pool) => {
                    tracing::warn!(
                        pid = backend.pid,
                        "the session migrating the database is gone from the server (a failover \
                         may have left it silent); giving the migration up to make it again"
                    );
                    Err(DbError::MigrationSessionLost)
                }
            },
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(DbError::MigrationSessionLost),
        };
    // closing the session releases the lock; a failure to say goodbye changes nothing
    // (the server ends the backend when the socket closes), and on a silent session the
    // goodbye is not waited for
    let _ = tokio::time::timeout(MIGRATION_SESSION_CHECK, sqlx::Connection::close(session)).await;
    migrated
}

/// How often, while migrating, an instance looks for its migrating session on the server
/// (and how long it waits for that session's first answer).
const MIGRATION_SESSION_CHECK: Duration = Duration::from_secs(5);

/// A server process (backend) serving one session: its pid and its start, in
/// microseconds since the epoch, so that a pid used again later, or by another server
/// after a failover, is not taken for it.
#[derive(Debug, Clone, Copy)]
struct Backend {
    pid: i32,
    started_us: i64,
}

impl Backend {
    /// The backend serving `session`.
    async fn of(session: &mut PgConnection) -> Result<Self, sqlx::Error> {
        let (pid, started_us) = sqlx::query_as(
            "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint \
             FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(session)
        .await?;
        Ok(Self { pid, started_us })
    }

    /// Returns once the server, asked on another connection of `pool` every
    /// [`MIGRATION_SESSION_CHECK`], says this backend is gone. A migration may run for
    /// minutes (an index built over a large trail) and is not cut off while its backend
    /// lives; but a session that a failover left silent waits for an answer for as long as
    /// the kernel retransmits (about 15 min), or for ever when nothing it sent is left
    /// unacknowledged, and the instance would stay unmigrated, and not ready, all that
    /// time. When the server cannot be asked, nothing is concluded.
    async fn until_gone(self, pool: &PgPool) {
        loop {
            tokio::time::sleep(MIGRATION_SESSION_CHECK).await;
            let present = tokio::time::timeout(
                MIGRATION_SESSION_CHECK,
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 \
                     AND (extract(epoch FROM backend_start) * 1000000)::bigint = $2)",
                )
                .bind(self.pid)
                .bind(self.started_us)
                .fetch_one(pool),
            )
            .await;
            if let Ok(Ok(false)) = present {
                return;
            }
        }
    }
}

/// [`migrate_postgres`] on `session`, which it leaves holding the lock.
async fn migrate_postgres_on(session: &mut PgConnection) -> Result<(), DbError> {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *session)
        .await?;
    let key = migration_lock_key(&database);
    let mut waiting = false;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *session)
        .await?
    {
        if !waiting {
            tracing::info!("another instance is migrating the database; waiting for it");
            waiting = true;
        }
        tokio::time::sleep(MIGRATION_LOCK_POLL).await;
    }
    drop_cut_off_builds(session).await?;
    let mut gateway = sqlx::migrate!("./migrations/postgres");
    gateway.set_ignore_missing(true);
    gateway.set_locking(false);
    // `run_direct`, sqlx's own way around `run(&mut conn)` making a spawned future's
    // `Acquire` bound not general enough
    gateway.run_direct(&mut *session).await?;
    let mut config_center = config_center::postgres_migrator();
    config_center.set_locking(false);
    config_center.run_direct(&mut *session).await?;
    Ok(())
}

/// The key of sqlx's migration lock on `database`, as sqlx 0.8 computes it.
fn migration_lock_key(database: &str) -> i64 {
    const CRC_32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32_ad9e * i64::from(CRC_32.checksum(database.as_bytes()))
}

/// Drops what a cut-off build of a [`CONCURRENT_BUILDS`] index left behind (the index,
/// invalid) while its migration is still pending, so that the migration builds it anew
/// rather than passing over it. Called under the migration lock: no instance of ours is
/// building one meanwhile.
async fn drop_cut_off_builds(session: &mut PgConnection) -> Result<(), sqlx::Error> {
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *session)
        .await?;
    let applied: Vec<i64> = if recorded {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *session)
            .await?
    } else {
        Vec::new()
    };
    for (version, index) in CONCURRENT_BUILDS {
        if applied.contains(&version) {
            continue;
        }
        let invalid: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace \
             AND NOT i.indisvalid)",
        )
        .bind(index)
        .fetch_one(&mut *session)
        .await?;
        if invalid {
            tracing::warn!(
                index,
                migration = version,
                "an earlier build of this index was cut off and left it invalid; dropping it to build it again"
            );
            sqlx::query(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
                .execute(&mut *session)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silence_mark_closes_only_connections_made_before_the_last_one() {
        let silence = SilenceMark::new();
        assert!(!silence.marked_after(0), "nothing is marked yet");
        silence.mark_at(1_000);
        assert!(silence.marked_after(999));
        assert!(!silence.marked_after(1_000));
        // of two checks timing out at once, the later stored first: the mark stays
        silence.mark_at(500);
        assert!(silence.marked_after(999));
        silence.mark_at(2_000);
        assert!(silence.marked_after(1_999));
        assert!(!silence.marked_after(2_001));
    }
}
