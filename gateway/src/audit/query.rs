//! Reading the trail: filters (parsed once, shared by the admin API and the CLI) and
//! pages ordered by seq, continued with an opaque cursor.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AuditRecord;
use super::chain::{COLUMNS, Row};
use crate::db::Database;

/// Records per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 100;
/// The most records per page.
pub const MAX_LIMIT: u32 = 1000;
/// Longest actor, target or action accepted in a filter.
const MAX_FILTER_LEN: usize = 256;

/// A filter as the caller wrote it (query string or command line).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilter {
    /// `login.success`, or a prefix `login.*`.
    pub action: Option<String>,
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact target.
    pub target: Option<String>,
    /// RFC 3339; records at or after.
    pub since: Option<String>,
    /// RFC 3339; records before.
    pub until: Option<String>,
    /// The cursor: records after this seq.
    pub after_seq: Option<String>,
    /// Records per page, 1 to 1000.
    pub limit: Option<String>,
}

/// Which actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionFilter {
    /// Exactly this action.
    Exact(String),
    /// Every action starting with this (it ends with the dot: `login.`).
    Prefix(String),
}

/// A checked filter.
#[derive(Debug, Clone)]
pub struct AuditFilter {
    /// Which actions.
    pub action: Option<ActionFilter>,
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact target.
    pub target: Option<String>,
    /// At or after.
    pub since: Option<OffsetDateTime>,
    /// Before.
    pub until: Option<OffsetDateTime>,
    /// Records after this seq (0: from the start).
    pub after_seq: i64,
    /// Records per page.
    pub limit: u32,
}

/// A filter that does not parse; names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct FilterError {
    /// The parameter.
    pub field: &'static str,
    /// Why.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> FilterError {
    FilterError {
        field,
        message: message.into(),
    }
}

// === impl AuditFilter ===

impl AuditFilter {
    /// Checks every parameter.
    pub fn parse(raw: RawFilter) -> Result<Self, FilterError> {
        let action = raw.action.map(|a| parse_action(&a)).transpose()?;
        let actor = raw.actor.map(|a| plain("actor", a)).transpose()?;
        let target = raw.target.map(|t| plain("target", t)).transpose()?;
        let since = raw.since.map(|s| instant("since", &s)).transpose()?;
        let until = raw.until.map(|s| instant("until", &s)).transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && u <= s
        {
            return Err(bad("until", "must be later than since"));
        }
        let after_seq = match raw.after_seq {
            None => 0,
            Some(c) => c
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad("after_seq", "not a cursor from a previous page"))?,
        };
        let limit = match raw.limit {
            None => DEFAULT_LIMIT,
            Some(l) => l
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| bad("limit", format!("an integer from 1 to {MAX_LIMIT}")))?,
        };
        Ok(Self {
            action,
            actor,
            target,
            since,
            until,
            after_seq,
            limit,
        })
    }
}

fn parse_action(a: &str) -> Result<ActionFilter, FilterError> {
    let (name, prefix) = match a.strip_suffix(".*") {
        Some(p) => (p, true),
        None => (a, false),
    };
    let ok = !name.is_empty()
        && name.len() <= MAX_FILTER_LEN
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if !ok {
        return Err(bad(
            "action",
            "an action (`login.success`) or a prefix ending in `.*` (`login.*`): dot-separated \
             words of a-z 0-9 _",
        ));
    }
    Ok(if prefix {
        ActionFilter::Prefix(format!("{name}."))
    } else {
        ActionFilter::Exact(name.to_owned())
    })
}

fn plain(field: &'static str, v: String) -> Result<String, FilterError> {
    if v.is_empty() || v.len() > MAX_FILTER_LEN {
        return Err(bad(field, format!("1 to {MAX_FILTER_LEN} bytes")));
    }
    if v.chars().any(char::is_control) {
        return Err(bad(field, "no control characters"));
    }
    Ok(v)
}

