//! config-center's one integration-test binary (modules keep link times down). Everything
//! runs against real Postgres, SQLite, OpenBao and HTTP, per `TESTING.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod common;
mod conformance;
mod encryption;
mod feed;
mod migrations;
