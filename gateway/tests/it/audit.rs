//! The hash-chained audit trail, against real Postgres (and Redis) and the `--dev` SQLite:
//! what a session leaves in it, one chain across instances, tampering caught by
//! `portcullis audit verify`, the admin API's filters and pages, the JSON-lines sink, and
//! no secret anywhere in it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{Postgres, Redis};
use portcullis::audit::{AuditEvent, ChainBreak};
use portcullis::clients::{GrantType, NewClient, ScopeSet};
use portcullis::refresh::NewFamily;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::support::*;

const ADMIN_TOKEN: &str = "audit-admin-token-5b1f0e9c2d7a4e38";
const CONFIG_SECRET: &str = "pw-audit-Zq81-never-in-the-trail";

// === helpers ===

/// An instance on the Postgres database `db` and the shared Redis (own key prefix), with
/// `admin.token` and the given sink.
async fn pg_app(db: &str, sink: Option<&Path>) -> TestApp {
    pg_app_with(db, sink, |_| {}).await
}

/// [`pg_app`], its configuration then changed by `customize`.
async fn pg_app_with(
    db: &str,
    sink: Option<&Path>,
    customize: impl FnOnce(&mut portcullis::config::Config),
) -> TestApp {
    let (db, redis) = (db.to_owned(), Redis::shared().url());
    let sink = sink.map(|p| format!("file:{}", p.display()));
    spawn_app(move |c| {
        c.database.url = SecretString::from(db);
        c.redis = Some(portcullis::config::RedisConfig {
            url: SecretString::from(redis),
            cluster: false,
            command_timeout: Duration::from_secs(2),
        });
        c.refresh.key_prefix = format!("audit-{}:", uuid::Uuid::new_v4());
        c.refresh.reuse_grace = Duration::from_millis(1);
        c.admin.token = Some(SecretString::from(ADMIN_TOKEN));
        if let Some(s) = sink {
            c.audit.sink = s.parse_sink();
        }
        customize(c);
    })
    .await
}

trait ParseSink {
    fn parse_sink(self) -> portcullis::config::AuditSinkKind;
}

impl ParseSink for String {
    fn parse_sink(self) -> portcullis::config::AuditSinkKind {
        portcullis::config::AuditSinkKind::try_from(self).unwrap()
    }
}

/// A fresh database named from `prefix`, an instance on it, and one record of `action`
/// stored through it (its writer has appended once: connection open, chain begun); with
/// the time that record was made.
async fn pg_app_after_one_record(prefix: &str, action: &str) -> (String, TestApp, OffsetDateTime) {
    let db = Postgres::shared().fresh_database(prefix).unwrap();
    let app = pg_app(&db, None).await;
    let at = OffsetDateTime::now_utc();
    app.state
        .audit
        .record(event("operator:test", action, "0", at));
    wait_for(&app, action, 1).await;
    (db, app, at)
}

