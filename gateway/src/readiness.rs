//! `/readyz`: can this instance serve right now?
//!
//! Checks run concurrently, each bounded by a short deadline, so a hung dependency makes
//! the instance not-ready quickly instead of hanging the probe.
//!
//! Every dependency that does not answer is reported, but not every one makes the
//! instance not-ready: the key source (Vault) may be away while a key held can sign, as
//! instances keep signing and verifying with the ring they hold by design. Taking them
//! out of the load balancer for it would take out every instance at once. Such a check
//! is `degraded`: the instance stays ready (200) and its `status` says `degraded`.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyService;
use crate::state::AppState;

/// How long one check may take.
const CHECK_DEADLINE: Duration = Duration::from_secs(2);

/// The readiness report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// This instance can serve: every check passed or is only `degraded`. `/readyz`
    /// answers 200 when true, 503 when false.
    pub ready: bool,
    /// `ready` when every check passed, else `degraded` (whether or not the instance is
    /// still ready).
    pub status: &'static str,
    /// One entry per dependency.
    pub checks: BTreeMap<&'static str, Check>,
}

/// One dependency's state.
#[derive(Debug, Serialize)]
pub struct Check {
    /// It answered.
    pub ok: bool,
    /// It did not answer, and this instance serves without it for now: it stays ready.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
    /// Why not, in words safe to show (never a connection string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Check {
    fn passed() -> Self {
        Self {
            ok: true,
            degraded: false,
            detail: None,
        }
    }

    fn failed(detail: String) -> Self {
        Self {
            ok: false,
            degraded: false,
            detail: Some(detail),
        }
    }

    /// Whether this check lets the instance serve.
    fn serves(&self) -> bool {
        self.ok || self.degraded
    }
}

/// Why one timed call failed.
enum Failure {
    /// It answered with an error (kept for the log, never shown).
    Error(String),
    /// It did not answer within [`CHECK_DEADLINE`].
    TimedOut,
}

impl Failure {
    /// In words safe to show.
    fn detail(&self) -> &'static str {
        match self {
            Self::Error(_) => "unreachable",
            Self::TimedOut => "timed out",
        }
    }
}

/// Runs one check under [`CHECK_DEADLINE`].
async fn attempt<F, E>(fut: F) -> Result<(), Failure>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_DEADLINE, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::Error(e.to_string())),
        Err(_) => Err(Failure::TimedOut),
    }
}

async fn run<F, E>(name: &'static str, fut: F) -> (&'static str, Check)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let check = match attempt(fut).await {
        Ok(()) => Check::passed(),
        Err(failure) => {
            if let Failure::Error(e) = &failure {
                tracing::warn!(dependency = name, error = %e, "readiness check failed");
            }
            Check::failed(failure.detail().to_owned())
        }
    };
    (name, check)
}

/// The keys: not ready when no key held can sign; degraded (still ready) when a key can
/// sign but the key source fails. The key service's reasons are written to be shown.
fn keys(keys: &KeyService) -> Check {
    let problems: Vec<String> = [
        keys.source_problem(),
        keys.algorithm_problem(),
        keys.material_problem(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let problem = (!problems.is_empty()).then(|| problems.join("; "));
    match (keys.readiness(), problem) {
        (Err(why), problem) => {
            let detail = match problem {
                Some(p) => format!("{why}; {p}"),
                None => why.to_owned(),
            };
            tracing::warn!(dependency = "keys", detail, "readiness check failed");
            Check::failed(detail)
        }
        (Ok(()), Some(problem)) => {
            tracing::warn!(dependency = "keys", detail = problem, "serving degraded");
            Check {
                ok: false,
                degraded: true,
                detail: Some(problem),
            }
        }
        (Ok(()), None) => Check::passed(),
    }
}

/// Runs every check. Sets no metric: `portcullis_dependency_up` is kept by
/// [`probe_dependencies`] (database, Redis) and [`KeyService::record_metrics`] (keys),
/// whether or not anyone calls `/readyz`.
pub async fn check(state: &AppState) -> Report {
    let db = run("database", state.db.ping());
    let redis = async {
        match &state.redis {
            Some(r) => Some(run("redis", r.ping()).await),
            None => None,
        }
    };
    let (db, redis) = tokio::join!(db, redis);
    let mut checks = BTreeMap::new();
    checks.insert(db.0, db.1);
    checks.insert("keys", keys(&state.keys));
    if let Some((name, c)) = redis {
        checks.insert(name, c);
    }
    let ready = checks.values().all(Check::serves);
    let all_ok = checks.values().all(|c| c.ok);
    Report {
        ready,
        status: if all_ok { "ready" } else { "degraded" },
        checks,
    }
}

/// How often each instance checks its database and Redis for `portcullis_dependency_up`.
/// Nothing in the reference deployment calls `/readyz` (nginx checks passively), so the
/// gauge cannot wait for it; a scrape is not made to wait for the checks either.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Checks the database and Redis every `every`, each under [`CHECK_DEADLINE`], until
/// `stop`, and sets `portcullis_dependency_up` for them: its one writer for those two
/// labels. Logs when a dependency stops or starts answering, not at every failed check.
pub async fn probe_dependencies(state: AppState, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = BTreeMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let db = attempt(state.db.ping());
        let redis = async {
            match &state.redis {
                Some(r) => Some(attempt(r.ping()).await),
                None => None,
            }
        };
        let (db, redis) = tokio::select! {
            () = stop.cancelled() => return,
            both = async { tokio::join!(db, redis) } => both,
        };
        note("database", &db, &mut was_up);
        if let Some(redis) = redis {
            note("redis", &redis, &mut was_up);
        }
    }
}

/// Sets `portcullis_dependency_up` for `name`, and logs a change.
fn note(
    name: &'static str,
    outcome: &Result<(), Failure>,
    was_up: &mut BTreeMap<&'static str, bool>,
) {
    let up = outcome.is_ok();
    metrics::gauge!("portcullis_dependency_up", "dependency" => name).set(if up {
        1.0
    } else {
        0.0
    });
    match (was_up.insert(name, up), outcome) {
        (Some(true) | None, Err(Failure::Error(e))) => {
            tracing::warn!(dependency = name, error = %e, "dependency unreachable");
        }
        (Some(true) | None, Err(Failure::TimedOut)) => {
            tracing::warn!(dependency = name, deadline = ?CHECK_DEADLINE, "dependency did not answer in time");
        }
        (Some(false), Ok(())) => tracing::info!(dependency = name, "dependency answers again"),
        _ => {}
    }
}
