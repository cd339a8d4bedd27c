//! Per-IP token buckets (tower-governor) on the login and token endpoints. The key is the
//! [`ClientIp`] the resolver put in the request (so `X-Forwarded-For` counts only from
//! trusted proxies); a refusal is a 429 with `Retry-After` and the usual JSON error body,
//! counted in `portcullis_rate_limited_total`.
//!
//! An IPv6 client is keyed by its /64, not its whole address: a single subscriber or host
//! is handed at least a /64 and can pick any of its 2^64 addresses for each request, so a
//! bucket per address would be no limit at all.
//!
//! The buckets are per instance (in memory): with N instances behind a balancer a client
//! gets up to N times the burst. The cluster-wide defence is the failure counters.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt};

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

/// Keys buckets by the resolved client address, an IPv6 one by its /64.
#[derive(Debug, Clone, Copy)]
pub struct ClientIpKey;

impl KeyExtractor for ClientIpKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        let ext = req.extensions();
        let ip = ext
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
            // a router driven in process has no peer: one shared bucket
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        Ok(bucket_of(ip))
    }
}

/// The bucket an address counts against: an IPv4 address is its own, an IPv6 address
/// shares its /64's (IPv4-mapped addresses were made IPv4 by the resolver already). The
/// account failure counters key their per-address records by it too (`lockout`).
pub(crate) fn bucket_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(Ipv6Addr::from(network))
        }
    }
}

/// The rate-limit layer of one endpoint group.
pub type RateLayer = GovernorLayer<ClientIpKey, NoOpMiddleware<QuantaInstant>, Body>;

/// The buckets of one instance, built at start-up so that every router built from the
/// same state shares them, and swapped whole when the runtime settings change them
/// (`runtime`): a swap starts fresh buckets, which is what a changed limit means.
#[derive(Clone)]
pub struct RateLimits {
    /// `/auth/*`.
    pub auth: SwappableRate,
    /// `/oauth2/token` (and `/auth/backchannel-logout`).
    pub token: SwappableRate,
    /// `/oauth2/introspect` and `/oauth2/revoke`: sized as `token`, but buckets of their
    /// own, so a resource server introspecting from the address its executors share does
    /// not spend their token requests.
    pub introspection: SwappableRate,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

/// How often the buckets of clients seen no more are forgotten.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Forgets full buckets (see [`SwappableRate::prune`]) every `every` until `stop`, and
/// reports how many clients each endpoint group still holds in
/// `portcullis_rate_limited_clients{endpoint}`.
pub async fn prune_every(
    limits: RateLimits,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for rate in [&limits.auth, &limits.token, &limits.introspection] {
            let held = rate.prune();
            metrics::gauge!("portcullis_rate_limited_clients", "endpoint" => rate.endpoint)
                .set(held as f64);
        }
    }
}

impl RateLimits {
    /// From `[protection]`; `None` when a bucket is empty or never refills (refused by
    /// configuration validation already).
    pub fn new(auth: RateSettings, token: RateSettings) -> Option<Self> {
        Some(Self {
            auth: SwappableRate::new(auth, "auth")?,
            token: SwappableRate::new(token, "token")?,
            introspection: SwappableRate::new(token, "introspection")?,
        })
    }
}

/// A rate-limit layer whose buckets can be replaced while it serves.
#[derive(Clone)]
pub struct SwappableRate {
    endpoint: &'static str,
    current: Arc<ArcSwap<Buckets>>,
}

/// The buckets in force, the settings they were made from, and their store (to prune).
pub struct Buckets {
    settings: RateSettings,
    layer: RateLayer,
    config:
        Arc<tower_governor::governor::GovernorConfig<ClientIpKey, NoOpMiddleware<QuantaInstant>>>,
}

/// What [`SwappableRate::prepare`] readied: fresh buckets, or none when the settings are
/// those in force (whose buckets, and every client's place in them, then stay).
pub struct Prepared(Option<Buckets>);

impl SwappableRate {
    fn new(settings: RateSettings, endpoint: &'static str) -> Option<Self> {
        Some(Self {
            endpoint,
            current: Arc::new(ArcSwap::from_pointee(buckets(settings, endpoint)?)),
        })
    }

    /// Fresh buckets for `settings`, not yet in force (runtime settings check a whole
    /// release before they put any of it in force); nothing to install when `settings`
    /// are those in force, so that a release changing something else does not hand every
    /// client a full bucket again; `None` for settings that make no bucket.
    pub fn prepare(&self, settings: RateSettings) -> Option<Prepared> {
        if self.current.load().settings == settings {
            return Some(Prepared(None));
        }
        buckets(settings, self.endpoint).map(|b| Prepared(Some(b)))
    }

