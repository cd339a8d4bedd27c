//! The audit trail: who did what, when, from where.
//!
//! Events are logged at once (target `audit`) and written to the `audit_events` table by a
//! background writer, which retries while the database is away so that a short outage
//! loses nothing; a bounded queue keeps memory bounded during a long one (overflow is
//! counted in `portcullis_audit_dropped_total` and logged). Events never carry secrets:
//! callers pass identifiers, never tokens or keys.

use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::Database;

/// How many events may wait for the database.
const QUEUE: usize = 10_000;

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who: `user:<sub>`, `client:<id>`, `operator:cli`, `instance:<addr>`.
    pub actor: String,
    /// What, dotted: `key.transition`, `key.rotate`, …
    pub action: String,
    /// What it was done to (a kid, a client id, …).
    pub target: String,
    /// From where, when a request caused it.
    pub source_ip: Option<String>,
    /// Details (JSON), secret-free.
    pub detail: serde_json::Value,
}

/// Records audit events. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<AuditEvent>,
}

impl Audit {
    /// Starts the writer over `db`; it stops when `stop` is cancelled, after draining
    /// what it can.
    pub fn start(db: Database, stop: CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(writer(db, rx, stop));
        (Self { tx }, task)
    }

    /// Records `event`: logged now, stored as soon as the database takes it.
    pub fn record(&self, event: AuditEvent) {
        tracing::info!(
            target: "audit",
            actor = %event.actor,
            action = %event.action,
            target_id = %event.target,
            source_ip = event.source_ip.as_deref().unwrap_or("-"),
            detail = %event.detail,
            "audit"
        );
        if let Err(e) = self.tx.try_send(event) {
            metrics::counter!("portcullis_audit_dropped_total").increment(1);
            tracing::error!(error = %e, "audit queue full; event kept only in the log");
        }
    }
}

async fn writer(db: Database, mut rx: mpsc::Receiver<AuditEvent>, stop: CancellationToken) {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        // right after start-up the schema may still be migrating: wait for it quietly
        while !db.is_migrated() {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let mut delay = Duration::from_millis(100);
        loop {
            match insert(&db, &event).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "audit write failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    // shutting down: store what is already queued, once each
    while let Ok(event) = rx.try_recv() {
        if let Err(e) = insert(&db, &event).await {
            tracing::error!(error = %e, "audit write failed at shutdown; event kept only in the log");
        }
    }
}

/// Stores one event now (the CLI, which has no background writer).
pub async fn store(db: &Database, e: &AuditEvent) -> Result<(), sqlx::Error> {
    insert(db, e).await
}

async fn insert(db: &Database, e: &AuditEvent) -> Result<(), sqlx::Error> {
    if !db.is_migrated() {
        return Err(sqlx::Error::PoolTimedOut);
    }
    let at = i64::try_from(e.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    let detail = e.detail.to_string();
    const SQL: &str = "INSERT INTO audit_events (at_unix_ms, actor, action, target, source_ip, detail) \
                       VALUES ($1, $2, $3, $4, $5, $6)";
    crate::on_pool!(db.pool(), |p| {
        sqlx::query(SQL)
            .bind(at)
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.target)
            .bind(&e.source_ip)
            .bind(&detail)
            .execute(p)
            .await?;
    });
    Ok(())
}

/// Reads back recent events of one action, newest first (admin API, tests).
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
