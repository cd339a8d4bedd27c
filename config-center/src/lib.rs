//! The Portcullis config center: environment → application → key → value, encrypted at
//! rest, versioned, and watched by admin and executor nodes.
//!
//! - [`model`]: parsed names and values ([`Environment`], [`AppName`], [`ConfigKey`],
//!   [`Format`], [`ConfigEntry`]).
//! - [`store`]: releases in Postgres or SQLite with history, diff and rollback
//!   ([`Store`], [`migrate`]).
//! - [`crypto`]: envelope encryption — per-environment data keys wrapped by Vault Transit
//!   or a local master key ([`Envelope`], [`KeyWrapper`]).
//! - [`feed`]: the cross-instance change feed ([`ChangeFeed`]).
//! - [`signing`] and [`wire`]: the release signature contract and the JSON the gateway
//!   serves ([`Snapshot`], [`ReleaseClaims`]).
//! - [`client`]: the library nodes use to fetch, verify and watch their config.
//!
//! This crate knows nothing about serving HTTP; the gateway composes it. The HTTP
//! contract is in `docs/config-center.md`.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod crypto;
pub mod feed;
pub mod model;
pub mod signing;
pub mod store;
pub mod wire;

pub use crypto::{
    CryptoError, Envelope, KeyWrapper, LocalWrapper, TransitWrapper, VaultClientSource,
};
pub use feed::{ChangeFeed, FeedClosed, FeedEvent, ReleaseEvent};
pub use model::{
    AppName, ConfigEntry, ConfigKey, Environment, Environments, Field, Format, GraySelector,
    ModelError,
};
pub use signing::{ReleaseClaims, content_hash, signing_payload};
pub use store::{
    Aborted, ChangeKind, ChangeNote, Diff, Edit, Expected, KeyChange, Pool, Release, ReleaseCheck,
    ReleaseInfo, ReleaseStatus, Store, StoreError, migrate, postgres_migrator, sqlite_migrator,
};
pub use wire::{Entry, ErrorBody, Snapshot};
