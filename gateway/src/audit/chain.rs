//! The hash chain: how a record is hashed, how a batch is appended without forking the
//! chain when several instances share the database, and how the chain is verified.
//!
//! Record `seq` (1, 2, 3, … with no gap) stores `prev_hash`, the `hash` of record
//! `seq - 1` (64 zeros for seq 1), and its own `hash`: SHA-256 over the canonical
//! encoding of version 1 — each of these fields as an 8-byte big-endian byte length
//! followed by its UTF-8 bytes, in this order:
//!
//! `"portcullis-audit-v1"`, seq (decimal), prev_hash (lower-case hex), at_unix_ms
//! (decimal), actor, action, target, source_ip (empty when absent), detail (the stored
//! JSON text: compact, keys sorted).
//!
//! What is stored, and so hashed, is what the database can hold: Postgres refuses a NUL
//! character in `text` (and `\u0000` in `jsonb`), so every NUL in a field, and in a
//! string or key of the detail, becomes U+FFFD (�) first ([`storable`],
//! [`storable_json`]): the stored row and its hash agree. A NUL is never meaningful in
//! what the trail records (a name, an address, a detail), only a way to make the
//! database refuse it.
//!
//! The one-row table `audit_chain_head` holds the last seq and hash. An append locks that
//! row first (an `UPDATE` in the same transaction: a row lock on Postgres, the write lock
//! on SQLite), so appends from every instance are serialised and the chain never forks;
//! the head also lets `verify` notice records cut off the end. On Postgres the wait for
//! that lock is bounded (`BEGIN_POSTGRES`), so a holder that vanished shows as failing,
//! retried appends rather than as silence.

use std::borrow::Cow;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::AuditEvent;
use crate::db::{Database, Pool};

/// The version of the encoding new records are hashed with.
pub const HASH_VERSION: i32 = 1;

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The version tag, the first field of a version 1 encoding.
const V1_TAG: &str = "portcullis-audit-v1";

/// The hash of one record, version 1 (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn record_hash(
    seq: i64,
    prev_hash: &str,
    at_unix_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    source_ip: Option<&str>,
    detail: &str,
) -> String {
    let mut h = Sha256::new();
    let (seq, at) = (seq.to_string(), at_unix_ms.to_string());
    for field in [
        V1_TAG,
        &seq,
        prev_hash,
        &at,
        actor,
        action,
        target,
        source_ip.unwrap_or(""),
        detail,
    ] {
        // length-prefixed, so no choice of field values can shift a boundary
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// `text` as it is stored: every NUL replaced by U+FFFD (Postgres `text` cannot hold a NUL
/// and refuses the whole row, SQLSTATE 22021).
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// A detail's JSON text as it is stored: [`storable`], and every NUL in a string or a key
/// (`\u0000` in the text, which `jsonb` refuses: a SIEM's table, a query casting the
/// column) replaced by U+FFFD, the text then serialised again canonically (compact, keys
/// sorted, non-ASCII unescaped — a replaced key may sort elsewhere), so that an
/// independent verifier re-serialising the detail gets the hashed text back.
pub fn storable_json(json: &str) -> Cow<'_, str> {
    // serde_json writes a NUL only as this escape; the text may also hold it after an
    // escaped backslash (`\\u0000`, no NUL), which the parse tells apart
    if !json.contains("\\u0000") {
        return storable(json);
    }
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(mut value) => {
            if replace_nul(&mut value) {
                Cow::Owned(value.to_string())
            } else {
                storable(json)
            }
        }
        Err(_) => storable(json),
    }
}

