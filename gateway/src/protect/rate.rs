//! Per-IP token buckets (tower-governor) on the login and token endpoints. The key is the
//! [`ClientIp`] the resolver put in the request (so `X-Forwarded-For` counts only from
//! trusted proxies); a refusal is a 429 with `Retry-After` and the usual JSON error body,
//! counted in `portcullis_rate_limited_total`.
//!
//! The buckets are per instance (in memory): with N instances behind a balancer a client
//! gets up to N times the burst. The cluster-wide defence is the failure counters.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use governor::clock::QuantaInstant;
use governor::middleware::NoOpMiddleware;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use super::{ClientIp, RateSettings};
use crate::error::ApiError;

/// Keys buckets by the resolved client address.
#[derive(Debug, Clone, Copy)]
pub struct ClientIpKey;

impl KeyExtractor for ClientIpKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        let ext = req.extensions();
        Ok(ext
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
            // a router driven in process has no peer: one shared bucket
            .unwrap_or(IpAddr::from([0, 0, 0, 0])))
    }
}

/// The rate-limit layer of one endpoint group.
pub type RateLayer = GovernorLayer<ClientIpKey, NoOpMiddleware<QuantaInstant>, Body>;

/// The buckets of one instance, built once at start-up so that every router built from
/// the same state shares them.
#[derive(Clone)]
pub struct RateLimits {
    /// `/auth/*`.
    pub auth: RateLayer,
    /// `/oauth2/token`.
    pub token: RateLayer,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

impl RateLimits {
    /// From `[protection]`; `None` when a bucket is empty or never refills (refused by
    /// configuration validation already).
    pub fn new(auth: RateSettings, token: RateSettings) -> Option<Self> {
        Some(Self {
            auth: layer(auth, "auth")?,
            token: layer(token, "token")?,
        })
    }
}

/// A bucket per client IP of `settings`' size and refill; `endpoint` labels the metric.
fn layer(settings: RateSettings, endpoint: &'static str) -> Option<RateLayer> {
    let mut builder = GovernorConfigBuilder::default();
    builder
        .period(settings.replenish_every)
        .burst_size(settings.burst);
    let config = builder.key_extractor(ClientIpKey).finish()?;
    Some(GovernorLayer::new(Arc::new(config)).error_handler(move |e| refusal(e, endpoint)))
}

fn refusal(error: GovernorError, endpoint: &'static str) -> Response<Body> {
    match error {
        GovernorError::TooManyRequests { wait_time, .. } => {
            metrics::counter!("portcullis_rate_limited_total", "endpoint" => endpoint).increment(1);
            ApiError::TooManyRequests {
                code: "rate_limited",
                description: "too many requests from this address; slow down".to_owned(),
                retry_after: wait_time.max(1),
            }
            .into_response()
        }
        other => ApiError::Internal(Box::new(other)).into_response(),
    }
}
