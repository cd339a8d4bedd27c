//! The admin nodes and what Portcullis knows of their health.
//!
//! Round robin over the nodes that may get traffic. Passive health: `failures`
//! consecutive failures (connect errors, timeouts, 502/503) take a node out for
//! `cooldown`; after it, the node gets requests again and a single failure takes it out
//! again at once (half-open), one success puts it back. Active health (optional):
//! a periodic `GET check_path`; a node that fails it gets no traffic until it passes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderValue, Uri};

use super::settings::{HealthSettings, parse_upstream};

/// One admin node.
#[derive(Debug)]
pub struct Node {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `host:port`, as configured; the label of its metrics.
    pub authority: String,
    /// Its metrics' handles (labelled `node` = the authority), looked up in the registry
    /// once rather than per request.
    metrics: NodeMetrics,
    /// `scheme://authority`: what its pooled connections are kept under.
    pub key: String,
    /// The node's address as a URI, what a new connection is opened to.
    pub target: Uri,
    /// The `Host` header of every request to the node: its authority, without the
    /// scheme's default port.
    pub host: Option<HeaderValue>,
    passive: Mutex<Passive>,
    /// Whether `passive` holds anything (a failure count or a cool-down), written only
    /// under its lock. While it is false, as it is for a node that answers, a request
    /// reads this one flag and writes nothing: the workers serving requests on other cores
    /// do not pass the node's lock and cache lines back and forth.
    troubled: AtomicBool,
    /// Set by the active check while the node fails it.
    active_down: AtomicBool,
}

/// A node's metric handles.
struct NodeMetrics {
    healthy: metrics::Gauge,
    duration: metrics::Histogram,
    /// `portcullis_upstream_requests_total` per [`Outcome`], in its declaration order.
    outcomes: [metrics::Counter; Outcome::ALL.len()],
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

impl NodeMetrics {
    /// The handles of node `authority` (its `node` label, shared by every series).
    fn new(authority: &str) -> Self {
        let label = metrics::SharedString::from(std::sync::Arc::<str>::from(authority));
        Self {
            healthy: metrics::gauge!("portcullis_upstream_healthy", "node" => label.clone()),
            duration: metrics::histogram!(
                "portcullis_upstream_request_duration_seconds",
                "node" => label.clone()
            ),
            outcomes: Outcome::ALL.map(|outcome| {
                metrics::counter!(
                    "portcullis_upstream_requests_total",
                    "node" => label.clone(),
                    "outcome" => outcome.as_str()
                )
            }),
        }
    }
}

#[derive(Debug, Default)]
struct Passive {
    consecutive_failures: u32,
    down_until: Option<Instant>,
}

/// How one attempt on a node ended, for health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node answered (any status but 502/503).
    Ok,
    /// The node answered 502 or 503.
    ErrorStatus,
    /// No connection could be made.
    ConnectError,
    /// The connection failed before a response head arrived.
    Error,
    /// No response head within `proxy.read_timeout`.
    Timeout,
}

impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Self; 5] = [
        Self::Ok,
        Self::ErrorStatus,
        Self::ConnectError,
        Self::Error,
        Self::Timeout,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ErrorStatus => "error_status",
            Self::ConnectError => "connect_error",
            Self::Error => "error",
            Self::Timeout => "timeout",
        }
    }

    fn is_failure(self) -> bool {
        self != Self::Ok
    }
}

impl Node {
    fn new(scheme: &'static str, authority: String) -> Self {
        let metrics = NodeMetrics::new(&authority);
        let parsed = Scheme::try_from(scheme)
            .ok()
            .zip(Authority::try_from(authority.as_str()).ok());
        let target = parsed
            .clone()
            .and_then(|(scheme, authority)| {
                let mut parts = axum::http::uri::Parts::default();
                parts.scheme = Some(scheme);
                parts.authority = Some(authority);
                parts.path_and_query = Some(PathAndQuery::from_static("/"));
                Uri::from_parts(parts).ok()
            })
            .unwrap_or_default();
        let host = parsed.and_then(|(scheme, authority)| {
            let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
            let host = match authority.port_u16() {
                Some(port) if port == default_port => authority.host(),
                _ => authority.as_str(),
            };
            HeaderValue::from_str(host).ok()
        });
        Self {
            key: format!("{scheme}://{authority}"),
            target,
            host,
            scheme,
            authority,
            metrics,
            passive: Mutex::new(Passive::default()),
            troubled: AtomicBool::new(false),
            active_down: AtomicBool::new(false),
        }
    }