/// Replaces every NUL in `value`'s strings and keys by U+FFFD; whether there was one.
fn replace_nul(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => {
            *s = s.replace('\0', "\u{FFFD}");
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |any, v| replace_nul(v) | any),
        Value::Object(map) => {
            let mut any = false;
            *map = std::mem::take(map)
                .into_iter()
                .map(|(key, mut v)| {
                    any |= replace_nul(&mut v);
                    if key.contains('\0') {
                        any = true;
                        (key.replace('\0', "\u{FFFD}"), v)
                    } else {
                        (key, v)
                    }
                })
                .collect();
            any
        }
        Value::String(_) | Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// A stored record as the database holds it (`detail` as its exact text).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    /// Chain position.
    pub seq: i64,
    /// When, in milliseconds since the epoch.
    pub at_unix_ms: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// From where.
    pub source_ip: Option<String>,
    /// Details, the JSON text that was hashed.
    pub detail: String,
    /// The hash of the record before.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
    /// The encoding version of `hash`.
    pub hash_version: i32,
}

impl Row {
    /// The hash this row should have.
    pub fn expected_hash(&self) -> String {
        record_hash(
            self.seq,
            &self.prev_hash,
            self.at_unix_ms,
            &self.actor,
            &self.action,
            &self.target,
            self.source_ip.as_deref(),
            &self.detail,
        )
    }
}

/// The columns of [`Row`], in order, as a literal (so `COPY` can be built from it).
macro_rules! columns {
    () => {
        "seq, at_unix_ms, actor, action, target, source_ip, detail, prev_hash, hash, hash_version"
    };
}

/// The columns of [`Row`], in order.
pub(super) const COLUMNS: &str = columns!();

/// Appends rows on Postgres; the columns are [`COLUMNS`], in [`copy_text`]'s format.
const COPY: &str = concat!("COPY audit_events (", columns!(), ") FROM STDIN");

/// Begins an append on Postgres (one round trip, as a plain `BEGIN`): waiting longer than
/// 5 s for a lock — the head's, held by another instance — fails the append (SQLSTATE
/// 55P03), which the writer counts in `portcullis_audit_write_failures_total` and retries.
/// An instance that vanished inside an append (power cut, network gone) keeps holding the
/// head until Postgres notices it is gone; an unbounded wait would hold every instance's
/// trail behind it without a sign. SQLite's equivalent is the pool's 5 s busy timeout.
const BEGIN_POSTGRES: &str = "BEGIN; SET LOCAL lock_timeout = '5s'";

/// The longest an append may take on Postgres: the chain lock's 5 s and room for a slow
/// moment. A connection the database host left silent — it crashed, or a VIP moved to a
/// new primary — gets no reset and no answer, and the kernel keeps retransmitting for
/// about 15 min: without a deadline every record would wait that long behind it, and
/// the queue overflow. Past it the append fails (and is retried, on a new connection).
/// Should the commit have reached the database and only its answer been lost, the retry
/// stores the events a second time (each under its own `seq`): recorded twice, never lost.
const APPEND_DEADLINE: Duration = Duration::from_secs(15);

