//! A short-lived cache of client records for the token endpoint's hot path.
//!
//! Authenticating a client needs its record (secret hashes, grants, scopes). Reading it from
//! the database on every token request would make the database the ceiling of the token
//! endpoint, so records are kept for a few seconds. Writes through this instance's store
//! drop the entry at once; other instances see a change within the TTL. Disabling a client
//! also revokes its refresh tokens at once, so only access-token issuance lags by the TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::Client;

/// Entries kept at most; beyond, the cache is emptied (no eviction order to maintain).
const MAX_ENTRIES: usize = 10_000;

/// Client records by id, each fresh for `ttl`.
#[derive(Debug)]
pub struct ClientCache {
    ttl: Duration,
    // shared, so a hit costs a reference count rather than a copy of the record
    entries: RwLock<HashMap<String, (Instant, Arc<Client>)>>,
}

impl ClientCache {
    /// A cache whose entries live `ttl`; a zero TTL caches nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The cached record of `id`, if fresh.
    pub fn get(&self, id: &str) -> Option<Arc<Client>> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.read().ok()?;
        entries
            .get(id)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, c)| c.clone())
    }

    /// Remembers `client`.
    pub fn put(&self, client: &Arc<Client>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(
                client.id.as_str().to_owned(),
                (Instant::now(), client.clone()),
            );
        }
    }

    /// Forgets `id` (after a write).
    pub fn forget(&self, id: &str) {
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(id);
        }
    }
}