    fn passive(&self) -> std::sync::MutexGuard<'_, Passive> {
        // the guarded data is two plain numbers, valid whatever a panicking holder did
        self.passive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets failures and any cool-down; `p` is this node's locked passive state.
    fn clear_passive(&self, p: &mut Passive) {
        p.consecutive_failures = 0;
        p.down_until = None;
        self.troubled.store(false, Ordering::Release);
    }

    /// Whether the node may get a request now; the clock (`now`) is read only for a node
    /// that failed lately.
    fn available(&self, now: impl FnOnce() -> Instant) -> bool {
        if self.active_down.load(Ordering::Relaxed) {
            return false;
        }
        if !self.troubled.load(Ordering::Acquire) {
            return true;
        }
        self.passive().down_until.is_none_or(|until| now() >= until)
    }

    /// Whether the node is counted healthy (the gauge's value).
    pub fn healthy(&self) -> bool {
        self.available(Instant::now)
    }

    fn set_gauge(&self, up: bool) {
        self.metrics.healthy.set(if up { 1.0 } else { 0.0 });
    }

    /// Records how long one attempt on the node took to its response head.
    pub fn record_duration(&self, elapsed: Duration) {
        self.metrics.duration.record(elapsed.as_secs_f64());
    }

    fn record(&self, outcome: Outcome, health: &HealthSettings, now: impl FnOnce() -> Instant) {
        self.metrics.outcomes[outcome as usize].increment(1);
        if !outcome.is_failure() && !self.troubled.load(Ordering::Acquire) {
            // the usual case: nothing to reset
            return;
        }
        let mut p = self.passive();
        if !outcome.is_failure() {
            let was_down = p.down_until.is_some();
            self.clear_passive(&mut p);
            drop(p);
            if was_down {
                tracing::info!(node = %self.authority, "admin node answers again");
            }
            self.set_gauge(!self.active_down.load(Ordering::Relaxed));
            return;
        }
        p.consecutive_failures = p.consecutive_failures.saturating_add(1);
        self.troubled.store(true, Ordering::Release);
        if p.consecutive_failures >= health.failures {
            let now = now();
            let first = p.down_until.is_none_or(|until| now >= until);
            p.down_until = Some(now + health.cooldown);
            drop(p);
            if first {
                tracing::warn!(
                    node = %self.authority,
                    outcome = outcome.as_str(),
                    cooldown = %humantime::format_duration(health.cooldown),
                    "admin node marked down"
                );
            }
            self.set_gauge(false);
        }
    }