/// Appends `events` in one transaction, chained after the current head; returns the
/// stored rows. Either all are stored or none.
#[tracing::instrument(name = "db.audit.append", skip_all, fields(otel.kind = "client", records = events.len()))]
pub async fn append(db: &Database, events: &[AuditEvent]) -> Result<Vec<Row>, sqlx::Error> {
    if !db.is_migrated() {
        return Err(sqlx::Error::PoolTimedOut);
    }
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // the first statement of every append locks and reads the head, so appends from every
    // instance are serialised: on Postgres the row lock; on SQLite the write lock, taken
    // by a write so that no read snapshot can go stale before it
    const LOCK_HEAD: &str =
        "UPDATE audit_chain_head SET seq = seq WHERE id = 1 RETURNING seq, hash";
    const MOVE_HEAD: &str = "UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1";
    macro_rules! lock_head {
        ($tx:ident) => {
            sqlx::query_as::<_, (i64, String)>(LOCK_HEAD)
                .fetch_one(&mut *$tx)
                .await?
        };
    }
    macro_rules! move_head {
        ($tx:ident, $rows:ident) => {
            if let Some(last) = $rows.last() {
                sqlx::query(MOVE_HEAD)
                    .bind(last.seq)
                    .bind(&last.hash)
                    .execute(&mut *$tx)
                    .await?;
            }
        };
    }
    let rows = match db.pool() {
        Pool::Postgres(p) => {
            let mut conn = p.acquire().await?;
            let appended = tokio::time::timeout(APPEND_DEADLINE, async {
                let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN_POSTGRES).await?;
                let (seq, hash) = lock_head!(tx);
                let rows = chain_after(seq, hash, events);
                // COPY, not INSERT: Postgres spends about 5.5 µs of CPU per row on it
                // against about 9 µs for a prepared INSERT of unnested arrays (200,000
                // rows here), and the trail writes a row per token issued
                let mut copy = tx.copy_in_raw(COPY).await?;
                copy.send(copy_text(&rows).into_bytes()).await?;
                copy.finish().await?;
                move_head!(tx, rows);
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows)
            })
            .await;
            match appended {
                Ok(rows) => rows?,
                Err(_) => {
                    // a connection that stopped answering is given up without a word to
                    // the server (the pool would ping it first, and wait as long), and
                    // the pool opens another
                    drop(conn.detach());
                    return Err(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into()));
                }
            }
        }
        Pool::Sqlite(p) => {
            let mut tx = p.begin().await?;
            let (seq, hash) = lock_head!(tx);
            let rows = chain_after(seq, hash, events);
            let mut insert =
                sqlx::QueryBuilder::new(format!("INSERT INTO audit_events ({COLUMNS}) "));
            insert.push_values(&rows, |mut b, r| {
                b.push_bind(r.seq)
                    .push_bind(r.at_unix_ms)
                    .push_bind(&r.actor)
                    .push_bind(&r.action)
                    .push_bind(&r.target)
                    .push_bind(&r.source_ip)
                    .push_bind(&r.detail)
                    .push_bind(&r.prev_hash)
                    .push_bind(&r.hash)
                    .push_bind(r.hash_version);
            });
            insert.build().execute(&mut *tx).await?;
            move_head!(tx, rows);
            tx.commit().await?;
            rows
        }
    };
    Ok(rows)
}

/// `rows` in `COPY`'s text format: a line per row, columns in [`COLUMNS`] order separated
/// by tabs, `\N` for NULL, and a backslash, tab, newline or carriage return in a value
/// escaped so that no value can end its field or row early.
fn copy_text(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(rows.len() * 384);
    for r in rows {
        let _ = write!(out, "{}\t{}\t", r.seq, r.at_unix_ms);
        copy_field(&mut out, &r.actor);
        copy_field(&mut out, &r.action);
        copy_field(&mut out, &r.target);
        match &r.source_ip {
            Some(ip) => copy_field(&mut out, ip),
            None => out.push_str("\\N\t"),
        }
        copy_field(&mut out, &r.detail);
        copy_field(&mut out, &r.prev_hash);
        copy_field(&mut out, &r.hash);
        let _ = writeln!(out, "{}", r.hash_version);
    }
    out
}

