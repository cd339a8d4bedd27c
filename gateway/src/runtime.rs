//! Portcullis's own runtime settings, kept in the config center like any application's
//! (environment `config_center.runtime_environment`, application `portcullis`) and
//! applied by every instance without a restart.
//!
//! | key | what it changes |
//! | --- | --- |
//! | `log.level` | the log filter (`info`, `portcullis=debug,info`, …) |
//! | `protection.auth_rate.burst`, `protection.auth_rate.replenish_every` | per-IP buckets of `/auth/*` |
//! | `protection.token_rate.burst`, `protection.token_rate.replenish_every` | per-IP buckets of `/oauth2/token` |
//! | `protection.lockout.free_failures`, `.max_failures`, `.account_max_failures`, `.backoff_base`, `.backoff_max`, `.lockout` | the failure counters' policy |
//! | `proxy.upstreams` | the admin nodes, comma-separated `http://host:port` (the proxy must be configured at start-up) |
//!
//! A key that is absent falls back to the configuration file's value, so removing it
//! undoes it. A release is applied whole or not at all: one unknown key or invalid value,
//! or a setting this instance cannot take (admin nodes while its proxy is off), and the
//! instance keeps what it had, logs why, and counts it in
//! `portcullis_runtime_settings_rejected_total`. Every check is made before anything
//! changes (`RuntimeSettings::stage`), then everything is put in force together
//! (`Staged::commit`).
//!
//! Writing the application takes `config:write:<env>:portcullis` or `portcullis:admin`;
//! an environment-wide `config:write:<env>` does not reach it (`config_api`).

use std::collections::BTreeMap;
use std::time::Duration;

use config_center::{AppName, Environment, Snapshot};
use tokio_util::sync::CancellationToken;

use crate::config_api::hub::STEP_DEADLINE;
use crate::protect::RateSettings;
use crate::protect::lockout::LockoutSettings;
use crate::protect::rate::Prepared;
use crate::proxy::upstream::Upstreams;
use crate::state::AppState;

/// The application name the settings live under.
pub const APP: &str = "portcullis";

/// The settings one release asks for, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSettings {
    /// The log filter.
    pub log_level: String,
    /// `/auth/*` buckets.
    pub auth_rate: RateSettings,
    /// `/oauth2/token` buckets.
    pub token_rate: RateSettings,
    /// Failure counters.
    pub lockout: LockoutSettings,
    /// The admin nodes the proxy forwards to.
    pub upstreams: Vec<String>,
}

impl RuntimeSettings {
    /// The configuration file's values: what an absent key means.
    pub fn baseline(state: &AppState) -> Self {
        Self::of_file(&state.config)
    }

    /// [`RuntimeSettings::baseline`] of a configuration.
    pub fn of_file(config: &crate::config::Config) -> Self {
        Self {
            log_level: config.log.level.clone(),
            auth_rate: config.protection.auth_rate,
            token_rate: config.protection.token_rate,
            lockout: config.protection.lockout.clone(),
            upstreams: config.proxy.upstreams.clone(),
        }
    }

