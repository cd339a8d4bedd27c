//! Break-glass local accounts: created by the CLI (password on stdin) in a real Postgres,
//! off unless enabled, audited on every use, and under the failure counters (per client
//! address, account-wide for unfamiliar addresses) whose answer does not tell whether the
//! account exists.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use harness::Postgres;
use keyrotation::{Clock, ManualClock};
use portcullis::config::Config;
use portcullis::protect::LockoutSettings;
use reqwest::{StatusCode, header};
use secrecy::SecretString;
use time::OffsetDateTime;

use super::support::*;

const PASSWORD: &str = "open-sesame-in-an-emergency";

fn origin(app: &TestApp) -> String {
    format!("https://localhost:{}", app.https.port())
}

async fn local_login(
    app: &TestApp,
    client: &reqwest::Client,
    user: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(app.url("/auth/local"))
        .header(header::ORIGIN, origin(app))
        .form(&[
            ("username", user),
            ("password", password),
            ("redirect", "/jobs"),
        ])
        .send()
        .await
        .unwrap()
}

fn browser(app: &TestApp) -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(reqwest::Certificate::from_pem(app.pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", app.https)
        .no_proxy()
        .build()
        .unwrap()
}

/// `portcullis users create NAME --role …` against `app`'s database, password on stdin.
fn cli_create(app: &TestApp, database_url: &str, name: &str, roles: &[&str], password: &str) {
    let mut args = vec!["create", name];
    for role in roles {
        args.extend(["--role", role]);
    }
    cli_users(app, database_url, "", &args, Some(password));
}

/// `portcullis users ARGS…` against `app`'s database (with `extra` TOML in its
/// configuration), `stdin` as its one line of input; asserts it succeeded without echoing
/// the password, and returns its standard output.
fn cli_users(
    app: &TestApp,
    database_url: &str,
    extra: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> String {
    let config = app.cli_config(
        "cli.toml",
        database_url,
        &format!("[sso]\nlocal_accounts = true\n{extra}"),
    );
    let mut child = Command::new(binary())
        .arg("users")
        .args(args)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(line) = stdin {
        writeln!(input, "{line}").unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "users {args:?}: {stdout}\n{stderr}");
    if let Some(password) = stdin {
        assert!(
            !stdout.contains(password) && !stderr.contains(password),
            "the password was echoed"
        );
    }
    stdout
}

async fn spawn_with_postgres(
    name: &str,
    clock: Arc<dyn Clock>,
    customize: impl FnOnce(&mut Config),
) -> (TestApp, String) {
    let db = Postgres::shared()
        .fresh_database(&format!("local_{name}"))
        .unwrap();
    (spawn_on(&db, clock, customize).await, db)
}

/// An instance with local accounts on, on the database `url`.
async fn spawn_on(
    url: &str,
    clock: Arc<dyn Clock>,
    customize: impl FnOnce(&mut Config),
) -> TestApp {
    let url = url.to_owned();
    // Origin checks need the public URL to be where the instance really listens
    let port = harness::free_port();
    spawn_app_with_clock(clock, move |c| {
        c.server.listen = ([127, 0, 0, 1], port).into();
        c.server.public_url = format!("https://localhost:{port}");
        c.database.url = SecretString::from(url);
        c.sso.local_accounts = true;
        customize(c);
    })
    .await
}

#[tokio::test]
async fn break_glass_login_is_refused_unless_enabled() {
    let app = spawn_app(|_| {}).await;
    let response = local_login(&app, &browser(&app), "breakglass", PASSWORD).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "local_login_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_created_account_logs_in_with_its_roles_and_every_use_is_audited() {
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let (app, db) = spawn_with_postgres("login", clock, |_| {}).await;
    cli_create(&app, &db, "breakglass", &["admin", "operator"], PASSWORD);

    let client = browser(&app);
    let wrong = local_login(&app, &client, "breakglass", "not-the-password-at-all").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let ok = local_login(&app, &client, "breakglass", PASSWORD).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()[header::LOCATION], "/jobs");
    let me: serde_json::Value = client
        .get(app.url("/auth/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"], "breakglass");
    assert_eq!(me["provider"], "local");
    assert_eq!(me["roles"], serde_json::json!(["admin", "operator"]));

    // a login without our Origin is refused (login CSRF)
    let cross = client
        .post(app.url("/auth/local"))
        .form(&[("username", "breakglass"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);

    let state = app.state.clone();
    eventually(Duration::from_secs(10), "audit entries stored", || {
        let db = state.db.clone();
        async move {
            let ok = portcullis::audit::recent(&db, "login.success", 10)
                .await
                .unwrap_or_default();
            let failed = portcullis::audit::recent(&db, "login.failure", 10)
                .await
                .unwrap_or_default();
            let created = portcullis::audit::recent(&db, "local_account.create", 10)
                .await
                .unwrap_or_default();
            ok.iter()
                .any(|(actor, _, d)| actor == "user:local:breakglass" && d.contains("break_glass"))
                && failed
                    .iter()
                    .any(|(actor, _, _)| actor == "user:local:breakglass")
                && created.iter().any(|(_, target, _)| target == "breakglass")
        }
    })
    .await;
    // the stored hash is Argon2id, never the password
    let stored = Postgres::shared()
        .psql(
            db.rsplit('/').next().unwrap(),
            "SELECT password_hash FROM local_accounts WHERE name = 'breakglass'",
        )
        .unwrap();
    assert!(stored.contains("$argon2id$"), "{stored}");
    assert!(!stored.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_account_reads_the_same_as_an_unknown_one() {
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let (app, db) = spawn_with_postgres("lockout", clock.clone(), |c| {
        c.protection.lockout = LockoutSettings {
            free_failures: 1,
            max_failures: 2,
            account_max_failures: 100,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            lockout: Duration::from_secs(900),
            key_prefix: prefix,
        };
    })
    .await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    let client = browser(&app);
    let mut bodies = Vec::new();
    for user in ["breakglass", "nobody"] {
        let first = local_login(&app, &client, user, "wrong-password-123456").await;
        assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
        bodies.push(first.text().await.unwrap());
        // past the 1 ms backoff
        clock.advance(time::Duration::milliseconds(5));
        let second = local_login(&app, &client, user, "wrong-password-123456").await;
        assert_eq!(second.status(), StatusCode::UNAUTHORIZED);
        let locked = local_login(&app, &client, user, PASSWORD).await;
        assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS, "{user}");
        assert!(locked.headers().contains_key(header::RETRY_AFTER));
        bodies.push(locked.text().await.unwrap());
    }
    // wrong password vs unknown account, and their lockouts, answer alike
    assert_eq!(bodies[0], bodies[2]);
    assert_eq!(bodies[1], bodies[3]);
}

/// Parallel wrong passwords cannot outrun the lockout: each attempt is counted before its
/// password is checked, so of twenty at once from one address against an account allowed
/// ten failures per address, ten are checked (401) and the rest refused (429), across
/// instances sharing Redis. A correct password clears its own attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_meet_the_lockout_after_max_failures() {
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let settings = LockoutSettings {
        free_failures: 9,
        max_failures: 10,
        account_max_failures: 100,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        lockout: Duration::from_secs(900),
        key_prefix: prefix.clone(),
    };
    let shared = |lockout_settings: LockoutSettings| {
        move |c: &mut Config| {
            c.redis = Some(
                toml::from_str(&format!("url = \"{}\"\n", harness::Redis::shared().url())).unwrap(),
            );
            c.refresh.key_prefix = format!("{}rt:", lockout_settings.key_prefix);
            c.protection.lockout = lockout_settings;
            c.protection.auth_rate = portcullis::protect::RateSettings {
                burst: 1000,
                replenish_every: Duration::from_millis(1),
            };
        }
    };
    let (app, db) = spawn_with_postgres("race", clock.clone(), shared(settings.clone())).await;
    // a second instance on the same database and Redis: the counts are the cluster's
    let other = spawn_on(&db, clock.clone(), shared(settings.clone())).await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    let counters = portcullis::protect::Lockout::new(
        Arc::new(portcullis::protect::lockout::RedisFailureStore::new(
            app.state.redis.clone().unwrap(),
        )),
        settings,
    );
    let clear = (
        portcullis::protect::Verdict::Allowed {
            had_failures: false,
        },
        portcullis::protect::Scope::Address,
    );
    // every request comes from 127.0.0.1 (no trusted proxy)
    let verdict = || async {
        counters
            .check_account("breakglass", [127, 0, 0, 1].into(), clock.now())
            .await
            .unwrap()
    };

    // a correct password leaves no count behind
    let ok = local_login(&app, &browser(&app), "breakglass", PASSWORD).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(verdict().await, clear);

    // half of them to each instance
    let attempts = (0..20).map(|i| {
        let app = if i % 2 == 0 { &app } else { &other };
        let client = browser(app);
        async move {
            local_login(app, &client, "breakglass", "wrong-password-123456")
                .await
                .status()
        }
    });
    let statuses = futures::future::join_all(attempts).await;
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((checked, refused), (10, 10), "{statuses:?}");
    // locked now, even for the right password
    let locked = local_login(&app, &browser(&app), "breakglass", PASSWORD).await;
    assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(matches!(
        verdict().await,
        (portcullis::protect::Verdict::Refused(r), portcullis::protect::Scope::Address) if r.locked
    ));
}

async fn local_login_from(
    app: &TestApp,
    user: &str,
    password: &str,
    from: &str,
) -> reqwest::Response {
    browser(app)
        .post(app.url("/auth/local"))
        .header(header::ORIGIN, origin(app))
        .header("x-forwarded-for", from)
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .unwrap()
}

/// Failures are counted per (account, client address): an attacker who knows the
/// break-glass name and sends wrong passwords locks out the address it sends them from,
/// not the account, so the owner still logs in from another address (exactly when the
/// identity provider is down and break-glass is needed). The addresses of one IPv6 /64
/// are one address here, as in the per-IP buckets.
async fn an_attacker_address_locks_itself_out_while_the_owner_logs_in(redis: bool) {
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let name = if redis { "smart_redis" } else { "smart_memory" };
    let (app, db) = spawn_with_postgres(name, clock.clone(), move |c| {
        if redis {
            c.redis = Some(
                toml::from_str(&format!("url = \"{}\"\n", harness::Redis::shared().url())).unwrap(),
            );
            c.refresh.key_prefix = format!("{prefix}rt:");
        }
        c.protection.trusted_proxies = vec!["127.0.0.1".to_owned()];
        c.protection.lockout = LockoutSettings {
            free_failures: 1,
            max_failures: 2,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            lockout: Duration::from_secs(900),
            key_prefix: prefix,
            ..LockoutSettings::default()
        };
    })
    .await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    let wrong = "wrong-password-123456";

    let attacker = "203.0.113.66";
    for _ in 0..2 {
        let r = local_login_from(&app, "breakglass", wrong, attacker).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        clock.advance(time::Duration::milliseconds(5));
    }
    // the attacker's address is locked, even for the right password
    let r = local_login_from(&app, "breakglass", PASSWORD, attacker).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key(header::RETRY_AFTER));
    // the owner, from elsewhere, is not
    let owner = "198.51.100.7";
    let r = local_login_from(&app, "breakglass", PASSWORD, owner).await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "the owner was locked out"
    );
    // and the attacker stays locked after the owner's success
    let r = local_login_from(&app, "breakglass", PASSWORD, attacker).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // a fresh address of the same /64 is the same attacker
    for host in ["2001:db8:7:1::10", "2001:db8:7:1::11"] {
        let r = local_login_from(&app, "breakglass", wrong, host).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        clock.advance(time::Duration::milliseconds(5));
    }
    let r = local_login_from(&app, "breakglass", PASSWORD, "2001:db8:7:1:dead:beef:0:1").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // the neighbouring /64 is someone else
    let r = local_login_from(&app, "breakglass", PASSWORD, "2001:db8:7:2::10").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_address_locks_itself_out_while_the_owner_logs_in_in_memory() {
    an_attacker_address_locks_itself_out_while_the_owner_logs_in(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_address_locks_itself_out_while_the_owner_logs_in_in_redis() {
    an_attacker_address_locks_itself_out_while_the_owner_logs_in(true).await;
}

/// Many addresses together still meet a bound: the account-wide counter locks the account
/// for every address it has not logged in from (here: all of them) at
/// `account_max_failures`, until the lockout ends. Both kinds of lock are audited with the
/// address bucket and which counter locked.
/// Two failures lock an address bucket and four lock the account everywhere, for 15
/// minutes, with hardly any backoff before: a policy small enough to walk through.
fn small_account_lockout(key_prefix: String) -> LockoutSettings {
    LockoutSettings {
        free_failures: 1,
        max_failures: 2,
        account_max_failures: 4,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        lockout: Duration::from_secs(900),
        key_prefix,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_wide_threshold_locks_every_address() {
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let (app, db) = spawn_with_postgres("account_wide", clock.clone(), move |c| {
        c.protection.trusted_proxies = vec!["127.0.0.1".to_owned()];
        c.protection.lockout = small_account_lockout(prefix);
    })
    .await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    let wrong = "wrong-password-123456";
    // two from one /64 lock that address bucket (and count twice account-wide)
    for host in ["2001:db8:5:1::1", "2001:db8:5:1::2"] {
        let r = local_login_from(&app, "breakglass", wrong, host).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        clock.advance(time::Duration::milliseconds(5));
    }
    // two more addresses reach the account-wide threshold
    for host in ["192.0.2.1", "192.0.2.2"] {
        let r = local_login_from(&app, "breakglass", wrong, host).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    // now every address is refused, the right password too, without looking at it
    for host in ["198.51.100.7", "192.0.2.3"] {
        let r = local_login_from(&app, "breakglass", PASSWORD, host).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{host}");
        assert!(r.headers().contains_key(header::RETRY_AFTER));
    }
    clock.advance(time::Duration::seconds(900));
    let r = local_login_from(&app, "breakglass", PASSWORD, "198.51.100.7").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    let state = app.state.clone();
    eventually(Duration::from_secs(10), "both lockouts audited", || {
        let db = state.db.clone();
        async move {
            let rows = portcullis::audit::recent(&db, "login.lockout", 10)
                .await
                .unwrap_or_default();
            let detail = |scope: &str, address: &str| {
                rows.iter().any(|(actor, _, d)| {
                    let d: serde_json::Value = serde_json::from_str(d).unwrap_or_default();
                    actor == "user:local:breakglass"
                        && d["scope"] == scope
                        && d["address"] == address
                })
            };
            detail("address", "2001:db8:5:1::") && detail("account", "192.0.2.2")
        }
    })
    .await;
    let refused = portcullis::audit::recent(&app.state.db, "login.failure", 20)
        .await
        .unwrap();
    assert!(
        refused.iter().any(|(_, _, d)| {
            let d: serde_json::Value = serde_json::from_str(d).unwrap_or_default();
            d["reason"] == "locked" && d["scope"] == "account" && d["address"] == "198.51.100.7"
        }),
        "{refused:?}"
    );
}

/// Smart lockout end to end: once the owner has logged in from an address, an attacker
/// with many addresses who reaches the account-wide lock does not lock the owner out of
/// it. The owner from that address still logs in with the right password; from a new
/// address they are refused like anyone else; and the address is familiar to that account
/// only. (On the account-wide counter alone, the owner's familiar address got 429.)
async fn a_familiar_address_logs_in_through_the_account_wide_lock(redis: bool) {
    let prefix = format!("test-{}:lock:", uuid::Uuid::new_v4());
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let name = if redis {
        "familiar_redis"
    } else {
        "familiar_memory"
    };
    let (app, db) = spawn_with_postgres(name, clock.clone(), move |c| {
        if redis {
            c.redis = Some(
                toml::from_str(&format!("url = \"{}\"\n", harness::Redis::shared().url())).unwrap(),
            );
            c.refresh.key_prefix = format!("{prefix}rt:");
        }
        c.protection.trusted_proxies = vec!["127.0.0.1".to_owned()];
        c.protection.lockout = small_account_lockout(prefix);
    })
    .await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    cli_create(&app, &db, "standby", &["admin"], PASSWORD);
    let wrong = "wrong-password-123456";

    // the owner has logged in from home before
    let home = "198.51.100.7";
    let r = local_login_from(&app, "breakglass", PASSWORD, home).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    // four attacker addresses reach the account-wide threshold of both accounts
    for host in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"] {
        for user in ["breakglass", "standby"] {
            let r = local_login_from(&app, user, wrong, host).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{user} from {host}");
        }
    }
    // a new address is refused, the right password too
    for host in ["192.0.2.5", "203.0.113.9"] {
        let r = local_login_from(&app, "breakglass", PASSWORD, host).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{host}");
    }
    // the owner at home is not
    let r = local_login_from(&app, "breakglass", PASSWORD, home).await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "the owner was locked out of a familiar address"
    );
    // and that success lifts nothing for new addresses
    let r = local_login_from(&app, "breakglass", PASSWORD, "203.0.113.10").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // home is familiar to breakglass only
    let r = local_login_from(&app, "standby", PASSWORD, home).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // a familiar address still meets its own lock
    for _ in 0..2 {
        let r = local_login_from(&app, "breakglass", wrong, home).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        clock.advance(time::Duration::milliseconds(5));
    }
    let r = local_login_from(&app, "breakglass", PASSWORD, home).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // the trail tells the owner's typos at home from the attacker's guesses, and says
    // whose failure locked the address
    let state = app.state.clone();
    eventually(Duration::from_secs(10), "failures audited", || {
        let db = state.db.clone();
        async move {
            let rows = portcullis::audit::recent(&db, "login.failure", 50)
                .await
                .unwrap_or_default();
            let familiar = |address: &str| -> Vec<serde_json::Value> {
                rows.iter()
                    .filter(|(actor, _, _)| actor == "user:local:breakglass")
                    .map(|(_, _, d)| serde_json::from_str(d).unwrap_or_default())
                    .filter(|d: &serde_json::Value| {
                        d["reason"] == "invalid_credentials" && d["address"] == address
                    })
                    .map(|d| d["familiar"].clone())
                    .collect()
            };
            familiar(home) == [true, true] && familiar("192.0.2.1") == [false]
        }
    })
    .await;
    let lockouts = portcullis::audit::recent(&app.state.db, "login.lockout", 20)
        .await
        .unwrap();
    assert!(
        lockouts.iter().any(|(_, _, d)| {
            let d: serde_json::Value = serde_json::from_str(d).unwrap_or_default();
            d["scope"] == "address" && d["address"] == home && d["familiar"] == true
        }),
        "{lockouts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_familiar_address_logs_in_through_the_account_wide_lock_in_memory() {
    a_familiar_address_logs_in_through_the_account_wide_lock(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_familiar_address_logs_in_through_the_account_wide_lock_in_redis() {
    a_familiar_address_logs_in_through_the_account_wide_lock(true).await;
}

/// A submitted name that could never be an account name (here with a NUL) is audited as
/// `(malformed)`, never as submitted: it is attacker-chosen text headed for the trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_username_is_audited_as_malformed() {
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let (app, _db) = spawn_with_postgres("malformed", clock, |_| {}).await;
    let client = browser(&app);
    let refused = local_login(&app, &client, "ghost\0\u{1b}[2J", "wrong-password-123456").await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    wait_for_audit_actor(
        &app.state,
        Duration::from_secs(10),
        "login.failure",
        "user:local:(malformed)",
    )
    .await;
    let rows = portcullis::audit::recent(&app.state.db, "login.failure", 10)
        .await
        .unwrap();
    // nowhere in the record: not as the actor, the target or in the detail
    assert!(
        rows.iter().all(|(actor, target, detail)| {
            let whole = format!("{actor}{target}{detail}");
            !whole.contains("ghost") && !whole.contains('\u{1b}') && !whole.contains("u001b")
        }),
        "{rows:?}"
    );
}

/// `GET /auth/me` with `client`'s cookies: 200 with a live session (renewing it from the
/// refresh cookie when the access cookie's token has expired), 401 without one.
async fn me(app: &TestApp, client: &reqwest::Client) -> StatusCode {
    client
        .get(app.url("/auth/me"))
        .send()
        .await
        .unwrap()
        .status()
}

/// The `reason`s of the `session.ended` records of `subject`, oldest first.
async fn ended_sessions(app: &TestApp, subject: &str) -> Vec<String> {
    let mut reasons: Vec<(i64, String)> =
        portcullis::audit::recent(&app.state.db, "session.ended", 50)
            .await
            .unwrap()
            .into_iter()
            .filter(|(actor, _, _)| actor == &format!("user:{subject}"))
            .map(|(_, _, d)| {
                let d: serde_json::Value = serde_json::from_str(&d).unwrap_or_default();
                (
                    d["auth_time"].as_i64().unwrap_or_default(),
                    d["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
    reasons.sort();
    reasons.into_iter().map(|(_, r)| r).collect()
}

/// Every change an operator makes to a break-glass account — a new password, new roles,
/// disabling, removing — ends the console sessions it started before, at their next
/// renewal, even where the command cannot reach the refresh-token store (here the
/// instance keeps it in memory); an untouched account's session renews, and so does one
/// started after the change. Each ending is audited with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_or_removed_account_s_sessions_end_at_their_next_renewal() {
    // the CLI stamps its changes with the wall clock, so the instance keeps it too; its
    // access tokens live a second, and a browser drops the cookie holding one after that,
    // so that the next request renews the session from the refresh cookie
    let (app, db) = spawn_with_postgres("lifecycle", Arc::new(keyrotation::SystemClock), |c| {
        c.sso.access_token_lifetime = Duration::from_secs(1);
    })
    .await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    let past_the_access_token = || tokio::time::sleep(Duration::from_millis(1500));
    let log_in = |password: &'static str| {
        let app = &app;
        async move {
            let client = browser(app);
            let r = local_login(app, &client, "breakglass", password).await;
            (r.status(), client)
        }
    };

    let (status, first) = log_in(PASSWORD).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    past_the_access_token().await;
    assert_eq!(
        me(&app, &first).await,
        StatusCode::OK,
        "an untouched account renews"
    );

    // a new password: the old one is refused, sessions made with it end
    const NEW_PASSWORD: &str = "a-new-password-after-the-incident";
    let out = cli_users(
        &app,
        &db,
        "",
        &["set-password", "breakglass"],
        Some(NEW_PASSWORD),
    );
    assert!(out.contains("breakglass: password changed"), "{out}");
    assert_eq!(log_in(PASSWORD).await.0, StatusCode::UNAUTHORIZED);
    let (status, second) = log_in(NEW_PASSWORD).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    past_the_access_token().await;
    assert_eq!(me(&app, &first).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        me(&app, &second).await,
        StatusCode::OK,
        "a login after the change renews"
    );

    // new roles: the next login has them, the session before does not renew with the old
    cli_users(
        &app,
        &db,
        "",
        &["set-roles", "breakglass", "--role", "viewer"],
        None,
    );
    let (_, third) = log_in(NEW_PASSWORD).await;
    let roles: serde_json::Value = third
        .get(app.url("/auth/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(roles["roles"], serde_json::json!(["viewer"]));
    past_the_access_token().await;
    assert_eq!(me(&app, &second).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(&app, &third).await, StatusCode::OK);

    // disabled: no login, and the session ends; enabled again, a new login works
    cli_users(&app, &db, "", &["disable", "breakglass"], None);
    assert_eq!(log_in(NEW_PASSWORD).await.0, StatusCode::UNAUTHORIZED);
    past_the_access_token().await;
    assert_eq!(me(&app, &third).await, StatusCode::UNAUTHORIZED);
    let listed = cli_users(&app, &db, "", &["list", "--json"], None);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["accounts"][0]["name"], "breakglass");
    assert_eq!(listed["accounts"][0]["enabled"], false);
    assert_eq!(
        listed["accounts"][0]["roles"],
        serde_json::json!(["viewer"])
    );
    assert!(listed["accounts"][0].get("password_hash").is_none());
    cli_users(&app, &db, "", &["enable", "breakglass"], None);
    let (status, fourth) = log_in(NEW_PASSWORD).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    // enabling an account that is enabled changes nothing, and ends nothing
    cli_users(&app, &db, "", &["enable", "breakglass"], None);
    past_the_access_token().await;
    assert_eq!(me(&app, &fourth).await, StatusCode::OK);

    // removed: the session ends and the name logs in no more
    cli_users(&app, &db, "", &["delete", "breakglass"], None);
    past_the_access_token().await;
    assert_eq!(me(&app, &fourth).await, StatusCode::UNAUTHORIZED);
    assert_eq!(log_in(NEW_PASSWORD).await.0, StatusCode::UNAUTHORIZED);
    let listed = cli_users(&app, &db, "", &["list"], None);
    assert!(listed.contains("(no local accounts)"), "{listed}");

    eventually(
        Duration::from_secs(10),
        "four session endings audited",
        || {
            let app = &app;
            async move { ended_sessions(app, "local:breakglass").await.len() >= 4 }
        },
    )
    .await;
    assert_eq!(
        ended_sessions(&app, "local:breakglass").await,
        [
            "account_changed",
            "account_changed",
            "account_disabled",
            "account_removed"
        ]
    );
    for action in [
        "local_account.set_password",
        "local_account.set_roles",
        "local_account.disable",
        "local_account.enable",
        "local_account.delete",
    ] {
        let rows = portcullis::audit::recent(&app.state.db, action, 5)
            .await
            .unwrap();
        assert!(
            rows.iter()
                .any(|(actor, target, _)| actor.starts_with("operator:cli:")
                    && target == "breakglass"),
            "{action}: {rows:?}"
        );
    }
}

/// With the refresh-token store in Redis, a change ends the account's sessions at once:
/// the command revokes them there and says how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_account_revokes_its_sessions_in_redis_at_once() {
    let redis_url = harness::Redis::shared().url();
    let prefix = format!("test-{}:", uuid::Uuid::new_v4());
    let (app, db) = spawn_with_postgres("revoke", Arc::new(keyrotation::SystemClock), {
        let (redis_url, prefix) = (redis_url.clone(), prefix.clone());
        move |c| {
            c.redis = Some(toml::from_str(&format!("url = \"{redis_url}\"\n")).unwrap());
            c.refresh.key_prefix = format!("{prefix}rt:");
            c.protection.lockout.key_prefix = format!("{prefix}lock:");
            c.sso.key_prefix = format!("{prefix}sso:");
        }
    })
    .await;
    cli_create(&app, &db, "breakglass", &["admin"], PASSWORD);
    let mut browsers = Vec::new();
    for _ in 0..2 {
        let client = browser(&app);
        let r = local_login(&app, &client, "breakglass", PASSWORD).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        browsers.push(client);
    }
    let live = || async {
        app.state
            .refresh
            .list_sessions("local:breakglass", app.state.keys.now())
            .await
            .unwrap()
            .len()
    };
    assert_eq!(live().await, 2);
    let extra =
        format!("[redis]\nurl = \"{redis_url}\"\n[refresh]\nkey_prefix = \"{prefix}rt:\"\n");
    let out = cli_users(&app, &db, &extra, &["disable", "breakglass"], None);
    assert!(
        out.contains("breakglass: disabled; 2 console session(s) ended"),
        "{out}"
    );
    assert_eq!(live().await, 0, "revoked in Redis by the command itself");
    let revoked = portcullis::audit::recent(&app.state.db, "local_account.disable", 5)
        .await
        .unwrap();
    assert!(
        revoked
            .iter()
            .any(|(_, target, d)| target == "breakglass" && d.contains("\"sessions_revoked\":2")),
        "{revoked:?}"
    );
}