/// Appends `value` to `out` as one `COPY` text field, and the tab that ends it: a
/// backslash, tab, newline or carriage return escaped, everything else as it is. The runs
/// between those four are copied whole rather than character by character (the detail
/// JSON, a hundred bytes or more per token issued, usually is one run).
fn copy_field(out: &mut String, value: &str) {
    // the start of the run not yet copied
    let mut plain = 0;
    for (at, byte) in value.bytes().enumerate() {
        let escaped = match byte {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        // the four are ASCII, and no byte of a multi-byte UTF-8 character is: `plain` and
        // `at` are always character boundaries
        out.push_str(&value[plain..at]);
        out.push_str(escaped);
        plain = at + 1;
    }
    out.push_str(&value[plain..]);
    out.push('\t');
}

/// The rows `events` become after a head at (`seq`, `hash`): each field as it is stored
/// ([`storable`]), hashed as stored.
fn chain_after(mut seq: i64, mut prev: String, events: &[AuditEvent]) -> Vec<Row> {
    events
        .iter()
        .map(|e| {
            seq += 1;
            let at_unix_ms =
                i64::try_from(e.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
            let actor = storable(&e.actor).into_owned();
            let action = storable(&e.action).into_owned();
            let target = storable(&e.target).into_owned();
            let source_ip = e
                .source_ip
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| storable(s).into_owned());
            let detail = storable_json(e.detail.as_str()).into_owned();
            let hash = record_hash(
                seq,
                &prev,
                at_unix_ms,
                &actor,
                &action,
                &target,
                source_ip.as_deref(),
                &detail,
            );
            Row {
                seq,
                at_unix_ms,
                actor,
                action,
                target,
                source_ip,
                detail,
                prev_hash: std::mem::replace(&mut prev, hash.clone()),
                hash,
                hash_version: HASH_VERSION,
            }
        })
        .collect()
}

// === verification ===

/// Where and how the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// A record's content does not match its hash: it was altered.
    #[error("seq {seq}: hash mismatch (the record was altered after it was written)")]
    HashMismatch {
        /// The altered record.
        seq: i64,
    },
    /// A position is missing: the record was deleted.
    #[error("seq {seq}: missing (gap: the next record is seq {next})")]
    Gap {
        /// The first missing position.
        seq: i64,
        /// The position found instead.
        next: i64,
    },
    /// A record does not point at the hash of the one before it.
    #[error("seq {seq}: prev mismatch (prev_hash is not the hash of seq {})", seq - 1)]
    PrevMismatch {
        /// The record whose link is wrong.
        seq: i64,
    },
    /// A record uses an encoding this version does not know.
    #[error("seq {seq}: unknown hash version {version}")]
    UnknownVersion {
        /// The record.
        seq: i64,
        /// Its version.
        version: i32,
    },
    /// The chain ends before the head says it does: records were cut off the end.
    #[error("seq {seq}: missing (truncated: the chain head is at seq {head}, the last record is seq {last})", seq = last + 1)]
    Truncated {
        /// Where the head is.
        head: i64,
        /// The last record found.
        last: i64,
    },
    /// The head does not match the last record.
    #[error("seq {seq}: the chain head (seq {head_seq}) does not match the last record")]
    HeadMismatch {
        /// The last record.
        seq: i64,
        /// Where the head is.
        head_seq: i64,
    },
    /// A record was added outside the chain (no position).
    #[error("record id {id} has no chain position (added outside the chain)")]
    Unchained {
        /// Its row id.
        id: i64,
    },
    /// The chain head row is gone.
    #[error("the chain head (audit_chain_head) is missing")]
    NoHead,
}

impl ChainBreak {
    /// The first broken position, when there is one.
    pub fn seq(&self) -> Option<i64> {
        match self {
            Self::HashMismatch { seq }
            | Self::Gap { seq, .. }
            | Self::PrevMismatch { seq }
            | Self::UnknownVersion { seq, .. }
            | Self::HeadMismatch { seq, .. } => Some(*seq),
            Self::Truncated { last, .. } => Some(last + 1),
            Self::Unchained { .. } | Self::NoHead => None,
        }
    }
}

/// An intact chain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Intact {
    /// Chained records checked.
    pub records: i64,
    /// Records from before the chain existed (not chained, not checked).
    pub legacy: i64,
    /// The hash of the last record (the genesis value when there is none).
    pub head_hash: String,
}

/// Rows read per round trip while verifying.
const PAGE: i64 = 1000;

/// Where a walk starts: after the record `seq`, whose hash was `hash` (the last record of
/// an archived and deleted range, as written down when it was archived).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct After {
    /// The last record not walked.
    pub seq: i64,
    /// Its hash (64 lowercase hex digits).
    pub hash: String,
}

/// Walks the whole chain in one consistent snapshot.
pub async fn verify(db: &Database) -> Result<Result<Intact, ChainBreak>, sqlx::Error> {
    verify_from(db, None).await
}