    /// `baseline` with the release's keys applied; every refusal names the key.
    pub fn from_entries(
        baseline: &Self,
        entries: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut s = baseline.clone();
        for (key, value) in entries {
            let v = value.trim();
            match key.as_str() {
                "log.level" => {
                    crate::telemetry::check_log_level(v)?;
                    s.log_level = v.to_owned();
                }
                "protection.auth_rate.burst" => s.auth_rate.burst = number(key, v)?,
                "protection.auth_rate.replenish_every" => {
                    s.auth_rate.replenish_every = duration(key, v)?;
                }
                "protection.token_rate.burst" => s.token_rate.burst = number(key, v)?,
                "protection.token_rate.replenish_every" => {
                    s.token_rate.replenish_every = duration(key, v)?;
                }
                "protection.lockout.free_failures" => s.lockout.free_failures = number(key, v)?,
                "protection.lockout.max_failures" => s.lockout.max_failures = number(key, v)?,
                "protection.lockout.account_max_failures" => {
                    s.lockout.account_max_failures = number(key, v)?;
                }
                "protection.lockout.backoff_base" => s.lockout.backoff_base = duration(key, v)?,
                "protection.lockout.backoff_max" => s.lockout.backoff_max = duration(key, v)?,
                "protection.lockout.lockout" => s.lockout.lockout = duration(key, v)?,
                "proxy.upstreams" => {
                    s.upstreams = v
                        .split(',')
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_owned)
                        .collect();
                    crate::proxy::settings::check_upstreams(&s.upstreams)
                        .map_err(|(_, e)| format!("`{key}`: {e}"))?;
                    if s.upstreams.is_empty() {
                        return Err(format!("`{key}` names no admin node"));
                    }
                }
                other => return Err(format!("`{other}` is not a runtime setting")),
            }
        }
        for (name, r) in [
            ("protection.auth_rate", s.auth_rate),
            ("protection.token_rate", s.token_rate),
        ] {
            if r.burst == 0 || r.replenish_every.is_zero() {
                return Err(format!(
                    "{name}: burst and replenish_every must be greater than 0"
                ));
            }
        }
        s.lockout
            .validate()
            .map_err(|e| format!("protection.lockout: {e}"))?;
        Ok(s)
    }

    /// Readies these settings for this instance without changing anything: whatever can
    /// fail (a bucket that cannot be built, admin nodes while the proxy is off) fails
    /// here, so that [`Staged::commit`] puts all of them in force or none.
    fn stage(&self, state: &AppState) -> Result<Staged, String> {
        crate::telemetry::check_log_level(&self.log_level)?;
        let buckets = |name: &str, rate: &crate::protect::rate::SwappableRate, s| {
            rate.prepare(s)
                .ok_or_else(|| format!("{name}: the rate buckets could not be built"))
        };
        let auth = buckets("protection.auth_rate", &state.rate.auth, self.auth_rate)?;
        let token = buckets("protection.token_rate", &state.rate.token, self.token_rate)?;
        let introspection = buckets(
            "protection.token_rate",
            &state.rate.introspection,
            self.token_rate,
        )?;
        let upstreams = match &state.proxy {
            // an unchanged list keeps the nodes' health as it is
            Some(proxy) if !proxy.upstreams().same_nodes(&self.upstreams) => {
                Some(proxy.prepare_upstreams(&self.upstreams)?)
            }
            None if !self.upstreams.is_empty() => {
                return Err(
                    "proxy.upstreams: the proxy is off on this instance ([proxy] has no \
                     upstreams at start-up)"
                        .to_owned(),
                );
            }
            _ => None,
        };
        Ok(Staged {
            log_level: self.log_level.clone(),
            auth,
            token,
            introspection,
            upstreams,
            lockout: self.lockout.clone(),
        })
    }
}

/// Settings checked and built by [`RuntimeSettings::stage`], not yet in force.
struct Staged {
    log_level: String,
    auth: Prepared,
    token: Prepared,
    introspection: Prepared,
    /// `None`: the admin nodes stay as they are.
    upstreams: Option<Upstreams>,
    lockout: LockoutSettings,
}

impl Staged {
    /// Puts the settings in force on this instance. Only reloading the log filter can
    /// fail (when the subscriber is gone), and it goes first: then nothing has changed.
    fn commit(self, state: &AppState) -> Result<(), String> {
        crate::telemetry::set_log_level(&self.log_level)?;
        state.rate.auth.install(self.auth);
        state.rate.token.install(self.token);
        state.rate.introspection.install(self.introspection);
        if let (Some(proxy), Some(upstreams)) = (&state.proxy, self.upstreams) {
            proxy.install_upstreams(upstreams);
        }
        state.lockout.set_settings(self.lockout);
        Ok(())
    }
}

