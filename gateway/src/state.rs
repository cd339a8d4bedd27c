//! State shared by every handler of one instance.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::audit::Audit;
use crate::clients::ClientStore;
use crate::config::Config;
use crate::db::Database;
use crate::keys::KeyService;
use crate::redis_store::RedisHandle;
use crate::refresh::RefreshStore;

/// The state of one instance. A clone is one reference-count increment: axum clones the
/// state for every extractor and middleware of every request, so a state of many
/// separately shared fields would cost a dozen atomic operations, on counters every core
/// touches, per clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Shares `shared` with every handler.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What every handler of one instance shares.
pub struct Shared {
    /// The validated configuration this instance started with.
    pub config: Arc<Config>,
    /// The database.
    pub db: Database,
    /// Redis, when configured.
    pub redis: Option<RedisHandle>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Signing keys.
    pub keys: KeyService,
    /// The audit trail.
    pub audit: Audit,
    /// OAuth clients.
    pub clients: ClientStore,
    /// Refresh tokens (Redis, or in process for a single `--dev` instance).
    pub refresh: Arc<dyn RefreshStore>,
    /// The config center.
    pub config_center: crate::config_api::ConfigCenter,
    /// SSO for console users.
    pub sso: crate::sso::Sso,
    /// Failed-attempt counters per account and per client id.
    pub lockout: crate::protect::Lockout,
    /// Per-IP token buckets of the login and token endpoints.
    pub rate: crate::protect::rate::RateLimits,
    /// The reverse proxy to the admin cluster, when `proxy.upstreams` names nodes.
    pub proxy: Option<crate::proxy::Proxy>,
}