/// Walks the chain in one consistent snapshot from its start, or from `after` (the records
/// up to it archived and deleted): the first record walked must then be `after.seq + 1`
/// and link to `after.hash`. `Intact::records` counts the records walked.
#[tracing::instrument(name = "db.audit.verify", skip_all, fields(otel.kind = "client"))]
pub async fn verify_from(
    db: &Database,
    after: Option<&After>,
) -> Result<Result<Intact, ChainBreak>, sqlx::Error> {
    const HEAD: &str = "SELECT seq, hash, legacy_max_id FROM audit_chain_head WHERE id = 1";
    const UNCHAINED: &str = "SELECT MIN(id) FROM audit_events WHERE seq IS NULL AND id > $1";
    const LEGACY: &str = "SELECT COUNT(*) FROM audit_events WHERE seq IS NULL AND id <= $1";
    let page_sql =
        format!("SELECT {COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT {PAGE}");
    let outcome = crate::on_pool!(db.pool(), |p| {
        let mut tx = p.begin().await?;
        if db.backend() == "postgres" {
            // one snapshot for every read below, so appends meanwhile do not matter
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let head: Option<(i64, String, i64)> =
            sqlx::query_as(HEAD).fetch_optional(&mut *tx).await?;
        let Some((head_seq, head_hash, legacy_max_id)) = head else {
            return Ok(Err(ChainBreak::NoHead));
        };
        let mut walk = after.map_or_else(Walk::new, Walk::after);
        let first = walk.last;
        loop {
            let rows: Vec<Row> = sqlx::query_as(&page_sql)
                .bind(walk.last)
                .fetch_all(&mut *tx)
                .await?;
            let n = rows.len();
            for row in &rows {
                if let Err(b) = walk.step(row) {
                    return Ok(Err(b));
                }
            }
            if i64::try_from(n).unwrap_or(0) < PAGE {
                break;
            }
        }
        if let Err(b) = walk.finish(head_seq, &head_hash) {
            return Ok(Err(b));
        }
        let unchained: (Option<i64>,) = sqlx::query_as(UNCHAINED)
            .bind(legacy_max_id)
            .fetch_one(&mut *tx)
            .await?;
        if let (Some(id),) = unchained {
            return Ok(Err(ChainBreak::Unchained { id }));
        }
        let (legacy,): (i64,) = sqlx::query_as(LEGACY)
            .bind(legacy_max_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Intact {
            records: walk.last - first,
            legacy,
            head_hash: walk.prev,
        })
    });
    Ok(outcome)
}

/// The walk along the chain: what the next record must be.
struct Walk {
    last: i64,
    prev: String,
}

impl Walk {
    fn new() -> Self {
        Self {
            last: 0,
            prev: GENESIS.to_owned(),
        }
    }

    fn after(after: &After) -> Self {
        Self {
            last: after.seq,
            prev: after.hash.clone(),
        }
    }

    fn step(&mut self, row: &Row) -> Result<(), ChainBreak> {
        let expected = self.last + 1;
        if row.seq != expected {
            return Err(ChainBreak::Gap {
                seq: expected,
                next: row.seq,
            });
        }
        if row.hash_version != HASH_VERSION {
            return Err(ChainBreak::UnknownVersion {
                seq: row.seq,
                version: row.hash_version,
            });
        }
        // the content first: an altered record is named as such, even when the alteration
        // also rewrote its link
        if row.expected_hash() != row.hash {
            return Err(ChainBreak::HashMismatch { seq: row.seq });
        }
        if row.prev_hash != self.prev {
            return Err(ChainBreak::PrevMismatch { seq: row.seq });
        }
        self.last = row.seq;
        self.prev.clone_from(&row.hash);
        Ok(())
    }

    fn finish(&self, head_seq: i64, head_hash: &str) -> Result<(), ChainBreak> {
        if head_seq > self.last {
            return Err(ChainBreak::Truncated {
                head: head_seq,
                last: self.last,
            });
        }
        if head_seq != self.last || head_hash != self.prev {
            return Err(ChainBreak::HeadMismatch {
                seq: self.last,
                head_seq,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
