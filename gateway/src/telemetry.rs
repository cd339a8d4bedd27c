//! Logs (tracing, JSON by default) and metrics (Prometheus text on the admin listener).
//!
//! Both are process-wide: the first `Application` in a process installs them and later
//! ones (several instances in one test binary) reuse them.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// The handle that changes the log filter of the installed subscriber. The subscriber is
/// process-wide by nature (one per process), so its handle is too.
static LOG_FILTER: OnceLock<tracing_subscriber::reload::Handle<EnvFilter, Registry>> =
    OnceLock::new();

/// The filter for an operator's `level`: vaultrs logs every lost check-and-set race (an
/// expected event when instances rotate together) at ERROR; our own code reports Vault
/// failures, so it is muted unless the operator asks for it by name.
fn filter_for(level: &str) -> Result<EnvFilter, String> {
    let full = if level.contains("vaultrs") {
        level.to_owned()
    } else {
        format!("{level},vaultrs=off,rustify=off")
    };
    EnvFilter::try_new(&full).map_err(|e| format!("invalid log.level `{level}`: {e}"))
}

/// Installs the global tracing subscriber. A second call (tests) leaves the first in place.
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter_for(&config.level)?);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    // already installed (a second instance in the same process): keep the first one
    if result.is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
    Ok(())
}

/// Changes the log filter of the running process (runtime settings). `Ok(false)` when
/// this process did not install Portcullis's subscriber (an embedding program, tests).
pub fn set_log_level(level: &str) -> Result<bool, String> {
    let filter = filter_for(level)?;
    match LOG_FILTER.get() {
        Some(handle) => handle
            .reload(filter)
            .map(|()| true)
            .map_err(|e| format!("log filter reload: {e}")),
        None => Ok(false),
    }
}

/// Checks a log level without applying it.
pub fn check_log_level(level: &str) -> Result<(), String> {
    filter_for(level).map(|_| ())
}

/// Latency buckets, in seconds, for every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder; installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // a recorder may already be installed by an embedding program: then our
            // handle renders only what we record through it, which is still correct
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The route label of a response from a handler that serves paths the router does not
/// match itself (the proxy's configured routes), so metrics name the configured route
/// (`proxy:/jobinfo/`) instead of `unmatched`. Bounded: one per configured route.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub String);

/// Records every request: `portcullis_http_requests_total` and
/// `portcullis_http_request_duration_seconds`, labelled by route template (never the raw
/// path, which would explode cardinality and may carry identifiers).
pub async fn record_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    let route = matched
        .or_else(|| {
            response
                .extensions()
                .get::<RouteLabel>()
                .map(|l| l.0.clone())
        })
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        "portcullis_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status
    )
    .increment(1);
    metrics::histogram!(
        "portcullis_http_request_duration_seconds",
        "method" => method, "route" => route
    )
    .record(start.elapsed().as_secs_f64());
    response
}

/// Drains histogram samples into their buckets every few seconds, so that memory stays
/// flat between scrapes.
pub async fn metrics_upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}
