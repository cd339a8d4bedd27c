//! Cutting off a client's access tokens before they expire.
//!
//! Access tokens are JWTs: every instance verifies them by their signature and claims
//! alone, so a token issued to a client stays good until its `exp` even after the client
//! is disabled. Portcullis verifies every token its own routes take (the proxy to the
//! admin nodes, the config center and its watches, the admin API, introspection), so it
//! can refuse them all the same: disabling or deleting a client, or
//! `POST /admin/clients/{id}/revoke-tokens`, records a **cutoff** in the database, and
//! from then on every token issued to that client before the cutoff is refused on every
//! instance (401 `invalid_token`, `active: false`, the watch ends). Relying parties that
//! verify tokens themselves do not see cutoffs; they see the token expire.
//!
//! Each instance reads the cutoffs every [`RELOAD_INTERVAL`] (one small query), and
//! applies one it writes itself at once. A cutoff is kept until no token it refuses
//! could still be valid, then forgotten. While the database is away an instance keeps
//! the cutoffs it read last.
//!
//! On the request path a token costs one look at an empty map, or one hash lookup of its
//! client while any cutoff is live.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::db::{Database, DbError};

/// How often an instance reads the cutoffs: how long a cutoff made on another instance
/// takes, at most, to apply here (plus the query's own time).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// How long one read of the cutoffs may take before it is given up, counted as failed and
/// tried again at the next interval. A read waiting on a connection that a failover left
/// silent would otherwise hold up every later read, and with them every cutoff made on
/// another instance, for as long as the kernel retransmits (about 15 minutes).
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

/// How far past a disable its cutoff reaches: the other instances may still serve the
/// client from their cached record for up to twice `tokens.client_cache_ttl`, a refresh
/// may be past its client check, and instance clocks differ a little. A token issued to
/// the client in that time is cut off too.
pub fn after_disable(config: &crate::config::Config) -> Duration {
    config
        .tokens
        .client_cache_ttl
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(2))
}

/// How long a cutoff must be kept: the longest lifetime a token may have, plus the leeway.
pub fn longest_lifetime(config: &crate::config::Config) -> Duration {
    config
        .max_token_lifetime()
        .saturating_add(config.tokens.leeway)
}

/// The cutoffs in force: client id → the first `iat` (Unix seconds) still accepted.
/// Cheap to read from any request.
#[derive(Debug, Default)]
pub struct Cutoffs {
    by_client: ArcSwap<HashMap<Box<str>, i64>>,
    /// The cuts this instance made, with when they may be forgotten: merged into every
    /// reload, so that a read that began before a cut was written cannot drop it (nor
    /// a database outage keep it dropped).
    made_here: std::sync::Mutex<HashMap<Box<str>, (i64, OffsetDateTime)>>,
}

impl Cutoffs {
    /// No cutoffs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a token issued at `iat` (Unix seconds) to `client_id` is cut off.
    pub fn refuses(&self, client_id: &str, iat: i64) -> bool {
        let by_client = self.by_client.load();
        !by_client.is_empty() && by_client.get(client_id).is_some_and(|first| iat < *first)
    }

    /// How many clients have a cutoff in force.
    pub fn len(&self) -> usize {
        self.by_client.load().len()
    }

    /// Whether no client has a cutoff in force.
    pub fn is_empty(&self) -> bool {
        self.by_client.load().is_empty()
    }

    /// Applies a cutoff at once (on the instance that made it; the others read it), and
    /// keeps applying it over reloads until `keep_until`.
    fn note(&self, client_id: &str, first_accepted: i64, keep_until: OffsetDateTime) {
        {
            let mut made = self
                .made_here
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = made
                .entry(client_id.into())
                .or_insert((first_accepted, keep_until));
            *entry = (entry.0.max(first_accepted), entry.1.max(keep_until));
        }
        self.by_client.rcu(|current| {
            let mut next = HashMap::clone(current);
            let entry = next.entry(client_id.into()).or_insert(first_accepted);
            *entry = (*entry).max(first_accepted);
            next
        });
    }

    /// Cuts off every token issued to `client_id` before `until` (the whole second of
    /// `until` included, since `iat` counts whole seconds), keeping the record until
    /// `until + longest_lifetime` (no token issued before `until` can be valid after
    /// that); applies it here at once. Returns the first instant whose tokens are
    /// accepted. `until` is now for a revocation; later for a disable, whose client other
    /// instances may still serve from their cached record for a few seconds.
    pub async fn cut(
        &self,
        db: &Database,
        client_id: &str,
        until: OffsetDateTime,
        longest_lifetime: Duration,
    ) -> Result<OffsetDateTime, DbError> {
        let first_accepted = until.unix_timestamp().saturating_add(1);
        let keep_until = until + longest_lifetime;
        // never moved back by a second cut made earlier
        const SQL: &str = "INSERT INTO token_cutoffs (client_id, first_iat, keep_until_unix_ms) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (client_id) DO UPDATE SET \
             first_iat = CASE WHEN token_cutoffs.first_iat > excluded.first_iat \
                 THEN token_cutoffs.first_iat ELSE excluded.first_iat END, \
             keep_until_unix_ms = CASE WHEN token_cutoffs.keep_until_unix_ms > excluded.keep_until_unix_ms \
                 THEN token_cutoffs.keep_until_unix_ms ELSE excluded.keep_until_unix_ms END";
        let _: u64 = crate::on_pool!(db.pool(), |p| {
            sqlx::query(SQL)
                .bind(client_id)
                .bind(first_accepted)
                .bind(unix_ms(keep_until))
                .execute(p)
                .await?
                .rows_affected()
        });
        self.note(client_id, first_accepted, keep_until);
        Ok(OffsetDateTime::from_unix_timestamp(first_accepted).unwrap_or(until))
    }