    /// Takes over the health of `from`, the same node in the list this one's replaces
    /// (its failures, its cool-down, a failed health check), so that changing the list
    /// does not hand a node that is down its traffic back.
    fn carry_health(&self, from: &Node) {
        let before = from.passive();
        let mut p = self.passive();
        p.consecutive_failures = before.consecutive_failures;
        p.down_until = before.down_until;
        drop(before);
        self.troubled
            .store(from.troubled.load(Ordering::Acquire), Ordering::Release);
        drop(p);
        self.active_down
            .store(from.active_down.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn set_active(&self, up: bool) {
        let was_down = self.active_down.swap(!up, Ordering::Relaxed);
        if was_down == up {
            if up {
                tracing::info!(node = %self.authority, "admin node passes its health check again");
            } else {
                tracing::warn!(node = %self.authority, "admin node fails its health check");
            }
        }
        if up {
            // a passing check also ends a passive cool-down: the node demonstrably answers
            self.clear_passive(&mut self.passive());
        }
        self.set_gauge(up);
    }
}

/// The admin nodes.
#[derive(Debug)]
pub struct Upstreams {
    nodes: Vec<Node>,
    /// The round-robin position, one per connection worker (slot 0 off the workers), each
    /// on its own cache line: every worker turns through the nodes without writing to a
    /// line another core reads.
    next: Box<[Padded<AtomicUsize>]>,
    health: HealthSettings,
}

/// A value alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl Upstreams {
    /// From validated `proxy.upstreams` (entries that do not parse were refused then),
    /// every node healthy and its gauge saying so: for the list in force at start-up.
    pub fn new(upstreams: &[String], health: HealthSettings) -> Self {
        let upstreams = Self::built(upstreams, health);
        for node in &upstreams.nodes {
            node.set_gauge(true);
        }
        upstreams
    }

    fn built(upstreams: &[String], health: HealthSettings) -> Self {
        let nodes = upstreams
            .iter()
            .filter_map(|u| parse_upstream(u).ok())
            .map(|(scheme, authority)| Node::new(scheme, authority))
            .collect();
        Self {
            nodes,
            next: (0..=crate::workers::MAX_WORKERS)
                .map(|_| Padded::default())
                .collect(),
            health,
        }
    }

    /// The nodes `list` names (validated), the ones already in `current` with the health
    /// they have there, new ones healthy; not in force yet, so no gauge is touched (see
    /// [`Upstreams::publish_gauges`]).
    pub fn carrying_over(list: &[String], health: HealthSettings, current: &Upstreams) -> Self {
        let next = Self::built(list, health);
        for node in &next.nodes {
            if let Some(before) = current.nodes.iter().find(|n| n.key == node.key) {
                node.carry_health(before);
            }
        }
        next
    }

    /// Sets the health gauges once these nodes are in force in place of `previous`: each
    /// node's own, and 0 for a node no longer listed.
    pub fn publish_gauges(&self, previous: &Upstreams) {
        for node in &self.nodes {
            node.set_gauge(node.healthy());
        }
        for gone in previous
            .nodes
            .iter()
            .filter(|n| !self.nodes.iter().any(|m| m.key == n.key))
        {
            gone.set_gauge(false);
        }
    }

    /// Whether `list` names exactly these nodes, in this order.
    pub fn same_nodes(&self, list: &[String]) -> bool {
        list.len() == self.nodes.len()
            && list.iter().zip(&self.nodes).all(|(u, n)| {
                parse_upstream(u)
                    .is_ok_and(|(scheme, authority)| scheme == n.scheme && authority == n.authority)
            })
    }

    /// Every node.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The health settings.
    pub fn health(&self) -> &HealthSettings {
        &self.health
    }

    /// The next node in turn that may get traffic, skipping `exclude` (the node a retry
    /// must avoid).
    pub fn pick(&self, exclude: Option<usize>) -> Option<usize> {
        self.pick_at(exclude, Instant::now)
    }

    fn pick_at(&self, exclude: Option<usize>, now: impl Fn() -> Instant) -> Option<usize> {
        let n = self.nodes.len();
        if n == 0 {
            return None;
        }
        let slot = crate::workers::current().map_or(0, |i| i + 1);
        let next = &self.next[slot.min(self.next.len() - 1)].0;
        let start = next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| Some(*i) != exclude)
            .find(|i| self.nodes[*i].available(&now))
    }

    /// Records how an attempt on node `index` ended.
    pub fn record(&self, index: usize, outcome: Outcome) {
        self.record_at(index, outcome, Instant::now);
    }

    /// Counts `outcome` for node `index` in the metrics without weighing it in the node's
    /// health: a try cut short by its request's deadline, which says little of the node.
    pub fn count_only(&self, index: usize, outcome: Outcome) {
        if let Some(node) = self.nodes.get(index) {
            node.metrics.outcomes[outcome as usize].increment(1);
        }
    }

    fn record_at(&self, index: usize, outcome: Outcome, now: impl FnOnce() -> Instant) {
        if let Some(node) = self.nodes.get(index) {
            node.record(outcome, &self.health, now);
        }
    }