fn instant(field: &'static str, s: &str) -> Result<OffsetDateTime, FilterError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|_| bad(field, "not an RFC 3339 instant (e.g. 2026-11-29T22:00:00Z)"))
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// One page of records, oldest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Page {
    /// The records.
    pub records: Vec<AuditRecord>,
    /// Pass as `after_seq` for the next page; absent on the last page.
    pub next_after_seq: Option<String>,
}

/// The records `filter` selects, one page.
#[tracing::instrument(name = "db.audit.list", skip_all, fields(otel.kind = "client"))]
pub async fn list(db: &Database, filter: &AuditFilter) -> Result<Page, sqlx::Error> {
    // one text for both backends: an absent filter is a NULL parameter
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_events \
         WHERE seq > $1 \
           AND ($2 IS NULL OR action = $2) \
           AND ($3 IS NULL OR substr(action, 1, length($3)) = $3) \
           AND ($4 IS NULL OR actor = $4) \
           AND ($5 IS NULL OR target = $5) \
           AND ($6 IS NULL OR at_unix_ms >= $6) \
           AND ($7 IS NULL OR at_unix_ms < $7) \
         ORDER BY seq LIMIT $8"
    );
    let (exact, prefix) = match &filter.action {
        None => (None, None),
        Some(ActionFilter::Exact(a)) => (Some(a.as_str()), None),
        Some(ActionFilter::Prefix(p)) => (None, Some(p.as_str())),
    };
    // one more than asked: whether there is a next page
    let fetch = i64::from(filter.limit) + 1;
    let mut rows: Vec<Row> = crate::on_pool!(db.pool(), |p| {
        sqlx::query_as(&sql)
            .bind(filter.after_seq)
            .bind(exact)
            .bind(prefix)
            .bind(filter.actor.as_deref())
            .bind(filter.target.as_deref())
            .bind(filter.since.map(unix_ms))
            .bind(filter.until.map(unix_ms))
            .bind(fetch)
            .fetch_all(p)
            .await?
    });
    let more = rows.len() > filter.limit as usize;
    rows.truncate(filter.limit as usize);
    let next_after_seq = more
        .then(|| rows.last().map(|r| r.seq.to_string()))
        .flatten();
    Ok(Page {
        records: rows.into_iter().map(AuditRecord::from).collect(),
        next_after_seq,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn raw(f: impl FnOnce(&mut RawFilter)) -> Result<AuditFilter, FilterError> {
        let mut r = RawFilter::default();
        f(&mut r);
        AuditFilter::parse(r)
    }

    #[test]
    fn filters_parse_and_each_bad_one_is_named() {
        let f = raw(|r| r.action = Some("login.*".to_owned())).unwrap();
        assert_eq!(f.action, Some(ActionFilter::Prefix("login.".to_owned())));
        assert_eq!(f.limit, DEFAULT_LIMIT);
        for (set, field) in [
            (
                RawFilter {
                    action: Some("login*".into()),
                    ..Default::default()
                },
                "action",
            ),
            (
                RawFilter {
                    action: Some("LOGIN".into()),
                    ..Default::default()
                },
                "action",
            ),
            (
                RawFilter {
                    since: Some("yesterday".into()),
                    ..Default::default()
                },
                "since",
            ),
            (
                RawFilter {
                    limit: Some("0".into()),
                    ..Default::default()
                },
                "limit",
            ),
            (
                RawFilter {
                    limit: Some("1001".into()),
                    ..Default::default()
                },
                "limit",
            ),
            (
                RawFilter {
                    after_seq: Some("-1".into()),
                    ..Default::default()
                },
                "after_seq",
            ),
            (
                RawFilter {
                    actor: Some(String::new()),
                    ..Default::default()
                },
                "actor",
            ),
            (
                RawFilter {
                    since: Some("2026-11-29T00:00:00Z".into()),
                    until: Some("2026-11-28T00:00:00Z".into()),
                    ..Default::default()
                },
                "until",
            ),
        ] {
            assert_eq!(AuditFilter::parse(set).unwrap_err().field, field);
        }
    }
}
