//! The config center over HTTPS: scopes, masking, ETags, long-polls, SSE watches, the
//! client library against a real instance, and propagation between instances sharing
//! Postgres.

use std::time::Duration;

use portcullis::oauth::claims::{AccessClaims, Audiences};
use secrecy::SecretString;
use serde_json::{Value, json};

use super::support::*;

pub(super) const APP: &str = "executor-orders";

pub(super) fn token(app: &TestApp, scope: &str) -> String {
    token_until(app, scope, app.state.keys.now().unix_timestamp() + 600)
}

/// A token with `scope` that expires at `exp` (unix seconds).
pub(super) fn token_until(app: &TestApp, scope: &str, exp: i64) -> String {
    let now = app.state.keys.now().unix_timestamp();
    let claims = AccessClaims {
        iss: app.state.config.issuer(),
        sub: "ops-cli".to_owned(),
        aud: Audiences::One(app.state.config.issuer()),
        exp,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::new_v4().to_string(),
        scope: scope.to_owned(),
        client_id: "ops-cli".to_owned(),
        roles: vec![],
        sid: None,
    };
    app.state.keys.sign(&claims).unwrap()
}

const WRITER: &str = "config:read:prod config:write:prod";

pub(super) struct Api<'a> {
    app: &'a TestApp,
    http: reqwest::Client,
}

impl<'a> Api<'a> {
    pub(super) fn new(app: &'a TestApp) -> Self {
        Self {
            app,
            http: app.https_client(),
        }
    }

    pub(super) fn path(env: &str, name: &str, rest: &str) -> String {
        format!("/config/v1/{env}/{name}{rest}")
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        scope: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .request(method, self.app.url(path))
            .bearer_auth(token(self.app, scope));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    pub(super) async fn get(
        &self,
        path: &str,
        scope: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(reqwest::Method::GET, path, scope, None).await
    }

    async fn put(&self, env: &str, name: &str, scope: &str, body: Value) -> (u16, Value) {
        let (s, _, b) = self
            .send(
                reqwest::Method::PUT,
                &Self::path(env, name, ""),
                scope,
                Some(body),
            )
            .await;
        (s, b)
    }

    pub(super) async fn publish(&self, entries: Value) -> u64 {
        let (status, body) = self
            .put(
                "prod",
                APP,
                WRITER,
                json!({ "entries": entries, "message": "test" }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["version"].as_u64().unwrap()
    }
}

pub(super) fn entries_v1() -> Value {
    json!([
        { "key": "db.url", "value": "postgres://orders-db/orders" },
        { "key": "db.password", "value": "pw-Kq9x-v1", "secret": true },
        { "key": "pool", "value": "{\"size\": 8}", "format": "json" }
    ])
}

#[tokio::test]
async fn a_published_release_is_served_signed_with_an_etag_and_304_when_unchanged() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    let v = api.publish(entries_v1()).await;
    assert_eq!(v, 1);

    let path = Api::path("prod", APP, "");
    let (status, headers, body) = api.get(&path, "config:read:prod").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["etag"], "\"1\"");
    assert_eq!(headers["cache-control"], "no-store");
    let snapshot: config_center::Snapshot = serde_json::from_value(body).unwrap();
    assert_eq!(snapshot.version, 1);
    // a node authorised for the environment gets plaintext, secrets included
    let pw = snapshot
        .entries
        .iter()
        .find(|e| e.key == "db.password")
        .unwrap();
    assert_eq!(pw.value, "pw-Kq9x-v1");
    assert_eq!(
        snapshot.content_hash,
        config_center::content_hash(&snapshot.entries)
    );
    // the detached signature is over the claims, by a key in our JWKS
    let header = snapshot.signature.split('.').next().unwrap();
    assert!(snapshot.signature.contains(".."), "detached JWS");
    let kid = jose_kid(header);
    let jwks = app.state.keys.jwks();
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == kid)
    );

    let resp = api
        .http
        .get(app.url(&path))
        .bearer_auth(token(&app, "config:read:prod"))
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 304);
}