    /// Records an active check's verdict on node `index`.
    pub fn record_check(&self, index: usize, up: bool) {
        if let Some(node) = self.nodes.get(index) {
            node.set_active(up);
        }
    }

    /// The active-check interval and timeout, when active checks are configured.
    pub fn active_check(&self) -> Option<(&str, Duration, Duration)> {
        self.health
            .check_path
            .as_deref()
            .map(|p| (p, self.health.check_interval, self.health.check_timeout))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn two(failures: u32, cooldown: Duration) -> Upstreams {
        Upstreams::new(
            &[
                "http://127.0.0.1:1".to_owned(),
                "http://127.0.0.1:2".to_owned(),
            ],
            HealthSettings {
                failures,
                cooldown,
                ..HealthSettings::default()
            },
        )
    }

    #[test]
    fn each_outcome_is_counted_under_its_own_label_and_node() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            // handles are taken when the nodes are made, so make them under the recorder
            let u = two(100, Duration::from_secs(10));
            for (n, outcome) in Outcome::ALL.into_iter().enumerate() {
                for _ in 0..=n {
                    u.record(1, outcome);
                }
            }
            u.nodes()[0].record_duration(Duration::from_millis(3));
        });
        let text = handle.render();
        for (n, outcome) in Outcome::ALL.into_iter().enumerate() {
            let series = format!(
                "portcullis_upstream_requests_total{{node=\"127.0.0.1:2\",outcome=\"{}\"}} {}",
                outcome.as_str(),
                n + 1
            );
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
        // the other node's series exist from the start, at zero
        assert!(
            text.contains(
                "portcullis_upstream_requests_total{node=\"127.0.0.1:1\",outcome=\"ok\"} 0"
            )
        );
        assert!(text.contains(
            "portcullis_upstream_request_duration_seconds_count{node=\"127.0.0.1:1\"} 1"
        ));
    }

    #[test]
    fn round_robin_alternates_between_healthy_nodes() {
        let u = two(3, Duration::from_secs(10));
        let picks: Vec<usize> = (0..4).filter_map(|_| u.pick(None)).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(u.pick(Some(0)), Some(1));
    }

    #[test]
    fn consecutive_failures_take_a_node_out_and_a_success_resets_the_count() {
        let u = two(2, Duration::from_secs(60));
        u.record(0, Outcome::ConnectError);
        u.record(0, Outcome::Ok);
        u.record(0, Outcome::Timeout);
        assert!(u.nodes()[0].healthy(), "failures were not consecutive");
        u.record(0, Outcome::ErrorStatus);
        assert!(!u.nodes()[0].healthy());
        let picks: Vec<usize> = (0..3).filter_map(|_| u.pick(None)).collect();
        assert_eq!(picks, [1, 1, 1]);
        assert_eq!(u.pick(Some(1)), None);
    }

    #[test]
    fn after_the_cooldown_one_request_tries_again_and_one_failure_ends_it() {
        let u = two(2, Duration::from_secs(10));
        let t0 = Instant::now();
        u.record_at(0, Outcome::ConnectError, || t0);
        u.record_at(0, Outcome::ConnectError, || t0);
        assert!(!u.nodes()[0].available(|| t0 + Duration::from_secs(9)));
        let later = t0 + Duration::from_secs(11);
        assert!(u.nodes()[0].available(|| later));
        u.record_at(0, Outcome::ConnectError, || later);
        assert!(!u.nodes()[0].available(|| later + Duration::from_secs(1)));
        u.record_at(0, Outcome::Ok, || later + Duration::from_secs(30));
        assert!(u.nodes()[0].available(|| later + Duration::from_secs(30)));
        assert_eq!(
            u.pick_at(Some(1), || later + Duration::from_secs(30)),
            Some(0)
        );
    }

    #[test]
    fn a_failed_active_check_takes_a_node_out_until_it_passes() {
        let u = two(3, Duration::from_secs(10));
        u.record_check(1, false);
        assert_eq!(u.pick(None), Some(0));
        assert_eq!(u.pick(None), Some(0));
        u.record_check(1, true);
        assert!(u.nodes()[1].healthy());
    }
}