/// `GET /admin/audit<query>` with the admin token.
async fn audit_api(app: &TestApp, query: &str) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .get(format!("http://{}/admin/audit{query}", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

/// Every record, through the API, following the cursor.
async fn all_records(app: &TestApp) -> Vec<Value> {
    let mut out = Vec::new();
    let mut query = "?limit=1000".to_owned();
    loop {
        let (status, body) = audit_api(app, &query).await;
        assert_eq!(status, 200, "{body}");
        out.extend(body["records"].as_array().unwrap().iter().cloned());
        match body["next_after_seq"].as_str() {
            Some(next) => query = format!("?limit=1000&after_seq={next}"),
            None => return out,
        }
    }
}

/// Waits until the trail holds `n` records of `action`.
async fn wait_for(app: &TestApp, action: &str, n: usize) {
    let state = app.state.clone();
    eventually(
        Duration::from_secs(20),
        &format!("{n} `{action}` records stored"),
        || {
            let db = state.db.clone();
            async move {
                portcullis::audit::recent(&db, action, 100_000)
                    .await
                    .map(|r| r.len() >= n)
                    .unwrap_or(false)
            }
        },
    )
    .await;
}

/// Runs `portcullis audit <args>` against `database_url` (a config file written next to
/// `app`'s certificate and key ring); returns the exit code, stdout and stderr.
fn cli(app: &TestApp, database_url: &str, args: &[&str]) -> (i32, String, String) {
    let config = app.cli_config("audit-cli.toml", database_url, "");
    let out = Command::new(binary())
        .arg("audit")
        .args(args)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn event(actor: &str, action: &str, target: &str, at: OffsetDateTime) -> AuditEvent {
    AuditEvent {
        at,
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        source_ip: Some("192.0.2.1".to_owned()),
        detail: json!({ "n": target }).into(),
    }
}

/// Records `count` events of `action` by `operator:test` at `app`, with targets `0`,
/// `1`, …
fn record_numbered(app: &TestApp, action: &str, count: usize, at: OffsetDateTime) {
    for n in 0..count {
        app.state
            .audit
            .record(event("operator:test", action, &n.to_string(), at));
    }
}

fn sink_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

/// Re-verifies records as a SIEM would, from their JSON form alone: every link and hash.
fn verify_json_chain(records: &[Value]) {
    let mut prev = portcullis::audit::chain::GENESIS.to_owned();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"].as_i64().unwrap(), i as i64 + 1, "gap before {r}");
        assert_eq!(r["prev_hash"].as_str().unwrap(), prev, "link of {r}");
        let hash = portcullis::audit::chain::record_hash(
            r["seq"].as_i64().unwrap(),
            &prev,
            r["at_unix_ms"].as_i64().unwrap(),
            r["actor"].as_str().unwrap(),
            r["action"].as_str().unwrap(),
            r["target"].as_str().unwrap(),
            r["source_ip"].as_str(),
            &r["detail"].to_string(),
        );
        assert_eq!(r["hash"].as_str().unwrap(), hash, "hash of {r}");
        prev = hash;
    }
}

/// Runs `scripts/audit-verify.py` (the independent verifier of the documentation) on
/// JSON lines; returns its exit code and output.
fn python_verify(lines: &[u8]) -> (i32, String) {
    python_verify_with(lines, &[])
}

/// [`python_verify`] with command-line arguments.
fn python_verify_with(lines: &[u8], args: &[&str]) -> (i32, String) {
    use std::io::Write;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/audit-verify.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(lines).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub(super) fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

// === a whole session ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_is_in_the_trail_with_who_when_where_and_what_and_no_secret() {
    let started = OffsetDateTime::now_utc() - Duration::from_secs(1);
    let db = Postgres::shared().fresh_database("audit_session").unwrap();
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = sink_dir.path().join("audit.jsonl");
    let app = pg_app(&db, Some(&sink)).await;
    let http = app.https_client();
    let admin = reqwest::Client::new();

    // a client, registered through the admin API
    let created: Value = admin
        .post(format!("http://{}/admin/clients", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "id": "svc-audit",
            "name": "audited service",
            "grant_types": ["client_credentials", "refresh_token"],
            "scopes": ["config:read:prod", "config:write:prod"],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["secret"].as_str().unwrap().to_owned();

    // a wrong secret, then a token
    let wrong = post_as_client(
        &http,
        app.url("/oauth2/token"),
        "svc-audit",
        "not-the-secret",
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(wrong.status(), 401);
    let issued: Value = post_as_client(
        &http,
        app.url("/oauth2/token"),
        "svc-audit",
        &secret,
        &[("grant_type", "client_credentials")],
    )
    .await
    .json()
    .await
    .unwrap();
    let access = issued["access_token"].as_str().unwrap().to_owned();
    let claims: Value = app.state.keys.verify(&access).unwrap();
    let jti = claims["jti"].as_str().unwrap().to_owned();

    // a user's session: refreshed, then its first token re-used (the family is revoked)
    let now = app.state.keys.now();
    let family = |subject: &str| NewFamily {
        client_id: "svc-audit".to_owned(),
        subject: subject.to_owned(),
        scope: "config:read:prod".to_owned(),
        audience: vec![],
        auth_time: now,
        session: json!({}),
    };
    let first = app.state.refresh.issue(family("alice"), now).await.unwrap();
    let refresh = |token: String| {
        let (http, url, secret) = (http.clone(), app.url("/oauth2/token"), secret.clone());
        async move {
            let r = post_as_client(
                &http,
                url,
                "svc-audit",
                &secret,
                &[("grant_type", "refresh_token"), ("refresh_token", &token)],
            )
            .await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let rt1 = first.token.expose_secret().to_owned();
    let (status, body) = refresh(rt1.clone()).await;
    assert_eq!(status, 200, "{body}");
    let rt2 = body["refresh_token"].as_str().unwrap().to_owned();
    let refreshed_access = body["access_token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, _) = refresh(rt1.clone()).await;
    assert_eq!(status, 400, "re-use past the grace window");

    // another session, revoked by its client (RFC 7009)
    let second = app.state.refresh.issue(family("bob"), now).await.unwrap();
    let rt3 = second.token.expose_secret().to_owned();
    let revoked = post_as_client(
        &http,
        app.url("/oauth2/revoke"),
        "svc-audit",
        &secret,
        &[("token", rt3.as_str())],
    )
    .await;
    assert_eq!(revoked.status(), 200);

    // a key rotation through the admin API: a reason over 500 characters is refused and
    // rotates nothing; a scheduled rotation's reason is recorded like an emergency's
    let too_long = admin
        .post(format!("http://{}/admin/keys/rotate", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "reason": "x".repeat(501) }))
        .send()
        .await
        .unwrap();
    assert_eq!(too_long.status(), 400);
    let rotated = admin
        .post(format!("http://{}/admin/keys/rotate", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "reason": "brought forward for the audit (OPS-42)" }))
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);

    // config: a write with a secret value, a gray release promoted, a rollback
    let config = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(
                method,
                app.url(&format!("/config/v1/prod/executor-orders{path}")),
            )
            .bearer_auth(&access);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, b) = config(
        reqwest::Method::PUT,
        "",
        Some(json!({ "entries": [
            { "key": "db.url", "value": "postgres://orders-db/orders" },
            { "key": "db.password", "value": CONFIG_SECRET, "secret": true },
        ] })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = config(
        reqwest::Method::PUT,
        "/gray",
        Some(json!({
            "entries": [{ "key": "db.url", "value": "postgres://canary" }],
            "selector": { "instances": ["node-7"] },
        })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let gray = b["version"].as_u64().unwrap();
    let (s, b) = config(
        reqwest::Method::POST,
        &format!("/gray/promote?version={gray}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = config(reqwest::Method::POST, "/rollback", Some(json!({ "to": 1 }))).await;
    assert_eq!(s, 201, "{b}");

    for action in [
        "client.create",
        "login.failure",
        "token.issue",
        "token.refresh",
        "refresh.reuse_detected",
        "refresh.revoke",
        "key.rotate",
        "key.transition",
        "config.publish",
        "config.gray",
        "config.promote",
        "config.rollback",
    ] {
        wait_for(&app, action, 1).await;
    }
    let records = all_records(&app).await;
    let ended = OffsetDateTime::now_utc() + Duration::from_secs(1);
    let find = |action: &str| -> Vec<&Value> {
        records.iter().filter(|r| r["action"] == action).collect()
    };
    // who, when, from where, what
    let check = |r: &Value, actor: &str, target: &str, from_request: bool| {
        assert_eq!(r["actor"], actor, "{r}");
        assert_eq!(r["target"], target, "{r}");
        let at = OffsetDateTime::parse(
            r["at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(started <= at && at <= ended, "{r}");
        if from_request {
            assert_eq!(r["source_ip"], "127.0.0.1", "{r}");
        }
    };
    check(
        find("client.create")[0],
        "operator:admin-api",
        "svc-audit",
        true,
    );
    check(
        find("login.failure")[0],
        "client:svc-audit",
        "svc-audit",
        true,
    );
    let issue = find("token.issue");
    assert_eq!(
        issue.len(),
        2,
        "client_credentials and the refresh: {issue:?}"
    );
    check(issue[0], "client:svc-audit", &jti, true);
    assert_eq!(issue[0]["detail"]["grant"], "client_credentials");
    assert_eq!(issue[1]["detail"]["grant"], "refresh_token");
    assert_eq!(issue[1]["detail"]["subject"], "alice");
    let family_id = first.session.family.to_string();
    check(
        find("token.refresh")[0],
        "client:svc-audit",
        &family_id,
        true,
    );
    check(
        find("refresh.reuse_detected")[0],
        "client:svc-audit",
        &family_id,
        true,
    );
    check(
        find("refresh.revoke")[0],
        "client:svc-audit",
        "svc-audit",
        true,
    );
    assert_eq!(
        find("key.rotate").len(),
        1,
        "the refused rotation is not recorded"
    );
    assert_eq!(find("key.rotate")[0]["actor"], "operator:admin-api");
    assert_eq!(
        find("key.rotate")[0]["detail"]["reason"],
        "brought forward for the audit (OPS-42)"
    );
    assert!(
        find("key.transition")
            .iter()
            .all(|r| r["actor"].as_str().unwrap().starts_with("instance:"))
    );
    for action in [
        "config.publish",
        "config.gray",
        "config.promote",
        "config.rollback",
    ] {
        check(
            find(action)[0],
            "client:svc-audit",
            "prod/executor-orders",
            true,
        );
    }
    assert_eq!(find("config.rollback")[0]["detail"]["restored_from"], 1);
    let keys: BTreeSet<&str> = find("config.publish")[0]["detail"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, BTreeSet::from(["db.password", "db.url"]));

    // the chain holds: from the API's JSON, and by `portcullis audit verify`
    verify_json_chain(&records);
    let (code, out, err) = cli(&app, &db, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{} records, chain intact", records.len())),
        "{out}"
    );

    // the sink received the same records, and they verify on their own
    let expected = records.len();
    eventually(Duration::from_secs(10), "sink caught up", || {
        let n = sink_lines(&sink).len();
        async move { n >= expected }
    })
    .await;
    let streamed = sink_lines(&sink);
    assert_eq!(streamed[..records.len()], records[..]);
    verify_json_chain(&streamed);
    // and by the documented verifier, which knows nothing of Portcullis
    let (code, out) = python_verify(&std::fs::read(&sink).unwrap());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{} records, chain intact", streamed.len())),
        "{out}"
    );

    // no secret of the session, anywhere in the trail
    let rows = Postgres::shared()
        .psql(
            database_name(&db),
            "SELECT row_to_json(a)::text FROM audit_events a",
        )
        .unwrap();
    let file = std::fs::read_to_string(&sink).unwrap();
    let signature = |jwt: &str| jwt.rsplit('.').next().unwrap().to_owned();
    for secret in [
        secret.as_str(),
        access.as_str(),
        &signature(&access),
        &refreshed_access,
        &rt1,
        &rt2,
        &rt3,
        ADMIN_TOKEN,
        CONFIG_SECRET,
    ] {
        assert!(!rows.contains(secret), "a secret is in audit_events");
        assert!(!file.contains(secret), "a secret is in the sink");
    }
}

// === what is stored is what was recorded ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_with_tabs_newlines_and_backslashes_are_stored_exactly_and_the_chain_verifies() {
    let db = Postgres::shared().fresh_database("audit_escapes").unwrap();
    let app = spawn_app({
        let db = db.clone();
        move |c| c.database.url = SecretString::from(db)
    })
    .await;
    // what a user name, a client's name or a detail may carry into the trail
    let nasty = [
        "tab\there",
        "new\nline and\r\ncrlf",
        "back\\slash \\N \\t \\.",
        "\\.",
        "quote \" and ' and , and ;",
        "unicode: Grüße, 日本, \u{1F512}",
        "",
    ];
    let at = OffsetDateTime::from_unix_timestamp(1_764_460_800).unwrap();
    let events: Vec<AuditEvent> = nasty
        .iter()
        .map(|v| AuditEvent {
            at,
            actor: format!("user:{v}"),
            action: "test.escape".to_owned(),
            target: (*v).to_owned(),
            source_ip: None,
            detail: json!({ "value": v, "raw": format!("{v}\t{v}") }).into(),
        })
        .collect();
    for e in &events {
        portcullis::audit::store(&app.state.db, &portcullis::config::AuditSinkKind::None, e)
            .await
            .unwrap();
    }
    let mut stored = portcullis::audit::recent(&app.state.db, "test.escape", 100)
        .await
        .unwrap();
    stored.reverse();
    assert_eq!(stored.len(), nasty.len());
    for ((actor, target, detail), e) in stored.iter().zip(&events) {
        assert_eq!(actor, &e.actor);
        assert_eq!(target, &e.target);
        let detail: Value = serde_json::from_str(detail).unwrap();
        assert_eq!(
            detail,
            serde_json::from_str::<Value>(e.detail.as_str()).unwrap()
        );
    }
    // a batch of them in one append, as the writer stores them
    portcullis::audit::chain::append(&app.state.db, &events)
        .await
        .unwrap();
    let intact = portcullis::audit::chain::verify(&app.state.db)
        .await
        .unwrap()
        .expect("the chain verifies over every stored byte");
    // the instance records events of its own (its start, its keys) in the same chain
    assert!(intact.records >= 2 * nasty.len() as i64, "{intact:?}");
    let escaped = portcullis::audit::recent(&app.state.db, "test.escape", 100)
        .await
        .unwrap();
    assert_eq!(escaped.len(), 2 * nasty.len());
}

// === what the database cannot store ===

/// An instance on the Postgres database `db` with break-glass local accounts on (its
/// public URL where it really listens, for the Origin check) and a file sink at `sink`.
async fn local_accounts_app(db: &str, sink: &Path) -> TestApp {
    let (db, sink) = (db.to_owned(), format!("file:{}", sink.display()));
    let port = harness::free_port();
    spawn_app(move |c| {
        c.server.listen = ([127, 0, 0, 1], port).into();
        c.server.public_url = format!("https://localhost:{port}");
        c.database.url = SecretString::from(db);
        c.sso.local_accounts = true;
        c.audit.sink = sink.parse_sink();
    })
    .await
}

/// The NUL request from the review: one unauthenticated request put a NUL byte into a
/// login failure's actor, Postgres refused the batch (SQLSTATE 22021) and the writer
/// retried it for ever, holding every later event of the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_a_login_name_does_not_stop_the_trail_and_the_chain_verifies() {
    let db = Postgres::shared()
        .fresh_database("audit_nul_login")
        .unwrap();
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = sink_dir.path().join("audit.jsonl");
    let app = local_accounts_app(&db, &sink).await;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(app.pki.ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("localhost", app.https)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let origin = format!("https://localhost:{}", app.https.port());

    for name in ["\0", "nobody-after-the-nul"] {
        let response = http
            .post(app.url("/auth/local"))
            .header(reqwest::header::ORIGIN, &origin)
            .form(&[("username", name), ("password", "x")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name:?}");
    }

    // the normal failure after it is stored, and so is the NUL one, without its NUL
    wait_for_audit_actor(
        &app.state,
        Duration::from_secs(20),
        "login.failure",
        "user:local:nobody-after-the-nul",
    )
    .await;
    let failures = portcullis::audit::recent(&app.state.db, "login.failure", 10)
        .await
        .unwrap();
    assert_eq!(failures.len(), 2, "{failures:?}");
    for (actor, target, detail) in &failures {
        assert!(
            !format!("{actor}{target}{detail}").contains('\0'),
            "a NUL was stored: {actor:?}"
        );
    }

    // the chain verifies in the database and, from the sink's lines, independently
    let intact = portcullis::audit::verify(&app.state.db)
        .await
        .unwrap()
        .expect("the chain is intact");
    eventually(Duration::from_secs(10), "every record in the sink", || {
        let n = sink_lines(&sink).len() as i64;
        async move { n == intact.records }
    })
    .await;
    verify_json_chain(&sink_lines(&sink));
    let (code, out) = python_verify(&std::fs::read(&sink).unwrap());
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_any_field_is_stored_as_a_replacement_character_and_hashed_as_stored() {
    let db = Postgres::shared()
        .fresh_database("audit_nul_fields")
        .unwrap();
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = sink_dir.path().join("audit.jsonl");
    let app = pg_app(&db, Some(&sink)).await;
    let at = OffsetDateTime::from_unix_timestamp(1_764_460_800).unwrap();
    app.state.audit.record(AuditEvent {
        at,
        actor: "user:a\0b".to_owned(),
        action: "test.nul".to_owned(),
        target: "\0".to_owned(),
        source_ip: Some("192.0.2.1\0".to_owned()),
        // `\u0000` in JSON text: Postgres stores it in `text`, but `jsonb` (a SIEM's
        // table, a query casting the column) refuses it
        detail: json!({ "name\0": "x\0y", "list": ["\0", "\\u0000"] }).into(),
    });
    app.state
        .audit
        .record(event("operator:test", "test.nul", "after", at));
    wait_for(&app, "test.nul", 2).await;

    let mut stored = portcullis::audit::recent(&app.state.db, "test.nul", 10)
        .await
        .unwrap();
    stored.reverse();
    assert_eq!(stored[0].0, "user:a\u{FFFD}b");
    assert_eq!(stored[0].1, "\u{FFFD}");
    assert_eq!(
        stored[0].2, r#"{"list":["�","\\u0000"],"name�":"x�y"}"#,
        "canonical JSON: an escaped backslash followed by u0000 is not a NUL"
    );
    assert_eq!(stored[1].1, "after");
    let ip = Postgres::shared()
        .psql(
            database_name(&db),
            "SELECT source_ip FROM audit_events WHERE action = 'test.nul' AND target <> 'after'",
        )
        .unwrap();
    assert_eq!(ip.trim(), "192.0.2.1\u{FFFD}");
    // jsonb takes every stored detail
    let cast = Postgres::shared()
        .psql(
            database_name(&db),
            "SELECT count(detail::jsonb) FROM audit_events WHERE action = 'test.nul'",
        )
        .unwrap();
    assert_eq!(cast.trim(), "2");

    portcullis::audit::verify(&app.state.db)
        .await
        .unwrap()
        .expect("the stored rows and their hashes agree");
    eventually(Duration::from_secs(10), "both in the sink", || {
        let n = sink_lines(&sink)
            .iter()
            .filter(|r| r["action"] == "test.nul")
            .count();
        async move { n == 2 }
    })
    .await;
    let (code, out) = python_verify(&std::fs::read(&sink).unwrap());
    assert_eq!(code, 0, "{out}");
}

/// Sanitising covers what we know Postgres refuses; anything else it refuses for an
/// event's content (here a CHECK constraint stands for it) must cost that event only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_set_aside_and_the_rest_of_its_batch_is_stored() {
    let db = Postgres::shared().fresh_database("audit_refused").unwrap();
    let app = pg_app(&db, None).await;
    Postgres::shared()
        .psql(
            database_name(&db),
            "ALTER TABLE audit_events ADD CONSTRAINT refuses_poison CHECK (target <> 'poison')",
        )
        .unwrap();
    let refused_before = app.sample("portcullis_audit_refused_total").await;
    let at = OffsetDateTime::now_utc();
    // one batch (recorded together, well within the writer's linger)
    for target in ["first", "poison", "last"] {
        app.state
            .audit
            .record(event("operator:test", "test.refused", target, at));
    }
    wait_for(&app, "test.refused", 2).await;
    // and the trail goes on
    app.state
        .audit
        .record(event("operator:test", "test.after", "x", at));
    wait_for(&app, "test.after", 1).await;

    let mut targets: Vec<String> = portcullis::audit::recent(&app.state.db, "test.refused", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, target, _)| target)
        .collect();
    targets.sort();
    assert_eq!(targets, ["first", "last"]);
    assert!(
        app.sample("portcullis_audit_refused_total").await >= refused_before + 1.0,
        "the refused event is counted"
    );
    portcullis::audit::verify(&app.state.db)
        .await
        .unwrap()
        .expect("no position was taken by the refused event");
}

// === one chain across instances ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_postgres_append_to_one_intact_chain() {
    let db = Postgres::shared().fresh_database("audit_three").unwrap();
    let spawn = || {
        let db = db.clone();
        spawn_app(move |c| c.database.url = SecretString::from(db))
    };
    let apps = [spawn().await, spawn().await, spawn().await];
    let (client, secret) = apps[0]
        .state
        .clients
        .create(
            NewClient {
                id: Some("svc-three".parse().unwrap()),
                name: "three".to_owned(),
                grant_types: BTreeSet::from([GrantType::ClientCredentials]),
                scopes: ScopeSet::parse("jobs:run").unwrap(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            apps[0].state.keys.now(),
        )
        .await
        .unwrap();
    let secret = secret.expose_secret().to_owned();

    // tokens through every instance at once, and bursts recorded straight into each
    const TOKENS: usize = 60;
    const DIRECT: usize = 400;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, app) in apps.iter().enumerate() {
        for _ in 0..TOKENS {
            let (http, url) = (app.https_client(), app.url("/oauth2/token"));
            let (id, secret) = (client.id.to_string(), secret.clone());
            tasks.spawn(async move {
                let r = post_as_client(
                    &http,
                    url,
                    &id,
                    &secret,
                    &[("grant_type", "client_credentials")],
                )
                .await;
                assert_eq!(r.status(), 200);
            });
        }
        let audit = app.state.audit.clone();
        tasks.spawn(async move {
            for n in 0..DIRECT {
                audit.record(event(
                    &format!("instance:{i}"),
                    "test.burst",
                    &n.to_string(),
                    OffsetDateTime::now_utc(),
                ));
                if n % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    wait_for(&apps[0], "token.issue", 3 * TOKENS).await;
    wait_for(&apps[0], "test.burst", 3 * DIRECT).await;

    let total: i64 = Postgres::shared()
        .psql(database_name(&db), "SELECT count(*) FROM audit_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let max_seq: i64 = Postgres::shared()
        .psql(database_name(&db), "SELECT max(seq) FROM audit_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(max_seq, total, "every record has its own position, no gap");
    let intact = portcullis::audit::verify(&apps[1].state.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(intact.records, total);
    let (code, out, err) = cli(&apps[2], &db, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{total} records, chain intact")),
        "{out}"
    );
    // all three wrote into it
    let writers = Postgres::shared()
        .psql(
            database_name(&db),
            "SELECT count(DISTINCT actor) FROM audit_events WHERE action = 'test.burst'",
        )
        .unwrap();
    assert_eq!(writers.trim(), "3");
}

// === a chain lock that is never released ===

/// The review's stall: an instance that vanished (power cut, network gone) inside an
/// append keeps its backend, and the chain head's row lock, until Postgres notices. Every
/// other instance's append must then fail within seconds, counted and retried, rather
/// than wait for it in silence; once the lock goes, everything recorded meanwhile is
/// stored once, the chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_behind_a_held_chain_lock_fail_within_seconds_and_are_stored_once_it_goes() {
    let (db, app, at) = pg_app_after_one_record("audit_held_lock", "test.before_lock").await;

    // the vanished instance: a transaction that locked the head and then said nothing
    let vanished = hold_the_chain(&db).await;

    const BEHIND: usize = 5;
    record_numbered(&app, "test.behind_lock", BEHIND, at);
    // this instance's appends, as this database sees them: one waits for the head's lock,
    // gives up within seconds (never waiting 6 s) and is tried again (a later attempt
    // waits in its place). The failure counter is process-wide, bumped by other tests.
    let waits = || -> Vec<(i64, i64)> {
        Postgres::shared()
            .psql(
                database_name(&db),
                "SELECT (extract(epoch FROM query_start) * 1000)::bigint, \
                        (extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint \
                   FROM pg_stat_activity \
                  WHERE datname = current_database() AND wait_event_type = 'Lock' \
                    AND query LIKE 'UPDATE audit_chain_head%'",
            )
            .unwrap()
            .lines()
            .map(|line| {
                let (started, waited) = line.split_once('|').unwrap();
                (started.parse().unwrap(), waited.parse().unwrap())
            })
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut first_attempt = None;
    loop {
        let seen = waits();
        for (_, waited) in &seen {
            assert!(
                *waited < 6000,
                "an append waited {waited} ms for the held lock"
            );
        }
        match (first_attempt, seen.first()) {
            (None, Some(&(started, _))) => first_attempt = Some(started),
            (Some(first), _) if seen.iter().any(|&(started, _)| started > first) => break,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no append gave up on the held lock and tried again (first: {first_attempt:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = portcullis::audit::recent(&app.state.db, "test.behind_lock", 100)
        .await
        .unwrap();
    assert!(stored.is_empty(), "stored past a held lock: {stored:?}");

    // what Postgres does once it notices the client is gone, done as the runbook
    // (docs/operations/audit.md) does it: its query finds the holder, and only it (the
    // instance's own appends give up after 5 s)
    eventually(
        Duration::from_secs(20),
        "the runbook's query ending the holder",
        || async {
            let ended = Postgres::shared()
                .psql(
                    database_name(&db),
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                      WHERE datname = current_database() \
                        AND xact_start < now() - interval '10 seconds' \
                        AND (query LIKE 'UPDATE audit_chain_head%' \
                             OR query LIKE 'COPY audit_events%')",
                )
                .unwrap();
            match ended.trim() {
                "" => false,
                "t" => true,
                other => panic!("ended more than the holder: {other:?}"),
            }
        },
    )
    .await;
    drop(vanished);
    wait_for(&app, "test.behind_lock", BEHIND).await;
    let mut targets: Vec<String> =
        portcullis::audit::recent(&app.state.db, "test.behind_lock", 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, target, _)| target)
            .collect();
    targets.sort();
    assert_eq!(targets, ["0", "1", "2", "3", "4"], "each stored once");
    portcullis::audit::verify(&app.state.db)
        .await
        .unwrap()
        .expect("the chain is intact");
}

/// The trail's time and action indexes are the lean ones (migrations 0006–0009): a BRIN
/// on the time, an action index without the `token.issue` rows, both built valid by the
/// migrations that run outside a transaction, and the B-trees they replace gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_keeps_a_brin_time_index_and_an_action_index_without_token_issues() {
    let db = Postgres::shared().fresh_database("audit_indexes").unwrap();
    let _app = pg_app(&db, None).await;
    assert_lean_indexes(&db);
}

/// An upgrade from a version before the lean indexes (migrations up to 0005) over a trail
/// that already holds records: the start-up's migrations build the new indexes over
/// them, valid, and the audit API still finds those records by action and by time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_builds_the_lean_indexes_over_the_records_already_stored() {
    let db = Postgres::shared().fresh_database("audit_upgrade").unwrap();
    let pool = schema_before_lean_indexes(&db).await;
    // 2,000 records a second apart from 2026-01-01T00:00:01Z, one in a hundred a client
    // disabled, stored at positions 1..=2000 with the head after them (their hashes are
    // not the chain's: this is about the indexes, not `audit verify`)
    const START_MS: i64 = 1_767_225_600_000;
    sqlx::query(
        "INSERT INTO audit_events (seq, at_unix_ms, actor, action, target, source_ip, detail, \
         prev_hash, hash, hash_version) \
         SELECT g, $1 + g * 1000, 'client:before', \
                CASE WHEN g % 100 = 0 THEN 'client.disable' ELSE 'token.issue' END, \
                'record-' || g, '127.0.0.1', '{}', repeat('0', 64), repeat('0', 64), 1 \
         FROM generate_series(1, 2000) g",
    )
    .bind(START_MS)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE audit_chain_head SET seq = 2000 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let app = pg_app(&db, None).await;
    assert_lean_indexes(&db);
    let (status, body) = audit_api(&app, "?action=client.disable&limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let targets: Vec<&str> = body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (1..=20).map(|n| format!("record-{}", n * 100)).collect();
    assert_eq!(targets, expected);
    // seconds 501 to 600 of the trail
    let (status, body) = audit_api(
        &app,
        "?since=2026-01-01T00:08:21Z&until=2026-01-01T00:10:01Z&limit=1000",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 100, "{body}");
    assert_eq!(records[0]["target"], "record-501");
    assert_eq!(records[99]["target"], "record-600");
}

/// A build of a lean index cut off (the instance stopped, the connection lost) leaves the
/// index invalid and its migration unrecorded; `IF NOT EXISTS` alone would pass over it
/// at the next start and record the migration done over an index no query can use. The
/// next start drops the leftover and builds the index anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lean_index_build_cut_off_is_built_anew_at_the_next_start() {
    let db = Postgres::shared()
        .fresh_database("audit_cut_build")
        .unwrap();
    let pool = schema_before_lean_indexes(&db).await;
    // two records of one actor, and a unique build under the BRIN's name over that
    // column: it fails on the duplicate and leaves the index behind, invalid, as any
    // build cut off part way does
    sqlx::query(
        "INSERT INTO audit_events (seq, at_unix_ms, actor, action, target, source_ip, detail, \
         prev_hash, hash, hash_version) \
         SELECT g, g, 'client:same', 'token.issue', 'record-' || g, NULL, '{}', \
                repeat('0', 64), repeat('0', 64), 1 \
         FROM generate_series(1, 2) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let cut = sqlx::query(
        "CREATE UNIQUE INDEX CONCURRENTLY audit_events_at_brin ON audit_events (actor)",
    )
    .execute(&pool)
    .await;
    assert!(cut.is_err(), "the build over a duplicate must fail");
    pool.close().await;
    let invalid = Postgres::shared()
        .psql(
            database_name(&db),
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'audit_events_at_brin'::regclass",
        )
        .unwrap();
    assert_eq!(invalid.trim(), "f", "the leftover is there, invalid");

    let _app = pg_app(&db, None).await;
    assert_lean_indexes(&db);
}

/// A fresh database at `db` migrated up to 0005, the last version before the lean
/// indexes; a pool on it.
async fn schema_before_lean_indexes(db: &str) -> sqlx::PgPool {
    let pool = sqlx::PgPool::connect(db).await.unwrap();
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version <= 5)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&pool).await.unwrap();
    pool
}

/// Asserts that `audit_events` on `db` has exactly the lean indexes, all valid.
fn assert_lean_indexes(db: &str) {
    let indexes = Postgres::shared()
        .psql(
            database_name(db),
            "SELECT indexname || ': ' || indexdef FROM pg_indexes \
             WHERE tablename = 'audit_events' ORDER BY indexname",
        )
        .unwrap();
    let lines: Vec<&str> = indexes.lines().collect();
    assert_eq!(lines.len(), 4, "{indexes}");
    assert!(
        lines[0].starts_with("audit_events_action_rare: ")
            && lines[0].contains("(action, at_unix_ms) WHERE (action <> 'token.issue'::text)"),
        "{indexes}"
    );
    assert!(
        lines[1].starts_with("audit_events_at_brin: ")
            && lines[1].contains("USING brin (at_unix_ms)"),
        "{indexes}"
    );
    assert!(lines[2].starts_with("audit_events_pkey: "), "{indexes}");
    assert!(
        lines[3].starts_with("audit_events_seq: ") && lines[3].contains("UNIQUE"),
        "{indexes}"
    );
    let invalid = Postgres::shared()
        .psql(
            database_name(db),
            "SELECT count(*) FROM pg_index \
             WHERE indrelid = 'audit_events'::regclass AND NOT indisvalid",
        )
        .unwrap();
    assert_eq!(invalid.trim(), "0");
}

/// A writer that fell behind (here: the chain held by another session while 3,000 events
/// were recorded) catches up in transactions of thousands, not of one linger batch (500)
/// each: every append costs the same round trips whatever its size, so at peak token
/// issuance small ones could not keep up and the queue overflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_stored_in_a_few_large_appends() {
    let (db, app, at) = pg_app_after_one_record("audit_backlog", "test.before_backlog").await;

    let mut holder = hold_the_chain(&db).await;
    const BACKLOG: usize = 3_000;
    record_numbered(&app, "test.backlog", BACKLOG, at);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    wait_for(&app, "test.backlog", BACKLOG).await;

    // rows written by one transaction share its id: the batch the writer held while it
    // waited for the lock, then everything queued behind it
    let appends: usize = Postgres::shared()
        .psql(
            database_name(&db),
            "SELECT count(DISTINCT xmin::text) FROM audit_events WHERE action = 'test.backlog'",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        appends <= 2,
        "{BACKLOG} queued events took {appends} appends"
    );
    portcullis::audit::verify(&app.state.db)
        .await
        .unwrap()
        .expect("the chain is intact");
}

/// The other half of that stall: Postgres frees a vanished instance's backend (and its
/// locks) only once TCP says the peer is gone, after about two hours of silence with the
/// kernel's defaults. Every connection an instance opens asks for probes within seconds.
#[tokio::test]
async fn every_postgres_connection_asks_the_server_to_notice_a_vanished_instance_in_seconds() {
    let db = Postgres::shared()
        .fresh_database("audit_keepalive")
        .unwrap();
    let config: portcullis::config::DatabaseConfig =
        toml::from_str(&format!("url = \"{db}\"")).unwrap();
    let database = portcullis::db::Database::connect_lazy(&config).unwrap();
    let portcullis::db::Pool::Postgres(pool) = database.pool() else {
        unreachable!("a postgres:// URL")
    };
    let settings: (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), \
         current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        settings,
        ("10".into(), "5".into(), "3".into(), "25000".into()),
        "(idle s, interval s, count, user timeout ms)"
    );
    database.close().await;
}

// === the queue ===

/// Another session holding the chain head's lock, as a stalled append of another
/// instance would: the writer's next append waits for it (up to the 5 s lock timeout).
async fn hold_the_chain(db: &str) -> sqlx::PgConnection {
    session_holding(db, "UPDATE audit_chain_head SET seq = seq WHERE id = 1").await
}

/// Waits until an append on `db` waits for the chain head's lock: the writer has taken
/// what was queued and holds it, so whatever is recorded next stays in the queue.
async fn until_an_append_waits_for_the_chain(db: &str) {
    eventually(
        Duration::from_secs(10),
        "an append waiting for the chain head's lock",
        || async {
            Postgres::shared()
                .psql(
                    database_name(db),
                    "SELECT count(*) FROM pg_stat_activity \
                      WHERE datname = current_database() AND wait_event_type = 'Lock' \
                        AND query LIKE 'UPDATE audit_chain_head%'",
                )
                .unwrap()
                .trim()
                == "1"
        },
    )
    .await;
}

/// What an operator sees while the database stalls: the events not stored (the stalled
/// append's and those queued behind it) against the queue's capacity, and — once it is over — an append that took as long as the
/// stall and the catch-up append that took everything queued behind it. Gauges and
/// histograms are process-wide: other instances of this test binary set the gauges at
/// their scrapes (hence `scrape_gauge`) and add to the histograms (hence "more than
/// before", which they can never make false).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_shows_its_queue_and_its_slow_append_in_the_metrics() {
    let (db, app, at) = pg_app_after_one_record("audit_queue_metrics", "test.before_stall").await;
    let scrape = app.metrics().await;
    let slow_appends = |s: &str| {
        sample(s, "portcullis_audit_append_seconds_count")
            - sample(s, "portcullis_audit_append_seconds_bucket{le=\"0.5\"}")
    };
    let large_appends = |s: &str| {
        sample(s, "portcullis_audit_append_events_count")
            - sample(s, "portcullis_audit_append_events_bucket{le=\"500\"}")
    };
    let (slow_before, large_before) = (slow_appends(&scrape), large_appends(&scrape));

    let mut holder = hold_the_chain(&db).await;
    app.state
        .audit
        .record(event("operator:test", "test.stalled", "first", at));
    until_an_append_waits_for_the_chain(&db).await;
    const QUEUED: usize = 1_000;
    record_numbered(&app, "test.stalled", QUEUED, at);
    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_events", (QUEUED + 1) as f64)
            .await,
        (QUEUED + 1) as f64,
        "the stalled append's event and the events behind it"
    );
    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_held_events", 1.0)
            .await,
        1.0,
        "the stalled append holds the one event recorded before it; the rest are queued"
    );
    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_capacity", 65_536.0)
            .await,
        65_536.0
    );
    // a stall longer than the 0.5 s bucket, well inside the 5 s lock timeout
    tokio::time::sleep(Duration::from_millis(700)).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    wait_for(&app, "test.stalled", QUEUED + 1).await;

    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_events", 0.0).await,
        0.0,
        "the queue is empty once the stall is over"
    );
    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_held_events", 0.0)
            .await,
        0.0,
        "nothing held once the stall is over"
    );
    let scrape = app.metrics().await;
    for bucket in [
        "portcullis_audit_append_seconds_bucket{le=\"0.5\"} ",
        "portcullis_audit_append_events_bucket{le=\"500\"} ",
    ] {
        assert!(
            scrape.contains(bucket),
            "{bucket}in\n{}",
            audit_lines(&scrape)
        );
    }
    assert!(
        slow_appends(&scrape) > slow_before,
        "the stalled append took more than 0.5 s:\n{}",
        audit_lines(&scrape)
    );
    assert!(
        large_appends(&scrape) > large_before,
        "the {QUEUED} queued events went in one append of more than 500:\n{}",
        audit_lines(&scrape)
    );
}

/// The batch a stalled writer holds is still in memory, not stored: the queue gauge
/// counts it with the events queued behind it. Recorded while the chain head is held,
/// the events are taken by the writer (all in one batch, or some of them and the rest
/// left queued) and wait in its append: the gauge shows every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_gauge_counts_the_batch_a_stalled_writer_holds() {
    let (db, app, at) = pg_app_after_one_record("audit_queue_held", "test.before_stall").await;

    let mut holder = hold_the_chain(&db).await;
    // not a count the other queue tests leave in the shared gauge (1,001; 1,024–1,026)
    const HELD: usize = 1_500;
    record_numbered(&app, "test.held", HELD, at);
    until_an_append_waits_for_the_chain(&db).await;
    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_events", HELD as f64)
            .await,
        HELD as f64,
        "the events taken by the stalled append, and any queued behind it"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    wait_for(&app, "test.held", HELD).await;
    assert_eq!(
        app.scrape_gauge("portcullis_audit_queue_events", 0.0).await,
        0.0,
        "nothing held once the batch is stored"
    );
}

/// `audit.queue_capacity` is how many events wait while the database stalls: with 1,024,
/// the 1,025th event recorded behind a stalled append is dropped and counted, the 1,024
/// before it stored; with the default (65,536) all 1,025 are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_queue_capacity_an_event_is_dropped_and_counted_and_the_default_holds_it() {
    const RECORDED: usize = 1_025;
    for capacity in [Some(1_024), None] {
        let db = Postgres::shared()
            .fresh_database("audit_queue_capacity")
            .unwrap();
        let app = pg_app_with(&db, None, |c| {
            if let Some(n) = capacity {
                c.audit.queue_capacity = n;
            }
        })
        .await;
        let at = OffsetDateTime::now_utc();
        app.state
            .audit
            .record(event("operator:test", "test.before_stall", "0", at));
        wait_for(&app, "test.before_stall", 1).await;

        let mut holder = hold_the_chain(&db).await;
        app.state
            .audit
            .record(event("operator:test", "test.stalled", "first", at));
        until_an_append_waits_for_the_chain(&db).await;
        // process-wide, and other tests drop events at shutdown: it may only rise
        let dropped_before = app.sample("portcullis_audit_dropped_total").await;
        record_numbered(&app, "test.queued", RECORDED, at);
        let dropped = app.sample("portcullis_audit_dropped_total").await - dropped_before;
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

        let expected = capacity.unwrap_or(RECORDED);
        wait_for(&app, "test.queued", expected).await;
        wait_for(&app, "test.stalled", 1).await;
        let targets: BTreeSet<usize> =
            portcullis::audit::recent(&app.state.db, "test.queued", 10_000)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, target, _)| target.parse().unwrap())
                .collect();
        let not_stored: Vec<usize> = (0..RECORDED).filter(|n| !targets.contains(n)).collect();
        assert_eq!(
            not_stored,
            (expected..RECORDED).collect::<Vec<_>>(),
            "capacity {capacity:?}: the events recorded but not stored"
        );
        assert_eq!(targets.len(), expected, "each stored once");
        if capacity.is_some() {
            assert!(dropped >= 1.0, "the 1,025th event was not counted dropped");
        }
        portcullis::audit::verify(&app.state.db)
            .await
            .unwrap()
            .expect("the chain is intact");
    }
}

/// The `portcullis_audit_*` lines of a scrape, for a failure message.
fn audit_lines(scrape: &str) -> String {
    scrape
        .lines()
        .filter(|l| l.contains("portcullis_audit_"))
        .collect::<Vec<_>>()
        .join("\n")
}

// === tampering ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altering_or_deleting_a_record_makes_audit_verify_fail_naming_its_seq() {
    let db = Postgres::shared().fresh_database("audit_tamper").unwrap();
    let app = spawn_app({
        let db = db.clone();
        move |c| c.database.url = SecretString::from(db)
    })
    .await;
    // a fixed set: no background writer adds records while the test tampers
    let t0 = OffsetDateTime::now_utc();
    for n in 1..=10 {
        portcullis::audit::store(
            &app.state.db,
            &portcullis::config::AuditSinkKind::None,
            &event("operator:test", "test.tamper", &n.to_string(), t0),
        )
        .await
        .unwrap();
    }
    let psql = |sql: &str| Postgres::shared().psql(database_name(&db), sql).unwrap();
    let verify = || cli(&app, &db, &["verify"]);
    let max_seq = || -> i64 {
        psql("SELECT max(seq) FROM audit_events")
            .trim()
            .parse()
            .unwrap()
    };
    // the instance's own events (the key ring's first transitions, made before
    // spawn_app returned) go through its background writer, which may store them after
    // ours. Once they are stored, a sentinel queued after them is stored after anything
    // else queued (the writer keeps the queue's order): then nothing more is on its way
    wait_for(&app, "key.transition", 1).await;
    app.state
        .audit
        .record(event("operator:test", "test.quiet", "0", t0));
    wait_for(&app, "test.quiet", 1).await;
    let (code, out, err) = verify();
    assert_eq!(code, 0, "{out}{err}");

    // a record's content changed
    let original = psql("SELECT detail FROM audit_events WHERE seq = 4");
    psql("UPDATE audit_events SET detail = '{\"n\":\"forged\"}' WHERE seq = 4");
    let (code, out, _) = verify();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("seq 4: hash mismatch"), "{out}");
    psql(&format!(
        "UPDATE audit_events SET detail = '{}' WHERE seq = 4",
        original.trim()
    ));
    assert_eq!(verify().0, 0, "restored");

    // changed, and its hash recomputed by someone who knows the format: the next link breaks
    let row: Value = serde_json::from_str(&psql(
        "SELECT row_to_json(a)::text FROM audit_events a WHERE seq = 4",
    ))
    .unwrap();
    let forged = portcullis::audit::chain::record_hash(
        4,
        row["prev_hash"].as_str().unwrap(),
        row["at_unix_ms"].as_i64().unwrap(),
        row["actor"].as_str().unwrap(),
        row["action"].as_str().unwrap(),
        row["target"].as_str().unwrap(),
        row["source_ip"].as_str(),
        "{\"n\":\"forged\"}",
    );
    psql(&format!(
        "UPDATE audit_events SET detail = '{{\"n\":\"forged\"}}', hash = '{forged}' WHERE seq = 4"
    ));
    let (code, out, _) = verify();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("seq 5: prev mismatch"), "{out}");
    psql(&format!(
        "UPDATE audit_events SET detail = '{}', hash = '{}' WHERE seq = 4",
        original.trim(),
        row["hash"].as_str().unwrap()
    ));
    assert_eq!(verify().0, 0, "restored");

    // a record deleted from the middle
    psql("CREATE TABLE kept AS SELECT * FROM audit_events WHERE seq = 6");
    psql("DELETE FROM audit_events WHERE seq = 6");
    let (code, out, _) = verify();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("seq 6: missing"), "{out}");
    let json_out = cli(&app, &db, &["verify", "--json"]).1;
    let report: Value = serde_json::from_str(json_out.trim()).unwrap();
    assert_eq!(report["intact"], false);
    assert_eq!(report["first_broken_seq"], 6);
    psql("INSERT INTO audit_events SELECT * FROM kept");
    assert_eq!(verify().0, 0, "restored");

    // the newest record cut off the end: the newest as the trail holds it now
    let total = max_seq();
    psql(&format!(
        "CREATE TABLE kept_last AS SELECT * FROM audit_events WHERE seq = {total}"
    ));
    psql(&format!("DELETE FROM audit_events WHERE seq = {total}"));
    let (code, out, _) = verify();
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!("seq {total}: missing (truncated")),
        "{out}"
    );
    psql("INSERT INTO audit_events SELECT * FROM kept_last");
    assert_eq!(verify().0, 0, "restored");

    // a record slipped in beside the chain, without a position
    psql(
        "INSERT INTO audit_events (at_unix_ms, actor, action, target, detail) \
         VALUES (0, 'intruder', 'login.success', 'x', '{}')",
    );
    let (code, out, _) = verify();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("has no chain position"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_record_is_detected_on_sqlite_too() {
    let app = spawn_app(|_| {}).await;
    let t0 = OffsetDateTime::now_utc();
    for n in 1..=5 {
        app.state
            .audit
            .record(event("operator:test", "test.sqlite", &n.to_string(), t0));
    }
    wait_for(&app, "test.sqlite", 5).await;
    let url = format!("sqlite://{}/portcullis.db", app.dir.path().display());
    let (code, out, err) = cli(&app, &url, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    let seq: i64 = match app.state.db.pool() {
        portcullis::db::Pool::Sqlite(p) => {
            let (seq,): (i64,) = sqlx::query_as(
                "SELECT seq FROM audit_events WHERE action = 'test.sqlite' AND target = '3'",
            )
            .fetch_one(p)
            .await
            .unwrap();
            sqlx::query("UPDATE audit_events SET actor = 'someone-else' WHERE seq = $1")
                .bind(seq)
                .execute(p)
                .await
                .unwrap();
            seq
        }
        portcullis::db::Pool::Postgres(_) => unreachable!("the test instance runs on SQLite"),
    };
    assert_eq!(
        portcullis::audit::verify(&app.state.db)
            .await
            .unwrap()
            .unwrap_err(),
        ChainBreak::HashMismatch { seq }
    );
    let (code, out, _) = cli(&app, &url, &["verify"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&format!("seq {seq}: hash mismatch")), "{out}");
}

// === the admin API and the CLI listing ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_api_filters_pages_and_refuses_bad_filters_with_400() {
    let app = spawn_app(|c| c.admin.token = Some(SecretString::from(ADMIN_TOKEN))).await;
    let at =
        |s: &str| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
    let events = [
        event(
            "user:alice",
            "login.success",
            "alice",
            at("2026-01-01T00:00:01Z"),
        ),
        event(
            "user:bob",
            "login.failure",
            "bob",
            at("2026-01-01T00:00:02Z"),
        ),
        event(
            "user:bob",
            "login.lockout",
            "bob",
            at("2026-01-01T00:00:03Z"),
        ),
        event(
            "client:svc",
            "token.issue",
            "jti-1",
            at("2026-01-01T00:00:04Z"),
        ),
        event(
            "client:svc",
            "token.issue",
            "jti-2",
            at("2026-01-01T00:00:05Z"),
        ),
        event("user:alice", "logout", "alice", at("2026-01-01T00:00:06Z")),
        event(
            "user:alice",
            "loginx.other",
            "alice",
            at("2026-01-01T00:00:07Z"),
        ),
    ];
    for e in &events {
        app.state.audit.record(e.clone());
    }
    wait_for(&app, "loginx.other", 1).await;

    let targets = |body: &Value| -> Vec<String> {
        body["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] != "key.transition")
            .map(|r| r["target"].as_str().unwrap().to_owned())
            .collect()
    };
    let get = |q: &'static str| audit_api(&app, q);

    let (s, b) = get("?action=token.issue").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(targets(&b), ["jti-1", "jti-2"]);
    // a prefix takes whole words only: `login.*` is not `loginx.other`
    let (_, b) = get("?action=login.*").await;
    assert_eq!(targets(&b), ["alice", "bob", "bob"]);
    let (_, b) = get("?actor=user:bob").await;
    assert_eq!(targets(&b), ["bob", "bob"]);
    let (_, b) = get("?target=alice&action=logout").await;
    assert_eq!(targets(&b), ["alice"]);
    let (_, b) = get("?since=2026-01-01T00:00:02Z&until=2026-01-01T00:00:04Z").await;
    assert_eq!(targets(&b), ["bob", "bob"]);

    // pages of two, continued by the cursor, cover everything once, in chain order
    let mut seen = Vec::new();
    let mut query = "?limit=2&since=2026-01-01T00:00:00Z&until=2026-01-02T00:00:00Z".to_owned();
    let mut pages = 0;
    loop {
        let (s, b) = audit_api(&app, &query).await;
        assert_eq!(s, 200, "{b}");
        assert!(b["records"].as_array().unwrap().len() <= 2);
        seen.extend(targets(&b));
        pages += 1;
        match b["next_after_seq"].as_str() {
            Some(c) => {
                query = format!(
                    "?limit=2&since=2026-01-01T00:00:00Z&until=2026-01-02T00:00:00Z&after_seq={c}"
                )
            }
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(
        seen,
        ["alice", "bob", "bob", "jti-1", "jti-2", "alice", "alice"]
    );

    // bad filters: 400, machine-readable, naming the parameter
    for (query, field) in [
        ("?since=yesterday", "since"),
        ("?until=2026-13-01T00:00:00Z", "until"),
        (
            "?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "until",
        ),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?after_seq=-3", "after_seq"),
        ("?after_seq=abc", "after_seq"),
        ("?action=login*", "action"),
        ("?action=Login.Success", "action"),
        ("?actor=", "actor"),
        ("?secret=1", "query"),
    ] {
        let (s, b) = audit_api(&app, query).await;
        assert_eq!(s, 400, "{query}: {b}");
        assert_eq!(b["error"], "invalid_request", "{query}");
        let description = b["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("invalid {field}")),
            "{query}: {description}"
        );
    }

    // the admin token is required like on every /admin route
    let none = reqwest::get(format!("http://{}/admin/audit", app.admin))
        .await
        .unwrap();
    assert_eq!(none.status(), 401);

    // the CLI lists the same records, as JSON lines
    let url = format!("sqlite://{}/portcullis.db", app.dir.path().display());
    let (code, out, err) = cli(&app, &url, &["list", "--action", "login.*"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (_, api) = get("?action=login.*").await;
    assert_eq!(Value::Array(lines), api["records"]);
    let (code, _, err) = cli(&app, &url, &["list", "--since", "soon"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("invalid since"), "{err}");
}

// === the sink ===

#[tokio::test]
async fn the_file_sink_gets_every_record_and_follows_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let sink: PathBuf = dir.path().join("audit.jsonl");
    let kind = format!("file:{}", sink.display()).parse_sink();
    let app = spawn_app(move |c| c.audit.sink = kind).await;
    let t0 = OffsetDateTime::now_utc();
    record_numbered(&app, "test.sink", 3, t0);
    wait_for(&app, "test.sink", 3).await;
    eventually(Duration::from_secs(10), "three lines", || {
        let n = sink_lines(&sink)
            .iter()
            .filter(|r| r["action"] == "test.sink")
            .count();
        async move { n == 3 }
    })
    .await;

    // rotated away (as logrotate does): the next records start a new file
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&sink, &rotated).unwrap();
    for n in 3..5 {
        app.state
            .audit
            .record(event("operator:test", "test.sink", &n.to_string(), t0));
    }
    eventually(Duration::from_secs(10), "a new file", || {
        let n = sink_lines(&sink).len();
        async move { n == 2 }
    })
    .await;
    let old = sink_lines(&rotated);
    let new = sink_lines(&sink);
    let mut both = old.clone();
    both.extend(new.clone());
    // one unbroken chain across the two files, the same as the database holds
    verify_json_chain(&both);
    let mut joined = std::fs::read(&rotated).unwrap();
    joined.extend(std::fs::read(&sink).unwrap());
    let (code, out) = python_verify(&joined);
    assert_eq!(code, 0, "{out}");
    // an altered line is caught by the independent verifier as well
    let text = String::from_utf8(joined).unwrap();
    let altered = text.replacen("\"target\":\"1\"", "\"target\":\"9\"", 1);
    assert_ne!(altered, text);
    let (code, out) = python_verify(altered.as_bytes());
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("hash mismatch"), "{out}");
    let targets: Vec<_> = new.iter().map(|r| r["target"].clone()).collect();
    assert_eq!(targets, [json!("3"), json!("4")]);
    let stored: BTreeMap<i64, String> = all_records_sqlite(&app).await;
    for r in &both {
        assert_eq!(
            stored[&r["seq"].as_i64().unwrap()],
            r["hash"].as_str().unwrap()
        );
    }

    // the new file verifies on its own from the last record of the one before it; alone,
    // it is a gap at seq 1
    let last_old = old.last().unwrap();
    let (last_seq, last_hash) = (
        last_old["seq"].as_i64().unwrap().to_string(),
        last_old["hash"].as_str().unwrap().to_owned(),
    );
    let new_file = std::fs::read(&sink).unwrap();
    let (code, out) = python_verify_with(
        &new_file,
        &["--from-seq", &last_seq, "--from-hash", &last_hash],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("2 records after seq {last_seq}, chain intact")),
        "{out}"
    );
    let (code, out) = python_verify(&new_file);
    assert_eq!(code, 3, "{out}");
    // lines cut off at the end verify as far as they go, but not against the head
    let head = both.last().unwrap()["hash"].as_str().unwrap().to_owned();
    let old_file = std::fs::read(&rotated).unwrap();
    let (code, out) = python_verify_with(&old_file, &["--expect-head", &head]);
    assert_eq!(code, 3, "{out}");
    let (code, out) = python_verify_with(
        &joined_again(&old_file, &new_file),
        &["--expect-head", &head],
    );
    assert_eq!(code, 0, "{out}");

    // the database, its oldest records archived and deleted: a gap at seq 1 from the
    // start, intact from the last record archived
    let portcullis::db::Pool::Sqlite(pool) = app.state.db.pool() else {
        unreachable!("the test instance runs on SQLite")
    };
    let cut = last_old["seq"].as_i64().unwrap();
    sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
        .bind(cut)
        .execute(pool)
        .await
        .unwrap();
    assert!(matches!(
        portcullis::audit::verify(&app.state.db).await.unwrap(),
        Err(ChainBreak::Gap { seq: 1, .. })
    ));
    let after = portcullis::audit::After {
        seq: cut,
        hash: last_hash.clone(),
    };
    let intact = portcullis::audit::verify_from(&app.state.db, Some(&after))
        .await
        .unwrap()
        .expect("intact from the archived range's last record");
    assert_eq!(intact.head_hash, head);
    assert!(intact.records >= 2, "{intact:?}");
    let wrong = portcullis::audit::After {
        seq: cut,
        hash: "0".repeat(64),
    };
    assert!(matches!(
        portcullis::audit::verify_from(&app.state.db, Some(&wrong))
            .await
            .unwrap(),
        Err(ChainBreak::PrevMismatch { .. })
    ));
}

/// A change made with the CLI is in the chain between the instance's records, so a SIEM
/// reading only the sink must get it too: the file then holds every seq, and verifies
/// independently. `users create` names the operator like every other CLI command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_by_the_cli_reach_the_file_sink_in_chain_order() {
    use std::io::Write as _;
    let db = Postgres::shared().fresh_database("audit_cli_sink").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("audit.jsonl");
    let app = pg_app(&db, Some(&sink)).await;
    let in_sink = |action: &'static str| {
        let sink = sink.clone();
        move || {
            let n = sink_lines(&sink)
                .iter()
                .filter(|r| r["action"] == action)
                .count();
            async move { n == 1 }
        }
    };
    let at = OffsetDateTime::now_utc();
    app.state
        .audit
        .record(event("operator:test", "test.before_cli", "a", at));
    eventually(
        Duration::from_secs(10),
        "the instance's first record in the sink",
        in_sink("test.before_cli"),
    )
    .await;

    let config = app.cli_config(
        "cli-sink.toml",
        &db,
        &format!("[audit]\nsink = \"file:{}\"\n", sink.display()),
    );
    let mut child = Command::new(binary())
        .args([
            "users",
            "create",
            "breakglass",
            "--role",
            "admin",
            "--config",
        ])
        .arg(&config)
        .env("USER", "auditor-7")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "open-sesame-in-an-emergency").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    app.state
        .audit
        .record(event("operator:test", "test.after_cli", "b", at));
    eventually(
        Duration::from_secs(10),
        "the instance's second record in the sink",
        in_sink("test.after_cli"),
    )
    .await;

    let file = std::fs::read(&sink).unwrap();
    let (code, verdict) = python_verify(&file);
    assert_eq!(code, 0, "{verdict}");
    // a CLI line may land between an instance's commit and its own lines: the verifier
    // takes the lines in any order
    let mut shuffled: Vec<&[u8]> = file.split(|b| *b == b'\n').collect();
    shuffled.reverse();
    let (code, verdict) = python_verify(&shuffled.join(&b'\n'));
    assert_eq!(code, 0, "{verdict}");
    let lines = sink_lines(&sink);
    verify_json_chain(&lines);
    let stored = all_records(&app).await;
    assert_eq!(lines.len(), stored.len(), "every stored record, once");
    let created: Vec<&Value> = lines
        .iter()
        .filter(|r| r["action"] == "local_account.create")
        .collect();
    assert_eq!(created.len(), 1, "{lines:?}");
    assert_eq!(created[0]["actor"], "operator:cli:auditor-7");
    assert_eq!(created[0]["target"], "breakglass");
    assert_eq!(created[0]["detail"], json!({ "roles": ["admin"] }));
}

fn joined_again(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut both = first.to_vec();
    both.extend_from_slice(second);
    both
}

/// seq → hash, straight from the SQLite database.
async fn all_records_sqlite(app: &TestApp) -> BTreeMap<i64, String> {
    match app.state.db.pool() {
        portcullis::db::Pool::Sqlite(p) => sqlx::query_as::<_, (i64, String)>(
            "SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL",
        )
        .fetch_all(p)
        .await
        .unwrap()
        .into_iter()
        .collect(),
        portcullis::db::Pool::Postgres(_) => unreachable!("the test instance runs on SQLite"),
    }
}
