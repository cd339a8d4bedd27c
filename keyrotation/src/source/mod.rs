//! Where the ring is stored: Vault KV v2, or a local file in `--dev`.

pub(crate) mod file;
pub(crate) mod vault;

use async_trait::async_trait;

use crate::{KeyError, KeyRing};

/// A value with the source version it was read at (the check-and-set token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its version: increases with every successful write.
    pub version: u64,
}

/// The result of a check-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Written; the new version.
    Stored(u64),
    /// Someone else wrote first: the expected version was not the current one.
    Conflict,
}

/// Storage for the key ring with check-and-set semantics: of N writers racing with the same
/// expected version, exactly one gets [`StoreOutcome::Stored`].
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// Reads the ring and its version; `None` when no ring was ever written.
    async fn load(&self) -> Result<Option<Versioned<KeyRing>>, KeyError>;

    /// Writes `ring` if the stored version is still `expected_version` (`None`: only if no
    /// ring exists yet).
    async fn store(
        &self,
        ring: &KeyRing,
        expected_version: Option<u64>,
    ) -> Result<StoreOutcome, KeyError>;

    /// A short, secret-free description for logs and status (e.g. `vault:secret/portcullis/keyring`).
    fn describe(&self) -> String;
}