    /// Puts what [`SwappableRate::prepare`] readied in force.
    pub fn install(&self, prepared: Prepared) {
        if let Some(buckets) = prepared.0 {
            self.current.store(Arc::new(buckets));
        }
    }

    /// Forgets the clients whose buckets are full again (as good as new): without this,
    /// every address (or IPv6 /64) ever seen would stay in memory for the life of the
    /// process. Returns how many are still held.
    pub fn prune(&self) -> usize {
        let current = self.current.load();
        let limiter = current.config.limiter();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        limiter.len()
    }
}

impl<S> Layer<S> for SwappableRate {
    type Service = SwappableRateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SwappableRateService {
            inner,
            current: self.current.clone(),
        }
    }
}

/// The service of [`SwappableRate`]: each request goes through the buckets current when
/// it arrives.
#[derive(Clone)]
pub struct SwappableRateService<S> {
    inner: S,
    current: Arc<ArcSwap<Buckets>>,
}

impl<S> Service<Request<Body>> for SwappableRateService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // readiness is checked on the clone that serves, in `call`
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let governed = self.current.load().layer.layer(self.inner.clone());
        Box::pin(governed.oneshot(req))
    }
}

/// A bucket per client IP of `settings`' size and refill; `endpoint` labels the metric.
fn buckets(settings: RateSettings, endpoint: &'static str) -> Option<Buckets> {
    let mut builder = GovernorConfigBuilder::default();
    builder
        .period(settings.replenish_every)
        .burst_size(settings.burst);
    let config = Arc::new(builder.key_extractor(ClientIpKey).finish()?);
    let layer = GovernorLayer::new(config.clone()).error_handler(move |e| refusal(e, endpoint));
    Some(Buckets {
        settings,
        layer,
        config,
    })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(ip: &str) -> IpAddr {
        let mut req = Request::new(());
        req.extensions_mut().insert(ClientIp(ip.parse().unwrap()));
        ClientIpKey.extract(&req).unwrap()
    }

    #[test]
    fn an_ipv6_client_is_one_bucket_for_its_whole_64() {
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:fffe")
        );
        assert_eq!(
            key("2001:db8:1:2:abcd::7"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        // the next /64 is another subscriber
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn pruning_forgets_the_clients_whose_buckets_are_full_again() {
        let rate = |every| {
            SwappableRate::new(
                RateSettings {
                    burst: 1,
                    replenish_every: every,
                },
                "test",
            )
            .unwrap()
        };
        let (quick, slow) = (
            rate(std::time::Duration::from_millis(1)),
            rate(std::time::Duration::from_secs(3600)),
        );
        for r in [&quick, &slow] {
            let limiter = r.current.load().config.limiter().clone();
            for ip in ["192.0.2.1", "192.0.2.2", "2001:db8::1"] {
                assert!(limiter.check_key(&key(ip)).is_ok());
            }
            assert_eq!(limiter.len(), 3);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(quick.prune(), 0, "refilled buckets are forgotten");
        assert_eq!(slow.prune(), 3, "buckets still draining are kept");
        // a client forgotten starts again with a full bucket, as it would have anyway
        let limiter = quick.current.load().config.limiter().clone();
        assert!(limiter.check_key(&key("192.0.2.1")).is_ok());
    }

    #[test]
    fn unchanged_settings_keep_the_buckets_in_force() {
        let settings = RateSettings {
            burst: 1,
            replenish_every: std::time::Duration::from_secs(3600),
        };
        let rate = SwappableRate::new(settings, "test").unwrap();
        let limiter = rate.current.load().config.limiter().clone();
        assert!(limiter.check_key(&key("192.0.2.1")).is_ok());
        rate.install(rate.prepare(settings).unwrap());
        let after = rate.current.load().config.limiter().clone();
        assert!(after.check_key(&key("192.0.2.1")).is_err(), "still empty");
        let wider = RateSettings {
            burst: 2,
            ..settings
        };
        rate.install(rate.prepare(wider).unwrap());
        let fresh = rate.current.load().config.limiter().clone();
        assert!(
            fresh.check_key(&key("192.0.2.1")).is_ok(),
            "new limit, new buckets"
        );
    }

    #[test]
    fn every_ipv4_address_is_its_own_bucket() {
        assert_eq!(key("203.0.113.7"), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_ne!(key("203.0.113.7"), key("203.0.113.8"));
    }
}
