//! keyrotation's one integration-test binary (modules keep link times down).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod file_source;
mod lifecycle;
mod properties;
mod tokens;
mod vault;