fn jose_kid(header_b64: &str) -> String {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header_b64)
        .unwrap();
    let v: Value = serde_json::from_slice(&raw).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_route_enforces_the_scope_of_its_environment_and_application() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let snap = Api::path("prod", APP, "");

    // no token at all
    let resp = api.http.get(app.url(&snap)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));

    // another environment's scope
    let (s, h, b) = api.get(&snap, "config:read:test").await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(b["error"], "insufficient_scope");
    assert!(
        h["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("config:read:prod")
    );
    // an application-scoped token reads its application only
    let (s, _, _) = api.get(&snap, "config:read:prod:executor-orders").await;
    assert_eq!(s, 200);
    let (s, _, _) = api
        .get(
            &Api::path("prod", "other-app", ""),
            "config:read:prod:executor-orders",
        )
        .await;
    assert_eq!(s, 403);
    // reading does not allow writing, on any write route
    let (s, _) = api
        .put("prod", APP, "config:read:prod", json!({ "entries": [] }))
        .await;
    assert_eq!(s, 403);
    for (method, rest, body) in [
        (
            reqwest::Method::PATCH,
            "",
            json!({ "set": [{ "key": "a", "value": "b" }] }),
        ),
        (reqwest::Method::POST, "/rollback", json!({ "to": 1 })),
    ] {
        let (s, _, _) = api
            .send(
                method,
                &Api::path("prod", APP, rest),
                "config:read:prod",
                Some(body),
            )
            .await;
        assert_eq!(s, 403);
    }
    for rest in [
        "/poll",
        "/watch",
        "/releases",
        "/releases/1",
        "/diff?from=1&to=1",
    ] {
        let (s, _, _) = api
            .get(&Api::path("prod", APP, rest), "config:read:test")
            .await;
        assert_eq!(s, 403, "{rest}");
    }
    // nothing was written by the refused attempts
    let (_, _, history) = api
        .get(&Api::path("prod", APP, "/releases"), "config:read:prod")
        .await;
    assert_eq!(history["releases"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn secrets_are_masked_in_releases_and_diffs_without_the_reveal_scope() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let (s, _, b) = api
        .send(
            reqwest::Method::PATCH,
            &Api::path("prod", APP, ""),
            WRITER,
            Some(json!({
                "expected_version": 1,
                "set": [{ "key": "db.password", "value": "pw-Kq9x-v2", "secret": true }],
                "message": "rotate the password"
            })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["version"], 2);

    let release = Api::path("prod", APP, "/releases/2");
    let (_, _, masked) = api.get(&release, "config:read:prod").await;
    let text = masked.to_string();
    assert!(!text.contains("pw-Kq9x"), "{text}");
    assert!(text.contains("postgres://orders-db/orders"));
    let (_, _, revealed) = api
        .get(&release, "config:read:prod config:reveal:prod")
        .await;
    assert!(revealed.to_string().contains("pw-Kq9x-v2"));

    let diff = Api::path("prod", APP, "/diff?from=1&to=2");
    let (s, _, d) = api.get(&diff, "config:read:prod").await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["changes"].as_array().unwrap().len(), 1);
    assert_eq!(d["changes"][0]["key"], "db.password");
    assert_eq!(d["changes"][0]["change"], "changed");
    assert!(!d.to_string().contains("pw-Kq9x"));
    let (_, _, d) = api.get(&diff, "config:read:prod config:reveal:prod").await;
    assert!(d.to_string().contains("pw-Kq9x-v1") && d.to_string().contains("pw-Kq9x-v2"));

    // the audit trail names the keys, never a value
    eventually(Duration::from_secs(5), "audit stored", || {
        let db = app.state.db.clone();
        async move {
            !portcullis::audit::recent(&db, "config.edit", 5)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
    let rows = portcullis::audit::recent(&app.state.db, "config.edit", 5)
        .await
        .unwrap();
    let (_, target, detail) = &rows[0];
    assert_eq!(target, "prod/executor-orders");
    assert!(detail.contains("db.password") && !detail.contains("pw-Kq9x"));
}

#[tokio::test]
async fn a_stale_write_is_refused_with_409_and_a_rollback_is_a_new_release() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    api.publish(json!([{ "key": "db.url", "value": "postgres://new-db/orders" }]))
        .await;

    let (s, b) = api
        .put(
            "prod",
            APP,
            WRITER,
            json!({ "expected_version": 1, "entries": [{ "key": "x", "value": "y" }] }),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["error"], "version_conflict");

    let (s, _, b) = api
        .send(
            reqwest::Method::POST,
            &Api::path("prod", APP, "/rollback"),
            WRITER,
            Some(json!({ "to": 1, "expected_version": 2, "message": "bad deploy" })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["version"], 3);
    assert_eq!(b["rollback_of"], 1);
    let (_, _, snap) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(snap["version"], 3);
    assert!(snap.to_string().contains("postgres://orders-db/orders"));
    // history keeps every release, the rolled-back one included
    let (_, _, h) = api
        .get(&Api::path("prod", APP, "/releases"), "config:read:prod")
        .await;
    let versions: Vec<u64> = h["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![3, 2, 1]);
}

#[tokio::test]
async fn bad_names_and_values_are_refused_precisely_and_nothing_is_stored() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    let scope = "portcullis:admin";
    // names in the path
    for (env, name) in [
        ("prod", "..%2F..%2Fetc"),
        ("prod", "orders%00"),
        ("prod", "%D0%B0pp"), // Cyrillic a: a confusable
        ("staging", APP),     // not a configured environment
        ("PROD", APP),
    ] {
        let (s, b) = api
            .put(
                env,
                name,
                scope,
                json!({ "entries": [{ "key": "a", "value": "b" }] }),
            )
            .await;
        assert!(s == 400 || s == 404, "{env}/{name}: {s} {b}");
        if s == 400 {
            assert_eq!(b["error"], "invalid_request", "{b}");
        }
    }
    // keys and values in the body
    let huge = "x".repeat(70 * 1024);
    for entries in [
        json!([{ "key": "../secret", "value": "v" }]),
        json!([{ "key": "a\u{7}b", "value": "v" }]),
        json!([{ "key": "p\u{0430}ssword", "value": "v" }]),
        json!([{ "key": "big", "value": huge }]),
        json!([{ "key": "j", "value": "{not json", "format": "json" }]),
        json!([{ "key": "y", "value": "a: [1, 2", "format": "yaml" }]),
        json!([{ "key": "f", "value": "v", "format": "toml" }]),
        json!([{ "key": "dup", "value": "1" }, { "key": "dup", "value": "2" }]),
    ] {
        let (s, b) = api
            .put("prod", APP, scope, json!({ "entries": entries }))
            .await;
        assert_eq!(s, 400, "{entries}: {b}");
        assert_eq!(b["error"], "invalid_request");
    }
    // a message Postgres could not store as text: bad input, not an outage
    let (s, b) = api
        .put(
            "prod",
            APP,
            scope,
            json!({ "entries": [{ "key": "a", "value": "b" }], "message": "deploy\u{0}" }),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"], "invalid_request");
    assert!(
        b["error_description"].as_str().unwrap().contains("message"),
        "{b}"
    );
    // a body that is not the documented shape
    let (s, b) = api
        .put("prod", APP, scope, json!({ "entries": [], "surprise": 1 }))
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, _, b) = api.get(&Api::path("prod", APP, "/releases/0"), scope).await;
    assert_eq!(s, 400, "{b}");

    let (s, _, _) = api.get(&Api::path("prod", APP, ""), scope).await;
    assert_eq!(s, 404, "nothing was stored");
}

#[tokio::test]
async fn a_long_poll_answers_at_once_when_behind_and_on_the_next_release_otherwise() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let poll = |v: u64| Api::path("prod", APP, &format!("/poll?version={v}"));

    let (s, _, b) = api.get(&poll(0), "config:read:prod").await;
    assert_eq!(s, 200);
    assert_eq!(b["version"], 1);

    let start_poll = |path: String| {
        let http = api.http.clone();
        let url = app.url(&path);
        let t = token(&app, "config:read:prod");
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(t).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };

    // an application without a release: its poll is parked once it follows the
    // application, which it does through a slot of the instance's hub that only a
    // follower keeps (a read leaves none behind); a release then answers it
    const NEW_APP: &str = "executor-billing";
    let hub = app.state.config_center.hub.clone();
    let slots = hub.slot_count();
    let first = start_poll(Api::path("prod", NEW_APP, "/poll?version=0"));
    eventually(
        Duration::from_secs(10),
        "the poll follows the application",
        || {
            let n = hub.slot_count();
            async move { n > slots }
        },
    )
    .await;
    assert!(!first.is_finished(), "answered before a release existed");
    let (s, b) = api
        .put(
            "prod",
            NEW_APP,
            WRITER,
            json!({ "entries": entries_v1(), "message": "first" }),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["version"], 1);

    // one that holds the newest release waits for the next (an application with a release
    // keeps its slot, so there is no follower count to wait for here: the parking itself
    // is proven above)
    let waiting = start_poll(poll(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    let (s, b) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(b["version"], 2);

    let (s, _, b) = api.get(&poll(u64::MAX), "config:read:prod").await;
    assert!(s == 304 || s == 200, "{s} {b}");
    let (s, _, b) = api
        .get(
            &Api::path("prod", APP, "/poll?version=abc"),
            "config:read:prod",
        )
        .await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test]
async fn a_long_poll_with_nothing_new_answers_304_after_the_timeout() {
    let app = spawn_app(|c| c.config_center.long_poll_timeout = Duration::from_millis(300)).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let (s, h, _) = api
        .get(
            &Api::path("prod", APP, "/poll?version=1"),
            "config:read:prod",
        )
        .await;
    assert_eq!(s, 304);
    assert_eq!(h["etag"], "\"1\"");
}

/// A long-poll is authorised by its token, so it is held no longer than the token is
/// valid: it answers 304 when the token expires, long before the long-poll timeout.
#[tokio::test]
async fn a_long_poll_is_held_no_longer_than_its_token_is_valid() {
    // the long-poll timeout is 25 s; the token is valid for 2 s at most
    let app = spawn_app(|c| c.tokens.leeway = Duration::ZERO).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let exp = app.state.keys.now().unix_timestamp() + 2;
    let poll = api
        .http
        .get(app.url(&Api::path("prod", APP, "/poll?version=1")))
        .bearer_auth(token_until(&app, "config:read:prod", exp))
        .send();
    let resp = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("the poll ends when its token expires, not after the long-poll timeout")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 304);
    assert!(app.state.keys.now().unix_timestamp() >= exp);
}

/// Reads SSE events from a streaming response until `n` `release` events arrived.
pub(super) async fn read_events(resp: &mut reqwest::Response, n: usize) -> Vec<(u64, Value)> {
    let mut parser = config_center::client::SseParser::default();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream stays open");
        for e in parser.feed(&chunk).unwrap() {
            if e.event == "release" {
                let id = e.id.as_deref().unwrap().parse().unwrap();
                out.push((id, serde_json::from_str(&e.data).unwrap()));
            }
        }
    }
    out
}

pub(super) async fn open_watch(api: &Api<'_>, last_event_id: Option<u64>) -> reqwest::Response {
    open_watch_with(api, &token(api.app, "config:read:prod"), last_event_id).await
}

/// [`open_watch`] with the bearer token `bearer`.
pub(super) async fn open_watch_with(
    api: &Api<'_>,
    bearer: &str,
    last_event_id: Option<u64>,
) -> reqwest::Response {
    let mut req = api
        .http
        .get(api.app.url(&Api::path("prod", APP, "/watch")))
        .bearer_auth(bearer);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp
}

#[tokio::test]
async fn an_sse_watcher_gets_every_new_release_and_a_reconnect_resumes_from_its_version() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;

    let mut watch = open_watch(&api, None).await;
    let first = read_events(&mut watch, 1).await;
    assert_eq!(first[0].0, 1);
    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    let next = read_events(&mut watch, 1).await;
    assert_eq!(next[0].0, 2);
    assert_eq!(next[0].1["version"], 2);
    drop(watch);

    // while the node was away two releases were made: it gets the newest at once
    api.publish(json!([{ "key": "db.url", "value": "postgres://v3" }]))
        .await;
    api.publish(json!([{ "key": "db.url", "value": "postgres://v4" }]))
        .await;
    // it resumes after 2: it is sent a newer release at once, and nothing older than it
    // holds; the newest (4) arrives as soon as the instance's change feed has it (the
    // instance may still be loading 4 when the node reconnects)
    let mut watch = open_watch(&api, Some(2)).await;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(v, _)| *v < 4) {
        seen.extend(read_events(&mut watch, 1).await);
    }
    assert!(seen.iter().all(|(v, _)| *v > 2), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    assert!(seen.last().unwrap().1.to_string().contains("postgres://v4"));
}

/// A watch of `name` on HTTP/1.1 over TLS 1.3 (the bare-connection path), its head read
/// and checked (200).
async fn bare_watch(
    app: &TestApp,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut tls = app.tls().await;
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\r\n",
        Api::path("prod", name, "/watch"),
        token(app, "config:read:prod"),
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tls
}

/// A token that may read a whole environment may name any application. Reading one that
/// has no release — a snapshot, a long-poll, a watch on HTTP/2 or on a bare TLS 1.3
/// connection — must leave nothing held once the read is over, however many names are
/// invented; while a watch of such an application is open its slot stays, so the first
/// release published later still reaches it.
#[tokio::test]
async fn reads_of_applications_without_a_release_leave_nothing_held() {
    use tokio::io::AsyncReadExt as _;
    let app = spawn_app(|c| c.config_center.long_poll_timeout = Duration::from_millis(100)).await;
    let api = Api::new(&app);
    let center = &app.state.config_center;
    api.publish(entries_v1()).await;
    let (s, _, _) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(s, 200);
    // a node waiting for the first release of its application, all along
    let mut late = bare_watch(&app, "late-app").await;
    eventually(
        Duration::from_secs(10),
        "the waiting watch has its relay",
        || async { center.relay_count() == 1 },
    )
    .await;
    // the application with a release, and the one being waited for
    assert_eq!(center.hub.slot_count(), 2);

    let reader = "config:read:prod";
    for round in 0..3 {
        let names: Vec<String> = (0..40).map(|i| format!("invented-{round}-{i}")).collect();
        futures::future::join_all(names.iter().map(|name| {
            let api = &api;
            async move {
                let (s, _, b) = api.get(&Api::path("prod", name, ""), reader).await;
                assert_eq!(s, 404, "{b}");
                let (s, _, b) = api
                    .get(&Api::path("prod", name, "/poll?version=0"), reader)
                    .await;
                assert_eq!(s, 304, "{b}");
            }
        }))
        .await;
        let mut h2 = app.http2().await;
        for name in names.iter().take(10) {
            let watch = http::Request::get(app.url(&Api::path("prod", name, "/watch")))
                .header("authorization", format!("Bearer {}", token(&app, reader)))
                .body(http_body_util::Full::default())
                .unwrap();
            let resp = h2.send_request(watch).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            drop(resp);
            drop(bare_watch(&app, name).await);
        }
        drop(h2);
        eventually(
            Duration::from_secs(10),
            "nothing is held for the invented names",
            || async { center.hub.slot_count() == 2 && center.relay_count() == 1 },
        )
        .await;
    }
    let scrape = app.metrics().await;
    assert!(scrape.contains("portcullis_config_hub_slots"), "{scrape}");

    // the first release of the application being waited for reaches its watch
    let (s, b) = api
        .put(
            "prod",
            "late-app",
            WRITER,
            json!({ "entries": [{ "key": "k", "value": "first" }], "message": "first" }),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&seen).contains("id: 1\n") {
            let n = late.read(&mut buf).await.unwrap();
            assert!(n > 0, "the watch ended");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first release reaches the watch that waited for it");
    assert!(String::from_utf8_lossy(&seen).contains("\"value\":\"first\""));
}

#[tokio::test]
async fn a_notification_lost_on_the_way_is_healed_by_the_reconcile() {
    let app = spawn_app(|c| c.config_center.reconcile_interval = Duration::from_millis(200)).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let mut watch = open_watch(&api, None).await;
    assert_eq!(read_events(&mut watch, 1).await[0].0, 1);

    // a second store on the same database file: its publish notifies nobody in the
    // instance, exactly like a notification lost on the way
    let path = app.dir.path().join("portcullis.db");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let wrapper =
        config_center::LocalWrapper::open(&app.dir.path().join("config-master.key")).unwrap();
    let store = config_center::Store::new(
        config_center::Pool::Sqlite(pool),
        config_center::Envelope::new(config_center::KeyWrapper::Local(wrapper)),
    );
    let env = config_center::Environments::new(["prod"])
        .unwrap()
        .parse("prod")
        .unwrap();
    let name = config_center::AppName::parse(APP).unwrap();
    store
        .publish(
            &env,
            &name,
            config_center::Expected::Version(1),
            vec![
                config_center::ConfigEntry::parse(
                    "k",
                    "from-elsewhere",
                    config_center::Format::Plain,
                    false,
                )
                .unwrap(),
            ],
            &config_center::ChangeNote::new("test", "bypass"),
        )
        .await
        .unwrap();
    let got = read_events(&mut watch, 1).await;
    assert_eq!(got[0].0, 2);
    assert!(got[0].1.to_string().contains("from-elsewhere"));
}

#[tokio::test]
async fn the_client_library_verifies_and_follows_a_real_instance_and_starts_from_disk_when_it_is_gone()
 {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let cache = tempfile::tempdir().unwrap();
    let url = url::Url::parse(&app.url("/")).unwrap();
    let mut cfg = config_center::client::ClientConfig::new(
        vec![url.clone()],
        "prod",
        APP,
        SecretString::from(token(&app, "config:read:prod")),
        cache.path(),
    );
    cfg.ca_pem = Some(app.pki.ca_pem().into_bytes());
    let client = config_center::client::Client::start(cfg.clone())
        .await
        .unwrap();
    assert_eq!(client.version(), 1);
    assert_eq!(client.get_str("db.password").as_deref(), Some("pw-Kq9x-v1"));
    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Pool {
        size: u32,
    }
    assert_eq!(client.get::<Pool>("pool").unwrap(), Some(Pool { size: 8 }));

    let mut changes = client.subscribe();
    api.publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while changes.borrow_and_update().version < 2 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the release reaches the client");
    assert_eq!(client.get_str("db.url").as_deref(), Some("postgres://v2"));
    drop(client);

    // the last-known-good copy the client left on disk
    let copy = cache.path().join(format!("prod__{APP}.json"));
    let held: Value = serde_json::from_slice(&std::fs::read(&copy).unwrap()).unwrap();
    assert_eq!(held["version"], 2, "{held}");

    // every gateway down: the node still starts, from its last-known-good copy
    app.stop.cancel();
    let https = app.https;
    eventually(
        Duration::from_secs(10),
        "the instance refuses connections",
        || async move { tokio::net::TcpStream::connect(https).await.is_err() },
    )
    .await;
    let offline = config_center::client::Client::start(cfg).await.unwrap();
    assert_eq!(offline.origin(), config_center::client::Origin::Disk);
    assert_eq!(offline.version(), 2);
    assert_eq!(offline.get_str("db.url").as_deref(), Some("postgres://v2"));
}

/// A watch ends when its token expires; the client library reconnects with the token it
/// was given meanwhile and resumes from the version it holds, so the node misses nothing
/// (here: a release made while it had no valid token).
#[tokio::test]
async fn the_client_library_resumes_with_its_new_token_after_a_watch_ends_at_token_expiry() {
    let app = spawn_app(|c| c.tokens.leeway = Duration::ZERO).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let cache = tempfile::tempdir().unwrap();
    let exp = app.state.keys.now().unix_timestamp() + 2;
    let mut cfg = config_center::client::ClientConfig::new(
        vec![url::Url::parse(&app.url("/")).unwrap()],
        "prod",
        APP,
        SecretString::from(token_until(&app, "config:read:prod", exp)),
        cache.path(),
    );
    cfg.ca_pem = Some(app.pki.ca_pem().into_bytes());
    let client = config_center::client::Client::start(cfg).await.unwrap();
    assert_eq!(client.version(), 1);

    eventually(Duration::from_secs(10), "the node's token expired", || {
        let now = app.state.keys.now().unix_timestamp();
        async move { now > exp }
    })
    .await;
    let v2 = api
        .publish(json!([{ "key": "db.url", "value": "postgres://v2" }]))
        .await;
    client.set_token(SecretString::from(token(&app, "config:read:prod")));
    let mut changes = client.subscribe();
    tokio::time::timeout(Duration::from_secs(15), async {
        while changes.borrow_and_update().version < v2 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the release made meanwhile reaches the node");
    let v3 = api
        .publish(json!([{ "key": "db.url", "value": "postgres://v3" }]))
        .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while changes.borrow_and_update().version < v3 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("later releases follow");
    assert_eq!(client.get_str("db.url").as_deref(), Some("postgres://v3"));
}

/// The kid of a snapshot's detached signature, and whether `jwks` publishes it.
fn signed_by(snapshot: &Value, jwks: &Value) -> (String, bool) {
    let signature = snapshot["signature"].as_str().unwrap();
    let kid = jose_kid(signature.split('.').next().unwrap());
    let published = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == kid.as_str());
    (kid, published)
}

/// A node starting from nothing: `Client::start` fetches the snapshot and verifies its
/// signature against the instance's JWKS.
async fn node_starts(app: &TestApp) -> Result<u64, config_center::client::ClientError> {
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config_center::client::ClientConfig::new(
        vec![url::Url::parse(&app.url("/")).unwrap()],
        "prod",
        APP,
        SecretString::from(token(app, "config:read:prod")),
        cache.path(),
    );
    cfg.ca_pem = Some(app.pki.ca_pem().into_bytes());
    config_center::client::Client::start(cfg)
        .await
        .map(|c| c.version())
}

/// After an emergency rotation JWKS no longer holds the key that signed the held release:
/// the release is signed again by the new key, so snapshots, the events of new watches and
/// a node starting now all verify.
#[tokio::test]
async fn held_releases_are_signed_again_after_an_emergency_rotation() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let path = Api::path("prod", APP, "");
    let (_, _, before) = api.get(&path, "config:read:prod").await;
    let (old, published) = signed_by(&before, &app.state.keys.jwks());
    assert!(published);
    assert_eq!(node_starts(&app).await.unwrap(), 1);

    emergency_rotation(&app.state).await;
    let jwks = app.state.keys.jwks();

    let (status, headers, after) = api.get(&path, "config:read:prod").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(headers["etag"], "\"1\"", "the same release");
    let (kid, published) = signed_by(&after, &jwks);
    assert_ne!(kid, old);
    assert!(published, "signed by a key in JWKS now");
    let snapshot: config_center::Snapshot = serde_json::from_value(after).unwrap();
    assert_eq!(snapshot.entries.len(), 3);

    let mut watch = open_watch(&api, None).await;
    let (_, event) = read_events(&mut watch, 1).await.remove(0);
    assert!(
        signed_by(&event, &jwks).1,
        "a new watch's event verifies too"
    );
    assert_eq!(node_starts(&app).await.unwrap(), 1, "a node starting now");
}

/// Weeks after a scheduled rotation the old key leaves JWKS, with no change to the ring
/// (key states follow the clock): a held release is signed by the key signing now.
#[tokio::test]
async fn held_releases_follow_a_scheduled_rotation_to_the_next_key() {
    let clock = std::sync::Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = spawn_app_with_clock(clock.clone(), |c| {
        // the old key leaves JWKS while its successor is still the one signing
        c.keys.overlap = Duration::from_secs(2 * 3600);
        // only the reloads below change the ring
        c.keys.reload_interval = Duration::from_secs(3600);
    })
    .await;
    let keys = &app.state.keys;
    let first = keys.status().active_kid.unwrap();
    let retire_at = keys
        .status()
        .keys
        .iter()
        .find(|k| k.kid == first)
        .unwrap()
        .retire_at;
    // the successor is planned within the pre-publication lead
    clock.set(retire_at - time::Duration::days(1));
    keys.rotator().reload_once().await.unwrap();
    assert_eq!(keys.status().keys.len(), 2, "{:?}", keys.status());

    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let path = Api::path("prod", APP, "");
    let (_, _, before) = api.get(&path, "config:read:prod").await;
    assert_eq!(signed_by(&before, &keys.jwks()).0, first.to_string());

    // past the old key's overlap: the successor signs, the old key is out of JWKS
    clock.set(retire_at + time::Duration::hours(3));
    let generation = keys.keys().generation();
    let now_signing = keys.status().active_kid.unwrap();
    assert_ne!(now_signing, first);
    let (_, _, after) = api.get(&path, "config:read:prod").await;
    let (kid, published) = signed_by(&after, &keys.jwks());
    assert_eq!(kid, now_signing.to_string());
    assert!(published);
    assert_eq!(node_starts(&app).await.unwrap(), 1);
    assert_eq!(
        keys.keys().generation(),
        generation,
        "the ring did not change"
    );
}

// === several instances, Postgres, Vault Transit ===

/// An instance on `database` whose values are sealed under the shared `master_key`.
pub(super) async fn on_postgres(database: &str, master_key: &std::path::Path) -> TestApp {
    let database = database.to_owned();
    let master_key = master_key.to_owned();
    spawn_app(move |c| {
        c.database.url = SecretString::from(database);
        c.config_center.master_key_file = Some(master_key);
        c.config_center.reconcile_interval = Duration::from_secs(3600);
    })
    .await
}

/// A read that loads a release while the periodic reconcile sweeps the unused slots keeps
/// what it loaded held: the slot it fills is followed while it loads. (A slot that holds
/// nothing yet is unused; the sweep dropped it under the load, which then filled a slot
/// nobody held, so every later read went to the database again.)
#[tokio::test]
async fn a_release_loaded_while_the_reconcile_sweeps_stays_held() {
    let db = harness::Postgres::shared()
        .fresh_database("config_sweep")
        .unwrap();
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("master.key");
    // published by another instance, so that this one holds nothing of it yet
    let writer = on_postgres(&db, &key).await;
    Api::new(&writer).publish(entries_v1()).await;
    let app = on_postgres(&db, &key).await;
    let center = &app.state.config_center;
    assert_eq!(center.hub.slot_count(), 0);

    // the releases held by another session: the read's load waits on them
    let mut holder =
        session_holding(&db, "LOCK TABLE config_releases IN ACCESS EXCLUSIVE MODE").await;
    let api = Api::new(&app);
    let path = Api::path("prod", APP, "");
    let reading = api.get(&path, "config:read:prod");
    let sweeping = async {
        until_a_session_waits_on_a_lock(&db, "the read of the releases").await;
        // a reconcile's first step is the sweep; then, while this instance holds
        // anything, it reads the newest versions (held up as well)
        let mut reconcile = Box::pin(center.hub.reconcile());
        let swept = futures::poll!(&mut reconcile);
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        match swept {
            std::task::Poll::Ready(done) => done.unwrap(),
            std::task::Poll::Pending => reconcile.await.unwrap(),
        }
    };
    let ((status, _, body), ()) = tokio::join!(reading, sweeping);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(
        center.hub.slot_count(),
        1,
        "the release read is held for the next read"
    );
}

#[tokio::test]
async fn a_release_published_on_one_instance_reaches_watchers_and_pollers_on_another() {
    let db = harness::Postgres::shared()
        .fresh_database("config_two")
        .unwrap();
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("master.key");
    let a = on_postgres(&db, &key).await;
    let b = on_postgres(&db, &key).await;
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    api_a.publish(entries_v1()).await;

    let mut watch = open_watch(&api_b, None).await;
    assert_eq!(read_events(&mut watch, 1).await[0].0, 1);
    let poller = {
        let http = api_b.http.clone();
        let url = b.url(&Api::path("prod", APP, "/poll?version=1"));
        let t = token(&b, "config:read:prod");
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(t).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // the reconcile is an hour away: only the change feed can carry this
    api_a
        .publish(json!([{ "key": "db.url", "value": "postgres://from-a" }]))
        .await;
    let got = read_events(&mut watch, 1).await;
    assert_eq!(got[0].0, 2);
    assert!(got[0].1.to_string().contains("postgres://from-a"));
    let (s, body) = tokio::time::timeout(Duration::from_secs(10), poller)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)));
}

#[tokio::test]
async fn with_postgres_down_held_releases_are_served_writes_answer_503_and_watchers_catch_up() {
    let pg = harness::Postgres::start().unwrap();
    let db = pg.fresh_database("config_outage").unwrap();
    let shared = tempfile::tempdir().unwrap();
    let a = on_postgres(&db, &shared.path().join("master.key")).await;
    let api = Api::new(&a);
    api.publish(entries_v1()).await;
    let mut watch = open_watch(&api, None).await;
    assert_eq!(read_events(&mut watch, 1).await[0].0, 1);

    pg.stop();
    let (s, _, b) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(s, 200, "a held release is served from memory: {b}");
    assert_eq!(b["version"], 1);
    let (s, b) = api
        .put(
            "prod",
            APP,
            WRITER,
            json!({ "entries": [{ "key": "k", "value": "v" }] }),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["error"], "temporarily_unavailable");
    assert!(
        !b.to_string().contains("connection"),
        "no database text leaks: {b}"
    );

    pg.restart().unwrap();
    // writes resume by themselves (the pool reconnects), and the watcher, still on the
    // same stream, gets the release
    let mut version = 0;
    for _ in 0..100 {
        let (s, b) = api
            .put(
                "prod",
                APP,
                WRITER,
                json!({ "entries": [{ "key": "k", "value": "after" }] }),
            )
            .await;
        if s == 201 {
            version = b["version"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(version, 2, "the first write after the outage is release 2");
    let got = read_events(&mut watch, 1).await;
    assert_eq!(got[0].0, 2);
}

#[tokio::test]
async fn transit_sealed_values_round_trip_and_a_wrong_transit_key_fails_closed() {
    let bao = harness::OpenBao::shared();
    let mount = format!("transit-cfg-{}", uuid::Uuid::new_v4().simple());
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "transit"])
        .unwrap();
    bao.bao(&["write", "-f", &format!("{mount}/keys/portcullis-config")])
        .unwrap();
    let db = harness::Postgres::shared()
        .fresh_database("config_transit")
        .unwrap();
    let vault = format!(
        "addr = \"{}\"\ntoken = \"{}\"\n",
        bao.addr(),
        bao.root_token()
    );
    let with_key = |key: &'static str| {
        let (db, vault, mount) = (db.clone(), vault.clone(), mount.clone());
        move |c: &mut portcullis::config::Config| {
            c.database.url = SecretString::from(db);
            c.vault = Some(toml::from_str(&vault).unwrap());
            c.config_center.key_wrapper = Some(portcullis::config::KeyWrapperKind::Transit);
            c.config_center.transit_mount = mount;
            c.config_center.transit_key = key.to_owned();
        }
    };
    let app = spawn_app(with_key("portcullis-config")).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let (s, _, b) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(s, 200);
    assert!(b.to_string().contains("pw-Kq9x-v1"));
    let raw = harness::Postgres::shared()
        .psql(
            db.rsplit('/').next().unwrap(),
            "SELECT encode(sealed, 'escape') FROM config_entries",
        )
        .unwrap();
    assert!(
        !raw.contains("pw-Kq9x") && !raw.contains("orders-db"),
        "{raw}"
    );

    // an instance whose Transit key is not the one that wrapped the data key
    let wrong = spawn_app(with_key("no-such-key")).await;
    let api = Api::new(&wrong);
    let (s, _, b) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(s, 503, "{b}");
    let (s, b) = api
        .put(
            "prod",
            APP,
            WRITER,
            json!({ "entries": [{ "key": "k", "value": "v" }] }),
        )
        .await;
    assert_eq!(s, 503, "{b}");
}

// === the ops CLI ===

fn cli(app: &TestApp, scope: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let ca = app.dir.path().join("ca.pem");
    std::fs::write(&ca, app.pki.ca_pem()).unwrap();
    let mut child = std::process::Command::new(binary())
        .arg("config")
        .args(args)
        .env("PORTCULLIS_URL", app.url(""))
        .env("PORTCULLIS_TOKEN", token(app, scope))
        .env("PORTCULLIS_CACERT", &ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_sets_exports_diffs_and_rolls_back_through_the_api() {
    let app = spawn_app(|_| {}).await;
    let yaml = app.dir.path().join("orders.yaml");
    std::fs::write(
        &yaml,
        "db:\n  url: postgres://orders-db/orders\n  pool: 8\nfeature: on\n",
    )
    .unwrap();
    let y = yaml.to_str().unwrap();
    let run = |args: Vec<&str>, stdin: Option<&str>| {
        let app = &app;
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let stdin = stdin.map(str::to_owned);
        async move {
            let scope = "config:read:prod config:write:prod config:reveal:prod";
            let (ok, out, err) = tokio::task::block_in_place(|| {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                cli(app, scope, &refs, stdin.as_deref())
            });
            assert!(ok, "portcullis config {args:?}: {err}");
            out
        }
    };
    let out = run(vec!["import", "prod", APP, y], None).await;
    assert!(out.contains("release 1 (3 keys)"), "{out}");
    // the secret value comes from standard input, not the command line
    let out = run(
        vec!["set", "prod", APP, "db.password", "-", "--secret"],
        Some("pw-cli-1\n"),
    )
    .await;
    assert!(out.contains("release 2"), "{out}");
    assert_eq!(
        run(vec!["get", "prod", APP, "db.password"], None)
            .await
            .trim(),
        "pw-cli-1"
    );
    let exported = run(vec!["export", "prod", APP, "--format", "properties"], None).await;
    assert_eq!(
        exported,
        "#@portcullis secret\ndb.password=pw-cli-1\ndb.pool=8\ndb.url=postgres://orders-db/orders\nfeature=on\n"
    );
    let out = run(vec!["rm", "prod", APP, "feature"], None).await;
    assert!(out.contains("release 3"), "{out}");
    let diff = run(vec!["diff", "prod", APP, "1", "3"], None).await;
    assert!(
        diff.contains("+ db.password") && diff.contains("- feature"),
        "{diff}"
    );
    let out = run(
        vec![
            "rollback",
            "prod",
            APP,
            "1",
            "--yes",
            "-m",
            "back to the import",
        ],
        None,
    )
    .await;
    assert!(out.contains("release 4"), "{out}");
    let history = run(vec!["history", "prod", APP], None).await;
    assert!(history.contains("rollback to 1"), "{history}");
    assert_eq!(
        run(vec!["get", "prod", APP, "feature"], None).await.trim(),
        "on"
    );

    // refusals come back with the API's status and error, and exit non-zero
    let (ok, _, err) = tokio::task::block_in_place(|| {
        cli(
            &app,
            "config:read:prod",
            &["set", "prod", APP, "k", "v"],
            None,
        )
    });
    assert!(!ok);
    assert!(
        err.contains("403") && err.contains("insufficient_scope"),
        "{err}"
    );
}

// === gray releases ===

#[tokio::test]
async fn a_gray_release_reaches_only_the_selected_instances_until_promoted() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let node = |who: &str| Api::path("prod", APP, who);
    let read = |who: &'static str| {
        let api = &api;
        async move {
            let (s, _, b) = api.get(&node(who), "config:read:prod").await;
            assert_eq!(s, 200, "{b}");
            b["version"].as_u64().unwrap()
        }
    };

    // canary: node-7 by id, and every node labelled zone=b
    let (s, _, b) = api
        .send(
            reqwest::Method::PUT,
            &Api::path("prod", APP, "/gray"),
            WRITER,
            Some(json!({
                "entries": [{ "key": "db.url", "value": "postgres://canary" }],
                "selector": { "instances": ["node-7"], "labels": { "zone": "b" } },
                "message": "canary"
            })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let gray = b["version"].as_u64().unwrap();
    assert_eq!(gray, 2);
    assert_eq!(read("?instance=node-7").await, 2);
    assert_eq!(read("?instance=node-1&labels=zone%3Db,rack%3D4").await, 2);
    assert_eq!(read("?instance=node-1&labels=zone%3Da").await, 1);
    assert_eq!(read("").await, 1);
    // the history and the release itself say which release is gray, and for whom
    let status = |version: u64| {
        let api = &api;
        async move {
            let (s, _, h) = api.get(&node("/releases"), "config:read:prod").await;
            assert_eq!(s, 200, "{h}");
            let listed = h["releases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["version"] == version)
                .unwrap()
                .clone();
            let (s, _, one) = api
                .get(&node(&format!("/releases/{version}")), "config:read:prod")
                .await;
            assert_eq!(s, 200, "{one}");
            assert_eq!(one["status"], listed["status"]);
            assert_eq!(one["gray"], listed.get("gray").cloned().unwrap_or_default());
            (
                listed["status"].as_str().unwrap().to_owned(),
                listed.get("gray").cloned(),
            )
        }
    };
    let canary = json!({ "instances": ["node-7"], "labels": { "zone": "b" } });
    assert_eq!(status(1).await, ("main".to_owned(), None));
    assert_eq!(status(2).await, ("gray".to_owned(), Some(canary.clone())));

    // a watcher outside the selection hears nothing until the promotion
    let mut outside = open_watch(&api, Some(1)).await;
    // no other release may be published meanwhile
    let (s, b) = api
        .put(
            "prod",
            APP,
            WRITER,
            json!({ "entries": [{ "key": "x", "value": "y" }] }),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["error"], "gray_in_progress");

    let (s, _, b) = api
        .send(
            reqwest::Method::POST,
            &Api::path("prod", APP, &format!("/gray/promote?version={gray}")),
            WRITER,
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let got = read_events(&mut outside, 1).await;
    assert_eq!(got[0].0, 2, "the promoted release reaches everybody");
    assert!(got[0].1.to_string().contains("postgres://canary"));
    assert_eq!(read("").await, 2);

    // a second canary, aborted: every node moves forward to a republished main release
    let (s, _, b) = api
        .send(
            reqwest::Method::PUT,
            &Api::path("prod", APP, "/gray"),
            WRITER,
            Some(json!({
                "entries": [{ "key": "db.url", "value": "postgres://bad-canary" }],
                "selector": { "instances": ["node-7"] }
            })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(read("?instance=node-7").await, 3);
    let (s, _, b) = api
        .send(
            reqwest::Method::DELETE,
            &Api::path("prod", APP, "/gray"),
            WRITER,
            None,
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["version"], 4);
    // promoted, the first canary is main; the aborted one keeps its selector
    assert_eq!(status(2).await, ("main".to_owned(), Some(canary)));
    assert_eq!(
        status(3).await,
        (
            "aborted".to_owned(),
            Some(json!({ "instances": ["node-7"] }))
        )
    );
    assert_eq!(status(4).await.0, "main");
    let (_, _, snap) = api.get(&node("?instance=node-7"), "config:read:prod").await;
    assert_eq!(snap["version"], 4);
    assert!(
        snap.to_string().contains("postgres://canary") && !snap.to_string().contains("bad-canary")
    );

    // selectors and node names are checked like any other name
    let (s, _, b) = api.get(&node("?instance=..%2Fx"), "config:read:prod").await;
    assert_eq!(s, 400, "{b}");
    let (s, _, b) = api
        .send(
            reqwest::Method::PUT,
            &Api::path("prod", APP, "/gray"),
            WRITER,
            Some(json!({ "entries": [], "selector": {} })),
        )
        .await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_gray_release_then_promotes_it() {
    let app = spawn_app(|_| {}).await;
    let api = Api::new(&app);
    api.publish(entries_v1()).await;
    let props = app.dir.path().join("canary.properties");
    std::fs::write(&props, "db.url=postgres://canary\n").unwrap();
    let scope = "config:read:prod config:write:prod";
    let p = props.to_str().unwrap();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &app,
            scope,
            &["gray", "prod", APP, p, "--label", "zone=b"],
            None,
        )
    });
    assert!(ok, "{err}");
    assert!(out.contains("gray release 2"), "{out}");
    let (_, _, b) = api
        .get(
            &Api::path("prod", APP, "?labels=zone%3Db"),
            "config:read:prod",
        )
        .await;
    assert_eq!(b["version"], 2);
    let (_, _, b) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(b["version"], 1);
    // the history says which release is the gray one
    let history = || {
        let (ok, out, err) =
            tokio::task::block_in_place(|| cli(&app, scope, &["history", "prod", APP], None));
        assert!(ok, "{err}");
        out.lines()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    assert_eq!(history(), ["2 gray", "1 main"]);
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &app,
            scope,
            &["promote", "prod", APP, "--version", "2"],
            None,
        )
    });
    assert!(ok, "{err}");
    assert!(out.contains("release 2 promoted"), "{out}");
    assert_eq!(history(), ["2 main", "1 main"]);
    let (_, _, b) = api
        .get(&Api::path("prod", APP, ""), "config:read:prod")
        .await;
    assert_eq!(b["version"], 2);
    // nothing left to promote
    let (ok, _, err) =
        tokio::task::block_in_place(|| cli(&app, scope, &["abort", "prod", APP], None));
    assert!(!ok);
    assert!(
        err.contains("409") && err.contains("no_gray_release"),
        "{err}"
    );
}
