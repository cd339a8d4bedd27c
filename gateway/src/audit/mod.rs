//! The audit trail: who did what, when, from where — hash-chained, so that tampering with
//! history is detectable.
//!
//! [`Audit::record`] only queues the event (a non-blocking `try_send`: token issuance runs
//! at tens of thousands per second and must not wait for the trail). A background writer
//! drains the queue in batches and appends each batch to the chain in one transaction
//! ([`chain::append`]), retrying while the database is away so that a short outage loses
//! nothing; the bounded queue keeps memory bounded during a long one (overflow is counted
//! in `portcullis_audit_dropped_total` and the event logged in full, the only copy left).
//! An event the database refuses for what it contains is no outage: retrying it would hold
//! every event behind it for ever, so it is isolated (the batch split until it stands
//! alone), counted in `portcullis_audit_refused_total`, logged in full, and the rest is
//! stored. Each stored record is then streamed to the JSON-lines sink (`[audit] sink`) and
//! logged at debug level (target `audit`).
//!
//! How full the queue is — the events queued and the batch the writer holds — is read at
//! each scrape ([`Audit::record_metrics`]), never on the request path; each append's
//! duration and size are recorded by the writer, so a database that stalls shows as a
//! filling queue and a slow append before any event is dropped.
//!
//! The writer stops only when told to after the listeners have returned, so that the
//! requests answered during the shutdown grace are in the trail: it then stores what is
//! queued, for at most [`DRAIN_DEADLINE`] while the database is away.
//!
//! Events never carry secrets: callers pass identifiers, never tokens, secrets or values.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{AuditConfig, AuditSinkKind};
use crate::db::Database;

pub mod chain;
pub mod query;
pub mod sink;

pub use chain::{After, ChainBreak, Intact, verify, verify_from};
pub use query::{ActionFilter, AuditFilter, FilterError, Page, RawFilter, list};

/// The events the writer lingers for before appending: at high rates, fewer and fuller
/// transactions.
const BATCH: usize = 500;

/// The most events appended in one transaction on Postgres, taken when more than a
/// [`BATCH`] are waiting. Every append pays the same round trips to the database whatever
/// its size (the chain head locked and moved, `COPY` opened and finished, the commit), one
/// after another since the chain is appended in order; at tens of thousands of tokens a
/// second, batches of 500 could not keep up on a busy host and the queue overflowed
/// (97,432 of 323,819 records dropped in a 10 s run at 32,333 tokens/s). A writer that has
/// fallen behind catches up in larger transactions instead. SQLite takes ten bound values
/// per event in one statement, and stays at [`BATCH`].
const CATCH_UP_BATCH: usize = 5_000;

/// The most events one append takes on `db`.
fn most_per_append(db: &Database) -> usize {
    match db.pool() {
        crate::db::Pool::Postgres(_) => CATCH_UP_BATCH,
        crate::db::Pool::Sqlite(_) => BATCH,
    }
}

/// How long the writer waits for more events before appending a batch that is not full:
/// at tens of thousands of events per second this makes batches of hundreds; a lone
/// event is stored this much later.
const LINGER: Duration = Duration::from_millis(10);

/// How often a lingering writer looks whether a full batch is waiting.
const LINGER_STEP: Duration = Duration::from_millis(1);

/// How long a stopping writer keeps trying to store what is queued while the database is
/// away; then the rest goes to the log. With the default `server.shutdown_grace` (30 s)
/// this stays inside the 40 s the systemd unit allows for a stop.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Why the trail could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A filter does not parse.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The database failed.
    #[error("audit store: {0}")]
    Store(#[from] sqlx::Error),
}

/// One audit event, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who: `user:<sub>`, `client:<id>`, `operator:cli:<user>`, `instance:<addr>`.
    pub actor: String,
    /// What, dotted: `key.transition`, `token.issue`, …
    pub action: String,
    /// What it was done to (a kid, a client id, a token id, …).
    pub target: String,
    /// From where, when a request caused it.
    pub source_ip: Option<String>,
    /// Details (JSON), secret-free.
    pub detail: Detail,
}

/// An event's details: a JSON object, serialised once, when the event is made. A hot
/// event (`token.issue`, tens of thousands a second) is written straight from a typed
/// struct with [`Detail::of`]; every other event may build a `serde_json::Value`
/// (`json!({…}).into()`), whose keys serialise sorted.
#[derive(Debug, Clone)]
pub struct Detail(Option<Box<serde_json::value::RawValue>>);

