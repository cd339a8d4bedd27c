//! Logs (tracing, JSON by default) and metrics (Prometheus text on the admin listener).
//!
//! Both are process-wide: the first `Application` in a process installs them and later
//! ones (several instances in one test binary) reuse them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use metrics::SharedString;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat, TracingConfig};

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
    init_telemetry(config, &TracingConfig::default())
}

/// The span exporter, when `[tracing] otlp_endpoint` is set; kept to flush at shutdown.
static TRACER_PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global tracing subscriber: log lines filtered by `log.level` (reloadable),
/// and, with `tracing.otlp_endpoint`, every span of ours exported over OTLP/HTTP whatever
/// the log level. A second call (tests) leaves the first in place.
pub fn init_telemetry(config: &LogConfig, tracing: &TracingConfig) -> Result<(), String> {
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter_for(&config.level)?);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match config.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let tracer = match &tracing.otlp_endpoint {
        Some(endpoint) => Some(otlp_tracer(endpoint, tracing)?),
        None => None,
    };
    // spans only (log lines stay in the log), of our crates, at info and above
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span()
                    && *meta.level() <= tracing::Level::INFO
                    && ["portcullis", "keyrotation", "config_center"]
                        .iter()
                        .any(|c| meta.target().starts_with(c))
            }))
    });
    let result = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(spans)
        .try_init();
    // already installed (a second instance in the same process): keep the first one
    if result.is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
    Ok(())
}

fn otlp_tracer(endpoint: &str, config: &TracingConfig) -> Result<SdkTracer, String> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| format!("tracing.otlp_endpoint: {e}"))?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("portcullis");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let _ = TRACER_PROVIDER.set(provider);
    Ok(tracer)
}

/// Whether spans are exported (so trace context is worth extracting and injecting).
pub fn exporting_spans() -> bool {
    TRACER_PROVIDER.get().is_some()
}

/// Sends the spans still buffered; at shutdown.
pub fn flush_spans() {
    if let Some(provider) = TRACER_PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "span export at shutdown failed");
    }
}

/// Makes `span` a child of the caller's span named by a valid W3C `traceparent` in
/// `headers`, when spans are exported.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !exporting_spans() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(parent);
}

/// Names the current span `name` (the request span is made before routing and named
/// once the route is known): as its `otel.name` field for the logs, and on the exported
/// span, whose name tracing-opentelemetry does not update from a recorded field once
/// its context exists.
pub fn name_current_span(name: impl FnOnce() -> String) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let name = name();
    span.record("otel.name", name.as_str());
    if exporting_spans() {
        span.context().span().update_name(name);
    }
}

/// `(trace id, span id, flags)` of the current span as W3C hex, when spans are exported
/// and the current span is recorded; what an upstream's `traceparent` should name.
pub fn current_trace_context() -> Option<(String, String, u8)> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !exporting_spans() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        (
            sc.trace_id().to_string(),
            sc.span_id().to_string(),
            sc.trace_flags().to_u8(),
        )
    })
}

/// Reads W3C trace context from request headers.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
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

/// Buckets of `portcullis_audit_append_events`: from a lone event, through the writer's
/// linger batch (500), to its largest catch-up append on Postgres (5,000).
const AUDIT_APPEND_BUCKETS: &[f64] =
    &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// The process-wide Prometheus recorder; installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("portcullis_audit_append_events".to_owned()),
                        AUDIT_APPEND_BUCKETS,
                    )
                })
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

/// Records one request: `portcullis_http_requests_total` and
/// `portcullis_http_request_duration_seconds`, labelled by route template (never the raw
/// path, which would explode cardinality and may carry identifiers); `None` is
/// `unmatched`.
///
/// The pair of handles for a (method, route, status) is looked up in the registry once
/// per thread and kept: a registry look-up builds the labels, hashes them and takes a
/// shard lock, and this runs for every request.
pub fn record_request(
    method: &Method,
    route: Option<Arc<str>>,
    status: StatusCode,
    elapsed: Duration,
) {
    let record = |(counter, histogram): &(metrics::Counter, metrics::Histogram)| {
        counter.increment(1);
        histogram.record(elapsed.as_secs_f64());
    };
    let Some(index) = method_index(method) else {
        // an extension method: rare, not worth a cache entry
        record(&request_handles(method_label(method), route, status));
        return;
    };
    REQUEST_HANDLES.with(|cache| {
        let mut cache = cache.borrow_mut();
        let key = (index, route, status.as_u16());
        if let Some(handles) = cache.get(&key) {
            record(handles);
            return;
        }
        // bounded: routes and statuses are few, but proxy routes can be reloaded
        if cache.len() >= REQUEST_HANDLES_MAX {
            cache.clear();
        }
        let handles = request_handles(method_label(method), key.1.clone(), status);
        record(&handles);
        cache.insert(key, handles);
    });
}

/// The most (method, route, status) handle pairs one thread keeps.
const REQUEST_HANDLES_MAX: usize = 1024;

type RequestKey = (u8, Option<Arc<str>>, u16);

thread_local! {
    static REQUEST_HANDLES: std::cell::RefCell<std::collections::HashMap<RequestKey, (metrics::Counter, metrics::Histogram)>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The registry's handles for one (method, route, status).
fn request_handles(
    method: SharedString,
    route: Option<Arc<str>>,
    status: StatusCode,
) -> (metrics::Counter, metrics::Histogram) {
    let route = route.map_or(SharedString::const_str("unmatched"), SharedString::from);
    let counter = metrics::counter!(
        "portcullis_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status.as_u16().to_string()
    );
    let histogram = metrics::histogram!(
        "portcullis_http_request_duration_seconds",
        "method" => method, "route" => route
    );
    (counter, histogram)
}

/// The usual methods and their labels: labels without an allocation, and the handle
/// cache's key (the place in this table).
const METHODS: [(Method, &str); 7] = [
    (Method::GET, "GET"),
    (Method::POST, "POST"),
    (Method::PUT, "PUT"),
    (Method::PATCH, "PATCH"),
    (Method::DELETE, "DELETE"),
    (Method::HEAD, "HEAD"),
    (Method::OPTIONS, "OPTIONS"),
];

/// The method's place in [`METHODS`].
fn method_index(method: &Method) -> Option<u8> {
    METHODS
        .iter()
        .position(|(m, _)| m == method)
        .and_then(|i| u8::try_from(i).ok())
}

/// The method as a label, without an allocation for the usual ones.
fn method_label(method: &Method) -> SharedString {
    match METHODS.iter().find(|(m, _)| m == method) {
        Some((_, label)) => SharedString::const_str(label),
        None => SharedString::from_owned(method.as_str().to_owned()),
    }
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
