//! The config center over HTTPS: aborting a gray release with no main release behind it,
//! and who may write Portcullis's own runtime settings (the application `portcullis`).

use serde_json::{Value, json};

use super::config_api::token;
use super::support::*;

/// Sends `method path` with a token of `scope`; the status, the `WWW-Authenticate`
/// header and the JSON body.
async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    scope: &str,
    body: Option<Value>,
) -> (u16, String, Value) {
    let mut req = app
        .https_client()
        .request(method, app.url(path))
        .bearer_auth(token(app, scope));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, challenge, body)
}

#[tokio::test]
async fn aborting_a_first_gray_release_leaves_every_node_without_a_release() {
    let app = spawn_app(|_| {}).await;
    let writer = "config:read:prod config:write:prod";
    let (s, _, b) = call(
        &app,
        reqwest::Method::PUT,
        "/config/v1/prod/new-service/gray",
        writer,
        Some(json!({
            "entries": [{ "key": "db.url", "value": "postgres://canary" }],
            "selector": { "instances": ["node-7"] }
        })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let read = |who: &'static str| {
        let app = &app;
        async move {
            let path = format!("/config/v1/prod/new-service{who}");
            let (s, _, b) = call(app, reqwest::Method::GET, &path, "config:read:prod", None).await;
            (s, b)
        }
    };
    assert_eq!(read("?instance=node-7").await.0, 200);
    assert_eq!(read("").await.0, 404, "no main release yet");

    let (s, _, b) = call(
        &app,
        reqwest::Method::DELETE,
        "/config/v1/prod/new-service/gray?version=1",
        writer,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["aborted"], 1, "{b}");
    assert_eq!(b["version"], Value::Null, "nothing was republished: {b}");
    for who in ["?instance=node-7", "?instance=node-8", ""] {
        let (s, b) = read(who).await;
        assert_eq!(s, 404, "{who}: an empty release is served: {b}");
    }

    // the next release is a main one, served to everybody
    let (s, _, b) = call(
        &app,
        reqwest::Method::PUT,
        "/config/v1/prod/new-service",
        writer,
        Some(json!({ "entries": [{ "key": "db.url", "value": "postgres://main" }] })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["version"], 2);
    let (s, b) = read("?instance=node-7").await;
    assert_eq!((s, b["version"].as_u64()), (200, Some(2)), "{b}");
}

/// Every write route of an (environment, application), with a body that succeeds on a
/// fresh application when the caller may write (run in this order); for the runtime
/// settings, the gray release is refused (400 `invalid_setting`: instances follow the
/// main release only), so there is none to promote or abort (409).
fn writes(env: &str, app: &str) -> Vec<(reqwest::Method, String, Option<Value>, u16)> {
    let base = format!("/config/v1/{env}/{app}");
    let entries = json!([{ "key": "log.level", "value": "info" }]);
    let (gray, after_gray) = if app == "portcullis" {
        (400, 409)
    } else {
        (201, 200)
    };
    vec![
        (
            reqwest::Method::PUT,
            base.clone(),
            Some(json!({ "entries": entries })),
            201,
        ),
        (
            reqwest::Method::PATCH,
            base.clone(),
            Some(json!({ "set": entries })),
            201,
        ),
        (
            reqwest::Method::POST,
            format!("{base}/rollback"),
            Some(json!({ "to": 1 })),
            201,
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/gray"),
            Some(json!({ "entries": entries, "selector": { "instances": ["node-7"] } })),
            gray,
        ),
        (
            reqwest::Method::POST,
            format!("{base}/gray/promote"),
            None,
            after_gray,
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/gray"),
            Some(json!({ "entries": entries, "selector": { "instances": ["node-7"] } })),
            gray,
        ),
        (
            reqwest::Method::DELETE,
            format!("{base}/gray"),
            None,
            if app == "portcullis" { 409 } else { 201 },
        ),
    ]
}

#[tokio::test]
async fn an_environment_wide_writer_may_not_write_the_runtime_settings() {
    let app = spawn_app(|c| {
        c.config_center.runtime_environment = Some("prod".to_owned());
    })
    .await;
    let env_wide = "config:read:prod config:write:prod config:reveal:prod";
    for (method, path, body, _) in writes("prod", "portcullis") {
        let (s, challenge, b) = call(&app, method.clone(), &path, env_wide, body).await;
        assert_eq!(s, 403, "{method} {path}: {b}");
        assert_eq!(b["error"], "insufficient_scope", "{method} {path}");
        assert!(
            challenge.contains("config:write:prod:portcullis"),
            "{method} {path}: the challenge names the grant it needs: {challenge}"
        );
    }
    let (s, _, b) = call(
        &app,
        reqwest::Method::GET,
        "/config/v1/prod/portcullis",
        env_wide,
        None,
    )
    .await;
    assert_eq!(
        s, 404,
        "nothing was written, and reading stays env-wide: {b}"
    );

    // the same token still writes every other application of the environment
    for (method, path, body, want) in writes("prod", "executor-orders") {
        let (s, _, b) = call(&app, method.clone(), &path, env_wide, body).await;
        assert_eq!(s, want, "{method} {path}: {b}");
    }
    // a grant for the application itself, or the gateway's admin scope, may
    for (scope, env) in [
        ("config:read:prod config:write:prod:portcullis", "prod"),
        ("portcullis:admin", "test"),
    ] {
        for (method, path, body, want) in writes(env, "portcullis") {
            let (s, _, b) = call(&app, method.clone(), &path, scope, body).await;
            assert_eq!(s, want, "{scope}: {method} {path}: {b}");
        }
    }
    // the runtime settings are never released gray: instances follow the main release
    // only and have nothing a selector could match, so a gray release would change
    // nothing until promoted, and then every instance at once
    let (s, _, b) = call(
        &app,
        reqwest::Method::PUT,
        "/config/v1/prod/portcullis/gray",
        "portcullis:admin",
        Some(json!({
            "entries": [{ "key": "log.level", "value": "debug" }],
            "selector": { "labels": { "zone": "b" } },
        })),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"], "invalid_setting");
    assert!(
        b["error_description"].as_str().unwrap().contains("gray"),
        "{b}"
    );
    // an explicit grant is for its own environment only
    let (s, _, b) = call(
        &app,
        reqwest::Method::PATCH,
        "/config/v1/dev/portcullis",
        "config:write:prod:portcullis config:write:dev",
        Some(json!({ "set": [{ "key": "log.level", "value": "debug" }] })),
    )
    .await;
    assert_eq!(s, 403, "{b}");
}
