//! A short-lived cache of client records for the token endpoint's hot path.
//!
//! Authenticating a client needs its record (secret hashes, grants, scopes). Reading it from
//! the database on every token request would make the database the ceiling of the token
//! endpoint, so records are kept for a few seconds. Writes through this instance's store
//! drop the entry at once; other instances see a change within the TTL. Disabling a client
//! also revokes its refresh tokens at once, so only access-token issuance lags by the TTL.
//!
//! When a record's TTL is up, one request reads it again while the requests arriving
//! meanwhile keep using the old record — for at most one more TTL. Without this every
//! request for a busy client waited on the same database read at each expiry, and a slow
//! database (a checkpoint, a failover) held all of them. After twice the TTL the old
//! record is never used: every request reads the database, as with no cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::Client;

/// Entries kept at most; beyond, the cache is emptied (no eviction order to maintain).
const MAX_ENTRIES: usize = 10_000;

/// What the cache has for a client.
#[derive(Debug)]
pub enum Lookup {
    /// A record read within the TTL.
    Fresh(Arc<Client>),
    /// A record past its TTL (within twice it) that another request is reading again.
    Refreshing(Arc<Client>),
    /// Nothing usable: the caller reads the database (and `put`s, or `refresh_failed`).
    Miss,
}

#[derive(Debug)]
struct Entry {
    read_at: Instant,
    client: Arc<Client>,
    /// Whether a request is reading this record again.
    refreshing: AtomicBool,
}

/// Client records by id, each fresh for `ttl`.
#[derive(Debug)]
pub struct ClientCache {
    ttl: Duration,
    // shared, so a hit costs a reference count rather than a copy of the record
    entries: RwLock<HashMap<String, Entry>>,
}

impl ClientCache {
    /// A cache whose entries live `ttl`; a zero TTL caches nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// What the cache has for `id` now.
    pub fn lookup(&self, id: &str) -> Lookup {
        self.lookup_at(id, Instant::now())
    }

    fn lookup_at(&self, id: &str, now: Instant) -> Lookup {
        if self.ttl.is_zero() {
            return Lookup::Miss;
        }
        let Ok(entries) = self.entries.read() else {
            return Lookup::Miss;
        };
        let Some(entry) = entries.get(id) else {
            return Lookup::Miss;
        };
        let age = now.saturating_duration_since(entry.read_at);
        if age < self.ttl {
            return Lookup::Fresh(entry.client.clone());
        }
        // the first request past the TTL reads the record again; the others use the old
        // one meanwhile, but never past twice the TTL
        if age < self.ttl.saturating_mul(2) && entry.refreshing.swap(true, Ordering::AcqRel) {
            return Lookup::Refreshing(entry.client.clone());
        }
        Lookup::Miss
    }

    /// Remembers `client`, read just now.
    pub fn put(&self, client: &Arc<Client>) {
        self.put_at(client, Instant::now());
    }

    fn put_at(&self, client: &Arc<Client>, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(
                client.id.as_str().to_owned(),
                Entry {
                    read_at: now,
                    client: client.clone(),
                    refreshing: AtomicBool::new(false),
                },
            );
        }
    }

    /// The read that a [`Lookup::Miss`] started failed: the next request tries again.
    pub fn refresh_failed(&self, id: &str) {
        if let Ok(entries) = self.entries.read()
            && let Some(entry) = entries.get(id)
        {
            entry.refreshing.store(false, Ordering::Release);
        }
    }

    /// Forgets `id` (after a write).
    pub fn forget(&self, id: &str) {
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn client(id: &str) -> Arc<Client> {
        Arc::new(Client::for_tests(id))
    }

    fn kind(l: &Lookup) -> &'static str {
        match l {
            Lookup::Fresh(_) => "fresh",
            Lookup::Refreshing(_) => "refreshing",
            Lookup::Miss => "miss",
        }
    }

    #[test]
    fn past_its_ttl_one_request_reads_again_while_the_others_use_the_old_record() {
        let ttl = Duration::from_secs(5);
        let cache = ClientCache::new(ttl);
        let t0 = Instant::now();
        assert_eq!(kind(&cache.lookup_at("svc", t0)), "miss");
        cache.put_at(&client("svc"), t0);
        assert_eq!(
            kind(&cache.lookup_at("svc", t0 + Duration::from_secs(4))),
            "fresh"
        );

        // the TTL is up: the first request reads again, the next ones get the old record
        let late = t0 + Duration::from_secs(6);
        assert_eq!(kind(&cache.lookup_at("svc", late)), "miss");
        assert_eq!(kind(&cache.lookup_at("svc", late)), "refreshing");
        assert_eq!(kind(&cache.lookup_at("svc", late)), "refreshing");
        // that read failed: the next request tries again
        cache.refresh_failed("svc");
        assert_eq!(kind(&cache.lookup_at("svc", late)), "miss");
        assert_eq!(kind(&cache.lookup_at("svc", late)), "refreshing");

        // never past twice the TTL, refresh or not: everybody reads the database
        let too_late = t0 + Duration::from_secs(10);
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "miss");
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "miss");

        // a new read makes it fresh again
        cache.put_at(&client("svc"), too_late);
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "fresh");
        // a write through this instance forgets it at once
        cache.forget("svc");
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "miss");
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "miss");
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = ClientCache::new(Duration::ZERO);
        cache.put(&client("svc"));
        assert_eq!(kind(&cache.lookup("svc")), "miss");
    }
}