impl Detail {
    /// `value` serialised (a struct's fields in declaration order: keep them sorted, as a
    /// `Value`'s keys are). What cannot be serialised (a map with non-string keys) is `{}`.
    pub fn of<T: Serialize>(value: &T) -> Self {
        Self(serde_json::value::to_raw_value(value).ok())
    }

    /// The JSON text, as stored and hashed.
    pub fn as_str(&self) -> &str {
        self.0
            .as_deref()
            .map_or("{}", serde_json::value::RawValue::get)
    }
}

impl From<serde_json::Value> for Detail {
    fn from(value: serde_json::Value) -> Self {
        Self::of(&value)
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Detail {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(serializer),
            None => serde::ser::SerializeMap::end(serializer.serialize_map(Some(0))?),
        }
    }
}

/// One stored record: an event and its place in the chain. This is what the admin API,
/// `portcullis audit list` and the sink show.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Chain position: 1, 2, 3, … with no gap.
    pub seq: i64,
    /// When (millisecond precision, RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// When, in milliseconds since the Unix epoch: the value that is hashed.
    pub at_unix_ms: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// From where.
    pub source_ip: Option<String>,
    /// Details. Hashed as their compact serialisation with keys sorted.
    pub detail: serde_json::Value,
    /// The hash of record `seq - 1`.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
    /// The version of the hash encoding.
    pub hash_version: i32,
}

impl From<chain::Row> for AuditRecord {
    fn from(r: chain::Row) -> Self {
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.at_unix_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Self {
            seq: r.seq,
            at,
            at_unix_ms: r.at_unix_ms,
            actor: r.actor,
            action: r.action,
            target: r.target,
            source_ip: r.source_ip,
            // stored by us as JSON; text that no longer parses is shown as a string
            detail: serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::String(r.detail)),
            prev_hash: r.prev_hash,
            hash: r.hash,
            hash_version: r.hash_version,
        }
    }
}

/// Records audit events. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<AuditEvent>,
    /// `portcullis_audit_dropped_total`, looked up once at start: a flood of drops (a
    /// full queue at tens of thousands of events a second) pays no registry look-up each.
    dropped: metrics::Counter,
    /// The events the writer has taken off the queue and not yet stored or given up: the
    /// batch of the append under way (up to [`CATCH_UP_BATCH`]), which waits as long as a
    /// stalled database does. Set by the writer, read at each scrape.
    held: Arc<AtomicUsize>,
}

/// The writer's metric handles, looked up in the registry once, when the writer starts,
/// rather than at every append.
struct Meters {
    /// `portcullis_audit_append_seconds`: every [`chain::append`], failed ones included,
    /// so that a stalled database shows as slow appends while it stalls.
    append_seconds: metrics::Histogram,
    /// `portcullis_audit_append_events`: the events each append took.
    append_events: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        Self {
            append_seconds: metrics::histogram!("portcullis_audit_append_seconds"),
            append_events: metrics::histogram!("portcullis_audit_append_events"),
        }
    }
}

// === impl Audit ===

impl Audit {
    /// Starts the writer over `db`, with a queue of `config.queue_capacity` events,
    /// streaming stored records to `config.sink`. It stops when `stop` is cancelled —
    /// cancel it once nothing records any more (the listeners have returned), since later
    /// events are only logged — or when every handle is dropped, after storing what is
    /// queued (for at most [`DRAIN_DEADLINE`]).
    ///
    /// The writer's metric handles, and the dropped-events counter, are looked up here:
    /// install the metrics recorder (`telemetry::metrics_handle`) first, or they record
    /// nothing.
    pub fn start(
        db: Database,
        config: &AuditConfig,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        // validated at load; `max` only keeps `channel` from panicking on a zero
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let sink = sink::Sink::new(&config.sink);
        let held = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(writer(db, rx, Arc::clone(&held), sink, Meters::new(), stop));
        let dropped = metrics::counter!("portcullis_audit_dropped_total");
        (Self { tx, dropped, held }, task)
    }