fn number(key: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("`{key}` must be a whole number, not `{v}`"))
}

fn duration(key: &str, v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v).map_err(|e| format!("`{key}` must be a duration such as 30s: {e}"))
}

/// The check a release of the runtime settings must pass to be published, in every
/// environment: what [`RuntimeSettings::from_entries`] checks, over this instance's file
/// values. A release every instance would refuse is not written, so instances started
/// later do not fall back to their files while the others keep an older release. (What
/// only one instance can tell, such as admin nodes sent to an instance whose proxy is off,
/// is still checked where it is applied.) A gray release is refused: instances follow the
/// main release only, and have no instance id or labels a selector could match, so a gray
/// release would change nothing until promoted, and then every instance at once.
pub fn release_check(config: &crate::config::Config) -> config_center::ReleaseCheck {
    let baseline = RuntimeSettings::of_file(config);
    config_center::ReleaseCheck::new(move |_env, app, entries, status| {
        if app.as_str() != APP {
            return Ok(());
        }
        if status == config_center::ReleaseStatus::Gray {
            return Err(format!(
                "runtime setting refused: the `{APP}` application cannot be released gray \
                 (instances follow its main release only, and have no id or labels a \
                 selector could match); publish a main release"
            ));
        }
        let entries: BTreeMap<String, String> = entries
            .iter()
            .map(|e| (e.key.to_string(), e.value.expose().to_owned()))
            .collect();
        RuntimeSettings::from_entries(&baseline, &entries)
            .map(|_| ())
            .map_err(|reason| format!("runtime setting refused: {reason}"))
    })
}

/// Follows the `portcullis` application of `env` until `stop`, applying each release.
pub fn spawn(
    state: AppState,
    env: Environment,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(app) = AppName::parse(APP) else {
            return;
        };
        let baseline = RuntimeSettings::baseline(&state);
        let hub = state.config_center.hub.clone();
        let mut delay = Duration::from_millis(200);
        // the schema first, then a subscription; both retried while the database is away,
        // and a read given up at the hub's deadline (one left waiting on a connection that
        // a failover silenced would wait for as long as the connection stays silent)
        let mut rx = loop {
            if state.db.is_migrated() {
                let read = tokio::time::timeout(STEP_DEADLINE, hub.subscribe(&env, &app));
                match read.await {
                    Ok(Ok(rx)) => break rx,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::error::chain(&e), "runtime settings: cannot read them yet; retrying")
                    }
                    Err(_) => tracing::warn!(
                        deadline = ?STEP_DEADLINE,
                        "runtime settings: their read did not finish in time; retrying"
                    ),
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        };
        let mut applied = None;
        loop {
            let main = rx.borrow_and_update().main.clone();
            if let Some(release) = main
                && applied != Some(release.version)
            {
                applied = Some(release.version);
                follow(&state, &baseline, &release.json, release.version);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    })
}

/// Applies one release of the settings, or keeps the current ones and says why.
fn follow(state: &AppState, baseline: &RuntimeSettings, json: &[u8], version: u64) {
    let outcome = serde_json::from_slice::<Snapshot>(json)
        .map_err(|e| format!("unreadable snapshot: {e}"))
        .and_then(|snapshot| {
            let entries: BTreeMap<String, String> = snapshot
                .entries
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect();
            RuntimeSettings::from_entries(baseline, &entries)
        })
        .and_then(|settings| settings.stage(state))
        .and_then(|staged| staged.commit(state));
    match outcome {
        Ok(()) => {
            metrics::gauge!("portcullis_runtime_settings_version").set(version as f64);
            tracing::info!(version, "runtime settings applied");
        }
        Err(reason) => {
            metrics::counter!("portcullis_runtime_settings_rejected_total").increment(1);
            tracing::error!(version, %reason, "runtime settings refused; the previous ones stay in force");
        }
    }
}
