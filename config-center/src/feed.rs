//! The change feed: which (environment, application) got which new version.
//!
//! On Postgres a publish sends `NOTIFY portcullis_config, '<env>/<app>/<version>'` inside
//! its transaction, and [`ChangeFeed`] listens with a `PgListener`, reconnecting by itself
//! with backoff. Notifications sent while it was disconnected are lost, so after every
//! (re)connection it yields [`FeedEvent::Resync`]: the gateway then compares
//! [`crate::Store::latest_versions`] with what it holds. On SQLite (`--dev`, a single
//! instance) the feed is an in-process broadcast from the store.
//!
//! A listening connection hears nothing when the database host crashes or a VIP fails
//! over: no reset comes, and waiting for a notification would wait forever. So a listener
//! that has heard nothing for [`LIVENESS_INTERVAL`] runs `SELECT 1` on its connection,
//! and one that does not answer within [`LIVENESS_DEADLINE`] is dropped and replaced like
//! a lost one (with the Resync): a silent connection is noticed within 35 s.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification, PgPoolOptions};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::model::{AppName, Environment};

/// The Postgres channel releases are announced on.
pub const NOTIFY_CHANNEL: &str = "portcullis_config";

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long a listener may hear nothing before its connection is checked.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(30);

/// How long the check may take; a shorter liveness interval shortens it to the interval.
pub const LIVENESS_DEADLINE: Duration = Duration::from_secs(5);

/// How long connecting and `LISTEN` may take: a new connection can meet a silent network
/// too (an idle pooled connection to the old host, a `LISTEN` never answered).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// A new release of one (environment, application).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReleaseEvent {
    /// The environment.
    pub environment: Environment,
    /// The application.
    pub application: AppName,
    /// The new version.
    pub version: u64,
}

impl ReleaseEvent {
    /// An event from stored or notified names; `None` when they are not valid names.
    pub(crate) fn new(env: &str, app: &str, version: u64) -> Option<Self> {
        Some(Self {
            environment: Environment::parse_shape(env).ok()?,
            application: AppName::parse(app).ok()?,
            version,
        })
    }

    /// Parses a notification payload `<env>/<app>/<version>`.
    pub fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.split('/');
        let (env, app, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Self::new(env, app, version.parse().ok()?)
    }
}

/// What [`ChangeFeed::recv`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A release was published.
    Release(ReleaseEvent),
    /// Events may have been missed (first connection, reconnection, or the reader fell
    /// behind): reconcile with [`crate::Store::latest_versions`].
    Resync,
}

/// A stream of [`FeedEvent`]s; see the module docs.
pub struct ChangeFeed {
    inner: Inner,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Postgres { listener, .. } => {
                if listener.is_some() {
                    "postgres (listening)"
                } else {
                    "postgres (not connected)"
                }
            }
            Inner::Local(_) => "in-process",
        };
        f.debug_struct("ChangeFeed").field("kind", &kind).finish()
    }
}

enum Inner {
    Postgres {
        pool: PgPool,
        listener: Option<PgListener>,
        backoff: Duration,
        liveness: Liveness,
    },
    Local(broadcast::Receiver<ReleaseEvent>),
}

/// When the listening connection is checked next, and since when a check is under way.
struct Liveness {
    every: Duration,
    next: Instant,
    /// Set while a check runs: its deadline counts from here even when `recv` is
    /// cancelled and called again meanwhile.
    checking_since: Option<Instant>,
}

impl Liveness {
    fn new(every: Duration) -> Self {
        Self {
            every,
            next: Instant::now() + every,
            checking_since: None,
        }
    }

    fn deadline(&self) -> Duration {
        self.every.min(LIVENESS_DEADLINE)
    }

    /// The connection answered (a notification, a check, a new connection).
    fn heard(&mut self) {
        self.next = Instant::now() + self.every;
        self.checking_since = None;
    }
}

/// What the listener did first: a message, or the time to check it came.
enum Heard {
    Message(Result<Option<PgNotification>, sqlx::Error>),
    CheckDue,
}

/// The feed's source is gone for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the change feed is closed (its store or pool was dropped or closed)")]
pub struct FeedClosed;

impl ChangeFeed {
    /// A feed listening on `pool`'s database. It connects on the first
    /// [`ChangeFeed::recv`], which then yields [`FeedEvent::Resync`] once listening.
    pub fn postgres(pool: PgPool) -> Self {
        Self {
            inner: Inner::Postgres {
                pool,
                listener: None,
                backoff: BACKOFF_START,
                liveness: Liveness::new(LIVENESS_INTERVAL),
            },
        }
    }

