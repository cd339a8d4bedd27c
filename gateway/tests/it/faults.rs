//! The fault suite (issue 8 item 6): under a light continuous load of every feature, each
//! shared dependency — Redis, Postgres, Vault (OpenBao), the identity provider — is
//! stopped and started again in turn. Only the features that depend on it may degrade,
//! and only with a clear 503 (`temporarily_unavailable`, `Retry-After`); everything else
//! keeps answering; `/readyz` names the dependency (503, or 200 `degraded` for Vault while
//! a key held signs); and the instance recovers by itself, without a restart, once the
//! dependency is back.
//!
//! The load (one loop per feature, against one in-process instance):
//!
//! | feature | request | needs |
//! | --- | --- | --- |
//! | `token` | `client_credentials` grant | Postgres (client records, behind `tokens.client_cache_ttl`), the key ring |
//! | `refresh` | a refresh-token rotation chain | Redis |
//! | `proxy` | proxied GET with a JWT, to an admin node | the key ring |
//! | `jwks` | `GET /oauth2/jwks` | the key ring |
//! | `cfg-read` | `GET /config/v1/prod/<app>` | nothing once the instance holds the release |
//! | `cfg-write` | `PUT /config/v1/prod/<app>` | Postgres (and Vault Transit for a data key not cached yet) |
//! | `sso` | a whole browser login at the IdP, callback included | the IdP, Redis (pending logins, sessions) |
//!
//! One figure line per dependency is printed (prefix `FAULTS`): requests, 503s by
//! feature, other errors, time until `/readyz` reported the outage, and time from the
//! dependency's return until every degraded feature and `/readyz` were back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{OidcOptions, OidcProvider, OpenBao, Postgres, Redis};
use portcullis::clients::GrantType;
use portcullis::config::{KeySourceKind, RedisConfig};
use portcullis::refresh::NewFamily;
use portcullis::sso::settings::SsoSettings;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::proxy::{AdminNode, proxy_to};
use super::sso::{provider_settings, role_rules};
use super::support::*;

const APP: &str = "faults-app";

const FEATURES: [&str; 7] = [
    "token",
    "refresh",
    "proxy",
    "jwks",
    "cfg-read",
    "cfg-write",
    "sso",
];

#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    unavailable: u64,
    other: u64,
    /// Logins the browser could not finish because it could not reach the IdP itself
    /// (Portcullis sent it there with the provider's metadata it holds).
    idp_unreachable: u64,
    last_ok: Option<Instant>,
}

/// What the load loops report into, per phase (the dependency being exercised).
struct Faults {
    phase: AtomicUsize,
    stop: AtomicBool,
    /// phase → feature → tally.
    tallies: Mutex<Vec<BTreeMap<&'static str, Tally>>>,
    /// Answers that were neither a success nor the clear 503.
    errors: Mutex<Vec<String>>,
    /// SSO logins in flight: one cut by the IdP stopping under it is not a 503.
    sso_in_flight: AtomicUsize,
}

impl Faults {
    fn new(phases: usize) -> Arc<Self> {
        Arc::new(Self {
            phase: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            tallies: Mutex::new(vec![BTreeMap::new(); phases]),
            errors: Mutex::new(Vec::new()),
            sso_in_flight: AtomicUsize::new(0),
        })
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn book(&self, feature: &'static str, status: Option<StatusCode>, body: &str) {
        let phase = self.phase.load(Ordering::SeqCst);
        let mut tallies = self.tallies.lock().unwrap();
        let t = tallies[phase].entry(feature).or_default();
        match status {
            Some(s) if s.is_success() || s.is_redirection() => {
                t.ok += 1;
                t.last_ok = Some(Instant::now());
            }
            // a clear 503: the machine-readable code, never a dependency's own words
            Some(StatusCode::SERVICE_UNAVAILABLE)
                if body.contains("\"temporarily_unavailable\"") =>
            {
                t.unavailable += 1
            }
            _ => {
                t.other += 1;
                self.errors
                    .lock()
                    .unwrap()
                    .push(format!("phase {phase} {feature}: {status:?} {body}"));
            }
        }
    }

    fn book_idp_unreachable(&self) {
        let phase = self.phase.load(Ordering::SeqCst);
        self.tallies.lock().unwrap()[phase]
            .entry("sso")
            .or_default()
            .idp_unreachable += 1;
    }

    fn ok_count(&self, feature: &str) -> u64 {
        let phase = self.phase.load(Ordering::SeqCst);
        self.tallies.lock().unwrap()[phase]
            .get(feature)
            .map_or(0, |t| t.ok)
    }
}

/// Sends `req` and books the answer under `feature`.
async fn send(faults: &Faults, feature: &'static str, req: reqwest::RequestBuilder) -> Value {
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            faults.book(feature, Some(status), &text);
            serde_json::from_str(&text).unwrap_or(Value::Null)
        }
        Err(e) => {
            faults.book(feature, None, &e.to_string());
            Value::Null
        }
    }
}

/// Runs `step` every `every` until the suite stops.
async fn every<F, Fut>(faults: Arc<Faults>, every: Duration, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut pace = tokio::time::interval(every);
    while !faults.stopped() {
        pace.tick().await;
        step().await;
    }
}

async fn readyz(admin: std::net::SocketAddr) -> (u16, Value) {
    match reqwest::get(format!("http://{admin}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(_) => (0, Value::Null),
    }
}

/// The moment `probe` first held, polling every 20 ms up to `deadline`.
async fn when<F, Fut>(deadline: Duration, mut probe: F) -> Option<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if probe().await {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// One dependency of the suite: how to stop and start it, what `/readyz` calls it and
/// whether the instance stays ready without it, which features must answer 503 while it
/// is away and which may.
struct Dependency {
    name: &'static str,
    check: &'static str,
    /// `/readyz` stays 200 with the check `degraded` (the key source, while a key held
    /// can sign), rather than 503.
    ready_while_away: bool,
    must_degrade: &'static [&'static str],
    may_degrade: &'static [&'static str],
    stop: Arc<dyn Fn() + Send + Sync>,
    start: Arc<dyn Fn() + Send + Sync>,
}

