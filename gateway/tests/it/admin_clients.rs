//! The clients and sessions admin API, against real Postgres and Redis, and the
//! `portcullis clients` CLI against a SQLite database.

use std::time::Duration;

use harness::{Postgres, Redis};
use portcullis::refresh::{NewFamily, RefreshError};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::support::*;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// An instance on a fresh Postgres database and the shared Redis (own key prefix), with
/// `admin.token` set.
async fn app() -> TestApp {
    app_with(|_| {}).await
}

/// [`app`], with more configuration.
async fn app_with(customize: impl FnOnce(&mut portcullis::config::Config)) -> TestApp {
    app_with_clock(std::sync::Arc::new(keyrotation::SystemClock), customize).await
}

/// [`app_with`], on `clock`.
async fn app_with_clock(
    clock: std::sync::Arc<dyn keyrotation::Clock>,
    customize: impl FnOnce(&mut portcullis::config::Config),
) -> TestApp {
    let db = Postgres::shared().fresh_database("admin_clients").unwrap();
    let redis = Redis::shared().url();
    spawn_app_with_clock(clock, move |c| {
        c.database.url = SecretString::from(db);
        c.redis = Some(portcullis::config::RedisConfig {
            url: SecretString::from(redis),
            cluster: false,
            command_timeout: Duration::from_secs(2),
        });
        c.refresh.key_prefix = format!("admin-clients-{}:", uuid::Uuid::new_v4());
        c.admin.token = Some(SecretString::from(ADMIN_TOKEN));
        customize(c);
    })
    .await
}

/// A request to the admin listener, with the static admin token.
fn admin(app: &TestApp, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("http://{}{path}", app.admin))
        .bearer_auth(ADMIN_TOKEN)
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, body, headers)
}