    /// Sets `portcullis_audit_queue_events` (the events not stored yet: those waiting in
    /// the queue and the batch the writer has taken off it for the append under way, at
    /// most [`CATCH_UP_BATCH`]), `portcullis_audit_queue_held_events` (that batch alone)
    /// and `portcullis_audit_queue_capacity` (the queue's, which the held batch does not
    /// take from) as they are now. Called at every scrape: the request path does not pay
    /// for it, and the figures are current even while the writer is stuck in an append,
    /// which is when the queue fills and the held batch is the largest. The first two are
    /// set from one reading of the held count, so their difference is the queue's fill.
    pub fn record_metrics(&self) {
        let capacity = self.tx.max_capacity();
        let waiting = capacity.saturating_sub(self.tx.capacity());
        let held = self.held.load(Ordering::Relaxed);
        metrics::gauge!("portcullis_audit_queue_events").set(waiting.saturating_add(held) as f64);
        metrics::gauge!("portcullis_audit_queue_held_events").set(held as f64);
        metrics::gauge!("portcullis_audit_queue_capacity").set(capacity as f64);
    }

    /// Records `event`: queued at once, stored and streamed as soon as the database takes
    /// it. Never waits.
    pub fn record(&self, event: AuditEvent) {
        if let Err(e) = self.tx.try_send(event) {
            let (event, why) = match e {
                mpsc::error::TrySendError::Full(event) => (event, "the audit queue is full"),
                mpsc::error::TrySendError::Closed(event) => (event, "the audit writer has stopped"),
            };
            self.dropped.increment(1);
            log_unstored(&event, why);
        }
    }
}