/// Writes a figure line straight to the process's stderr: the test harness captures
/// `println!` of passing tests, and these lines are meant for the CI log.
fn report(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_dependency_outage_degrades_only_its_features_and_recovers_by_itself() {
    // --- the dependencies, each one of our own so it can be stopped ---
    let redis = Arc::new(Redis::start_persistent().unwrap());
    let pg = Arc::new(
        tokio::task::spawn_blocking(Postgres::start)
            .await
            .unwrap()
            .unwrap(),
    );
    let db = pg.fresh_database("faults").unwrap();
    let bao = Arc::new(
        tokio::task::spawn_blocking(OpenBao::start_persistent)
            .await
            .unwrap()
            .unwrap(),
    );
    bao.bao(&["secrets", "enable", "transit"]).unwrap();
    bao.bao(&["write", "-f", "transit/keys/portcullis-config"])
        .unwrap();
    let port = harness::free_port();
    let public = format!("https://localhost:{port}");
    let options = OidcOptions {
        redirect_uris: vec![format!("{public}/auth/callback")],
        post_logout_redirect_uris: vec![format!("{public}/")],
        ..OidcOptions::default()
    };
    let idp = {
        let options = options.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || OidcProvider::start(options))
                .await
                .unwrap()
                .unwrap(),
        )
    };
    let node = AdminNode::start("a").await;

    let app = {
        let (db, redis_url, issuer) = (db.clone(), redis.url(), idp.issuer());
        let vault = format!(
            "addr = \"{}\"\ntoken = \"{}\"\n",
            bao.addr(),
            bao.root_token()
        );
        let node = &node;
        spawn_app(move |c| {
            c.server.listen = ([127, 0, 0, 1], port).into();
            c.server.public_url = public.clone();
            c.database.url = SecretString::from(db);
            c.database.acquire_timeout = Duration::from_secs(1);
            c.redis = Some(RedisConfig {
                url: SecretString::from(redis_url),
                cluster: false,
                command_timeout: Duration::from_millis(500),
            });
            c.keys.source = KeySourceKind::Vault;
            c.keys.reload_interval = Duration::from_millis(500);
            c.vault = Some(toml::from_str(&vault).unwrap());
            c.sso = SsoSettings {
                providers: vec![provider_settings(&issuer, &options)],
                roles: role_rules(),
                ..SsoSettings::default()
            };
            proxy_to(c, &[node]);
            // the login loop logs in several times a second from one address
            c.protection.auth_rate.burst = 1000;
            c.protection.auth_rate.replenish_every = Duration::from_millis(1);
        })
        .await
    };
    let state = &app.state;
    let now = state.keys.now();
    let scopes = format!("scheduler:executor config:read:prod:{APP} config:write:prod:{APP}");
    let creds = register_client(
        state,
        "faults",
        &[GrantType::ClientCredentials, GrantType::RefreshToken],
        &scopes,
    )
    .await;
    let first_refresh = state
        .refresh
        .issue(
            NewFamily {
                client_id: creds.0.clone(),
                subject: "chain".to_owned(),
                scope: "scheduler:executor".to_owned(),
                audience: vec![],
                auth_time: now,
                session: json!({}),
            },
            now,
        )
        .await
        .unwrap()
        .token
        .expose_secret()
        .to_owned();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(app.pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", app.https)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let jwt = {
        let r = http
            .post(app.url("/oauth2/token"))
            .basic_auth(&creds.0, Some(&creds.1))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scopes.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // a first release, so the instance holds one (and the environment's data key)
    let r = http
        .put(app.url(&format!("/config/v1/prod/{APP}")))
        .bearer_auth(&jwt)
        .json(&json!({ "entries": [{ "key": "n", "value": "0" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // --- the dependencies, in the order they are exercised ---
    let deps = [
        Dependency {
            name: "redis",
            check: "redis",
            ready_while_away: false,
            must_degrade: &["refresh", "sso"],
            may_degrade: &["refresh", "sso"],
            stop: Arc::new({
                let r = redis.clone();
                move || r.stop()
            }),
            start: Arc::new({
                let r = redis.clone();
                move || r.restart().unwrap()
            }),
        },
        Dependency {
            name: "postgres",
            check: "database",
            ready_while_away: false,
            must_degrade: &["cfg-write"],
            // client records are read again after tokens.client_cache_ttl (5 s), and a
            // refresh authenticates its client too
            may_degrade: &["token", "refresh", "cfg-write"],
            stop: Arc::new({
                let p = pg.clone();
                move || p.stop()
            }),
            start: Arc::new({
                let p = pg.clone();
                move || p.restart().unwrap()
            }),
        },
        Dependency {
            name: "vault",
            check: "keys",
            ready_while_away: true,
            must_degrade: &[],
            may_degrade: &[],
            stop: Arc::new({
                let b = bao.clone();
                move || b.stop()
            }),
            start: Arc::new({
                let b = bao.clone();
                move || b.restart().unwrap()
            }),
        },
        Dependency {
            name: "idp",
            check: "",
            ready_while_away: true,
            // a login's start uses the provider metadata held; the callback of a login
            // the IdP stopped under answers 503
            must_degrade: &[],
            may_degrade: &["sso"],
            stop: Arc::new({
                let i = idp.clone();
                move || i.stop()
            }),
            start: Arc::new({
                let i = idp.clone();
                move || i.restart().unwrap()
            }),
        },
    ];

    // --- the load ---
    // phases: 0 baseline, then per dependency 2i+1 (away) and 2i+2 (back)
    let faults = Faults::new(1 + 2 * deps.len());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(every(faults.clone(), Duration::from_millis(100), {
        let (f, http, url, creds) = (
            faults.clone(),
            http.clone(),
            app.url("/oauth2/token"),
            creds.clone(),
        );
        move || {
            let (f, http, url, creds) = (f.clone(), http.clone(), url.clone(), creds.clone());
            async move {
                let req = http.post(url).basic_auth(&creds.0, Some(&creds.1)).form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", "scheduler:executor"),
                ]);
                send(&f, "token", req).await;
            }
        }
    }));
    tasks.spawn({
        let (f, http, url, creds) = (
            faults.clone(),
            http.clone(),
            app.url("/oauth2/token"),
            creds.clone(),
        );
        async move {
            let mut token = first_refresh;
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            while !f.stopped() {
                pace.tick().await;
                let req = http.post(&url).basic_auth(&creds.0, Some(&creds.1)).form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.as_str()),
                ]);
                let body = send(&f, "refresh", req).await;
                if let Some(next) = body["refresh_token"].as_str() {
                    token = next.to_owned();
                }
            }
        }
    });
    for (feature, path) in [
        ("proxy", "/api/jobs".to_owned()),
        ("jwks", "/oauth2/jwks".to_owned()),
        ("cfg-read", format!("/config/v1/prod/{APP}")),
    ] {
        tasks.spawn(every(faults.clone(), Duration::from_millis(100), {
            let (f, http, url, jwt) = (faults.clone(), http.clone(), app.url(&path), jwt.clone());
            move || {
                let (f, http, url, jwt) = (f.clone(), http.clone(), url.clone(), jwt.clone());
                async move {
                    send(&f, feature, http.get(url).bearer_auth(jwt)).await;
                }
            }
        }));
    }
    tasks.spawn(every(faults.clone(), Duration::from_millis(200), {
        let (f, http, url, jwt) = (
            faults.clone(),
            http.clone(),
            app.url(&format!("/config/v1/prod/{APP}")),
            jwt.clone(),
        );
        let n = Arc::new(AtomicUsize::new(0));
        move || {
            let (f, http, url, jwt) = (f.clone(), http.clone(), url.clone(), jwt.clone());
            let n = n.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let req = http
                    .put(url)
                    .bearer_auth(jwt)
                    .json(&json!({ "entries": [{ "key": "n", "value": n.to_string() }] }));
                send(&f, "cfg-write", req).await;
            }
        }
    }));
    tasks.spawn(every(faults.clone(), Duration::from_millis(300), {
        let (f, idp, start, ca, https) = (
            faults.clone(),
            idp.clone(),
            app.url("/auth/login?redirect=/jobs"),
            app.pki.ca_pem(),
            app.https,
        );
        let idp_addr = format!("127.0.0.1:{}", idp.port());
        move || {
            let (f, idp, start, ca, idp_addr) = (
                f.clone(),
                idp.clone(),
                start.clone(),
                ca.clone(),
                idp_addr.clone(),
            );
            async move {
                let browser = reqwest::Client::builder()
                    .cookie_store(true)
                    .redirect(reqwest::redirect::Policy::none())
                    .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
                    .tls_built_in_root_certs(false)
                    .resolve("localhost", https)
                    .no_proxy()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                f.sso_in_flight.fetch_add(1, Ordering::SeqCst);
                // the first step alone tells a refused login (503) from one that starts
                let first = browser.get(&start).send().await;
                match first {
                    Ok(r) if r.status().is_redirection() => {
                        match idp
                            .browser_login(&browser, &start, "alice", "alice-correct-horse")
                            .await
                        {
                            Ok(callback) => {
                                send(&f, "sso", browser.get(callback)).await;
                            }
                            Err(e) => {
                                let e = e.to_string();
                                if e.contains(&idp_addr) && e.contains("error sending request") {
                                    f.book_idp_unreachable();
                                } else if !e.contains(&idp_addr)
                                    && e.contains("got 503")
                                    && e.contains("\"temporarily_unavailable\"")
                                {
                                    // the login began, and a later step of ours (the
                                    // harness opens the login URL again) met the outage:
                                    // a clear 503 from Portcullis, not a failure
                                    f.book("sso", Some(StatusCode::SERVICE_UNAVAILABLE), &e);
                                } else {
                                    f.book("sso", None, &format!("at the IdP: {e}"));
                                }
                            }
                        }
                    }
                    Ok(r) => {
                        let status = r.status();
                        f.book("sso", Some(status), &r.text().await.unwrap_or_default());
                    }
                    Err(e) => f.book("sso", None, &e.to_string()),
                }
                f.sso_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }));

    let admin = app.admin;
    assert!(
        when(Duration::from_secs(20), || async move {
            readyz(admin).await.0 == 200
        })
        .await
        .is_some(),
        "ready before the first fault"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // --- each dependency in turn ---
    let mut outages = Vec::new();
    for (i, dep) in deps.iter().enumerate() {
        faults.phase.store(2 * i + 1, Ordering::SeqCst);
        let sso_in_flight = faults.sso_in_flight.load(Ordering::SeqCst);
        let stop = dep.stop.clone();
        tokio::task::spawn_blocking(move || stop()).await.unwrap();
        // from the moment it is gone
        let stopped_at = Instant::now();
        let detected = if dep.check.is_empty() {
            None
        } else {
            let (check, expected) = (dep.check, if dep.ready_while_away { 200 } else { 503 });
            when(Duration::from_secs(15), || async move {
                let (status, body) = readyz(admin).await;
                status == expected && body["checks"][check]["ok"] == false
            })
            .await
        };
        // the outage, under load
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (_, during) = readyz(admin).await;
        faults.phase.store(2 * i + 2, Ordering::SeqCst);
        let start = dep.start.clone();
        tokio::task::spawn_blocking(move || start()).await.unwrap();
        let back_at = Instant::now();
        // recovered: /readyz 200 with the dependency's check passed, and every feature
        // that degraded answers again
        let degraded: Vec<&'static str> = {
            let tallies = faults.tallies.lock().unwrap();
            tallies[2 * i + 1]
                .iter()
                .filter(|(_, t)| t.unavailable > 0 || t.other > 0)
                .map(|(k, _)| *k)
                .collect()
        };
        let f = faults.clone();
        let check = dep.check;
        let recovered = when(Duration::from_secs(30), || {
            let (f, degraded) = (f.clone(), degraded.clone());
            async move {
                let (status, body) = readyz(admin).await;
                status == 200
                    && (check.is_empty() || body["checks"][check]["ok"] == true)
                    && degraded.iter().all(|d| f.ok_count(d) > 0)
            }
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        outages.push((
            dep,
            stopped_at,
            detected,
            back_at,
            recovered,
            during,
            sso_in_flight,
        ));
    }
    faults.stop.store(true, Ordering::SeqCst);
    while tasks.join_next().await.is_some() {}

    // --- figures ---
    let tallies = faults.tallies.lock().unwrap().clone();
    let errors = faults.errors.lock().unwrap().clone();
    report(
        "FAULTS one instance; Redis (appendonly), Postgres, OpenBao (raft), oidc-provider; light load on every feature",
    );
    report(format!(
        "FAULTS {:<9} | {:>9} | {:>9} | {:<44} | {:>11} | {:>12} | {:>13} | {:>12}",
        "down",
        "requests",
        "other err",
        "503s by feature (away / after)",
        "browser-IdP",
        "readyz saw",
        "away for",
        "recovered in"
    ));
    for (i, (dep, stopped_at, detected, back_at, recovered, _, _)) in outages.iter().enumerate() {
        let (away, after) = (&tallies[2 * i + 1], &tallies[2 * i + 2]);
        let requests: u64 = away
            .values()
            .chain(after.values())
            .map(|t| t.ok + t.unavailable + t.other)
            .sum();
        let other: u64 = away.values().chain(after.values()).map(|t| t.other).sum();
        let unavailable: Vec<String> = FEATURES
            .iter()
            .filter_map(|feature| {
                let a = away.get(feature).map_or(0, |t| t.unavailable);
                let b = after.get(feature).map_or(0, |t| t.unavailable);
                (a + b > 0).then(|| format!("{feature} {a}/{b}"))
            })
            .collect();
        let ms = |from: &Instant, to: &Option<Instant>| match to {
            Some(t) => format!("{} ms", t.saturating_duration_since(*from).as_millis()),
            None if dep.check.is_empty() => "n/a".to_owned(),
            None => "never".to_owned(),
        };
        let idp_unreachable: u64 = away
            .values()
            .chain(after.values())
            .map(|t| t.idp_unreachable)
            .sum();
        report(format!(
            "FAULTS {:<9} | {:>9} | {:>9} | {:<44} | {:>11} | {:>12} | {:>13} | {:>12}",
            dep.name,
            requests,
            other,
            if unavailable.is_empty() {
                "none".to_owned()
            } else {
                unavailable.join(", ")
            },
            idp_unreachable,
            ms(stopped_at, detected),
            format!(
                "{} ms",
                back_at.saturating_duration_since(*stopped_at).as_millis()
            ),
            match recovered {
                Some(t) => format!("{} ms", t.saturating_duration_since(*back_at).as_millis()),
                None => "never".to_owned(),
            }
        ));
    }
    for e in errors.iter().take(20) {
        report(format!("FAULTS error {e}"));
    }

    // --- what must hold ---
    let baseline = &tallies[0];
    for feature in FEATURES {
        let t = baseline.get(feature).cloned().unwrap_or_default();
        assert!(t.ok > 0 && t.unavailable == 0, "baseline {feature}: {t:?}");
    }
    for (i, (dep, _, detected, _, recovered, during, sso_in_flight)) in outages.iter().enumerate() {
        let name = dep.name;
        let (away, after) = (&tallies[2 * i + 1], &tallies[2 * i + 2]);
        // nothing but success or a clear 503; a login cut mid-way by the IdP stopping
        // under it is the one exception
        let other: u64 = away.values().chain(after.values()).map(|t| t.other).sum();
        let cut_logins = if name == "idp" {
            *sso_in_flight as u64
        } else {
            0
        };
        assert!(
            other <= cut_logins,
            "{name}: {other} answers were neither 2xx/3xx nor a clear 503: {errors:?}"
        );
        for (feature, t) in away.iter().chain(after.iter()) {
            if t.unavailable > 0 {
                assert!(
                    dep.may_degrade.contains(feature),
                    "{name}: {feature} answered 503 {} times but does not depend on {name}",
                    t.unavailable
                );
            }
        }
        for feature in dep.must_degrade {
            let n = away.get(feature).map_or(0, |t| t.unavailable);
            assert!(
                n > 0,
                "{name}: {feature} never answered 503 while {name} was away"
            );
        }
        for feature in FEATURES.iter().filter(|f| !dep.may_degrade.contains(f)) {
            let t = away.get(feature).cloned().unwrap_or_default();
            assert!(
                t.ok > 0,
                "{name}: {feature} stopped working while {name} was away: {t:?}"
            );
        }
        let idp_unreachable: u64 = away
            .values()
            .chain(after.values())
            .map(|t| t.idp_unreachable)
            .sum();
        if name == "idp" {
            assert!(idp_unreachable > 0, "no login met the stopped IdP");
            assert_eq!(
                during["ready"], true,
                "the IdP is not a readiness dependency: {during}"
            );
        } else {
            assert_eq!(idp_unreachable, 0, "{name}: logins failed at the IdP");
        }
        if !dep.check.is_empty() {
            assert!(detected.is_some(), "{name}: /readyz never reported it");
            assert_eq!(during["checks"][dep.check]["ok"], false, "{name}: {during}");
            assert_eq!(
                (&during["ready"], &during["checks"][dep.check]["degraded"]),
                if dep.ready_while_away {
                    (&serde_json::json!(true), &serde_json::json!(true))
                } else {
                    (&serde_json::json!(false), &Value::Null)
                },
                "{name}: {during}"
            );
            for (check, value) in during["checks"].as_object().unwrap() {
                if check != dep.check {
                    assert_eq!(
                        value["ok"], true,
                        "{name}: /readyz blames {check} too: {during}"
                    );
                }
            }
        }
        assert!(
            recovered.is_some(),
            "{name}: no recovery within 30 s of its return"
        );
        for feature in FEATURES {
            let t = after.get(feature).cloned().unwrap_or_default();
            assert!(
                t.ok > 0,
                "{name}: {feature} did not work after {name} came back: {t:?}"
            );
        }
    }
}

/// `portcullis_dependency_up{dependency}` in a scrape of `admin`; `None` when absent or
/// the scrape failed.
async fn dependency_up(admin: std::net::SocketAddr, dependency: &str) -> Option<f64> {
    scraped(
        admin,
        &format!("portcullis_dependency_up{{dependency=\"{dependency}\"}}"),
    )
    .await
}

/// `portcullis_dependency_up` drops to 0 while Postgres, then Redis, is away and returns to
/// 1 after, read from `/metrics` alone: the reference deployment never calls `/readyz`.
#[test]
fn dependency_gauges_follow_an_outage_without_anyone_calling_readyz() {
    // the metrics recorder is process-wide: alone in a process, no other test's instance
    // writes the same gauge
    harness::run_alone("faults::dependency_gauges_capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a process of its own by dependency_gauges_follow_an_outage_without_anyone_calling_readyz"]
async fn dependency_gauges_capture() {
    // nginx's passive checks and systemd never call /readyz: only /metrics is read here
    let redis = Redis::start().unwrap();
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = pg.fresh_database("depgauge").unwrap();
    let redis_url = redis.url();
    let app = spawn_app(move |c| {
        c.database.url = SecretString::from(db);
        c.database.acquire_timeout = Duration::from_secs(1);
        c.redis = Some(RedisConfig {
            url: SecretString::from(redis_url),
            cluster: false,
            command_timeout: Duration::from_millis(500),
        });
    })
    .await;
    let admin = app.admin;
    let deadline = Duration::from_secs(20);

    for (name, stop, start) in [
        (
            "database",
            Box::new(|| pg.stop()) as Box<dyn Fn()>,
            Box::new(|| pg.restart().unwrap()) as Box<dyn Fn()>,
        ),
        (
            "redis",
            Box::new(|| redis.stop()),
            Box::new(|| redis.restart().unwrap()),
        ),
    ] {
        let reaches = |value: f64, when_: &'static str| async move {
            assert!(
                when(deadline, || async move {
                    dependency_up(admin, name).await == Some(value)
                })
                .await
                .is_some(),
                "{name}: not {value} within {deadline:?} {when_}: {:?}",
                dependency_up(admin, name).await
            );
        };
        reaches(1.0, "before the outage").await;
        tokio::task::block_in_place(&stop);
        reaches(0.0, "after it stopped").await;
        tokio::task::block_in_place(&start);
        reaches(1.0, "after it came back").await;
    }
}

/// While Postgres is away, reads of applications this instance does not hold yet (right
/// after a restart, say) each answer 503 within about one `database.acquire_timeout`.
/// Their loads took one instance-wide lock in turn before, so the tenth waited ten
/// timeouts and later ones ran into the request timeout (408) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_unheld_applications_answer_503_side_by_side_while_the_database_is_away() {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = pg.fresh_database("unheld").unwrap();
    let app = spawn_app(move |c| {
        c.database.url = SecretString::from(db);
        c.database.acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let token = super::config_api::token(&app, "config:read:prod");
    let http = app.https_client();
    // the schema in place before the outage
    let ok = http
        .get(app.url("/config/v1/prod/never-written"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::NOT_FOUND);
    tokio::task::block_in_place(|| pg.stop());

    let started = Instant::now();
    let reads: Vec<_> = (0..10)
        .map(|i| {
            let request = http
                .get(app.url(&format!("/config/v1/prod/executor-{i}")))
                .bearer_auth(&token);
            tokio::spawn(async move {
                let status = request.send().await.unwrap().status();
                (status, started.elapsed())
            })
        })
        .collect();
    for (i, read) in reads.into_iter().enumerate() {
        let (status, took) = read.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "executor-{i}");
        assert!(
            took < Duration::from_secs(5),
            "executor-{i} answered after {took:?}"
        );
    }
}

/// A database host that vanishes without closing anything — it crashed, or a VIP moved
/// to a new primary — leaves the connections the instance holds silent: no reset, no
/// answer, for the ~15 min the kernel keeps retransmitting. New connections reach the
/// new primary. Under load an audit append is in flight on one of them: it is given up
/// after its deadline (15 s) and retried on a new connection, so tokens are issued again
/// and their audit records stored within seconds, not after the kernel gives up (the
/// append waited for ever before: "stored after None").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_a_failover_left_silent_are_given_up_and_the_instance_recovers() {
    let (direct, via, forwarder) = behind_a_forwarder("failover").await;
    let app = spawn_app(|c| {
        c.database.url = SecretString::from(via.to_string());
        c.tokens.client_cache_ttl = Duration::from_secs(1);
        c.protection.token_rate = portcullis::protect::RateSettings {
            burst: 1_000_000,
            replenish_every: Duration::from_micros(1),
        };
    })
    .await;
    let (id, secret) = register_client(
        &app.state,
        "failover",
        &[GrantType::ClientCredentials],
        "jobs:read",
    )
    .await;
    let http = app.https_client();
    let token = || async {
        let r = post_as_client(
            &http,
            app.url("/oauth2/token"),
            &id,
            &secret,
            &[("grant_type", "client_credentials")],
        )
        .await;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or_default();
        (status, body)
    };
    assert_eq!(token().await.0, StatusCode::OK);
    // load, so that statements are in flight (an audit append, a client read) when the
    // connections go silent
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..4 {
        let (http, url, id, secret, stop) = (
            http.clone(),
            app.url("/oauth2/token"),
            id.clone(),
            secret.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let form = [("grant_type", "client_credentials")];
                let _ = post_as_client(&http, &url, &id, &secret, &form).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    forwarder.go_silent();
    let silenced = Instant::now();
    let mut issued_after = None;
    let mut answers = BTreeMap::<u16, usize>::new();
    while silenced.elapsed() < Duration::from_secs(120) {
        let (status, body) = token().await;
        *answers.entry(status.as_u16()).or_default() += 1;
        if status == StatusCode::OK && silenced.elapsed() > Duration::from_secs(2) {
            issued_after = Some((silenced.elapsed(), body));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.cancel();
    let (issued_in, body) = issued_after.expect("a token issued again within 120 s");
    let claims = app
        .state
        .keys
        .verify_access(body["access_token"].as_str().unwrap())
        .unwrap();
    let jti = claims.claims.jti.clone();
    // its audit record, read straight from the database (not through the instance's pool)
    let pool = sqlx::PgPool::connect(direct.as_str()).await.unwrap();
    let mut stored_in = None;
    while silenced.elapsed() < Duration::from_secs(60) {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE action = 'token.issue' AND target = $1",
        )
        .bind(&jti)
        .fetch_one(&pool)
        .await
        .unwrap();
        if n > 0 {
            stored_in = Some(silenced.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "FAILOVER token issued again after {issued_in:?} ({answers:?}); its audit record stored after {stored_in:?}"
    );
    let stored_in = stored_in.expect("the audit record stored within 60 s");
    assert!(issued_in < Duration::from_secs(40), "{issued_in:?}");
    assert!(stored_in < Duration::from_secs(40), "{stored_in:?}");
}

/// A request cut off by its deadline while its query waits on a connection that a
/// failover then leaves silent gives its pool slot back within seconds. The pool checks
/// every connection given back to it; that check is bounded (`database.acquire_timeout`),
/// so the silent connection is dropped. Before, the check waited for as long as the kernel
/// retransmits (about 15 minutes), holding the slot, and with every slot held so every
/// request needing the database waited for one and was refused.
///
/// Deterministic: the pool has one connection, and the token request's client read is
/// made to wait on a table lock (held from outside the pool) before the forwarder goes
/// silent, so that a statement is in flight on that connection when it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_on_a_connection_left_silent_gives_its_pool_slot_back() {
    let (direct, via, forwarder) = behind_a_forwarder("silent_release").await;
    let app = spawn_app(|c| {
        c.database.url = SecretString::from(via.to_string());
        c.database.max_connections = 1;
        c.database.min_connections = 0;
        c.database.acquire_timeout = Duration::from_secs(1);
        c.server.request_timeout = Duration::from_secs(2);
        c.config_center.long_poll_timeout = Duration::from_secs(1);
        c.proxy.read_timeout = Duration::from_secs(1);
        // every token request reads its client from the database
        c.tokens.client_cache_ttl = Duration::ZERO;
    })
    .await;
    let (id, secret) = register_client(
        &app.state,
        "silent",
        &[GrantType::ClientCredentials],
        "jobs:read",
    )
    .await;
    let http = app.https_client();
    let token = || {
        let (http, url, id, secret) = (
            http.clone(),
            app.url("/oauth2/token"),
            id.clone(),
            secret.clone(),
        );
        async move {
            post_as_client(
                &http,
                url,
                &id,
                &secret,
                &[("grant_type", "client_credentials")],
            )
            .await
            .status()
        }
    };
    assert_eq!(token().await, StatusCode::OK);

    let held = LockedTable::hold(&direct, "oauth_clients").await;
    let cut_off = tokio::spawn(token());
    held.until_a_statement_waits("the token request's client read")
        .await;
    forwarder.go_silent();
    let silenced = Instant::now();
    held.release().await;
    let status = cut_off.await.unwrap();
    assert_ne!(
        status,
        StatusCode::OK,
        "the request on the silent connection"
    );

    let answers = Mutex::new(BTreeMap::<u16, usize>::new());
    let issued_after = time_until(silenced, Duration::from_secs(20), || async {
        let status = token().await;
        *answers.lock().unwrap().entry(status.as_u16()).or_default() += 1;
        status == StatusCode::OK
    })
    .await;
    let answers = answers.into_inner().unwrap();
    println!("SILENT RELEASE token issued again after {issued_after:?} ({answers:?})");
    let issued_after = issued_after.unwrap_or_else(|| {
        panic!("no token within 20 s of the silence; the pool's one slot stayed taken: {answers:?}")
    });
    assert!(issued_after < Duration::from_secs(10), "{issued_after:?}");
    assert!(
        app.sample("portcullis_db_connections_closed_total{reason=\"release_check\"}")
            .await
            >= 1.0,
        "the silent connection was closed by the pool's check"
    );
}

/// A read of the token cutoffs that a failover leaves waiting on a silent connection is
/// given up after `cutoff::RELOAD_DEADLINE` and read again on a new connection, so a
/// cutoff another instance makes meanwhile is in force here within seconds. Before, the
/// instance's reads of the cutoffs waited behind that one for as long as the connection
/// stayed silent (here for ever, on a host that crashed for about 15 minutes), and every
/// cutoff made elsewhere meanwhile went unseen: a disabled client's tokens still worked
/// on this instance. The read is made to wait on a table lock before the silence, so that
/// it is in flight when the silence comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutoff_read_left_waiting_on_a_silent_connection_is_given_up_and_read_again() {
    let (direct, via, forwarder) = behind_a_forwarder("silent_cutoffs").await;
    let app = spawn_app(|c| {
        c.database.url = SecretString::from(via.to_string());
        c.database.acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let held = LockedTable::hold(&direct, "token_cutoffs").await;
    held.until_a_statement_waits("the instance's read of the cutoffs")
        .await;
    forwarder.go_silent();
    let silenced = Instant::now();
    held.release().await;

    // another instance cuts off a client's tokens (straight in the database)
    let elsewhere = portcullis::db::Database::connect_lazy(&portcullis::config::DatabaseConfig {
        url: SecretString::from(direct.to_string()),
        max_connections: 1,
        min_connections: 0,
        acquire_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let now = app.state.keys.now();
    portcullis::cutoff::Cutoffs::new()
        .cut(
            &elsewhere,
            "svc-cut-elsewhere",
            now,
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let iat = now.unix_timestamp();
    let seen_after = time_until(silenced, Duration::from_secs(40), || async {
        app.state.keys.cutoffs().refuses("svc-cut-elsewhere", iat)
    })
    .await;
    println!("SILENT CUTOFFS the other instance's cutoff in force here after {seen_after:?}");
    let seen_after = seen_after.expect("the other instance's cutoff in force here within 40 s");
    let bound = portcullis::cutoff::RELOAD_DEADLINE + Duration::from_secs(15);
    assert!(seen_after < bound, "{seen_after:?}");
}

/// How long after `since` `probe` first held, asking every 250 ms for up to `within`.
async fn time_until<F, Fut>(since: Instant, within: Duration, mut probe: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    while since.elapsed() < within {
        if probe().await {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// A fresh database reached through a [`harness::Forwarder`] that can go silent: its
/// direct URL, the URL through the forwarder, and the forwarder.
async fn behind_a_forwarder(name: &str) -> (url::Url, url::Url, harness::Forwarder) {
    let direct = url::Url::parse(&Postgres::shared().fresh_database(name).unwrap()).unwrap();
    let forwarder = harness::Forwarder::to(
        format!("127.0.0.1:{}", direct.port().unwrap())
            .parse()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut via = direct.clone();
    via.set_port(Some(forwarder.addr().port())).unwrap();
    (direct, via, forwarder)
}

/// A table held locked (`ACCESS EXCLUSIVE`, in a transaction of a session of its own, not
/// the instance's), so that a statement of the instance on it is in flight until
/// [`Self::release`]: how a test puts a statement on a connection just before a failover
/// silences it.
struct LockedTable {
    holder: sqlx::PgConnection,
    direct: String,
}

impl LockedTable {
    async fn hold(direct: &url::Url, table: &str) -> Self {
        let lock = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
        Self {
            holder: session_holding(direct.as_str(), &lock).await,
            direct: direct.to_string(),
        }
    }

    /// Waits until a session of the database waits on a lock: `what`.
    async fn until_a_statement_waits(&self, what: &str) {
        until_a_session_waits_on_a_lock(&self.direct, what).await;
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.holder)
            .await
            .unwrap();
    }
}

/// The config hub's reconcile that a failover leaves waiting on a silent connection is
/// given up after `hub::STEP_DEADLINE`, and the next one, on a new connection, loads the
/// release published meanwhile on another instance: this instance's readers get it within
/// seconds. Before, the hub's loop waited on that reconcile for as long as the connection
/// stayed silent, and every release after it went unseen here (its change feed, silenced
/// too, is replaced after ~35 s, but the loop that reads it was the one held). The
/// reconcile is made to wait on a table lock before the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reconcile_left_waiting_on_a_silent_connection_is_given_up_and_releases_arrive() {
    use super::config_api::{APP, Api, entries_v1, on_postgres};
    let (direct, via, forwarder) = behind_a_forwarder("silent_hub").await;
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("master.key");
    let elsewhere = on_postgres(direct.as_str(), &key).await;
    let here = spawn_app({
        let (via, key) = (via.to_string(), key.clone());
        move |c| {
            c.database.url = SecretString::from(via);
            c.database.acquire_timeout = Duration::from_secs(1);
            c.config_center.master_key_file = Some(key);
            c.config_center.reconcile_interval = Duration::from_secs(1);
        }
    })
    .await;
    Api::new(&elsewhere).publish(entries_v1()).await;
    let path = Api::path("prod", APP, "");
    let version_here = || async {
        let (status, _, body) = Api::new(&here).get(&path, "config:read:prod").await;
        (status == 200).then(|| body["version"].as_u64()).flatten()
    };
    assert_eq!(version_here().await, Some(1));

    let held = LockedTable::hold(&direct, "config_releases").await;
    held.until_a_statement_waits("the reconcile's read of the newest releases")
        .await;
    forwarder.go_silent();
    let silenced = Instant::now();
    held.release().await;
    let published = Api::new(&elsewhere)
        .publish(serde_json::json!([{ "key": "db.url", "value": "postgres://after-failover" }]))
        .await;
    assert_eq!(published, 2);

    let arrived_after = time_until(silenced, Duration::from_secs(60), || async {
        version_here().await == Some(2)
    })
    .await;
    println!("SILENT HUB release 2 served here after {arrived_after:?}");
    let arrived_after = arrived_after.expect("release 2 served here within 60 s");
    let bound = portcullis::config_api::hub::STEP_DEADLINE + Duration::from_secs(15);
    assert!(arrived_after < bound, "{arrived_after:?}");
}

/// Redis reached through a forwarder that then goes silent (a failover of Redis behind a
/// VIP, the old host gone without a reset): once a command times out on the silent
/// connection, it is given up and the next command connects again, so Redis answers the
/// instance within seconds, the refresh-token store included. Before, the connection
/// manager kept the silent connection (it reconnects only on a reset or a close): every
/// command timed out for as long as the connection stayed silent (here for ever, on a
/// crashed host about 15 minutes), and every feature needing Redis answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_connection_left_silent_is_given_up_and_redis_answers_again() {
    let redis = Redis::shared();
    let forwarder = harness::Forwarder::to(([127, 0, 0, 1], redis.port()).into())
        .await
        .unwrap();
    let mut via = url::Url::parse(&redis.url()).unwrap();
    via.set_port(Some(forwarder.addr().port())).unwrap();
    let app = spawn_app(|c| {
        c.redis = Some(RedisConfig {
            url: SecretString::from(via.to_string()),
            cluster: false,
            command_timeout: Duration::from_secs(1),
        });
    })
    .await;
    let handle = app.state.redis.clone().unwrap();
    // the refresh store first: it is the first to meet the silent connection
    let answers = || async {
        let now = app.state.keys.now();
        let sessions = app
            .state
            .refresh
            .list_sessions("nobody", now)
            .await
            .map(|_| ())
            .map_err(|e| format!("refresh store: {e}"));
        let ping = handle.ping().await.map_err(|e| format!("ping: {e}"));
        sessions.and(ping)
    };
    answers().await.unwrap();
    forwarder.go_silent();
    let silenced = Instant::now();
    let failures = Mutex::new(Vec::new());
    let answered_after = time_until(silenced, Duration::from_secs(60), || async {
        answers()
            .await
            .map_err(|e| failures.lock().unwrap().push(e))
            .is_ok()
    })
    .await;
    let mut failures = failures.into_inner().unwrap();
    failures.dedup();
    println!(
        "SILENT REDIS answered again after {answered_after:?}; failures meanwhile: {failures:?}"
    );
    let answered_after = answered_after.expect("Redis answered again within 60 s");
    assert!(
        answered_after < Duration::from_secs(15),
        "{answered_after:?}"
    );
    assert!(
        app.sample("portcullis_redis_connections_given_up_total")
            .await
            >= 1.0
    );
}

/// An instance whose first read of its runtime settings (at start) is left waiting on a
/// connection that a failover silences gives that read up after `hub::STEP_DEADLINE` and
/// reads them again: the settings published meanwhile on another instance apply here
/// within seconds. Before, the instance followed no runtime settings at all until it was
/// restarted (the read waited for as long as the connection stayed silent). The read is
/// made to wait on a table lock before the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_settings_whose_first_read_is_left_on_a_silent_connection_are_read_again() {
    use super::runtime::{limited, publish};
    let (direct, via, forwarder) = behind_a_forwarder("silent_runtime").await;
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("master.key");
    let settings = |url: String, follows: bool| {
        let key = key.clone();
        move |c: &mut portcullis::config::Config| {
            c.database.url = SecretString::from(url);
            c.database.acquire_timeout = Duration::from_secs(1);
            c.config_center.master_key_file = Some(key);
            c.config_center.runtime_environment = follows.then(|| "dev".to_owned());
            c.protection.auth_rate.burst = 1000;
        }
    };
    // migrates the database (so that the releases' table is there to be locked) and
    // publishes; follows no runtime settings itself, so that the read held is this one's
    let elsewhere = spawn_app(settings(direct.to_string(), false)).await;
    let held = LockedTable::hold(&direct, "config_releases").await;
    let here = spawn_app(settings(via.to_string(), true)).await;
    held.until_a_statement_waits("the first read of the runtime settings")
        .await;
    forwarder.go_silent();
    let silenced = Instant::now();
    held.release().await;
    let tight = serde_json::json!([
        { "key": "protection.auth_rate.burst", "value": "2" },
        { "key": "protection.auth_rate.replenish_every", "value": "1h" }
    ]);
    assert_eq!(publish(&elsewhere, tight).await, 201);

    let applied_after = time_until(silenced, Duration::from_secs(60), || async {
        limited(&here, 3).await > 0
    })
    .await;
    println!("SILENT RUNTIME the tighter login limit in force here after {applied_after:?}");
    let applied_after = applied_after.expect("the settings applied here within 60 s");
    let bound = portcullis::config_api::hub::STEP_DEADLINE + Duration::from_secs(15);
    assert!(applied_after < bound, "{applied_after:?}");
}

/// An instance whose migration at start is left waiting on a connection that a failover
/// silences gives that migration up once the server no longer knows its session, and
/// migrates again on a new one: the instance is migrated, and can become ready, within
/// seconds. Before, the migration waited on the silent session for as long as it stayed
/// silent (here for ever; on a crashed host about 15 minutes), and the instance stayed
/// unmigrated and not ready all that time. The migration is made to wait on a lock on
/// the migrations' own table before the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_left_waiting_on_a_silent_connection_is_made_again() {
    use super::migrations::instance_database;
    let (direct, via, forwarder) = behind_a_forwarder("silent_migration").await;
    // the schema is in place; an instance starting reads what was applied all the same
    let elsewhere = instance_database(direct.as_str());
    elsewhere.migrate().await.unwrap();
    elsewhere.close().await;
    let held = LockedTable::hold(&direct, "_sqlx_migrations").await;
    let here = instance_database(via.as_str());
    let stop = tokio_util::sync::CancellationToken::new();
    let migrating = tokio::spawn({
        let (here, stop) = (here.clone(), stop.clone());
        async move { here.migrate_until_done(stop).await }
    });
    held.until_a_statement_waits("the migration's read of what was applied")
        .await;
    forwarder.go_silent();
    let silenced = Instant::now();
    held.release().await;

    let migrated_after = time_until(silenced, Duration::from_secs(60), || async {
        here.is_migrated()
    })
    .await;
    println!("SILENT MIGRATION the instance migrated after {migrated_after:?}");
    let migrated_after = migrated_after.expect("the instance migrated within 60 s");
    assert!(
        migrated_after < Duration::from_secs(20),
        "{migrated_after:?}"
    );
    here.ping().await.unwrap();
    stop.cancel();
    migrating.await.unwrap();
}

/// Idle connections that a failover leaves silent cost the requests after it one short
/// check, not a 503 each: the first idle connection that does not answer is closed after a
/// third of `database.acquire_timeout`, those older than it unasked, and the request goes
/// on with a new connection. Before, sqlx's own check of an idle connection had no
/// deadline but the acquire's: each of the pool's idle connections cost the request that
/// drew it the whole acquire timeout and a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_left_silent_cost_one_short_check_not_a_503_each() {
    use super::migrations::instance_database;
    let (_direct, via, forwarder) = behind_a_forwarder("silent_idle").await;
    // the defaults: 4 connections kept open while idle, a 3 s acquire timeout
    let db = instance_database(via.as_str());
    db.migrate().await.unwrap();
    let portcullis::db::Pool::Postgres(pool) = db.pool() else {
        unreachable!()
    };
    // the connections warmed after the migration are given back in the background
    let idle = time_until(Instant::now(), Duration::from_secs(10), || async {
        pool.num_idle() >= 4
    })
    .await;
    assert!(idle.is_some(), "idle: {}", pool.num_idle());
    forwarder.go_silent();
    let silenced = Instant::now();

    let mut answers = Vec::new();
    for _ in 0..4 {
        let answer = db.ping().await;
        answers.push((silenced.elapsed(), answer.map_err(|e| e.to_string())));
    }
    println!("SILENT IDLE pings after the silence: {answers:?}");
    for (_, answer) in &answers {
        assert!(answer.is_ok(), "{answers:?}");
    }
    let acquire_timeout = Duration::from_secs(3);
    assert!(silenced.elapsed() < acquire_timeout, "{answers:?}");
    db.close().await;
}
