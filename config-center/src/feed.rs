//! The change feed: which (environment, application) got which new version.
//!
//! On Postgres a publish sends `NOTIFY portcullis_config, '<env>/<app>/<version>'` inside
//! its transaction, and [`ChangeFeed`] listens with a `PgListener`, reconnecting by itself
//! with backoff. Notifications sent while it was disconnected are lost, so after every
//! (re)connection it yields [`FeedEvent::Resync`]: the gateway then compares
//! [`crate::Store::latest_versions`] with what it holds. On SQLite (`--dev`, a single
//! instance) the feed is an in-process broadcast from the store.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

use crate::model::{AppName, Environment};

/// The Postgres channel releases are announced on.
pub const NOTIFY_CHANNEL: &str = "portcullis_config";

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
    },
    Local(broadcast::Receiver<ReleaseEvent>),
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
            },
        }
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
            } => loop {
                let Some(l) = listener.as_mut() else {
                    if pool.is_closed() {
                        return Err(FeedClosed);
                    }
                    match connect(pool).await {
                        Ok(l) => {
                            *listener = Some(l);
                            *backoff = BACKOFF_START;
                            tracing::debug!("config change feed listening");
                            return Ok(FeedEvent::Resync);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?*backoff, "config change feed cannot listen; will retry");
                            tokio::time::sleep(*backoff).await;
                            *backoff = (*backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                };
                match l.try_recv().await {
                    Ok(Some(n)) => match ReleaseEvent::parse(n.payload()) {
                        Some(event) => return Ok(FeedEvent::Release(event)),
                        None => {
                            tracing::warn!("ignoring a malformed config change notification");
                        }
                    },
                    Ok(None) => {
                        tracing::warn!("config change feed lost its connection; reconnecting");
                        *listener = None;
                    }
                    Err(sqlx::Error::PoolClosed) => return Err(FeedClosed),
                    Err(e) => {
                        tracing::warn!(error = %e, "config change feed failed; reconnecting");
                        *listener = None;
                    }
                }
            },
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}
