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

/// Cheap to clone; every field is shared.
#[derive(Clone)]
pub struct AppState {
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
