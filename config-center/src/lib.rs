//! The Portcullis config center: environment → application → key → value, encrypted at
//! rest, versioned, and watched by admin and executor nodes.
//!
//! Status: this crate is a placeholder in the workspace layout. The model, storage,
//! encryption, change feed and client library arrive with the config-center issue; until
//! then the gateway serves no config routes.
#![forbid(unsafe_code)]

/// Errors of the config center.
#[derive(Debug, thiserror::Error)]
pub enum ConfigCenterError {
    /// The config center is not built yet.
    #[error("the config center is not available in this build")]
    Unavailable,
}
