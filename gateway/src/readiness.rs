//! `/readyz`: is every dependency this instance needs answering right now?
//!
//! Checks run concurrently, each bounded by a short deadline, so a hung dependency makes
//! the instance not-ready quickly instead of hanging the probe.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::state::AppState;

/// How long one check may take.
const CHECK_DEADLINE: Duration = Duration::from_secs(2);

/// The readiness report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every check passed.
    pub ready: bool,
    /// `ready` or `degraded`.
    pub status: &'static str,
    /// One entry per dependency.
    pub checks: BTreeMap<&'static str, Check>,
}

/// One dependency's state.
#[derive(Debug, Serialize)]
pub struct Check {
    /// It answered.
    pub ok: bool,
    /// Why not, in words safe to show (never a connection string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

async fn run<F, E>(name: &'static str, fut: F) -> (&'static str, Check)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let check = match tokio::time::timeout(CHECK_DEADLINE, fut).await {
        Ok(Ok(())) => Check {
            ok: true,
            detail: None,
        },
        Ok(Err(e)) => {
            tracing::warn!(dependency = name, error = %e, "readiness check failed");
            Check {
                ok: false,
                detail: Some(if name == "keys" {
                    // the key service's reasons are written to be shown
                    e.to_string()
                } else {
                    "unreachable".to_owned()
                }),
            }
        }
        Err(_) => Check {
            ok: false,
            detail: Some("timed out".to_owned()),
        },
    };
    metrics::gauge!("portcullis_dependency_up", "dependency" => name).set(if check.ok {
        1.0
    } else {
        0.0
    });
    (name, check)
}

/// Runs every check.
pub async fn check(state: &AppState) -> Report {
    let db = run("database", state.db.ping());
    let redis = async {
        match &state.redis {
            Some(r) => Some(run("redis", r.ping()).await),
            None => None,
        }
    };
    let keys = run("keys", async { state.keys.readiness() });
    let (db, redis, keys) = tokio::join!(db, redis, keys);
    let mut checks = BTreeMap::new();
    checks.insert(db.0, db.1);
    checks.insert(keys.0, keys.1);
    if let Some((name, c)) = redis {
        checks.insert(name, c);
    }
    let ready = checks.values().all(|c| c.ok);
    Report {
        ready,
        status: if ready { "ready" } else { "degraded" },
        checks,
    }
}