    /// Reads the cutoffs still kept at `now` and puts them in force (those that ran out
    /// are deleted by the way).
    pub async fn reload(&self, db: &Database, now: OffsetDateTime) -> Result<(), DbError> {
        const PRUNE: &str = "DELETE FROM token_cutoffs WHERE keep_until_unix_ms <= $1";
        const SELECT: &str =
            "SELECT client_id, first_iat FROM token_cutoffs WHERE keep_until_unix_ms > $1";
        let now_ms = unix_ms(now);
        let rows: Vec<(String, i64)> = crate::on_pool!(db.pool(), |p| {
            sqlx::query(PRUNE).bind(now_ms).execute(p).await?;
            sqlx::query_as(SELECT).bind(now_ms).fetch_all(p).await?
        });
        self.install(rows, now);
        Ok(())
    }

    /// Puts the cutoffs `rows` read at `now` in force, with the cuts made here on top.
    fn install(&self, rows: Vec<(String, i64)>, now: OffsetDateTime) {
        let mut by_client: HashMap<Box<str>, i64> = rows
            .into_iter()
            .map(|(client, first)| (client.into_boxed_str(), first))
            .collect();
        {
            let mut made = self
                .made_here
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            made.retain(|_, (_, keep_until)| *keep_until > now);
            for (client, (first, _)) in made.iter() {
                let entry = by_client.entry(client.clone()).or_insert(*first);
                *entry = (*entry).max(*first);
            }
            // stored under the lock, so that a cut noted meanwhile is in this map or
            // noted on top of it
            self.by_client.store(Arc::new(by_client));
        }
    }

    /// Reads the cutoffs every [`RELOAD_INTERVAL`] until `stop`, once the schema is in
    /// place; a failed read, or one given up at [`RELOAD_DEADLINE`], keeps those in force
    /// and is logged (once per outage).
    pub fn spawn(
        self: &Arc<Self>,
        db: Database,
        clock: impl Fn() -> OffsetDateTime + Send + 'static,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                if db.is_migrated() {
                    let read = tokio::time::timeout(RELOAD_DEADLINE, this.reload(&db, clock()));
                    let failure = match read.await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some(format!(
                            "no answer within {}s; given up",
                            RELOAD_DEADLINE.as_secs()
                        )),
                    };
                    match failure {
                        None if failing => {
                            failing = false;
                            tracing::info!("token cutoffs read again");
                        }
                        None => {}
                        Some(error) => {
                            metrics::counter!("portcullis_token_cutoff_reload_failures_total")
                                .increment(1);
                            if !failing {
                                failing = true;
                                tracing::warn!(%error,
                                    "reading token cutoffs failed; keeping those read last");
                            }
                        }
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                }
            }
        })
    }
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cutoff_refuses_tokens_of_its_client_issued_before_it_only() {
        let cutoffs = Cutoffs::new();
        assert!(!cutoffs.refuses("svc", 100));
        let until = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1);
        cutoffs.note("svc", 101, until);
        assert!(cutoffs.refuses("svc", 100));
        assert!(!cutoffs.refuses("svc", 101));
        assert!(!cutoffs.refuses("other", 0));
        // an earlier cut does not move it back
        cutoffs.note("svc", 50, until);
        assert!(cutoffs.refuses("svc", 100));
        assert_eq!(cutoffs.len(), 1);
    }

    #[test]
    fn a_read_that_missed_a_cut_made_here_does_not_drop_it() {
        let cutoffs = Cutoffs::new();
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1);
        cutoffs.note("svc", 101, now + time::Duration::hours(1));
        // a read whose SELECT ran before the cut was written
        cutoffs.install(vec![("other".to_owned(), 7)], now);
        assert!(cutoffs.refuses("svc", 100));
        assert!(cutoffs.refuses("other", 6));
        // the database said an earlier instant for it: the later one holds
        cutoffs.install(vec![("svc".to_owned(), 90)], now);
        assert!(cutoffs.refuses("svc", 100));
        // once it cannot matter any more, only what the database says counts
        cutoffs.install(Vec::new(), now + time::Duration::hours(2));
        assert!(cutoffs.is_empty());
    }
}
