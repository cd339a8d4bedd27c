//! Integration tests of the gateway: one binary, one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin_clients;
mod alerts;
mod audit;
mod authn;
mod cli;
mod clients;
mod cluster;
mod config_api;
mod keys;
mod least_privilege;
mod limits;
mod local_accounts;
mod nginx_ha;
mod openapi;
mod protection;
mod proxy;
mod readiness;
mod refresh;
mod runtime;
mod shutdown;
mod sso;
mod support;
mod tls_reload;
mod token;
