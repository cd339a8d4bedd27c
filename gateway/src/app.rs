//! Building and running one Portcullis instance: `Application::build` validates nothing
//! (the configuration already is), binds both listeners and starts the background tasks;
//! `run_until_stopped` serves until the shutdown token is cancelled (or one of its tasks
//! fails), then lets the listeners drain, then the audit writer store what their last
//! requests recorded.
//!
//! Tests call `build` with port 0 and read the bound addresses back.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::config::Config;
use crate::db::{Database, DbError};
use crate::keys::KeyService;
use crate::redis_store::{RedisError, RedisHandle};
use crate::routes;
use crate::server::{ConnectionLimits, serve_https};
use crate::state::AppState;
use crate::telemetry;
use crate::tls::{ReloadableTls, TlsError};
use crate::workers::Workers;

/// How long a stopping instance waits for its database pool to close.
const POOL_CLOSE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration lacks what this step needs.
    #[error("configuration: {0}")]
    Config(String),
    /// The certificate or key is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The database handle could not be made.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The Redis handle could not be made.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The key source could not be prepared.
    #[error("signing keys: {0}")]
    Keys(#[from] keyrotation::KeyError),
    /// The config center's key wrapper could not be prepared.
    #[error("config center: {0}")]
    ConfigCenter(String),
    /// The connection workers' threads could not be started.
    #[error("cannot start the connection workers: {0}")]
    Workers(#[source] std::io::Error),
}

/// One of an instance's tasks (a listener, a reload loop) panicked: the instance stopped,
/// rather than serve on without it while its health checks still answered.
#[derive(Debug, thiserror::Error)]
#[error("a task of the instance failed: {0}")]
pub struct TaskFailed(String);

/// A running instance.
pub struct Application {
    https_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Stops the audit writer: cancelled only after `tasks` (the listeners among them)
    /// have returned, so that what the requests answered during the shutdown grace
    /// recorded is stored.
    audit_stop: CancellationToken,
    audit_writer: tokio::task::JoinHandle<()>,
    state: AppState,
    // dropped last: the connections they serve are drained by then
    _workers: Option<Arc<Workers>>,
}

impl Application {
    /// Binds the listeners and starts serving in the background.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        Self::build_with_clock(config, Arc::new(keyrotation::SystemClock)).await
    }

    /// Like [`Self::build`], with the clock that drives key rotation and token times
    /// (tests drive months of rotation with a manual clock).
    pub async fn build_with_clock(
        config: Config,
        clock: Arc<dyn keyrotation::Clock>,
    ) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let tls_config = config
            .tls
            .as_ref()
            .ok_or_else(|| StartError::Config("tls is not configured".to_owned()))?;
        let tls = ReloadableTls::load(&tls_config.cert, &tls_config.key)?;

        let db = Database::connect_lazy(&config.database)?;
        let redis = config.redis.as_ref().map(RedisHandle::new).transpose()?;
        let keys = KeyService::from_config(&config, clock, config.keys.rotation)?;
        let server_key = config
            .server_key()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let clients = crate::clients::ClientStore::with_cache_ttl(
            db.clone(),
            server_key.clone(),
            config.tokens.client_cache_ttl,
        )
        .with_rules(crate::clients::ClientRules::from_config(&config));
        let refresh: Arc<dyn crate::refresh::RefreshStore> = match &redis {
            Some(handle) => Arc::new(crate::refresh::LazyRedisRefreshStore::new(
                handle.clone(),
                server_key,
                config.refresh.clone(),
            )),
            None => Arc::new(crate::refresh::MemoryRefreshStore::new(
                server_key,
                config.refresh.clone(),
            )),
        };

        let (wrapper, transit_vault) =
            crate::config_api::key_wrapper(&config, &keys).map_err(StartError::ConfigCenter)?;
        let config_center =
            crate::config_api::ConfigCenter::new(&config, &db, wrapper, keys.clone())
                .map_err(|e| StartError::ConfigCenter(e.to_string()))?;
        let sso = crate::sso::Sso::new(&config.sso, &config.server.public_url, redis.clone())
            .map_err(|e| StartError::Config(e.to_string()))?;
        let failures: Arc<dyn crate::protect::lockout::FailureStore> = match &redis {
            Some(handle) => Arc::new(crate::protect::lockout::RedisFailureStore::new(
                handle.clone(),
            )),
            None => Arc::new(crate::protect::lockout::MemoryFailureStore::new()),
        };
        let lockout = crate::protect::Lockout::new(failures, config.protection.lockout.clone());
        let rate = crate::protect::rate::RateLimits::new(
            config.protection.auth_rate,
            config.protection.token_rate,
        )
        .ok_or_else(|| StartError::Config("protection: empty rate bucket".to_owned()))?;

        let https = bind(config.server.listen).await?;
        let admin = bind(config.server.admin_listen).await?;
        let https_addr = local_addr(&https, config.server.listen)?;
        let admin_addr = local_addr(&admin, config.server.admin_listen)?;

        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // the recorder first: the audit writer looks its metric handles up as it starts
        let metrics = telemetry::metrics_handle();
        // not `shutdown`: the writer must outlive every request, see `run_until_stopped`
        let audit_stop = CancellationToken::new();
        let (audit, audit_writer) = Audit::start(db.clone(), &config.audit, audit_stop.clone());
        let state = AppState::new(crate::state::Shared {
            config: config.clone(),
            db: db.clone(),
            redis,
            metrics,
            keys: keys.clone(),
            audit: audit.clone(),
            clients,
            refresh,
            config_center,
            sso,
            lockout,
            rate,
            proxy: crate::proxy::Proxy::new(
                &config.proxy,
                &config.server.public_url,
                config.server.request_timeout,
                shutdown.clone(),
            )
            .map_err(StartError::Config)?,
        });
        tasks.spawn({
            let now = keys.clone();
            let reader = keys
                .cutoffs()
                .spawn(db.clone(), move || now.now(), shutdown.clone());
            async move {
                let _ = reader.await;
            }
        });
        for task in keys.spawn(audit, format!("instance:{https_addr}"), shutdown.clone()) {
            tasks.spawn(async move {
                let _ = task.await;
            });
        }

        // migrations run in the background so that an instance whose database is away
        // still starts, answers /healthz, and reports not-ready until it is back
        {
            let db = db.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move { db.migrate_until_done(stop).await });
        }
        tasks.spawn({
            let watcher = tls.spawn_watcher(tls_config.reload_interval, shutdown.clone());
            async move {
                let _ = watcher.await;
            }
        });
        if let Some(vault) = transit_vault {
            // the Transit key's own Vault login, when the ring does not live in Vault
            let renewal = vault.spawn_token_renewal(shutdown.clone());
            tasks.spawn(async move {
                let _ = renewal.await;
            });
        }
        tasks.spawn({
            let feed = state.config_center.hub.spawn(
                db.clone(),
                config.config_center.reconcile_interval,
                shutdown.clone(),
            );
            async move {
                let _ = feed.await;
            }
        });
        if let Some(env) = &config.config_center.runtime_environment {
            let env = state
                .config_center
                .environments
                .parse(env)
                .map_err(|e| StartError::ConfigCenter(e.to_string()))?;
            let follow = crate::runtime::spawn(state.clone(), env, shutdown.clone());
            tasks.spawn(async move {
                let _ = follow.await;
            });
        }
        if let Some(checks) = state
            .proxy
            .as_ref()
            .map(|p| p.spawn_upkeep(shutdown.clone()))
        {
            tasks.spawn(async move {
                let _ = checks.await;
            });
        }
        // keeps `portcullis_dependency_up` current whether or not anyone calls /readyz
        tasks.spawn(crate::readiness::probe_dependencies(
            state.clone(),
            crate::readiness::PROBE_EVERY,
            shutdown.clone(),
        ));
        tasks.spawn({
            let handle = state.metrics.clone();
            let stop = shutdown.clone();
            async move { telemetry::metrics_upkeep(handle, stop).await }
        });
        tasks.spawn(crate::protect::rate::prune_every(
            state.rate.clone(),
            crate::protect::rate::PRUNE_EVERY,
            shutdown.clone(),
        ));

        let limits = ConnectionLimits {
            tls_handshake_timeout: config.server.tls_handshake_timeout,
            header_read_timeout: config.server.header_read_timeout,
            max_header_bytes: config.server.max_header_bytes,
            max_connections: config.server.max_connections,
            shutdown_grace: config.server.shutdown_grace,
            idle_timeout: config.server.idle_timeout,
        };
        let workers = match config
            .server
            .workers
            .unwrap_or_else(crate::workers::default_count)
        {
            0 => None,
            n => Some(Arc::new(Workers::start(n).map_err(StartError::Workers)?)),
        };
        tasks.spawn(serve_https(
            https,
            tls,
            routes::router(state.clone()),
            limits,
            workers.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(serve_admin(
            admin,
            routes::admin_router(state.clone()),
            shutdown.clone(),
        ));

        tracing::info!(%https_addr, %admin_addr, database = db.backend(), "Portcullis started");
        Ok(Self {
            https_addr,
            admin_addr,
            shutdown,
            tasks,
            audit_stop,
            audit_writer,
            state,
            _workers: workers,
        })
    }

    /// Where the HTTPS listener is bound.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// Where the admin listener is bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The shared state (tests inspect it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled and every listener has drained, then
    /// stores the audit events still queued. Upgraded (WebSocket) connections do not
    /// drain: the shutdown closes them at once, and they are waited for only while they
    /// close. A task that panics meanwhile (a listener, a reload loop) starts the same
    /// shutdown, and is returned as the error, so that the process exits failed and its
    /// service manager starts it again.
    pub async fn run_until_stopped(mut self) -> Result<(), TaskFailed> {
        let failed = supervise(&mut self.tasks, &self.shutdown).await;
        if let Some(upgraded) = self
            .state
            .proxy
            .as_ref()
            .map(crate::proxy::Proxy::open_upgrades)
            && upgraded > 0
        {
            tracing::info!(
                upgraded,
                "closing the open WebSockets now; their clients reconnect elsewhere"
            );
        }
        while self.tasks.join_next().await.is_some() {}
        // the WebSockets were told to close when the shutdown began; the workers they run
        // on are dropped with this instance, so their close must be over by then
        if let Some(proxy) = &self.state.proxy
            && !proxy.upgrades_closed().await
        {
            tracing::warn!("WebSockets still closing are dropped with the instance");
        }
        // every request has been answered, or `shutdown_grace` is over: what they recorded
        // is queued. The writer stores it (the database is still open) and stops; an event
        // recorded after this (a connection outliving the grace) is logged instead
        self.audit_stop.cancel();
        if let Err(e) = (&mut self.audit_writer).await {
            tracing::error!(error = %e, "the audit writer failed");
        }
        // closing the pool waits for every connection it is opening; with the database
        // refusing connections, sqlx keeps reopening `min_connections` for up to 300 s
        if tokio::time::timeout(POOL_CLOSE_DEADLINE, self.state.db.close())
            .await
            .is_err()
        {
            tracing::warn!(
                "the database pool did not close in time; its connections end with the process"
            );
        }
        tracing::info!("Portcullis stopped");
        failed.map_or(Ok(()), Err)
    }
}

/// Waits for `shutdown`, or for a task of `tasks` to panic: then logs it, cancels
/// `shutdown` and returns it. Tasks that return are let go (some finish early: the
/// migrations, once done).
async fn supervise(tasks: &mut JoinSet<()>, shutdown: &CancellationToken) -> Option<TaskFailed> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            joined = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(Err(e)) = joined
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a task of the instance failed; stopping");
                    shutdown.cancel();
                    return Some(TaskFailed(e.to_string()));
                }
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

async fn serve_admin(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let result = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_stops_the_instance_and_one_that_returns_does_not() {
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // finishes early, as the migrations do once done
        tasks.spawn(async {});
        let stop = shutdown.clone();
        tasks.spawn(async move { stop.cancelled().await });
        tasks.spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            panic!("a listener's task failed");
        });
        let failed = supervise(&mut tasks, &shutdown).await;
        assert!(failed.is_some_and(|f| f.to_string().contains("panicked")));
        assert!(shutdown.is_cancelled(), "the others are told to stop");

        // without a failure it waits for the shutdown
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(async {});
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            stop.cancel();
        });
        assert!(supervise(&mut tasks, &shutdown).await.is_none());
    }
}