/// Appends what is queued, batch by batch, keeping `held` at the size of the batch it has
/// taken off the queue and not yet stored (see [`Audit::record_metrics`]).
async fn writer(
    db: Database,
    mut rx: mpsc::Receiver<AuditEvent>,
    held: Arc<AtomicUsize>,
    mut sink: sink::Sink,
    meters: Meters,
    stop: CancellationToken,
) {
    // DRAIN_DEADLINE after `stop`, `cut` is cancelled: a write still waiting for the
    // database then is abandoned, whether it started before `stop` or after
    let cut = CancellationToken::new();
    let _timer = AbortOnDropHandle::new(tokio::spawn({
        let (stop, cut) = (stop.clone(), cut.clone());
        async move {
            stop.cancelled().await;
            tokio::time::sleep(DRAIN_DEADLINE).await;
            cut.cancel();
        }
    }));
    let mut hup = hangup();
    let most = most_per_append(&db);
    let mut batch: Vec<AuditEvent> = Vec::with_capacity(BATCH);
    'run: loop {
        if batch.is_empty() {
            let first = tokio::select! {
                () = stop.cancelled() => break 'run,
                () = next_hangup(&mut hup) => {
                    sink.reopen();
                    continue 'run;
                }
                e = rx.recv() => match e { Some(e) => e, None => break 'run },
            };
            batch.push(first);
            held.store(batch.len(), Ordering::Relaxed);
            // linger until a full batch waits or LINGER has passed: at high rates, fewer
            // and fuller transactions. The queue's length is looked at every millisecond
            // rather than awaited, so the request path's `try_send` does not wake this
            // task (and the thread it sleeps on) once per event.
            let until = tokio::time::Instant::now() + LINGER;
            while rx.len() + 1 < BATCH && tokio::time::Instant::now() < until {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(LINGER_STEP) => {}
                }
            }
            take(&mut rx, &mut batch, most, &held);
        }
        // right after start-up the schema may still be migrating: wait for it quietly
        while !db.is_migrated() {
            tokio::select! {
                () = stop.cancelled() => break 'run,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let mut delay = Duration::from_millis(100);
        loop {
            let written = tokio::select! {
                biased;
                written = write(&db, &mut batch, &held, &mut sink, &meters) => written,
                () = cut.cancelled() => break 'run,
            };
            let Err(e) = written else { break };
            metrics::counter!("portcullis_audit_write_failures_total").increment(1);
            tracing::warn!(error = %e, events = batch.len(), "audit write failed; retrying");
            tokio::select! {
                () = stop.cancelled() => break 'run,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
    // told to stop, or every handle is gone: either way the drain has DRAIN_DEADLINE
    stop.cancel();
    drain(&db, &mut rx, batch, &held, &mut sink, &meters, &cut).await;
}

/// Moves queued events into `batch` until it holds `most`, and sets `held` to what it
/// holds.
fn take(
    rx: &mut mpsc::Receiver<AuditEvent>,
    batch: &mut Vec<AuditEvent>,
    most: usize,
    held: &AtomicUsize,
) {
    while batch.len() < most {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => break,
        }
    }
    held.store(batch.len(), Ordering::Relaxed);
}

/// Stops the queue and stores what is in it (and `batch`, taken from it already),
/// retrying while the database is away until `cut` is cancelled; what is left then is
/// logged whole. An event both stored and logged is possible (a write abandoned at the
/// deadline may have committed), an event neither is not.
async fn drain(
    db: &Database,
    rx: &mut mpsc::Receiver<AuditEvent>,
    mut batch: Vec<AuditEvent>,
    held: &AtomicUsize,
    sink: &mut sink::Sink,
    meters: &Meters,
    cut: &CancellationToken,
) {
    // from here on `record` logs instead of queueing
    rx.close();
    let mut delay = Duration::from_millis(100);
    let most = most_per_append(db);
    // the migration task has stopped with the listeners: an unmigrated schema stays so
    while db.is_migrated() && !cut.is_cancelled() {
        take(rx, &mut batch, most, held);
        if batch.is_empty() {
            return;
        }
        let e = tokio::select! {
            biased;
            written = write(db, &mut batch, held, sink, meters) => match written {
                Ok(()) => continue,
                Err(e) => e,
            },
            () = cut.cancelled() => break,
        };
        metrics::counter!("portcullis_audit_write_failures_total").increment(1);
        tracing::warn!(error = %e, events = batch.len(), "audit write failed at shutdown; retrying");
        tokio::select! {
            () = cut.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    let left = batch.len() + rx.len();
    if left > 0 {
        tracing::error!(
            events = left,
            "the database did not take the audit events queued at shutdown; they are kept only in the log"
        );
    }
    for event in batch
        .into_iter()
        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
    {
        log_unstored(&event, "the database was away at shutdown");
    }
    held.store(0, Ordering::Relaxed);
}

/// Appends `batch` to the chain, streams what was stored and leaves `batch` empty. An
/// event the database refuses for its content ([`refused_for_its_content`]) is isolated
/// by splitting the batch until it stands alone, then set aside ([`set_aside`]), so that
/// it cannot hold the events behind it. On any other error (the database is away) the
/// events not yet stored stay in `batch`, to be retried. Either way `held` is left at what
/// `batch` still holds.
async fn write(
    db: &Database,
    batch: &mut Vec<AuditEvent>,
    held: &AtomicUsize,
    sink: &mut sink::Sink,
    meters: &Meters,
) -> Result<(), sqlx::Error> {
    // the parts of `batch` still to append, the next one last: everything before the
    // next one has been stored or set aside, so the chain keeps the recorded order
    let mut todo: Vec<Range<usize>> = Vec::new();
    todo.push(0..batch.len());
    while let Some(part) = todo.pop() {
        let Some(events) = batch.get(part.clone()) else {
            continue;
        };
        let started = std::time::Instant::now();
        let appended = chain::append(db, events).await;
        meters.append_seconds.record(started.elapsed());
        meters.append_events.record(events.len() as f64);
        match appended {
            Ok(rows) => stored(sink, rows),
            Err(e) if refused_for_its_content(&e) => match events {
                [event] => set_aside(event, &e),
                _ => {
                    let middle = part.start + part.len() / 2;
                    todo.push(middle..part.end);
                    todo.push(part.start..middle);
                }
            },
            Err(e) => {
                batch.drain(..part.start);
                held.store(batch.len(), Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    batch.clear();
    held.store(0, Ordering::Relaxed);
    Ok(())
}

/// Whether the database refused an append for what its events contain, so that the same
/// events would be refused however often they were retried: on Postgres SQLSTATE class
/// 22 (data exception: a NUL in text, a value out of range) or class 54 (program limit
/// exceeded: a value too large for an index); a CHECK or NOT NULL violation; SQLite's
/// SQLITE_TOOBIG; a value the driver could not encode. Everything else — a lost
/// connection, a timeout, a unique violation (which would say the chain head is wrong,
/// not the event) — is retried.
fn refused_for_its_content(e: &sqlx::Error) -> bool {
    use sqlx::error::ErrorKind;
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(d) => {
            matches!(
                d.kind(),
                ErrorKind::CheckViolation | ErrorKind::NotNullViolation
            ) || match d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                Some(pg) => matches!(pg.code().get(..2), Some("22" | "54")),
                // SQLITE_TOOBIG
                None => d.code().as_deref() == Some("18"),
            }
        }
        _ => false,
    }
}

/// An event the database refused for its content: counted, and logged whole with the
/// database's reason (its SQLSTATE and message, never a connection detail or a secret:
/// events carry none).
fn set_aside(event: &AuditEvent, e: &sqlx::Error) {
    metrics::counter!("portcullis_audit_refused_total").increment(1);
    let code = match e {
        sqlx::Error::Database(d) => d.code().map(std::borrow::Cow::into_owned),
        _ => None,
    };
    tracing::error!(
        target: "audit",
        actor = %event.actor.escape_debug(),
        action = %event.action.escape_debug(),
        target_id = %event.target.escape_debug(),
        source_ip = %event.source_ip.as_deref().unwrap_or("-").escape_debug(),
        detail = %event.detail,
        code = code.as_deref().unwrap_or("-"),
        error = %e,
        "the database refused an audit event for its content; kept only in this log line"
    );
}

/// Logs an event that will not be stored, whole: the log line is the only copy left.
fn log_unstored(event: &AuditEvent, why: &'static str) {
    tracing::error!(
        target: "audit",
        actor = %event.actor.escape_debug(),
        action = %event.action.escape_debug(),
        target_id = %event.target.escape_debug(),
        source_ip = %event.source_ip.as_deref().unwrap_or("-").escape_debug(),
        detail = %event.detail,
        why,
        "audit event not stored; kept only in this log line"
    );
}

/// After a batch is committed: counted, streamed, logged at debug. The rows become
/// [`AuditRecord`]s (their detail parsed back) only when something reads them.
fn stored(sink: &mut sink::Sink, rows: Vec<chain::Row>) {
    metrics::counter!("portcullis_audit_records_total").increment(rows.len() as u64);
    let debug = tracing::enabled!(target: "audit", tracing::Level::DEBUG);
    if !sink.is_enabled() && !debug {
        return;
    }
    let records: Vec<AuditRecord> = rows.into_iter().map(AuditRecord::from).collect();
    sink.write(&records);
    if debug {
        for r in &records {
            tracing::debug!(
                target: "audit",
                seq = r.seq,
                actor = %r.actor.escape_debug(),
                action = %r.action.escape_debug(),
                target_id = %r.target.escape_debug(),
                source_ip = %r.source_ip.as_deref().unwrap_or("-").escape_debug(),
                detail = %r.detail,
                "audit"
            );
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup() -> Hangup {
    None
}

/// Resolves on SIGHUP; never when signals are unavailable.
async fn next_hangup(hup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = hup
        && s.recv().await.is_some()
    {
        return;
    }
    let _ = hup;
    std::future::pending::<()>().await;
}

/// Why [`store`] did not do all it should. The messages continue "…, but ".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not take the record.
    #[error("its audit record was not stored: {0}")]
    Store(#[from] sqlx::Error),
    /// The record is stored, but the sink did not take its line.
    #[error("its audit record (seq {seq}) was stored but not written to the audit sink: {source}")]
    Sink {
        /// The stored record.
        seq: i64,
        /// Why the sink failed.
        source: std::io::Error,
    },
}

/// Stores one event now (the CLI, which has no background writer), then, as an instance's
/// writer does, appends its record to a file sink (`[audit] sink = "file:…"`), so that the
/// sink holds every seq. A `stdout` sink is not written: the CLI's standard output is its
/// command's output, not the stream the instance's log shipper reads.
pub async fn store(db: &Database, sink: &AuditSinkKind, e: &AuditEvent) -> Result<(), StoreError> {
    let rows = chain::append(db, std::slice::from_ref(e)).await?;
    if !matches!(sink, AuditSinkKind::File(_)) {
        return Ok(());
    }
    let records: Vec<AuditRecord> = rows.into_iter().map(AuditRecord::from).collect();
    sink::Sink::existing(sink)
        .try_write(&records)
        .map_err(|source| StoreError::Sink {
            seq: records.first().map_or(0, |r| r.seq),
            source,
        })
}

/// Reads back recent events of one action, newest first (tests).
pub async fn recent(
    db: &Database,
    action: &str,
    limit: i64,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    const SQL: &str = "SELECT actor, target, detail FROM audit_events WHERE action = $1 \
                       ORDER BY id DESC LIMIT $2";
    let rows: Vec<(String, String, String)> = crate::on_pool!(db.pool(), |p| {
        sqlx::query_as(SQL)
            .bind(action)
            .bind(limit)
            .fetch_all(p)
            .await?
    });
    Ok(rows)
}

#[cfg(test)]
mod detail_tests {
    use super::Detail;

    #[test]
    fn a_detail_is_its_json_text_and_serialises_as_that_json() {
        let d: Detail = serde_json::json!({ "b": [1, "x\ny"], "a": null }).into();
        assert_eq!(d.as_str(), r#"{"a":null,"b":[1,"x\ny"]}"#);
        assert_eq!(d.to_string(), d.as_str());
        #[derive(serde::Serialize)]
        struct Event {
            detail: Detail,
        }
        let text = serde_json::to_string(&Event { detail: d }).ok();
        assert_eq!(
            text.as_deref(),
            Some(r#"{"detail":{"a":null,"b":[1,"x\ny"]}}"#)
        );
        // what cannot be JSON (a map with non-string keys) is an empty object
        let odd = std::collections::BTreeMap::from([((1, 2), 3)]);
        let d = Detail::of(&odd);
        assert_eq!(d.as_str(), "{}");
        assert_eq!(
            serde_json::to_string(&Event { detail: d }).ok().as_deref(),
            Some(r#"{"detail":{}}"#)
        );
    }
}

#[cfg(test)]
mod record_tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use time::OffsetDateTime;
    use tokio_util::sync::CancellationToken;

    use super::{Audit, AuditEvent};
    use crate::config::{AuditConfig, DatabaseConfig};
    use crate::db::Database;

    /// A recorder that counts the look-ups of `portcullis_audit_dropped_total` and what
    /// the handles they return count; every other metric is a no-op.
    #[derive(Default)]
    struct DroppedLookups {
        lookups: AtomicUsize,
        dropped: Arc<AtomicU64>,
    }

    impl metrics::Recorder for DroppedLookups {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            if key.name() != "portcullis_audit_dropped_total" || key.labels().next().is_some() {
                return Counter::noop();
            }
            self.lookups.fetch_add(1, Ordering::Relaxed);
            Counter::from_arc(Arc::clone(&self.dropped))
        }

        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// A database that is never reached: the writer waits for its schema.
    fn unreached() -> Database {
        Database::connect_lazy(&DatabaseConfig {
            url: "sqlite::memory:".to_owned().into(),
            max_connections: 1,
            min_connections: 0,
            acquire_timeout: std::time::Duration::from_secs(1),
        })
        .unwrap()
    }

    fn event(n: usize) -> AuditEvent {
        AuditEvent {
            at: OffsetDateTime::now_utc(),
            actor: "operator:test".to_owned(),
            action: "test.flood".to_owned(),
            target: n.to_string(),
            source_ip: None,
            detail: serde_json::json!({}).into(),
        }
    }

    /// A flood of drops pays no registry look-up each: the counter is looked up once,
    /// at start, and every drop is still counted under the same name, without labels.
    #[tokio::test]
    async fn a_flood_of_dropped_events_is_counted_without_a_look_up_each() {
        let recorder = DroppedLookups::default();
        let config = AuditConfig {
            queue_capacity: 1,
            ..AuditConfig::default()
        };
        metrics::with_local_recorder(&recorder, || {
            let (audit, _writer) = Audit::start(unreached(), &config, CancellationToken::new());
            // the writer is not polled before this test awaits (one thread): the queue of
            // one is full after the first event, and the 1,000 after it are dropped
            for n in 0..=1_000 {
                audit.record(event(n));
            }
        });
        assert_eq!(
            recorder.dropped.load(Ordering::Relaxed),
            1_000,
            "drops counted"
        );
        assert_eq!(
            recorder.lookups.load(Ordering::Relaxed),
            1,
            "look-ups of portcullis_audit_dropped_total"
        );
    }
}
