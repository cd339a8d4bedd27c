//! Portcullis: the TLS gateway and configuration plane in front of the job scheduler's
//! admin cluster.
//!
//! The binary is a thin shell over this library: [`cli::run`] parses the command line,
//! [`config`] loads and validates configuration, and [`app::Application`] binds the
//! listeners and runs the instance. Tests build `Application`s on port 0 directly.
#![forbid(unsafe_code)]

/// The process allocator of the `portcullis` binary and of everything else that links
/// this library (its tests and benchmarks, so they measure what runs): mimalloc's
/// per-thread heaps instead of glibc's locked arenas, which cost the token endpoint a
/// measurable share of its CPU in futex wake-ups under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod accounts;
pub mod admin;
pub mod app;
pub mod audit;
pub mod authn;
pub mod cli;
pub mod clients;
pub mod config;
pub mod config_api;
pub mod cutoff;
pub mod db;
pub mod detach;
pub mod dev;
pub mod edge;
pub mod error;
pub mod keys;
pub mod oauth;
pub mod outbound;
pub mod protect;
pub mod proxy;
pub mod readiness;
pub mod redis_store;
pub mod refresh;
pub mod request_span;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod server_key;
pub mod sso;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod verified;
pub mod workers;
