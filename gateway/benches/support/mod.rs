//! What the HTTP benches share: their knobs come from the environment, and `cargo test
//! --benches` runs them once as tests, when they do nothing.

/// The number in the environment variable `name`, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether this run is `cargo test --benches` (or `BENCH_SKIP` is set): then skip.
pub fn skipped() -> bool {
    std::env::args().any(|a| a == "--test") || std::env::var_os("BENCH_SKIP").is_some()
}

/// The `PORTCULLIS_*` variables of the environment, applied over each bench's
/// configuration (`PORTCULLIS_SERVER__WORKERS=0` serves on the shared runtime).
pub fn portcullis_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(portcullis::config::ENV_PREFIX))
}
