//! Proof that the harness starts real servers that speak their real protocols: one
//! integration-test binary, one module per service.

// Test code may stop at the first surprise; `expect` says what was expected.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod lifetime;
mod nginx;
mod oidc;
mod openbao;
mod postgres;
mod redis;
