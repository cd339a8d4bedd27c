//! Portcullis's own runtime settings, kept in the config center and applied without a
//! restart.

use std::time::Duration;

use portcullis::oauth::claims::{AccessClaims, Audiences};
use serde_json::json;

use super::support::*;

fn admin_token(app: &TestApp) -> String {
    let now = app.state.keys.now().unix_timestamp();
    app.state
        .keys
        .sign(&AccessClaims {
            iss: app.state.config.issuer(),
            sub: "ops".to_owned(),
            aud: Audiences::One(app.state.config.issuer()),
            exp: now + 600,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: "config:read:dev config:write:dev:portcullis".to_owned(),
            client_id: "ops".to_owned(),
            roles: vec![],
            sid: None,
        })
        .unwrap()
}

pub(super) async fn publish(app: &TestApp, entries: serde_json::Value) -> u16 {
    app.https_client()
        .put(app.url("/config/v1/dev/portcullis"))
        .bearer_auth(admin_token(app))
        .json(&json!({ "entries": entries, "message": "tune" }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// How many of `n` quick requests to `/auth/login` were refused with 429.
pub(super) async fn limited(app: &TestApp, n: usize) -> usize {
    let http = app.https_client();
    let mut refused = 0;
    for _ in 0..n {
        let r = http.get(app.url("/auth/login")).send().await.unwrap();
        if r.status().as_u16() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            refused += 1;
        }
    }
    refused
}

/// How many of `n` quick requests to `/oauth2/token` were refused with 429.
async fn token_limited(app: &TestApp, n: usize) -> usize {
    let http = app.https_client();
    let mut refused = 0;
    for _ in 0..n {
        // no credentials at all: refused by the endpoint, after its rate limit
        let r = http.post(app.url("/oauth2/token")).send().await.unwrap();
        if r.status().as_u16() == 429 {
            refused += 1;
        }
    }
    refused
}

/// The version of the newest release of the runtime settings.
async fn newest_version(app: &TestApp) -> serde_json::Value {
    app.https_client()
        .get(app.url("/config/v1/dev/portcullis/releases"))
        .bearer_auth(admin_token(app))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["releases"][0]["version"]
        .clone()
}

async fn rejected_total(app: &TestApp) -> f64 {
    app.sample("portcullis_runtime_settings_rejected_total")
        .await
}

#[tokio::test]
async fn rate_limits_follow_the_config_center_without_a_restart() {
    let app = spawn_app(|c| {
        c.config_center.runtime_environment = Some("dev".to_owned());
        c.protection.auth_rate.burst = 1000;
    })
    .await;
    assert_eq!(limited(&app, 5).await, 0, "the file's generous limit");

    let status = publish(
        &app,
        json!([
            { "key": "protection.auth_rate.burst", "value": "2" },
            { "key": "protection.auth_rate.replenish_every", "value": "1h" },
            { "key": "log.level", "value": "info,portcullis=debug" }
        ]),
    )
    .await;
    assert_eq!(status, 201);
    eventually(Duration::from_secs(10), "the tighter limit applies", || {
        let app = &app;
        async move { limited(app, 3).await > 0 }
    })
    .await;

    // a release that changes something else leaves the buckets, and every client's place
    // in them, as they are: the tighter limit is not handed out afresh
    assert_eq!(limited(&app, 3).await, 3, "the bucket is empty");
    let status = publish(
        &app,
        json!([
            { "key": "protection.auth_rate.burst", "value": "2" },
            { "key": "protection.auth_rate.replenish_every", "value": "1h" },
            { "key": "protection.token_rate.burst", "value": "2" },
            { "key": "protection.token_rate.replenish_every", "value": "1h" },
            { "key": "log.level", "value": "info,portcullis=debug" }
        ]),
    )
    .await;
    assert_eq!(status, 201);
    // the token endpoint's new limit shows the release is in force
    eventually(Duration::from_secs(10), "the release applies", || {
        let app = &app;
        async move { token_limited(app, 3).await > 0 }
    })
    .await;
    assert_eq!(
        limited(&app, 2).await,
        2,
        "an unchanged limit came back with a full bucket"
    );

    // a release every instance would refuse is not published at all: 400, naming the
    // setting, and nothing is written (the tighter limit stays)
    let head = newest_version(&app).await;
    for (entries, names) in [
        (
            json!([
                { "key": "protection.auth_rate.burst", "value": "0" },
                { "key": "log.level", "value": "debug" }
            ]),
            "protection.auth_rate",
        ),
        (
            json!([{ "key": "no.such.setting", "value": "1" }]),
            "no.such.setting",
        ),
        (
            json!([{ "key": "proxy.upstreams", "value": "http://a:80,http://a:80/" }]),
            "listed twice",
        ),
    ] {
        let response = app
            .https_client()
            .put(app.url("/config/v1/dev/portcullis"))
            .bearer_auth(admin_token(&app))
            .json(&json!({ "entries": entries, "message": "tune" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{entries}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_setting", "{body}");
        assert!(
            body["error_description"].as_str().unwrap().contains(names),
            "{body}"
        );
    }
    let after = newest_version(&app).await;
    assert_eq!(after, head, "a refused release was written");
    assert!(
        limited(&app, 3).await > 0,
        "the previous limit is still in force"
    );

    // removing the keys goes back to the file's values
    assert_eq!(publish(&app, json!([])).await, 201);
    eventually(Duration::from_secs(10), "the file's limit is back", || {
        let app = &app;
        async move { limited(app, 5).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn a_release_this_instance_cannot_apply_changes_none_of_its_settings() {
    let app = spawn_app(|c| {
        c.config_center.runtime_environment = Some("dev".to_owned());
        c.protection.token_rate.burst = 1000;
        c.proxy.upstreams.clear();
    })
    .await;
    assert!(
        app.state.proxy.is_none(),
        "the proxy is off on this instance"
    );
    assert_eq!(token_limited(&app, 5).await, 0, "the file's generous limit");

    // valid keys, but admin nodes for a proxy this instance does not run: the whole
    // release is refused, the token endpoint's limit included
    let before = rejected_total(&app).await;
    let status = publish(
        &app,
        json!([
            { "key": "protection.token_rate.burst", "value": "2" },
            { "key": "protection.token_rate.replenish_every", "value": "1h" },
            { "key": "proxy.upstreams", "value": "http://127.0.0.1:9" }
        ]),
    )
    .await;
    assert_eq!(status, 201);
    eventually(Duration::from_secs(10), "the refusal is counted", || {
        let app = &app;
        async move { rejected_total(app).await > before }
    })
    .await;
    assert_eq!(
        token_limited(&app, 5).await,
        0,
        "the token endpoint's limit changed although the release was refused"
    );
}