    /// Checks the listening connection after `every` without a message instead of
    /// [`LIVENESS_INTERVAL`] (the check's deadline is then at most `every` too). Tests
    /// shorten it; nothing on SQLite.
    #[must_use]
    pub fn with_liveness_interval(mut self, every: Duration) -> Self {
        if let Inner::Postgres { liveness, .. } = &mut self.inner {
            *liveness = Liveness::new(every);
        }
        self
    }

    pub(crate) fn local(rx: broadcast::Receiver<ReleaseEvent>) -> Self {
        Self {
            inner: Inner::Local(rx),
        }
    }

    /// The next event. Reconnects by itself (with exponential backoff up to 10 s) while
    /// the database is away; fails only when the pool was closed or the store dropped.
    /// Cancel-safe: a `select!` may drop the future between events.
    pub async fn recv(&mut self) -> Result<FeedEvent, FeedClosed> {
        match &mut self.inner {
            Inner::Local(rx) => match rx.recv().await {
                Ok(event) => Ok(FeedEvent::Release(event)),
                Err(broadcast::error::RecvError::Lagged(_)) => Ok(FeedEvent::Resync),
                Err(broadcast::error::RecvError::Closed) => Err(FeedClosed),
            },
            Inner::Postgres {
                pool,
                listener,
                backoff,
                liveness,
            } => loop {
                let Some(l) = listener.as_mut() else {
                    if pool.is_closed() {
                        return Err(FeedClosed);
                    }
                    match tokio::time::timeout(CONNECT_DEADLINE, connect(pool)).await {
                        Ok(Ok(l)) => {
                            *listener = Some(l);
                            *backoff = BACKOFF_START;
                            liveness.heard();
                            tracing::debug!("config change feed listening");
                            return Ok(FeedEvent::Resync);
                        }
                        Ok(Err(sqlx::Error::PoolClosed)) => return Err(FeedClosed),
                        failed => {
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "no answer in time".to_owned(),
                            };
                            tracing::warn!(%error, retry_in = ?*backoff, "config change feed cannot listen; will retry");
                            tokio::time::sleep(*backoff).await;
                            *backoff = (*backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                };
                let heard = if liveness.checking_since.is_some() {
                    Heard::CheckDue
                } else {
                    tokio::select! {
                        got = l.try_recv() => Heard::Message(got),
                        () = tokio::time::sleep_until(liveness.next) => Heard::CheckDue,
                        // the listener's connection is not `pool`'s: its closing is watched here
                        () = pool.close_event() => return Err(FeedClosed),
                    }
                };
                match heard {
                    Heard::Message(got) => {
                        liveness.heard();
                        match got {
                            Ok(Some(n)) => match ReleaseEvent::parse(n.payload()) {
                                Some(event) => return Ok(FeedEvent::Release(event)),
                                None => {
                                    tracing::warn!(
                                        "ignoring a malformed config change notification"
                                    );
                                }
                            },
                            Ok(None) => {
                                tracing::warn!(
                                    "config change feed lost its connection; reconnecting"
                                );
                                *listener = None;
                            }
                            Err(sqlx::Error::PoolClosed) => return Err(FeedClosed),
                            Err(e) => {
                                tracing::warn!(error = %e, "config change feed failed; reconnecting");
                                *listener = None;
                            }
                        }
                    }
                    Heard::CheckDue => {
                        let since = *liveness.checking_since.get_or_insert_with(Instant::now);
                        let check = sqlx::query("SELECT 1").execute(&mut *l);
                        match tokio::time::timeout_at(since + liveness.deadline(), check).await {
                            Ok(Ok(_)) => liveness.heard(),
                            Ok(Err(sqlx::Error::PoolClosed)) => return Err(FeedClosed),
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "config change feed's connection failed its check; reconnecting");
                                *listener = None;
                            }
                            Err(_) => {
                                tracing::warn!(
                                    deadline = ?liveness.deadline(),
                                    "config change feed's connection did not answer its check in time (database host or network gone?); reconnecting"
                                );
                                *listener = None;
                            }
                        }
                    }
                }
            },
        }
    }
}

/// A listener on a new connection of its own, made with `pool`'s options: not one of
/// `pool`'s, which after a failover may be idle connections to the old host, and which
/// a listener dropped for its silence would hold (its `UNLISTEN` waits for an answer)
/// until TCP gives up on it, minutes later.
async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = PgListener::connect_with(&own).await?;
    // a lost connection is replaced by `recv`, which yields the Resync
    listener.eager_reconnect(false);
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}