/// Registers a client through the API; returns its id and secret.
async fn create(app: &TestApp, body: Value) -> (String, String) {
    let (status, body, _) =
        send(admin(app, reqwest::Method::POST, "/admin/clients").json(&body)).await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

/// `client_credentials` at the token endpoint: the status and the body.
async fn token(app: &TestApp, id: &str, secret: &str) -> (StatusCode, Value) {
    let resp = app
        .https_client()
        .post(app.url("/oauth2/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

fn login(client_id: &str, subject: &str) -> NewFamily {
    NewFamily {
        client_id: client_id.to_owned(),
        subject: subject.to_owned(),
        scope: "openid".to_owned(),
        audience: vec![],
        auth_time: time::OffsetDateTime::now_utc(),
        session: json!({ "roles": ["viewer"] }),
    }
}

/// Issues a refresh-token family; returns its token and family id.
async fn issue(app: &TestApp, client_id: &str, subject: &str) -> (SecretString, String) {
    let issued = app
        .state
        .refresh
        .issue(login(client_id, subject), app.state.keys.now())
        .await
        .unwrap();
    (issued.token, issued.session.family.to_string())
}

/// Waits for the audit rows of `action` and returns them as (actor, target, detail).
async fn audited(app: &TestApp, action: &str, at_least: usize) -> Vec<(String, String, String)> {
    let db = app.state.db.clone();
    eventually(Duration::from_secs(10), action, || {
        let db = db.clone();
        async move {
            portcullis::audit::recent(&db, action, 100)
                .await
                .is_ok_and(|rows| rows.len() >= at_least)
        }
    })
    .await;
    portcullis::audit::recent(&app.state.db, action, 100)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_created_client_gets_tokens_with_the_secret_shown_once() {
    let app = app().await;
    let (status, body, headers) = send(admin(&app, reqwest::Method::POST, "/admin/clients").json(
        &json!({
            "id": "executor-orders", "name": "Orders executor",
            "scopes": ["jobs:run", "config:read:prod"], "audiences": ["xxl-job-admin"],
            "access_token_lifetime": "15m",
        }),
    ))
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["location"], "/admin/clients/executor-orders");
    assert_eq!(body["grant_types"], json!(["client_credentials"]));
    assert_eq!(body["scopes"], json!(["config:read:prod", "jobs:run"]));
    assert_eq!(body["access_token_lifetime"], "15m");
    assert_eq!(body["enabled"], true);
    let secret = body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("pcs_"), "{secret}");

    let (status, tok) = token(&app, "executor-orders", &secret).await;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(tok["expires_in"], 900);
    assert_eq!(tok["scope"], "config:read:prod jobs:run");

    // neither the list nor the client itself ever shows a secret or a hash again
    let (status, list, _) = send(admin(&app, reqwest::Method::GET, "/admin/clients")).await;
    assert_eq!(status, 200);
    let (status, one, _) = send(admin(
        &app,
        reqwest::Method::GET,
        "/admin/clients/executor-orders",
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["clients"][0], one);
    assert_eq!(one["name"], "Orders executor");
    for shown in [list.to_string(), one.to_string()] {
        assert!(!shown.contains(&secret), "{shown}");
        assert!(
            !shown.contains("pcs_") && !shown.contains("hash"),
            "{shown}"
        );
        assert!(!shown.contains("secret\""), "{shown}");
    }

    let rows = audited(&app, "client.create", 1).await;
    let (actor, target, detail) = &rows[0];
    assert_eq!(actor, "operator:admin-api");
    assert_eq!(target, "executor-orders");
    assert!(
        detail.contains("jobs:run") && !detail.contains("pcs_"),
        "{detail}"
    );

    // a generated id when none is given
    let (id, _) = create(&app, json!({ "name": "anonymous" })).await;
    assert!(id.starts_with("client-"), "{id}");
}

#[tokio::test]
async fn a_rotated_secret_keeps_the_old_one_working_for_the_overlap_only() {
    // the instance's clock, moved by the test to the end of an overlap
    let clock = std::sync::Arc::new(keyrotation::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let app = app_with_clock(clock.clone(), |_| {}).await;
    let (id, first) = create(&app, json!({ "name": "rotating" })).await;
    let path = format!("/admin/clients/{id}/rotate-secret");

    let (status, body, headers) =
        send(admin(&app, reqwest::Method::POST, &path).json(&json!({ "overlap": "1h" }))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let second = body["secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    let until = time::OffsetDateTime::parse(
        body["previous_secret_expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expected = app.state.keys.now() + time::Duration::hours(1);
    assert!(
        (until - expected).abs() < time::Duration::seconds(30),
        "{until}"
    );
    assert_eq!(
        token(&app, &id, &first).await.0,
        200,
        "old, within the overlap"
    );
    assert_eq!(token(&app, &id, &second).await.0, 200, "new");
    let (_, shown, _) = send(admin(
        &app,
        reqwest::Method::GET,
        &format!("/admin/clients/{id}"),
    ))
    .await;
    assert!(shown["previous_secret_expires_at"].is_string(), "{shown}");
    // the old secret works until the overlap's end, and not from then on
    clock.set(until - time::Duration::seconds(1));
    assert_eq!(
        token(&app, &id, &first).await.0,
        200,
        "old, a second before the overlap ends"
    );
    clock.set(until);
    let (status, refused) = token(&app, &id, &first).await;
    assert_eq!(status, 401, "old, at the overlap's end: {refused}");
    assert_eq!(refused["error"], "invalid_client");
    assert_eq!(token(&app, &id, &second).await.0, 200, "new, still");
    let (_, shown, _) = send(admin(
        &app,
        reqwest::Method::GET,
        &format!("/admin/clients/{id}"),
    ))
    .await;
    assert_eq!(shown["previous_secret_expires_at"], Value::Null, "{shown}");

    // no overlap: the replaced secret stops at once
    let (status, body, _) =
        send(admin(&app, reqwest::Method::POST, &path).json(&json!({ "overlap": "0s" }))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_secret_expires_at"], Value::Null);
    let third = body["secret"].as_str().unwrap().to_owned();
    let (status, refused) = token(&app, &id, &second).await;
    assert_eq!(status, 401);
    assert_eq!(refused["error"], "invalid_client");
    assert_eq!(token(&app, &id, &first).await.0, 401, "two rotations old");
    assert_eq!(token(&app, &id, &third).await.0, 200);

    // no body: the default overlap of 24 h
    let (status, body, _) = send(admin(&app, reqwest::Method::POST, &path)).await;
    assert_eq!(status, 200, "{body}");
    let until = time::OffsetDateTime::parse(
        body["previous_secret_expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expected = app.state.keys.now() + time::Duration::hours(24);
    assert!(
        (until - expected).abs() < time::Duration::minutes(1),
        "{until}, not 24 h from {}",
        app.state.keys.now()
    );

    let rows = audited(&app, "client.rotate_secret", 3).await;
    for (actor, target, detail) in &rows {
        assert_eq!(actor, "operator:admin-api");
        assert_eq!(target, &id);
        for s in [&first, &second, &third] {
            assert!(!detail.contains(s.as_str()), "{detail}");
        }
    }
    assert!(
        rows.iter().any(|(_, _, d)| d.contains("\"0s\"")),
        "{rows:?}"
    );
}

#[tokio::test]
async fn disabling_a_client_refuses_it_and_revokes_its_refresh_tokens_at_once() {
    let app = app().await;
    let (id, secret) = create(
        &app,
        json!({ "name": "console", "grant_types": ["client_credentials", "refresh_token"] }),
    )
    .await;
    let (other, _) = create(&app, json!({ "name": "other" })).await;
    let (t1, _) = issue(&app, &id, "alice").await;
    let (_t2, _) = issue(&app, &id, "bob").await;
    let (t3, f3) = issue(&app, &other, "alice").await;

    let (status, body, _) = send(admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/clients/{id}/disable"),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enabled"], false);
    assert_eq!(body["sessions_revoked"], 2);

    let (status, refused) = token(&app, &id, &secret).await;
    assert_eq!(status, 401);
    assert_eq!(refused["error"], "invalid_client");
    let now = app.state.keys.now();
    assert!(matches!(
        app.state.refresh.refresh(&t1, &id, now).await,
        Err(RefreshError::Invalid(_))
    ));
    // another client's session of the same user is untouched
    let alice = app.state.refresh.list_sessions("alice", now).await.unwrap();
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].family.to_string(), f3);
    assert!(app.state.refresh.refresh(&t3, &other, now).await.is_ok());
    assert!(
        app.state
            .refresh
            .list_sessions("bob", now)
            .await
            .unwrap()
            .is_empty()
    );
    let (_, shown, _) = send(admin(
        &app,
        reqwest::Method::GET,
        &format!("/admin/clients/{id}"),
    ))
    .await;
    assert_eq!(shown["enabled"], false);

    let (status, body, _) = send(admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/clients/{id}/enable"),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(token(&app, &id, &secret).await.0, 200);

    let rows = audited(&app, "client.disable", 1).await;
    assert_eq!(rows[0].1, id);
    assert!(
        rows[0].2.contains("\"sessions_revoked\":2"),
        "{:?}",
        rows[0]
    );
    assert_eq!(audited(&app, "client.enable", 1).await[0].1, id);
}

#[tokio::test]
async fn the_console_client_id_cannot_be_registered() {
    let app = app_with(|c| c.sso.console_client_id = "ops-console".to_owned()).await;
    let (status, body, _) = send(
        admin(&app, reqwest::Method::POST, "/admin/clients")
            .json(&json!({ "id": "ops-console", "name": "console" })),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        body,
        json!({
            "error": "reserved_client_id",
            "error_description": "client id ops-console is sso.console_client_id: console \
                sessions are bound to it, so no client may have it",
        })
    );
    assert!(app.state.clients.list().await.unwrap().is_empty());
    // the default console id is an ordinary id where another is configured
    create(
        &app,
        json!({ "id": "portcullis-console", "name": "not the console" }),
    )
    .await;
}

#[tokio::test]
async fn a_client_registered_under_the_console_id_gets_no_token() {
    let app = app().await;
    let console = app.state.sso.settings().console_client_id.clone();
    // registered before the id was refused (a store without the configuration's rules)
    let key = app.state.config.server_key().unwrap();
    let (_, secret) = portcullis::clients::ClientStore::new(app.state.db.clone(), key)
        .create(
            portcullis::clients::NewClient {
                id: Some(console.parse().unwrap()),
                name: "console".to_owned(),
                grant_types: [
                    portcullis::clients::GrantType::ClientCredentials,
                    portcullis::clients::GrantType::RefreshToken,
                ]
                .into(),
                scopes: portcullis::clients::ScopeSet::new(),
                audiences: vec![],
                access_token_lifetime: None,
            },
            app.state.keys.now(),
        )
        .await
        .unwrap();
    let secret = secret.expose_secret().to_owned();
    // a console session: its refresh cookie must not buy a bearer token with its roles
    let (rt, _) = issue(&app, &console, "corp:alice").await;
    for form in [
        vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.expose_secret()),
        ],
        vec![("grant_type", "client_credentials")],
    ] {
        let resp = app
            .https_client()
            .post(app.url("/oauth2/token"))
            .basic_auth(&console, Some(&secret))
            .form(&form)
            .send()
            .await
            .unwrap();
        let (status, body): (StatusCode, Value) = (resp.status(), resp.json().await.unwrap());
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "unauthorized_client", "{body}");
    }
    // the session is untouched
    let now = app.state.keys.now();
    assert!(app.state.refresh.inspect(&rt, now).await.unwrap().is_some());
}

#[tokio::test]
async fn no_client_lifetime_outlives_the_key_overlap() {
    // keys.overlap 2h, tokens.leeway 30s: a token living longer than 1h 59m 30s could
    // outlive the key that signed it
    let app = app_with(|c| c.keys.overlap = Duration::from_secs(2 * 3600)).await;
    let refused = json!({
        "error": "invalid_request",
        "error_description": "invalid access_token_lifetime: at most 1h 59m 30s here \
            (keys.overlap less tokens.leeway), so that no token outlives the key that \
            verifies it",
    });
    let (status, body, _) = send(
        admin(&app, reqwest::Method::POST, "/admin/clients")
            .json(&json!({ "name": "long-lived", "access_token_lifetime": "2h" })),
    )
    .await;
    assert_eq!((status, body), (StatusCode::BAD_REQUEST, refused.clone()));
    assert_eq!(app.state.clients.list().await.unwrap().len(), 0);

    // at the bound: registered, and its tokens live exactly that long
    let (id, secret) = create(
        &app,
        json!({ "name": "long-lived", "access_token_lifetime": "1h 59m 30s" }),
    )
    .await;
    let (status, body) = token(&app, &id, &secret).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 7170);
    // nor may a change make it longer
    let change = portcullis::clients::ClientUpdate {
        access_token_lifetime: Some(Some(Duration::from_secs(7171))),
        ..Default::default()
    };
    let err = app
        .state
        .clients
        .update(&id.parse().unwrap(), change, app.state.keys.now())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        refused["error_description"].as_str().unwrap()
    );

    // a lifetime stored before the overlap was shortened is capped when tokens are minted
    let key = app.state.config.server_key().unwrap();
    let unruled = portcullis::clients::ClientStore::new(app.state.db.clone(), key);
    let (old, old_secret) = unruled
        .create(
            portcullis::clients::NewClient {
                id: None,
                name: "registered earlier".to_owned(),
                grant_types: [portcullis::clients::GrantType::ClientCredentials].into(),
                scopes: portcullis::clients::ScopeSet::new(),
                audiences: vec![],
                access_token_lifetime: Some(Duration::from_secs(3 * 3600)),
            },
            app.state.keys.now(),
        )
        .await
        .unwrap();
    let (status, body) = token(&app, old.id.as_str(), old_secret.expose_secret()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 7170);
}

#[tokio::test]
async fn deleting_a_client_cuts_off_its_tokens_revokes_its_refresh_tokens_and_forgets_it() {
    let app = app().await;
    let (id, secret) = create(
        &app,
        json!({
            "name": "short-lived",
            "grant_types": ["client_credentials", "refresh_token"],
            "scopes": ["portcullis:admin"],
        }),
    )
    .await;
    let (t, _) = issue(&app, &id, "carol").await;
    let path = format!("/admin/clients/{id}");
    // an access token the client holds, and a resource server that introspects it
    let (status, body) = token(&app, &id, &secret).await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap().to_owned();
    let (rs, rs_secret) = create(&app, json!({ "name": "resource server" })).await;
    let introspect = || async {
        let resp = app
            .https_client()
            .post(app.url("/oauth2/introspect"))
            .basic_auth(&rs, Some(&rs_secret))
            .form(&[("token", access.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()
    };
    // a bearer route Portcullis verifies: the admin API, which the token's scope opens
    let list_with_token = || async {
        let (status, body, _) = send(
            reqwest::Client::new()
                .get(format!("http://{}/admin/clients", app.admin))
                .bearer_auth(&access),
        )
        .await;
        (status, body)
    };
    assert_eq!(introspect().await["active"], true);
    assert_eq!(list_with_token().await.0, 200);

    let (status, body, _) = send(admin(&app, reqwest::Method::DELETE, &path)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(body["sessions_revoked"], 1);
    // its access token is cut off at once where Portcullis verifies it
    assert_eq!(introspect().await, json!({ "active": false }));
    let (status, refused) = list_with_token().await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(refused["error"], "invalid_token", "{refused}");
    let (status, body, _) = send(admin(&app, reqwest::Method::GET, &path)).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    assert_eq!(token(&app, &id, &secret).await.0, 401);
    let now = app.state.keys.now();
    assert!(app.state.refresh.refresh(&t, &id, now).await.is_err());
    assert!(
        app.state
            .refresh
            .list_sessions("carol", now)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        send(admin(&app, reqwest::Method::DELETE, &path)).await.0,
        404
    );

    let rows = audited(&app, "client.delete", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, id);
}

#[tokio::test]
async fn sessions_are_listed_and_revoked_one_at_a_time_or_everywhere() {
    let app = app().await;
    let (a, _) = issue(&app, "console", "dave").await;
    let (_b, fb) = issue(&app, "console", "dave").await;
    let (_c, _) = issue(&app, "other-console", "dave").await;
    let (e, _) = issue(&app, "console", "erin").await;

    let (status, body, _) = send(admin(
        &app,
        reqwest::Method::GET,
        "/admin/sessions?subject=dave",
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], "dave");
    let sessions = body["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3);
    // ordered by creation time in milliseconds: sessions made within the same one may
    // come in either order, so look them up by client
    let mut clients: Vec<&str> = sessions
        .iter()
        .map(|s| s["client_id"].as_str().unwrap())
        .collect();
    clients.sort_unstable();
    assert_eq!(clients, ["console", "console", "other-console"]);
    let console = sessions
        .iter()
        .find(|s| s["client_id"] == "console")
        .unwrap();
    assert_eq!(console["session"]["roles"], json!(["viewer"]));
    use secrecy::ExposeSecret;
    assert!(!body.to_string().contains(a.expose_secret()));

    let one = format!("/admin/sessions/{fb}");
    let (status, body, _) = send(admin(&app, reqwest::Method::DELETE, &one)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], true);
    assert_eq!(
        send(admin(&app, reqwest::Method::DELETE, &one)).await.0,
        404
    );
    let (_, body, _) = send(admin(
        &app,
        reqwest::Method::GET,
        "/admin/sessions?subject=dave",
    ))
    .await;
    assert_eq!(body["sessions"].as_array().unwrap().len(), 2);

    let (status, body, _) = send(admin(
        &app,
        reqwest::Method::DELETE,
        "/admin/sessions?subject=dave",
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sessions_revoked"], 2);
    let now = app.state.keys.now();
    assert!(app.state.refresh.refresh(&a, "console", now).await.is_err());
    let (_, body, _) = send(admin(
        &app,
        reqwest::Method::GET,
        "/admin/sessions?subject=dave",
    ))
    .await;
    assert_eq!(body["sessions"], json!([]));
    // someone else stays signed in
    assert!(app.state.refresh.refresh(&e, "console", now).await.is_ok());

    let rows = audited(&app, "session.revoke", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("operator:admin-api", fb.as_str())
    );
    let rows = audited(&app, "session.revoke_all", 1).await;
    assert_eq!(rows[0].1, "dave");
    assert!(
        rows[0].2.contains("\"sessions_revoked\":2"),
        "{:?}",
        rows[0]
    );
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_token_or_an_admin_scoped_access_token() {
    let app = app().await;
    let (worker, worker_secret) =
        create(&app, json!({ "name": "worker", "scopes": ["jobs:run"] })).await;
    let (ops, ops_secret) = create(
        &app,
        json!({ "name": "ops", "scopes": ["portcullis:admin"] }),
    )
    .await;
    let (status, body) = token(&app, &worker, &worker_secret).await;
    assert_eq!(status, 200, "{body}");
    let worker_token = body["access_token"].as_str().unwrap().to_owned();
    let (status, body) = token(&app, &ops, &ops_secret).await;
    assert_eq!(status, 200, "{body}");
    let ops_token = body["access_token"].as_str().unwrap().to_owned();

    let http = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/admin/clients".to_owned()),
        (reqwest::Method::POST, "/admin/clients".to_owned()),
        (reqwest::Method::GET, format!("/admin/clients/{worker}")),
        (
            reqwest::Method::POST,
            format!("/admin/clients/{worker}/disable"),
        ),
        (reqwest::Method::DELETE, format!("/admin/clients/{worker}")),
        (reqwest::Method::GET, "/admin/sessions?subject=x".to_owned()),
        (
            reqwest::Method::DELETE,
            "/admin/sessions?subject=x".to_owned(),
        ),
    ] {
        let url = format!("http://{}{path}", app.admin);
        let none = http.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(none.status(), 401, "{method} {path} without a token");
        let wrong = http
            .request(method.clone(), &url)
            .bearer_auth("not-the-admin-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{method} {path} with a wrong token");
        let (status, body, _) = send(
            http.request(method.clone(), &url)
                .bearer_auth(&worker_token)
                .json(&json!({})),
        )
        .await;
        assert_eq!(status, 403, "{method} {path} with a non-admin token");
        assert_eq!(body["error"], "insufficient_scope");
    }
    // the worker is untouched by all those refusals
    assert_eq!(token(&app, &worker, &worker_secret).await.0, 200);

    let url = format!("http://{}/admin/clients", app.admin);
    let (status, body, _) = send(http.get(&url).bearer_auth(&ops_token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["clients"].as_array().unwrap().len(), 2);
    let (status, _, _) = send(http.get(&url).bearer_auth(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    // the scheme is case-insensitive (RFC 7235), for the static token as for access tokens
    for scheme in ["bearer", "BEARER"] {
        let (status, body, _) = send(
            http.get(&url)
                .header("authorization", format!("{scheme} {ADMIN_TOKEN}")),
        )
        .await;
        assert_eq!(status, 200, "{scheme}: {body}");
    }
}

#[tokio::test]
async fn a_write_made_with_an_access_token_is_audited_as_the_client_that_made_it() {
    let app = app().await;
    let (ops, ops_secret) = create(
        &app,
        json!({ "name": "ops", "scopes": ["portcullis:admin"] }),
    )
    .await;
    let (worker, _) = create(&app, json!({ "name": "worker", "scopes": ["jobs:run"] })).await;
    let (status, body) = token(&app, &ops, &ops_secret).await;
    assert_eq!(status, 200, "{body}");
    let ops_token = body["access_token"].as_str().unwrap().to_owned();

    let url = format!("http://{}/admin/clients/{worker}/disable", app.admin);
    let (status, body, _) = send(reqwest::Client::new().post(&url).bearer_auth(&ops_token)).await;
    assert_eq!(status, 200, "{body}");
    let rows = audited(&app, "client.disable", 1).await;
    assert_eq!(rows.len(), 1);
    let (actor, target, _) = &rows[0];
    assert_eq!(actor, &format!("client:{ops}"), "who disabled {target}");
    assert_eq!(target, &worker);
    // the static token is nobody's in particular: still the operator
    let (status, _, _) = send(admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/clients/{worker}/enable"),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        audited(&app, "client.enable", 1).await[0].0,
        "operator:admin-api"
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named_and_nothing_changes() {
    let app = app().await;
    let (id, secret) = create(&app, json!({ "id": "kept", "name": "Kept" })).await;
    let post = |body: &'static str| {
        admin(&app, reqwest::Method::POST, "/admin/clients")
            .header("content-type", "application/json")
            .body(body)
    };
    for (body, field) in [
        (r#"{}"#, "name"),
        (r#"{"name": ""}"#, "name"),
        (r#"{"name": 7}"#, "name"),
        (r#"{"name": "x", "id": "Not Valid"}"#, "id"),
        (
            r#"{"name": "x", "grant_types": ["password"]}"#,
            "grant_types",
        ),
        (r#"{"name": "x", "grant_types": []}"#, "grant_types"),
        (r#"{"name": "x", "scopes": ["a b"]}"#, "scopes"),
        (r#"{"name": "x", "scopes": "a b"}"#, "scopes"),
        (r#"{"name": "x", "audiences": ["not a uri"]}"#, "audiences"),
        (r#"{"name": "x", "audiences": ["a", "a"]}"#, "audiences"),
        (
            r#"{"name": "x", "access_token_lifetime": "forever"}"#,
            "access_token_lifetime",
        ),
        (
            r#"{"name": "x", "access_token_lifetime": "2d"}"#,
            "access_token_lifetime",
        ),
        (
            r#"{"name": "x", "access_token_lifetime": 900}"#,
            "access_token_lifetime",
        ),
        (r#"{"name": "x", "secret": "my-own"}"#, "request body"),
        (r#"["name"]"#, "request body"),
        (r#"{"name": "#, "request body"),
    ] {
        let (status, resp, _) = send(post(body)).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"], "invalid_request", "{body}");
        let description = resp["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("invalid {field}: ")),
            "{body}: {description}"
        );
    }
    // a duplicate id is a conflict, and the original stays as it was
    let (status, resp, _) = send(post(r#"{"id": "kept", "name": "Impostor"}"#)).await;
    assert_eq!(status, 409, "{resp}");
    assert_eq!(resp["error"], "already_exists");
    let (_, list, _) = send(admin(&app, reqwest::Method::GET, "/admin/clients")).await;
    let clients = list["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{list}");
    assert_eq!(clients[0]["name"], "Kept");

    let client_path = format!("/admin/clients/{id}");
    let (status, before, _) = send(admin(&app, reqwest::Method::GET, &client_path)).await;
    assert_eq!(status, 200, "{before}");
    let rotate = format!("/admin/clients/{id}/rotate-secret");
    for (body, field) in [
        (json!({ "overlap": "soon" }), "overlap"),
        (json!({ "overlap": "31d" }), "overlap"),
        (json!({ "overlap": 3600 }), "overlap"),
        (json!({ "overlap": "1h", "reason": "x" }), "request body"),
    ] {
        let (status, resp, _) = send(admin(&app, reqwest::Method::POST, &rotate).json(&body)).await;
        assert_eq!(status, 400, "{body}: {resp}");
        let description = resp["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("invalid {field}: ")),
            "{description}"
        );
    }
    let (status, resp, _) = send(
        admin(
            &app,
            reqwest::Method::POST,
            &format!("/admin/clients/{id}/disable"),
        )
        .json(&json!({ "now": true })),
    )
    .await;
    assert_eq!(status, 400, "{resp}");
    // refused rotations and disables changed nothing: no secret replaced (a rotation would
    // leave the old one working for an overlap, so a token from it proves nothing alone),
    // still enabled, the record not written
    let (status, after, _) = send(admin(&app, reqwest::Method::GET, &client_path)).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["previous_secret_expires_at"], Value::Null, "{after}");
    assert_eq!(after["enabled"], true, "{after}");
    assert_eq!(after["updated_at"], before["updated_at"], "{after}");
    assert_eq!(after, before);
    assert_eq!(token(&app, &id, &secret).await.0, 200);

    for (method, path) in [
        (reqwest::Method::GET, "/admin/clients/nobody"),
        (reqwest::Method::DELETE, "/admin/clients/nobody"),
        (reqwest::Method::POST, "/admin/clients/nobody/rotate-secret"),
        (reqwest::Method::POST, "/admin/clients/nobody/disable"),
        (reqwest::Method::POST, "/admin/clients/nobody/enable"),
        (
            reqwest::Method::DELETE,
            "/admin/sessions/AAAAAAAAAAAAAAAAAAAAAA",
        ),
    ] {
        let (status, resp, _) = send(admin(&app, method.clone(), path)).await;
        assert_eq!(status, 404, "{method} {path}: {resp}");
    }
    for (method, path, field) in [
        (reqwest::Method::GET, "/admin/clients/Bad%20Id", "id"),
        (reqwest::Method::GET, "/admin/sessions", "subject"),
        (reqwest::Method::DELETE, "/admin/sessions", "subject"),
        (reqwest::Method::GET, "/admin/sessions?subject=", "subject"),
        (
            reqwest::Method::GET,
            "/admin/sessions?subject=a&all=1",
            "query",
        ),
        (
            reqwest::Method::DELETE,
            "/admin/sessions/not-a-family",
            "family",
        ),
    ] {
        let (status, resp, _) = send(admin(&app, method.clone(), path)).await;
        assert_eq!(status, 400, "{method} {path}: {resp}");
        let description = resp["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("invalid {field}: ")),
            "{method} {path}: {description}"
        );
    }
    // only the one successful create was audited: a sentinel recorded now is stored after
    // anything the refused requests queued (the writer keeps the queue's order), so once
    // it is stored an absent record is really absent
    app.state.audit.record(portcullis::audit::AuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: "operator:test".to_owned(),
        action: "test.sentinel".to_owned(),
        target: id.clone(),
        source_ip: None,
        detail: json!({}).into(),
    });
    audited(&app, "test.sentinel", 1).await;
    assert_eq!(audited(&app, "client.create", 1).await.len(), 1);
    for action in ["client.rotate_secret", "client.disable", "client.delete"] {
        let rows = portcullis::audit::recent(&app.state.db, action, 10)
            .await
            .unwrap();
        assert!(rows.is_empty(), "{action}: {rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_and_lists_clients_whose_secret_then_works() {
    let app_dir = tempfile::tempdir().unwrap();
    let dir = app_dir.path();
    let leaf = Pki::new().leaf();
    let (cert, key) = install_leaf(dir, &leaf);
    let db_url = format!("sqlite://{}/clients.db", dir.display());
    let file = dir.join("portcullis.toml");
    std::fs::write(
        &file,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[database]\nurl = \"{db_url}\"\n\
             [tokens]\nhash_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
             [keys]\nsource = \"file\"\nfile_dir = \"{}\"\n",
            cert.display(),
            key.display(),
            dir.display()
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(binary())
            .arg("clients")
            .args(args)
            .args(["--config", file.to_str().unwrap()])
            .env("USER", "tester")
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let (status, stdout, stderr) = cli(&[
        "create",
        "--id",
        "executor-billing",
        "--name",
        "Billing executor",
        "--scope",
        "jobs:run config:read:prod",
        "--access-token-lifetime",
        "10m",
        "--json",
    ]);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("will not be shown again"), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("pcs_"));
    assert_eq!(created["scopes"], json!(["config:read:prod", "jobs:run"]));

    let (status, stdout, stderr) = cli(&["list", "--json"]);
    assert!(status.success(), "{stderr}");
    assert!(!stdout.contains("pcs_"), "{stdout}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["clients"].as_array().unwrap().len(), 1);
    assert_eq!(listed["clients"][0]["id"], "executor-billing");
    assert_eq!(listed["clients"][0]["access_token_lifetime"], "10m");

    // the same rules as the API, with the field named and usage status 64
    let (status, _, stderr) = cli(&["create", "--name", "x", "--audience", "not a uri"]);
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("invalid audiences: "), "{stderr}");
    let (status, _, stderr) = cli(&["create", "--id", "executor-billing", "--name", "again"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("exists already"), "{stderr}");
    let (status, _, stderr) = cli(&["create", "--id", "portcullis-console", "--name", "x"]);
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("is sso.console_client_id"), "{stderr}");
    // no shared refresh store in this configuration: disable says so, and still disables
    let (status, stdout, stderr) = cli(&["disable", "executor-billing"]);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("no [redis] is configured"), "{stderr}");
    assert!(stdout.contains("disabled"), "{stdout}");
    let enabled = || {
        let (status, stdout, stderr) = cli(&["list", "--json"]);
        assert!(status.success(), "{stderr}");
        let listed: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(listed["clients"][0]["id"], "executor-billing", "{listed}");
        listed["clients"][0]["enabled"].clone()
    };
    assert_eq!(enabled(), false, "disabled in the store");
    let (status, _, stderr) = cli(&["enable", "executor-billing"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(enabled(), true, "enabled in the store");

    // an instance on that database accepts the secret the CLI printed
    let app = spawn_app(move |c| c.database.url = SecretString::from(db_url)).await;
    let (status, body) = token(&app, "executor-billing", &secret).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 600);
    let rows = portcullis::audit::recent(&app.state.db, "client.create", 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "operator:cli:tester");
    assert!(!rows[0].2.contains("pcs_"), "{:?}", rows[0]);
    let rows = portcullis::audit::recent(&app.state.db, "client.disable", 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);

    // revoke-tokens: the running instance refuses the client's tokens within its reload
    // interval, and the client gets working tokens again from the next second
    let (status, stdout, stderr) =
        cli(&["create", "--id", "executor-audit", "--name", "a", "--json"]);
    assert!(status.success(), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    let secret = created["secret"].as_str().unwrap().to_owned();
    let (status, body) = token(&app, "executor-audit", &secret).await;
    assert_eq!(status, 200, "{body}");
    let old = body["access_token"].as_str().unwrap().to_owned();
    app.state.keys.verify_access(&old).unwrap();
    let (status, stdout, stderr) = cli(&["revoke-tokens", "executor-audit", "--json"]);
    assert!(status.success(), "{stderr}");
    let cut: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cut["id"], "executor-audit");
    let first = time::OffsetDateTime::parse(
        cut["tokens_issued_before"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the instance applies the cutoff",
        || {
            let (state, old) = (app.state.clone(), old.clone());
            async move { state.keys.verify_access(&old).is_err() }
        },
    )
    .await;
    tokio::time::sleep(
        Duration::try_from(first - time::OffsetDateTime::now_utc()).unwrap_or_default(),
    )
    .await;
    let (status, body) = token(&app, "executor-audit", &secret).await;
    assert_eq!(status, 200, "{body}");
    app.state
        .keys
        .verify_access(body["access_token"].as_str().unwrap())
        .unwrap();
    let (status, _, stderr) = cli(&["revoke-tokens", "nobody-here"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
}
