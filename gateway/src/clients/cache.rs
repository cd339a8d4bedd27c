//! A short-lived cache of client records for the token endpoint's hot path.
//!
//! Authenticating a client needs its record (secret hashes, grants, scopes). Reading it from
//! the database on every token request would make the database the ceiling of the token
//! endpoint, so records are kept for a few seconds. Writes through this instance's store
//! drop the entry at once; other instances see a change within the TTL. Disabling a client
//! also revokes its refresh tokens at once, so only access-token issuance lags by the TTL.
//!
//! A write must not be undone by a read that raced it: a request whose `SELECT` ran before
//! the write committed holds the old record, and caching it after the write would keep a
//! disabled client (or a secret rotated without overlap) working here for up to twice
//! the TTL. So a write forgets the record again once it is done ([`ClientCache::writing`]),
//! and a record read before any forget since is not cached ([`ReadTicket`]).
//!
//! When a record's TTL is up, one request reads it again while the requests arriving
//! meanwhile keep using the old record — for at most one more TTL. Without this every
//! request for a busy client waited on the same database read at each expiry, and a slow
//! database (a checkpoint, a failover) held all of them. After twice the TTL the old
//! record is never used: every request reads the database, as with no cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// How many times an entry was forgotten; changed and read under the `entries` lock.
    forgets: AtomicU64,
}

/// Taken before a record is read from the database, and handed to [`ClientCache::put`]:
/// if anything was forgotten since, the record may predate a write and is not cached.
/// (One count for all ids: writes are rare, and a record not cached is only read again.)
#[derive(Debug, Clone, Copy)]
pub struct ReadTicket(u64);

/// A write to one client under way: see [`ClientCache::writing`].
#[derive(Debug)]
#[must_use = "the record is forgotten again when this is dropped, after the write"]
pub struct Writing<'a> {
    cache: &'a ClientCache,
    id: String,
}

impl ClientCache {
    /// A cache whose entries live `ttl`; a zero TTL caches nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
            forgets: AtomicU64::new(0),
        }
    }

    /// The ticket of a database read about to start.
    pub fn ticket(&self) -> ReadTicket {
        ReadTicket(self.forgets.load(Ordering::Acquire))
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

    /// Whether the entry of `id` was read from the database less than `age` ago.
    pub fn read_within(&self, id: &str, age: Duration) -> bool {
        self.entries
            .read()
            .is_ok_and(|entries| entries.get(id).is_some_and(|e| e.read_at.elapsed() < age))
    }

    /// Remembers `client`, read just now by a read that took `ticket` before it started;
    /// unless an entry was forgotten since (a write may have committed after the read).
    pub fn put(&self, client: &Arc<Client>, ticket: ReadTicket) {
        self.put_at(client, ticket, Instant::now());
    }

    fn put_at(&self, client: &Arc<Client>, ticket: ReadTicket, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut entries) = self.entries.write() {
            // under the lock `forget` counts under: either this put comes first and the
            // forget removes it, or the forget comes first and the count tells
            if self.forgets.load(Ordering::Acquire) != ticket.0 {
                // not kept; an older entry (another id was forgotten) is read again next
                if let Some(entry) = entries.get(client.id.as_str()) {
                    entry.refreshing.store(false, Ordering::Release);
                }
                return;
            }
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

    /// A read found no client `id` in the database (deleted through another instance, or
    /// never there): drops its entry, if there is one. Not counted as a forget: no write
    /// of this instance is under way, and counting would turn away the records other
    /// reads are about to keep, so a stream of made-up ids would empty the cache of the
    /// clients really in use.
    pub fn absent(&self, id: &str) {
        let held = self
            .entries
            .read()
            .is_ok_and(|entries| entries.contains_key(id));
        if held && let Ok(mut entries) = self.entries.write() {
            entries.remove(id);
        }
    }

    /// Forgets `id` (a write through this instance).
    pub fn forget(&self, id: &str) {
        if let Ok(mut entries) = self.entries.write() {
            self.forgets.fetch_add(1, Ordering::AcqRel);
            entries.remove(id);
        }
    }

    /// Forgets `id` now and again when the returned guard is dropped. Hold it across a
    /// write to `id`: a record cached while the write was under way is then forgotten
    /// once the write is over, however it ended (committed, failed, or its caller gone
    /// mid-way, when it may still have committed).
    pub fn writing(&self, id: &str) -> Writing<'_> {
        self.forget(id);
        Writing {
            cache: self,
            id: id.to_owned(),
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.cache.forget(&self.id);
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
        cache.put_at(&client("svc"), cache.ticket(), t0);
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
        cache.put_at(&client("svc"), cache.ticket(), too_late);
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "fresh");
        // a write through this instance forgets it at once
        cache.forget("svc");
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "miss");
        assert_eq!(kind(&cache.lookup_at("svc", too_late)), "miss");
    }

    #[test]
    fn a_record_read_before_a_write_committed_is_not_cached_after_it() {
        let cache = ClientCache::new(Duration::from_secs(5));
        let now = Instant::now();
        // a token request misses and reads the record: the write has not committed yet
        let ticket = cache.ticket();
        let before_the_write = client("svc");
        // the write (a disable, a secret rotation) commits and is over
        drop(cache.writing("svc"));
        // the read's answer, the old record, arrives only now: it must not be kept
        cache.put_at(&before_the_write, ticket, now);
        assert_eq!(kind(&cache.lookup_at("svc", now)), "miss");
        // a read that starts after the write is cached as usual
        cache.put_at(&client("svc"), cache.ticket(), now);
        assert_eq!(kind(&cache.lookup_at("svc", now)), "fresh");
    }

    #[test]
    fn a_record_cached_while_a_write_is_under_way_is_forgotten_when_it_ends() {
        let cache = ClientCache::new(Duration::from_secs(5));
        let now = Instant::now();
        let write = cache.writing("svc");
        // read and cached after the write began and before it committed: the old record
        cache.put_at(&client("svc"), cache.ticket(), now);
        assert_eq!(kind(&cache.lookup_at("svc", now)), "fresh");
        drop(write);
        assert_eq!(kind(&cache.lookup_at("svc", now)), "miss");
    }

    #[test]
    fn reads_of_made_up_client_ids_do_not_keep_real_records_out_of_the_cache() {
        let cache = ClientCache::new(Duration::from_secs(5));
        let now = Instant::now();
        // a real client's record is being read while unknown ids are looked up
        let ticket = cache.ticket();
        for n in 0..100 {
            cache.absent(&format!("made-up-{n}"));
        }
        cache.put_at(&client("svc"), ticket, now);
        assert_eq!(kind(&cache.lookup_at("svc", now)), "fresh");
        // a client deleted through another instance is dropped when a read finds it gone
        cache.absent("svc");
        assert_eq!(kind(&cache.lookup_at("svc", now)), "miss");
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = ClientCache::new(Duration::ZERO);
        cache.put(&client("svc"), cache.ticket());
        assert_eq!(kind(&cache.lookup("svc")), "miss");
    }
}
